"""Disk space: stop before training when a checkpoint cannot fit, and say so plainly when a save fills
the disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from sft.checkpoint.layout import (
    CheckpointError,
)


def directory_bytes(path: str | Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _free_bytes(path: Path) -> int:
    """Bytes available to this user on the file system holding ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_free_space(output_dir: str | Path, needed: int, what: str) -> None:
    """Stop before any training when ``output_dir`` cannot hold even one checkpoint of ``needed`` bytes.

    A full disk otherwise shows up only at the first save (or as a TensorBoard error), after the model load.
    """
    free = _free_bytes(Path(output_dir))
    if free < needed:
        raise CheckpointError(
            f"--output_dir {output_dir} has {_mib(free)} free, but {what} needs about {_mib(needed)}: free space "
            "on that disk or pass another --output_dir"
        )


def estimated_checkpoint_bytes(model: nn.Module) -> int:
    """A lower bound on one checkpoint of ``model``: the adapter plus AdamW's fp32 master weights and moments.

    ZeRO-3 partitions a parameter's storage; ``ds_numel`` keeps its full size.
    """
    return sum(
        getattr(p, "ds_numel", p.numel()) * (p.element_size() + 12)
        for p in model.parameters()
        if p.requires_grad
    )
