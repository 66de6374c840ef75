"""Preference alignment on a real model, for quality: SFT, then self-play pairs, then DPO from the SFT adapter.

SmolLM2-135M-Instruct on DialogSum, every stage one of the project's own command-line tools:

    model       python -m models.smollm2                      the packaged GGUF -> a transformers model directory
    data        data_helper.py dialogsum                      DialogSum dev and test -> conversation JSONL
    sft         train.py                                      QLoRA on dev dialogues 200-499, packed (as make demo, longer)
    pairs       data_helper.py preference                     the SFT model summarises dev dialogues 0-199 (greedy): its
                                                              summary rejected, the annotator's chosen; 0-159 train,
                                                              160-199 held out
    dpo         train.py --objective dpo --init_adapter SFT   sigmoid DPO from the SFT adapter (also the reference),
                                                              packed pairs, reference log-probs in one pass
    reward      evaluate.py preference                        reward accuracy and margin on the held-out pairs
    merge       merge_params.py                               both adapters folded into the base
    score       predict.py + evaluate.py rouge                test dialogues 0..N-1, greedy: zero-shot, SFT, SFT+DPO

and writes a JSON report: ROUGE-1/2/L of the three models, the held-out reward accuracy, each stage's wall time,
the tokens each training stage processed, the mean summary length of each model, and the test dialogues where
the SFT and SFT+DPO summaries differ most (first ones, by a fixed rule). The SFT data (dev 200-499) and the
pairs' dialogues (dev 0-199) do not overlap, so the self-play pairs are on dialogues the SFT model never saw.

    python benchmarks/bench_dpo_quality.py --out dpo_quality            # ~45-60 min on 2 quiet cores
    python benchmarks/bench_dpo_quality.py --out q --smoke              # the same stages at toy sizes

Results: docs/PERFORMANCE.md ("Preference alignment: quality").
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sft.checkpoint.layout import list_checkpoints  # noqa: E402
from sft.core.flags import ArgumentParser, add_arguments, flag, parse_flags  # noqa: E402
from sft.core.runner import run_entry_point  # noqa: E402
from sft.data.formats import iter_json_records, write_jsonl_atomic  # noqa: E402
from sft.inference.rouge import read_f1  # noqa: E402

logger = logging.getLogger("bench_dpo_quality")


@dataclass
class QualityArgs:
    """The flags of bench_dpo_quality.py."""

    out: Path = flag(
        Path("dpo_quality"), "Working directory (models, data, checkpoints, predictions, report)."
    )
    model_dir: Path | None = flag(
        None, "An imported SmolLM2 directory to reuse (default: import it into --out)."
    )
    dialogsum_dir: Path = flag(ROOT.parent / "shared" / "data" / "dialogsum", "DialogSum's folder.")
    test_dialogues: int = flag(200, "Test dialogues scored (the first N).")
    sft_steps: int = flag(30, "SFT optimizer steps (one packed row of --max_len tokens a step).")
    pair_dialogues: int = flag(200, "Dev dialogues the SFT model summarises for pairs (the first N).")
    held_out_pairs: int = flag(40, "Of those, the last ones held out for the reward accuracy.")
    dpo_epochs: int = flag(1, "DPO epochs over the pairs.")
    pref_beta: float = flag(0.1, "DPO's beta.")
    dpo_learning_rate: float = flag(5e-5, "DPO's learning rate.")
    max_len: int = flag(1024, "Tokens per sequence (and per packed SFT row).")
    max_new_tokens: int = flag(64, "Summary length limit (greedy).")
    batch_size: int = flag(16, "Prompts generated together.")
    smoke: bool = flag(False, "The same stages at toy sizes (the numbers mean nothing).", action="store_true")

    def problems(self) -> list[str]:
        problems = []
        if not 0 < self.held_out_pairs < self.pair_dialogues:
            problems.append("--held_out_pairs must be in (0, --pair_dialogues)")
        if self.pair_dialogues > 200:
            problems.append("--pair_dialogues must be <= 200 (dev 200-499 are the SFT data)")
        return problems


class Stages:
    """Runs the stages as subprocesses from the repository root and keeps their wall times."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, stage: str, cmd: list[str]) -> None:
        logger.info("[%s] $ %s", stage, shlex.join(cmd))
        start = time.perf_counter()
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise SystemExit(f"stage '{stage}' failed: {shlex.join(cmd)}")
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def read_jsonl(path: Path) -> list[dict]:
    return [record for _, record in iter_json_records(path)]


def trained_tokens(run_dir: Path) -> dict[str, float]:
    """Steps and tokens/s of a train.py run, from its TensorBoard events."""
    from sft.train.plotting import read_scalars

    scalars = read_scalars(run_dir / "runs")
    rates = [v for _, v in scalars.get("train/tokens_per_sec", [])]
    return {"steps": len(scalars.get("train/loss", [])), "tokens_per_sec": sum(rates) / max(len(rates), 1)}


def run(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, QualityArgs)
    args = parse_flags(parser, QualityArgs, argv)
    if args.smoke:
        args.test_dialogues, args.sft_steps, args.pair_dialogues, args.held_out_pairs = 4, 2, 8, 2
        args.max_new_tokens, args.max_len = 16, 512
    out, py, stages = args.out, sys.executable, Stages()
    out.mkdir(parents=True, exist_ok=True)
    base = args.model_dir
    if base is None:
        base = out / "smollm2"
        stages.run("model", [py, "-m", "models.smollm2", "--out", str(base)])

    # Data: dev 0..pair_dialogues-1 for pairs, dev 200-499 for SFT, test for ROUGE.
    data = out / "data"
    for split in ("dev", "test"):
        source = args.dialogsum_dir / f"dialogsum.{split}.jsonl"
        stages.run(
            "data",
            [
                py,
                "data_helper.py",
                "dialogsum",
                "--input",
                str(source),
                "--output",
                str(data / f"{split}.jsonl"),
            ],
        )
    dev = read_jsonl(data / "dev.jsonl")
    write_jsonl_atomic(data / "sft.jsonl", dev[200:])
    write_jsonl_atomic(data / "pair_dialogues.jsonl", dev[: args.pair_dialogues])

    common = ["--model_name_or_path", str(base), "--quantization", "nf4", "--precision", "fp32",
              "--max_len", str(args.max_len), "--max_src_len", str(args.max_len - 64), "--lora_dim", "16",
              "--lora_alpha", "32", "--lora_dropout", "0", "--weight_decay", "0", "--show_loss_step", "1",
              "--save_model_step", "0"]  # fmt: skip
    sft_dir = out / "sft"
    stages.run("sft", [py, "train.py", *common, "--train_path", str(data / "sft.jsonl"), "--output_dir", str(sft_dir),
                       "--packing", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
                       "--max_steps", str(args.sft_steps), "--learning_rate", "1e-3"])  # fmt: skip
    sft_adapter = list_checkpoints(sft_dir)[-1]

    pairs = out / "pairs.jsonl"
    stages.run("pairs", [py, "data_helper.py", "preference", "--model_path", str(base), "--adapter_dir", str(sft_adapter),
                         "--input", str(data / "pair_dialogues.jsonl"), "--output", str(pairs), "--no-do_sample",
                         "--max_new_tokens", str(args.max_new_tokens), "--batch_size", str(args.batch_size)])  # fmt: skip
    all_pairs = read_jsonl(pairs)
    # Records keep their order; the held-out pairs are those of the last dialogues.
    split_at = len(all_pairs) - args.held_out_pairs
    write_jsonl_atomic(out / "pairs_train.jsonl", all_pairs[:split_at])
    write_jsonl_atomic(out / "pairs_heldout.jsonl", all_pairs[split_at:])

    dpo_dir = out / "dpo"
    stages.run("dpo", [py, "train.py", *common, "--objective", "dpo", "--init_adapter", str(sft_adapter),
                       "--train_path", str(out / "pairs_train.jsonl"), "--test_path", str(out / "pairs_heldout.jsonl"),
                       "--output_dir", str(dpo_dir), "--packing", "--precompute_ref", "--pref_beta", str(args.pref_beta),
                       "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                       "--num_train_epochs", str(args.dpo_epochs), "--learning_rate", str(args.dpo_learning_rate),
                       "--warmup_ratio", "0.1"])  # fmt: skip
    dpo_adapter = list_checkpoints(dpo_dir)[-1]
    reward = out / "reward_heldout.json"
    stages.run("reward", [py, "evaluate.py", "preference", "--model_path", str(base), "--adapter_dir", str(dpo_adapter),
                          "--data_path", str(out / "pairs_heldout.jsonl"), "--output_json", str(reward)])  # fmt: skip

    models = {"zero-shot": base}
    for name, adapter in (("sft", sft_adapter), ("sft+dpo", dpo_adapter)):
        models[name] = out / f"merged_{name}"
        stages.run("merge", [py, "merge_params.py", "--ori_model_dir", str(base), "--model_dir", str(adapter),
                             "--save_model_dir", str(models[name]), "--dtype", "fp32", "--overwrite"])  # fmt: skip
    rouge, lengths, predictions = {}, {}, {}
    for name, model in models.items():
        pred, scores = out / f"predictions_{name}.jsonl", out / f"rouge_{name}.json"
        stages.run(f"score {name}", [py, "predict.py", "--model_path", str(model), "--data_path", str(data / "test.jsonl"),
                                     "--output_path", str(pred), "--max_samples", str(args.test_dialogues),
                                     "--max_new_tokens", str(args.max_new_tokens), "--no-do_sample",
                                     "--batch_size", str(args.batch_size)])  # fmt: skip
        stages.run(
            f"score {name}",
            [py, "evaluate.py", "rouge", "--pred_path", str(pred), "--output_json", str(scores)],
        )
        rouge[name] = read_f1(scores)
        predictions[name] = [row["prediction"] for row in read_jsonl(pred)]
        lengths[name] = sum(len(p.split()) for p in predictions[name]) / len(predictions[name])

    changed = [
        i for i, (a, b) in enumerate(zip(predictions["sft"], predictions["sft+dpo"], strict=True)) if a != b
    ]
    report = {
        "args": {k: str(v) for k, v in asdict(args).items()},
        "rouge_f1": rouge,
        "mean_summary_words": lengths,
        "reward_heldout": json.loads(reward.read_text()),
        "pairs": {"written": len(all_pairs), "train": split_at, "held_out": args.held_out_pairs},
        "sft_run": trained_tokens(sft_dir),
        "dpo_run": trained_tokens(dpo_dir),
        "stage_seconds": {k: round(v, 1) for k, v in stages.seconds.items()},
        "summaries_changed_by_dpo": len(changed),
        "examples": [
            {"dialogue": i, "sft": predictions["sft"][i], "sft+dpo": predictions["sft+dpo"][i]}
            for i in changed[:3]
        ],
    }
    (out / "report.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    for name, scores in rouge.items():
        logger.info("%-10s ROUGE-1 %.2f  ROUGE-2 %.2f  ROUGE-L %.2f  (%.1f words)", name, scores["rouge1"],
                    scores["rouge2"], scores["rougeL"], lengths[name])  # fmt: skip
    logger.info(
        "held-out reward accuracy %.3f; report %s",
        report["reward_heldout"]["reward_accuracy"],
        out / "report.json",
    )


if __name__ == "__main__":
    sys.exit(run_entry_point(run, logger=logger))
