"""sft.checkpoint bookkeeping without a model: listing, 'latest', rotation that keeps the best."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from sft.checkpoint.layout import STATE_DIR, CheckpointError, checkpoint_name, list_checkpoints
from sft.checkpoint.resume import check_resume_args
from sft.checkpoint.runs import best_checkpoint, resolve_resume_dir, rotate_checkpoints
from sft.checkpoint.save import load_checkpoint
from sft.checkpoint.state import TrainProgress, read_progress


def _fake(output_dir: Path, epoch: int, step: int, ppl: float | None, *, complete: bool = True) -> Path:
    path = output_dir / checkpoint_name(epoch, step)
    (path / STATE_DIR).mkdir(parents=True)
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
    with pytest.raises(CheckpointError, match="interrupted"):
        resolve_resume_dir(str(interrupted), tmp_path)
    assert resolve_resume_dir("latest", tmp_path / "empty") is None
    assert resolve_resume_dir("", tmp_path) is None
    assert best_checkpoint(tmp_path) == best  # lowest eval ppl among the complete checkpoints
    assert best_checkpoint(tmp_path / "empty") is None

    deleted = rotate_checkpoints(tmp_path, save_total_limit=2)
    assert [p.name for p in deleted] == ["epoch-1-step-5"]
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "epoch-1-step-10",
        "epoch-2-step-15",
        "epoch-2-step-20",
    ]
    assert read_progress(best).eval["ppl"] == 3.0
    assert rotate_checkpoints(tmp_path, save_total_limit=0) == []  # 0 keeps everything


def test_damaged_trainer_state_names_the_checkpoint_to_resume_from(tmp_path):
    older = _fake(tmp_path, 0, 5, 9.0)
    damaged = _fake(tmp_path, 0, 10, 3.0)
    (damaged / "trainer_state.json").write_text('{"step": 10, "epo')  # cut short by a full disk
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(None, damaged)  # fails before the engine is touched
    text = str(info.value)
    assert f"checkpoint {damaged} is damaged: trainer_state.json is unreadable" in text
    assert f"--resume_from_checkpoint {older}" in text
    (older / "trainer_state.json").write_text('{"step": 5, "unknown_field": 1}')
    with pytest.raises(CheckpointError, match=re.escape(f"delete {older} and start again")):
        load_checkpoint(None, older)


def test_rotation_survives_a_damaged_old_trainer_state(tmp_path):
    damaged = _fake(tmp_path, 0, 5, 1.0)
    (damaged / "trainer_state.json").write_text("{")
    _fake(tmp_path, 0, 10, 3.0)
    _fake(tmp_path, 0, 15, 4.0)
    deleted = rotate_checkpoints(tmp_path, save_total_limit=1)  # training goes on
    assert sorted(p.name for p in deleted) == ["epoch-1-step-5"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-1-step-10", "epoch-1-step-15"]


def test_resume_with_other_adapter_flags_is_refused_before_loading(tmp_path, caplog):
    ckpt = _fake(tmp_path, 0, 5, 2.0)
    saved = {"peft": "lora", "lora_dim": 16, "precision": "bf16", "seed": 1234, "max_steps": 100}
    (ckpt / "train_args.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"other flags \(--lora_dim 16 there, 8 now\)"):
        check_resume_args(ckpt, {**saved, "lora_dim": 8})
    check_resume_args(ckpt, {**saved, "max_steps": 200})  # training longer is what resuming is for
    with caplog.at_level("WARNING", logger="sft.checkpoint"):
        check_resume_args(ckpt, {**saved, "seed": 7})
    assert "--seed 1234 there, 7 now" in caplog.text


def test_latest_skips_a_checkpoint_whose_state_is_unreadable(tmp_path):
    older = _fake(tmp_path, 0, 5, 9.0)
    newest = _fake(tmp_path, 0, 10, 3.0)
    (newest / "trainer_state.json").write_text('{"step": 10, "epo')  # a copy cut short
    assert resolve_resume_dir("latest", tmp_path) == older  # the newest complete one before it
    (older / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* has a readable trainer_state.json"):
        resolve_resume_dir("latest", tmp_path)


def test_a_nan_evaluation_is_never_the_best_checkpoint(tmp_path):
    _fake(tmp_path, 0, 5, float("nan"))  # json writes NaN, and reads it back; NaN < x is always False
    best = _fake(tmp_path, 0, 10, 9.0)
    _fake(tmp_path, 0, 15, 12.0)
    assert best_checkpoint(tmp_path) == best
