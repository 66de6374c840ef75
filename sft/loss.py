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
- ``linear_loss_sums(hidden, weight, targets)``: the same sums straight from the output head's input
  and weight, never holding more than one chunk of logits (a fused linear + cross-entropy).
- ``batch_loss_sums(model, batch, device)``: the fast path of training and evaluation. The model is
  asked for hidden states only at the positions where some row learns a token (``logits_to_keep``),
  and its output head is fed only the learned (row, position) pairs, so the head's matmul and the
  logits cover exactly the learned tokens: no prompt, padding or other-row positions. Where the head
  is a frozen linear map, the loss is computed from its input by :func:`linear_loss_sums` (or Liger
  Kernel's Triton version), so not even the learned tokens' logits are kept for the backward pass.
- ``model_inputs(model, batch, device)``: a collated batch as the forward's keyword arguments, with its
  sequence boundaries as transformers' FlashAttention kwargs; ``to_device``: host-to-device copies
  that do not block the host.

Labels use :data:`IGNORE_INDEX` (-100) where nothing is learned, everywhere in the project.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of NLL (+ z-loss) of ``hidden @ weight.T`` against ``targets``, one chunk of rows at a time.

    The gradient with respect to ``hidden`` is computed in the forward pass, chunk by chunk, while each
    chunk's logits exist anyway (``(softmax * (1 + 2 z lse) - onehot) @ weight`` on learned rows), and kept
    as one ``(N, H)`` tensor: neither pass holds the ``(N, V)`` logits or their gradient, and nothing is
    recomputed. ``weight`` must be frozen (no gradient is computed for it).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_loss_weight, chunk_rows, needs_grad):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk_targets = targets[rows]
            learned = chunk_targets != IGNORE_INDEX
            safe_targets = chunk_targets.clamp_min(0)
            # The head's matmul in the model's dtype, as F.linear computes the logits; the loss in fp32.
            logits = F.linear(hidden[rows], weight).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1)
            nll = (lse - target_logits).masked_fill(~learned, 0.0)
            total = total + nll.sum()
            if z_loss_weight:
                total = total + z_loss_weight * lse.square().masked_fill(~learned, 0.0).sum()
            if needs_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' own buffer
                if z_loss_weight:
                    probs.mul_((1.0 + 2.0 * z_loss_weight * lse)[:, None])
                probs[torch.arange(probs.shape[0], device=probs.device), safe_targets] -= 1.0
                probs.mul_(learned[:, None])
                grad_hidden[rows] = probs.to(weight.dtype) @ weight  # (c, H)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None


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
    ``reduction="sum"`` returns the sum. ``sft.kernels.liger_problem`` says where it cannot run.
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
    back from the device. The attention mask is dropped here, on the host, where it changes nothing the loss reads
    (:func:`padding_mask_needed`: ones only, or right padding under SDPA). Prompt-learning adapters prepend virtual
    tokens, so the batch's own positions and boundaries do not describe what the model sees: they get ``input_ids``
    and the mask only.
    """
    own_layout = uses_position_ids(model)
    inputs: dict[str, torch.Tensor | int] = {"input_ids": to_device(batch["input_ids"], device)}
    if padding_mask_needed(model, batch):  # decided on the host's copy: no device sync
        inputs["attention_mask"] = to_device(batch["attention_mask"], device)
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


HEAD_LOSSES = ("fused", "liger", "logits")


def right_padded_only(attention_mask: torch.Tensor, position_ids: torch.Tensor | None) -> bool:
    """Whether every row is its real tokens followed only by padding, numbered 0, 1, 2, ... (host tensors).

    Such a batch needs no attention mask in a causal training forward: a real token only sees earlier
    positions, which are all real, and the pads behind it carry no label. (Pad positions see other pads
    then, so their outputs differ; nothing reads them.)
    """
    real = attention_mask.bool()
    if not bool((real[:, 1:] <= real[:, :-1]).all()):  # a 0 followed by a 1: left or inner padding
        return False
    return position_ids is None or bool((position_ids[:, 1:] == position_ids[:, :-1] + 1).all())


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The attention kernel the model's config names (``sdpa``, ``eager``, ``flash_attention_2``, ...)."""
    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "_attn_implementation", None)


def padding_mask_needed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Whether ``batch["attention_mask"]`` must be sent to the model; the rule is documented in docs/PERFORMANCE.md.

    Not when it is ones only (the same attention without it). Not for a right-padded batch
    (:func:`right_padded_only`) of a model computing attention with SDPA: SDPA then runs plain causal
    attention (``is_causal=True``, no mask), which its FlashAttention backend accepts, while any mask
    sends it to a slower kernel. FlashAttention-2 keeps the mask (it skips the pads with it), as do
    prompt-learning adapters (their virtual tokens are prepended to the mask).
    """
    mask = batch.get("attention_mask")
    if mask is None:
        return False
    if not uses_position_ids(model):  # prompt learning: the model extends the mask itself
        return True
    if bool(mask.all()):
        return False
    return attention_implementation(model) != "sdpa" or not right_padded_only(mask, batch.get("position_ids"))


@contextmanager
def head_inputs_only(head: torch.nn.Module, flat_index: torch.Tensor) -> Iterator[None]:
    """Make the output ``head`` return its input at ``flat_index`` of the flattened ``(B, K)`` grid: ``(N, H)``.

    The model's forward then ends without computing any logits; its ``logits`` output holds the hidden
    states of the learned tokens for :func:`linear_loss_sums`. Done by shadowing the head's ``forward``
    on the instance for the duration (module hooks still run); an instance-level ``forward`` already
    there (a patch by another library) is restored afterwards.
    """
    previous = head.__dict__.get("forward")

    def select(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden.flatten(0, 1).index_select(0, flat_index)

    head.forward = select
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def frozen_linear_head(
    model: torch.nn.Module, head: torch.nn.Module
) -> Callable[[torch.dtype], torch.Tensor] | None:
    """``dtype -> weight`` of the output head as a frozen linear map, or None where the loss needs the logits.

    A head qualifies when it is a plain ``nn.Linear`` without bias, or declares ``linear_weight(dtype)``
    (Baichuan2's NormHead), its weight is frozen (LoRA never trains it), not partitioned by ZeRO-3, and
    the model post-processes no logits (soft-capping, logit scales).
    """
    config = getattr(unwrap_model(model), "config", None)
    if any(
        getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    ):
        return None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.requires_grad or hasattr(weight, "ds_id"):
        return None
    if hasattr(head, "linear_weight"):
        return head.linear_weight
    if type(head) is torch.nn.Linear and head.bias is None:
        return lambda dtype: weight.to(dtype)
    return None


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
    if head_weight is None:
        with head_only_on(head, head_index):
            logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (N, V)
        return flat_loss_sums(logits, learned_targets, z_loss_weight=z_loss_weight(model))

    with head_inputs_only(head, head_index):
        hidden = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (N, H): no logits computed
    weight = head_weight(hidden.dtype)
    if head_loss == "liger":
        return liger_linear_loss_sums(hidden, weight, learned_targets, z_loss_weight=z_loss_weight(model))
    return linear_loss_sums(hidden, weight, learned_targets, z_loss_weight=z_loss_weight(model))
