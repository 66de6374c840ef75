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
from dataclasses import dataclass

from models import register_models
from sft.checkpoint.adapters import read_adapter
from sft.core.flags import REQUIRED, ArgumentParser, HelpFormatter, add_arguments, flag, parse_flags
from sft.core.paths import require_local_dir
from sft.core.runner import run_entry_point, setup_logging
from sft.export.gguf import OUT_TYPES, export_gguf, plan_export
from sft.export.merge import MERGE_INTO, merge_lora
from sft.export.ollama import NAMED_TEMPLATES
from sft.inference.loading import resolve_device
from sft.modeling import QUANTIZATIONS
from sft.modeling.loading import DTYPES

logger = logging.getLogger("merge_params")


@dataclass
class MergeArgs:
    """The flags of merge_params.py (the RolePlayProj recipe's names for the three directories)."""

    ori_model_dir: str = flag(REQUIRED, "Local directory of the base model the adapter was trained on.")
    model_dir: str = flag(REQUIRED, "The LoRA adapter directory (a train.py checkpoint).")
    save_model_dir: str = flag(REQUIRED, "Where to write the merged model (new or empty directory).")
    merge_into: str = flag(
        "dequantized",
        "dequantized: merge into the base as a quantised (QLoRA) training run saw it; original: into the "
        "unquantised weights. Identical for adapters trained without quantisation.",
        choices=MERGE_INTO,
    )
    quantization: str | None = flag(
        None,
        "The adapter's training quantisation, for adapters without train_args.json (otherwise read from it).",
        choices=QUANTIZATIONS,
    )
    double_quant: bool | None = flag(
        None, "4-bit training used double quantisation (default: from train_args.json, else yes)."
    )
    dtype: str = flag("bf16", "dtype of the saved weights.", choices=sorted(DTYPES))
    max_shard_size: str = flag("5GB", "Largest safetensors shard, e.g. 2GB or 500MB.")
    device: str = flag("auto", "Where to merge: auto (first GPU, else CPU), cpu, cuda, cuda:N.")
    overwrite: bool = flag(False, "Replace an existing non-empty --save_model_dir.", action="store_true")
    tolerance: float = flag(
        1e-3, "Largest allowed |merged - (base+adapter)| logit difference on the probe inputs (fp32)."
    )
    gguf: str | None = flag(
        None,
        "Also export the merged model to this .gguf file for llama.cpp / Ollama, verified, with an Ollama "
        "Modelfile named after it next to it (as export_gguf.py --modelfile does; see docs/INFERENCE.md).",
    )
    gguf_type: str = flag("f16", "Weight type of the --gguf file.", choices=OUT_TYPES)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags: the fields of :class:`MergeArgs`."""
    parser = ArgumentParser(
        description="Merge a LoRA adapter into its base model (see docs/INFERENCE.md).",
        formatter_class=HelpFormatter,
    )
    return add_arguments(parser, MergeArgs)


def run(argv: list[str]) -> None:
    """Parse flags, merge, print the report."""
    args = parse_flags(build_parser(), MergeArgs, argv)
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
