"""Every bit of rank logic of the training code lives here.

The rest of the code asks ``is_main_process()``, ``get_rank()``,
``get_world_size()`` and reduces with ``all_reduce_sum`` / ``all_reduce_max``
/ ``all_reduce_min``; it never looks at environment variables or
``torch.distributed`` directly.

Launch modes handled by :func:`init_distributed`:

- ``python train.py``: no launcher. We create a one-rank process group on
  127.0.0.1 ourselves, so no MPI discovery is attempted.
- ``deepspeed train.py`` / ``deepspeed --hostfile ...``, ``torchrun
  --nproc_per_node N`` / ``torchrun --nnodes N ...``: the launcher sets
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.

The backend is the accelerator's: NCCL on CUDA, gloo on DeepSpeed's CPU
accelerator (CI runs multi-rank training that way; ``DS_ACCELERATOR=cpu`` selects it on a machine with
GPUs).
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from sft.core.errors import UserError

logger = logging.getLogger(__name__)

_DEVICE: torch.device | None = None


def _free_port() -> int:
    """Ask the OS for a free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DeviceError(UserError, RuntimeError):
    """The devices asked for cannot be used; the message names the setting and the fix."""


def check_cuda_request() -> None:
    """Refuse to fall back to the CPU silently when ``CUDA_VISIBLE_DEVICES`` asks for GPUs none of which works.

    Without a usable GPU the run would go on on the CPU, hours where minutes were expected. An unset or
    empty ``CUDA_VISIBLE_DEVICES`` (or ``-1``) asks for the CPU. The deepspeed launcher sets the variable
    itself for every rank (also on CPU-only machines, where its ids name CPU sockets), so a rank it
    started is not checked.
    """
    requested = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if requested in ("", "-1") or "CROSS_RANK" in os.environ or torch.cuda.is_available():
        return
    why = (
        f"this PyTorch ({torch.__version__}) was built without CUDA"
        if torch.version.cuda is None
        else f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: check the driver"
    )
    raise DeviceError(
        f"CUDA_VISIBLE_DEVICES={requested} asks for GPU(s), but {why}; training would fall back to the CPU. "
        "Fix the GPU set-up, or unset CUDA_VISIBLE_DEVICES (or set it empty) to train on the CPU on purpose"
    )


# Set beside the rank variables whenever init_distributed describes a one-rank world itself: every port it chose,
# in this process and in the parents whose environment it inherited (comma-separated, the newest last).
_ONE_RANK_PORTS = "SFT_ONE_RANK_WORLD_PORTS"
_KEEP_PORTS = 64


def launched_by_launcher() -> bool:
    """True when a launcher (deepspeed, torchrun) started this process and set the rank variables.

    Rank variables that :func:`init_distributed` wrote for a one-rank world, of this process or of a parent that
    passed its environment on (a test suite or a notebook that trained in-process, then started train.py), are
    not a launcher's: a launcher sets its own MASTER_PORT, and the parent's port may still be bound by its world.
    All the ports such worlds used are remembered, not only the newest: code that saves and restores the rank
    variables around a run (as tests do) can put back an older world's port.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    ours = os.environ.get(_ONE_RANK_PORTS, "").split(",")
    return not (os.environ["WORLD_SIZE"] == "1" and os.environ.get("MASTER_PORT") in ours)


def init_distributed(timeout_minutes: int = 30) -> torch.device:
    """Join (or create) the process group and return this process's device.

    Idempotent: a second call returns the device chosen by the first (after :func:`destroy`, it joins anew).

    Args:
        timeout_minutes: collective timeout; a rank that waits longer raises instead of hanging forever.

    Returns:
        ``cuda:LOCAL_RANK`` when CUDA is available (and DeepSpeed's accelerator is CUDA), else ``cpu``.
    """
    global _DEVICE
    if _DEVICE is not None and dist.is_initialized():
        return _DEVICE

    if not launched_by_launcher():
        # Single process without a launcher: describe a one-rank world so DeepSpeed does not try MPI. Its
        # rendezvous is private, so the port is always a fresh one: a MASTER_PORT inherited from a parent that
        # itself runs a one-rank world (a test suite, a notebook that called evaluate) is still bound by that
        # parent, and reusing it fails with EADDRINUSE.
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        port = str(_free_port())
        os.environ["MASTER_PORT"] = port
        used = [p for p in os.environ.get(_ONE_RANK_PORTS, "").split(",") if p]
        os.environ[_ONE_RANK_PORTS] = ",".join([*used, port][-_KEEP_PORTS:])
        os.environ["RANK"] = "0"
        os.environ["WORLD_SIZE"] = "1"
        os.environ["LOCAL_RANK"] = "0"
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")

    # DeepSpeed's ZeRO calls torch.distributed collectives that torch 2.13 deprecates, once per step: a
    # FutureWarning per step in the log that only a DeepSpeed release can fix.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        category=FutureWarning,
    )
    import deepspeed  # imported here: importing deepspeed probes the accelerator, which is slow
    from deepspeed.accelerator import get_accelerator

    local_rank = get_local_rank()
    # The device follows DeepSpeed's accelerator, so the two never disagree: DS_ACCELERATOR=cpu trains on CPU
    # ranks on a machine with GPUs (the test suite's multi-rank runs on a 1-GPU machine).
    if get_accelerator().device_name() == "cuda" and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "start fewer processes per node or fix CUDA_VISIBLE_DEVICES"
            )
        torch.cuda.set_device(local_rank)
        _DEVICE = torch.device("cuda", local_rank)
    else:
        _DEVICE = torch.device("cpu")

    if not dist.is_initialized():
        if _DEVICE.type == "cpu":
            skip_shared_memory_op()
        backend = get_accelerator().communication_backend_name()
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(minutes=timeout_minutes)
        )
    logger.debug("rank %d/%d on %s", get_rank(), get_world_size(), _DEVICE)
    return _DEVICE


def skip_shared_memory_op() -> None:
    """Keep DeepSpeed from building and starting its shared-memory all-reduce op on CPU ranks.

    DeepSpeed's CPU backend compiles that C++ op (``deepspeed_shm_comm``) with the system compiler when the process
    group starts (a minute of 2 cores on a fresh machine, before step 1), then maps shared memory between the ranks.
    It only speeds up ``inference_all_reduce``, which training never calls: ZeRO's collectives go through
    torch.distributed (gloo) either way. Skipping it also removes a failure mode: a process killed while it
    compiles leaves torch's build lock behind, and every later process waits on that lock forever. DeepSpeed
    builds the op only when its table of compatible ops says so, one module-level dict, so marking the op
    incompatible there skips it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def get_device() -> torch.device:
    """The device chosen by :func:`init_distributed` (cpu before it was called)."""
    return _DEVICE if _DEVICE is not None else torch.device("cpu")


def get_rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def get_local_rank() -> int:
    """Rank of this process on its node (selects the GPU)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def get_world_size() -> int:
    """Number of processes taking part in training (1 when not distributed)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True on global rank 0: the one rank that logs, writes files and draws the progress bar."""
    return get_rank() == 0


def barrier() -> None:
    """Wait until every rank reaches this point (no-op when not distributed)."""
    if dist.is_initialized() and get_world_size() > 1:
        dist.barrier()


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if dist.is_initialized() and get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it for chaining. No host sync on GPU."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks, in place."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum of ``tensor`` over all ranks, in place."""
    return _all_reduce(tensor, dist.ReduceOp.MIN)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from rank ``src`` to every rank (e.g. a path only rank 0 resolved)."""
    if not (dist.is_initialized() and get_world_size() > 1):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def destroy() -> None:
    """Leave the process group at the end of training so the launcher sees a clean exit.

    Through DeepSpeed, which then drops the groups it cached: a later :func:`init_distributed` in the same
    process (a second run from Python, the tests) starts clean.
    """
    if dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
