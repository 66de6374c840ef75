"""sft.checkpoint bookkeeping without a model: listing, 'latest', rotation that keeps the best."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from sft.checkpoint import (
    TrainProgress,
    checkpoint_name,
    list_checkpoints,
    read_progress,
    resolve_resume_dir,
    rotate_checkpoints,
)


def _fake(output_dir: Path, epoch: int, step: int, ppl: float | None, *, complete: bool = True) -> Path:
    path = output_dir / checkpoint_name(epoch, step)
    path.mkdir(parents=True)
    if complete:
        progress = TrainProgress(step=step, epoch=epoch, eval={"ppl": ppl} if ppl is not None else {})
        (path / "trainer_state.json").write_text(json.dumps({**asdict(progress), "world_size": 1}))
    return path


def test_listing_latest_and_rotation(tmp_path):
    _fake(tmp_path, 0, 5, 9.0)
    best = _fake(tmp_path, 0, 10, 3.0)
    _fake(tmp_path, 1, 15, 4.0)
    _fake(tmp_path, 1, 20, None)
    interrupted = _fake(tmp_path, 2, 25, None, complete=False)
    (tmp_path / "runs").mkdir()

    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["epoch-1-step-5", "epoch-1-step-10", "epoch-2-step-15", "epoch-2-step-20"]  # by step
    assert resolve_resume_dir("latest", tmp_path).name == "epoch-2-step-20"  # never the interrupted one
    with pytest.raises(FileNotFoundError, match="interrupted"):
        resolve_resume_dir(str(interrupted), tmp_path)
    assert resolve_resume_dir("latest", tmp_path / "empty") is None
    assert resolve_resume_dir("", tmp_path) is None

    deleted = rotate_checkpoints(tmp_path, save_total_limit=2)
    assert [p.name for p in deleted] == ["epoch-1-step-5"]
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "epoch-1-step-10",
        "epoch-2-step-15",
        "epoch-2-step-20",
    ]
    assert read_progress(best).eval["ppl"] == 3.0
    assert rotate_checkpoints(tmp_path, save_total_limit=0) == []  # 0 keeps everything
