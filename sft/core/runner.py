"""How every script runs: logging set-up, seeding, and :func:`run_entry_point`, which turns how a script
ended into one log line and an exit status (:mod:`sft.core.errors`).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import numpy as np

from sft.core.errors import EXIT_INTERNAL, describe_failure
from sft.core.flags import DEBUG_FLAG

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not to the object it was at set-up: a host
    that swaps stderr and closes the old one (pytest's capture, a notebook) leaves no handler writing to a closed
    file, also for the threads that outlive it (the web demo's decode loop)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Configure the root logger once per process.

    Only rank 0 logs at ``level``; other ranks log warnings and errors only, prefixed with their rank, so a
    multi-rank run prints one copy of the progress messages but never hides a failure.
    """
    fmt = LOG_FORMAT if rank == 0 else f"[rank{rank}] {LOG_FORMAT}"
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=fmt,
        datefmt="%H:%M:%S",
        handlers=[_StderrHandler()],
        force=True,
    )
    # These libraries are chatty at INFO; their warnings still come through.
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # On CPU, bitsandbytes tries to fetch an optional kernel package from a hub at every load and warns when it
    # cannot; its built-in CPU path is used instead, so the warning says nothing the user can act on here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


# How long an idle OpenMP thread of torch's (GNU libgomp) spins before it sleeps. libgomp's default (300,000 spins)
# holds a core long after the work ends, which, with anything else running on the machine, steals the cores the
# working threads need (measured on 2 busy cores: a merge in 84 s instead of 14 s; predict.py on 8 dialogues 64 s
# instead of 30 s). Sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes every wake-up late, which costs a decode
# loop's many small steps a third of their speed on a quiet machine (predict.py on make demo's 32 dialogues: 42 s
# against 31 s). 3,000 spins kept the quiet speed and, on the busy machine, came within 15% of sleeping at once
# (docs/PERFORMANCE.md, "make demo's scoring passes").
OPENMP_SPINS = "3000"


def stage_environment() -> dict[str, str]:
    """The environment for the stages a driver runs as subprocesses (demo.py, the benchmarks): this one, with idle
    OpenMP threads spinning briefly (:data:`OPENMP_SPINS`) unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set."""
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" not in env:
        env.setdefault("GOMP_SPINCOUNT", OPENMP_SPINS)
    return env


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run is repeatable."""
    import torch  # here, not at the top: the scripts that need no torch start without it

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _save_traceback(err: BaseException, name: str) -> Path | None:
    """Write the traceback of ``err`` to a file in the temp directory; None when that fails too."""
    path = Path(tempfile.gettempdir()) / f"{name}-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.write_text("".join(traceback.format_exception(err)), encoding="utf-8")
    except OSError:
        return None
    return path


def run_entry_point(
    main: Callable[[list[str]], object],
    argv: list[str] | None = None,
    *,
    logger: logging.Logger,
    cleanup: Callable[[], None] | None = None,
    interrupt_hint: str = "",
) -> int:
    """Run a script's ``main(argv)`` and turn how it ended into an exit status.

    ``--debug`` is taken off the command line first (every script accepts it). A failure ends with one log
    line, the last on stderr, naming the file, line or flag and the fix (:func:`describe_failure`), and its
    exit status; with ``--debug`` the traceback is logged before it. An unexpected error (a bug) writes its
    traceback to a file the line names. ``--help`` (SystemExit) passes through.

    Args:
        main: the script's work; an int it returns is the exit status, anything else means 0.
        argv: the command line without the program name (default: ``sys.argv[1:]``).
        logger: the script's logger (the error line carries its name).
        cleanup: called after a failure, before returning (e.g. leave the process group).
        interrupt_hint: appended to the Ctrl-C message (how to continue).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    setup_logging(int(os.environ.get("RANK", 0)))
    try:
        result = main(args)
    except SystemExit:
        raise
    except BaseException as err:  # every way a script can end badly, Ctrl-C included: one line each
        status, message = describe_failure(err)
        if isinstance(err, KeyboardInterrupt) and interrupt_hint:
            message += f": {interrupt_hint}"
        if debug:
            logger.error("traceback (--debug):", exc_info=err)
        elif status == EXIT_INTERNAL:
            saved = _save_traceback(err, logger.name)
            if saved is None:
                logger.error("traceback:", exc_info=err)
            else:
                message += f"; the traceback is in {saved} (or rerun with --debug)"
        if cleanup is not None:
            cleanup()
        logger.log(logging.WARNING if status >= 128 else logging.ERROR, "%s", message)
        return status
    return result if isinstance(result, int) else 0
