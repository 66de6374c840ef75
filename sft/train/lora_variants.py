"""The LoRA variants beyond plain LoRA: DoRA, rsLoRA, PiSSA/OLoRA initialisation and LoRA+.

- DoRA (``--use_dora``) and rsLoRA (``--use_rslora``) are peft ``LoraConfig`` options; peft records them
  in ``adapter_config.json`` and every loader (inference, merge) honours them from there.
- PiSSA and OLoRA (``--lora_init pissa|olora``) start the adapter from the principal components (SVD) or
  a QR factorisation of each base weight W and subtract it from the base: training sees the residual
  base W_res = W - s*B0@A0 (s the LoRA scaling). An adapter trained that way is meaningless on the
  original W. :func:`sft.checkpoint.plain_lora.to_plain_lora` is peft's documented PiSSA/OLoRA-to-LoRA conversion
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
from typing import TYPE_CHECKING, Any

from torch import nn

from sft.train.args import LORA_INITS

if TYPE_CHECKING:
    from sft.train.args import TrainArgs

logger = logging.getLogger(__name__)

# Initialisations that subtract the initial adapter from the base weights.
BASE_CHANGING_INITS = ("pissa", "olora")


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


def lora_variant_problems(args: TrainArgs, *, cuda_available: bool, stage: int | None) -> list[str]:
    """The checks of the LoRA-variant and NEFTune flags (part of :func:`sft.train.validate.validate_args`).

    Args:
        args: the parsed arguments.
        cuda_available: whether training runs on GPUs.
        stage: the ZeRO stage of ``--ds_config`` (None when the config is unusable).
    """
    problems: list[str] = []
    if args.peft != "lora":
        lora_only = [
            name
            for name, is_set in (
                ("--use_dora", args.use_dora),
                ("--use_rslora", args.use_rslora),
                (f"--lora_init {args.lora_init}", args.lora_init != "default"),
                (f"--loraplus_lr_ratio {args.loraplus_lr_ratio}", args.loraplus_lr_ratio != 0),
            )
            if is_set
        ]
        if lora_only:
            problems.append(
                f"{', '.join(lora_only)} only apply to --peft lora (got --peft {args.peft}): drop them"
            )
    if changes_base_weights(args.lora_init) and args.quantization != "none":
        problems.append(
            f"--lora_init {args.lora_init} cannot train on a --quantization {args.quantization} base: it subtracts "
            "the initial adapter from the base weights, and a quantised base would have to be quantised again "
            "after that (peft refuses PiSSA on bitsandbytes weights; for OLoRA it re-quantises, so the trained "
            "model differs from the original base + adapter by a whole quantisation error that no merge or "
            "inference can reproduce); pass --quantization none, or --lora_init default/gaussian for QLoRA"
        )
    four_bit = args.quantization in ("nf4", "fp4")
    if args.use_dora and four_bit and stage == 3 and not cuda_available:
        problems.append(
            "--use_dora with a 4-bit base under ZeRO-3 does not run on the CPU: peft's CPU dequantisation for "
            "DoRA replaces the weight object that ZeRO-3 partitions; use ds_configs/zero2.json, or a GPU"
        )
    if args.loraplus_lr_ratio < 0:
        problems.append(
            f"--loraplus_lr_ratio={args.loraplus_lr_ratio} must be >= 0 (0 = off; LoRA+ uses ~16)"
        )
    if args.neftune_alpha < 0:
        problems.append(f"--neftune_alpha={args.neftune_alpha} must be >= 0 (0 = off; NEFTune uses 5-15)")
    if args.pissa_niter < 0:
        problems.append(f"--pissa_niter={args.pissa_niter} must be >= 0 (0 = exact SVD)")
    return problems
