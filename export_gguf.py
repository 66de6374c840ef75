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
from dataclasses import dataclass

from models import register_models
from sft.core.flags import REQUIRED, add_arguments, flag, parse_flags
from sft.core.paths import require_local_dir
from sft.core.runner import setup_logging
from sft.export.errors import ExportCheckError, ExportRefused
from sft.export.gguf import OUT_TYPES, export_gguf
from sft.export.ollama import NAMED_TEMPLATES

logger = logging.getLogger("export_gguf")


@dataclass
class ExportArgs:
    """The flags of export_gguf.py."""

    model_dir: str = flag(REQUIRED, "Local model directory: config.json, safetensors, tokenizer.")
    out: str = flag(REQUIRED, "The .gguf file to write.")
    out_type: str = flag(
        "f16", "Weight type of the matrices (norms stay f32).", choices=OUT_TYPES, option="--type"
    )
    modelfile: bool = flag(False, "Also write an Ollama Modelfile next to the file.", action="store_true")
    template: str | None = flag(
        None,
        "Chat format for the Modelfile and the file (default: recognised from the tokenizer's chat template, "
        "else the training default for the model type).",
        choices=NAMED_TEMPLATES,
    )
    verify: str = flag(
        "auto",
        "Reader that checks the file against the source model: auto = transformers for Llama-architecture "
        "files, llama_cpp (if installed) for Baichuan2 files.",
        choices=("auto", "transformers", "llama_cpp", "none"),
    )
    overwrite: bool = flag(False, "Replace existing output files.", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags: the fields of :class:`ExportArgs`."""
    parser = argparse.ArgumentParser(
        description="Export a model directory to GGUF (llama.cpp, Ollama); see docs/INFERENCE.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    return add_arguments(parser, ExportArgs)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, export, print the JSON report; exit 1 with a one-line reason on refusal or failed check."""
    args = parse_flags(build_parser(), ExportArgs, argv)
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
