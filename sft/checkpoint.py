"""The run and checkpoint directory format: the one module that writes and reads it.

A run's ``--output_dir`` holds ``runs/`` (TensorBoard) and one directory per checkpoint,
``epoch-E-step-S/`` (E counts from 1, S is the optimizer step), holding

- ``adapter_model.safetensors`` + ``adapter_config.json``: the trainable weights only, in peft's
  format (``PeftModel.from_pretrained(base, ckpt_dir)`` loads them);
- the tokenizer files (with its chat template) and ``train_args.json``: the run's arguments, among
  them the base model (``model_name_or_path``), its quantisation and the chat template it trained with;
- ``base_model.json``: the identity of the base model (its config and a fingerprint of its weights), so
  resuming, merging or loading the adapter on another model is refused before anything is loaded;
- ``training_state/``: DeepSpeed's optimizer, scheduler and trainable-weight state (the frozen base
  is never written), plus one ``rng_state_<rank>.pt`` per rank;
- ``trainer_state.json``: step, epoch, data position and evaluation metrics. It is written last and
  atomically, so a directory without a readable one is an interrupted save and is never resumed from.
  A save that fails (a full disk) removes its directory and raises a :class:`CheckpointError` naming
  the path, the fix and the last complete checkpoint, on every rank together.

Writing: :func:`save_checkpoint` (every rank calls it: under ZeRO-3 gathering the adapter and saving the
optimizer partitions are collectives; rank 0 writes the shared files), :func:`rotate_checkpoints`.
Reading: :func:`list_checkpoints` / :func:`resolve_resume_dir` / :func:`best_checkpoint`,
:func:`load_checkpoint` (resume), :func:`read_train_args`, and for the inference tools
:func:`read_adapter` (an :class:`AdapterInfo`: config, tensor shapes, training quantisation and
template) and :func:`check_adapter_fits_base` (which compares the recorded base identity first).
No other module spells these file names.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sft.atomic import restore_default_modes
from sft.cli import UserError
from sft.distributed import all_reduce_max, barrier, get_device, get_rank, get_world_size, is_main_process
from sft.lora_variants import initial_adapter, to_plain_lora

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^epoch-(\d+)-step-(\d+)$")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAIN_ARGS = "train_args.json"
TRAINER_STATE = "trainer_state.json"
BASE_MODEL = "base_model.json"
STATE_DIR = "training_state"
STATE_TAG = "state"
PEFT_PREFIX = "base_model.model."  # peft's prefix of the adapter's tensor names


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used (damaged, incomplete or foreign files); the message names it."""


@dataclass
class TrainProgress:
    """Where a run stands; saved with every checkpoint and restored on resume.

    Attributes:
        step: optimizer steps done.
        epoch: current epoch, counted from 0.
        batches_in_epoch: micro-batches of ``epoch`` already consumed (data position).
        eval: metrics of the evaluation at this step ({"loss", "ppl", "tokens"}); empty when none ran
            at this step (a checkpoint saved on SIGTERM/Ctrl-C is not evaluated).
        skipped_steps: optimizer steps whose update was skipped for a non-finite loss or gradient norm.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    eval: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0


# ---------------------------------------------------------------------------------------------
# Reading the small JSON files
# ---------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint directory; a one-line ValueError naming the file when it is damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON (line {err.lineno} column {err.colno}: {err.msg}): the save was cut "
            "short or the file was edited; repair it or copy the checkpoint again"
        ) from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason}): copy the checkpoint again") from err


def read_train_args(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The run's arguments saved with a checkpoint (``train_args.json``); None when it has none."""
    path = Path(checkpoint_dir) / TRAIN_ARGS
    if not path.is_file():
        return None
    train_args = read_json(path)
    if not isinstance(train_args, dict):
        raise ValueError(
            f"{path} holds a JSON {type(train_args).__name__}, not train.py's arguments object: "
            "copy the checkpoint again"
        )
    return train_args


def read_progress(checkpoint_dir: str | Path) -> TrainProgress:
    """The :class:`TrainProgress` stored in a checkpoint (raises OSError/ValueError/TypeError if unreadable)."""
    data = json.loads((Path(checkpoint_dir) / TRAINER_STATE).read_text(encoding="utf-8"))
    data.pop("world_size", None)  # bookkeeping for resume, not part of the progress
    return TrainProgress(**data)


# ---------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_name(epoch: int, step: int) -> str:
    """Directory name of a checkpoint: ``epoch-E-step-S`` with E counted from 1."""
    return f"epoch-{epoch + 1}-step-{step}"


def checkpoint_step(path: str | Path) -> int:
    """Optimizer step in a checkpoint directory name (-1 when the name is not epoch-E-step-S)."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(2)) if match else -1


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir`` (those with a trainer_state.json), oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (checkpoint_step(path), path)
        for path in root.iterdir()
        if CHECKPOINT_PATTERN.match(path.name) and path.is_dir() and (path / TRAINER_STATE).is_file()
    ]
    return [path for _, path in sorted(found)]


def resume_dir_problem(path: str | Path) -> str | None:
    """Why ``--resume_from_checkpoint=path`` cannot be resumed from (None when it looks complete)."""
    path = Path(path)
    if not (path / STATE_DIR).is_dir():
        return (
            f"--resume_from_checkpoint={path} is not a checkpoint directory (no {STATE_DIR}/ inside): "
            "pass an <output_dir>/epoch-E-step-S directory or 'latest'"
        )
    if not (path / TRAINER_STATE).is_file():
        return (
            f"--resume_from_checkpoint={path}: {TRAINER_STATE} is missing, so its save was interrupted; "
            "pass an older checkpoint directory or 'latest' (the newest complete one)"
        )
    return None


def resolve_resume_dir(resume_from: str, output_dir: str | Path) -> Path | None:
    """The checkpoint named by ``--resume_from_checkpoint`` (a path, or "latest" in ``output_dir``).

    "latest" is the newest checkpoint whose ``trainer_state.json`` can be read: a newer one with a
    damaged state (a copy cut short, an edit) is skipped with a warning rather than failing the resume.
    Returns None for "latest" when ``output_dir`` has no complete checkpoint yet (a fresh start,
    so the same command line can be re-submitted to a preemptible queue).
    """
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        for path in reversed(found):
            try:
                read_progress(path)
                return path
            except (OSError, ValueError, TypeError) as err:
                logger.warning(
                    "--resume_from_checkpoint latest: skipping %s, its %s is unreadable (%s)",
                    path,
                    TRAINER_STATE,
                    err,
                )
        if found:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: no checkpoint in {output_dir} has a readable {TRAINER_STATE} "
                "(see the warnings above): copy a checkpoint again, or start a new run in another --output_dir"
            )
        logger.warning(
            "--resume_from_checkpoint latest: no checkpoint in %s yet, starting from scratch", output_dir
        )
        return None
    problem = resume_dir_problem(resume_from)
    if problem:
        raise CheckpointError(problem)
    return Path(resume_from)


def _eval_ppl(checkpoint_dir: Path) -> float | None:
    """The evaluation perplexity stored in a checkpoint; None when it has none or its state is unreadable.

    Rotation runs in the middle of training: a damaged old trainer_state.json must not end the run.
    """
    try:
        ppl = read_progress(checkpoint_dir).eval.get("ppl")
    except (OSError, ValueError, TypeError) as err:
        logger.warning(
            "cannot read %s (%s): not considered as the best checkpoint", checkpoint_dir / TRAINER_STATE, err
        )
        return None
    # NaN compares false with everything: a diverged evaluation must never win (or break) the comparison.
    return ppl if isinstance(ppl, (int, float)) and math.isfinite(ppl) else None


def best_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the lowest eval perplexity (None when none was evaluated)."""
    scored = [(ppl, p) for p in list_checkpoints(output_dir) if (ppl := _eval_ppl(p)) is not None]
    return min(scored, key=lambda item: item[0])[1] if scored else None


def rotate_checkpoints(output_dir: str | Path, save_total_limit: int) -> list[Path]:
    """Delete all but the newest ``save_total_limit`` checkpoints, always keeping the best by eval ppl.

    Runs on rank 0 only (other ranks return at once); 0 keeps everything.

    Returns:
        The deleted directories.
    """
    if save_total_limit <= 0 or not is_main_process():
        return []
    checkpoints = list_checkpoints(output_dir)
    keep = set(checkpoints[-save_total_limit:])
    best = best_checkpoint(output_dir)
    if best is not None:
        keep.add(best)
    deleted = [p for p in checkpoints if p not in keep]
    for path in deleted:
        shutil.rmtree(path)
        logger.info("deleted old checkpoint %s (--save_total_limit %d)", path, save_total_limit)
    return deleted


# ---------------------------------------------------------------------------------------------
# The base model's identity
# ---------------------------------------------------------------------------------------------


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
    model and is accepted. Without a record (checkpoints written before it existed) a warning says the
    check could not be made.

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
            "%s has no %s (written by an older version): cannot check that %s %s is the model it was trained on",
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


# ---------------------------------------------------------------------------------------------
# Adapters, for the inference tools and the merge
# ---------------------------------------------------------------------------------------------


def adapter_tensor_shapes(adapter_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in ``adapter_model.safetensors``, from its header (no data loaded).

    safetensors checks that the header covers the whole file, so a file cut short by an interrupted
    save or copy is found here, before any model is loaded.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} is damaged ({err}): the save was cut short or the file was truncated in a copy; "
            "use another checkpoint, or copy this one again"
        ) from err


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter directory says about itself, read without loading any weights.

    Attributes:
        path: the adapter directory.
        config: its peft ``adapter_config.json``.
        train_args: the arguments of the run that trained it (``train_args.json``; {} when absent).
        base_model: the identity of the base it was trained on (``base_model.json``; None when absent).
    """

    path: Path
    config: dict[str, Any]
    train_args: dict[str, Any]
    base_model: dict[str, Any] | None = None

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type"))

    @property
    def quantization(self) -> str | None:
        """The base-weight quantisation it was trained against (None = unknown: no train_args.json)."""
        return self.train_args.get("quantization")

    @property
    def double_quant(self) -> bool:
        return bool(self.train_args.get("double_quant", True))

    @property
    def template(self) -> str | None:
        """The chat template it was trained with (None = unknown)."""
        return self.train_args.get("template") or None

    @property
    def has_tokenizer(self) -> bool:
        """train.py saves the tokenizer (and its chat template) with every checkpoint."""
        return (self.path / "tokenizer_config.json").is_file()

    @property
    def source(self) -> str:
        """Where the training facts came from, for messages."""
        return str(self.path / TRAIN_ARGS) if self.train_args else f"{self.path} (no {TRAIN_ARGS})"


# peft's init_lora_weights values that change the base weights at load time (peft_model.py warns about them).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga")


def read_adapter(adapter_dir: str | Path, flag: str = "--adapter_dir") -> AdapterInfo:
    """Read and check an adapter directory; a one-line error naming ``flag`` when it is not a usable one.

    Also checks that ``adapter_model.safetensors`` is complete, so a damaged checkpoint is refused with
    the file's name before any model is loaded.
    """
    path = Path(adapter_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{flag}={adapter_dir} does not exist: pass a checkpoint directory written by train.py"
        )
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{flag}={adapter_dir} has no {ADAPTER_CONFIG}, so it is not a peft adapter: pass a checkpoint "
            "directory written by train.py (output_dir/epoch-E-step-S)"
        )
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file() and not (path / "adapter_model.bin").is_file():
        raise FileNotFoundError(f"{flag}={adapter_dir} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    config = read_json(config_file)
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(
            f"{config_file} is not a peft adapter config (no 'peft_type'): copy the checkpoint again"
        )
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{config_file} has init_lora_weights={init}: the adapter is relative to a base from which peft "
            "subtracts the initial adapter at load time, which a quantised or merged base cannot reproduce; "
            "convert it to plain LoRA with peft's save_pretrained(..., path_initial_model_for_weight_conversion=...) "
            "(train.py saves converted adapters)"
        )
    if weights.is_file():
        adapter_tensor_shapes(path)
    return AdapterInfo(
        path=path, config=config, train_args=read_train_args(path) or {}, base_model=read_base_model(path)
    )


@dataclass(frozen=True)
class TrainingQuantization:
    """How the base weights were stored when the adapter was trained (from train_args.json, else flags)."""

    quantization: str | None  # nf4 / fp4 / int8 / none; None = unknown (no train_args.json, no flag)
    double_quant: bool
    source: str  # where the values came from, for log messages


def training_quantization(
    info: AdapterInfo, quantization_flag: str | None = None, double_quant_flag: bool | None = None
) -> TrainingQuantization:
    """The base-weight quantisation an adapter was trained against.

    ``train_args.json`` is the truth. The flags fill in for adapters without that file; a flag that
    contradicts the file is an error (the adapter was trained one way, so merging it into a base
    quantised another way is a mistake).
    """
    if info.quantization is not None:
        if quantization_flag is not None and quantization_flag != info.quantization:
            raise ValueError(
                f"--quantization {quantization_flag} contradicts {info.source} (the adapter was trained with "
                f"quantization={info.quantization}): drop --quantization"
            )
        if double_quant_flag is not None and double_quant_flag != info.double_quant:
            raise ValueError(
                f"--{'' if double_quant_flag else 'no-'}double_quant contradicts {info.source} "
                f"(double_quant={info.double_quant}): drop the flag"
            )
        return TrainingQuantization(info.quantization, info.double_quant, info.source)
    double_quant = True if double_quant_flag is None else double_quant_flag
    source = (
        "--quantization" if quantization_flag is not None else f"unknown ({info.source}, no --quantization)"
    )
    return TrainingQuantization(quantization_flag, double_quant, source)


def _expected_lora_shape(module: nn.Module, kind: str, rank: int) -> tuple[int, ...] | None:
    """The shape a LoRA tensor of ``kind`` must have on ``module`` (None = not a layer LoRA can adapt)."""
    if isinstance(module, nn.Linear):
        return {
            "lora_A": (rank, module.in_features),
            "lora_B": (module.out_features, rank),
            "lora_magnitude_vector": (module.out_features,),
        }.get(kind)
    if isinstance(module, nn.Embedding):
        return {
            "lora_embedding_A": (rank, module.num_embeddings),
            "lora_embedding_B": (module.embedding_dim, rank),
        }.get(kind)
    return None


_LORA_KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def check_adapter_fits_base(
    base_dir: str | Path, info: AdapterInfo, *, base_flag: str, fix: str | None = None
) -> None:
    """Refuse an adapter that was not trained on this base: another model, or other module names or shapes.

    First the base identity recorded with the adapter (``base_model.json``) is compared with ``base_dir``
    (:func:`check_base_model`, raising :class:`BaseModelMismatch`; ``fix`` overrides its advice). Then peft only warns when an adapter's module names are missing from the model and then runs the base
    model without the adapter: a LoRA adapter of another architecture would silently do nothing. The
    base architecture is built on the meta device (no weights, no memory) and every tensor in the
    adapter file is checked against the module it adapts. All problems are raised together; the message
    tells to pass the right base as ``base_flag``. Prompt-learning adapters have no such tensors.
    """
    check_base_model(
        info.base_model,
        base_dir,
        subject=f"the adapter in {info.path}",
        base_flag=base_flag,
        fix=fix or f"pass the base it was trained on ({{recorded}}) as {base_flag}",
    )
    if info.peft_type != "LORA":
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    arch = f"{type(model).__name__} (model_type {config.model_type!r}) from {base_dir}"

    problems: list[str] = []
    for key, shape in adapter_tensor_shapes(info.path).items():
        name = key.removeprefix(PEFT_PREFIX)
        lora_kind = next((k for k in _LORA_KINDS if f".{k}" in name), None)
        if lora_kind is None:
            # A fully saved module (peft modules_to_save), e.g. "lm_head.weight".
            if name not in params:
                problems.append(f"{key}: {arch} has no parameter {name!r}")
            elif params[name] != shape:
                problems.append(f"{key}: shape {list(shape)} but the base parameter is {list(params[name])}")
            continue
        module_name = name.split(f".{lora_kind}")[0]
        module = modules.get(module_name)
        if module is None:
            problems.append(f"{key}: {arch} has no module {module_name!r}")
            continue
        rank = shape[-1] if lora_kind in ("lora_B", "lora_embedding_B") else shape[0]
        expected = _expected_lora_shape(module, lora_kind, rank)
        if expected is None:
            problems.append(f"{key}: {module_name!r} is a {type(module).__name__}, which LoRA cannot adapt")
        elif expected != shape:
            problems.append(
                f"{key}: shape {list(shape)} does not fit {module_name!r} (expects {list(expected)})"
            )
    if problems:
        shown = problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
        advice = (
            fix.replace("{recorded}", "the base it was trained on")
            if fix
            else f"pass the base it was trained on as {base_flag}"
        )
        raise ValueError(
            f"the adapter in {info.path} does not match the base model {base_dir}: it was trained on another "
            f"model; {advice}\n  " + "\n  ".join(shown)
        )


# ---------------------------------------------------------------------------------------------
# Resume checks
# ---------------------------------------------------------------------------------------------

# Flags whose change makes a checkpoint's training state unloadable (adapter shapes, optimizer layout) ...
RESUME_MUST_MATCH = (
    "peft",
    "lora_dim",
    "lora_target",
    "num_virtual_tokens",
    "precision",
    "use_dora",  # the magnitude vectors are trained parameters
    "use_rslora",  # the trained factors mean another update under another scaling
    "lora_init",  # PiSSA/OLoRA rebuild the residual base the trained factors belong to
    "pissa_niter",
    "loraplus_lr_ratio",  # the optimizer's parameter groups
)
# ... and flags whose change makes the resume inexact (data order and position, accumulation windows).
RESUME_SHOULD_MATCH = (
    "train_path",
    "max_len",
    "max_src_len",
    "is_skip",
    "loss_on",
    "packing",
    "group_by_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "neftune_alpha",
)


def check_resume_args(checkpoint_dir: str | Path, args: dict[str, Any]) -> None:
    """Compare the run's flags with the checkpoint's ``train_args.json`` before anything is loaded.

    A flag in :data:`RESUME_MUST_MATCH` that differs raises :class:`CheckpointError` (DeepSpeed would
    fail later with a shape or layout error that reads like a damaged file); one in
    :data:`RESUME_SHOULD_MATCH` logs a warning, since training goes on but no longer reproduces an
    uninterrupted run. A checkpoint without ``train_args.json`` is not checked.
    """
    path = Path(checkpoint_dir)
    try:
        saved = read_train_args(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is damaged: {err}") from err
    if saved is None:
        return

    def differing(names: tuple[str, ...]) -> list[str]:
        return [
            f"--{name} {saved[name]!r} there, {args[name]!r} now"
            for name in names
            if name in saved and name in args and saved[name] != args[name]
        ]

    conflicts = differing(RESUME_MUST_MATCH)
    if saved.get("lora_init") == "pissa" and saved.get("pissa_niter", 0) > 0:
        conflicts += differing(("seed",))  # the randomised SVD, and so the residual base, follows the seed
    if conflicts:
        raise CheckpointError(
            f"checkpoint {path} was trained with other flags ({'; '.join(conflicts)}): pass the same "
            "flags to resume it, or start a new run in another --output_dir (without --resume_from_checkpoint)"
        )
    changed = differing(RESUME_SHOULD_MATCH)
    if changed:
        logger.warning(
            "resuming %s with changed flags (%s): training continues, but not as the interrupted run would have",
            path,
            "; ".join(changed),
        )


def check_resume_base(checkpoint_dir: str | Path, model_dir: str | Path) -> None:
    """Refuse to resume ``checkpoint_dir`` on a base model other than the one it was trained on.

    Runs before any model is loaded (reads small files and a few hundred bytes of each weight tensor):
    another architecture would otherwise fail after the full load with an error that reads like a
    damaged checkpoint, and another model of the same shape would be resumed silently.
    """
    path = Path(checkpoint_dir)
    fix = (
        "pass --model_name_or_path {recorded} to resume it, or start a new run in another --output_dir "
        "(without --resume_from_checkpoint)"
    )
    try:
        info = read_adapter(path, "--resume_from_checkpoint")
        check_adapter_fits_base(model_dir, info, base_flag="--model_name_or_path", fix=fix)
    except BaseModelMismatch:
        raise
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot resume checkpoint {path}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Disk space
# ---------------------------------------------------------------------------------------------


def directory_bytes(path: str | Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _free_bytes(path: Path) -> int:
    """Bytes available to this user on the file system holding ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_free_space(output_dir: str | Path, needed: int, what: str) -> None:
    """Stop before any training when ``output_dir`` cannot hold even one checkpoint of ``needed`` bytes.

    A full disk otherwise shows up only at the first save (or as a TensorBoard error), after the model load.
    """
    free = _free_bytes(Path(output_dir))
    if free < needed:
        raise CheckpointError(
            f"--output_dir {output_dir} has {_mib(free)} free, but {what} needs about {_mib(needed)}: free space "
            "on that disk or pass another --output_dir"
        )


def estimated_checkpoint_bytes(model: nn.Module) -> int:
    """A lower bound on one checkpoint of ``model``: the adapter plus AdamW's fp32 master weights and moments.

    ZeRO-3 partitions a parameter's storage; ``ds_numel`` keeps its full size.
    """
    return sum(
        getattr(p, "ds_numel", p.numel()) * (p.element_size() + 12)
        for p in model.parameters()
        if p.requires_grad
    )


# ---------------------------------------------------------------------------------------------
# Writing and loading the training state
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Make ZeRO-3 partitioned ``params`` whole on every rank for the duration (no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write the adapter in peft's format (``adapter_model.safetensors`` + ``adapter_config.json``).

    Every rank must call it: under ZeRO-3 the trainable parameters are gathered first (a collective),
    so the file holds the real weights rather than the empty local partitions. Rank 0 writes.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    with _gathered(trainable):
        model.save_pretrained(str(path), safe_serialization=True, is_main_process=is_main_process())
    if is_main_process():
        initial = initial_adapter(model)
        if initial is not None:
            _save_as_plain_lora(Path(path), initial)
        restore_default_modes(path, "*.safetensors")  # safetensors writes 0600: readable like the JSON files
        shapes = adapter_tensor_shapes(path)
        empty = [key for key, shape in shapes.items() if 0 in shape]
        if not shapes or empty:
            raise RuntimeError(
                f"adapter saved to {path} is empty or has empty tensors {empty}: the ZeRO-3 gather failed"
            )


def _save_as_plain_lora(path: Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite a saved PiSSA/OLoRA adapter as plain LoRA relative to the original base (in place).

    Training computes with a residual base (the initial adapter subtracted from it); the rank-2r adapter
    of :func:`sft.lora_variants.to_plain_lora` gives the same weights on the original base, so inference,
    merge and other tools load the checkpoint like any LoRA adapter. Resuming does not read this file:
    the training state holds the trained factors, and the residual base is rebuilt by the same init.
    """
    from safetensors.torch import load_file, save_file

    weights, config_file = path / ADAPTER_WEIGHTS, path / ADAPTER_CONFIG
    tensors, config = to_plain_lora(load_file(str(weights)), initial, read_json(config_file))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _only_trainable_in_state_dict(model: nn.Module) -> Iterator[None]:
    """While active, ``model.state_dict()`` holds the trainable parameters only.

    DeepSpeed's ``exclude_frozen_parameters`` drops frozen parameters but keeps buffers, and
    bitsandbytes stores a 4-bit layer's quantisation constants as extra state-dict entries: without
    this filter each training-state save would carry a good part of the frozen base.
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}

    def keep_trainable(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        for key in [k for k in state if k.startswith(prefix) and k[len(prefix) :] not in trainable]:
            del state[key]

    handle = model.register_state_dict_post_hook(keep_trainable)
    try:
        yield
    finally:
        handle.remove()


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the RNG states captured at save time (dropout continues as if never stopped)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(checkpoint_dir: Path, rank: int) -> Path:
    return checkpoint_dir / STATE_DIR / f"rng_state_{rank}.pt"


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises on the way to disk: OSError from Python, RuntimeError from torch.save's
    zip writer ("unexpected pos ..."), SafetensorError from safetensors (peft's adapter file)."""
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)


def _write_json_atomically(path: Path, data: Any) -> None:
    """Write ``path`` so that it is either absent or complete, also after a crash or a full disk."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, ensure_ascii=False))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_failed(error: BaseException | None, path: Path, output_dir: Path) -> None:
    """Agree over ranks whether a phase of the save failed; if so, remove the partial directory and raise.

    Every rank calls this at the same points, so all of them raise together and none is left waiting in a
    collective. The message names the checkpoint, the reason (a full disk, said plainly) and the last
    complete checkpoint to resume from.
    """
    failed = all_reduce_max(
        torch.tensor([1 if error is not None else 0], dtype=torch.int32, device=get_device())
    )
    if not int(failed.item()):
        return
    free = _free_bytes(path)
    codes = {e.errno for e in _exception_chain(error) if getattr(e, "errno", None)}
    # torch.save and safetensors report a full disk without an errno ("unexpected pos ..."): then the
    # free space tells.
    if errno.ENOSPC in codes or (error is not None and not codes and free < 64 * 2**20):
        reason = f"the disk is full ({_mib(free)} free)"
    elif errno.EDQUOT in codes:
        reason = "the disk quota is exceeded"
    elif error is not None:
        reason = f"{type(error).__name__}: {error}"
    else:
        reason = "another rank could not write its part"
    if is_main_process():
        shutil.rmtree(path, ignore_errors=True)  # never leave a partial checkpoint; also frees the space
    barrier()
    complete = list_checkpoints(output_dir)
    resume = (
        f"the last complete checkpoint is {complete[-1]} (--resume_from_checkpoint latest continues from it)"
        if complete
        else "there is no complete checkpoint yet"
    )
    raise CheckpointError(
        f"cannot write checkpoint {path}: {reason}; free space there (or keep fewer checkpoints with "
        f"--save_total_limit) or pass another --output_dir; {resume}"
    ) from error


def _exception_chain(error: BaseException | None) -> Iterator[BaseException]:
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def save_checkpoint(
    engine: Any,
    tokenizer: Any,
    train_args: dict[str, Any],
    progress: TrainProgress,
    output_dir: str | Path,
) -> Path:
    """Write ``<output_dir>/epoch-E-step-S/`` (see module docstring). Call on every rank.

    A write that fails on any rank (a full disk, a lost mount) removes the partial directory and raises
    :class:`CheckpointError` on every rank; ``trainer_state.json`` is written last and atomically, so a
    directory that has one is complete.

    Args:
        engine: the DeepSpeed engine wrapping the peft model.
        tokenizer: saved next to the adapter so the checkpoint is self-contained.
        train_args: the run's arguments (``TrainArgs.to_dict()``).
        progress: step, epoch, data position and eval metrics at this point.
        output_dir: the run's output directory.

    Returns:
        The checkpoint directory.
    """
    model = engine.module
    output_dir = Path(output_dir)
    path = output_dir / checkpoint_name(progress.epoch, progress.step)
    write_errors = _write_errors()

    error: BaseException | None = None
    if is_main_process():
        try:
            (path / TRAINER_STATE).unlink(missing_ok=True)  # re-saving a step: mark incomplete until done
            # DeepSpeed's own makedirs swallows OSError; made here, a failure is seen before its collectives.
            (path / STATE_DIR / STATE_TAG).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            error = err
    _save_failed(error, path, output_dir)

    try:
        save_adapter(model, path)  # collective under ZeRO-3 (the gather comes before rank 0 writes)
        if is_main_process():
            tokenizer.save_pretrained(str(path))
            _write_json_atomically(path / TRAIN_ARGS, train_args)
            _write_json_atomically(path / BASE_MODEL, base_model_identity(train_args["model_name_or_path"]))
    except write_errors as err:
        error = err
    _save_failed(error, path, output_dir)

    try:
        with _only_trainable_in_state_dict(model):
            engine.save_checkpoint(
                str(path / STATE_DIR),
                tag=STATE_TAG,
                client_state={"progress": asdict(progress)},
                save_latest=False,
                exclude_frozen_parameters=True,
            )
    except write_errors as err:
        error = err
        # DeepSpeed writes after its last collective and then waits in a barrier; a rank whose write
        # failed joins that barrier here, so the ranks meet again in the agreement below.
        barrier()
    if error is None:
        try:
            torch.save(_rng_state(), _rng_file(path, get_rank()))
        except write_errors as err:
            error = err
    _save_failed(error, path, output_dir)

    if is_main_process():
        try:
            progress_json = {**asdict(progress), "world_size": get_world_size()}
            _write_json_atomically(path / TRAINER_STATE, progress_json)
        except write_errors as err:
            error = err
    _save_failed(error, path, output_dir)
    if is_main_process():
        logger.info("saved checkpoint %s", path)
    return path


def load_checkpoint(engine: Any, checkpoint_dir: str | Path) -> tuple[TrainProgress, dict[str, Any] | None]:
    """Restore adapter weights, optimizer and scheduler into ``engine``; call on every rank.

    Returns:
        ``(progress, rng_state)``: where to continue, and this rank's RNG state as it was after the
        checkpoint's step, to restore with :func:`restore_rng_state` before training continues (the loop
        keeps data-iterator creation and evaluation off that stream). ``rng_state`` is None when the
        checkpoint was written by a different number of ranks.
    """
    path = Path(checkpoint_dir)
    older = [p for p in list_checkpoints(path.parent) if checkpoint_step(p) < checkpoint_step(path)]
    fix = (
        f"resume from the one before it (--resume_from_checkpoint {older[-1]}) or delete {path}"
        if older
        else f"delete {path} and start again"
    )
    try:
        saved = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        progress = TrainProgress(**{k: v for k, v in saved.items() if k != "world_size"})
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {TRAINER_STATE} is unreadable ({err}); {fix}"
        ) from err
    world_size = saved.get("world_size", get_world_size())
    try:
        load_path, _ = engine.load_checkpoint(
            str(path / STATE_DIR),
            tag=STATE_TAG,
            load_module_strict=False,  # the frozen base is not in the checkpoint
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as err:
        # A truncated or missing file (the save was cut short, the disk filled up) surfaces as one of these.
        raise CheckpointError(
            f"checkpoint {path}: {STATE_DIR}/ cannot be loaded ({err}); if it was written with another "
            f"--ds_config (ZeRO stage) or number of ranks, resume with those; if it is damaged, {fix}"
        ) from err
    if load_path is None:
        raise CheckpointError(
            f"checkpoint {path}: DeepSpeed found no training state in {path / STATE_DIR}; {fix}"
        )
    rng_file = _rng_file(path, get_rank())
    rng_state = None
    if world_size == get_world_size() and rng_file.is_file():
        try:
            rng_state = torch.load(rng_file, weights_only=False)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise CheckpointError(f"checkpoint {path} is damaged: {rng_file.name} ({err}); {fix}") from err
    else:
        logger.warning(
            "checkpoint %s was written by %d ranks, now %d: RNG streams restart",
            path,
            world_size,
            get_world_size(),
        )
    logger.info("resumed from %s (step %d)", path, progress.step)
    return progress, rng_state
