"""Adapters, for the inference tools and the merge: read an adapter directory without loading weights
(:class:`AdapterInfo`), the quantisation it was trained against, and whether it fits a base model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sft.checkpoint.identity import check_base_model, read_base_model
from sft.checkpoint.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    TRAIN_ARGS,
    read_json,
    read_train_args,
)

logger = logging.getLogger(__name__)


def adapter_tensor_shapes(adapter_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in ``adapter_model.safetensors``, from its header (no data loaded).

    safetensors checks that the header covers the whole file, so a file cut short by an interrupted
    save or copy is found here, before any model is loaded.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} is damaged ({err}): the save was cut short or the file was truncated in a copy; "
            "use another checkpoint, or copy this one again"
        ) from err


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter directory says about itself, read without loading any weights.

    Attributes:
        path: the adapter directory.
        config: its peft ``adapter_config.json``.
        train_args: the arguments of the run that trained it (``train_args.json``; {} when absent).
        base_model: the identity of the base it was trained on (``base_model.json``; None when absent).
    """

    path: Path
    config: dict[str, Any]
    train_args: dict[str, Any]
    base_model: dict[str, Any] | None = None

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type"))

    @property
    def quantization(self) -> str | None:
        """The base-weight quantisation it was trained against (None = unknown: no train_args.json)."""
        return self.train_args.get("quantization")

    @property
    def double_quant(self) -> bool:
        return bool(self.train_args.get("double_quant", True))

    @property
    def template(self) -> str | None:
        """The chat template it was trained with (None = unknown)."""
        return self.train_args.get("template") or None

    @property
    def has_tokenizer(self) -> bool:
        """train.py saves the tokenizer (and its chat template) with every checkpoint."""
        return (self.path / "tokenizer_config.json").is_file()

    @property
    def source(self) -> str:
        """Where the training facts came from, for messages."""
        return str(self.path / TRAIN_ARGS) if self.train_args else f"{self.path} (no {TRAIN_ARGS})"


# peft's init_lora_weights values that change the base weights at load time (peft_model.py warns about them).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga")


def read_adapter(adapter_dir: str | Path, flag: str = "--adapter_dir") -> AdapterInfo:
    """Read and check an adapter directory; a one-line error naming ``flag`` when it is not a usable one.

    Also checks that ``adapter_model.safetensors`` is complete, so a damaged checkpoint is refused with
    the file's name before any model is loaded.
    """
    path = Path(adapter_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{flag}={adapter_dir} does not exist: pass a checkpoint directory written by train.py"
        )
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{flag}={adapter_dir} has no {ADAPTER_CONFIG}, so it is not a peft adapter: pass a checkpoint "
            "directory written by train.py (output_dir/epoch-E-step-S)"
        )
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file() and not (path / "adapter_model.bin").is_file():
        raise FileNotFoundError(f"{flag}={adapter_dir} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    config = read_json(config_file)
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(
            f"{config_file} is not a peft adapter config (no 'peft_type'): copy the checkpoint again"
        )
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{config_file} has init_lora_weights={init}: the adapter is relative to a base from which peft "
            "subtracts the initial adapter at load time, which a quantised or merged base cannot reproduce; "
            "convert it to plain LoRA with peft's save_pretrained(..., path_initial_model_for_weight_conversion=...) "
            "(train.py saves converted adapters)"
        )
    if weights.is_file():
        adapter_tensor_shapes(path)
    return AdapterInfo(
        path=path, config=config, train_args=read_train_args(path) or {}, base_model=read_base_model(path)
    )


@dataclass(frozen=True)
class TrainingQuantization:
    """How the base weights were stored when the adapter was trained (from train_args.json, else flags)."""

    quantization: str | None  # nf4 / fp4 / int8 / none; None = unknown (no train_args.json, no flag)
    double_quant: bool
    source: str  # where the values came from, for log messages


def training_quantization(
    info: AdapterInfo, quantization_flag: str | None = None, double_quant_flag: bool | None = None
) -> TrainingQuantization:
    """The base-weight quantisation an adapter was trained against.

    ``train_args.json`` is the truth. The flags fill in for adapters without that file; a flag that
    contradicts the file is an error (the adapter was trained one way, so merging it into a base
    quantised another way is a mistake).
    """
    if info.quantization is not None:
        if quantization_flag is not None and quantization_flag != info.quantization:
            raise ValueError(
                f"--quantization {quantization_flag} contradicts {info.source} (the adapter was trained with "
                f"quantization={info.quantization}): drop --quantization"
            )
        if double_quant_flag is not None and double_quant_flag != info.double_quant:
            raise ValueError(
                f"--{'' if double_quant_flag else 'no-'}double_quant contradicts {info.source} "
                f"(double_quant={info.double_quant}): drop the flag"
            )
        return TrainingQuantization(info.quantization, info.double_quant, info.source)
    double_quant = True if double_quant_flag is None else double_quant_flag
    source = (
        "--quantization" if quantization_flag is not None else f"unknown ({info.source}, no --quantization)"
    )
    return TrainingQuantization(quantization_flag, double_quant, source)


def _expected_lora_shape(module: nn.Module, kind: str, rank: int) -> tuple[int, ...] | None:
    """The shape a LoRA tensor of ``kind`` must have on ``module`` (None = not a layer LoRA can adapt)."""
    if isinstance(module, nn.Linear):
        return {
            "lora_A": (rank, module.in_features),
            "lora_B": (module.out_features, rank),
            "lora_magnitude_vector": (module.out_features,),
        }.get(kind)
    if isinstance(module, nn.Embedding):
        return {
            "lora_embedding_A": (rank, module.num_embeddings),
            "lora_embedding_B": (module.embedding_dim, rank),
        }.get(kind)
    return None


_LORA_KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def check_adapter_fits_base(
    base_dir: str | Path, info: AdapterInfo, *, base_flag: str, fix: str | None = None
) -> None:
    """Refuse an adapter that was not trained on this base: another model, or other module names or shapes.

    First the base identity recorded with the adapter (``base_model.json``) is compared with ``base_dir``
    (:func:`check_base_model`, raising :class:`BaseModelMismatch`; ``fix`` overrides its advice). Then peft only warns when an adapter's module names are missing from the model and then runs the base
    model without the adapter: a LoRA adapter of another architecture would silently do nothing. The
    base architecture is built on the meta device (no weights, no memory) and every tensor in the
    adapter file is checked against the module it adapts. All problems are raised together; the message
    tells to pass the right base as ``base_flag``. Prompt-learning adapters have no such tensors.
    """
    check_base_model(
        info.base_model,
        base_dir,
        subject=f"the adapter in {info.path}",
        base_flag=base_flag,
        fix=fix or f"pass the base it was trained on ({{recorded}}) as {base_flag}",
    )
    if info.peft_type != "LORA":
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    arch = f"{type(model).__name__} (model_type {config.model_type!r}) from {base_dir}"

    problems: list[str] = []
    for key, shape in adapter_tensor_shapes(info.path).items():
        name = key.removeprefix(PEFT_PREFIX)
        lora_kind = next((k for k in _LORA_KINDS if f".{k}" in name), None)
        if lora_kind is None:
            # A fully saved module (peft modules_to_save), e.g. "lm_head.weight".
            if name not in params:
                problems.append(f"{key}: {arch} has no parameter {name!r}")
            elif params[name] != shape:
                problems.append(f"{key}: shape {list(shape)} but the base parameter is {list(params[name])}")
            continue
        module_name = name.split(f".{lora_kind}")[0]
        module = modules.get(module_name)
        if module is None:
            problems.append(f"{key}: {arch} has no module {module_name!r}")
            continue
        rank = shape[-1] if lora_kind in ("lora_B", "lora_embedding_B") else shape[0]
        expected = _expected_lora_shape(module, lora_kind, rank)
        if expected is None:
            problems.append(f"{key}: {module_name!r} is a {type(module).__name__}, which LoRA cannot adapt")
        elif expected != shape:
            problems.append(
                f"{key}: shape {list(shape)} does not fit {module_name!r} (expects {list(expected)})"
            )
    if problems:
        shown = problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
        advice = (
            fix.replace("{recorded}", "the base it was trained on")
            if fix
            else f"pass the base it was trained on as {base_flag}"
        )
        raise ValueError(
            f"the adapter in {info.path} does not match the base model {base_dir}: it was trained on another "
            f"model; {advice}\n  " + "\n  ".join(shown)
        )
