"""Permissions of the weight files the framework writes: what the process umask gives any new file.

safetensors 0.8 writes through a temporary file that it creates with mode 0600 and renames into place
(safetensors issue #782), so ``adapter_model.safetensors`` and a merged model's ``model*.safetensors`` come out
readable by their owner only, while the JSON files next to them follow the umask. Serving a checkpoint as another
user (an inference server, the web demo in a container) then cannot open the weights. The writers here reset
those files to the mode an ordinary new file gets.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask (0644 under umask 022)."""
    umask = os.umask(0)  # the umask can only be read by setting it: put it back at once
    os.umask(umask)
    return 0o666 & ~umask


def restore_default_modes(directory: str | os.PathLike, pattern: str = "*.safetensors") -> list[Path]:
    """Give the files in ``directory`` matching ``pattern`` the umask's default mode; returns the files changed."""
    mode = default_file_mode()
    changed = []
    for path in sorted(Path(directory).glob(pattern)):
        if path.is_file() and (path.stat().st_mode & 0o777) != mode:
            path.chmod(mode)
            changed.append(path)
    return changed
