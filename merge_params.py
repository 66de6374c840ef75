"""Fold a LoRA adapter into its base model and write a standalone model directory.

    python merge_params.py --ori_model_dir BASE --model_dir ADAPTER --save_model_dir OUT

By default a QLoRA adapter is merged into the base *as training saw it* (NF4-dequantised weights);
``--merge_into original`` merges into the unquantised weights. The merged model's logits are checked
against base + adapter on probe inputs before anything is written. See docs/INFERENCE.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from models import register_models
from sft.checkpoint.adapters import read_adapter
from sft.core.flags import ArgumentParser, HelpFormatter
from sft.core.paths import require_local_dir
from sft.core.runner import run_entry_point, setup_logging
from sft.export.gguf import OUT_TYPES, export_gguf, plan_export
from sft.export.merge import MERGE_INTO, merge_lora
from sft.export.ollama import NAMED_TEMPLATES
from sft.inference.loading import resolve_device
from sft.modeling import QUANTIZATIONS
from sft.modeling.loading import DTYPES

logger = logging.getLogger("merge_params")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (the RolePlayProj recipe's names for the three directories)."""
    parser = ArgumentParser(
        description="Merge a LoRA adapter into its base model (see docs/INFERENCE.md).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--ori_model_dir", required=True, help="Local directory of the base model the adapter was trained on."
    )
    parser.add_argument(
        "--model_dir", required=True, help="The LoRA adapter directory (a train.py checkpoint)."
    )
    parser.add_argument(
        "--save_model_dir", required=True, help="Where to write the merged model (new or empty directory)."
    )
    parser.add_argument(
        "--merge_into",
        choices=MERGE_INTO,
        default="dequantized",
        help="dequantized: merge into the base as a quantised (QLoRA) training run saw it; original: into the "
        "unquantised weights. Identical for adapters trained without quantisation.",
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="The adapter's training quantisation, for adapters without train_args.json (otherwise read from it).",
    )
    parser.add_argument(
        "--double_quant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="4-bit training used double quantisation (default: from train_args.json, else yes).",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the saved weights.")
    parser.add_argument(
        "--max_shard_size", default="5GB", help="Largest safetensors shard, e.g. 2GB or 500MB."
    )
    parser.add_argument(
        "--device", default="auto", help="Where to merge: auto (first GPU, else CPU), cpu, cuda, cuda:N."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing non-empty --save_model_dir."
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="Largest allowed |merged - (base+adapter)| logit difference on the probe inputs (fp32).",
    )
    parser.add_argument(
        "--gguf",
        default=None,
        help="Also export the merged model to this .gguf file for llama.cpp / Ollama, verified, with an Ollama "
        "Modelfile next to it (as export_gguf.py does; see docs/INFERENCE.md).",
    )
    parser.add_argument(
        "--gguf_type", choices=OUT_TYPES, default="f16", help="Weight type of the --gguf file."
    )
    return parser


def run(argv: list[str]) -> None:
    """Parse flags, merge, print the report."""
    args = build_parser().parse_args(argv)
    setup_logging()
    register_models()
    base_dir = require_local_dir(args.ori_model_dir, "--ori_model_dir")
    if args.gguf:
        plan_export(base_dir)  # an architecture the export refuses is refused before the merge
    report = merge_lora(
        base_dir,
        args.model_dir,
        args.save_model_dir,
        merge_into=args.merge_into,
        quantization=args.quantization,
        double_quant=args.double_quant,
        dtype=DTYPES[args.dtype],
        device=resolve_device(args.device),
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        tolerance=args.tolerance,
    )
    logger.info("merged model written to %s", report.out_dir)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    if args.gguf:
        trained = read_adapter(args.model_dir, "--model_dir").template
        exported = export_gguf(
            report.out_dir,
            args.gguf,
            out_type=args.gguf_type,
            modelfile=True,
            template=trained if trained in NAMED_TEMPLATES else None,
            overwrite=args.overwrite,
        )
        print(exported.to_json())


def main(argv: list[str] | None = None) -> int:
    """Entry point; a refusal or a failed check exits 1 with a one-line reason (README.md, "When things go
    wrong")."""
    return run_entry_point(run, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
