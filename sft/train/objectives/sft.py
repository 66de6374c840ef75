"""Supervised fine-tuning: memory-lean token-level cross-entropy (plus a model's optional z-loss).

The one token-level loss of the project: training, evaluation and our Baichuan2 model's own
``forward(labels=...)`` all go through :func:`flat_loss_sums`. :class:`SFTObjective` is what the training
loop asks for (``--objective sft``, :mod:`sft.train.objectives.base`).

A 7B model with a 125k vocabulary turns a (4, 2048) batch into 4 GB of fp32 logits if the whole
tensor is upcast at once. Nothing here does that: logits are processed in chunks of rows, each upcast
to fp32 on its own and recomputed in the backward pass instead of saved, and the functions return
*sums* (NLL and learned-token count) so callers can reduce them exactly over micro-batches and ranks
before dividing.

Entry points:

- ``flat_loss_sums(logits, targets)``: ``(N, V)`` logits against ``(N,)`` aligned targets.
- ``token_loss_sums(logits, labels)``: ``(B, T, V)`` logits against the model input's (unshifted) labels.
- ``linear_loss_sums(hidden, weight, targets)``: the same sums straight from the output head's input
  and weight, never holding more than one chunk of logits (a fused linear + cross-entropy).
- ``batch_loss_sums(model, batch, device)``: the fast path of training and evaluation. The model is
  asked for hidden states only at the positions where some row learns a token (``logits_to_keep``),
  and its output head is fed only the learned (row, position) pairs, so the head's matmul and the
  logits cover exactly the learned tokens: no prompt, padding or other-row positions. Where the head
  is a frozen linear map, the loss is computed from its input by :func:`linear_loss_sums` (or Liger
  Kernel's Triton version), so not even the learned tokens' logits are kept for the backward pass.

A collated batch becomes the model's inputs in :mod:`sft.train.inputs`. Labels use
:data:`sft.data.formats.IGNORE_INDEX` (-100) where nothing is learned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sft.data.formats import IGNORE_INDEX
from sft.train.inputs import (
    frozen_linear_head,
    head_inputs_only,
    head_only_on,
    kept_targets,
    learned_positions,
    model_inputs,
    prepended_positions,
    to_device,
    unwrap_model,
)

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


def _chunk_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def flat_token_nll(
    logits: torch.Tensor, targets: torch.Tensor, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """Per-row NLL ``(N,)`` of ``(N, V)`` logits (0 where the target is -100), chunked as :func:`flat_loss_sums`."""
    targets = targets.to(logits.device)
    parts = []
    for start in range(0, logits.shape[0], chunk_rows):
        chunk, chunk_targets = logits[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled() and chunk.requires_grad:
            parts.append(checkpoint(_chunk_token_nll, chunk, chunk_targets, use_reentrant=False))
        else:
            parts.append(_chunk_token_nll(chunk, chunk_targets))
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


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


def _linear_chunk(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss_weight: float, needs_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One chunk of rows of the fused linear + cross-entropy: ``(nll (c,), lse**2 (c,) or None, d/dhidden)``.

    ``nll`` and ``lse**2`` are 0 on unlearned rows. The gradient of row i's ``nll + z * lse**2`` with respect
    to its hidden state is ``(softmax * (1 + 2 z lse) - onehot) @ weight``, computed here while the chunk's
    logits exist anyway.
    """
    learned = targets != IGNORE_INDEX
    safe_targets = targets.clamp_min(0)
    # The head's matmul in the model's dtype, as F.linear computes the logits; the loss in fp32.
    logits = F.linear(hidden, weight).float()  # (c, V)
    lse = torch.logsumexp(logits, dim=-1)  # (c,)
    target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1)
    nll = (lse - target_logits).masked_fill(~learned, 0.0)
    z_term = lse.square().masked_fill(~learned, 0.0) if z_loss_weight else None
    grad = None
    if needs_grad:
        probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' own buffer
        if z_loss_weight:
            probs.mul_((1.0 + 2.0 * z_loss_weight * lse)[:, None])
        probs[torch.arange(probs.shape[0], device=probs.device), safe_targets] -= 1.0
        probs.mul_(learned[:, None])
        grad = probs.to(weight.dtype) @ weight  # (c, H)
    return nll, z_term, grad


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of NLL (+ z-loss) of ``hidden @ weight.T`` against ``targets``, one chunk of rows at a time.

    The gradient with respect to ``hidden`` is computed in the forward pass, chunk by chunk, while each
    chunk's logits exist anyway, and kept as one ``(N, H)`` tensor: neither pass holds the ``(N, V)`` logits
    or their gradient, and nothing is recomputed. ``weight`` must be frozen (no gradient is computed for it).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_loss_weight, chunk_rows, needs_grad):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            nll, z_term, grad = _linear_chunk(hidden[rows], weight, targets[rows], z_loss_weight, needs_grad)
            total = total + nll.sum()
            if z_term is not None:
                total = total + z_loss_weight * z_term.sum()
            if needs_grad:
                grad_hidden[rows] = grad
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None


class _LinearTokenNLL(torch.autograd.Function):
    """Per-row NLL ``(N,)`` of ``hidden @ weight.T`` against ``targets``: :class:`_LinearCrossEntropy` before
    the sum (0 on unlearned rows), for objectives that weigh tokens by sequence (preference losses)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, needs_grad):
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            out[rows], _, grad = _linear_chunk(hidden[rows], weight, targets[rows], 0.0, needs_grad)
            if needs_grad:
                grad_hidden[rows] = grad
        ctx.save_for_backward(grad_hidden)
        return out

    @staticmethod
    def backward(ctx, grad_rows):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_rows.to(grad_hidden.dtype)[:, None], None, None, None, None


def linear_loss_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    z_loss_weight: float = 0.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flat_loss_sums` of the logits ``hidden @ weight.T`` without holding them (fused linear + CE).

    Args:
        hidden: ``(N, H)`` inputs of the output head (the learned tokens only).
        weight: ``(V, H)`` frozen weight of the head, in ``hidden``'s dtype.
        targets: ``(N,)`` targets, ``-100`` = none.

    Returns:
        ``(nll_sum, n_tokens)`` as :func:`flat_loss_sums` returns them for ``F.linear(hidden, weight)``.
    """
    if weight.requires_grad:
        raise ValueError("linear_loss_sums computes no weight gradient: the head weight must be frozen")
    targets = targets.to(hidden.device)
    # Decided here: inside Function.forward autograd is always off. Evaluation computes no gradient.
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    total = _LinearCrossEntropy.apply(hidden, weight, targets, float(z_loss_weight), chunk_rows, needs_grad)
    return total, (targets != IGNORE_INDEX).sum()


def liger_linear_loss_sums(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, z_loss_weight: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_loss_sums` computed by Liger Kernel's Triton fused linear cross-entropy (CUDA only).

    Liger's ``lse_square_scale`` is the same z-loss (``scale * logsumexp**2`` per learned token), and
    ``reduction="sum"`` returns the sum. ``sft.train.kernels.liger_problem`` says where it cannot run.
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    targets = targets.to(hidden.device)
    total = liger_fused_linear_cross_entropy(
        hidden,
        weight,
        targets,
        ignore_index=IGNORE_INDEX,
        lse_square_scale=float(z_loss_weight),
        reduction="sum",
    )
    return total.float(), (targets != IGNORE_INDEX).sum()


def z_loss_weight(model: torch.nn.Module) -> float:
    """The z-loss weight the model's config declares (Baichuan2's ``z_loss_weight``), in training only.

    The z-loss is the model's business: its config says whether it wants one. Evaluation (``model.eval()``)
    always measures pure NLL, so perplexities stay comparable across models.
    """
    if not model.training:
        return 0.0
    config = getattr(unwrap_model(model), "config", None)
    return float(getattr(config, "z_loss_weight", 0.0) or 0.0)


HEAD_LOSSES = ("fused", "liger", "logits")


def batch_loss_sums(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    *,
    head_loss: str = "fused",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one collated batch and return ``(nll_sum, n_tokens)`` on ``device``.

    The model computes hidden states only at learned positions (``logits_to_keep``), shifted by the
    virtual tokens a prompt-learning adapter prepends, and its output head only at the learned
    (row, position) pairs. ``batch`` holds the data loader's CPU tensors: the indices and targets are
    found on the host and queued for the device before the forward, so this function never waits for
    the device. In training mode the sum includes the model's z-loss (:func:`z_loss_weight`). A
    right-padded batch is sent without its attention mask where that is exact and faster
    (:func:`padding_mask_needed`).

    Args:
        head_loss: ``"fused"``: where the head is a frozen linear map (:func:`frozen_linear_head`), the
            loss comes from the head's input by :func:`linear_loss_sums`, without logits; ``"liger"``:
            the same with Liger Kernel's Triton fused linear cross-entropy (GPU, ``--liger``);
            ``"logits"``: the head computes the learned tokens' logits and :func:`flat_loss_sums` takes
            it from there (what ``"fused"``/``"liger"`` fall back to for other heads).
    """
    if head_loss not in HEAD_LOSSES:
        raise ValueError(f"head_loss={head_loss!r}: choose one of {', '.join(HEAD_LOSSES)}")
    out = _forward_learned(model, batch, device, head_loss)
    z = z_loss_weight(model)
    if out.weight is None:
        return flat_loss_sums(out.logits, out.targets, z_loss_weight=z)
    if head_loss == "liger":
        return liger_linear_loss_sums(out.hidden, out.weight, out.targets, z_loss_weight=z)
    return linear_loss_sums(out.hidden, out.weight, out.targets, z_loss_weight=z)


@dataclass
class LearnedOutputs:
    """What the forward of :func:`_forward_learned` gives for the learned (row, position) pairs of a batch.

    Attributes:
        positions: ``(K,)`` host positions kept (``logits_to_keep``).
        flat_index: ``(N,)`` host indices of the learned pairs in the flattened ``(B, K)`` grid.
        targets: ``(N,)`` their target ids, on the device.
        logits: ``(N, V)`` logits, where the head is not a frozen linear map (else None).
        hidden: ``(N, H)`` inputs of the head, where it is (else None).
        weight: ``(V, H)`` the head's weight in ``hidden``'s dtype, where it is (else None).
    """

    positions: torch.Tensor
    flat_index: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None


def _forward_learned(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, head_loss: str
) -> LearnedOutputs:
    """Forward ``batch`` with the head computed (or skipped, for a frozen linear head) at learned pairs only."""
    labels = batch["labels"]
    positions = learned_positions(labels)  # (K,) on the host
    targets = kept_targets(labels, positions)  # (B, K)
    flat_index = (targets.flatten() != IGNORE_INDEX).nonzero().squeeze(-1)  # (N,) learned pairs, host
    inputs = model_inputs(model, batch, device)
    keep = to_device(positions + prepended_positions(model), device)
    head_index = to_device(flat_index, device)
    learned_targets = to_device(targets.flatten()[flat_index], device)  # (N,): copied while the forward runs
    head = unwrap_model(model).get_output_embeddings()
    head_weight = frozen_linear_head(model, head) if head_loss != "logits" else None
    out = LearnedOutputs(positions=positions, flat_index=flat_index, targets=learned_targets)
    if head_weight is None:
        with head_only_on(head, head_index):
            out.logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (N, V)
        return out
    with head_inputs_only(head, head_index):
        out.hidden = model(
            **inputs, logits_to_keep=keep, use_cache=False
        ).logits  # (N, H): no logits computed
    out.weight = head_weight(out.hidden.dtype)
    return out


def learned_token_nll(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, *, head_loss: str = "fused"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward one batch and return the NLL of every learned token, ``(N,)`` on ``device``, with where they
    are: ``(nll, positions, flat_index)`` as in :class:`LearnedOutputs` (host tensors). Pure NLL, no z-loss;
    ``head_loss="liger"`` computes as ``"fused"`` (Liger's kernel returns sums only)."""
    out = _forward_learned(model, batch, device, "logits" if head_loss == "logits" else "fused")
    if out.weight is None:
        nll = flat_token_nll(out.logits, out.targets)
    else:
        needs_grad = torch.is_grad_enabled() and out.hidden.requires_grad
        nll = _LinearTokenNLL.apply(out.hidden, out.weight, out.targets, DEFAULT_CHUNK_ROWS, needs_grad)
    return nll, out.positions, out.flat_index


class SFTObjective:
    """Supervised fine-tuning: the mean next-token NLL over every learned token (``--objective sft``).

    Args:
        head_loss: how the output head's loss is computed (:func:`batch_loss_sums`).
    """

    name = "sft"
    metric_names: tuple[str, ...] = ()
    eval_names = ("loss", "ppl")

    def __init__(self, head_loss: str = "fused") -> None:
        self.head_loss = head_loss

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss_sums(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll_sum, _ = batch_loss_sums(model, batch, device, head_loss=self.head_loss)
        return nll_sum, {}

    def eval_sums(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        nll_sum, n_tokens = batch_loss_sums(model, batch, device)
        return {"nll": nll_sum.double(), "tokens": n_tokens}

    def eval_result(self, sums: dict[str, float]) -> dict[str, float]:
        """``{"loss": mean NLL per learned token, "ppl": exp(loss), "tokens": learned tokens}``."""
        tokens = int(sums["tokens"])
        if tokens == 0:
            raise ValueError(
                "the evaluation data has no learned tokens (all labels are -100): check --test_path"
            )
        loss = sums["nll"] / tokens
        return {"loss": loss, "ppl": math.exp(loss), "tokens": tokens}

    def describe(self, result: dict[str, float]) -> str:
        return f"loss {result['loss']:.4f} ppl {result['ppl']:.3f} ({result['tokens']} tokens)"
