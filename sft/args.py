"""TrainArgs: the one typed argument object of train.py, made of argument groups that other scripts reuse.

Every field has one help string and becomes one command-line flag of the same name (see
:mod:`sft.cli`); ``python train.py --help`` shows one section per group below. The flag names of the
RolePlayProj recipe are kept (``--ds_file`` is an alias of ``--ds_config``) so its users can switch.
Arguments are checked once by :func:`validate_args`, which collects every problem and raises them
together, each naming the flag and the fix.

Groups: :class:`ModelArgs`, :class:`AdapterArgs`, :class:`DataArgs` (also ``evaluate.py ppl`` and
``predict.py``), :class:`OptimArgs`, :class:`DistributedArgs`, :class:`OutputArgs`. The DeepSpeed
config (``--ds_config``) is completed from these flags by :func:`sft.ds_config.build_ds_config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.checkpoint import resume_dir_problem
from sft.cli import ArgsError, HelpFormatter, add_arguments, flag, output_path_problem, require_local_dir
from sft.data.templates import LOSS_PLACEMENTS, TEMPLATE_NAMES
from sft.ds_config import DEFAULT_DS_CONFIG, build_ds_config, ds_config_path, zero_stage
from sft.kernels import liger_problem
from sft.lora_variants import LORA_INITS, changes_base_weights
from sft.modeling import PRECISIONS, QUANTIZATIONS

PEFT_METHODS = ("lora", "prompt_tuning", "p_tuning", "prefix_tuning")
LR_SCHEDULERS = ("cosine", "linear", "constant")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
PROMPT_LEARNING = ("prompt_tuning", "p_tuning", "prefix_tuning")


@dataclass
class ModelArgs:
    """Model: which base model, and how it is loaded and computed."""

    model_name_or_path: str = flag(
        "",
        "Local directory of the base model (config, weights, tokenizer). Required; hub ids are not downloaded.",
    )
    attn_implementation: str = flag(
        "sdpa",
        "Attention kernel of the base model; flash_attention_2 needs a GPU and the flash-attn package.",
        choices=ATTN_IMPLEMENTATIONS,
    )
    quantization: str = flag(
        "nf4",
        "Storage of the frozen base weights: nf4/fp4 (4-bit QLoRA), int8, or none.",
        choices=QUANTIZATIONS,
    )
    double_quant: bool = flag(
        True, "Quantise the 4-bit quantisation constants too (saves ~0.4 bit/param); 4-bit only."
    )
    precision: str = flag(
        "bf16",
        "Compute precision of the DeepSpeed engine and of the 4-bit matmuls; fp16 needs a GPU.",
        choices=PRECISIONS,
    )
    gradient_checkpointing: bool = flag(
        False, "Recompute activations in the backward pass: much less memory, ~30% slower."
    )
    liger: bool = flag(
        False,
        "Experimental: Liger Kernel's Triton RMSNorm, SwiGLU, RoPE and fused linear cross-entropy (CUDA GPU, "
        "pip install liger-kernel); Llama-family models and Baichuan2.",
    )
    torch_compile: bool = flag(
        False,
        "Experimental: torch.compile each decoder layer (first steps slower while it compiles); not with ZeRO-3.",
    )


@dataclass
class AdapterArgs:
    """Adapters: what is trained on top of the frozen base."""

    peft: str = flag("lora", "Which peft method to train.", choices=PEFT_METHODS)
    lora_dim: int = flag(16, "LoRA rank r.")
    lora_alpha: int = flag(64, "LoRA scaling numerator: the update is scaled by lora_alpha / lora_dim.")
    lora_dropout: float = flag(0.1, "Dropout on the LoRA input.")
    lora_target: str = flag(
        "",
        "Comma-separated module names to wrap with LoRA. Default: every linear layer except the output head, "
        "discovered from the model (Baichuan2: W_pack,o_proj,gate_proj,up_proj,down_proj; "
        "Llama: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).",
    )
    num_virtual_tokens: int = flag(20, "Virtual tokens for --peft prompt_tuning / p_tuning / prefix_tuning.")
    use_dora: bool = flag(
        False,
        "DoRA: LoRA on the direction of each weight plus a trained magnitude vector per output row "
        "(peft use_dora; each forward also reads the whole base weight for its norm: slower steps).",
    )
    use_rslora: bool = flag(
        False, "rsLoRA: scale the update by lora_alpha / sqrt(lora_dim) instead of lora_alpha / lora_dim."
    )
    lora_init: str = flag(
        "default",
        "LoRA initialisation: default (B=0), gaussian (A ~ N(0, 1/r), B=0), pissa (principal singular "
        "components of W, subtracted from the base) or olora (QR of W, subtracted from the base); pissa and "
        "olora need --quantization none and are saved as plain LoRA relative to the original base.",
        choices=LORA_INITS,
    )
    pissa_niter: int = flag(
        16, "--lora_init pissa: iterations of the randomised SVD (peft pissa_niter_N); 0 = exact SVD (slow)."
    )

    @property
    def lora_target_modules(self) -> list[str]:
        """``--lora_target`` split into module names (empty list = discover from the model)."""
        return [name.strip() for name in self.lora_target.split(",") if name.strip()]


@dataclass
class DataArgs:
    """Data: files, chat template, lengths and batching of the examples."""

    train_path: str = flag("", "Training conversations (JSONL, see docs/DATA.md). Required.")
    test_path: str = flag(
        "", "Held-out conversations: perplexity at every save step and epoch end; empty = no evaluation."
    )
    template: str = flag(
        "",
        "Chat template: tokenizer (the model's own jinja template), baichuan2, llama2, llama3, alpaca or chatml; "
        "default: the tokenizer's own template when it has one, else by model type (docs/DATA.md).",
    )
    max_len: int = flag(1024, "Maximum tokens of one training example (prompt + answer).")
    max_src_len: int = flag(256, "Maximum tokens of the prompt part of an example.")
    is_skip: bool = flag(
        False, "Skip examples longer than --max_len / --max_src_len instead of truncating them."
    )
    loss_on: str = flag(
        "all",
        "Which assistant turns are learned: all, only the last, or each turn as its own example.",
        choices=LOSS_PLACEMENTS,
    )
    packing: bool = flag(
        False, "Pack several examples into each row of --max_len tokens (no cross-attention)."
    )
    group_by_length: bool = flag(False, "Batch examples of similar length together (less padding).")
    data_cache_dir: str = flag("", "Directory to cache tokenised data sets in; empty = no cache.")


@dataclass
class OptimArgs:
    """Optimisation: batch sizes, learning rate and schedule, length of the run."""

    per_device_train_batch_size: int = flag(2, "Micro-batch size per process.")
    per_device_eval_batch_size: int = flag(4, "Batch size per process for evaluation.")
    gradient_accumulation_steps: int = flag(4, "Micro-batches accumulated into one optimizer step.")
    learning_rate: float = flag(1e-4, "Peak learning rate of the AdamW optimizer.")
    weight_decay: float = flag(0.1, "AdamW weight decay.")
    max_grad_norm: float = flag(
        1.0, "Clip the global gradient norm to this value (DeepSpeed gradient_clipping); 0 = off."
    )
    num_train_epochs: int = flag(1, "Passes over the training data.")
    max_steps: int = flag(
        -1, "Stop after this many optimizer steps (overrides --num_train_epochs); -1 = off."
    )
    warmup_ratio: float = flag(
        0.03, "Fraction of the optimizer steps spent warming the learning rate up from 0."
    )
    lr_scheduler: str = flag("cosine", "Learning-rate schedule after warm-up.", choices=LR_SCHEDULERS)
    loraplus_lr_ratio: float = flag(
        0.0,
        "LoRA+: train the LoRA B matrices at --learning_rate times this ratio (the paper suggests 16); "
        "0 = off.",
    )
    neftune_alpha: float = flag(
        0.0,
        "NEFTune: add uniform noise scaled by alpha / sqrt(seq_len * hidden) to the input embeddings "
        "while training (the paper uses 5-15); 0 = off.",
    )
    seed: int = flag(1234, "Random seed (data order, adapter initialisation, dropout).")
    max_bad_steps: int = flag(
        10,
        "Stop after this many optimizer steps in a row with a non-finite loss or gradient norm (each one's "
        "update is skipped on every rank); 0 = never stop.",
    )


@dataclass
class DistributedArgs:
    """DeepSpeed and distributed training."""

    ds_config: str = flag(
        DEFAULT_DS_CONFIG,
        'DeepSpeed JSON config: a path, or a bundled ds_configs/*.json from any directory; its "auto" values '
        "are filled from these flags.",
        aliases=("--ds_file",),
    )
    local_rank: int = flag(
        -1,
        "Set by the deepspeed launcher; the rank of this process on its node.",
        aliases=("--local-rank",),  # torch.distributed.launch spells it with a dash
    )


@dataclass
class OutputArgs:
    """Output, logging and checkpoints."""

    output_dir: str = flag("output", "Directory for checkpoints epoch-E-step-S/ and TensorBoard runs/.")
    show_loss_step: int = flag(10, "Log loss, learning rate and throughput every N optimizer steps.")
    save_model_step: int = flag(
        100,
        "Evaluate and save a checkpoint every N optimizer steps (also at the end of each epoch); 0 = epoch ends only.",
    )
    save_total_limit: int = flag(
        0, "Keep only the newest N checkpoints (plus the best by perplexity); 0 = keep all."
    )
    resume_from_checkpoint: str = flag(
        "",
        "Continue a run from a checkpoint directory, or 'latest' for the newest complete one in --output_dir "
        "(a fresh start when there is none yet).",
    )
    tensorboard_dir: str = flag("", "TensorBoard log directory; default: <output_dir>/runs.")

    @property
    def tensorboard_path(self) -> Path:
        """Where TensorBoard event files go."""
        return Path(self.tensorboard_dir) if self.tensorboard_dir else Path(self.output_dir) / "runs"


@dataclass
class TrainArgs(OutputArgs, DistributedArgs, OptimArgs, DataArgs, AdapterArgs, ModelArgs):
    """Every setting of a training run (the groups above, flattened). See docs/TRAINING.md."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (saved as train_args.json next to each checkpoint)."""
        return dataclasses.asdict(self)


def build_parser() -> Any:
    """argparse parser generated from :class:`TrainArgs`: one flag per field, one section per group."""
    from sft.cli import ArgumentParser  # one-line errors for bad flags (exit status 2)

    parser = ArgumentParser(
        description="QLoRA/LoRA supervised fine-tuning under DeepSpeed (see docs/TRAINING.md).",
        formatter_class=HelpFormatter,
    )
    add_arguments(parser, TrainArgs)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    """Parse the command line into a :class:`TrainArgs` (not yet validated)."""
    return TrainArgs(**vars(build_parser().parse_args(argv)))


def validate_args(args: TrainArgs, *, cuda_available: bool | None = None) -> None:
    """Check every argument and every combination once, before any work.

    Collects all problems and raises one :class:`ArgsError` that lists them, each naming the flag and
    the fix. File checks cover paths only (data files are validated line by line when they are read).

    Args:
        args: the parsed arguments.
        cuda_available: override GPU detection (tests); default ``torch.cuda.is_available()``.
    """
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    problems: list[str] = []

    try:
        require_local_dir(args.model_name_or_path, "--model_name_or_path")
    except ValueError as err:
        problems.append(f"{err} (build a tiny demo model with: python -m models.tiny --out tiny_model)")
    if not args.train_path:
        problems.append("--train_path is required: a JSONL file of conversations (see docs/TRAINING.md)")
    elif not Path(args.train_path).is_file():
        problems.append(f"--train_path={args.train_path} is not a file: pass an existing JSONL file")
    if args.test_path and not Path(args.test_path).is_file():
        problems.append(
            f"--test_path={args.test_path} is not a file: pass an existing JSONL file or leave it empty"
        )

    positive = (
        "max_len",
        "max_src_len",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "show_loss_step",
        "lora_dim",
        "lora_alpha",
        "num_virtual_tokens",
    )
    for name in positive:
        if getattr(args, name) <= 0:
            problems.append(f"--{name}={getattr(args, name)} must be a positive integer")
    if args.max_src_len >= args.max_len > 0:
        problems.append(
            f"--max_src_len={args.max_src_len} must be smaller than --max_len={args.max_len} "
            "to leave room for the answer"
        )
    if args.max_steps == 0 or args.max_steps < -1:
        problems.append(
            f"--max_steps={args.max_steps}: pass a positive number of steps, or -1 to train by epochs"
        )
    if args.save_model_step < 0:
        problems.append(
            f"--save_model_step={args.save_model_step} must be >= 0 (0 = save at epoch ends only)"
        )
    if args.max_bad_steps < 0:
        problems.append(
            f"--max_bad_steps={args.max_bad_steps} must be >= 0 (0 = never stop on non-finite steps)"
        )
    if args.save_total_limit < 0:
        problems.append(f"--save_total_limit={args.save_total_limit} must be >= 0 (0 = keep all checkpoints)")
    if args.learning_rate <= 0:
        problems.append(f"--learning_rate={args.learning_rate} must be > 0")
    if args.weight_decay < 0:
        problems.append(f"--weight_decay={args.weight_decay} must be >= 0")
    if args.max_grad_norm < 0:
        problems.append(f"--max_grad_norm={args.max_grad_norm} must be >= 0 (0 = no clipping)")
    if not 0 <= args.warmup_ratio < 1:
        problems.append(f"--warmup_ratio={args.warmup_ratio} must be in [0, 1)")
    if not 0 <= args.lora_dropout < 1:
        problems.append(f"--lora_dropout={args.lora_dropout} must be in [0, 1)")

    if args.precision == "fp16" and not cuda_available:
        problems.append(
            "--precision fp16 needs a GPU: DeepSpeed's CPU accelerator has no fp16 training; use --precision bf16 or fp32"
        )
    if args.quantization == "int8" and not cuda_available:
        problems.append(
            "--quantization int8 needs a GPU (bitsandbytes' LLM.int8 matmul is CUDA-only); "
            "use --quantization nf4 or none on CPU"
        )
    if args.double_quant is False and args.quantization not in ("nf4", "fp4"):
        problems.append(
            "--no-double_quant only applies to 4-bit bases: drop it or pass --quantization nf4/fp4"
        )
    if args.liger and liger_problem(cuda_available):
        problems.append(liger_problem(cuda_available))
    if args.attn_implementation == "flash_attention_2" and not cuda_available:
        problems.append("--attn_implementation flash_attention_2 needs a GPU: use sdpa or eager")
    if args.attn_implementation == "flash_attention_2" and args.precision == "fp32":
        # flash-attn has fp16/bf16 kernels only; transformers hands it the fp32 activations and it fails at the
        # first forward.
        problems.append(
            "--attn_implementation flash_attention_2 computes in fp16/bf16 only, not with --precision fp32: "
            "use --precision bf16 (or fp16), or --attn_implementation sdpa to train in fp32"
        )
    if args.template and args.template not in TEMPLATE_NAMES:
        problems.append(f"--template {args.template} is unknown: choose one of {', '.join(TEMPLATE_NAMES)}")
    if args.packing and args.group_by_length:
        problems.append(
            "--group_by_length has no effect with --packing (rows are all ~max_len): drop one of them"
        )
    if args.peft != "lora" and args.lora_target:
        problems.append(
            f"--lora_target only applies to --peft lora (got --peft {args.peft}): drop --lora_target"
        )
    if args.packing and args.peft in PROMPT_LEARNING:
        problems.append(
            f"--packing cannot be combined with --peft {args.peft}: virtual tokens are prepended to each row, "
            "so they would be shared across the packed documents; drop --packing or use --peft lora"
        )

    for name in ("output_dir", "tensorboard_dir", "data_cache_dir"):
        if getattr(args, name):
            problem = output_path_problem(getattr(args, name), f"--{name}", kind="dir")
            if problem:
                problems.append(problem)

    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        problem = resume_dir_problem(args.resume_from_checkpoint)
        if problem:
            problems.append(problem)

    stage = None  # the ZeRO stage, once the DeepSpeed config is known to be usable
    if not ds_config_path(args.ds_config).is_file():
        problems.append(f"--ds_config={args.ds_config} does not exist: pass one of ds_configs/*.json")
    else:
        try:
            # Launchers set WORLD_SIZE before we start: an explicit train_batch_size is checked against it.
            stage = zero_stage(build_ds_config(args, world_size=int(os.environ.get("WORLD_SIZE", "1"))))
            if args.torch_compile and stage == 3:
                problems.append(
                    "--torch_compile cannot be combined with ZeRO-3 (its parameter gathering hooks break the "
                    "compiled graphs): use ds_configs/zero2.json or drop --torch_compile"
                )
        except ArgsError as err:
            problems.extend(err.problems)
        except json.JSONDecodeError as err:
            problems.append(
                f"--ds_config={args.ds_config}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
            )
        except UnicodeDecodeError as err:
            problems.append(
                f"--ds_config={args.ds_config} is not UTF-8 text ({err.reason}): pass a JSON file"
            )

    problems.extend(lora_variant_problems(args, cuda_available=cuda_available, stage=stage))

    if problems:
        raise ArgsError(problems)


def lora_variant_problems(args: TrainArgs, *, cuda_available: bool, stage: int | None) -> list[str]:
    """The checks of the LoRA-variant and NEFTune flags (part of :func:`validate_args`).

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


if __name__ == "__main__":
    # python -m sft.args --update-docs: rewrite the flag tables of docs/TRAINING.md from the help texts above.
    import sys

    from sft.cli import flag_table, replace_generated

    if sys.argv[1:] != ["--update-docs"]:
        sys.exit("usage: python -m sft.args --update-docs")
    replace_generated(
        Path(__file__).resolve().parent.parent / "docs" / "TRAINING.md", "train-flags", flag_table(TrainArgs)
    )
