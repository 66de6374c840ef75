"""Evaluation over all ranks: an objective's sums, reduced over ranks before any division.

Each rank sums its shard (for SFT, the NLL and the learned tokens); the sums are reduced over ranks
*before* dividing and exponentiating, so one rank and N ranks report the same number for the same data
(averaging per-rank perplexities, or per-rank mean losses, would not).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from sft.core.distributed import all_reduce_max, all_reduce_min, all_reduce_sum, get_device
from sft.train.objectives.base import Objective
from sft.train.objectives.sft import SFTObjective

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataloader: Iterable[dict[str, torch.Tensor]],
    objective: Objective,
    *,
    device: torch.device | None = None,
) -> dict[str, float]:
    """The metrics of ``objective`` on the evaluation data, this rank's shard reduced over all ranks.

    Every rank must call this (it runs collectives). Ranks may hold different numbers of batches:
    ranks that run out repeat their last batch and discard the result, because under ZeRO-3 every
    forward pass gathers parameters collectively and all ranks must take part in each one.

    Args:
        model: the DeepSpeed engine or the (peft) model.
        dataloader: this rank's shard; each sample must appear on exactly one rank.
        objective: what is measured (:meth:`Objective.eval_sums`, :meth:`Objective.eval_result`).
        device: where to compute; default: the device chosen by ``sft.core.distributed.init_distributed``.
    """
    device = device or get_device()
    was_training = model.training
    model.eval()

    n_batches = len(dataloader)  # type: ignore[arg-type]
    max_batches = int(all_reduce_max(torch.tensor(n_batches, device=device)).item())
    min_batches = int(all_reduce_min(torch.tensor(n_batches, device=device)).item())
    if min_batches == 0:  # raised on every rank together, so no rank is left waiting in a collective
        raise ValueError(
            "a rank received no evaluation data: the test set has fewer batches than there are ranks; "
            "use more test data, a smaller --per_device_eval_batch_size, or fewer ranks"
        )

    totals: dict[str, torch.Tensor] = {}
    batch: dict[str, torch.Tensor] = {}
    seen = 0
    for batch in dataloader:
        for name, value in objective.eval_sums(model, batch, device).items():
            totals[name] = totals[name] + value if name in totals else value.clone()
        seen += 1
    for _ in range(max_batches - seen):  # keep this rank in step with ranks that hold more batches
        objective.eval_sums(model, batch, device)

    sums = {name: all_reduce_sum(value).item() for name, value in sorted(totals.items())}
    model.train(was_training)
    return objective.eval_result(sums)


def evaluate_perplexity(
    model: nn.Module, dataloader: Iterable[dict[str, torch.Tensor]], *, device: torch.device | None = None
) -> dict[str, float]:
    """``{"loss": mean NLL per learned token, "ppl": exp(loss), "tokens": learned tokens counted}``."""
    return evaluate(model, dataloader, SFTObjective(), device=device)
