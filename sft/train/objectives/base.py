"""What a training objective gives the loop in train.py and the evaluation in :mod:`sft.train.evaluation`.

An objective turns one collated batch into sums, never means: the loop adds them over micro-batches and
ranks and divides once, by the global count of the objective's units (learned tokens for SFT, preference
pairs for DPO), so every rank and every accumulation window weighs each unit the same.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Objective(Protocol):
    """A training objective: the loss of a batch, the metrics logged with it, and its evaluation.

    Attributes:
        name: the ``--objective`` value.
        metric_names: what :meth:`loss_sums` returns beside the loss, logged as ``train/<name>`` (each sum
            divided by the units of the logging window).
        eval_names: the metrics of :meth:`eval_result` logged to TensorBoard as ``eval/<name>``.
    """

    name: str
    metric_names: tuple[str, ...]
    eval_names: tuple[str, ...]

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """The units the loss of ``batch`` is a sum over, counted on the host tensors (no device sync)."""
        ...

    def loss_sums(
        self, model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss_sum, metric_sums)`` of one batch on ``device``: the loss summed over its units (what
        backward runs on) and the sums of :attr:`metric_names`, detached."""
        ...

    def eval_sums(
        self, model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The sums evaluation adds over batches and ranks (float64 or int64 scalars on ``device``)."""
        ...

    def eval_result(self, sums: dict[str, float]) -> dict[str, float]:
        """The evaluation's metrics from the sums over the whole test set (``loss`` among them)."""
        ...

    def describe(self, result: dict[str, float]) -> str:
        """:meth:`eval_result` as the words of the evaluation's log line."""
        ...
