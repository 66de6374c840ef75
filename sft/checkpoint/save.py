"""Saving and loading a checkpoint across ranks: every rank calls :func:`save_checkpoint` (under ZeRO-3
gathering the adapter and saving the optimizer partitions are collectives; rank 0 writes the shared files),
and a write that fails on any rank removes the partial directory and raises on every rank together.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sft.checkpoint.adapters import adapter_tensor_shapes
from sft.checkpoint.identity import base_model_identity
from sft.checkpoint.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_MODEL,
    STATE_DIR,
    STATE_TAG,
    TRAIN_ARGS,
    TRAINER_STATE,
    CheckpointError,
    checkpoint_name,
    checkpoint_step,
    list_checkpoints,
    read_json,
)
from sft.checkpoint.plain_lora import initial_adapter, to_plain_lora
from sft.checkpoint.space import _free_bytes, _mib
from sft.checkpoint.state import TrainProgress, _rng_file, _rng_state, read_state, write_state
from sft.core.atomic import restore_default_modes, write_json_atomic
from sft.core.distributed import (
    all_reduce_max,
    barrier,
    get_device,
    get_rank,
    get_world_size,
    is_main_process,
)

logger = logging.getLogger(__name__)


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
    of :func:`sft.checkpoint.plain_lora.to_plain_lora` gives the same weights on the original base, so inference,
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


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises on the way to disk: OSError from Python, RuntimeError from torch.save's
    zip writer ("unexpected pos ..."), SafetensorError from safetensors (peft's adapter file)."""
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)


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
            write_json_atomic(path / TRAIN_ARGS, train_args)
            write_json_atomic(path / BASE_MODEL, base_model_identity(train_args["model_name_or_path"]))
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
            write_state(path, progress, get_world_size())
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
        progress, world_size = read_state(path)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {TRAINER_STATE} is unreadable ({err}); {fix}"
        ) from err
    world_size = world_size or get_world_size()
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
