"""Perplexity over all ranks: exp(total NLL / total learned tokens).

Each rank sums the NLL and counts the learned tokens of its shard; the sums
are reduced over ranks *before* dividing and exponentiating, so one rank and N
ranks report the same number for the same data (averaging per-rank
perplexities, or per-rank mean losses, would not).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from sft.distributed import all_reduce_max, all_reduce_min, all_reduce_sum, get_device
from sft.loss import batch_loss_sums

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, dataloader: Iterable[dict[str, torch.Tensor]], *, device: torch.device | None = None
) -> dict[str, float]:
    """Perplexity of ``model`` on this rank's shard of the evaluation data, reduced over all ranks.

    Every rank must call this (it runs collectives). Ranks may hold different numbers of batches:
    ranks that run out repeat their last batch and discard the result, because under ZeRO-3 every
    forward pass gathers parameters collectively and all ranks must take part in each one.

    Args:
        model: the DeepSpeed engine or the (peft) model.
        dataloader: this rank's shard; each sample must appear on exactly one rank.
        device: where to compute; default: the device chosen by ``sft.distributed.init_distributed``.

    Returns:
        ``{"loss": mean NLL per learned token, "ppl": exp(loss), "tokens": learned tokens counted}``.
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

    nll_total = torch.zeros((), dtype=torch.float64, device=device)
    token_total = torch.zeros((), dtype=torch.int64, device=device)
    batch: dict[str, torch.Tensor] = {}
    seen = 0
    for batch in dataloader:
        nll_sum, n_tokens = batch_loss_sums(model, batch, device)
        nll_total += nll_sum.double()
        token_total += n_tokens
        seen += 1
    for _ in range(max_batches - seen):  # keep this rank in step with ranks that hold more batches
        batch_loss_sums(model, batch, device)

    all_reduce_sum(nll_total)
    all_reduce_sum(token_total)
    tokens = int(token_total.item())
    if tokens == 0:
        raise ValueError("the evaluation data has no learned tokens (all labels are -100): check --test_path")
    loss = nll_total.item() / tokens
    model.train(was_training)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": tokens}
