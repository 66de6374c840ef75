"""Training metrics: the loss/throughput window between two logging steps, published to TensorBoard.

The window lives on the device: nothing is read back to the host until a logging step, so the hot loop
never waits for the GPU. Rank 0 writes the events; every rank takes part in the reductions. Steps whose
update was skipped (a non-finite loss or gradient norm) stay out of the loss and are counted in
``train/skipped_steps``. A TensorBoard write that fails (a full disk) is raised as one ``OSError`` naming
the log directory, never as a traceback from the writer's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from sft.core.distributed import all_reduce_sum, is_main_process

logger = logging.getLogger(__name__)


def _silence_writer_thread_errors() -> None:
    """Keep TensorBoard's writer thread from printing a traceback for an OSError.

    The thread stores the exception and the writer raises it again in the main thread at its next call,
    where :class:`Metrics` turns it into one message naming the directory.
    """
    previous = threading.excepthook
    if getattr(previous, "sft_quiet_writer", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        previous(args)

    hook.sft_quiet_writer = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class Metrics:
    """TensorBoard scalars (rank 0) plus the window of loss sums and token counts since the last log.

    Args:
        log_dir: TensorBoard directory.
        device: where the window's sums live.
        start_step: the step training starts from (events after it, from an interrupted run, are dropped).
        skipped_steps: updates skipped before ``start_step`` (from the checkpoint resumed).
        metric_names: the objective's metrics besides the loss, logged as ``train/<name>`` per unit.
    """

    def __init__(
        self,
        log_dir: str,
        device: torch.device,
        start_step: int,
        skipped_steps: int = 0,
        metric_names: tuple[str, ...] = (),
    ) -> None:
        self.device = device
        self.metric_names = metric_names
        self.log_dir = log_dir
        self.skipped_total = skipped_steps
        self.writer = None
        if device.type == "cuda":
            # Created once set-up is over: train/gpu_mem_gb then reports the peak of training (evaluation
            # included), not that of loading the model, which is logged here once.
            logger.info(
                "peak GPU memory while setting up: %.2f GB", torch.cuda.max_memory_allocated(device) / 2**30
            )
            torch.cuda.reset_peak_memory_stats(device)
        if is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            _silence_writer_thread_errors()
            with self._writing():
                # purge_step drops events a previous, interrupted run logged after the checkpoint we resume from.
                self.writer = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)
        self.reset()

    def _writing(self) -> _WriteGuard:
        return _WriteGuard(self.log_dir)

    def reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)  # this rank's loss sum
        # this rank's sums of the objective's other metrics
        self.metric_sums = torch.zeros(len(self.metric_names), dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(2, dtype=torch.int64, device=self.device)  # global (units, input tokens)
        self.steps = 0  # optimizer steps in the window
        self.started = time.perf_counter()

    def record_step(
        self, loss: torch.Tensor, counts: torch.Tensor, applied: bool, metric_sums: torch.Tensor | None = None
    ) -> None:
        """Add one optimizer step: its loss sum and metric sums (this rank) and the global counts of units
        (learned tokens for SFT) and input tokens.

        A skipped step adds its input tokens to the throughput but nothing to the loss, which may be inf/NaN.
        """
        if applied:
            self.loss += loss
            if metric_sums is not None:
                self.metric_sums += metric_sums
            self.counts += counts
        else:
            self.counts[1] += counts[1]
            self.skipped_total += 1
        self.steps += 1

    def pause(self) -> _Paused:
        """Keep a stretch of time (evaluation, saving) out of the tokens/s of the window."""
        return _Paused(self)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            with self._writing():
                self.writer.add_scalar(tag, value, step)

    def log(self, engine: Any, step: int, progress_bar: Any) -> None:
        """Reduce the window over ranks and publish loss, lr, grad norm, throughput (a host sync)."""
        loss_sum = all_reduce_sum(self.loss.clone()).item()
        metric_sums = all_reduce_sum(self.metric_sums.clone()).tolist() if self.metric_names else []
        learned, inputs = self.counts.tolist()
        elapsed = time.perf_counter() - self.started
        loss = loss_sum / learned if learned else None  # None: every step of the window was skipped
        lr = engine.get_lr()[0]
        grad_norm = engine.get_global_grad_norm()
        tokens_per_sec = inputs / max(elapsed, 1e-9)
        if loss is not None:
            self.scalar("train/loss", loss, step)
            for name, value in zip(self.metric_names, metric_sums):
                self.scalar(f"train/{name}", value / learned, step)
        self.scalar("train/lr", lr, step)
        if grad_norm is not None and torch.isfinite(torch.as_tensor(grad_norm)):
            self.scalar("train/grad_norm", float(grad_norm), step)
        self.scalar("train/tokens_per_sec", tokens_per_sec, step)
        self.scalar("train/skipped_steps", self.skipped_total, step)
        if self.device.type == "cuda":  # the peak since training started
            self.scalar("train/gpu_mem_gb", torch.cuda.max_memory_allocated(self.device) / 2**30, step)
        if progress_bar is not None:
            shown = f"{loss:.4f}" if loss is not None else "skipped"
            progress_bar.set_postfix(loss=shown, lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:.0f}")
        logger.debug(
            "step %d loss %s lr %.3e grad_norm %s tok/s %.0f", step, loss, lr, grad_norm, tokens_per_sec
        )
        self.reset()

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with self._writing():
                writer.flush()  # raises what the writer thread could not write
                writer.close()


class _WriteGuard:
    """Re-raise a failed TensorBoard write as one OSError that names the directory and the fix."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, OSError):
            raise OSError(
                exc.errno,
                f"cannot write TensorBoard events to {self.log_dir} ({exc.strerror or exc}): free space on that "
                "disk or pass another --output_dir / --tensorboard_dir",
            ) from exc


class _Paused:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self.metrics.started += time.perf_counter() - self.start
