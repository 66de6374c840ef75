"""The model a training run trains: the base (quantised per ``--quantization``) with a fresh peft adapter,
LoRA targets, the LoRA variants (:mod:`sft.train.lora_variants`) and NEFTune (:mod:`sft.train.neftune`), and
ZeRO-3's partitioned load.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sft.checkpoint.layout import ADAPTER_WEIGHTS
from sft.checkpoint.plain_lora import remember_initial_adapter
from sft.core.errors import ArgsError
from sft.modeling.loading import (
    is_partitioned,
    keep_4bit_weights_unpacked,
    load_base_model,
    parameter_count,
    torch_dtype,
)
from sft.train.attention import use_document_sdpa
from sft.train.lora_variants import changes_base_weights, peft_init_lora_weights
from sft.train.neftune import add_neftune_hook

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import PreTrainedModel

    from sft.train.args import AdapterArgs, TrainArgs

logger = logging.getLogger(__name__)


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


def build_peft_config(args: AdapterArgs, model: PreTrainedModel) -> PeftConfig:
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
        ds_config: the filled DeepSpeed config of the run (:func:`sft.train.ds_config.build_ds_config`).

    Returns:
        A ``PeftModel`` whose only trainable parameters are the adapter's. With ``--lora_init pissa|olora``
        it carries its initial adapter (:func:`sft.checkpoint.plain_lora.remember_initial_adapter`), with
        ``--neftune_alpha`` a NEFTune hook on its input embeddings.
    """
    from sft.train.ds_config import zero_stage

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
        from sft.train.kernels import apply_liger

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
        # Several times less attention work on packed rows, no (T, T) masked SDPA (sft/train/attention.py). CPU only: the
        # boundaries are read on the host in every layer, a device sync on a GPU (where flash_attention_2 is the
        # packed-row kernel anyway).
        logger.info("attention: SDPA one document at a time (packed rows without T x T masked attention)")
    keep_4bit_weights_unpacked(model)
    if args.init_adapter:
        peft_model = get_peft_model(model, init_adapter_config(args.init_adapter))
        load_adapter_weights(peft_model, args.init_adapter)
    else:
        peft_model = get_peft_model(model, build_peft_config(args, model))
    if base_init:
        # Checkpoints convert the adapter to plain LoRA relative to the original base with these.
        remember_initial_adapter(peft_model)
    if args.neftune_alpha > 0:
        add_neftune_hook(peft_model, args.neftune_alpha)
        logger.info("NEFTune on the input embeddings (alpha=%g), in training mode only", args.neftune_alpha)
    if args.torch_compile:
        from sft.train.kernels import compile_decoder_layers

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


def init_adapter_config(adapter_dir: str) -> PeftConfig:
    """The peft config of ``--init_adapter``, trainable: its own rank, alpha, targets, DoRA and rsLoRA."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(adapter_dir)
    config.inference_mode = False
    logger.info(
        "adapter from --init_adapter %s (%s, r=%s)", adapter_dir, config.peft_type, getattr(config, "r", "-")
    )
    return config


def load_adapter_weights(model: PeftModel, adapter_dir: str) -> None:
    """Load the weights of ``adapter_dir`` into the fresh adapter of ``model``, every tensor of it.

    Under ZeRO-3 the adapter was partitioned as it was created: its parameters are gathered, written on every
    rank (each reads the same file) and partitioned again.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    with _gathered_for_update(trainable):
        result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise ValueError(
            f"--init_adapter {adapter_dir}: {len(result.unexpected_keys)} tensors do not fit the model (e.g. "
            f"{result.unexpected_keys[0]}): pass an adapter trained on this base"
        )


@contextlib.contextmanager
def _gathered_for_update(params: list[nn.Parameter]) -> Iterator[None]:
    """ZeRO-3 partitioned ``params`` made whole for the block and partitioned again after (no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
    else:
        yield
