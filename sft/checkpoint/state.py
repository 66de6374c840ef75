"""Training state: where a run stands (:class:`TrainProgress`, the one reader and writer of
``trainer_state.json``) and the RNG states saved per rank.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sft.checkpoint.layout import (
    STATE_DIR,
    TRAINER_STATE,
)
from sft.core.atomic import write_json_atomic

logger = logging.getLogger(__name__)


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


def read_state(checkpoint_dir: str | Path) -> tuple[TrainProgress, int | None]:
    """``(progress, world_size)`` from a checkpoint's ``trainer_state.json``, the one parser of that file.

    ``world_size`` is the number of ranks that wrote it (None for checkpoints that did not record it).
    Raises OSError/ValueError/TypeError when the file is missing or unreadable.
    """
    data = json.loads((Path(checkpoint_dir) / TRAINER_STATE).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise TypeError(f"{TRAINER_STATE} holds a JSON {type(data).__name__}, not an object")
    world_size = data.pop("world_size", None)  # bookkeeping for resume, not part of the progress
    return TrainProgress(**data), world_size


def read_progress(checkpoint_dir: str | Path) -> TrainProgress:
    """The :class:`TrainProgress` stored in a checkpoint (raises OSError/ValueError/TypeError if unreadable)."""
    return read_state(checkpoint_dir)[0]


def write_state(checkpoint_dir: str | Path, progress: TrainProgress, world_size: int) -> None:
    """Write ``trainer_state.json`` atomically: written last, its presence marks a complete checkpoint."""
    write_json_atomic(Path(checkpoint_dir) / TRAINER_STATE, {**asdict(progress), "world_size": world_size})


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
