"""Outputs that are never half-written: a merge or a data conversion killed (kill -9) at any point leaves the
previous output complete, its leftovers are cleaned by the next run (never those of a run still going), and
data outputs get the permissions of a plain file.

The kill points are real SIGKILLs from this test: ``$SFT_TEST_PAUSE_AT`` makes the process stop at a named
point (sft.core.atomic.pause_point) and say so on stderr, and the test kills it there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sft.core.atomic import PAUSE_ENV, DirectoryBusyError, replacing_dir, write_file_atomic
from tests.test_error_corpus import GOOD, write_rolebench
from tests.test_merge import PROBE_BATCH, make_adapter

REPO_ROOT = Path(__file__).resolve().parent.parent


def start(argv: list[str], log: Path, pause_at: str | None = None) -> subprocess.Popen:
    """Start ``python argv...`` in the repository, stderr to ``log``, optionally pausing at a named point."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop(PAUSE_ENV, None)
    if pause_at:
        env[PAUSE_ENV] = pause_at
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env=env, stdout=fh, stderr=fh)


def wait_until(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None and not condition():
            pytest.fail(f"the process ended ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def kill_at(argv: list[str], log: Path, point: str) -> None:
    """Run ``argv`` until it pauses at ``point``, then kill -9 it."""
    proc = start(argv, log, pause_at=point)
    wait_until(lambda: f"paused at {point}" in log.read_text(), proc, log, f"'paused at {point}'")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def leftovers(out: Path) -> list[str]:
    """Hidden copies written next to ``out`` (staging copies, set-aside old versions; not the small lock file,
    which a killed writer leaves too and the next one reuses)."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*") if not p.name.endswith(".lock"))


def nothing_hidden(out: Path) -> bool:
    """No hidden sibling at all: what a writer that ran to the end leaves."""
    return not list(out.parent.glob(f".{out.name}.*"))


@torch.inference_mode()
def logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model(input_ids=PROBE_BATCH, use_cache=False).logits


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() == 0)


@pytest.mark.slow
def test_killed_merge_never_destroys_the_previous_model(tiny_baichuan_dir, tmp_path):
    """merge_params.py --overwrite killed (kill -9) just before the swap and just after it: OUT is always a
    complete model (the old one, then the new one), and each merge deletes what killed ones left (a whole
    model's size each), never the copy of a merge still running."""
    from sft.export.merge import merge_lora

    adapter_a = make_adapter(tiny_baichuan_dir, tmp_path / "a", quantization="none", seed=1)
    adapter_b = make_adapter(tiny_baichuan_dir, tmp_path / "b", quantization="none", seed=2)
    out = tmp_path / "merged"
    merge_lora(tiny_baichuan_dir, adapter_a, out, dtype=torch.float32)
    old = logits(out)
    merge_b = [
        "merge_params.py", "--ori_model_dir", str(tiny_baichuan_dir), "--model_dir", str(adapter_b),
        "--save_model_dir", str(out), "--overwrite", "--dtype", "fp32", "--device", "cpu",
    ]  # fmt: skip

    # 1. What a merge killed while writing leaves: a half-written hidden copy (~ a whole model for a 7B merge).
    half_written = out.parent / f".{out.name}.tmp-{dead_pid()}"
    shutil.copytree(out, half_written)
    weights = half_written / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    first = leftovers(out)

    # 2. Paused with the verified copy complete, just before the swap. A second merge into the same directory
    #    is refused meanwhile (before loading any weight), and leaves the running one's copy alone.
    proc = start(merge_b, tmp_path / "2.log", pause_at="staged")
    paused = lambda: "paused at staged" in (tmp_path / "2.log").read_text()  # noqa: E731
    wait_until(lambda: paused() or proc.poll() is not None, proc, tmp_path / "2.log", "the pause")
    assert not set(first) & set(leftovers(out)), "the leftovers of the killed merge were not deleted"
    assert paused(), (tmp_path / "2.log").read_text()[-3000:]
    running = leftovers(out)
    busy = re.escape(f"{out} is being written by another process (pid {proc.pid})")
    with pytest.raises(DirectoryBusyError, match=busy):
        merge_lora(tiny_baichuan_dir, adapter_a, out, dtype=torch.float32, overwrite=True)
    assert leftovers(out) == running
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert same(logits(out), old)

    # 3. Killed right after the swap, before the old version is deleted: OUT is the new, verified model.
    kill_at(merge_b, tmp_path / "3.log", "swapped")
    new = logits(out)
    assert not same(new, old)
    assert not set(running) & set(leftovers(out))

    # 4. A merge that runs to the end cleans up the last leftover and leaves nothing hidden behind; its files
    #    are readable like any new file (transformers alone writes the weights 0600).
    previous = os.umask(0o022)
    try:
        merge_lora(tiny_baichuan_dir, adapter_a, out, dtype=torch.float32, overwrite=True)
    finally:
        os.umask(previous)
    assert same(logits(out), old) and nothing_hidden(out)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}


FALLBACK_WRITER = """
import sys
from pathlib import Path
import sft.core.atomic
sft.core.atomic._exchange = lambda a, b: False  # a file system without RENAME_EXCHANGE
with sft.core.atomic.replacing_dir(Path(sys.argv[1])) as staging:
    (staging / "version.txt").write_text("new")
"""


@pytest.mark.slow
def test_without_rename_exchange_a_killed_swap_is_repaired_by_the_next_writer(tmp_path):
    """The two-rename fallback: killed between the renames (no OUT for a moment), the next writer puts the old
    version back before anything else; killed after them, it deletes the old version left aside."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "version.txt").write_text("old")
    kill_at(["-c", FALLBACK_WRITER, str(out)], tmp_path / "aside.log", "aside")
    assert not out.exists() and len(leftovers(out)) == 2  # the old version aside, the new one staged

    with pytest.raises(RuntimeError, match="a failed check"), replacing_dir(out) as staging:
        (staging / "version.txt").write_text("never")
        raise RuntimeError("a failed check")
    assert (out / "version.txt").read_text() == "old" and nothing_hidden(out)

    kill_at(["-c", FALLBACK_WRITER, str(out)], tmp_path / "swapped.log", "swapped")
    assert (out / "version.txt").read_text() == "new" and [p for p in leftovers(out) if ".old-" in p]
    with replacing_dir(out) as staging:
        (staging / "version.txt").write_text("newer")
    assert (out / "version.txt").read_text() == "newer" and nothing_hidden(out)


def read_split(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_killed_data_helper_leaves_the_old_pair_or_the_new_one(tmp_path):
    """data_helper.py rolebench rewriting an output folder, killed before and after the swap: train.jsonl and
    test.jsonl always come from the same run, and the user's own files in the folder stay."""
    data_dir = write_rolebench(tmp_path / "rb", test_questions=3)
    out = tmp_path / "out"
    command = ["data_helper.py", "rolebench", "--data_dir", data_dir, "--out_dir", str(out)]
    import data_helper

    assert data_helper.main([*command[1:], "--max_answers", "1"]) == 0
    (out / "notes.txt").write_text("mine")
    old = {split: read_split(out, split) for split in ("train", "test")}

    kill_at([*command, "--max_answers", "2"], tmp_path / "staged.log", "staged")
    assert {split: read_split(out, split) for split in ("train", "test")} == old

    kill_at([*command, "--max_answers", "2"], tmp_path / "swapped.log", "swapped")
    new = {split: read_split(out, split) for split in ("train", "test")}
    assert len(new["train"]) == 2 * len(old["train"]) and len(new["test"]) == 2 * len(old["test"])
    assert (out / "notes.txt").read_text() == "mine"
    assert [p for p in leftovers(out) if ".tmp-" in p]  # the old pair, until the next run deletes it


def test_outputs_follow_the_umask_and_failures_leave_nothing(tmp_path, capsys):
    """Data outputs get the permissions of a plain file (0644 under umask 022, not mkstemp's 0600); a failed
    conversion or write leaves no file, temporary file or new directory behind."""
    import data_helper

    def convert(*argv: object) -> int:
        return data_helper.main([str(a) for a in argv])

    source, bad = tmp_path / "in.jsonl", tmp_path / "bad.jsonl"
    source.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    bad.write_text(json.dumps(GOOD) + "\n" + json.dumps({"conversations": []}) + "\n", encoding="utf-8")
    rolebench = write_rolebench(tmp_path / "rb_in")
    previous = os.umask(0o022)
    try:
        assert convert("conversations", "--input", source, "--output", tmp_path / "a/b/out.jsonl") == 0
        assert convert("rolebench", "--data_dir", rolebench, "--out_dir", tmp_path / "rb") == 0
        os.umask(0o027)
        assert convert("conversations", "--input", source, "--output", tmp_path / "strict.jsonl") == 0
    finally:
        os.umask(previous)
    modes = [oct((tmp_path / p).stat().st_mode & 0o777) for p in ("a/b/out.jsonl", "rb", "rb/train.jsonl")]
    assert modes == ["0o644", "0o755", "0o644"]
    assert oct((tmp_path / "strict.jsonl").stat().st_mode & 0o777) == "0o640"

    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert convert("conversations", "--input", bad, "--output", tmp_path / "new/dir/out.jsonl") == 1
    assert convert("rolebench", "--data_dir", tmp_path / "rb_missing", "--out_dir", tmp_path / "new/rb") == 1

    def write_failing(fh) -> None:
        fh.write(json.dumps(GOOD) + "\n")
        raise ValueError("a record that cannot be written")

    with pytest.raises(ValueError, match="cannot be written"):
        write_file_atomic(tmp_path / "new/x/out.jsonl", write_failing)
    (tmp_path / "old.jsonl").write_text("old\n")
    with pytest.raises(ValueError, match="cannot be written"):
        write_file_atomic(tmp_path / "old.jsonl", write_failing)
    assert (tmp_path / "old.jsonl").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([*before, "old.jsonl"])
