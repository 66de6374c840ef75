"""A collated batch as the model's inputs: the forward's keyword arguments (sequence boundaries as
transformers' FlashAttention kwargs, the attention mask only where it matters), host-to-device copies that
do not block the host, the positions a loss is taken at, and the output-head hooks that keep only those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from sft.data.formats import IGNORE_INDEX
from sft.train.attention import DOCUMENT_SDPA


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
    if batch.get("doc_prefix") is not None:
        if attention_implementation(model) != DOCUMENT_SDPA:
            raise ValueError(
                f"this batch shares prompts between documents (doc_prefix), which only {DOCUMENT_SDPA} attention "
                f"reads, but the model attends with {attention_implementation(model)}: train without --packing"
            )
        inputs["doc_prefix"] = batch["doc_prefix"]  # a host tensor: the attention reads it on the host
    if own_layout and batch.get("cu_seq_lens") is not None:
        cu_seq_lens, max_length = to_device(batch["cu_seq_lens"], device), int(batch["max_length"])
        inputs.update(
            cu_seq_lens_q=cu_seq_lens,
            cu_seq_lens_k=cu_seq_lens,
            max_length_q=max_length,
            max_length_k=max_length,
        )
    return inputs


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
