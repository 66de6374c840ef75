"""train.py with several ranks on CPU (DeepSpeed's CPU accelerator, gloo), also on a machine with GPUs.

- ``deepspeed --num_gpus 2`` with ZeRO-2 on a tiny Baichuan2 (ALiBi): the loss falls, and the
  perplexity the two ranks report equals a one-process hand computation (same tokens, nothing
  counted twice). A NaN loss on rank 1 only (tests/faults.py) skips that update on both ranks.
  The same run stopped by SIGTERM on rank 0 alone, during the evaluation just before an epoch end,
  stops both ranks at the same step and resumes to the same checkpoints.
- Two single-process "nodes" started by torchrun on 127.0.0.1 train together with ZeRO-3 on a tiny
  Llama with an unquantised base: each rank holds half of the base from the moment it is loaded
  (``zero.Init``), the saved adapter holds the real gathered weights, the reported perplexity equals a
  hand computation and improves, and the loss falls. (A 4-bit base under ZeRO-3 is loaded whole and
  partitioned by the engine: tests/test_train_single.py::test_resume_under_zero3_with_a_4bit_base.)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_train_resume import assert_same_as_reference, checkpoints
from tests.test_train_single import (
    CPU_RANKS_ENV,
    REPO_ROOT,
    checkpoint_state,
    hand_perplexity,
    scalars,
    train_command,
    write_overfit_data,
)

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# 2 ranks x micro-batch 2 x accumulation 1 = the 4 samples per step of the single-process test; 6 steps an
# epoch; checkpoints at 5 (a save step just before an epoch end), 6 (epoch end), 10 and 12.
TWO_RANK_FLAGS = (
    "--ds_config", "ds_configs/zero2.json", "--gradient_accumulation_steps", "1",
    "--max_steps", "12", "--save_model_step", "5", "--precision", "fp32",
)  # fmt: skip


def launch_two_ranks(
    model_dir: Path, data_dir: Path, out: Path, *flags: str, faults: str
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 2 tests/faults.py <train.py flags>`` with TRAIN_FAULTS=faults."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.update(CPU_RANKS_ENV)  # CPU ranks also on a machine with GPUs (the deepspeed launcher reassigns them)
    env["TRAIN_FAULTS"] = faults
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
        "tests/faults.py", *train_command(model_dir, data_dir, out, *flags)[1:],
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_rank_run(tiny_baichuan_alibi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted 2-rank run, with a NaN loss on rank 1 at step 2."""
    root = tmp_path_factory.mktemp("two_ranks")
    data_dir, out = root / "data", root / "out"
    write_overfit_data(data_dir)
    proc = launch_two_ranks(tiny_baichuan_alibi_dir, data_dir, out, *TWO_RANK_FLAGS, faults="nan@2:r1")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return {"model": tiny_baichuan_alibi_dir, "data": data_dir, "out": out, "log": proc.stdout + proc.stderr}


@pytest.mark.slow
def test_two_ranks_zero2_deepspeed_launcher(two_rank_run):
    out, data_dir, tiny_baichuan_alibi_dir = two_rank_run["out"], two_rank_run["data"], two_rank_run["model"]
    series = scalars(out)
    losses = dict(series["train/loss"])
    assert sorted(losses) == [1, *range(3, 13)]  # step 2's update was skipped on both ranks
    assert losses[12] < 0.75 * losses[1], losses
    assert dict(series["train/skipped_steps"])[12] == 1
    assert (
        "step 2 (epoch 1, micro-batches 2-2 of 6): non-finite loss on rank(s) 1; update skipped"
        in two_rank_run["log"]
    )
    ckpt = out / "epoch-2-step-12"
    reported = checkpoint_state(ckpt)["eval"]
    expected, tokens = hand_perplexity(tiny_baichuan_alibi_dir, ckpt, data_dir / "test.jsonl", "nf4")
    assert reported["tokens"] == tokens  # every test sample counted once over the two ranks
    assert reported["ppl"] == pytest.approx(expected, rel=1e-5)
    assert sorted(p.name for p in (ckpt / "training_state").glob("rng_state_*.pt")) == [
        "rng_state_0.pt",
        "rng_state_1.pt",
    ]


@pytest.mark.slow
def test_two_ranks_sigterm_on_one_rank_before_an_epoch_end_resumes_exactly(two_rank_run, tmp_path):
    """SIGTERM reaches rank 0 only, during step 5's evaluation; step 6 would end the epoch. Both ranks stop
    before step 6 with step 5's checkpoint (exit 143), and resuming on two ranks reproduces checkpoints
    6, 10 and 12 of the uninterrupted run."""
    model, data, out = two_rank_run["model"], two_rank_run["data"], tmp_path / "out"
    proc = launch_two_ranks(model, data, out, *TWO_RANK_FLAGS, faults="nan@2:r1,sigterm@eval5:r0")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 143, log[-12000:]
    assert sorted(checkpoints(out)) == [5]
    stopped = f"WARNING train: stopped by SIGTERM after saving {out / 'epoch-1-step-5'}"
    assert log.count(stopped) == 2 and "Traceback" not in log, log[-12000:]  # both ranks, cleanly
    proc = launch_two_ranks(
        model, data, out, *TWO_RANK_FLAGS, "--resume_from_checkpoint", "latest", faults=""
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert_same_as_reference(out, two_rank_run["out"], after_step=5)


def wait_for_all(processes: list[subprocess.Popen], timeout: float) -> list[str]:
    """Every process's output once all have ended; past ``timeout``, all are killed (a rank left waiting on
    one that died would otherwise hold the suite) and their outputs so far are returned, each process's own."""
    deadline = time.monotonic() + timeout
    logs = []
    for process in processes:
        try:
            logs.append(process.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for other in processes:  # each leads its own session: the launcher and its ranks
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            logs.append(process.communicate()[0] + f"\n[killed after {timeout:.0f} s]")
    return logs


@pytest.mark.slow
def test_two_nodes_torchrun_zero3_partitioned_at_load(tiny_llama_dir, tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "out"
    write_overfit_data(data_dir)
    port = str(_free_port())
    env = {**os.environ, **CPU_RANKS_ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    flags = train_command(
        tiny_llama_dir, data_dir, out,
        "--ds_config", "ds_configs/zero3.json", "--gradient_accumulation_steps", "1",
        "--max_steps", "6", "--save_model_step", "3", "--precision", "fp32", "--quantization", "none",
    )  # fmt: skip
    nodes = []
    for rank in (0, 1):
        command = [
            str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
            "--master_addr", "127.0.0.1", "--master_port", port, *flags,
        ]  # fmt: skip
        nodes.append(
            subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    logs = wait_for_all(nodes, timeout=240)
    every_log = "\n".join(f"--- node {i}:\n{text[-6000:]}" for i, text in enumerate(logs))
    assert [node.returncode for node in nodes] == [0, 0], every_log
    # Rank 0 logs what it holds once the base is loaded, before the engine exists: half of it.
    held = re.search(r"this rank holds (\d+) of its (\d+) parameters", logs[0])
    assert held, logs[0][-3000:]
    local, total = int(held[1]), int(held[2])
    assert total > 400_000 and local == pytest.approx(total / 2, rel=0.01), (local, total)

    ckpt = out / "epoch-1-step-6"
    weights = load_file(ckpt / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert all(weights[k].abs().max() > 0 for k in weights if ".lora_B." in k)  # gathered, trained values
    reported = checkpoint_state(ckpt)["eval"]
    expected, tokens = hand_perplexity(tiny_llama_dir, ckpt, data_dir / "test.jsonl", "none")
    assert reported["tokens"] == tokens
    assert reported["ppl"] == pytest.approx(expected, rel=1e-5)
    first_eval = checkpoint_state(out / "epoch-1-step-3")["eval"]["ppl"]
    assert reported["ppl"] < first_eval
    losses = [v for _, v in scalars(out)["train/loss"]]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < 0.92 * losses[0], losses  # Llama learns too
