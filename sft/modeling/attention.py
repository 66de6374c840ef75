"""Attention functions of our own beside transformers' SDPA: which models can take one, and registering one.

Training (:mod:`sft.train.attention`: SDPA one packed document at a time) and decoding
(:mod:`sft.inference.cpu_decode`: decode attention in groups of rows) each swap the attention function of a model
transformers ships for a variant of its SDPA that keeps SDPA's masks. Our own Baichuan2 builds its attention
layout itself and is never switched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def attends_with_transformers_sdpa(model: Any) -> bool:
    """Whether ``model`` (for a peft model, its base) is a class transformers ships, attending with ``sdpa``: the
    models whose attention function a registered SDPA variant can replace."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__module__.startswith("transformers.") and (
        getattr(model.config, "_attn_implementation", None) == "sdpa"
    )


def register_sdpa_variant(name: str, function: Callable[..., Any]) -> None:
    """Make ``function`` transformers' attention implementation ``name``, with SDPA's masks (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
