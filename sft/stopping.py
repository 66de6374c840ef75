"""Stopping a run gracefully: the first SIGTERM or Ctrl-C saves a checkpoint before the run ends.

Schedulers send SIGTERM before they preempt or time out a job, and Ctrl-C is SIGINT: either way the run
keeps its progress and ``--resume_from_checkpoint latest`` continues it exactly. A second signal stops at
once. The training loop asks :attr:`GracefulStop.signum` once per optimizer step, reduced over ranks, so
every rank saves the same checkpoint together.
"""

from __future__ import annotations

import logging
import signal

logger = logging.getLogger(__name__)


class GracefulStop:
    """While active, the first SIGTERM or SIGINT asks for a checkpoint at the end of the current step."""

    def __init__(self) -> None:
        self.signum = 0
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
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(
            "%s received: saving a checkpoint after this step, then stopping (send it again to stop at once)",
            signal.Signals(signum).name,
        )


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
