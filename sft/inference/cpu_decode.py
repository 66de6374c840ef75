"""A CPU decode step made cheaper without changing what it computes (our decoding loops, on a CPU).

Profiled at DialogSum's prompt lengths (SmolLM2-135M, 32 rows decoded together, 2 cores), two parts of a decode
step cost far more than their arithmetic:

* **The output head.** It multiplies the live rows by a ``(vocab, hidden)`` matrix far larger than the CPU's
  caches; at a few rows, MKL's GEMM runs at that shape at about half the speed it reaches on the layers' own
  matrices (~38 ms of a ~250 ms step at 32 rows). :func:`sliced_output_head` computes it in slices of
  :data:`SLICE_ROWS` vocabulary rows (2.4 MB at SmolLM2's width), which stay in cache while every row uses them
  (~25 ms). Each logit is the same dot product over ``hidden``: the logits are bitwise equal at every shape
  measured (SmolLM2's head at 1-32 rows, tests/test_generate.py; widths 2,048 and 4,096 too). Slices of other
  sizes can round differently (MKL picks its kernel by shape; 910 rows did), hence a fixed power of two.
* **Attention over padding.** Rows are left-padded to the longest prompt, and a masked decode step reads every
  row's keys and values at the batch's full width, padding included: about 45% of the reads at these lengths.
  :func:`grouped_decode_attention` splits the rows into groups of :data:`GROUP_ROWS` (our loops sort prompts
  longest first, so a group holds similar lengths) and each group attends over the columns from its first real
  one. The columns left out are masked in every row of the group, so it is the same attention; what changes is
  where SDPA's blocks start, so an output may differ in the last bits, as outputs already differ between batch
  shapes (:mod:`sft.inference.generate`). Used only where that shape changes anything: more than one group and
  some padding to drop.

Both apply to a model on the CPU only (a GPU's kernels are another matter) and are undone on leaving the
``with`` block. The attention applies to the models transformers ships that attend with ``sdpa`` (our Baichuan2
attends its own way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sft.modeling.attention import attends_with_transformers_sdpa, register_sdpa_variant

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Vocabulary rows per slice of the output head: a few MB at small widths, in cache while every row multiplies them.
SLICE_ROWS = 1024
# Rows per attention group: fewer groups than this many rows per group cost more in calls than they save in reads.
GROUP_ROWS = 8

GROUPED_SDPA = "sdpa_decode_groups"


def _sliced_forward(head: torch.nn.Linear):
    weights = head.weight.split(SLICE_ROWS)
    biases = head.bias.split(SLICE_ROWS) if head.bias is not None else [None] * len(weights)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(hidden, w, b) for w, b in zip(weights, biases, strict=True)], dim=-1)

    return forward


@contextlib.contextmanager
def sliced_output_head(model: PreTrainedModel) -> Iterator[None]:
    """Within the block, the model's output head (a plain ``nn.Linear`` on the CPU) computes its logits in
    vocabulary slices; any other head is left as it is."""
    head = model.get_output_embeddings()
    plain = (
        type(head) is torch.nn.Linear and head.weight.device.type == "cpu" and not hasattr(head, "_hf_hook")
    )
    if not plain or "forward" in vars(head):  # not ours to change, or a caller higher up already sliced it
        yield
        return
    head.forward = _sliced_forward(head)
    try:
        yield
    finally:
        del head.forward


def grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; a one-token step with ``decode_groups`` (see
    :func:`column_groups`) attends group by group, anything else is transformers' SDPA unchanged.

    ``(B, H, 1, D)`` query, ``(B, KV, W, D)`` keys/values, ``(B, 1, 1, W)`` mask -> ``(B, 1, H, D)``. As
    transformers does for a one-token step, the query heads sharing a key/value head are that head's queries, so
    the keys are read once per key/value head.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = kwargs.get("decode_groups")
    plain = kwargs.get("softcap") is None and kwargs.get("position_bias") is None
    if groups is None or query.shape[2] != 1 or attention_mask is None or not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)  # (B, KV, H / KV, D)
    pieces = [
        F.scaled_dot_product_attention(
            packed[start:end],
            key[start:end, :, first:],
            value[start:end, :, first:],
            attn_mask=attention_mask[start:end, ..., first:],
            dropout_p=dropout,
            scale=scaling,
        )
        for start, end, first in groups
    ]
    return torch.cat(pieces).reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def grouped_decode_attention(model: PreTrainedModel) -> Iterator[bool]:
    """Within the block, a transformers model on the CPU attending with ``sdpa`` attends with
    :func:`grouped_sdpa_attention` (restored on leaving). Yields whether it does: only then may a forward pass
    ``decode_groups``."""
    if not (attends_with_transformers_sdpa(model) and next(model.parameters()).device.type == "cpu"):
        yield False
        return
    register_sdpa_variant(GROUPED_SDPA, grouped_sdpa_attention)
    model.set_attn_implementation(GROUPED_SDPA)
    try:
        yield model.config._attn_implementation == GROUPED_SDPA
    finally:
        model.set_attn_implementation("sdpa")


def column_groups(pads: list[int], rows: int = GROUP_ROWS) -> list[tuple[int, int, int]] | None:
    """``(start row, end row, first column)`` for each group of ``rows`` consecutive batch rows, the first column
    being the group's least left padding; None where grouping would change nothing (one group, or no column
    to drop)."""
    groups = [(a, min(a + rows, len(pads)), min(pads[a : a + rows])) for a in range(0, len(pads), rows)]
    return groups if len(groups) > 1 and any(first for _, _, first in groups) else None


@contextlib.contextmanager
def faster_decoding(model: PreTrainedModel) -> Iterator[bool]:
    """:func:`sliced_output_head` and :func:`grouped_decode_attention` together; yields whether a forward may pass
    ``decode_groups``."""
    with sliced_output_head(model), grouped_decode_attention(model) as grouped:
        yield grouped
