"""TrainArgs: the one typed argument object of train.py.

Every field has one help string (its ``metadata["help"]``) and becomes one
command-line flag of the same name. The flag names of the RolePlayProj recipe
are kept (``--ds_file`` is an alias of ``--ds_config``) so its users can
switch. Arguments are checked once by :func:`validate_args`, which collects
every problem and raises them together, each naming the flag and the fix.

The DeepSpeed config (``--ds_config``) is completed by :func:`build_ds_config`:
values marked ``"auto"`` are filled from the flags, and a value written in the
config that disagrees with the flag is an error (never silently overwritten).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DS_CONFIG = REPO_ROOT / "ds_configs" / "zero2.json"

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
PEFT_METHODS = ("lora", "prompt_tuning", "p_tuning", "prefix_tuning")
PRECISIONS = ("bf16", "fp16", "fp32")
LR_SCHEDULERS = ("cosine", "linear", "constant")
LOSS_ON = ("all", "last", "each")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


class ArgsError(ValueError):
    """Raised with every problem found in the arguments, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid arguments:\n  - " + "\n  - ".join(problems))


def _flag(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field that carries its help text (and optional argparse ``choices``)."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainArgs:
    """Every setting of a training run. See docs/TRAINING.md for a guided tour."""

    # --- model -----------------------------------------------------------------------------------------
    model_name_or_path: str = _flag(
        "",
        "Local directory of the base model (config, weights, tokenizer). Required; hub ids are not downloaded.",
    )
    attn_implementation: str = _flag(
        "sdpa",
        "Attention kernel of the base model; flash_attention_2 needs a GPU and the flash-attn package.",
        choices=ATTN_IMPLEMENTATIONS,
    )
    quantization: str = _flag(
        "nf4",
        "Storage of the frozen base weights: nf4/fp4 (4-bit QLoRA), int8, or none.",
        choices=QUANTIZATIONS,
    )
    double_quant: bool = _flag(
        True, "Quantise the 4-bit quantisation constants too (saves ~0.4 bit/param); 4-bit only."
    )
    precision: str = _flag(
        "bf16",
        "Compute precision of the DeepSpeed engine and of the 4-bit matmuls; fp16 needs a GPU.",
        choices=PRECISIONS,
    )
    gradient_checkpointing: bool = _flag(
        False, "Recompute activations in the backward pass: much less memory, ~30% slower."
    )
    # --- adapters ---------------------------------------------------------------------------------------
    peft: str = _flag("lora", "Which peft method to train.", choices=PEFT_METHODS)
    lora_dim: int = _flag(16, "LoRA rank r.")
    lora_alpha: int = _flag(64, "LoRA scaling numerator: the update is scaled by lora_alpha / lora_dim.")
    lora_dropout: float = _flag(0.1, "Dropout on the LoRA input.")
    lora_target: str = _flag(
        "",
        "Comma-separated module names to wrap with LoRA (e.g. W_pack,o_proj). "
        "Default: every linear layer except the output head, discovered from the model.",
    )
    num_virtual_tokens: int = _flag(20, "Virtual tokens for --peft prompt_tuning / p_tuning / prefix_tuning.")
    # --- data -------------------------------------------------------------------------------------------
    train_path: str = _flag("", "Training conversations (JSONL, see docs). Required.")
    test_path: str = _flag("", "Held-out conversations for perplexity at save steps; empty = no evaluation.")
    template: str = _flag(
        "", "Chat template name; default: the tokenizer's own chat template, else by model type."
    )
    max_len: int = _flag(1024, "Maximum tokens of one training example (prompt + answer).")
    max_src_len: int = _flag(256, "Maximum tokens of the prompt part of an example.")
    is_skip: bool = _flag(
        False, "Skip examples longer than --max_len / --max_src_len instead of truncating them."
    )
    loss_on: str = _flag(
        "all",
        "Which assistant turns are learned: all, only the last, or each turn as its own example.",
        choices=LOSS_ON,
    )
    packing: bool = _flag(
        False, "Pack several examples into each row of --max_len tokens (no cross-attention)."
    )
    group_by_length: bool = _flag(False, "Batch examples of similar length together (less padding).")
    data_cache_dir: str = _flag("", "Directory to cache tokenised data sets in; empty = no cache.")
    # --- optimisation -----------------------------------------------------------------------------------
    per_device_train_batch_size: int = _flag(2, "Micro-batch size per process.")
    per_device_eval_batch_size: int = _flag(4, "Batch size per process for evaluation.")
    gradient_accumulation_steps: int = _flag(4, "Micro-batches accumulated into one optimizer step.")
    learning_rate: float = _flag(1e-4, "Peak learning rate of the AdamW optimizer.")
    weight_decay: float = _flag(0.1, "AdamW weight decay.")
    max_grad_norm: float = _flag(
        1.0, "Clip the global gradient norm to this value (DeepSpeed gradient_clipping); 0 = off."
    )
    num_train_epochs: int = _flag(1, "Passes over the training data.")
    max_steps: int = _flag(
        -1, "Stop after this many optimizer steps (overrides --num_train_epochs); -1 = off."
    )
    warmup_ratio: float = _flag(
        0.03, "Fraction of the optimizer steps spent warming the learning rate up from 0."
    )
    lr_scheduler: str = _flag("cosine", "Learning-rate schedule after warm-up.", choices=LR_SCHEDULERS)
    seed: int = _flag(1234, "Random seed (data order, adapter initialisation, dropout).")
    # --- DeepSpeed and distributed ----------------------------------------------------------------------
    ds_config: str = _flag(
        str(DEFAULT_DS_CONFIG),
        'DeepSpeed JSON config (ds_configs/*.json); its "auto" values are filled from these flags. Alias: --ds_file.',
    )
    local_rank: int = _flag(-1, "Set by the deepspeed launcher; the rank of this process on its node.")
    # --- output, logging, checkpoints -------------------------------------------------------------------
    output_dir: str = _flag("output", "Directory for checkpoints epoch-E-step-S/ and TensorBoard runs/.")
    show_loss_step: int = _flag(10, "Log loss, learning rate and throughput every N optimizer steps.")
    save_model_step: int = _flag(
        100,
        "Evaluate and save a checkpoint every N optimizer steps (also at the end of each epoch); 0 = epoch ends only.",
    )
    save_total_limit: int = _flag(
        0, "Keep only the newest N checkpoints (plus the best by perplexity); 0 = keep all."
    )
    resume_from_checkpoint: str = _flag(
        "", "Continue a run from a checkpoint directory, or 'latest' for the newest one in --output_dir."
    )
    tensorboard_dir: str = _flag("", "TensorBoard log directory; default: <output_dir>/runs.")

    # ---------------------------------------------------------------------------------------------------
    @property
    def lora_target_modules(self) -> list[str]:
        """``--lora_target`` split into module names (empty list = discover from the model)."""
        return [name.strip() for name in self.lora_target.split(",") if name.strip()]

    @property
    def tensorboard_path(self) -> Path:
        """Where TensorBoard event files go."""
        return Path(self.tensorboard_dir) if self.tensorboard_dir else Path(self.output_dir) / "runs"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (saved as train_args.json next to each checkpoint)."""
        return dataclasses.asdict(self)


def _field_type(f: dataclasses.Field) -> type:
    """The runtime type of a dataclass field (annotations are strings under ``from __future__``)."""
    hints = typing.get_type_hints(TrainArgs)
    tp = hints[f.name]
    if isinstance(tp, types.UnionType):  # pragma: no cover - no optional fields today
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    return tp


def build_parser() -> argparse.ArgumentParser:
    """argparse parser generated from :class:`TrainArgs`: one flag per field, same name, same help."""
    parser = argparse.ArgumentParser(
        description="QLoRA/LoRA supervised fine-tuning under DeepSpeed (see docs/TRAINING.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainArgs):
        tp = _field_type(f)
        names = [f"--{f.name}"]
        if f.name == "ds_config":
            names.append("--ds_file")  # the recipe's name for the same flag
        if f.name == "local_rank":
            names.append("--local-rank")  # torch.distributed.launch spells it with a dash
        # argparse %-formats help strings ("%(default)s"): a literal % (e.g. "~30% slower") must be doubled.
        help_text = f.metadata["help"].replace("%", "%%")
        kwargs: dict[str, Any] = {"default": f.default, "help": help_text, "dest": f.name}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(*names, **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    """Parse the command line into a :class:`TrainArgs` (not yet validated)."""
    namespace = build_parser().parse_args(argv)
    return TrainArgs(**vars(namespace))


def validate_args(args: TrainArgs, *, cuda_available: bool | None = None) -> None:
    """Check every argument and every combination once, before any work.

    Collects all problems and raises one :class:`ArgsError` that lists them, each naming the flag and
    the fix. File checks cover paths only (data files are validated line by line when they are read).

    Args:
        args: the parsed arguments.
        cuda_available: override GPU detection (tests); default ``torch.cuda.is_available()``.
    """
    from utils import require_local_dir

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
    if args.attn_implementation == "flash_attention_2" and not cuda_available:
        problems.append("--attn_implementation flash_attention_2 needs a GPU: use sdpa or eager")
    from sft.data.templates import TEMPLATE_NAMES

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
    if args.packing and args.peft in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        problems.append(
            f"--packing cannot be combined with --peft {args.peft}: virtual tokens are prepended to each row, "
            "so they would be shared across the packed documents; drop --packing or use --peft lora"
        )

    problems.extend(_output_dir_problems(args.output_dir, "--output_dir"))
    if args.tensorboard_dir:
        problems.extend(_output_dir_problems(args.tensorboard_dir, "--tensorboard_dir"))
    if args.data_cache_dir:
        problems.extend(_output_dir_problems(args.data_cache_dir, "--data_cache_dir"))

    resume = args.resume_from_checkpoint
    if resume and resume != "latest":
        if not (Path(resume) / "training_state").is_dir():
            problems.append(
                f"--resume_from_checkpoint={resume} is not a checkpoint directory "
                "(no training_state/ inside): pass an <output_dir>/epoch-E-step-S directory or 'latest'"
            )
        elif not (Path(resume) / "trainer_state.json").is_file():
            problems.append(
                f"--resume_from_checkpoint={resume}: trainer_state.json is missing, so its save was interrupted; "
                "pass an older checkpoint directory or 'latest' (the newest complete one)"
            )

    if not Path(args.ds_config).is_file():
        problems.append(f"--ds_config={args.ds_config} does not exist: pass one of ds_configs/*.json")
    else:
        try:
            # Launchers set WORLD_SIZE before we start: an explicit train_batch_size is checked against it.
            build_ds_config(args, world_size=int(os.environ.get("WORLD_SIZE", "1")))
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

    if problems:
        raise ArgsError(problems)


def _output_dir_problems(path: str, flag: str) -> list[str]:
    """Why ``path`` cannot be created or written as a directory (empty list when it can).

    Checked before any work so a typo does not cost a model load; the nearest existing ancestor decides.
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        return [f"{flag}={path} is a file: pass a directory (it is created if missing)"]
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"{flag}={path} cannot be created: {existing} is a file, not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [
            f"{flag}={path} is not writable ({existing} denies write access): pass a directory you can write to"
        ]
    return []


def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a DeepSpeed JSON config."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# Sections of a DeepSpeed config that must be JSON objects; a scalar there (`"bf16": true`) would otherwise
# fail deep inside DeepSpeed or here with an AttributeError.
_DS_SECTIONS = ("bf16", "fp16", "optimizer", "zero_optimization")


def zero_stage(ds_config: dict[str, Any]) -> int:
    """ZeRO stage of a (filled or raw) DeepSpeed config; 0 when absent."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_ds_config(args: TrainArgs, world_size: int) -> dict[str, Any]:
    """Read ``--ds_config`` and fill every ``"auto"`` value from the flags.

    A value written explicitly in the config must equal what the flags say; otherwise this raises an
    :class:`ArgsError` naming the config key, the flag and the fix. Sections the training loop owns
    (``scheduler``) must not appear: the learning-rate schedule comes from ``--lr_scheduler``.

    Args:
        args: validated arguments.
        world_size: number of training processes (for ``train_batch_size``).

    Returns:
        A complete DeepSpeed config dict for ``deepspeed.initialize``.
    """
    config = load_ds_config(args.ds_config)
    name = Path(args.ds_config).name
    if not isinstance(config, dict):
        raise ArgsError(
            [f"{name}: the DeepSpeed config must be a JSON object {{...}}, got {type(config).__name__}"]
        )
    sections = {key: config[key] for key in _DS_SECTIONS if key in config}
    if isinstance(config.get("optimizer"), dict) and "params" in config["optimizer"]:
        sections["optimizer.params"] = config["optimizer"]["params"]
    wrong = [key for key, value in sections.items() if not isinstance(value, dict)]
    if wrong:
        raise ArgsError(
            [f"{name}: {key} must be a JSON object {{...}}, got {json.dumps(sections[key])}" for key in wrong]
        )
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ArgsError([f"{name}: zero_optimization.stage={stage!r} must be 0, 1, 2 or 3"])
    problems: list[str] = []

    def fill(section: dict[str, Any], key: str, value: Any, flag: str, where: str) -> None:
        current = section.get(key, "auto")
        if current == "auto":
            section[key] = value
        elif current != value:
            problems.append(
                f"{name} sets {where}={current!r} but {flag} gives {value!r}: "
                f'make them equal or write "auto" in the config'
            )

    micro = args.per_device_train_batch_size
    accum = args.gradient_accumulation_steps
    fill(
        config,
        "train_micro_batch_size_per_gpu",
        micro,
        "--per_device_train_batch_size",
        "train_micro_batch_size_per_gpu",
    )
    fill(
        config,
        "gradient_accumulation_steps",
        accum,
        "--gradient_accumulation_steps",
        "gradient_accumulation_steps",
    )
    fill(
        config,
        "train_batch_size",
        micro * accum * world_size,
        "--per_device_train_batch_size x --gradient_accumulation_steps x world size",
        "train_batch_size",
    )
    fill(config, "gradient_clipping", args.max_grad_norm, "--max_grad_norm", "gradient_clipping")

    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {})
        fill(
            section,
            "enabled",
            args.precision == precision,
            f"--precision {args.precision}",
            f"{precision}.enabled",
        )

    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    fill(params, "lr", args.learning_rate, "--learning_rate", "optimizer.params.lr")
    fill(params, "weight_decay", args.weight_decay, "--weight_decay", "optimizer.params.weight_decay")

    if "scheduler" in config:
        problems.append(
            f'{name} has a "scheduler" section, but the schedule comes from --lr_scheduler/--warmup_ratio: '
            "remove the section from the config"
        )

    leftover = _find_auto(config)
    if leftover:
        problems.append(f"{name}: no flag fills {', '.join(leftover)}; write explicit values there")
    if problems:
        raise ArgsError(problems)
    return config


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every value still equal to "auto"."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.extend(_find_auto(value, f"{prefix}{key}."))
    elif node == "auto":
        found.append(prefix.rstrip("."))
    return found
