"""The DeepSpeed config of a run: ``--ds_config`` read, its ``"auto"`` values filled from the flags, checked.

A value written explicitly in the config must equal what the flags say; otherwise
:func:`build_ds_config` raises an :class:`~sft.core.errors.ArgsError` naming the config key, the flag and the
fix (never silently overwritten). Sections the training loop owns (``scheduler``) must not appear.

Two defaults are added where the config leaves them out (a value written there wins):

- ``optimizer.params.torch_adam: true`` for Adam/AdamW: DeepSpeed then steps torch's AdamW (foreach
  kernels on CUDA) instead of building its FusedAdam (or, with an offloaded optimizer, DeepSpeedCPUAdam)
  with nvcc/g++ at the first ``deepspeed.initialize``. An adapter has few parameters, so the fused kernel
  saves nothing worth a compiler dependency, and a missing or mismatching nvcc would stop the run
  before step 1.
- ``data_types.grad_accum_dtype: "fp32"`` under ``--precision bf16`` with ZeRO 1-3: DeepSpeed
  otherwise accumulates the micro-batch gradients in bf16 (8 significant bits), which loses the small
  contributions of long accumulation windows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft.core.errors import ArgsError

if TYPE_CHECKING:
    from sft.train.args import OptimArgs

REPO_ROOT = Path(__file__).resolve().parents[2]


def ds_config_path(value: str | os.PathLike) -> Path:
    """``--ds_config`` as a file: the path as given, else a bundled config of that relative name
    (``ds_configs/zero3.json`` works from any working directory)."""
    path = Path(value)
    bundled = REPO_ROOT / path
    return bundled if not path.is_file() and not path.is_absolute() and bundled.is_file() else path


def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a DeepSpeed JSON config."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# Sections of a DeepSpeed config that must be JSON objects; a scalar there (`"bf16": true`) would otherwise
# fail deep inside DeepSpeed or here with an AttributeError.
_DS_SECTIONS = ("bf16", "fp16", "optimizer", "zero_optimization", "data_types")


def zero_stage(ds_config: dict[str, Any]) -> int:
    """ZeRO stage of a (filled or raw) DeepSpeed config; 0 when absent."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_ds_config(optim: OptimArgs, *, path: str, precision: str, world_size: int) -> dict[str, Any]:
    """Read ``--ds_config`` and fill every ``"auto"`` value from the flags (see the module docstring).

    Args:
        optim: the optimisation flags (batch sizes, learning rate, clipping, --max_bad_steps).
        path: ``--ds_config``.
        precision: ``--precision``.
        world_size: number of training processes (for ``train_batch_size``).

    Returns:
        A complete DeepSpeed config dict for ``deepspeed.initialize``.
    """
    config = load_ds_config(ds_config_path(path))
    name = Path(path).name
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

    micro = optim.per_device_train_batch_size
    accum = optim.gradient_accumulation_steps
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
    fill(config, "gradient_clipping", optim.max_grad_norm, "--max_grad_norm", "gradient_clipping")

    for kind in ("bf16", "fp16"):
        section = config.setdefault(kind, {})
        fill(
            section,
            "enabled",
            precision == kind,
            f"--precision {precision}",
            f"{kind}.enabled",
        )

    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    fill(params, "lr", optim.learning_rate, "--learning_rate", "optimizer.params.lr")
    fill(params, "weight_decay", optim.weight_decay, "--weight_decay", "optimizer.params.weight_decay")
    if str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", True)  # no JIT-compiled optimizer op (see the module docstring)
    if precision == "bf16" and stage in (1, 2, 3):
        # Without ZeRO, DeepSpeed refuses a grad_accum_dtype that differs from the model dtype.
        config.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")

    if "scheduler" in config:
        problems.append(
            f'{name} has a "scheduler" section, but the schedule comes from --lr_scheduler/--warmup_ratio: '
            "remove the section from the config"
        )

    if optim.max_bad_steps > 0:
        problems.extend(_nonfinite_skip_problems(config, precision, name))

    leftover = _find_auto(config)
    if leftover:
        problems.append(f"{name}: no flag fills {', '.join(leftover)}; write explicit values there")
    if problems:
        raise ArgsError(problems)
    return config


def _nonfinite_skip_problems(config: dict[str, Any], precision: str, name: str) -> list[str]:
    """Settings under which DeepSpeed applies an update whose gradient norm is inf/NaN (so --max_bad_steps'
    guard, which relies on DeepSpeed's skip, would not protect the adapter)."""
    fix = "or pass --max_bad_steps 0 to train without the non-finite guard"
    zero = config.get("zero_optimization", {})
    problems = []
    if zero.get("stage", 0) == 0 and precision != "fp16":
        problems.append(
            f"{name}: ZeRO stage 0 applies non-finite updates in {precision}: use a ZeRO stage 1-3 config {fix}"
        )
    if precision == "bf16" and config.get("bf16", {}).get("check_grad_overflow") is False:
        problems.append(
            f"{name}: bf16.check_grad_overflow=false lets non-finite updates through: remove it {fix}"
        )
    if precision == "fp32" and zero.get("compute_grad_norm") is False:
        problems.append(
            f"{name}: zero_optimization.compute_grad_norm=false lets non-finite updates through in fp32: remove it {fix}"
        )
    return problems


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every value still equal to "auto"."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.extend(_find_auto(value, f"{prefix}{key}."))
    elif node == "auto":
        found.append(prefix.rstrip("."))
    return found
