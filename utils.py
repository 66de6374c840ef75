"""Small helpers shared by every script: logging set-up, seeding, local-path checks.

Anything larger (data, checkpoints, evaluation, rank logic) has its own module under `sft/`.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Configure the root logger once per process.

    Only rank 0 logs at `level`; other ranks log warnings and errors only, prefixed with their rank, so a
    multi-rank run prints one copy of the progress messages but never hides a failure.
    """
    fmt = LOG_FORMAT if rank == 0 else f"[rank{rank}] {LOG_FORMAT}"
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=fmt,
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # These libraries are chatty at INFO; their warnings still come through.
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # On CPU, bitsandbytes tries to fetch an optional kernel package from a hub at every load and warns when it
    # cannot; its built-in CPU path is used instead, so the warning says nothing the user can act on here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def require_local_dir(path: str | os.PathLike | None, flag: str) -> Path:
    """Return `path` as a Path if it is an existing local directory, else raise a one-line error.

    Nothing in this project downloads from a model hub: a hub id such as ``baichuan-inc/Baichuan2-7B-Chat`` must be
    downloaded by the user first and passed as a local directory.
    """
    if path is None or str(path) == "":
        raise ValueError(f"{flag} is required: pass a local model directory")
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(
            f"{flag}={path} is a file, not a directory: pass the model directory that contains it"
        )
    looks_like_hub_id = str(path).count("/") == 1 and not str(path).startswith((".", "/", "~"))
    if looks_like_hub_id:
        raise ValueError(
            f"{flag}={path} looks like a hub id, but nothing is downloaded here: download the model first "
            f"and pass its local directory"
        )
    raise ValueError(f"{flag}={path} does not exist: pass an existing local directory")
