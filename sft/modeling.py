"""Loading base models (4-bit / 8-bit / full precision) and attaching peft adapters.

Reusable pieces, shared by train.py, merge_params.py, predict.py, evaluate.py and web_demo.py:

- :func:`load_tokenizer` -- AutoTokenizer from a local directory, with a pad token.
- :func:`load_base_model` -- AutoModelForCausalLM from a local directory, optionally quantised.
  Both raise :class:`sft.model_files.ModelFileError`, one line naming the file, when a file of the
  directory is damaged (a truncated download, a corrupt tokenizer.model).
- :func:`find_lora_targets` -- every linear layer except the output head.
- :func:`build_peft_config` / :func:`load_model_for_training` -- the training set-up (LoRA variants from
  :mod:`sft.lora_variants`, NEFTune from :mod:`sft.neftune`).
- :func:`keep_4bit_weights_unpacked` -- 4-bit layers compute the same way in training, evaluation,
  inference and merge checks.

Every function here handles every causal LM the transformers Auto classes resolve: Baichuan2 too once
the entry point has called ``models.register_models()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sft.attention import use_document_sdpa
from sft.cli import ArgsError
from sft.lora_variants import changes_base_weights, peft_init_lora_weights, remember_initial_adapter
from sft.model_files import ModelFileError, tokenizer_files_problem, weight_files_problem
from sft.neftune import add_neftune_hook

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

    from sft.args import TrainArgs

logger = logging.getLogger(__name__)

# peft (0.21) still calls transformers' deprecated gradient-checkpointing names, in get_peft_model,
# PeftModel.from_pretrained and prepare_model_for_kbit_training: every script would print these
# FutureWarnings, and nothing in them is for our users to fix.
warnings.filterwarnings(
    "ignore", message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated", category=FutureWarning
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRECISIONS = tuple(DTYPES)
QUANTIZATIONS = ("nf4", "fp4", "int8", "none")


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
        attn_implementation: ``"eager"``, ``"sdpa"``, ``"flash_attention_2"`` or None (model default).
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
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as err:
        # transformers' traceback does not say which file is damaged: find it and say that instead.
        if problem := weight_files_problem(path):
            raise ModelFileError(problem) from err
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


def find_lora_targets(model: nn.Module) -> list[str]:
    """Names (last dotted component) of every linear layer except the output head.

    bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` subclass ``nn.Linear``, so quantised layers are
    found too. The output head is excluded by identity (``get_output_embeddings``); Baichuan2's
    ``NormHead`` is not an ``nn.Linear`` and is never a candidate.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layers to adapt: pass --lora_target explicitly"
        )
    return sorted(names)


def build_peft_config(args: TrainArgs, model: PreTrainedModel) -> PeftConfig:
    """The peft config for ``--peft`` (LoRA targets from ``--lora_target`` or discovered)."""
    from peft import (
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        TaskType,
    )

    if args.peft == "lora":
        targets = args.lora_target_modules or find_lora_targets(model)
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            # An argument problem found only once the model exists: reported like the other flag errors.
            raise ArgsError(
                [
                    f"--lora_target {','.join(missing)}: no such module in {type(model).__name__}; "
                    f"its linear layers are {','.join(find_lora_targets(model))}"
                ]
            )
        init = peft_init_lora_weights(args.lora_init, args.pissa_niter)
        logger.info(
            "LoRA on %s (r=%d, alpha=%d%s%s, init=%s)",
            ",".join(targets),
            args.lora_dim,
            args.lora_alpha,
            ", DoRA" if args.use_dora else "",
            ", rsLoRA" if args.use_rslora else "",
            "default" if init is True else init,
        )
        return LoraConfig(
            r=args.lora_dim,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type=TaskType.CAUSAL_LM,
            use_dora=args.use_dora,
            use_rslora=args.use_rslora,
            init_lora_weights=init,
        )
    if args.peft == "prompt_tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens)
    if args.peft == "p_tuning":
        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=args.num_virtual_tokens,
            encoder_hidden_size=model.config.hidden_size,
        )
    if args.peft == "prefix_tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens)
    raise ValueError(f"unknown --peft {args.peft!r}")


def load_model_for_training(
    args: TrainArgs, device: torch.device, *, ds_config: dict[str, Any] | None = None
) -> PeftModel:
    """Base model (quantised per ``--quantization``) with a fresh trainable peft adapter.

    Under ZeRO-3 (``ds_config`` of stage 3) an unquantised base is built inside DeepSpeed's ``zero.Init``
    through transformers' DeepSpeed integration: each parameter is partitioned as it is created and rank 0
    streams the checkpoint in one layer at a time, so no rank ever holds the whole model (a 13B bf16 base
    fits two 24 GB cards). A 4-bit base cannot be built that way (transformers 5.23 skips ``zero.Init`` for
    quantised models: bitsandbytes quantises whole tensors at load), so each rank loads the whole 4-bit
    model onto its GPU and ``deepspeed.initialize`` partitions it afterwards; its 4-bit weights are stored
    in the compute dtype so that ZeRO can partition them.

    Args:
        args: validated training arguments.
        device: this rank's device; quantised weights are placed there at load time.
        ds_config: the filled DeepSpeed config of the run (:func:`sft.ds_config.build_ds_config`).

    Returns:
        A ``PeftModel`` whose only trainable parameters are the adapter's. With ``--lora_init pissa|olora``
        it carries its initial adapter (:func:`sft.lora_variants.remember_initial_adapter`), with
        ``--neftune_alpha`` a NEFTune hook on its input embeddings.
    """
    from sft.ds_config import zero_stage

    dtype = torch_dtype(args.precision)
    quantized = args.quantization != "none"
    zero3 = ds_config is not None and zero_stage(ds_config) == 3
    base_init = args.peft == "lora" and changes_base_weights(args.lora_init)
    # PiSSA/OLoRA factorise whole weights when the adapter is created: such a base is loaded whole.
    with _zero3_init(ds_config if zero3 and not quantized and not base_init else None):
        return _build_model_for_training(args, device, dtype=dtype, zero3=zero3, base_init=base_init)


def _build_model_for_training(
    args: TrainArgs, device: torch.device, *, dtype: torch.dtype, zero3: bool, base_init: bool
) -> PeftModel:
    """The body of :func:`load_model_for_training` (inside ``zero.Init`` where it applies)."""
    from peft import get_peft_model

    quantized = args.quantization != "none"
    four_bit = args.quantization in ("nf4", "fp4")
    model = load_base_model(
        args.model_name_or_path,
        args.quantization,
        dtype,
        # PiSSA/OLoRA factorise every target weight where it lies: on the GPU, not the CPU (ZeRO-3 keeps
        # the CPU, so that one rank never holds the whole model on its device).
        device_map={"": device} if quantized or (base_init and not zero3) else None,
        attn_implementation=args.attn_implementation,
        double_quant=args.double_quant,
        quant_storage=dtype if (zero3 and four_bit) else None,
    )
    partitioned = is_partitioned(model)
    if partitioned:
        local = sum(p.ds_tensor.numel() for p in model.parameters())
        logger.info(
            "ZeRO-3: the base model was partitioned at load; this rank holds %d of its %d parameters",
            local,
            sum(parameter_count(p) for p in model.parameters()),
        )
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if args.liger:
        from sft.kernels import apply_liger

        try:
            apply_liger(model)  # before peft: it patches the base model's norm, MLP and attention modules
        except ValueError as err:
            raise ArgsError([str(err)]) from err
    # Freeze the base (peft freezes it too; explicit for prompt learning). Unlike peft's
    # prepare_model_for_kbit_training, the unquantised weights of a 4-bit base (embeddings, head, norms)
    # are not upcast to fp32: the DeepSpeed engine casts every parameter to --precision at initialize, so
    # the upcast would only add a transient fp32 copy (4 GB for Llama-70B's embeddings and head) to the
    # load peak.
    model.requires_grad_(False)
    if args.gradient_checkpointing:
        # Non-reentrant checkpointing needs no requires_grad hack on the input embeddings.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    if device.type == "cpu" and use_document_sdpa(model):
        # Several times less attention work on packed rows, no (T, T) masked SDPA (sft/attention.py). CPU only: the
        # boundaries are read on the host in every layer, a device sync on a GPU (where flash_attention_2 is the
        # packed-row kernel anyway).
        logger.info("attention: SDPA one document at a time (packed rows without T x T masked attention)")
    keep_4bit_weights_unpacked(model)
    peft_model = get_peft_model(model, build_peft_config(args, model))
    if base_init:
        # Checkpoints convert the adapter to plain LoRA relative to the original base with these.
        remember_initial_adapter(peft_model)
    if args.neftune_alpha > 0:
        add_neftune_hook(peft_model, args.neftune_alpha)
        logger.info("NEFTune on the input embeddings (alpha=%g), in training mode only", args.neftune_alpha)
    if args.torch_compile:
        from sft.kernels import compile_decoder_layers

        try:
            compile_decoder_layers(peft_model)  # after peft: the LoRA layers are part of each compiled graph
        except ValueError as err:
            raise ArgsError([str(err)]) from err
    if partitioned and dtype != torch.float32:
        # DeepSpeed casts the parameters of a model that zero.Init built to the training precision only when it
        # created them; the adapter came later (peft keeps it in fp32), so it is cast here, as the engine does
        # for a model loaded whole. The optimizer keeps its fp32 master copy.
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)
    trainable = sum(parameter_count(p) for p in peft_model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in peft_model.parameters())
    logger.info("trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / max(total, 1))
    return peft_model


@contextlib.contextmanager
def _zero3_init(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """While active, transformers' ``from_pretrained`` (and peft) build models inside ``deepspeed.zero.Init``
    with ``ds_config`` (a ZeRO-3 config); None does nothing. transformers holds the config by a weak
    reference: it is dropped on exit, so later loads in the process (evaluation, merge, tests) load whole
    again. Nothing the training needs reads it after the load (transformers reads it again only to
    synchronise ranks in ``generate``)."""
    if ds_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    config = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del config


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
