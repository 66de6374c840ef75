"""Export a model directory (e.g. merge_params.py's output) to a GGUF file for llama.cpp / Ollama.

    python export_gguf.py --model_dir output/rolebench-merged --out out/rolebench-q8_0.gguf --type q8_0 --modelfile

The file is read back by an independent reader and compared with the source model before it is moved into
place; a model llama.cpp cannot represent is refused with one line and nothing is written. See docs/INFERENCE.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from models import register_models
from sft.core.paths import require_local_dir
from sft.core.runner import setup_logging
from sft.export.errors import ExportCheckError, ExportRefused
from sft.export.gguf import OUT_TYPES, export_gguf
from sft.export.ollama import NAMED_TEMPLATES

logger = logging.getLogger("export_gguf")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        description="Export a model directory to GGUF (llama.cpp, Ollama); see docs/INFERENCE.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model_dir", required=True, help="Local model directory: config.json, safetensors, tokenizer."
    )
    parser.add_argument("--out", required=True, help="The .gguf file to write.")
    parser.add_argument(
        "--type",
        dest="out_type",
        choices=OUT_TYPES,
        default="f16",
        help="Weight type of the matrices (norms stay f32).",
    )
    parser.add_argument(
        "--modelfile", action="store_true", help="Also write an Ollama Modelfile next to the file."
    )
    parser.add_argument(
        "--template",
        choices=NAMED_TEMPLATES,
        default=None,
        help="Chat format for the Modelfile and the file (default: recognised from the tokenizer's chat template, "
        "else the training default for the model type).",
    )
    parser.add_argument(
        "--verify",
        choices=("auto", "transformers", "llama_cpp", "none"),
        default="auto",
        help="Reader that checks the file against the source model: auto = transformers for Llama-architecture "
        "files, llama_cpp (if installed) for Baichuan2 files.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace existing output files.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse flags, export, print the JSON report; exit 1 with a one-line reason on refusal or failed check."""
    args = build_parser().parse_args(argv)
    setup_logging()
    register_models()
    # SIGTERM as an exception, so that the export removes its temporary file on the way out.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        require_local_dir(args.model_dir, "--model_dir")
        report = export_gguf(
            args.model_dir,
            args.out,
            out_type=args.out_type,
            modelfile=args.modelfile,
            template=args.template,
            verify=args.verify,
            overwrite=args.overwrite,
        )
    except (ExportRefused, ExportCheckError, ValueError) as err:
        logger.error("%s", err)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
