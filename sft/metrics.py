"""Training metrics: the loss/throughput window between two logging steps, published to TensorBoard.

The window lives on the device: nothing is read back to the host until a logging step, so the hot loop
never waits for the GPU. Rank 0 writes the events; every rank takes part in the reductions.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from sft.distributed import all_reduce_sum, is_main_process

logger = logging.getLogger(__name__)


class Metrics:
    """TensorBoard scalars (rank 0) plus the window of loss sums and token counts since the last log."""

    def __init__(self, log_dir: str, device: torch.device, start_step: int) -> None:
        self.device = device
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

            # purge_step drops events a previous, interrupted run logged after the checkpoint we resume from.
            self.writer = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)
        self.reset()

    def reset(self) -> None:
        self.nll = torch.zeros((), dtype=torch.float64, device=self.device)  # this rank's NLL sum
        self.counts = torch.zeros(2, dtype=torch.int64, device=self.device)  # global (learned, input) tokens
        self.steps = 0  # optimizer steps in the window
        self.started = time.perf_counter()

    def pause(self) -> _Paused:
        """Keep a stretch of time (evaluation, saving) out of the tokens/s of the window."""
        return _Paused(self)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def log(self, engine: Any, step: int, progress_bar: Any) -> None:
        """Reduce the window over ranks and publish loss, lr, grad norm, throughput (a host sync)."""
        nll = all_reduce_sum(self.nll.clone()).item()
        learned, inputs = self.counts.tolist()
        elapsed = time.perf_counter() - self.started
        loss = nll / max(learned, 1)
        lr = engine.get_lr()[0]
        grad_norm = engine.get_global_grad_norm()
        tokens_per_sec = inputs / max(elapsed, 1e-9)
        self.scalar("train/loss", loss, step)
        self.scalar("train/lr", lr, step)
        if grad_norm is not None:
            self.scalar("train/grad_norm", float(grad_norm), step)
        self.scalar("train/tokens_per_sec", tokens_per_sec, step)
        if self.device.type == "cuda":  # the peak since training started
            self.scalar("train/gpu_mem_gb", torch.cuda.max_memory_allocated(self.device) / 2**30, step)
        if progress_bar is not None:
            progress_bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:.0f}")
        logger.debug(
            "step %d loss %.4f lr %.3e grad_norm %s tok/s %.0f", step, loss, lr, grad_norm, tokens_per_sec
        )
        self.reset()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _Paused:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self.metrics.started += time.perf_counter() - self.start
