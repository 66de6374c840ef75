"""Loading a model to use it: a merged model, or a base model with a trained adapter on top.

:func:`load_from_flags` turns the :class:`~sft.inference.settings.ModelLoadArgs` flags of predict.py, web_demo.py,
``evaluate.py ppl`` and ``data_helper.py synthesize`` into a :class:`LoadedModel` (model,
tokenizer, chat template, device, dtype). By default everything follows the adapter's training run, read
through :mod:`sft.checkpoint`: its base quantisation, its chat template and its tokenizer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sft.checkpoint.adapters import AdapterInfo, check_adapter_fits_base, read_adapter
from sft.core.paths import require_local_dir
from sft.data.templates import Template, get_template, resolve_template_name
from sft.inference.settings import ModelLoadArgs
from sft.modeling.loading import DTYPES, keep_4bit_weights_unpacked, load_base_model, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` (the first GPU if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype``: ``auto`` = bf16 on a GPU that supports it, fp32 otherwise (CPU matmuls are fastest in fp32)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32 if device.type == "cpu" else torch.float16
    return DTYPES[name]


def inference_quantization(info: AdapterInfo | None, requested: str | None) -> tuple[str, bool]:
    """How to load the base for inference: ``--quantization`` if given, else as the adapter was trained.

    Unlike merging, inference may deliberately load the base differently from training (e.g. a QLoRA
    adapter on a bf16 base); that is allowed, with a warning, because the numbers then differ.
    """
    if info is None:
        return requested or "none", True
    trained = info.quantization or "none"
    if requested is not None and requested != trained:
        logger.warning(
            "--quantization %s differs from the adapter's training quantization %s (%s): outputs will differ "
            "from what training measured",
            requested,
            trained,
            info.source,
        )
    return requested or trained, info.double_quant


def inference_template(info: AdapterInfo | None, requested: str | None, tokenizer, model_type: str) -> str:
    """The chat template to prompt with: ``--template``, else the adapter's, else chosen from the model.

    A ``--template`` that differs from the one the adapter was trained with is allowed (warned): a
    model spoken to in another format than it learned answers worse.
    """
    trained = info.template if info is not None else None
    if requested and trained and requested != trained:
        logger.warning(
            "--template %s differs from the template the adapter was trained with (%s, %s): prompts will not "
            "look like the training data",
            requested,
            trained,
            info.source,
        )
    return requested or trained or resolve_template_name(None, tokenizer, model_type)


def load_for_inference(
    model_path: str | os.PathLike,
    adapter: AdapterInfo | str | os.PathLike | None = None,
    *,
    quantization: str = "none",
    double_quant: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model for generation: a merged model, or a base model with a peft adapter on top.

    Args:
        model_path: local model directory (a merged model or the adapter's base).
        adapter: an adapter directory, or one read by :func:`sft.checkpoint.adapters.read_adapter` (kept
            unmerged: the same numbers as in training).
        quantization: how to load the base weights (``nf4``/``fp4``/``int8``/``none``), normally the
            adapter's training quantisation.
        double_quant: 4-bit only.
        dtype: dtype of the unquantised weights and of the 4-bit matmuls.
        device: where the model runs.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode. The tokenizer comes from the adapter directory
        when it has one (train.py saves it there, with the chat template training used), else from the
        model directory. A 4-bit base computes exactly as in training (:func:`keep_4bit_weights_unpacked`).
    """
    device = torch.device(device)
    if adapter is not None and not isinstance(adapter, AdapterInfo):
        adapter = read_adapter(adapter)
    # The tokenizer first: it loads in a second, so a damaged one is reported before minutes of weights.
    tokenizer = load_tokenizer(adapter.path if adapter is not None and adapter.has_tokenizer else model_path)
    model = load_base_model(
        model_path, quantization, dtype, device_map={"": device}, double_quant=double_quant
    )
    keep_4bit_weights_unpacked(model)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter.path))
        logger.info("adapter %s attached (unmerged)", adapter.path)
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to generate, with what the scripts report about how it was loaded."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    template: Template
    template_name: str
    device: torch.device
    dtype: torch.dtype
    quantization: str
    adapter: AdapterInfo | None


def read_adapter_for(args: ModelLoadArgs) -> AdapterInfo | None:
    """The ``--adapter_dir`` of ``args``, read and checked against ``--model_path`` (None without one).

    Done before any weight is loaded, so a damaged adapter or one of another base fails in a second.
    """
    if args.adapter_dir is None:
        return None
    info = read_adapter(args.adapter_dir)
    check_adapter_fits_base(
        require_local_dir(args.model_path, "--model_path"), info, base_flag="--model_path"
    )
    return info


def load_from_flags(args: ModelLoadArgs, *, dtype: str | None = None) -> LoadedModel:
    """Load what the :class:`ModelLoadArgs` flags name: model (+ adapter), tokenizer and chat template.

    Args:
        args: the parsed flags. ``--quantization`` and ``--template`` unset follow the adapter's training
            run; ``--dtype``/``--device`` ``auto`` pick for the hardware.
        dtype: used instead of ``args.dtype`` when given (``evaluate.py ppl`` defaults to the adapter's
            training precision).
    """
    model_path = require_local_dir(args.model_path, "--model_path")
    adapter = read_adapter_for(args)
    device = resolve_device(args.device)
    torch_dtype = resolve_dtype(dtype or args.dtype, device)
    quantization, double_quant = inference_quantization(adapter, args.quantization)
    model, tokenizer = load_for_inference(
        model_path,
        adapter,
        quantization=quantization,
        double_quant=double_quant,
        dtype=torch_dtype,
        device=device,
    )
    template_name = inference_template(adapter, args.template, tokenizer, model.config.model_type)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        template=get_template(template_name, tokenizer, model_path),
        template_name=template_name,
        device=device,
        dtype=torch_dtype,
        quantization=quantization,
        adapter=adapter,
    )
