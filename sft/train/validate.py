"""Every training flag and combination checked once, before any work (:func:`validate_args`).

All problems are collected and raised together as one :class:`sft.core.errors.ArgsError`, each naming the flag
and the fix. The checks that need a module's knowledge are asked of that module: the DeepSpeed config
(:mod:`sft.train.ds_config`), the LoRA variants (:func:`sft.train.lora_variants.lora_variant_problems`),
optional kernels (:func:`sft.train.kernels.liger_problem`), resumable checkpoints
(:func:`sft.checkpoint.layout.resume_dir_problem`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sft.checkpoint.adapters import read_adapter
from sft.checkpoint.layout import resume_dir_problem
from sft.core.errors import ArgsError
from sft.core.paths import output_path_problem, require_local_dir
from sft.data.templates import TEMPLATE_NAMES
from sft.train.args import PROMPT_LEARNING, TrainArgs
from sft.train.ds_config import build_ds_config, ds_config_path, zero_stage
from sft.train.kernels import liger_problem
from sft.train.lora_variants import lora_variant_problems
from sft.train.objectives.preference import preference_problems


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
            stage = zero_stage(
                build_ds_config(
                    args,
                    path=args.ds_config,
                    precision=args.precision,
                    world_size=int(os.environ.get("WORLD_SIZE", "1")),
                )
            )
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
    problems.extend(preference_problems(args))
    problems.extend(init_adapter_problems(args))

    if problems:
        raise ArgsError(problems)


def init_adapter_problems(args: TrainArgs) -> list[str]:
    """``--init_adapter`` must be a LoRA adapter directory, and it brings its own LoRA settings."""
    if not args.init_adapter:
        return []
    try:
        info = read_adapter(args.init_adapter, "--init_adapter")
    except (OSError, ValueError) as err:
        return [str(err)]
    problems = []
    if info.peft_type != "LORA":
        problems.append(
            f"--init_adapter {args.init_adapter} is a {info.peft_type} adapter: pass a LoRA adapter"
        )
    defaults = TrainArgs()
    shaping = [
        f"--{name}"
        for name in ("peft", "lora_dim", "lora_alpha", "lora_target", "use_dora", "use_rslora", "lora_init")
        if getattr(args, name) != getattr(defaults, name)
    ]
    if shaping:
        problems.append(
            f"{', '.join(shaping)}: --init_adapter brings its own LoRA settings (r={info.config.get('r')}); "
            "drop these flags"
        )
    return problems
