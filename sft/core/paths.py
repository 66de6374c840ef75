"""Paths named by flags: local model directories (nothing is downloaded) and writable outputs, checked
before any work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def require_local_dir(path: str | os.PathLike | None, flag_name: str) -> Path:
    """Return ``path`` as a Path if it is an existing local directory, else raise a one-line ValueError.

    Nothing in this project downloads from a model hub: a hub id such as ``baichuan-inc/Baichuan2-7B-Chat``
    must be downloaded by the user first and passed as a local directory.
    """
    if path is None or str(path) == "":
        raise ValueError(f"{flag_name} is required: pass a local model directory")
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(
            f"{flag_name}={path} is a file, not a directory: pass the model directory that contains it"
        )
    looks_like_hub_id = str(path).count("/") == 1 and not str(path).startswith((".", "/", "~"))
    if looks_like_hub_id:
        raise ValueError(
            f"{flag_name}={path} looks like a hub id, but nothing is downloaded here: download the model "
            "first and pass its local directory"
        )
    raise ValueError(f"{flag_name}={path} does not exist: pass an existing local directory")


def output_path_problem(
    path: str | os.PathLike, flag_name: str, *, kind: str, inputs: Mapping[str, str | os.PathLike] = {}
) -> str | None:
    """Why ``path`` cannot be written as an output file or directory (None when it can).

    Checked before any work, so that a typo does not cost hours of training or generation: the path must
    not be (or, for a directory, contain) one of the ``inputs`` (flag -> path), must have the right kind
    when it exists, and its nearest existing ancestor must be a writable directory (missing directories
    are created later).

    Args:
        kind: ``"file"`` or ``"dir"``.
    """
    target = Path(path).expanduser()
    resolved = target.resolve()
    for in_flag, in_path in inputs.items():
        source = Path(in_path).expanduser().resolve()
        if resolved == source or (kind == "dir" and resolved in source.parents):
            return (
                f"{flag_name}={path} is (or contains) {in_flag}={in_path}: writing there would replace the "
                "input; pass a new path"
            )
    if kind == "file" and target.is_dir():
        return f"{flag_name}={path} is a directory: pass a file name such as {target / 'out.jsonl'}"
    if kind == "dir" and target.exists() and not target.is_dir():
        return f"{flag_name}={path} is a file: pass a directory (it is created if missing)"
    existing = target.parent if kind == "file" else target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{flag_name}={path} cannot be created: {existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag_name}={path} is not writable ({existing} denies write access): pass a path you can write to"
    return None


def check_output_path(
    path: str | os.PathLike, flag_name: str, *, kind: str, inputs: Mapping[str, str | os.PathLike] = {}
) -> None:
    """Raise a one-line ValueError when :func:`output_path_problem` finds one."""
    problem = output_path_problem(path, flag_name, kind=kind, inputs=inputs)
    if problem:
        raise ValueError(problem)
