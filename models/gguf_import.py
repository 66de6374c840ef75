"""GGUF file -> a plain transformers model directory (safetensors weights, config, tokenizer, chat template).

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=...)``, through the ``gguf`` package) and
dequantises every tensor to torch, but the model it returns carries a GGUF quantizer and refuses
``save_pretrained``. The importer therefore rebuilds a plain model of the same architecture from the config
without its ``quantization_config`` entry, loads the dequantised state dict into it (strictly: every tensor,
no leftovers) and saves that. The directory it writes is what every script here reads::

    config.json              the architecture (no quantization entry), dtype of the saved weights
    model.safetensors        the dequantised weights (tied embeddings stored once)
    tokenizer.json           the GGUF vocabulary and merges as a fast tokenizer
    tokenizer_config.json    special tokens, model_max_length = the GGUF context length
    chat_template.jinja      the GGUF's ``tokenizer.chat_template`` (checked to survive the round trip)
    generation_config.json   bos / eos / pad ids from the GGUF (pad = eos when the GGUF names none)
    gguf_import.json         provenance: source file, its SHA-256, importer version, dtype

Two things transformers' reader loses are put back as llama.cpp reads them: a Llama 3.x file's RoPE scaling (the
converter stores it as the ``rope_freqs`` tensor, which the reader ignores: the llama3 parameters that give
exactly those factors are found and set), and Phi-3's turn tokens that swallow the whitespace after them
(``rstrip``: llama.cpp sets it for every special token of a phi3 file but ``<unk>``, ``<s>``, ``<|endoftext|>``).
Other families the reader reads (qwen2, qwen3, gemma2, gemma3, mistral) need nothing.

Weights are saved in float32 by default: a dequantised 4/8-bit value is ``scale * q + min`` with fp16 scales,
exact in fp32 but not in bf16, so an fp32 directory reproduces the GGUF model's logits bit for bit.

Writing is atomic and idempotent: everything goes to a temporary directory next to ``out_dir`` that is renamed
into place at the end, so an interrupted import leaves nothing half-written. An ``out_dir`` holding an import
of the same file by the same importer version is kept as it is (no work); an older or different import there
is replaced; a directory that is not an import is never touched unless ``force`` is given.

CLI:  python -m models.gguf_import FILE.gguf --out DIR [--dtype float32|bfloat16|float16] [--force]
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sft.core.atomic import replacing_dir, restore_default_modes
from sft.core.errors import UserError
from sft.core.flags import REQUIRED, ArgumentParser, add_arguments, flag, flag_of, parse_flags
from sft.core.runner import run_entry_point

logger = logging.getLogger(__name__)

# Bump when the written directory changes, so that caches of older imports are redone.
IMPORTER_VERSION = 2  # 2: llama3 rope and phi3's rstrip tokens restored
PROVENANCE_FILE = "gguf_import.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Written by transformers 5 into tokenizer_config.json: they describe the loading call, not the files.
_LOADING_FLAGS = ("is_local", "local_files_only")


class _AlreadyImported(Exception):
    """Raised inside the staging block: another process wrote the same import while this one waited."""


class GGUFImportError(UserError, RuntimeError):
    """The GGUF file cannot be imported, or the imported directory does not match it."""


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (a 100 MB GGUF takes a fraction of a second)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def provenance(gguf_path: Path, dtype: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies an import: source file (name, size, SHA-256), importer version and weight dtype."""
    return {
        "source": gguf_path.name,
        "size": gguf_path.stat().st_size,
        "sha256": file_sha256(gguf_path),
        "importer_version": IMPORTER_VERSION,
        "dtype": dtype,
        **(extra or {}),
    }


def read_provenance(model_dir: Path) -> dict[str, Any] | None:
    """The provenance a previous import wrote into ``model_dir``, or None when there is none (or it is damaged)."""
    try:
        data = json.loads((model_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_gguf(gguf_path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The GGUF model (dequantised, with transformers' GGUF quantizer attached) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    return model, tokenizer


# llama.cpp's phi3 rule (llama-vocab.cpp): every special token swallows the whitespace after it, but these.
PHI3_NOT_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")


def _llama3_factors(
    inv_freq: torch.Tensor, factor: float, low: float, high: float, original: int
) -> torch.Tensor:
    """The ``rope_freqs`` llama.cpp's converter writes for rope_type llama3 (its LlamaModel, 0.1.1)."""
    wavelen = 2 * torch.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    out = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < original / high, torch.ones_like(out), out)
    return torch.where(wavelen > original / low, torch.full_like(out, factor), out)


def restore_llama3_rope(gguf_path: Path, config: Any) -> dict[str, Any] | None:
    """The llama3 rope parameters whose factors are the file's ``rope_freqs`` tensor (Llama 3.1/3.2/3.3:
    low 1, high 4; the original context a power of two), set into ``config``; None where the file has none."""
    from gguf import GGUFReader

    tensor = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}.get("rope_freqs.weight")
    if tensor is None:
        return None
    factors = torch.as_tensor(tensor.data.copy(), dtype=torch.float64)
    theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    dim = 2 * len(factors)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    factor = float(factors.max())
    for low, high, power in itertools.product((1.0, 2.0), (4.0, 8.0), range(6, 18)):
        if torch.allclose(_llama3_factors(inv_freq, factor, low, high, 2**power), factors, rtol=1e-4):
            rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low}
            rope.update(high_freq_factor=high, original_max_position_embeddings=2**power)
            config.rope_parameters = rope
            return rope
    raise GGUFImportError(
        f"{gguf_path}: rope_freqs holds RoPE factors of no llama3 scaling this importer knows: its model would "
        "compute other positions than llama.cpp's"
    )


def plain_model(gguf_model: Any, dtype: torch.dtype) -> Any:
    """A quantizer-free copy of a GGUF-loaded model: the same config without ``quantization_config``,
    the same tensors (checked: no missing or unexpected keys)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(gguf_model).__name__]
    # The GGUF loader stores the file's general.name here; it is not a path and would read like one.
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path
    # A normal init costs ~1 s for 135M parameters; the meta device would leave non-persistent
    # buffers (RoPE inv_freq) unset.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = gguf_model.state_dict()
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise GGUFImportError(
            f"the GGUF tensors do not fit {type(model).__name__}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.tie_weights()
    return model.eval()


def special_ids(tokenizer: Any, config: Any) -> dict[str, int]:
    """bos / eos / pad ids for generation_config.json: the GGUF's, with pad = eos when it names no pad."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    if eos is None:
        raise GGUFImportError("the GGUF names no EOS token (tokenizer.ggml.eos_token_id); cannot import it")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = {"eos_token_id": int(eos), "pad_token_id": int(pad)}
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    if bos is not None:
        ids["bos_token_id"] = int(bos)
    return ids


def save_tokenizer(
    tokenizer: Any, out: Path, context_length: int | None, rstrip: frozenset[str] = frozenset()
) -> None:
    """Save the tokenizer with the chat template (its added tokens in ``rstrip`` swallowing the whitespace after
    them); check that the template reloads unchanged."""
    from transformers import AutoTokenizer

    tokenizer = copy.deepcopy(tokenizer)
    if context_length:
        tokenizer.model_max_length = context_length  # the GGUF loader leaves transformers' "unlimited"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out)
    if rstrip:
        tokenizer_file = out / "tokenizer.json"
        data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        for token in data["added_tokens"]:
            token["rstrip"] = token["rstrip"] or token["content"] in rstrip
        _write_json(tokenizer_file, data)
    config_file = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in _LOADING_FLAGS:
        tokenizer_config.pop(key, None)
    _write_json(config_file, tokenizer_config)
    reloaded = AutoTokenizer.from_pretrained(str(out))
    if reloaded.chat_template != tokenizer.chat_template:
        raise GGUFImportError(
            f"the chat template did not survive saving the tokenizer to {out} (transformers saved "
            f"{'none' if reloaded.chat_template is None else 'a different one'})"
        )
    if tokenizer.chat_template is None:
        logger.warning("the GGUF has no tokenizer.chat_template: the imported tokenizer has no chat template")


def write_model_dir(gguf_path: Path, out: Path, dtype: str, provenance_record: dict[str, Any]) -> None:
    """Write the imported model directory into ``out`` (an existing empty directory); ``provenance_record``
    (:func:`provenance`) goes into gguf_import.json."""
    from transformers import GenerationConfig

    torch_dtype = DTYPES[dtype]
    gguf_model, tokenizer = load_gguf(gguf_path)
    rstrip: frozenset[str] = frozenset()
    if gguf_model.config.model_type == "llama" and (
        rope := restore_llama3_rope(gguf_path, gguf_model.config)
    ):
        logger.info("rope scaling restored from rope_freqs: %s", rope)
    if gguf_model.config.model_type == "phi3":
        specials = (t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
        rstrip = frozenset(t for t in specials if t not in PHI3_NOT_RSTRIP)
    model = plain_model(gguf_model, torch_dtype)
    del gguf_model
    ids = special_ids(tokenizer, model.config)
    for name, value in ids.items():
        setattr(model.config, name, value)
    # Only the special ids: a GGUF carries no sampling settings, so generation defaults to greedy.
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out, getattr(model.config, "max_position_embeddings", None), rstrip)
    # Written last: its presence marks a complete import.
    _write_json(out / PROVENANCE_FILE, provenance_record)
    restore_default_modes(out)  # safetensors writes its files 0600


def import_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    force: bool = False,
    extra_provenance: dict[str, Any] | None = None,
) -> Path:
    """Import a GGUF file into a transformers model directory; returns ``out_dir``.

    Args:
        gguf_path: the ``.gguf`` file (any architecture transformers' GGUF loader supports).
        out_dir: the model directory to write (its parent is created).
        dtype: dtype of the saved weights: ``float32`` (exact), ``bfloat16`` or ``float16`` (half the size).
        force: replace an existing ``out_dir`` even when it is not an import (its files are deleted).
        extra_provenance: more fields for ``gguf_import.json`` (e.g. the package the file came from).

    An ``out_dir`` that already holds this import (same file SHA-256, importer version and dtype) is returned
    as it is; one holding another import is replaced; any other existing, non-empty ``out_dir`` is an error
    unless ``force``.
    """
    source = Path(gguf_path)
    out = Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file {source} does not exist: pass the path of a .gguf file")
    wanted = provenance(source, dtype, extra_provenance)
    existing = read_provenance(out)
    if existing is not None and _same_import(existing, wanted):
        logger.info("%s already holds this import of %s: nothing to do", out, source.name)
        return out
    if out.exists() and existing is None and not force and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} exists and is not a GGUF import (no {PROVENANCE_FILE}): pass another --out, or --force to "
            "replace it"
        )
    start = time.monotonic()
    try:
        # Waits for another process importing into the same directory (two test sessions sharing a cache).
        with replacing_dir(out, wait=True) as staging:
            existing = read_provenance(out)
            if existing is not None and _same_import(existing, wanted):
                raise _AlreadyImported  # the other process finished this very import: keep it
            write_model_dir(source, staging, dtype, wanted)
    except _AlreadyImported:
        logger.info("%s was imported by another process meanwhile: nothing to do", out)
        return out
    logger.info("imported %s into %s in %.1f s", source, out, time.monotonic() - start)
    return out


def _same_import(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    keys = ("sha256", "importer_version", "dtype")
    return all(existing.get(k) == wanted[k] for k in keys)


@dataclass
class ImportOutputArgs:
    """How an import is written: ``--out``, ``--dtype`` and ``--force`` (this CLI and ``models.smollm2``'s)."""

    out: Path = flag(REQUIRED, "Model directory to write.")
    dtype: str = flag(
        "float32",
        "dtype of the saved weights; float32 reproduces the GGUF model exactly (default: float32).",
        choices=tuple(DTYPES),
    )
    force: bool = flag(False, "Replace --out even if it is not a previous import.", action="store_true")


@dataclass
class GgufImportArgs:
    """The flags of ``python -m models.gguf_import``: the file, then how it is written."""

    gguf: Path = flag(REQUIRED, "The .gguf file to import.", positional=True)
    out: Path = flag_of(ImportOutputArgs, "out")
    dtype: str = flag_of(ImportOutputArgs, "dtype")
    force: bool = flag_of(ImportOutputArgs, "force")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (one line per failure, as every script here)."""
    parser = ArgumentParser(
        prog="python -m models.gguf_import",
        description="Import a GGUF file into a transformers model directory (safetensors, config, tokenizer "
        "with its chat template, generation config).",
    )
    add_arguments(parser, GgufImportArgs)

    def run(args: list[str]) -> None:
        flags = parse_flags(parser, GgufImportArgs, args)
        print(import_gguf(flags.gguf, flags.out, dtype=flags.dtype, force=flags.force))

    return run_entry_point(run, None if argv is None else list(argv), logger=logger)


if __name__ == "__main__":
    raise SystemExit(main())
