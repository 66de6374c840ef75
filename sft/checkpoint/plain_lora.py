"""PiSSA/OLoRA adapters saved as plain LoRA relative to the original base.

PiSSA and OLoRA start the adapter from a factorisation of each base weight W and subtract it from the base:
training sees the residual base W_res = W - s*B0@A0 (s the LoRA scaling), and an adapter trained that way is
meaningless on the original W. :func:`to_plain_lora` is peft's documented PiSSA/OLoRA-to-LoRA conversion
(``save_pretrained(path_initial_model_for_weight_conversion=...)``):
W_res + s*B@A = W + s*[B | -B0] @ [A ; A0], a plain LoRA of rank 2r relative to the *original* weights, so
checkpoints load on the original base everywhere. Unlike peft's version it keeps DoRA's magnitude vectors
(DoRA normalises W + s*B@A, which the conversion leaves unchanged) and embedding adapters.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel


# The peft model carries its initial adapter as this attribute (set by remember_initial_adapter): every
# save reaches the model through the DeepSpeed engine, so the tensors travel with it rather than through
# the signatures of the training loop.
_INITIAL_ADAPTER_ATTR = "sft_initial_adapter"
# peft tensor-name pieces of the two LoRA factors; the conversion concatenates along the rank dimension.
_A_KEYS = (".lora_A.", ".lora_embedding_A")
_B_KEYS = (".lora_B.", ".lora_embedding_B")


def _is_factor(key: str) -> bool:
    return any(part in key for part in _A_KEYS + _B_KEYS)


def remember_initial_adapter(model: PeftModel) -> int:
    """Keep a CPU copy of the freshly initialised LoRA factors on ``model``; returns the tensors kept.

    Call it right after ``get_peft_model`` (before any training step, before DeepSpeed partitions
    anything). :func:`initial_adapter` returns the copy; checkpoints use it for :func:`to_plain_lora`.
    """
    from peft import get_peft_model_state_dict

    state = {
        key: value.detach().to("cpu", copy=True)
        for key, value in get_peft_model_state_dict(model).items()
        if _is_factor(key)
    }
    setattr(model, _INITIAL_ADAPTER_ATTR, state)
    return len(state)


def initial_adapter(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The initial LoRA factors kept by :func:`remember_initial_adapter` (None: the base is unchanged)."""
    return getattr(model, _INITIAL_ADAPTER_ATTR, None)


def to_plain_lora(
    tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Convert a trained PiSSA/OLoRA adapter into a plain LoRA adapter relative to the original base.

    W_res + s*B@A = W - s*B0@A0 + s*B@A = W + s*[B | -B0] @ [A ; A0]: the factors are concatenated along
    the rank (r -> 2r) and lora_alpha is changed so that the scaling s stays the same. Other tensors
    (DoRA magnitude vectors, fully trained modules) are kept as they are.

    Args:
        tensors: the trained adapter (peft's saved names, e.g. ``...q_proj.lora_A.weight``).
        initial: the adapter at initialisation, same names (:func:`initial_adapter`).
        config: the adapter's ``adapter_config.json``.

    Returns:
        ``(tensors, config)`` of the plain LoRA adapter.
    """
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("the PiSSA/OLoRA conversion does not handle per-module rank_pattern/alpha_pattern")
    converted = dict(tensors)
    for key, value in tensors.items():
        if not _is_factor(key):
            continue
        if key not in initial:
            raise KeyError(
                f"{key}: no initial value recorded, so the adapter cannot be made relative to the base"
            )
        start = initial[key].to(value.device, value.dtype)
        if any(part in key for part in _A_KEYS):
            # lora_A (r, in) / lora_embedding_A (r, vocab): rank is dim 0.
            converted[key] = torch.cat([value, start], dim=0).contiguous()
        else:
            # lora_B (out, r) / lora_embedding_B (dim, r): rank is dim 1; -B0 subtracts the initial product.
            converted[key] = torch.cat([value, -start], dim=1).contiguous()
    new_config = dict(config)
    new_config["r"] = 2 * config["r"]
    # scaling = alpha / r (rsLoRA: alpha / sqrt(r)) must not change when r doubles.
    new_config["lora_alpha"] = config["lora_alpha"] * (math.sqrt(2) if config.get("use_rslora") else 2)
    new_config["init_lora_weights"] = True  # relative to the original weights: nothing to subtract at load
    return converted, new_config
