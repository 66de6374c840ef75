"""Loading base models (4-bit / 8-bit / full precision) and attaching peft adapters.

Reusable pieces, shared by train.py, merge_params.py, predict.py, evaluate.py and web_demo.py:

- :func:`load_tokenizer` -- AutoTokenizer from a local directory, with a pad token.
- :func:`load_base_model` -- AutoModelForCausalLM from a local directory, optionally quantised.
  Both raise :class:`sft.modeling.files.ModelFileError`, one line naming the file, when a file of the
  directory is damaged (a truncated download, a corrupt tokenizer.model).
- :func:`find_lora_targets` -- every linear layer except the output head.
- :func:`build_peft_config` / :func:`load_model_for_training` -- the training set-up (LoRA variants from
  :mod:`sft.train.lora_variants`, NEFTune from :mod:`sft.train.neftune`).
- :func:`keep_4bit_weights_unpacked` -- 4-bit layers compute the same way in training, evaluation,
  inference and merge checks.

Every function here handles every causal LM the transformers Auto classes resolve: Baichuan2 too once
the entry point has called ``models.register_models()``.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from sft.modeling import PRECISIONS
from sft.modeling.files import ModelFileError, tokenizer_files_problem, weight_files_problem

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

# peft (0.21) still calls transformers' deprecated gradient-checkpointing names, in get_peft_model,
# PeftModel.from_pretrained and prepare_model_for_kbit_training: every script would print these
# FutureWarnings, and nothing in them is for our users to fix.
warnings.filterwarnings(
    "ignore", message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated", category=FutureWarning
)

DTYPES = dict(zip(PRECISIONS, (torch.bfloat16, torch.float16, torch.float32), strict=True))


def torch_dtype(precision: str) -> torch.dtype:
    """``"bf16"|"fp16"|"fp32"`` -> the torch dtype."""
    return DTYPES[precision]


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a local model directory and make sure it has a pad token.

    Padding positions never carry a loss (labels -100) and are masked out of attention, so any
    existing token can serve as pad; we prefer unk, then eos.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        # transformers' traceback does not say which file is damaged: find it and say that instead.
        if problem := tokenizer_files_problem(path):
            raise ModelFileError(problem) from err
        raise
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def quantization_config(
    quantization: str,
    compute_dtype: torch.dtype,
    *,
    double_quant: bool = True,
    quant_storage: torch.dtype | None = None,
) -> BitsAndBytesConfig | None:
    """bitsandbytes config for ``quantization`` in ``{"nf4", "fp4", "int8", "none"}`` (None for "none").

    Args:
        quantization: storage of the frozen base weights.
        compute_dtype: dtype of the 4-bit matmuls (the training precision).
        double_quant: also quantise the 4-bit quantisation constants.
        quant_storage: dtype the packed 4-bit weights are stored in. ZeRO-3 needs it equal to the
            compute dtype so that it can partition and gather the packed weights like any other
            parameter; None keeps bitsandbytes' default (uint8).
    """
    from transformers import BitsAndBytesConfig

    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=quant_storage if quant_storage is not None else torch.uint8,
        )
    raise ValueError(f"unknown quantization {quantization!r}: use nf4, fp4, int8 or none")


def load_base_model(
    path: str | os.PathLike,
    quantization: str = "none",
    dtype: torch.dtype = torch.bfloat16,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    *,
    double_quant: bool = True,
    quant_storage: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a local directory, optionally quantised with bitsandbytes.

    Args:
        path: local model directory (config.json, weights).
        quantization: ``"nf4"``, ``"fp4"``, ``"int8"`` or ``"none"``.
        dtype: dtype of the unquantised weights and compute dtype of the 4-bit matmuls.
        device_map: passed to ``from_pretrained`` (e.g. ``{"": "cuda:0"}``, ``"auto"``); quantised
            models need one, so None means the current CUDA device, or the CPU.
        attn_implementation: ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, or ``"auto"``/None: the model's
            default (sdpa where the model class supports it, else eager).
        double_quant: 4-bit only: quantise the quantisation constants too.
        quant_storage: 4-bit only: storage dtype of the packed weights (see :func:`quantization_config`).
    """
    from transformers import AutoModelForCausalLM

    bnb_config = quantization_config(
        quantization, dtype, double_quant=double_quant, quant_storage=quant_storage
    )
    if bnb_config is not None and device_map is None:
        device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    kwargs: dict = {"dtype": dtype, "device_map": device_map}
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
    if attn_implementation and attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as err:
        # transformers' traceback does not say which file is damaged: find it and say that instead.
        if problem := weight_files_problem(path):
            raise ModelFileError(problem) from err
        if isinstance(err, ValueError) and "does not support an attention implementation" in str(err):
            raise ValueError(
                f"{path}: {str(err).split(' ', 1)[0]} cannot attend with --attn_implementation "
                f"{attn_implementation} (Gemma 2 soft-caps its attention logits, which SDPA cannot); pass "
                "--attn_implementation eager, or auto"
            ) from None
        raise
    logger.info(
        "loaded %s (%s, %.1fM parameters, quantization=%s, dtype=%s)",
        path,
        type(model).__name__,
        sum(parameter_count(p) for p in model.parameters()) / 1e6,
        quantization,
        dtype,
    )
    return model


def is_partitioned(model: nn.Module) -> bool:
    """True when ZeRO-3 has partitioned the parameters of ``model`` (``zero.Init`` or an engine)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def parameter_count(parameter: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 partitioned it (its local tensor is then empty)."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def keep_4bit_weights_unpacked(model: nn.Module) -> int:
    """Turn off bitsandbytes' in-place CPU repacking of 4-bit weights; returns the layers changed.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place, for a bf16 kernel, the
    first time the layer runs in eval mode under ``no_grad``. Evaluation during training would then
    measure a slightly different function (bf16 matmuls) than the one being trained, and the
    repacked weight stays so for the following training steps. One numeric path for training and
    evaluation keeps perplexities comparable (and reproducible on resume). No effect on GPUs.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
