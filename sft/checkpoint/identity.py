"""The base model's identity (its config and a fingerprint of its weights), recorded with every checkpoint
as ``base_model.json`` so that resuming, merging or loading an adapter on another model is refused before
anything is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sft.checkpoint.layout import (
    BASE_MODEL,
    CheckpointError,
    read_json,
)

logger = logging.getLogger(__name__)


class BaseModelMismatch(CheckpointError, ValueError):
    """A checkpoint or adapter meets a base model other than the one it was trained on.

    A :class:`CheckpointError` for train.py, a ``ValueError`` for the inference tools and the merge.
    """


# Config entries that may differ between two copies of the same model (paths, versions, runtime choices).
_CONFIG_NOISE = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "auto_map", "_commit_hash"}
)
_SAMPLED_ELEMENTS = 64  # per tensor: enough to tell two trainings apart, a few hundred bytes to read


def _weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model directory: safetensors shards, else PyTorch ``*.bin`` shards."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in model_dir.glob("*.bin") if p.name.startswith(("pytorch_model", "model")))
    return files


def _tensor_sample(tensor: torch.Tensor) -> bytes:
    """The first elements of ``tensor`` in memory order, as bytes (reads a page, not the tensor)."""
    if tensor.dim() == 0:
        head = tensor.reshape(1)
    elif tensor.is_contiguous():
        head = tensor.reshape(-1)[:_SAMPLED_ELEMENTS]
    else:
        head = tensor[(0,) * (tensor.dim() - 1)][:_SAMPLED_ELEMENTS]
    return head.contiguous().view(torch.uint8).numpy().tobytes()


def _weight_entries(path: Path) -> Iterator[tuple[str, str, tuple[int, ...], bytes]]:
    """(name, dtype, shape, sampled bytes) of every tensor in one weight file, read lazily (mmap)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                piece = fh.get_slice(name)
                shape = tuple(piece.get_shape())
                if not shape:
                    tensor = fh.get_tensor(name)
                elif len(shape) == 1:
                    tensor = piece[:_SAMPLED_ELEMENTS]
                else:
                    tensor = piece[0:1]  # the first row: one small read
                yield name, str(tensor.dtype), shape, _tensor_sample(tensor)
        return
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        # A legacy (pre-zip) PyTorch file cannot be memory-mapped: its first and last MiB stand in for it.
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(2**20)
            fh.seek(max(size - 2**20, 0))
            yield path.name, "file", (size,), head + fh.read()
        return
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            yield name, str(tensor.dtype), tuple(tensor.shape), _tensor_sample(tensor)


@functools.lru_cache(maxsize=8)
def _weights_fingerprint(model_dir: str, files_stamp: tuple) -> dict[str, Any] | None:
    """A fingerprint of a model's weights that does not depend on their file format or location.

    Every tensor's name, dtype and shape plus its first elements, hashed: two different trainings of one
    architecture differ there (a merged LoRA changes every row of the layers it adapts), while the same
    weights copied elsewhere or re-saved as safetensors give the same fingerprint. Reads a few hundred
    bytes per tensor: seconds for a 14 GB model. None when the directory has no weight files.
    Cached per directory and ``files_stamp`` (names, sizes and times of the weight files): computed once a run.
    """
    from safetensors import SafetensorError

    files = _weight_files(Path(model_dir))
    if not files:
        return None
    digest = hashlib.sha256()
    n_tensors = n_params = 0
    entries = []
    for file in files:
        try:
            entries.extend(_weight_entries(file))
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as err:
            raise ValueError(f"cannot read the weights {file} ({err}): copy the model again") from err
    for name, dtype, shape, sample in sorted(entries):
        digest.update(f"{name}|{dtype}|{list(shape)}|".encode())
        digest.update(sample)
        n_tensors += 1
        n_params += math.prod(shape)
    return {"sha256": digest.hexdigest(), "tensors": n_tensors, "parameters": n_params}


def base_model_identity(model_dir: str | Path) -> dict[str, Any]:
    """What identifies a base model: its path (informative only), config and weights fingerprint.

    Written next to every checkpoint as ``base_model.json`` and compared by :func:`check_base_model`.
    """
    path = Path(model_dir).resolve()
    config_file = path / "config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a JSON object: copy the model again")
    return {
        "path": str(path),
        "config": {k: v for k, v in config.items() if k not in _CONFIG_NOISE},
        "weights": _weights_fingerprint(
            str(path), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in _weight_files(path))
        ),
    }


def read_base_model(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The base identity recorded with a checkpoint; None for checkpoints written before it was recorded."""
    path = Path(checkpoint_dir) / BASE_MODEL
    if not path.is_file():
        return None
    recorded = read_json(path)
    if not isinstance(recorded, dict) or "weights" not in recorded:
        raise ValueError(f"{path} is not a base-model record: copy the checkpoint again")
    return recorded


# The config entries that tell architectures apart, named first when two configs differ.
_ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


def _config_difference(recorded: dict[str, Any], current: dict[str, Any], limit: int = 3) -> list[str]:
    """The first ``limit`` config entries that differ, the architecture-defining ones first."""
    missing = object()
    keys = [k for k in _ARCHITECTURE_KEYS if k in recorded or k in current]
    keys += sorted(
        (set(recorded) | set(current)) - set(keys), key=lambda k: (k not in recorded or k not in current, k)
    )

    def shown(value: Any) -> str:
        return "unset" if value is missing else repr(value)

    differing = [
        f"{key} {shown(recorded.get(key, missing))} there, {shown(current.get(key, missing))} here"
        for key in keys
        if recorded.get(key, missing) != current.get(key, missing)
    ]
    return differing[:limit] + ([f"{len(differing) - limit} more"] if len(differing) > limit else [])


def check_base_model(
    recorded: dict[str, Any] | None, base_dir: str | Path, *, subject: str, base_flag: str, fix: str
) -> None:
    """Refuse a base model other than the one ``subject`` was trained on, before any weight is loaded.

    The decision is the weights fingerprint: a base that moved to another path (or was re-saved) is the same
    model and is accepted. Without a record (an adapter saved by peft or another tool; checkpoints written before
    the record existed) a warning says the check could not be made.

    Args:
        recorded: :func:`read_base_model` of the checkpoint.
        base_dir: the base model given now.
        subject: what was trained, for the message ("checkpoint X", "the adapter in X").
        base_flag: the flag that named ``base_dir``.
        fix: what to do instead; "{recorded}" is replaced by the recorded base path.

    Raises:
        BaseModelMismatch: naming both models, how they differ, and ``fix``.
    """
    if recorded is None:
        logger.warning(
            "%s has no %s (saved by another tool, such as peft, or by a version of this project before it was "
            "recorded): cannot check that %s %s is the model it was trained on",
            subject,
            BASE_MODEL,
            base_flag,
            base_dir,
        )
        return
    current = base_model_identity(base_dir)
    recorded_path = recorded.get("path", "unknown")
    if recorded["weights"] is None or current["weights"] is None:
        logger.warning(
            "cannot compare the weights of %s %s with the base %s was trained on (%s): no weight files found",
            base_flag,
            base_dir,
            subject,
            recorded_path,
        )
        return
    if recorded["weights"]["sha256"] == current["weights"]["sha256"]:
        if recorded_path != current["path"]:
            logger.info(
                "%s: base model %s is %s moved (same weights)", subject, current["path"], recorded_path
            )
        return
    differences = _config_difference(recorded.get("config", {}), current["config"])
    how = (
        "another architecture: " + "; ".join(differences)
        if differences
        else "the same architecture with other weights"
    )
    raise BaseModelMismatch(
        f"{subject} was trained on the base model {recorded_path}, but {base_flag} {base_dir} is a different "
        f"model ({how}): {fix.replace('{recorded}', recorded_path)}"
    )
