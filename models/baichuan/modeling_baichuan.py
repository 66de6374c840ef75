"""Baichuan2 decoder (7B: RoPE, 13B: ALiBi) in transformers 5.x conventions.

Written from the published architecture (Baichuan 2 technical report, arXiv:2309.10305): a pre-norm decoder with
RMSNorm, SwiGLU MLP, fused query/key/value projection (`W_pack`), rotary position embeddings (7B) or ALiBi biases
(13B), and a "NormHead" output layer whose weight rows are L2-normalised before the projection.

Read bottom-up: helpers (norm, positions, MLP), attention kernels (eager, SDPA, FlashAttention-2), the attention
module, the decoder layer, the model, the causal-LM head.

Attention layout, shared by every kernel and built once per forward (`build_attention_layout`):
- *Padded batches*: `attention_mask` (B, past + T), 1 = real token. Left padding for generation, right for training.
- *Packed rows*: `attention_mask=None` and `position_ids` restarting at each document start. A new document starts
  wherever a position is not the previous one plus one; attention never crosses a document boundary.
- ALiBi biases are `slope * (key_position - query_position)` with positions from `position_ids` (or, for cached keys,
  from the padding mask the way `generate()` numbers them), so left padding and packing get the right distances.
- *Boundaries from the host*: a training forward may pass transformers' FlashAttention arguments `cu_seq_lens_q` and
  `max_length_q` (the sequences of the flattened batch, as sft's collators compute them on the CPU). Document
  boundaries and FlashAttention's varlen arguments then come from them, and building the layout reads nothing back
  from the device (no host sync); a padding mask passed with them is taken to hold padding.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple, logging

from sft.train.objectives.sft import token_loss_sums

from .configuration_baichuan import BaichuanConfig

logger = logging.get_logger(__name__)

SUPPORTED_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


# ----------------------------------------------------------------------------------------------------------------------
# Small building blocks
# ----------------------------------------------------------------------------------------------------------------------


class BaichuanRMSNorm(nn.Module):
    """Root-mean-square layer norm (no mean subtraction, no bias)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        # Upcast: the mean of squares in bf16 loses too many bits.
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables (B', T, head_dim) for the rotate-half RoPE convention.

    Computed in every forward from `position_ids` (a few thousand multiplications), so nothing is precomputed in
    `__init__` that would be left on the meta device or partitioned by ZeRO-3.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = position_ids.to(device=device, dtype=torch.float32)[..., None] * inv_freq  # (B', T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B', T, head_dim)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k (B, nh, T, hs) by the fp32 tables (B', T, hs); the rotation runs in fp32, then casts back."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B', 1, T, hs), broadcast over heads
    q_embed = q.float() * cos + rotate_half(q.float()) * sin
    k_embed = k.float() * cos + rotate_half(k.float()) * sin
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes (Press et al., 2022).

    For n a power of two: the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise the slopes of the closest
    smaller power of two, followed by every other slope of the next power of two (the interleaved extra slopes), e.g.
    40 heads = 32 slopes 2^(-8i/32) + the first 8 odd-indexed slopes 2^(-8(2j+1)/64).
    """

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two_slopes(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two_slopes(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document index of every token of packed rows (B', T), or None when every row holds one document.

    A document starts at the first token of a row and wherever a position is not the previous one plus one (the
    collator restarts `position_ids` at 0 for each packed document).
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):  # host sync, once per forward: lets the unpacked case keep a cheap mask
        return None
    return starts.cumsum(-1)


def document_ids_from_boundaries(
    cu_seq_lens: torch.Tensor, batch_size: int, length: int
) -> torch.Tensor | None:
    """`document_ids` from the sequence starts over the flattened (B * T) batch, with no host sync.

    Returns None when there is one sequence per row, which the number of boundaries (a shape) tells.
    """
    if cu_seq_lens.numel() - 1 == batch_size:
        return None
    starts = torch.zeros(batch_size * length, dtype=torch.long, device=cu_seq_lens.device)
    starts.scatter_(0, cu_seq_lens[:-1].long(), 1)  # a scatter with a device index: queued, never read back
    # Ids grow across rows; only equality within a row matters.
    return starts.cumsum(0).view(batch_size, length)


class BaichuanMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class BaichuanNormHead(nn.Module):
    """Output layer with L2-normalised weight rows: logits = h @ normalize(W, dim=-1).T.

    The normalisation is functional and runs in every forward: the stored parameter is never overwritten, so training,
    eval, saving and resuming all see the raw weight. It is deliberately *not* an `nn.Linear`: bitsandbytes
    quantisation (transformers' `replace_with_bnb_linear`) only replaces modules whose type is exactly `nn.Linear`, so
    a 4-bit base keeps this head as a plain parameter (it is also the model's output embedding, which transformers
    skips by default). Under ZeRO-3 the weight is only read inside this module's own forward, where DeepSpeed's
    module hooks have gathered it.

    While the head is frozen (LoRA/QLoRA never train it) the normalised copy is cached instead of being recomputed
    in every forward (125,696 x 4,096 rows: a full read and write of the weight, and a second weight-sized tensor
    allocated each step). The cache is a plain attribute, never in the state dict, keyed on everything that can
    change the result: the parameter object, its storage (`data_ptr`), its in-place version counter (optimizer
    steps, `load_state_dict`, `copy_`), dtype, device and the output dtype. It is not used while the weight
    requires grad (it is trained), under ZeRO-3 (the gathered weight is released after each forward: a cache
    would keep a full copy on every rank), or with `cache_normalized_weight = False`.
    """

    cache_normalized_weight: bool = True

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.in_features = hidden_size
        self.out_features = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self._normalized: tuple[tuple, torch.Tensor] | None = None  # (key, normalised weight)

    def linear_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight of the equivalent linear layer, in `dtype`: `logits = F.linear(h, head.linear_weight(h.dtype))`.

        A fused linear + cross-entropy loss (`sft.train.objectives.sft`) calls this to compute the loss without the logits.
        """
        weight = self.weight
        if (
            not self.cache_normalized_weight
            or weight.requires_grad
            or hasattr(weight, "ds_id")  # a ZeRO-3 partitioned parameter
            or weight.device.type == "meta"
        ):
            self._normalized = None
            return F.normalize(weight, dim=-1).to(dtype)
        key = (id(weight), weight.data_ptr(), weight._version, weight.dtype, weight.device, dtype)
        if self._normalized is None or self._normalized[0] != key:
            # Built outside inference mode: a cache made under `torch.inference_mode()` could not be saved for
            # the backward pass of a later training forward.
            with torch.inference_mode(False), torch.no_grad():
                self._normalized = (key, F.normalize(weight, dim=-1).to(dtype))
        return self._normalized[1]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.linear_weight(hidden_states.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ----------------------------------------------------------------------------------------------------------------------
# Attention layout: masks / biases / varlen metadata, built once per forward and shared by all layers
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class AttentionLayout:
    """What every attention layer needs to know about which keys a query may see.

    For "sdpa"/"eager": `mask` is None (plain causal attention, `is_causal` tells SDPA whether to apply it), a bool
    tensor (B|1, 1, T, K) with True = attend (RoPE), or an additive float tensor (B|1, nh, T, K) holding the ALiBi
    bias and the masked positions (ALiBi).
    For "flash_attention_2": the unpadded token indices (None: every token) and cumulative sequence lengths of
    `flash_attn_varlen_func`.
    """

    implementation: str
    kv_length: int
    mask: torch.Tensor | None = None
    is_causal: bool = False
    query_indices: torch.Tensor | None = None
    key_indices: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    alibi_slopes: torch.Tensor | None = None


def build_attention_layout(
    config: BaichuanConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    past_length: int,
    cu_seq_lens: torch.Tensor | None = None,
    max_length: int | None = None,
) -> AttentionLayout:
    """Translate padding mask, packing and cache length into the layout of `config._attn_implementation`.

    `cu_seq_lens` / `max_length` (int32 sequence starts over the flattened batch followed by B * T, and the longest
    sequence, on the model's device) are the host-built boundaries of a forward without cache: with them no device
    value is read back here. Without them the boundaries are found from `position_ids`, and a padding mask of ones
    only is dropped (two host syncs).
    """
    implementation = config._attn_implementation or "sdpa"
    if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"BaichuanModel supports attn_implementation in {SUPPORTED_ATTN_IMPLEMENTATIONS}, got "
            f"{implementation!r}. Pass attn_implementation='sdpa' to from_pretrained()."
        )
    batch_size, q_length = inputs_embeds.shape[:2]
    kv_length = past_length + q_length
    device = inputs_embeds.device
    host_boundaries = cu_seq_lens is not None and past_length == 0
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_length:
            raise ValueError(
                f"attention_mask must be 2-D (batch, past + current tokens) = ({batch_size}, {kv_length}), got shape "
                f"{tuple(attention_mask.shape)}. Pass the padding mask (1 = real token), not a 4-D mask."
            )
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        # No padding at all: drop the mask, keeps SDPA on its fastest path (host-built boundaries come without one).
        if not host_boundaries and bool(attention_mask.all()):
            attention_mask = None
    # Packed documents only exist in a prefill/training forward (no cached keys).
    if past_length > 0:
        documents = None
    elif host_boundaries:
        documents = document_ids_from_boundaries(cu_seq_lens, batch_size, q_length)
    else:
        documents = document_ids(position_ids)
    alibi = config.position_embedding_type == "alibi"

    if implementation == "flash_attention_2":
        if host_boundaries and attention_mask is None:
            # Every token takes part and the caller's boundaries are the varlen sequences: nothing to compute here.
            slopes = _flash_alibi_slopes(config, device)
            return AttentionLayout(
                implementation,
                kv_length,
                cu_seqlens_q=cu_seq_lens,
                cu_seqlens_k=cu_seq_lens,
                max_seqlen_q=max_length,
                max_seqlen_k=max_length,
                alibi_slopes=slopes,
            )
        return _flash_layout(
            config, batch_size, q_length, past_length, attention_mask, position_ids, documents
        )

    # RoPE without padding or packing needs no mask: SDPA's is_causal (prefill) or nothing (one-token decode).
    plain_causal = attention_mask is None and documents is None
    if not alibi and plain_causal and (past_length == 0 or q_length == 1) and implementation == "sdpa":
        return AttentionLayout(
            implementation, kv_length, mask=None, is_causal=past_length == 0 and q_length > 1
        )

    query_index = torch.arange(past_length, kv_length, device=device)
    key_index = torch.arange(kv_length, device=device)
    allowed = (key_index[None, :] <= query_index[:, None])[None]  # (1, T, K) causal
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :]  # (B, T, K)
    if documents is not None:
        allowed = allowed & (documents[:, :, None] == documents[:, None, :])  # (B', T, T) block-diagonal
    # A left-padding query sees no real key; letting it see itself keeps softmax finite (its output is never used).
    allowed = allowed | (key_index[None, :] == query_index[:, None])[None]

    if not alibi:
        return AttentionLayout(implementation, kv_length, mask=allowed[:, None])  # (B|1, 1, T, K)

    # Key positions: in a prefill the keys are the queries; cached keys are numbered the way generate() numbers
    # position_ids (count of real tokens before them), which keeps ALiBi distances right under left padding.
    if past_length == 0:
        key_positions = position_ids.to(device)
    elif attention_mask is not None:
        key_positions = attention_mask.long().cumsum(-1) - 1
    else:
        key_positions = key_index[None, :]
    query_positions = key_positions[:, -q_length:]
    # Relative distance (<= 0 for visible keys): near the diagonal the bias stays small, so it survives a cast to bf16
    # (a bias of slope * absolute_key_position would not).
    distance = (key_positions[:, None, :] - query_positions[:, :, None]).float()  # (B', T, K)
    rows = max(allowed.shape[0], distance.shape[0])
    # SDPA wants the bias in the query dtype; the eager reference keeps it in fp32.
    dtype = torch.float32 if implementation == "eager" else inputs_embeds.dtype
    bias = torch.empty((rows, config.num_attention_heads, q_length, kv_length), dtype=dtype, device=device)
    # One head at a time: the fp32 temporary stays (B', T, K) instead of (B', nh, T, K).
    for head, slope in enumerate(alibi_slopes(config.num_attention_heads)):
        bias[:, head] = (distance * slope).masked_fill(~allowed, torch.finfo(dtype).min)
    return AttentionLayout(implementation, kv_length, mask=bias)


def _flash_alibi_slopes(config: BaichuanConfig, device: torch.device) -> torch.Tensor | None:
    """fp32 ALiBi slopes for `flash_attn_varlen_func` (None for RoPE), the values of `alibi_slopes`.

    Computed on the device from `arange`: a tensor made from a Python list would be a copy from pageable host memory,
    which waits for the GPU to catch up.
    """
    if config.position_embedding_type != "alibi":
        return None
    num_heads = config.num_attention_heads
    closest = 2 ** math.floor(math.log2(num_heads))
    # log2 of the slopes: -8 i / closest for i = 1..closest, then the odd multiples of -8 / (2 closest).
    exponents = torch.arange(1, closest + 1, dtype=torch.float32, device=device) * (-8.0 / closest)
    if closest < num_heads:
        odd = torch.arange(1, 2 * (num_heads - closest), 2, dtype=torch.float32, device=device)
        exponents = torch.cat([exponents, odd * (-8.0 / (2 * closest))])
    return torch.exp2(exponents)


def _flash_layout(
    config: BaichuanConfig,
    batch_size: int,
    q_length: int,
    past_length: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    documents: torch.Tensor | None,
) -> AttentionLayout:
    """Unpadded indices + cu_seqlens for `flash_attn_varlen_func` (padding removed, packed documents split)."""
    device = position_ids.device
    kv_length = past_length + q_length
    slopes = _flash_alibi_slopes(config, device)

    def cumulative(lengths: torch.Tensor) -> torch.Tensor:
        return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))

    if past_length == 0:
        valid = (
            attention_mask
            if attention_mask is not None
            else torch.ones(batch_size, q_length, dtype=torch.bool, device=device)
        )
        if documents is None:
            documents = torch.zeros(1, q_length, dtype=torch.long, device=device)
        # A segment id unique across rows: (row, document); padding tokens are dropped below.
        segments = documents.expand(batch_size, -1) + torch.arange(batch_size, device=device)[:, None] * (
            q_length + 1
        )
        indices = valid.flatten().nonzero().squeeze(-1)
        _, lengths = torch.unique_consecutive(segments.flatten()[indices], return_counts=True)
        cu_seqlens = cumulative(lengths)
        max_seqlen = int(lengths.max())
        return AttentionLayout(
            "flash_attention_2",
            kv_length,
            query_indices=indices,
            key_indices=indices,
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
            alibi_slopes=slopes,
        )

    # Decoding with a cache: one sequence per row; queries are the last q_length tokens of each row's keys.
    key_valid = (
        attention_mask
        if attention_mask is not None
        else torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    )
    query_valid = key_valid[:, -q_length:]
    q_lengths, k_lengths = query_valid.sum(-1), key_valid.sum(-1)
    return AttentionLayout(
        "flash_attention_2",
        kv_length,
        query_indices=query_valid.flatten().nonzero().squeeze(-1),
        key_indices=key_valid.flatten().nonzero().squeeze(-1),
        cu_seqlens_q=cumulative(q_lengths),
        cu_seqlens_k=cumulative(k_lengths),
        max_seqlen_q=int(q_lengths.max()),
        max_seqlen_k=int(k_lengths.max()),
        alibi_slopes=slopes,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Attention kernels: (B, nh, T, hs) query, (B, nh, K, hs) key/value -> (B, T, nh, hs)
# ----------------------------------------------------------------------------------------------------------------------


def eager_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: AttentionLayout, scaling: float
) -> torch.Tensor:
    """Explicit softmax(q k^T * scale + bias) v, with scores and softmax in fp32."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # (B, nh, T, K)
    mask = layout.mask
    if mask is None:
        q_length, k_length = scores.shape[-2:]
        mask = torch.ones(q_length, k_length, dtype=torch.bool, device=scores.device).tril(
            k_length - q_length
        )
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2)


def sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: AttentionLayout, scaling: float
) -> torch.Tensor:
    """`torch.nn.functional.scaled_dot_product_attention` with the layout's bool mask or additive ALiBi bias."""
    mask = layout.mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)  # e.g. fp32 LoRA activations over bf16 embeddings
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=layout.is_causal and mask is None, scale=scaling
    )
    return output.transpose(1, 2)


def _import_flash_attn_varlen_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the `flash_attn` package (a CUDA build): "
            "`pip install flash-attn --no-build-isolation`, or load the model with attn_implementation='sdpa'."
        ) from err
    return flash_attn_varlen_func


def flash_attention_2(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: AttentionLayout, scaling: float
) -> torch.Tensor:
    """FlashAttention-2 over unpadded tokens (`flash_attn_varlen_func`); ALiBi through its `alibi_slopes`."""
    flash_attn_varlen_func = _import_flash_attn_varlen_func()
    batch_size, num_heads, q_length, head_dim = query.shape
    k_length = key.shape[2]
    input_dtype = query.dtype
    if input_dtype not in (torch.float16, torch.bfloat16):
        logger.warning_once(
            f"FlashAttention-2 runs in fp16/bf16 only: casting {input_dtype} attention inputs to bf16."
        )
        query, key, value = (t.to(torch.bfloat16) for t in (query, key, value))

    def unpad(states: torch.Tensor, length: int, indices: torch.Tensor | None) -> torch.Tensor:
        # (B, nh, L, hs) -> (B * L, nh, hs) -> the real tokens only (all of them without indices)
        flat = states.transpose(1, 2).reshape(batch_size * length, num_heads, head_dim)
        return flat if indices is None else flat[indices]

    output = flash_attn_varlen_func(
        unpad(query, q_length, layout.query_indices),
        unpad(key, k_length, layout.key_indices),
        unpad(value, k_length, layout.key_indices),
        cu_seqlens_q=layout.cu_seqlens_q,
        cu_seqlens_k=layout.cu_seqlens_k,
        max_seqlen_q=layout.max_seqlen_q,
        max_seqlen_k=layout.max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=scaling,
        causal=True,  # bottom-right aligned: queries are the last tokens of their sequence's keys
        alibi_slopes=layout.alibi_slopes,
    )
    if layout.query_indices is not None:
        padded = output.new_zeros(batch_size * q_length, num_heads, head_dim)
        padded[layout.query_indices] = output
        output = padded
    return output.view(batch_size, q_length, num_heads, head_dim).to(input_dtype)


ATTENTION_KERNELS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash_attention_2": flash_attention_2}


class BaichuanAttention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection `W_pack` (rows: q, then k, then v)."""

    # The RoPE rotation; `apply_liger_kernel` swaps in Liger's Triton kernel on the instance.
    rotary_fn = staticmethod(apply_rotary_pos_emb)

    def __init__(self, config: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: AttentionLayout,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        batch_size, q_length, _ = hidden_states.shape
        qkv = self.W_pack(hidden_states).view(batch_size, q_length, 3, self.num_heads, self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x (B, nh, T, hs)

        if position_embeddings is not None:  # RoPE; ALiBi lives in the layout's bias
            query, key = self.rotary_fn(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
            if key.shape[2] != layout.kv_length:
                raise ValueError(
                    f"Cache returned {key.shape[2]} keys where {layout.kv_length} were expected: BaichuanModel "
                    "supports DynamicCache (the default); static or sliding caches are not supported."
                )

        output = ATTENTION_KERNELS[layout.implementation](
            query, key, value, layout, self.scaling
        )  # (B, T, nh, hs)
        return self.o_proj(output.reshape(batch_size, q_length, self.hidden_size))


class BaichuanLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BaichuanAttention(config, layer_idx)
        self.mlp = BaichuanMLP(config)
        self.input_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: AttentionLayout,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        # `hidden_states` is the only positional argument: reentrant gradient checkpointing needs it positional.
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), layout, position_embeddings, past_key_values
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def _liger_rms_norm_forward(self: BaichuanRMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    """BaichuanRMSNorm through Liger's kernel ("llama" casting: fp32 statistics, as ours)."""
    from liger_kernel.transformers.functional import liger_rms_norm

    return liger_rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _liger_swiglu_forward(self: BaichuanMLP, x: torch.Tensor) -> torch.Tensor:
    """BaichuanMLP with silu(gate) * up fused by Liger's kernel."""
    from liger_kernel.transformers.functional import liger_swiglu

    return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))


class BaichuanPreTrainedModel(PreTrainedModel):
    """Integration attributes shared by the Baichuan2 models (loading, device maps, attention, checkpointing)."""

    config_class = BaichuanConfig
    config: BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["BaichuanLayer"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = False
    # Buffers that some published checkpoints serialised; this implementation recomputes them in forward.
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [
        r"rotary_emb\.inv_freq",
        r"alibi_mask",
        r"future_mask",
    ]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, BaichuanNormHead)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            # A slice loses the "already loaded" flag that transformers' init functions check, so guard it here.
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, BaichuanRMSNorm):
            init.ones_(module.weight)

    def apply_liger_kernel(
        self, *, rope: bool = True, rms_norm: bool = True, swiglu: bool = True
    ) -> list[str]:
        """Swap Liger Kernel's Triton RMSNorm, SwiGLU and RoPE into this model's modules (CUDA only).

        What `liger_kernel.transformers.apply_liger_kernel_to_llama(model=...)` does for a Llama instance: each
        module's `forward` is replaced on the instance, so the weights, the state dict and peft/LoRA layers
        inside (`gate_proj`, `up_proj`, ...) stay as they are. Liger's fused linear cross-entropy is applied by
        the training loss (`sft.train.objectives.sft.batch_loss_sums(head_loss="liger")`). Returns the kernels swapped in.
        """
        if swiglu and self.config.hidden_act not in ("silu", "swish"):
            raise ValueError(
                f"Liger's SwiGLU needs hidden_act silu, this model has {self.config.hidden_act!r}"
            )
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        for module in self.modules():
            if rms_norm and isinstance(module, BaichuanRMSNorm):
                module.forward = types.MethodType(_liger_rms_norm_forward, module)
            elif swiglu and isinstance(module, BaichuanMLP):
                module.forward = types.MethodType(_liger_swiglu_forward, module)
            elif (
                rope
                and isinstance(module, BaichuanAttention)
                and self.config.position_embedding_type == "rope"
            ):
                module.rotary_fn = liger_rotary_pos_emb  # same (q, k, cos, sin) call; rotates in fp32 as ours
        applied = [("rms_norm", rms_norm), ("swiglu", swiglu)]
        applied.append(("rope", rope and self.config.position_embedding_type == "rope"))
        return [name for name, on in applied if on]


class BaichuanModel(BaichuanPreTrainedModel):
    """The decoder stack: embeddings, `num_hidden_layers` x BaichuanLayer, final RMSNorm."""

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([BaichuanLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Run the decoder. `cu_seq_lens_q` / `max_length_q` (transformers' FlashAttention kwargs) give the host-built
        sequence boundaries of a forward without cache (see `build_attention_layout`); other keyword arguments passed
        by `generate()`/Trainer (e.g. `output_attentions=False`) are accepted and ignored."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if kwargs.get("output_attentions"):
            raise ValueError("BaichuanModel does not return attention weights (output_attentions=True).")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the recomputed forward would append to the cache a second time
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        q_length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + q_length, device=inputs_embeds.device)[
                None
            ]
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]

        layout = build_attention_layout(
            self.config,
            inputs_embeds,
            attention_mask,
            position_ids,
            past_length,
            cu_seq_lens=kwargs.get("cu_seq_lens_q"),
            max_length=kwargs.get("max_length_q"),
        )
        position_embeddings = None
        if self.config.position_embedding_type == "rope":
            position_embeddings = rope_cos_sin(
                position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.device
            )

        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        all_hidden_states = () if output_hidden_states else None
        hidden_states = inputs_embeds
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                layout=layout,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                use_cache=use_cache,
            )
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
        )


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    z_loss_weight: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over learned tokens, plus `z_loss_weight * mean(logsumexp(logits)^2)`.

    `labels` are the unshifted input labels (-100 = no loss); the logit at position t predicts `labels[t + 1]`.
    Computed by the project's one loss implementation (`sft.train.objectives.sft`): fp32 chunks recomputed in backward, so
    neither pass holds a (B, T, V) fp32 tensor.
    """
    total, n_tokens = token_loss_sums(logits, labels, z_loss_weight=z_loss_weight)
    return total / (num_items_in_batch if num_items_in_batch is not None else n_tokens.clamp_min(1))


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    """Baichuan2 decoder with the NormHead language-model head (`lm_head.weight`)."""

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = BaichuanNormHead(config.hidden_size, config.vocab_size)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and, with `labels`, the shifted CE loss + optional z-loss) for `input_ids`.

        `logits_to_keep`: an int keeps the last N positions (0 = all), a 1-D LongTensor keeps those sequence positions.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError(
                    f"labels cover {labels.shape[1]} positions but logits_to_keep={logits_to_keep!r} kept "
                    f"{logits.shape[1]}: pass logits_to_keep=0 when computing the loss."
                )
            loss = causal_lm_loss(logits, labels, self.config.z_loss_weight, num_items_in_batch)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


__all__ = [
    "BaichuanForCausalLM",
    "BaichuanModel",
    "BaichuanNormHead",
    "BaichuanPreTrainedModel",
    "alibi_slopes",
    "causal_lm_loss",
]
