"""Which file of a model directory is damaged, in one line: for the message when loading it failed.

transformers reports a truncated ``model.safetensors`` or a corrupt ``tokenizer.model`` with a long
traceback that does not name the file. :mod:`sft.modeling.loading` calls these checks when a load fails and
raises :class:`ModelFileError` with what they find. Each check is cheap (JSON files parsed, safetensors
headers read and compared with the file sizes, a SentencePiece model parsed), and none loads weights.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from sft.core.errors import UserError

# JSON files a model directory may hold (transformers and tokenizers read them all when present).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_JSON_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SENTENCEPIECE_FILE = "tokenizer.model"
FIX = "copy or download the model again (compare sizes and checksums with the source)"


class ModelFileError(UserError):
    """A file of a model directory is damaged; the message names it and the fix."""


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return f"{path} is not valid JSON (line {err.lineno} column {err.colno}: {err.msg}): {FIX}"
    except UnicodeDecodeError as err:
        return f"{path} is not UTF-8 text ({err.reason}): {FIX}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file ``path`` cannot be read (truncated, padded, header damaged), or None."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            return f"{path} is truncated ({size} bytes, not even a header): {FIX}"
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            return f"{path} is truncated or not a safetensors file (header of {header_len:,} bytes in {size:,}): {FIX}"
        try:
            header = json.loads(fh.read(header_len))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, KeyError, TypeError, IndexError):
            return f"{path} has a damaged header (not a safetensors tensor table): {FIX}"
    expected = 8 + header_len + end
    if size < expected:
        return f"{path} is truncated: {size:,} of {expected:,} bytes: {FIX}"
    if size > expected:
        return f"{path} has {size - expected:,} bytes more than its header describes: {FIX}"
    return None


def _pickle_zip_problem(path: Path) -> str | None:
    """A torch zip checkpoint (``pytorch_model*.bin``) whose end is missing; older non-zip formats pass."""
    with open(path, "rb") as fh:
        is_zip_start = fh.read(2) == b"PK"
    if is_zip_start and not zipfile.is_zipfile(path):
        return f"{path} is truncated (its zip directory is missing): {FIX}"
    return None


def weight_files_problem(model_dir: str | os.PathLike) -> str | None:
    """The first damaged config or weight file of ``model_dir``, as a one-line message; None if none is found."""
    root = Path(model_dir)
    if not root.is_dir():
        return None
    for name in (*CONFIG_FILES, *WEIGHT_INDEX_FILES):
        path = root / name
        if path.is_file() and (problem := _json_problem(path)):
            return problem
    for name in WEIGHT_INDEX_FILES:
        index = root / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
            missing = [s for s in shards if not (root / s).is_file()]
            if missing:
                return f"{index} lists {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} missing: {FIX}"
    for path in sorted(root.glob("*.safetensors")):
        if problem := safetensors_problem(path):
            return problem
    for path in sorted(root.glob("pytorch_model*.bin")):
        if problem := _pickle_zip_problem(path):
            return problem
    return None


def tokenizer_files_problem(model_dir: str | os.PathLike) -> str | None:
    """The first damaged tokenizer file of ``model_dir``, as a one-line message; None if none is found.

    ``config.json`` is checked too (AutoTokenizer reads it to find the tokenizer class). ``tokenizer.model``
    is checked as a SentencePiece model only where there is no ``tokenizer.json``: a fast tokenizer does not
    read it (and Llama-3's ``tokenizer.model`` is not SentencePiece at all).
    """
    root = Path(model_dir)
    if not root.is_dir():
        return None
    for name in (*CONFIG_FILES, *TOKENIZER_JSON_FILES):
        path = root / name
        if path.is_file() and (problem := _json_problem(path)):
            return problem
    spm_file = root / SENTENCEPIECE_FILE
    if spm_file.is_file() and not (root / "tokenizer.json").is_file():
        import sentencepiece

        try:
            sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
        except (RuntimeError, OSError):
            return f"{spm_file} is damaged (it does not parse as a SentencePiece model): {FIX}"
    return None
