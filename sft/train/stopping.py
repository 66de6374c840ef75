"""Stopping a run: on a signal (with a checkpoint first), or when its updates keep going non-finite.

Schedulers send SIGTERM before they preempt or time out a job, and Ctrl-C is SIGINT: either way the run
keeps its progress and ``--resume_from_checkpoint latest`` continues it exactly. The training loop reads
:attr:`GracefulStop.signum`, summed over ranks, once per optimizer step before the step's first forward
pass, so every rank stops at the same step: a signal that arrives during step N (or its evaluation and
save) stops the run with a checkpoint of step N. A second signal stops at once, unless it comes within
:data:`SAME_REQUEST_SECONDS` of the first: the deepspeed launcher passes a SIGINT/SIGTERM it receives on
to its ranks as SIGTERM, so a rank that got the original signal too sees two at once.

:class:`NonFiniteGuard` counts the optimizer steps whose update was skipped for a non-finite loss or
gradient norm (DeepSpeed skips them on every rank); ``--max_bad_steps`` of them in a row stop the run.
"""

from __future__ import annotations

import logging
import signal
import time

from sft.core.errors import UserError

logger = logging.getLogger(__name__)

SAME_REQUEST_SECONDS = 2.0


class GracefulStop:
    """While active, the first SIGTERM or SIGINT asks for a checkpoint at the end of the current step."""

    def __init__(self) -> None:
        self.signum = 0
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:
            if time.monotonic() - self._first_at < SAME_REQUEST_SECONDS:
                return  # the same stop, passed on by a launcher
            raise KeyboardInterrupt
        self.signum, self._first_at = signum, time.monotonic()
        logger.warning(
            "%s received: saving a checkpoint after this step, then stopping (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def join(self, signum: int) -> None:
        """Stop with the other ranks: one of them received ``signum`` (this one may have received none)."""
        if not self.signum:
            self.signum, self._first_at = signum, time.monotonic()


class TrainingStopped(Exception):
    """Raised after the checkpoint a GracefulStop asked for is saved; the process exits with 128 + the signal
    (the shell's convention for "ended by this signal")."""

    def __init__(self, signum: int, checkpoint: str) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after saving {checkpoint}; continue with "
            "--resume_from_checkpoint latest"
        )
        self.signum = signum
        self.exit_status = 128 + signum


class TrainingDiverged(UserError, RuntimeError):
    """Raised on every rank together when ``--max_bad_steps`` steps in a row were skipped as non-finite
    (exit status 1: the message names the steps and the last good checkpoint)."""


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss or gradient norm, and when to give up.

    The skip itself is DeepSpeed's: its ZeRO optimizers (stages 1-3; fp32, bf16 with
    ``check_grad_overflow`` on, fp16 through the loss scaler) reduce the global gradient norm over ranks
    and, when it is inf or NaN, drop the update on every rank without touching weights, optimizer state or
    the learning-rate schedule. The loop makes a non-finite loss poison its step's gradients, so that check
    catches it too. This class only counts what happened, the same way on every rank.

    Args:
        max_bad_steps: stop after this many bad steps in a row; 0 = never stop.
        precision: ``--precision``. Under fp16 a skip with finite losses is the loss scaler finding its
            scale (normal early in training): counted as skipped, not as bad.
    """

    def __init__(self, max_bad_steps: int, precision: str) -> None:
        self.max_bad_steps = max_bad_steps
        self.precision = precision
        self.in_a_row = 0
        self.first_bad_step = 0

    @property
    def exhausted(self) -> bool:
        """True once ``max_bad_steps`` bad steps came in a row (never when the limit is 0)."""
        return 0 < self.max_bad_steps <= self.in_a_row

    def record(self, step: int, applied: bool, nonfinite_loss_ranks: list[int], position: str) -> None:
        """Note the outcome of optimizer step ``step`` (1-based); log a skipped one with its data position."""
        if applied:
            self.in_a_row = 0
            return
        if self.precision == "fp16" and not nonfinite_loss_ranks:
            logger.info("step %d: fp16 gradient overflow, update skipped and loss scale lowered", step)
            return
        if self.in_a_row == 0:
            self.first_bad_step = step
        self.in_a_row += 1
        cause = (
            f"non-finite loss on rank(s) {', '.join(map(str, nonfinite_loss_ranks))}"
            if nonfinite_loss_ranks
            else "non-finite gradient norm"
        )
        limit = (
            f"--max_bad_steps {self.max_bad_steps}" if self.max_bad_steps else "--max_bad_steps 0: no limit"
        )
        logger.warning(
            "step %d (%s): %s; update skipped on every rank (%d in a row, %s)",
            step,
            position,
            cause,
            self.in_a_row,
            limit,
        )
