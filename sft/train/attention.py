"""SDPA over packed rows, one document at a time: no ``(T, T)`` masked attention, none across documents.

transformers' SDPA path separates the documents of a packed row with a ``(B, 1, T, T)`` block-diagonal mask. A
masked SDPA cannot use the causal kernel, so it computes every query-key pair of the row (``T**2``), and the
grouped key/value heads are copied out to every query head first. Split by the row's documents instead, each
document is a plain causal SDPA over its own tokens (``sum(len**2) / 2``): with DialogSum dialogues of ~285
tokens packed into 1,024-token rows that is about a seventh of the attention work. (transformers still builds
its mask from the position ids, once per forward; these calls do not read it.)

:func:`use_document_sdpa` switches a transformers model to it; the training loop's batches carry the document
boundaries (``cu_seq_lens_q``, see :func:`sft.train.inputs.model_inputs`). A call without boundaries (a padded batch,
generation with a cache) goes to transformers' own SDPA unchanged, so the switched model computes what the
``sdpa`` one does everywhere. A layer with a sliding window (Mistral, Gemma 3's local layers) attends within its
window inside each document: a document longer than the window gets a banded causal mask of its own length.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sft.modeling.attention import attends_with_transformers_sdpa, register_sdpa_variant

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

DOCUMENT_SDPA = "sdpa_documents"


def document_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``(B, H, T, D)`` query, ``(B, KV, T, D)`` key/value ->
    ``(B, T, H, D)`` output, computed one document at a time when ``cu_seq_lens_q`` gives the boundaries.

    ``cu_seq_lens_q`` holds the starts of every document over the flattened ``B * T`` tokens, then ``B * T``
    (row starts are document starts, so no document crosses a row). With them, ``attention_mask`` is not read:
    the boundaries and causality say everything it says about a training batch (packed rows' documents, or
    right-padded rows, whose padding no real token attends to under a causal mask). ``doc_prefix`` (one count per
    document) lets a document attend to the first tokens of the previous one as well: a preference pair's
    rejected reply, sharing the prompt its chosen reply's document computed (:mod:`sft.data.preference`).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    boundaries = kwargs.get("cu_seq_lens_q")
    batch, heads, length, dim = query.shape
    if boundaries is None or key.shape[2] != length or length == 1 or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(  # (which refuses soft-capping, as transformers' SDPA does)
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    window = kwargs.get("sliding_window")  # a query sees the `window` latest keys, itself included
    cuts = boundaries.tolist()  # a host copy; on the CPU, where this path pays off, it costs nothing
    prefixes = kwargs.get("doc_prefix")
    prefixes = prefixes.tolist() if prefixes is not None else [0] * (len(cuts) - 1)
    pieces = []
    for i, (start, end) in enumerate(itertools.pairwise(cuts)):
        if end == start:
            continue
        row, first, last = start // length, start % length, start % length + end - start
        keys, values = key[row : row + 1, :, first:last], value[row : row + 1, :, first:last]
        shared = prefixes[i]  # a branch (a rejected reply): it also sees the previous document's first tokens
        if shared:
            before = cuts[i - 1] % length
            keys = torch.cat([key[row : row + 1, :, before : before + shared], keys], dim=2)
            values = torch.cat([value[row : row + 1, :, before : before + shared], values], dim=2)
        band = None
        if shared or (window is not None and end - start > window):
            # (L, shared + L): query position - key position, over the shared prefix and the document itself
            offset = torch.arange(shared, shared + end - start, device=query.device)[:, None] - torch.arange(
                shared + end - start, device=query.device
            )
            band = (offset >= 0) & (offset < window) if window is not None else offset >= 0
        # (1, H, L, D) views of the document: 4-D, so SDPA picks its fused CPU kernel (a 3-D input goes to the
        # math path, which stores every (L, L) attention matrix for the backward pass).
        pieces.append(
            F.scaled_dot_product_attention(
                query[row : row + 1, :, first:last],
                keys,
                values,
                attn_mask=band,
                dropout_p=dropout,
                scale=scaling,
                is_causal=band is None,
                enable_gqa=key.shape[1] != heads,
            )
        )
    out = torch.cat(pieces, dim=2)  # (1, H, B*T, D): the rows one after the other
    return out.view(heads, batch, length, dim).permute(1, 2, 0, 3), None


def use_document_sdpa(model: PreTrainedModel) -> bool:
    """Switch a model that transformers ships, attending with ``sdpa``, to :func:`document_sdpa_attention`.

    Models of our own (Baichuan2 builds its packed layout itself) and other attention implementations are left
    as they are. Returns whether the model switched.
    """
    if not attends_with_transformers_sdpa(model):
        return False
    register_sdpa_variant(DOCUMENT_SDPA, document_sdpa_attention)
    model.set_attn_implementation(DOCUMENT_SDPA)
    return model.config._attn_implementation == DOCUMENT_SDPA


def shares_prompts(model_dir: str, attn_implementation: str, device: torch.device) -> bool:
    """Whether the training model will attend with :func:`document_sdpa_attention` (what reads ``doc_prefix``):
    on the CPU, a model class transformers ships that supports SDPA, attending with ``sdpa`` or ``auto``. Decided
    before the model is loaded, as :func:`use_document_sdpa` decides after; ``sft.train.inputs`` refuses a batch
    with ``doc_prefix`` for any other attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if device.type != "cpu" or attn_implementation not in ("auto", "sdpa"):
        return False
    config = AutoConfig.from_pretrained(model_dir)
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return bool(
        model_class is not None
        and model_class.__module__.startswith("transformers.")
        and getattr(model_class, "_supports_sdpa", False)
    )
