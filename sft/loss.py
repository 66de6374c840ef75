"""Memory-lean token-level loss sums for causal-LM fine-tuning.

A 7B model with a 125k vocabulary turns a (4, 2048) batch into 4 GB of fp32
logits if the whole tensor is upcast at once. These helpers never do that:
they work on chunks of positions, upcasting one chunk at a time, and return
*sums* (NLL and learned-token count) so callers can reduce them exactly over
micro-batches and ranks before dividing.

Two entry points:

- ``token_loss_sums(logits, labels)``: the contract form. ``labels`` are the
  model input's labels (unshifted); position ``t`` of ``logits`` predicts
  ``labels[:, t + 1]``.
- ``learned_positions(labels)`` + ``kept_targets(labels, positions)`` +
  ``aligned_loss_sums(logits, targets)``: the fast path. The model is asked for
  logits only at ``positions`` (``logits_to_keep=positions``), which skips the
  output-head matmul for prompt and padding positions altogether.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Positions per chunk: (B * 1024, V) fp32 logits of a 125k vocabulary are 0.5 GB per row of the
# batch, which bounds the temporary memory while keeping the kernel launches few.
DEFAULT_CHUNK_POSITIONS = 1024


def aligned_loss_sums(
    logits: torch.Tensor, targets: torch.Tensor, *, chunk_positions: int = DEFAULT_CHUNK_POSITIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLL where ``targets`` are already aligned with ``logits``.

    Args:
        logits: ``(B, K, V)`` logits in any float dtype.
        targets: ``(B, K)`` target ids for each logit position, ``-100`` where no loss is learned.
        chunk_positions: positions upcast to fp32 at a time.

    Returns:
        ``(nll_sum, n_tokens)``: fp32 scalar sum of the NLL and int64 scalar count of learned tokens.
        Both stay on the logits' device (no host sync).
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not align")
    targets = targets.to(logits.device)
    nll_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[1], chunk_positions):
        chunk = logits[:, start : start + chunk_positions]  # (B, c, V)
        chunk_targets = targets[:, start : start + chunk_positions]  # (B, c)
        # Upcast one chunk only: bf16 log-softmax over a large vocabulary loses precision.
        nll_sum = nll_sum + F.cross_entropy(
            chunk.float().reshape(-1, chunk.shape[-1]),
            chunk_targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    n_tokens = (targets != IGNORE_INDEX).sum()
    return nll_sum, n_tokens


def token_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_positions: int = DEFAULT_CHUNK_POSITIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLL and count of learned tokens for full-length logits.

    Args:
        logits: ``(B, T, V)`` logits for every input position.
        labels: ``(B, T)`` *unshifted* labels (the model input's labels, ``-100`` = no loss).
        chunk_positions: positions upcast to fp32 at a time.

    Returns:
        ``(nll_sum, n_tokens)`` as in :func:`aligned_loss_sums`.
    """
    return aligned_loss_sums(logits[:, :-1], labels[:, 1:], chunk_positions=chunk_positions)


def learned_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions ``t`` whose next token ``labels[:, t + 1]`` is learned in at least one row.

    Passing these as ``logits_to_keep`` makes the model compute the output head only where a
    loss is taken. Returns a 1-D int64 tensor on the labels' device (never empty: position 0 is
    kept when nothing is learned, so the forward pass still has an output). Call it on the CPU
    labels the data loader yields: ``nonzero`` on a GPU tensor would be a host sync.
    """
    learned = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)  # (T-1,)
    positions = learned.nonzero().squeeze(-1)
    if positions.numel() == 0:
        positions = torch.zeros(1, dtype=torch.long, device=labels.device)
    return positions


def kept_targets(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Targets aligned with logits computed at ``positions``: ``labels[:, positions + 1]``.

    Rows that do not learn a token at a kept position get ``-100`` there, so they add nothing
    (the placeholder ``[0]`` of an all-prompt batch yields only ``-100``).
    """
    return labels[:, positions + 1]


def batch_loss_sums(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one collated batch and return ``(nll_sum, n_tokens)`` on ``device``.

    The model computes logits only at learned positions (``logits_to_keep``), shifted by the
    virtual tokens a prompt-learning adapter prepends. ``batch`` holds the data loader's CPU
    tensors: positions are found on the host, so this function never waits for the device.
    """
    from sft.modeling import prepended_positions, uses_position_ids

    labels = batch["labels"]
    positions = learned_positions(labels)  # (K,) on the host
    targets = kept_targets(labels, positions)  # (B, K)
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True)}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    if batch.get("position_ids") is not None and uses_position_ids(model):
        inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    keep = (positions + prepended_positions(model)).to(device, non_blocking=True)
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (B, K, V)
    return aligned_loss_sums(logits, targets.to(device, non_blocking=True))
