"""Reliability of training runs, end to end on a tiny Baichuan2: exact resume after every kind of stop,
the non-finite guard, foreign base models, full disks, a GPU asked for but missing.

The runs are real train.py runs, in this process (no launcher, one rank: the process group stays up
between runs), with faults injected at chosen steps by tests/faults.py: real signals (SIGTERM, SIGINT,
SIGKILL in a child process) and a real forward hook that makes a step's loss NaN. One uninterrupted
reference run per configuration is shared by the tests that compare with it.

Exact means: every checkpoint of the resumed run holds the adapter of the reference's checkpoint of the
same step to within ADAPTER_ATOL, and the same eval perplexity to within PPL_RTOL. What is left is float32
rounding: DeepSpeed's Adam keeps beta**t as a running product, which the first step after a reload
recomputes with pow() (measured: <= 6e-8 on the adapter). The defects these tests guard against move the
adapter by 1e-2.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.faults import injected
from tests.test_train_single import REPO_ROOT, scalars, train_command, write_overfit_data

ADAPTER_ATOL = 2e-6
PPL_RTOL = 1e-5

# 24 samples, micro-batch 2, accumulation 2: 6 optimizer steps an epoch. Saves at 5 (a save step just
# before an epoch end, as in the reported failure), 6 (epoch end), 10, 12 (epoch end) and 14 (the end).
REFERENCE_FLAGS = (
    "--gradient_accumulation_steps", "2", "--max_steps", "14", "--save_model_step", "5",
    "--precision", "fp32", "--quantization", "none", "--lora_dropout", "0.1",
)  # fmt: skip
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_GROUP_ENV: dict[str, str] = {}  # what init_distributed set for the process group that stays up


@dataclass
class Run:
    """The outcome of one train.py run in this process."""

    code: int
    records: list[logging.LogRecord]
    output_dir: Path

    @property
    def log(self) -> str:
        return "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records)

    @property
    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _one_rank_in_this_process() -> Iterator[None]:
    """Let train.cli run here: keep the process group between runs, restore env and thread count after."""
    import train

    saved_env = {key: os.environ.get(key) for key in _ENV_KEYS}
    os.environ.update(_GROUP_ENV)  # DeepSpeed reads LOCAL_RANK & co. at every engine, not only at init
    saved_destroy, threads = train.destroy, torch.get_num_threads()
    train.destroy = lambda: None  # the one-rank group (and DeepSpeed's view of it) serves every run
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the child processes: the same float rounding
    try:
        yield
    finally:
        _GROUP_ENV.update({key: os.environ[key] for key in _ENV_KEYS if key in os.environ})
        train.destroy = saved_destroy
        torch.set_num_threads(threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def captured_logs(*names: str) -> Iterator[list[logging.LogRecord]]:
    """The records of these loggers (train.py's logging set-up replaces the root handlers pytest uses)."""
    capture = _Capture()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(capture)
    try:
        yield capture.records
    finally:
        for logger in loggers:
            logger.removeHandler(capture)


def train_here(model_dir: Path, data_dir: Path, output_dir: Path, *flags: str, faults: str = "") -> Run:
    """``python train.py ...`` in this process with ``faults`` injected; returns its exit code and log."""
    import train

    with captured_logs("train", "sft") as records, _one_rank_in_this_process(), injected(faults):
        code = train.cli(train_command(model_dir, data_dir, output_dir, *flags)[1:])
    return Run(code, records, output_dir)


def train_child(
    model_dir: Path, data_dir: Path, output_dir: Path, *flags: str, faults: str
) -> subprocess.CompletedProcess:
    """The same run as a child process (for SIGKILL), with the same thread count as :func:`train_here`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TRAIN_FAULTS": faults}
    for key in _ENV_KEYS:
        env.pop(key, None)
    command = [sys.executable, "tests/faults.py", *train_command(model_dir, data_dir, output_dir, *flags)[1:]]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session", autouse=True)
def _leave_the_process_group():
    yield
    from sft.core.distributed import destroy

    destroy()


def checkpoints(output_dir: Path) -> dict[int, Path]:
    """The complete checkpoints of a run by step (the directory name's S; trainer_state.json present)."""
    found = output_dir.glob("epoch-*-step-*/trainer_state.json") if output_dir.is_dir() else []
    return {int(p.parent.name.rsplit("-", 1)[1]): p.parent for p in found}


def state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_as_reference(resumed_out: Path, reference_out: Path, after_step: int) -> None:
    """Every checkpoint the resumed run wrote after ``after_step`` equals the reference's of that step."""
    reference, resumed = checkpoints(reference_out), checkpoints(resumed_out)
    expected = sorted(s for s in reference if s > after_step)
    assert sorted(s for s in resumed if s > after_step) == expected
    for step in expected:
        diff = max_diff(adapter(resumed[step]), adapter(reference[step]))
        assert diff <= ADAPTER_ATOL, f"step {step}: adapter differs by {diff:.3g}"
        ppl, ref_ppl = state(resumed[step])["eval"]["ppl"], state(reference[step])["eval"]["ppl"]
        assert ppl == pytest.approx(ref_ppl, rel=PPL_RTOL), f"step {step}: eval ppl {ppl} vs {ref_ppl}"


def resume_here(model_dir: Path, data_dir: Path, output_dir: Path, *flags: str) -> Run:
    run = train_here(model_dir, data_dir, output_dir, *flags, "--resume_from_checkpoint", "latest")
    assert run.code == 0, run.log[-3000:]
    return run


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_baichuan_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run every stop below is compared with."""
    root = tmp_path_factory.mktemp("reference")
    data_dir = root / "data"
    write_overfit_data(data_dir)
    run = train_here(tiny_baichuan_dir, data_dir, root / "out", *REFERENCE_FLAGS)
    assert run.code == 0, run.log[-3000:]
    assert sorted(checkpoints(root / "out")) == [5, 6, 10, 12, 14]
    return {"model": tiny_baichuan_dir, "data": data_dir, "out": root / "out"}


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_the_step_it_came_in(reference, tmp_path):
    """SIGTERM during step 8 (twice at once, as from a scheduler and the deepspeed launcher passing it on):
    checkpoint of step 8 (not 9), not evaluated and not claiming an old evaluation; `latest` continues exactly."""
    model, data, out = reference["model"], reference["data"], tmp_path / "out"
    run = train_here(model, data, out, *REFERENCE_FLAGS, faults="sigterm@8,sigterm@8")
    assert run.code == 143, run.log[-3000:]
    saved = checkpoints(out)
    assert sorted(saved) == [5, 6, 8]
    assert state(saved[8])["eval"] == {}  # no evaluation ran at step 8
    assert f"stopped by SIGTERM after saving {saved[8]}" in run.log
    from sft.checkpoint.runs import best_checkpoint

    assert best_checkpoint(out) in (saved[5], saved[6])  # by the evaluations that ran

    resume_here(model, data, out, *REFERENCE_FLAGS)
    assert_same_as_reference(out, reference["out"], after_step=8)


@pytest.mark.slow
@pytest.mark.parametrize("during", ["eval", "save"])
def test_sigterm_during_the_evaluation_or_save_before_an_epoch_end(reference, tmp_path, during):
    """The reported failure: SIGTERM during step 5's evaluation or save, step 6 ends the epoch. The run stops
    before step 6 with step 5's complete checkpoint; resuming reproduces the rest, epoch-end evaluation
    included."""
    model, data, out = reference["model"], reference["data"], tmp_path / "out"
    run = train_here(model, data, out, *REFERENCE_FLAGS, faults=f"sigterm@{during}5")
    assert run.code == 143, run.log[-3000:]
    assert sorted(checkpoints(out)) == [5]
    assert state(checkpoints(out)[5])["eval"] == state(checkpoints(reference["out"])[5])["eval"]

    resume_here(model, data, out, *REFERENCE_FLAGS)
    assert_same_as_reference(out, reference["out"], after_step=5)


@pytest.mark.slow
def test_ctrl_c_in_the_last_step_of_an_epoch(reference, tmp_path):
    """Ctrl-C during step 6 (the epoch's last): the epoch-end checkpoint is saved, the run stops (130), and
    resuming from a checkpoint at an epoch boundary is exact (the new epoch's data iterator must not
    shift the dropout RNG)."""
    model, data, out = reference["model"], reference["data"], tmp_path / "out"
    run = train_here(model, data, out, *REFERENCE_FLAGS, faults="sigint@6")
    assert run.code == 130, run.log[-3000:]
    assert sorted(checkpoints(out)) == [5, 6]
    assert "stopped by SIGINT" in run.log

    resume_here(model, data, out, *REFERENCE_FLAGS)
    assert_same_as_reference(out, reference["out"], after_step=6)


@pytest.mark.slow
def test_kill_9_during_a_save(reference, tmp_path):
    """SIGKILL in the middle of step 10's save (a real kill, in a child process): the partial directory is
    never resumed from; `latest` is the epoch-end checkpoint of step 6, and the rest is reproduced."""
    model, data, out = reference["model"], reference["data"], tmp_path / "out"
    proc = train_child(model, data, out, *REFERENCE_FLAGS, faults="sigkill@save10")
    assert proc.returncode == -9, proc.stderr[-3000:]
    partial = out / "epoch-2-step-10"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert sorted(checkpoints(out)) == [5, 6]

    resume_here(model, data, out, *REFERENCE_FLAGS)
    assert_same_as_reference(out, reference["out"], after_step=6)


@pytest.mark.slow
def test_packed_qlora_run_resumes_exactly_after_sigterm(tiny_baichuan_dir, tmp_path):
    """Packed rows on a 4-bit base: SIGTERM mid-epoch, resume, same checkpoints as without the stop."""
    data = tmp_path / "data"
    write_overfit_data(data)
    # 12 packed rows of 64 tokens, micro-batch 2: 6 steps an epoch.
    flags = (
        "--packing", "--max_len", "64", "--max_src_len", "48", "--quantization", "nf4",
        "--gradient_accumulation_steps", "1", "--max_steps", "10", "--save_model_step", "4", "--precision", "fp32",
    )  # fmt: skip
    full = train_here(tiny_baichuan_dir, data, tmp_path / "full", *flags)
    assert full.code == 0, full.log[-3000:]
    assert sorted(checkpoints(tmp_path / "full")) == [4, 6, 8, 10]

    out = tmp_path / "stopped"
    run = train_here(tiny_baichuan_dir, data, out, *flags, faults="sigterm@7")
    assert run.code == 143, run.log[-3000:]
    assert sorted(checkpoints(out)) == [4, 6, 7]
    resume_here(tiny_baichuan_dir, data, out, *flags)
    assert_same_as_reference(out, tmp_path / "full", after_step=7)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_too_many_stop_the_run(reference, tmp_path, monkeypatch):
    """A NaN loss (a forward hook on the head) skips that step's update: the adapter after it is the adapter
    before it, TensorBoard counts it, training goes on. --max_bad_steps such steps in a row stop the run
    (exit 1) and leave the last good checkpoint as the newest."""
    import train
    from sft.checkpoint.runs import resolve_resume_dir

    model, data = reference["model"], reference["data"]
    flags = (*REFERENCE_FLAGS, "--max_steps", "7", "--save_model_step", "1")
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    real_step = train.train_step

    def recording_step(args, engine, *rest):
        result = real_step(args, engine, *rest)
        snapshots[engine.global_steps] = {
            n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad
        }
        return result

    monkeypatch.setattr(train, "train_step", recording_step)
    out = tmp_path / "one_bad"
    run = train_here(model, data, out, *flags, faults="nan@4")
    assert run.code == 0, run.log[-3000:]
    assert max_diff(snapshots[4], snapshots[3]) == 0.0  # the update of step 4 was skipped
    assert max_diff(snapshots[5], snapshots[4]) > 0  # and training went on
    assert (
        "step 4 (epoch 1, micro-batches 7-8 of 12): non-finite loss on rank(s) 0; update skipped on every rank "
        "(1 in a row, --max_bad_steps 10)" in run.log
    )
    assert sorted(checkpoints(out)) == [1, 2, 3, 5, 6, 7]  # a skipped step is never checkpointed
    assert state(checkpoints(out)[7])["skipped_steps"] == 1
    series = scalars(out)
    assert dict(series["train/skipped_steps"]) == {s: float(s >= 4) for s in range(1, 8)}
    assert 4 not in dict(series["train/loss"])  # the NaN stays out of the loss curve
    assert all(torch.isfinite(t).all() for t in adapter(checkpoints(out)[7]).values())

    out = tmp_path / "diverged"
    run = train_here(model, data, out, *flags, "--max_bad_steps", "3", faults="nan@3,nan@4,nan@5")
    assert run.code == 1, run.log[-3000:]
    assert sorted(checkpoints(out)) == [1, 2]
    good = checkpoints(out)[2]
    assert len(run.errors) == 1, run.errors
    assert run.errors[0].startswith("step 5: 3 optimizer steps in a row (from step 3) had a non-finite loss")
    assert (
        f"the last good checkpoint is {good}: resume from it (--resume_from_checkpoint {good})"
        in run.errors[0]
    )
    assert resolve_resume_dir("latest", out) == good


@pytest.mark.slow
def test_a_checkpoint_only_fits_the_base_model_it_was_trained_on(reference, tiny_llama_dir, tmp_path):
    """Resume, inference and merge compare the base recorded with the checkpoint before loading anything:
    another architecture or other weights of the same shape are refused naming both paths and the fix;
    the same model at another path is accepted (and resumes exactly); an old checkpoint only warns."""
    from safetensors.torch import save_file

    model, data = reference["model"], reference["data"]
    ckpt = checkpoints(reference["out"])[10]
    trained_on = str(Path(model).resolve())

    def resume_on(base: Path, name: str) -> Run:
        out = tmp_path / name
        shutil.copytree(ckpt, out / ckpt.name)
        return train_here(base, data, out, *REFERENCE_FLAGS, "--resume_from_checkpoint", "latest")

    # The same architecture, one tensor changed a little (as by a merged LoRA).
    other = tmp_path / "other_weights"
    shutil.copytree(model, other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k in sorted(weights) if "W_pack" in k)
    weights[name] = weights[name] + 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})

    for base, how in (
        (tiny_llama_dir, "another architecture: "),
        (other, "the same architecture with other"),
    ):
        run = resume_on(base, f"on_{base.name}")
        assert run.code == 1, run.log[-3000:]
        assert len(run.errors) == 1, run.errors
        assert (
            f"was trained on the base model {trained_on}, but --model_name_or_path {base} is a different model "
            f"({how}" in run.errors[0]
        )
        assert f"pass --model_name_or_path {trained_on} to resume it" in run.errors[0]
        assert "sft.modeling.loading: loaded" not in run.log  # refused before the model load

    from sft.checkpoint.adapters import check_adapter_fits_base, read_adapter
    from sft.checkpoint.identity import BaseModelMismatch
    from sft.export.merge import plan_merge

    info = read_adapter(ckpt)
    with pytest.raises(BaseModelMismatch, match="pass the base it was trained on") as refused:
        check_adapter_fits_base(other, info, base_flag="--model_path")
    assert isinstance(refused.value, ValueError)  # what predict.py / evaluate.py / web_demo.py report
    with pytest.raises(ValueError, match=f"--ori_model_dir {other} is a different model"):
        plan_merge(
            other, ckpt, tmp_path / "merged", merge_into="original", quantization=None, double_quant=None,
            overwrite=False,
        )  # fmt: skip

    old = tmp_path / "old" / ckpt.name
    shutil.copytree(ckpt, old)
    (old / "base_model.json").unlink()  # written before the record existed
    with captured_logs("sft") as records:
        check_adapter_fits_base(other, read_adapter(old), base_flag="--model_path")
    assert any("has no base_model.json" in r.getMessage() for r in records)

    moved = tmp_path / "moved_base"
    shutil.copytree(model, moved)
    resume = resume_on(moved, "moved")
    assert resume.code == 0, resume.log[-3000:]
    assert_same_as_reference(tmp_path / "moved", reference["out"], after_step=10)


@pytest.fixture
def small_disk(reference: dict, tmp_path: Path) -> Iterator[Path]:
    """A real file system with room for two checkpoints of the reference run and its events, not three."""
    page = 4096  # tmpfs counts file data in pages
    checkpoint = sum(
        -(-f.stat().st_size // page) * page
        for f in checkpoints(reference["out"])[5].rglob("*")
        if f.is_file()
    )
    size_kib = (checkpoint * 5 // 2 + 64 * 1024) // 1024
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_clear_error_and_never_a_checkpoint(reference, small_disk, capfd):
    """The disk fills up during step 10's save: one error line naming the checkpoint, the fix and the last
    complete checkpoint, exit 1, no partial directory; resuming on the still-full disk fails at once the
    same way; TensorBoard on a full disk is one error, not a thread traceback; with space, the resume is exact."""
    from sft.train.metrics import Metrics

    model, data, out = reference["model"], reference["data"], small_disk / "out"
    run = train_here(model, data, out, *REFERENCE_FLAGS)
    assert run.code == 1, run.log[-3000:]
    assert sorted(checkpoints(out)) == [5, 6]
    assert not (out / "epoch-2-step-10").exists()
    assert len(run.errors) == 1, run.errors
    assert run.errors[0].startswith(f"cannot write checkpoint {out / 'epoch-2-step-10'}: the disk is full (")
    assert "pass another --output_dir" in run.errors[0]
    assert f"the last complete checkpoint is {out / 'epoch-1-step-6'}" in run.errors[0]

    ballast = small_disk / "ballast"

    def fill_the_disk() -> None:
        with pytest.raises(OSError), ballast.open("ab", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 4096)

    fill_the_disk()
    run = train_here(model, data, out, *REFERENCE_FLAGS, "--resume_from_checkpoint", "latest")
    assert run.code == 1, run.log[-3000:]
    assert len(run.errors) == 1, run.errors
    assert re.match(
        rf"--output_dir {re.escape(str(out))} has 0\.\d MiB free, but a checkpoint like ", run.errors[0]
    )
    assert "free space on that disk or pass another --output_dir" in run.errors[0]
    assert "sft.modeling.loading: loaded" not in run.log

    capfd.readouterr()
    fill_the_disk()  # what the failed run left (its cleaned-up leftovers) is taken too
    with pytest.raises(OSError, match=f"cannot write TensorBoard events to {small_disk / 'runs'}"):
        # Creating the file may still succeed on a full tmpfs; writing its events cannot.
        metrics = Metrics(str(small_disk / "runs"), torch.device("cpu"), 0)
        metrics.scalar("train/loss", 1.0, 1)
        metrics.close()
    assert "Traceback" not in capfd.readouterr().err  # nothing printed by the writer's thread
    assert "Traceback" not in "".join(str(r.exc_info) for r in run.records if r.exc_info)

    ballast.unlink()
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    resume_here(model, data, out, *REFERENCE_FLAGS)
    assert_same_as_reference(out, reference["out"], after_step=6)


def test_a_gpu_asked_for_but_missing_stops_the_run(tiny_baichuan_dir, tmp_path, monkeypatch):
    """CUDA_VISIBLE_DEVICES=0 without a usable GPU: exit 1 with the fix, instead of hours on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is usable here")
    write_overfit_data(tmp_path / "data")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    run = train_here(tiny_baichuan_dir, tmp_path / "data", tmp_path / "out", *REFERENCE_FLAGS)
    assert run.code == 1
    assert len(run.errors) == 1, run.errors
    assert run.errors[0].startswith("CUDA_VISIBLE_DEVICES=0 asks for GPU(s), but this PyTorch")
    assert "unset CUDA_VISIBLE_DEVICES (or set it empty) to train on the CPU on purpose" in run.errors[0]
    assert "sft.modeling.loading: loaded" not in run.log


def test_the_guard_refuses_deepspeed_settings_that_apply_nonfinite_updates(tmp_path):
    from sft.core.errors import ArgsError
    from sft.train.args import TrainArgs
    from sft.train.ds_config import build_ds_config

    config = tmp_path / "zero0.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 0}, "bf16": {"check_grad_overflow": False}}))
    args = TrainArgs(ds_config=str(config), precision="bf16")
    with pytest.raises(ArgsError) as refused:
        build_ds_config(args, path=args.ds_config, precision=args.precision, world_size=1)
    text = str(refused.value)
    assert "ZeRO stage 0 applies non-finite updates in bf16" in text
    assert "bf16.check_grad_overflow=false lets non-finite updates through" in text
    assert "--max_bad_steps 0" in text
    args.max_bad_steps = 0  # the guard off: the user's config stands
    build_ds_config(args, path=args.ds_config, precision=args.precision, world_size=1)
