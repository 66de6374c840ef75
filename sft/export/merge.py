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
to a temporary sibling and swapped in for the output only after both checks pass
(:func:`sft.core.atomic.replacing_dir`): a failed merge leaves nothing behind, and a merge killed at any
instant leaves the previous model at the output, complete; the next merge to the same output deletes
what a killed one left.

:func:`merge_lora` runs the steps in order: :func:`plan_merge` (every refusal, before any weight is
loaded), :func:`load_merge_target` (the fp32 base with the adapter, and the reference logits), the
merge and its check, then :func:`save_verified`.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sft.checkpoint.adapters import AdapterInfo, check_adapter_fits_base, read_adapter, training_quantization
from sft.core.atomic import replacing_dir, restore_default_modes
from sft.core.errors import UserError
from sft.core.paths import output_path_problem
from sft.modeling.loading import keep_4bit_weights_unpacked, load_base_model, load_tokenizer

if TYPE_CHECKING:
    from peft import PeftModel
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


class MergeCheckError(UserError, RuntimeError):
    """The merged model does not reproduce base+adapter (or its saved copy does not reload the same)."""


# ---------------------------------------------------------------------------------------------
# 1. The plan: every refusal before any weight is loaded
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergePlan:
    """What a merge will do, decided and checked before any weight is loaded."""

    base_dir: Path
    adapter: AdapterInfo
    out_dir: Path
    merge_into: str
    quantization: str  # the quantisation reproduced before merging ("none": the original weights)
    double_quant: bool


def plan_merge(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    merge_into: str,
    quantization: str | None,
    double_quant: bool | None,
    overwrite: bool,
) -> MergePlan:
    """Check the inputs and the output and decide the merge target; raises a one-line error on refusal."""
    if merge_into not in MERGE_INTO:
        raise ValueError(f"--merge_into {merge_into!r}: use one of {', '.join(MERGE_INTO)}")
    adapter = read_adapter(adapter_dir, "--model_dir")
    if adapter.peft_type != "LORA":
        raise ValueError(
            f"--model_dir={adapter_dir} holds a {adapter.peft_type} adapter; only LoRA adapters change weights "
            "that can be merged (prompt/prefix tuning adds virtual tokens: load the base with --adapter_dir in "
            "predict.py instead)"
        )
    problem = output_path_problem(
        out_dir,
        "--save_model_dir",
        kind="dir",
        inputs={"--ori_model_dir": base_dir, "--model_dir": adapter_dir},
    )
    if problem:
        raise ValueError(problem)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--save_model_dir={out_dir} exists and is not empty: pass --overwrite to replace it, or choose "
            "a new directory"
        )
    check_adapter_fits_base(base_dir, adapter, base_flag="--ori_model_dir")
    trained = training_quantization(adapter, quantization, double_quant)
    if merge_into == "original":
        target = "none"
        if trained.quantization not in (None, "none"):
            logger.warning(
                "the adapter was trained on a %s-quantised base but is merged into the original weights: the "
                "merged model differs from the one training optimised (see docs/INFERENCE.md)",
                trained.quantization,
            )
    elif trained.quantization is None:
        raise ValueError(
            "--merge_into dequantized needs the adapter's training quantization, but the adapter has no "
            "train_args.json: pass --quantization nf4|fp4|int8|none (what training used), or --merge_into original"
        )
    else:
        target = trained.quantization
    logger.info(
        "training quantization: %s (from %s); merging into the %s base",
        trained.quantization,
        trained.source,
        f"{target}-dequantised" if target != "none" else "original",
    )
    return MergePlan(base_dir, adapter, out_dir, merge_into, target, trained.double_quant)


# ---------------------------------------------------------------------------------------------
# 2. The merge target and the reference
# ---------------------------------------------------------------------------------------------


def reference_name(quantization: str) -> str:
    """What "base + adapter" means for the merge check of a base reproduced with ``quantization``."""
    if quantization in ("nf4", "fp4"):
        return f"the {quantization} base + adapter (as in training, fp32 compute)"
    if quantization == "int8":
        # LLM.int8 also quantises the activations at run time, so the 8-bit model's logits are not a
        # weight-only reference: the dequantised base + unmerged adapter is.
        return "the int8-dequantised base + adapter"
    return "the original base + adapter"


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


def load_merge_target(
    plan: MergePlan, probes: list[list[int]], device: torch.device
) -> tuple[PeftModel, list[torch.Tensor]]:
    """The fp32 base the adapter is merged into, with the adapter attached, and the reference logits.

    The target's linear weights are the dequantised weights of the base quantised as in training (or the
    original weights). The reference is base + adapter as training computed it: for a 4-bit adapter the
    real 4-bit model (loaded once, also the source of the dequantised weights), else the target itself.
    """
    from peft import PeftModel

    model = load_base_model(plan.base_dir, "none", torch.float32, device_map={"": device})
    reference = None
    if plan.quantization != "none":
        quantized = load_base_model(
            plan.base_dir,
            plan.quantization,
            torch.float32,
            device_map={"": device},
            double_quant=plan.double_quant,
        )
        n = copy_dequantized_weights(quantized, model)
        logger.info("replaced %d linear weights by their %s-dequantised values", n, plan.quantization)
        if plan.quantization in ("nf4", "fp4"):
            keep_4bit_weights_unpacked(quantized)  # compute as training did
            reference = probe_logits(
                PeftModel.from_pretrained(quantized, str(plan.adapter.path)).eval(), probes
            )
        del quantized
        gc.collect()
    peft_model = PeftModel.from_pretrained(model, str(plan.adapter.path)).eval()
    if reference is None:
        reference = probe_logits(peft_model, probes)
    return peft_model, reference


# ---------------------------------------------------------------------------------------------
# 3. Saving, checked
# ---------------------------------------------------------------------------------------------


def _copy_remote_code(base_dir: Path, out_dir: Path, config: Any) -> list[str]:
    """Copy the base's custom-code files (``auto_map``, e.g. an official Baichuan2 download).

    Our own Baichuan2 is registered by ``models.register_models()`` and needs no files; the copy only
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
    """Write weights (sharded safetensors), config, generation_config and tokenizer files into ``out_dir``.

    Every file gets the permissions of a plain new file (the umask): transformers writes the weights through
    a private temporary file (0600), and a merged model is often loaded by another user or a serving process.
    """
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out_dir))
    # Files the base has and the save does not write: its generation settings, and the SentencePiece model that
    # transformers' fast tokenizers do not save (llama.cpp's GGUF export needs it; the vocabulary never changes).
    for name in ("generation_config.json", "tokenizer.model"):
        if (base_dir / name).is_file() and not (out_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    _copy_remote_code(base_dir, out_dir, model.config)
    restore_default_modes(out_dir)
    return sorted(p.name for p in out_dir.iterdir())


def round_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every parameter to ``dtype`` in place, keeping it stored in fp32.

    The reloaded directory, read back in fp32, must then reproduce the rounded model's logits exactly:
    same weights, same fp32 compute. (Casting the whole model instead would also cast buffers such as
    RoPE's inv_freq, which from_pretrained keeps in fp32, and the comparison would measure that.)
    """
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(dtype).float()


def save_verified(
    merged: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: MergePlan,
    probes: list[list[int]],
    staging: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    max_shard_size: str,
    tolerance: float,
) -> tuple[list[str], float]:
    """Save ``merged`` (already rounded to ``dtype``) into ``staging``, reload it and check its logits.
    Returns the files written and the reload difference; raises :class:`MergeCheckError` when they differ."""
    expected = probe_logits(merged, probes)
    merged = merged.to(dtype)
    try:
        files = save_merged(merged, tokenizer, staging, base_dir=plan.base_dir, max_shard_size=max_shard_size)
    except Exception as err:
        # A full disk, reported by the safetensors writer (Rust) as its own error type with the errno in its text.
        if isinstance(err, OSError) or f"os error {errno.ENOSPC}" in str(err) or "No space left" in str(err):
            code = err.errno if isinstance(err, OSError) and err.errno else errno.ENOSPC
            raise OSError(code, os.strerror(code), str(plan.out_dir)) from err
        raise
    del merged
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # make room for the reloaded copy
    reloaded = load_base_model(staging, "none", torch.float32, device_map={"": device}).eval()
    saved_diff = max_abs_diff(probe_logits(reloaded, probes), expected)
    del reloaded
    logger.info("save check: max |reloaded - merged| logits = %.3g", saved_diff)
    if not saved_diff <= tolerance:
        raise MergeCheckError(
            f"the saved model reloads with logits {saved_diff:.3g} away from the merged model: nothing written"
        )
    return files, saved_diff


# ---------------------------------------------------------------------------------------------
# The merge
# ---------------------------------------------------------------------------------------------


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
        DirectoryBusyError: another merge is writing ``out_dir`` now.
        OSError: e.g. a full disk while saving (``out_dir`` keeps its previous model).
    """
    device = torch.device(device)
    plan = plan_merge(
        Path(base_dir),
        Path(adapter_dir),
        Path(out_dir),
        merge_into=merge_into,
        quantization=quantization,
        double_quant=double_quant,
        overwrite=overwrite,
    )
    tokenizer = load_tokenizer(plan.adapter.path if plan.adapter.has_tokenizer else plan.base_dir)
    probes = probe_ids(tokenizer)

    # Taken before any weight is loaded: a second merge into the same output is refused at once, and the
    # leftovers of killed merges are deleted before this one needs the disk space.
    with replacing_dir(plan.out_dir) as staging:
        peft_model, reference = load_merge_target(plan, probes, device)
        merged = peft_model.merge_and_unload()
        diff = max_abs_diff(probe_logits(merged, probes), reference)
        described = reference_name(plan.quantization)
        logger.info("merge check: max |merged - base+adapter| logits = %.3g (reference: %s)", diff, described)
        if not diff <= tolerance:  # `not <=` also catches NaN
            raise MergeCheckError(
                f"merged logits differ from {described} by {diff:.3g} > --tolerance {tolerance}: nothing written"
            )

        round_to(merged, dtype)
        rounding = max_abs_diff(probe_logits(merged, probes), reference)
        logger.info("saving in %s moves the logits by up to %.3g", dtype, rounding)
        del peft_model
        files, saved_diff = save_verified(
            merged,
            tokenizer,
            plan,
            probes,
            staging,
            dtype=dtype,
            device=device,
            max_shard_size=max_shard_size,
            tolerance=tolerance,
        )
    return MergeReport(
        out_dir=str(plan.out_dir),
        merge_into=merge_into,
        quantization=plan.quantization,
        dtype=str(dtype).removeprefix("torch."),
        max_abs_diff=diff,
        reference=described,
        saved_max_abs_diff=saved_diff,
        dtype_rounding_diff=rounding,
        files=files,
    )
