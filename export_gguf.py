"""Export a model directory (e.g. merge_params.py's output) to a GGUF file for llama.cpp / Ollama.

    python export_gguf.py --model_dir output/rolebench-merged --out out/rolebench-q8_0.gguf --type q8_0 --modelfile

llama.cpp's own converter writes the file (Baichuan2: our writer); it is read back by an independent reader and
compared with the source model before it is moved into place; a model llama.cpp cannot represent is refused with
one line and nothing is written. See docs/INFERENCE.md.
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
from sft.export.gguf import OUT_TYPES, VERIFY_CHOICES, export_gguf
from sft.export.ollama import NAMED_TEMPLATES

logger = logging.getLogger("export_gguf")


@dataclass
class ExportArgs:
    """The flags of export_gguf.py."""

    model_dir: str = flag(REQUIRED, "Local model directory: config.json, safetensors, tokenizer.")
    out: str = flag(REQUIRED, "The .gguf file to write.")
    out_type: str = flag(
        "f16",
        "Weight type of the matrices (norms stay f32). Q4_K_M and other k-quants: export f16, then run "
        "llama.cpp's llama-quantize on it (docs/INFERENCE.md).",
        choices=OUT_TYPES,
        option="--type",
    )
    modelfile: str | None = flag(
        None,
        "Also write an Ollama Modelfile: --modelfile puts NAME.Modelfile next to NAME.gguf, --modelfile PATH "
        "writes it there.",
        const=True,
    )
    template: str | None = flag(
        None,
        "Chat format for the Modelfile (default: recognised from the tokenizer's chat template; a template that "
        "is none of these is left to Ollama, which reads it from the file; without one, the training default "
        "for the model type).",
        choices=NAMED_TEMPLATES,
    )
    verify: str = flag(
        "auto",
        "Reader that checks the file against the source model: auto = transformers' GGUF reader where it reads "
        "the model faithfully, else llama_cpp if installed, else none (with a warning).",
        choices=VERIFY_CHOICES,
    )
    pre_tokenizer: str | None = flag(
        None,
        "Name the split of a byte-level BPE tokenizer llama.cpp's converter does not recognise (qwen2 for "
        "Qwen2/2.5/3, llama-bpe for Llama 3.x, ...): only when it is that model's tokenizer with other merges.",
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
            modelfile=args.modelfile or False,
            template=args.template,
            verify=args.verify,
            overwrite=args.overwrite,
            pre_tokenizer=args.pre_tokenizer,
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
