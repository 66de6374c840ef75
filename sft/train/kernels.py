"""Optional faster kernels for training: Liger Kernel (``--liger``) and ``torch.compile`` (``--torch_compile``).

Both are off by default and change speed, never the function computed: tests/test_speed_levers.py and
tests/test_kernels.py check the same loss and gradients with and without them (Liger on a GPU only,
in tests/test_gpu.py).

- **Liger Kernel** (``liger-kernel``, Triton, CUDA only): fused RMSNorm, SwiGLU and RoPE inside the
  decoder, and a fused linear + cross-entropy for the loss (``sft.train.objectives.sft``, ``head_loss="liger"``).
  Model families of transformers go through Liger's own per-model patch API
  (``apply_liger_kernel_to_llama(model=...)`` and its siblings); a family of our own declares an
  ``apply_liger_kernel()`` method (Baichuan2 does).
- **torch.compile** of each decoder layer (the modules the model lists in ``_no_split_modules``):
  one compiled graph per layer type, bitsandbytes' 4-bit matmul and peft's LoRA layers inside it.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

LIGER_VERSION = "0.8.5"  # the version the GPU check ran; see docs/PERFORMANCE.md


def liger_problem(cuda_available: bool | None = None) -> str | None:
    """Why ``--liger`` cannot run on this machine (one line naming the fix), or None when it can."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        return "--liger needs a CUDA GPU (Liger Kernel's kernels are written in Triton): drop --liger here"
    if importlib.util.find_spec("triton") is None:
        return "--liger needs Triton, which comes with the CUDA build of torch: install that build, or drop --liger"
    if importlib.util.find_spec("liger_kernel") is None:
        return f"--liger needs the liger-kernel package: pip install liger-kernel=={LIGER_VERSION}, or drop --liger"
    return None


def apply_liger(model: nn.Module) -> list[str]:
    """Swap Liger Kernel's RMSNorm, SwiGLU and RoPE into a loaded base model (before peft wraps it).

    Returns the kernels swapped in. Liger's own cross-entropy patches stay off: the loss is
    ``sft.train.objectives.sft``'s, which calls Liger's fused linear cross-entropy itself (``head_loss="liger"``).

    Raises:
        ValueError: Liger Kernel has no kernels for this model type.
    """
    own = getattr(model, "apply_liger_kernel", None)
    if callable(own):
        applied = own()
    else:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        model_type = getattr(model.config, "model_type", None)
        apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
        if apply_fn is None:
            raise ValueError(
                f"--liger: Liger Kernel {LIGER_VERSION} has no kernels for model type {model_type!r} "
                f"(it has: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); drop --liger"
            )
        wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False}
        wanted["fused_linear_cross_entropy"] = False
        parameters = inspect.signature(apply_fn).parameters
        _apply_liger_kernel_to_instance(model=model, **{k: v for k, v in wanted.items() if k in parameters})
        applied = [name for name in ("rms_norm", "swiglu", "rope") if name in parameters]
    logger.info("Liger Kernel: %s, and its fused linear cross-entropy in the loss", ", ".join(applied))
    return applied


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM (inside peft/DeepSpeed wrappers too): the modules whose class the
    transformers model lists in ``_no_split_modules`` (``BaichuanLayer``, ``LlamaDecoderLayer``, ...)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def compile_decoder_layers(model: nn.Module, *, backend: str = "inductor") -> int:
    """``torch.compile`` every decoder layer in place (``nn.Module.compile``); returns how many.

    Compiled after peft has inserted its LoRA layers, so they are part of each graph. Layers of one
    type share their compiled code (torch.compile treats the module's parameters as inputs); a new
    sequence length recompiles once, then the length dimension is kept dynamic.

    Args:
        backend: ``"inductor"`` (fused Triton kernels on a GPU); tests use ``"aot_eager"``, which
            traces the same graphs and runs them as they are (no C++/Triton compiler needed).
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"--torch_compile: found no decoder layers in {type(model).__name__} (no _no_split_modules); "
            "drop --torch_compile"
        )
    for layer in layers:
        layer.compile(backend=backend)
    logger.info("torch.compile (%s): %d decoder layers of %s", backend, len(layers), type(layers[0]).__name__)
    return len(layers)
