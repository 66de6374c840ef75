"""Fold a LoRA adapter into its base model and write a standalone model directory.

The QLoRA caveat: an adapter trained on a 4-bit (NF4) base learned a correction to the *quantised*
weights W_q = dequant(quant(W)), not to W. Merging it into the original W gives W + BA, a model
that training never saw; merging into W_q gives W_q + BA, exactly the model training optimised
(up to the rounding of the saved dtype). So by default (``merge_into="dequantized"``) the base is
quantised the way training quantised it (bitsandbytes, same quant type and double quantisation,
read from the adapter's train_args.json), dequantised back to fp32, and the adapter is merged into
that. ``merge_into="original"`` merges into the unquantised weights instead.

Every merge is checked: on a few probe inputs the merged model's logits must equal the logits of
base + adapter (the base as the merge target sees it: the real 4-bit model for a 4-bit adapter) up
to a tolerance, and the saved directory must reload to the same logits. The directory is written
to a temporary sibling and renamed into place only after both checks pass, so a failed merge
leaves nothing behind.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sft.generation import TrainingSetup, adapter_tensor_shapes, adapter_training_setup, read_adapter_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MERGE_INTO = ("dequantized", "original")
# Probe inputs for the logits check: English, Chinese and code-like text so most of the vocabulary's
# scripts are exercised; any text would do, the point is to run real tokens through every layer.
PROBE_TEXTS = (
    "Hello! Could you tell me a little about yourself?",
    "请用一句话介绍一下你自己，并说说你最喜欢的诗。",
    "def add(a, b):\n    return a + b  # 1 + 2 = 3",
)
PEFT_PREFIX = "base_model.model."


@dataclass
class MergeReport:
    """What a merge did, for the log and for tests."""

    out_dir: str
    merge_into: str
    quantization: str
    dtype: str
    max_abs_diff: float  # merged vs base+adapter logits, in fp32
    reference: str  # what base+adapter meant for max_abs_diff
    saved_max_abs_diff: float  # reloaded OUT vs the merged model rounded to --dtype (both computed in fp32)
    dtype_rounding_diff: float  # what rounding the weights to --dtype does to the logits (information)
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)


class MergeCheckError(RuntimeError):
    """The merged model does not reproduce base+adapter (or its saved copy does not reload the same)."""


# ---------------------------------------------------------------------------------------------
# Checks done before any weight is loaded
# ---------------------------------------------------------------------------------------------


def check_output_dir(out_dir: Path, *, overwrite: bool, protected: dict[str, Path]) -> None:
    """Refuse an output directory that would destroy inputs or an existing non-empty directory."""
    out = out_dir.resolve()
    for flag, path in protected.items():
        p = path.resolve()
        if out == p or out in p.parents:
            raise ValueError(
                f"--save_model_dir={out_dir} is (or contains) {flag}={path}: writing there would replace "
                "the input; pass a new directory"
            )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--save_model_dir={out_dir} is a file: pass a directory path")
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FileExistsError(
            f"--save_model_dir={out_dir} cannot be created: {existing} is a file, not a directory"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--save_model_dir={out_dir} exists and is not empty: pass --overwrite to replace it, or choose "
            "a new directory"
        )


def _adapter_tensor_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the adapter's tensors, read from the safetensors header (no data loaded)."""
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} has no adapter_model.safetensors (only the safetensors format is merged)"
        )
    return adapter_tensor_shapes(adapter_dir)


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


def check_adapter_matches_base(
    base_dir: Path, adapter_dir: Path, *, base_flag: str = "--ori_model_dir"
) -> None:
    """Refuse an adapter that was not trained on this base (module names or shapes differ).

    Builds the base architecture on the meta device (no weights, no memory) and checks every tensor
    in the adapter file against the module it adapts. All problems are collected and raised together;
    the message tells to pass the right base as ``base_flag``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    arch = f"{type(model).__name__} (model_type {config.model_type!r}) from {base_dir}"

    problems: list[str] = []
    for key, shape in _adapter_tensor_shapes(adapter_dir).items():
        name = key.removeprefix(PEFT_PREFIX)
        lora_kind = next(
            (
                k
                for k in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
                if f".{k}" in name
            ),
            None,
        )
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
        raise ValueError(
            f"the adapter in {adapter_dir} does not match the base model {base_dir}: it was trained on another "
            f"model; pass the base it was trained on as {base_flag}\n  " + "\n  ".join(shown)
        )


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _dequantized_weight(module: nn.Module) -> torch.Tensor | None:
    """The fp32 weight a bitsandbytes layer computes with, or None for an unquantised layer."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        weight = module.weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        weight = module.weight
        # After a forward pass bitsandbytes moves the row scales from the weight to the layer state.
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
    return None


def copy_dequantized_weights(quantized: nn.Module, target: nn.Module) -> int:
    """Replace ``target``'s linear weights by the dequantised weights of ``quantized`` (same architecture).

    Returns the number of layers replaced. Only the layers bitsandbytes quantised change; norms,
    embeddings and the output head were never quantised in training and keep their weights.
    """
    count = 0
    for name, module in quantized.named_modules():
        weight = _dequantized_weight(module)
        if weight is None:
            continue
        dest = target.get_submodule(name)
        if tuple(dest.weight.shape) != tuple(weight.shape):
            raise RuntimeError(
                f"{name}: dequantised shape {tuple(weight.shape)} != {tuple(dest.weight.shape)}"
            )
        dest.weight.data = weight.to(dest.weight.device)
        count += 1
    return count


def use_training_numerics(model: nn.Module) -> nn.Module:
    """Make a 4-bit model compute like it does in training, for a faithful reference.

    On CPUs with AVX512-BF16, bitsandbytes takes an inference shortcut when no gradient is needed: it
    repacks the 4-bit weights and multiplies in bf16 (logits move by ~1e-3). Training never takes it
    (its inputs need gradients), so the reference turns it off and dequantises to fp32 like training.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


@torch.inference_mode()
def probe_logits(model: nn.Module, probes: list[list[int]]) -> list[torch.Tensor]:
    """Logits of each probe sequence (one forward each, no padding), as fp32 on the CPU."""
    device = next(model.parameters()).device
    out = []
    for ids in probes:
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits
        out.append(logits.float().cpu())
    return out


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference between two lists of equally shaped tensors."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def probe_ids(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of :data:`PROBE_TEXTS` (texts the tokenizer cannot encode are left out)."""
    probes = [tokenizer(text)["input_ids"] for text in PROBE_TEXTS]
    probes = [ids for ids in probes if ids]
    if not probes:
        raise RuntimeError("the tokenizer encodes none of the probe texts to tokens")
    return probes


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _copy_remote_code(base_dir: Path, out_dir: Path, config: Any) -> list[str]:
    """Copy the base's custom-code files (``auto_map``, e.g. an official Baichuan2 download).

    Our own Baichuan2 is registered by ``import models.baichuan`` and needs no files; the copy only
    keeps the merged directory as usable with ``trust_remote_code`` as the base directory was.
    """
    if not getattr(config, "auto_map", None):
        return []
    copied = []
    for src in sorted(base_dir.glob("*.py")):
        shutil.copy2(src, out_dir / src.name)
        copied.append(src.name)
    return copied


def save_merged(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    *,
    base_dir: Path,
    max_shard_size: str,
) -> list[str]:
    """Write weights (sharded safetensors), config, generation_config and tokenizer files into ``out_dir``."""
    from sft.file_modes import restore_default_modes

    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    # safetensors writes 0600 files (sft/file_modes.py): let other users read them, as the JSON files.
    restore_default_modes(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    base_generation = base_dir / "generation_config.json"
    if base_generation.is_file() and not (out_dir / "generation_config.json").is_file():
        shutil.copy2(base_generation, out_dir / "generation_config.json")
    _copy_remote_code(base_dir, out_dir, model.config)
    return sorted(p.name for p in out_dir.iterdir())


def _replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished temporary directory to ``out_dir`` (replacing it when --overwrite allowed it)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)


# ---------------------------------------------------------------------------------------------
# The merge
# ---------------------------------------------------------------------------------------------


def resolve_quantization(setup: TrainingSetup, merge_into: str) -> str:
    """The quantisation to reproduce before merging (``none`` for ``merge_into="original"``)."""
    if merge_into == "original":
        return "none"
    if setup.quantization is None:
        raise ValueError(
            "--merge_into dequantized needs the adapter's training quantization, but the adapter has no "
            "train_args.json: pass --quantization nf4|fp4|int8|none (what training used), or --merge_into original"
        )
    return setup.quantization


def merge_lora(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    merge_into: str = "dequantized",
    quantization: str | None = None,
    double_quant: bool | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    tolerance: float = 1e-3,
) -> MergeReport:
    """Merge the LoRA adapter in ``adapter_dir`` into the base in ``base_dir`` and save it to ``out_dir``.

    Args:
        base_dir: the base model the adapter was trained on (never modified).
        adapter_dir: a peft LoRA adapter directory (train.py checkpoint).
        out_dir: where the merged model goes; must not exist or be empty unless ``overwrite``.
        merge_into: ``"dequantized"`` (the base as a quantised training run saw it) or ``"original"``.
        quantization, double_quant: the training quantisation for adapters without train_args.json.
        dtype: dtype of the saved weights (the merge itself is computed in fp32).
        device: where the merge and the checks run.
        max_shard_size: safetensors shard size, e.g. ``"5GB"``.
        overwrite: replace an existing non-empty ``out_dir``.
        tolerance: largest allowed |merged - (base+adapter)| logit difference in fp32.

    Raises:
        FileNotFoundError / FileExistsError / ValueError: refused before anything is loaded or written.
        MergeCheckError: the merged model failed the logits check (nothing is written).
    """
    from peft import PeftModel

    from sft.modeling import load_base_model, load_tokenizer

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    device = torch.device(device)
    if merge_into not in MERGE_INTO:
        raise ValueError(f"--merge_into {merge_into!r}: use one of {', '.join(MERGE_INTO)}")

    # 1. Refusals, before any weight is loaded.
    adapter_config = read_adapter_config(adapter_dir, "--model_dir")
    if adapter_config.get("peft_type") != "LORA":
        raise ValueError(
            f"--model_dir={adapter_dir} holds a {adapter_config.get('peft_type')} adapter; only LoRA adapters "
            "change weights that can be merged (prompt/prefix tuning adds virtual tokens: load the base with "
            "--adapter_dir in predict.py instead)"
        )
    check_output_dir(
        out_dir, overwrite=overwrite, protected={"--ori_model_dir": base_dir, "--model_dir": adapter_dir}
    )
    check_adapter_matches_base(base_dir, adapter_dir)
    setup = adapter_training_setup(adapter_dir, quantization, double_quant)
    quant = resolve_quantization(setup, merge_into)
    target = f"{quant}-dequantised" if quant != "none" else "original"
    logger.info(
        "training quantization: %s (from %s); merging into the %s base",
        setup.quantization,
        setup.source,
        target,
    )
    if merge_into == "original" and setup.quantization not in (None, "none"):
        logger.warning(
            "the adapter was trained on a %s-quantised base but is merged into the original weights: the merged "
            "model differs from the one training optimised (see docs/INFERENCE.md)",
            setup.quantization,
        )

    tokenizer = load_tokenizer(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir)
    probes = probe_ids(tokenizer)

    # 2. The base in fp32 (the merge target), and the reference logits of base + adapter.
    model = load_base_model(base_dir, "none", torch.float32, device_map={"": device})
    if quant != "none":
        quantized = load_base_model(
            base_dir, quant, torch.float32, device_map={"": device}, double_quant=setup.double_quant
        )
        n = copy_dequantized_weights(quantized, model)
        logger.info("replaced %d linear weights by their %s-dequantised values", n, quant)
        if quant == "int8":
            # LLM.int8 also quantises the activations at run time, so the 8-bit model's logits are not a
            # weight-only reference: compare with the dequantised base + unmerged adapter instead.
            del quantized
            reference = None
        else:
            quantized = PeftModel.from_pretrained(use_training_numerics(quantized), str(adapter_dir)).eval()
            reference = probe_logits(quantized, probes)
            reference_name = f"the {quant} base + adapter (as in training, fp32 compute)"
            del quantized
        gc.collect()
    else:
        reference = None
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    if reference is None:
        reference = probe_logits(peft_model, probes)
        reference_name = "the " + ("int8-dequantised" if quant == "int8" else "original") + " base + adapter"

    # 3. Merge in fp32 and check it against the reference.
    merged = peft_model.merge_and_unload()
    diff = max_abs_diff(probe_logits(merged, probes), reference)
    logger.info(
        "merge check: max |merged - base+adapter| logits = %.3g (reference: %s)", diff, reference_name
    )
    if not diff <= tolerance:  # `not <=` also catches NaN
        raise MergeCheckError(
            f"merged logits differ from {reference_name} by {diff:.3g} > --tolerance {tolerance}: nothing written"
        )

    # 4. Round the weights to the saved dtype (kept in fp32 for now) and record what that does to the logits.
    #    The reloaded directory, read back in fp32, must then reproduce these logits exactly: same weights,
    #    same fp32 compute. (Casting the whole model instead would also cast buffers such as RoPE's
    #    inv_freq, which from_pretrained keeps in fp32, and the comparison would measure that, not the save.)
    with torch.no_grad():
        for param in merged.parameters():
            param.data = param.data.to(dtype).float()
    expected = probe_logits(merged, probes)
    rounding = max_abs_diff(expected, reference)
    logger.info("saving in %s moves the logits by up to %.3g", dtype, rounding)
    merged = merged.to(dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    try:
        files = save_merged(merged, tokenizer, tmp_dir, base_dir=base_dir, max_shard_size=max_shard_size)
        del merged, peft_model, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # make room for the reloaded copy
        reloaded = load_base_model(tmp_dir, "none", torch.float32, device_map={"": device}).eval()
        saved_diff = max_abs_diff(probe_logits(reloaded, probes), expected)
        del reloaded
        logger.info("save check: max |reloaded - merged| logits = %.3g", saved_diff)
        if not saved_diff <= tolerance:
            raise MergeCheckError(
                f"the saved model reloads with logits {saved_diff:.3g} away from the merged model: nothing written"
            )
        _replace_dir(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    return MergeReport(
        out_dir=str(out_dir),
        merge_into=merge_into,
        quantization=quant,
        dtype=str(dtype).removeprefix("torch."),
        max_abs_diff=diff,
        reference=reference_name,
        saved_max_abs_diff=saved_diff,
        dtype_rounding_diff=rounding,
        files=files,
    )
