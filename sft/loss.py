"""The training objective: memory-lean token-level cross-entropy (plus a model's optional z-loss).

This is the one loss implementation of the project: training, evaluation and our Baichuan2 model's own
``forward(labels=...)`` all go through :func:`flat_loss_sums`. A new training objective goes here.

A 7B model with a 125k vocabulary turns a (4, 2048) batch into 4 GB of fp32 logits if the whole
tensor is upcast at once. Nothing here does that: logits are processed in chunks of rows, each upcast
to fp32 on its own and recomputed in the backward pass instead of saved, and the functions return
*sums* (NLL and learned-token count) so callers can reduce them exactly over micro-batches and ranks
before dividing.

Entry points:

- ``flat_loss_sums(logits, targets)``: ``(N, V)`` logits against ``(N,)`` aligned targets.
- ``token_loss_sums(logits, labels)``: ``(B, T, V)`` logits against the model input's (unshifted) labels.
- ``batch_loss_sums(model, batch, device)``: the fast path of training and evaluation. The model is
  asked for hidden states only at the positions where some row learns a token (``logits_to_keep``),
  and its output head is fed only the learned (row, position) pairs, so the head's matmul and the
  logits cover exactly the learned tokens: no prompt, padding or other-row positions.
- ``model_inputs(model, batch, device)``: a collated batch as the forward's keyword arguments, with its
  sequence boundaries as transformers' FlashAttention kwargs; ``to_device``: host-to-device copies
  that do not block the host.

Labels use :data:`IGNORE_INDEX` (-100) where nothing is learned, everywhere in the project.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# Rows per chunk: (1024, V) fp32 logits of a 125k vocabulary are 0.5 GB, which bounds the temporary
# memory while keeping the kernel launches few.
DEFAULT_CHUNK_ROWS = 1024


def _chunk_loss_sum(logits: torch.Tensor, targets: torch.Tensor, z_loss_weight: float) -> torch.Tensor:
    """NLL (+ z-loss) summed over one ``(c, V)`` chunk, computed in fp32 for an exact log-softmax."""
    logits = logits.float()
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if z_loss_weight:
        learned = (targets != IGNORE_INDEX).float()
        total = total + z_loss_weight * (torch.logsumexp(logits, dim=-1).square() * learned).sum()
    return total


def flat_loss_sums(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    z_loss_weight: float = 0.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of NLL over ``(N, V)`` logits and ``(N,)`` targets, and the count of learned targets.

    Each chunk of ``chunk_rows`` rows is upcast to fp32 on its own, and under autograd it is recomputed in
    the backward pass (activation checkpointing) instead of being saved: neither pass holds an ``(N, V)``
    fp32 tensor. With ``z_loss_weight > 0`` the sum also holds ``z_loss_weight * logsumexp(logits)**2`` of
    every learned row (Baichuan2's optional z-loss, which keeps the softmax normaliser near 1).

    Returns:
        ``(nll_sum, n_tokens)``: fp32 scalar and int64 scalar, on the logits' device (no host sync).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not align")
    targets = targets.to(logits.device)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], chunk_rows):
        chunk, chunk_targets = logits[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled() and chunk.requires_grad:
            total = total + checkpoint(
                _chunk_loss_sum, chunk, chunk_targets, z_loss_weight, use_reentrant=False
            )
        else:
            total = total + _chunk_loss_sum(chunk, chunk_targets, z_loss_weight)
    return total, (targets != IGNORE_INDEX).sum()


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` targets aligned with the logits: position ``t`` predicts ``labels[:, t + 1]`` (last: none)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss_weight: float = 0.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLL and count of learned tokens for full-length logits.

    Args:
        logits: ``(B, T, V)`` logits for every input position.
        labels: ``(B, T)`` *unshifted* labels (the model input's labels, ``-100`` = no loss).

    Returns:
        ``(nll_sum, n_tokens)`` as in :func:`flat_loss_sums`.
    """
    targets = shifted_targets(labels.to(logits.device))
    return flat_loss_sums(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        z_loss_weight=z_loss_weight,
        chunk_rows=chunk_rows,
    )


# ---------------------------------------------------------------------------------------------
# The fast path of training and evaluation
# ---------------------------------------------------------------------------------------------


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


@contextmanager
def head_only_on(head: torch.nn.Module, flat_index: torch.Tensor) -> Iterator[None]:
    """Feed the output ``head`` only the hidden states at ``flat_index`` of the flattened ``(B, K)`` grid.

    A forward pre-hook on the head module turns its ``(B, K, H)`` input into ``(N, H)``, so the model returns
    ``(N, V)`` logits. Done as a hook because transformers' ``logits_to_keep`` only selects sequence
    positions shared by all rows; the hook works for any causal LM whose forward ends in its output
    embeddings (ours and transformers'), inside peft and DeepSpeed wrappers, ZeRO-3 included.
    """

    def select(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden.flatten(0, 1).index_select(0, flat_index), *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def _active_peft_config(model: torch.nn.Module):
    from peft import PeftModel

    model = unwrap_model(model)
    return model.active_peft_config if isinstance(model, PeftModel) else None


def prepended_positions(model: torch.nn.Module) -> int:
    """Positions a prompt-learning adapter prepends to the sequence (prompt/p-tuning), else 0.

    The logits of such a model start with these virtual positions, so loss positions shift by it.
    Prefix tuning adds keys/values, not positions, and LoRA adds nothing.
    """
    from peft import PeftType

    config = _active_peft_config(model)
    if config is not None and config.is_prompt_learning and config.peft_type != PeftType.PREFIX_TUNING:
        return int(config.num_virtual_tokens)
    return 0


def uses_position_ids(model: torch.nn.Module) -> bool:
    """Whether ``position_ids`` may be passed to the model (peft prompt-learning models ignore them)."""
    config = _active_peft_config(model)
    return not (config is not None and config.is_prompt_learning)


def z_loss_weight(model: torch.nn.Module) -> float:
    """The z-loss weight the model's config declares (Baichuan2's ``z_loss_weight``), in training only.

    The z-loss is the model's business: its config says whether it wants one. Evaluation (``model.eval()``)
    always measures pure NLL, so perplexities stay comparable across models.
    """
    if not model.training:
        return 0.0
    config = getattr(unwrap_model(model), "config", None)
    return float(getattr(config, "z_loss_weight", 0.0) or 0.0)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait for the device.

    On CUDA a copy from pageable memory waits for the stream to reach it (a host sync); from page-locked
    memory it is queued like a kernel. Loader batches are already pinned (``pin_memory`` on CUDA); tensors
    made on the host here get pinned first (PyTorch's caching host allocator makes that cheap).
    """
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def model_inputs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor | int]:
    """The forward's keyword arguments for a collated batch, copied to ``device``.

    Besides ``input_ids`` / ``attention_mask`` / ``position_ids``, the batch's sequence boundaries go to the model as
    transformers' FlashAttention arguments ``cu_seq_lens_q/k`` and ``max_length_q/k``: transformers' FlashAttention
    path cannot find packed documents in a batch of several rows by itself (it would let them attend to each other),
    eager and SDPA ignore them, and our Baichuan2 builds its attention layout from them without reading anything
    back from the device. An attention mask of ones only is dropped here, on the host (the same attention, and the
    models need not check it on the device). Prompt-learning adapters prepend virtual tokens, so the batch's own
    positions and boundaries do not describe what the model sees: they get ``input_ids`` and the mask only.
    """
    own_layout = uses_position_ids(model)
    inputs: dict[str, torch.Tensor | int] = {"input_ids": to_device(batch["input_ids"], device)}
    mask = batch.get("attention_mask")
    if mask is not None and not (own_layout and bool(mask.all())):  # the host's copy: no device sync
        inputs["attention_mask"] = to_device(mask, device)
    if own_layout and batch.get("position_ids") is not None:
        inputs["position_ids"] = to_device(batch["position_ids"], device)
    if own_layout and batch.get("cu_seq_lens") is not None:
        cu_seq_lens, max_length = to_device(batch["cu_seq_lens"], device), int(batch["max_length"])
        inputs.update(
            cu_seq_lens_q=cu_seq_lens,
            cu_seq_lens_k=cu_seq_lens,
            max_length_q=max_length,
            max_length_k=max_length,
        )
    return inputs


def batch_loss_sums(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one collated batch and return ``(nll_sum, n_tokens)`` on ``device``.

    The model computes hidden states only at learned positions (``logits_to_keep``), shifted by the
    virtual tokens a prompt-learning adapter prepends, and its output head only at the learned
    (row, position) pairs (:func:`head_only_on`). ``batch`` holds the data loader's CPU tensors: the
    indices and targets are found on the host and queued for the device before the forward, so this
    function never waits for the device. In training mode the sum includes the model's z-loss
    (:func:`z_loss_weight`).
    """
    labels = batch["labels"]
    positions = learned_positions(labels)  # (K,) on the host
    targets = kept_targets(labels, positions)  # (B, K)
    flat_index = (targets.flatten() != IGNORE_INDEX).nonzero().squeeze(-1)  # (N,) learned pairs, host
    inputs = model_inputs(model, batch, device)
    keep = to_device(positions + prepended_positions(model), device)
    head_index = to_device(flat_index, device)
    learned_targets = to_device(targets.flatten()[flat_index], device)  # (N,): copied while the forward runs
    head = unwrap_model(model).get_output_embeddings()
    with head_only_on(head, head_index):
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (N, V)
    return flat_loss_sums(logits, learned_targets, z_loss_weight=z_loss_weight(model))
