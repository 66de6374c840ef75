"""Checks before a resume: the same flags where they matter, the same base model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sft.checkpoint.adapters import check_adapter_fits_base, read_adapter
from sft.checkpoint.identity import BaseModelMismatch
from sft.checkpoint.layout import (
    CheckpointError,
    read_train_args,
)

logger = logging.getLogger(__name__)

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
    "objective",  # another loss and another kind of data
    "init_adapter",  # the adapter's shapes, and the reference it defines
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
    "pref_loss",
    "pref_beta",
    "label_smoothing",
    "pref_ftx",
    "simpo_gamma",
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
