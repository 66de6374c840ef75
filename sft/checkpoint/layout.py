"""The run directory's layout: the file names of a checkpoint, finding complete checkpoints, and reading
its small JSON files. No other module spells these file names (tests/test_architecture.py).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from sft.core.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^epoch-(\d+)-step-(\d+)$")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAIN_ARGS = "train_args.json"
TRAINER_STATE = "trainer_state.json"
BASE_MODEL = "base_model.json"
STATE_DIR = "training_state"
STATE_TAG = "state"
REFERENCE_LOGPS = "reference_logps.npz"  # in the run directory: preference pairs' reference log-probs
PEFT_PREFIX = "base_model.model."  # peft's prefix of the adapter's tensor names


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used (damaged, incomplete or foreign files); the message names it."""


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
