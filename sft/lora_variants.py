"""The LoRA variants beyond plain LoRA: DoRA, rsLoRA, PiSSA/OLoRA initialisation and LoRA+.

- DoRA (``--use_dora``) and rsLoRA (``--use_rslora``) are peft ``LoraConfig`` options; peft records them
  in ``adapter_config.json`` and every loader (inference, merge) honours them from there.
- PiSSA and OLoRA (``--lora_init pissa|olora``) start the adapter from the principal components (SVD) or
  a QR factorisation of each base weight W and subtract it from the base: training sees the residual
  base W_res = W - s*B0@A0 (s the LoRA scaling). An adapter trained that way is meaningless on the
  original W. :func:`to_plain_lora` is peft's documented PiSSA/OLoRA-to-LoRA conversion
  (``save_pretrained(path_initial_model_for_weight_conversion=...)``):
  W_res + s*B@A = W + s*[B | -B0] @ [A ; A0], a plain LoRA of rank 2r relative to the *original*
  weights, so checkpoints load on the original base everywhere. Unlike peft's version it keeps DoRA's
  magnitude vectors (DoRA normalises W + s*B@A, which the conversion leaves unchanged) and embedding
  adapters.
- LoRA+ (``--loraplus_lr_ratio``): :func:`optimizer_param_groups` puts the B matrices into their own
  optimizer parameter group at learning_rate * ratio; DeepSpeed builds its optimizer from these groups
  and the LR schedule scales every group by the same factor, so the ratio holds at every step.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

LORA_INITS = ("default", "gaussian", "pissa", "olora")
# Initialisations that subtract the initial adapter from the base weights.
BASE_CHANGING_INITS = ("pissa", "olora")

# The peft model carries its initial adapter as this attribute (set by remember_initial_adapter): every
# save reaches the model through the DeepSpeed engine, so the tensors travel with it rather than through
# the signatures of the training loop.
_INITIAL_ADAPTER_ATTR = "sft_initial_adapter"
# peft tensor-name pieces of the two LoRA factors; the conversion concatenates along the rank dimension.
_A_KEYS = (".lora_A.", ".lora_embedding_A")
_B_KEYS = (".lora_B.", ".lora_embedding_B")


def peft_init_lora_weights(lora_init: str, pissa_niter: int = 0) -> bool | str:
    """``--lora_init`` (and ``--pissa_niter``) as peft's ``LoraConfig(init_lora_weights=...)`` value."""
    if lora_init == "default":
        return True  # A Kaiming-uniform, B zero
    if lora_init == "pissa" and pissa_niter > 0:
        return f"pissa_niter_{pissa_niter}"  # randomised SVD: seconds instead of minutes for a 7B base
    if lora_init in LORA_INITS:
        return lora_init
    raise ValueError(f"--lora_init {lora_init!r}: use one of {', '.join(LORA_INITS)}")


def changes_base_weights(lora_init: str) -> bool:
    """Whether ``--lora_init`` subtracts the initial adapter from the base weights (PiSSA, OLoRA)."""
    return lora_init in BASE_CHANGING_INITS


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


def optimizer_param_groups(model: nn.Module, loraplus_lr_ratio: float, learning_rate: float) -> list[Any]:
    """What ``deepspeed.initialize(model_parameters=...)`` receives: the trainable parameters.

    Without LoRA+ (ratio 0) a flat list: one group at the config's learning rate. With LoRA+ two groups:
    everything but the B matrices at ``learning_rate`` (group 0, the one the logs report) and the B
    matrices of the linear layers at ``learning_rate * loraplus_lr_ratio``. DoRA magnitude vectors and
    embedding adapters stay in group 0.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not loraplus_lr_ratio:
        return [p for _, p in trainable]
    b_matrices = [p for name, p in trainable if ".lora_B." in name]
    others = [p for name, p in trainable if ".lora_B." not in name]
    if not b_matrices:
        raise ValueError("--loraplus_lr_ratio: the model has no trainable LoRA B matrices (is --peft lora?)")
    logger.info(
        "LoRA+: %d B matrices at lr %.3g (x%g), %d other tensors at lr %.3g",
        len(b_matrices),
        learning_rate * loraplus_lr_ratio,
        loraplus_lr_ratio,
        len(others),
        learning_rate,
    )
    return [{"params": others}, {"params": b_matrices, "lr": learning_rate * loraplus_lr_ratio}]
