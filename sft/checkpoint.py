"""Adapter-only checkpoints, training state, resume and rotation.

A checkpoint is a directory ``<output_dir>/epoch-E-step-S/`` (E counts from 1, S is the
optimizer step) holding

- ``adapter_model.safetensors`` + ``adapter_config.json``: the trainable weights only, in peft's
  format (``PeftModel.from_pretrained(base, ckpt_dir)`` loads them);
- the tokenizer files and ``train_args.json`` (the run's arguments);
- ``training_state/``: DeepSpeed's optimizer, scheduler and trainable-weight state (the frozen base
  is never written), plus one ``rng_state_<rank>.pt`` per rank;
- ``trainer_state.json``: step, epoch, data position and evaluation metrics. It is written last,
  so a directory without it is an interrupted save and is never resumed from.

Every rank calls :func:`save_checkpoint` (under ZeRO-3 gathering the adapter and saving the
optimizer partitions are collectives); rank 0 writes the shared files.
"""

from __future__ import annotations

import contextlib
import json
import logging
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

from sft.distributed import barrier, get_rank, get_world_size, is_main_process

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^epoch-(\d+)-step-(\d+)$")
STATE_DIR = "training_state"
STATE_TAG = "state"
TRAINER_STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (damaged or incomplete files); the message names it."""


@dataclass
class TrainProgress:
    """Where a run stands; saved with every checkpoint and restored on resume.

    Attributes:
        step: optimizer steps done.
        epoch: current epoch, counted from 0.
        batches_in_epoch: micro-batches of ``epoch`` already consumed (data position).
        eval: metrics of the evaluation at this step ({"loss", "ppl", "tokens"}), if one ran.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    eval: dict[str, float] = field(default_factory=dict)


def checkpoint_name(epoch: int, step: int) -> str:
    """Directory name of a checkpoint: ``epoch-E-step-S`` with E counted from 1."""
    return f"epoch-{epoch + 1}-step-{step}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir`` (those with a trainer_state.json), oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(2)), path))
    return [path for _, path in sorted(found)]


def _step(path: Path) -> int:
    """Optimizer step in a checkpoint directory name (-1 when the name is not epoch-E-step-S)."""
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(2)) if match else -1


def resolve_resume_dir(resume_from: str, output_dir: str | Path) -> Path | None:
    """The checkpoint named by ``--resume_from_checkpoint`` (a path, or "latest" in ``output_dir``).

    Returns None for "latest" when ``output_dir`` has no complete checkpoint yet (a fresh start,
    so the same command line can be re-submitted to a preemptible queue).
    """
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning(
                "--resume_from_checkpoint latest: no checkpoint in %s yet, starting from scratch", output_dir
            )
            return None
        return found[-1]
    path = Path(resume_from)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint={resume_from}: {TRAINER_STATE} is missing, the save was interrupted; "
            "pass an older checkpoint directory"
        )
    return path


# Flags whose change makes a checkpoint's training state unloadable (adapter shapes, optimizer layout) ...
RESUME_MUST_MATCH = ("peft", "lora_dim", "lora_target", "num_virtual_tokens", "precision")
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
)


def check_resume_args(checkpoint_dir: str | Path, args: dict[str, Any]) -> None:
    """Compare the run's flags with the checkpoint's ``train_args.json`` before anything is loaded.

    A flag in :data:`RESUME_MUST_MATCH` that differs raises :class:`CheckpointError` (DeepSpeed would
    fail later with a shape or layout error that reads like a damaged file); one in
    :data:`RESUME_SHOULD_MATCH` logs a warning, since training goes on but no longer reproduces an
    uninterrupted run. A checkpoint without ``train_args.json`` is not checked.
    """
    path = Path(checkpoint_dir) / "train_args.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path.parent} is damaged: train_args.json is unreadable ({err})"
        ) from err

    def differing(names: tuple[str, ...]) -> list[str]:
        return [
            f"--{name} {saved[name]!r} there, {args[name]!r} now"
            for name in names
            if name in saved and name in args and saved[name] != args[name]
        ]

    conflicts = differing(RESUME_MUST_MATCH)
    if conflicts:
        raise CheckpointError(
            f"checkpoint {path.parent} was trained with other flags ({'; '.join(conflicts)}): pass the same "
            "flags to resume it, or start a new run in another --output_dir (without --resume_from_checkpoint)"
        )
    changed = differing(RESUME_SHOULD_MATCH)
    if changed:
        logger.warning(
            "resuming %s with changed flags (%s): training continues, but not as the interrupted run would have",
            path.parent,
            "; ".join(changed),
        )


def read_progress(checkpoint_dir: str | Path) -> TrainProgress:
    """The :class:`TrainProgress` stored in a checkpoint."""
    with open(Path(checkpoint_dir) / TRAINER_STATE, encoding="utf-8") as fh:
        data = json.load(fh)
    data.pop("world_size", None)  # bookkeeping for resume, not part of the progress
    return TrainProgress(**data)


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
        from safetensors import safe_open

        from sft.file_modes import restore_default_modes

        # safetensors writes 0600 files (sft/file_modes.py): let other users read them, as the JSON files.
        restore_default_modes(path)
        with safe_open(str(Path(path) / "adapter_model.safetensors"), framework="pt") as fh:
            keys = list(fh.keys())
            empty = [key for key in keys if 0 in fh.get_slice(key).get_shape()]
        if not keys or empty:
            raise RuntimeError(
                f"adapter saved to {path} is empty or has empty tensors {empty}: the ZeRO-3 gather failed"
            )


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


def save_checkpoint(
    engine: Any,
    tokenizer: Any,
    train_args: dict[str, Any],
    progress: TrainProgress,
    output_dir: str | Path,
) -> Path:
    """Write ``<output_dir>/epoch-E-step-S/`` (see module docstring). Call on every rank.

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
    path = Path(output_dir) / checkpoint_name(progress.epoch, progress.step)
    if is_main_process():
        path.mkdir(parents=True, exist_ok=True)
        (path / TRAINER_STATE).unlink(missing_ok=True)  # re-saving a step: mark incomplete until done
    barrier()

    save_adapter(model, path)  # collective under ZeRO-3
    if is_main_process():
        tokenizer.save_pretrained(str(path))
        (path / "train_args.json").write_text(
            json.dumps(train_args, indent=2, ensure_ascii=False), encoding="utf-8"
        )

    with _only_trainable_in_state_dict(model):
        engine.save_checkpoint(
            str(path / STATE_DIR),
            tag=STATE_TAG,
            client_state={"progress": asdict(progress)},
            save_latest=False,
            exclude_frozen_parameters=True,
        )
    torch.save(_rng_state(), path / STATE_DIR / f"rng_state_{get_rank()}.pt")
    barrier()
    if is_main_process():
        progress_json = {**asdict(progress), "world_size": get_world_size()}
        (path / TRAINER_STATE).write_text(json.dumps(progress_json, indent=2), encoding="utf-8")
        logger.info("saved checkpoint %s", path)
    barrier()
    return path


def load_checkpoint(engine: Any, checkpoint_dir: str | Path) -> tuple[TrainProgress, dict[str, Any] | None]:
    """Restore adapter weights, optimizer and scheduler into ``engine``; call on every rank.

    Returns:
        ``(progress, rng_state)``: where to continue, and this rank's RNG state to restore with
        :func:`restore_rng_state` once the data iterator of the resumed epoch exists (creating a
        DataLoader iterator draws from the global RNG). ``rng_state`` is None when the checkpoint
        was written by a different number of ranks.
    """
    path = Path(checkpoint_dir)
    older = [p for p in list_checkpoints(path.parent) if _step(p) < _step(path)]
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
            f"checkpoint {path}: {STATE_DIR}/ cannot be loaded ({err}); it is damaged, or was written with "
            f"another --ds_config (ZeRO stage) or number of ranks; {fix}"
        ) from err
    if load_path is None:
        raise CheckpointError(
            f"checkpoint {path}: DeepSpeed found no training state in {path / STATE_DIR}; {fix}"
        )
    rng_file = path / STATE_DIR / f"rng_state_{get_rank()}.pt"
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


def _eval_ppl(checkpoint_dir: Path) -> float | None:
    """The evaluation perplexity stored in a checkpoint; None when it has none or its state is unreadable.

    Rotation runs in the middle of training: a damaged old trainer_state.json must not end the run.
    """
    try:
        return read_progress(checkpoint_dir).eval.get("ppl")
    except (OSError, ValueError, TypeError) as err:
        logger.warning(
            "cannot read %s (%s): not considered as the best checkpoint", checkpoint_dir / TRAINER_STATE, err
        )
        return None


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
