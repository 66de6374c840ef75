"""The whole job on the built-in default, end to end: `make demo` (or `python demo.py --out demo_out`).

data -> train (QLoRA under DeepSpeed, perplexity before and after) -> merge -> answer a role-play question.
Each stage is one of the project's own command-line tools, run exactly as a user would run it, so the demo
doubles as a living example of the commands in the README. The base model is a tiny random Baichuan2 with a
tokenizer trained locally, and the data is the bundled RoleBench-style sample in `data/demo_rolebench/`, so the
demo runs anywhere in a few minutes; pass `--model_dir` to use a real local Baichuan2/Llama directory instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

from sft.checkpoint import list_checkpoints
from sft.cli import setup_logging

logger = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parent


def run(stage: str, cmd: list[str]) -> None:
    """Run one stage as a subprocess, streaming its output; stop the demo if it fails."""
    logger.info("[%s] $ %s", stage, shlex.join(cmd))
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo stage '{stage}' failed (exit {result.returncode}): {shlex.join(cmd)}")
    logger.info("[%s] done in %.0fs", stage, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo_out", help="folder for every artefact of the demo")
    parser.add_argument(
        "--model_dir",
        default=None,
        help="local base model directory (default: build a tiny random Baichuan2)",
    )
    parser.add_argument("--data_dir", default="data/demo_rolebench", help="RoleBench-style data folder")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs over the sample data")
    args = parser.parse_args()
    setup_logging()

    out = Path(args.out)
    py = sys.executable
    outputs: dict[str, Path] = {}

    # 1. Base model: a tiny random Baichuan2 with a SentencePiece tokenizer trained here, unless one is given.
    if args.model_dir is None:
        base = out / "tiny-baichuan2"
        run("model", [py, "-m", "models.tiny", "--out", str(base), "--arch", "baichuan"])
    else:
        base = Path(args.model_dir)
    outputs["base model"] = base

    # 2. Data: RoleBench-style records -> the conversation JSONL format (system prompt from the role's profile).
    data = out / "data"
    run("data", [py, "data_helper.py", "rolebench", "--data_dir", args.data_dir, "--out_dir", str(data)])
    outputs["train data"] = data / "train.jsonl"
    outputs["test data"] = data / "test.jsonl"

    # 3. Perplexity of the base model on the test split, before any training (4-bit, as training will see it).
    ppl_before = out / "ppl_before.json"
    run("ppl-before", [py, "evaluate.py", "ppl", "--model_path", str(base), "--data_path", str(outputs["test data"]),
                       "--quantization", "nf4", "--dtype", "fp32", "--max_len", "512", "--max_src_len", "384",
                       "--output_json", str(ppl_before)])  # fmt: skip

    # 4. Train: QLoRA (NF4 base + LoRA on every linear layer) under DeepSpeed ZeRO-2; one process.
    #    train.py also reports test perplexity at every save step and at the end of each epoch.
    ckpts = out / "checkpoints"
    run(
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
    run("ppl-after", [py, "evaluate.py", "ppl", "--model_path", str(base), "--adapter_dir", str(adapter),
                      "--data_path", str(outputs["test data"]), "--output_json", str(ppl_after)])  # fmt: skip

    # 6. Curves: the TensorBoard scalars rendered to a PNG for people without TensorBoard at hand.
    curves = out / "curves.png"
    run("plot", [py, "-m", "sft.plotting", str(ckpts / "runs"), "--out", str(curves)])
    outputs["curves"] = curves

    # 7. Merge: fold the adapter into the (NF4-dequantised) base -> a standalone model directory.
    merged = out / "merged"
    run(
        "merge",
        [
            py, "merge_params.py",
            "--ori_model_dir", str(base),
            "--model_dir", str(adapter),
            "--save_model_dir", str(merged),
            "--dtype", "fp32",
            "--overwrite",
        ],
    )  # fmt: skip
    outputs["merged model"] = merged

    # 8. Answer a role-play question from the test split with the merged model.
    predictions = out / "predictions.jsonl"
    run(
        "predict",
        [
            py, "predict.py",
            "--model_path", str(merged),
            "--data_path", str(outputs["test data"]),
            "--output_path", str(predictions),
            "--max_samples", "1",
            "--max_new_tokens", "48",
            "--no-do_sample",  # greedy: the same answer on every run
        ],
    )  # fmt: skip
    outputs["predictions"] = predictions
    first = json.loads(predictions.read_text(encoding="utf-8").splitlines()[0])
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


if __name__ == "__main__":
    main()
