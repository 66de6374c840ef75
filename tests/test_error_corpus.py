"""The error corpus: every failure a user can cause ends with ONE line naming the file, line or flag and the
fix, and the documented exit status (README.md, "When things go wrong"); no traceback without --debug; and
nothing that existed before the failing command is changed or removed, nor anything new left behind.

Each entry of CASES is one case: the script, its command line (built from a :class:`Workspace` that
creates the inputs it names), the exit status, and a regex the last stderr line must match. Adding a case
is adding one entry. Scripts run in this process through their ``main(argv)`` (which returns the exit
status); a case with ``subprocess=True`` runs ``python SCRIPT.py`` instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.test_merge import make_adapter

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
HUB_ID = "baichuan-inc/Baichuan2-7B-Chat"
GOOD = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好呀"}]}
PROMPT = {"conversations": [{"role": "user", "content": "Tell me a story."}]}
PAIR = {"prompt": "Q", "chosen": "A", "rejected": "B"}


class Workspace:
    """The inputs of one case, created on demand under ``root`` (a fresh directory per case).

    The tiny models and the adapter are shared, read-only, between cases; the snapshot covers them too.
    """

    def __init__(self, root: Path, model: Path, llama: Path, adapter: Path, finalizers: list) -> None:
        self.root = root
        self.model = str(model)
        self.llama = str(llama)
        self.adapter = str(adapter)
        self._finalizers = finalizers

    def path(self, name: str) -> str:
        """A path under the workspace that does not exist (an output)."""
        return str(self.root / name)

    def file(self, name: str, text: str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return str(path)

    def jsonl(self, name: str, *lines: object) -> str:
        """A JSONL file; a str line is written as it is (a broken line), anything else as JSON."""
        return self.file(
            name,
            "".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
        )

    def data(self) -> str:
        return self.jsonl("data.jsonl", GOOD, PROMPT)

    def bad_json_line(self, name: str = "bad.jsonl") -> str:
        return self.jsonl(name, GOOD, '{"conversations": [{"role": "user", "content": "hi"}')

    def damaged_model(self, damage: str) -> str:
        """A copy of the tiny Baichuan2 with one file damaged: ``weights`` (model.safetensors cut in half),
        ``tokenizer`` (tokenizer.model replaced by noise) or ``config`` (config.json cut short)."""
        path = self.root / f"model_{damage}"
        shutil.copytree(self.model, path)
        if damage == "weights":
            data = (path / "model.safetensors").read_bytes()
            (path / "model.safetensors").write_bytes(data[: len(data) // 2])
        elif damage == "tokenizer":
            (path / "tokenizer.model").write_bytes(bytes(range(256)) * 8)
        elif damage == "config":
            (path / "config.json").write_text('{"model_type": "baichuan",', encoding="utf-8")
        else:
            raise ValueError(damage)
        return str(path)

    def damaged_adapter(self, damage: str) -> str:
        """A copy of the adapter with ``weights`` (adapter_model.safetensors truncated) or ``config``
        (adapter_config.json cut short) damaged."""
        path = self.root / f"adapter_{damage}"
        shutil.copytree(self.adapter, path)
        if damage == "weights":
            weights = path / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-100])
        else:
            (path / "adapter_config.json").write_text('{"peft_type": "LORA",', encoding="utf-8")
        return str(path)

    def foreign_checkpoint(self) -> str:
        """A complete-looking checkpoint of another run: the shared adapter, recorded as trained on the tiny Llama."""
        from sft.checkpoint.identity import base_model_identity
        from sft.checkpoint.layout import BASE_MODEL, STATE_DIR, TRAIN_ARGS, TRAINER_STATE

        path = self.root / "other_run" / "epoch-1-step-2"
        shutil.copytree(self.adapter, path)
        (path / TRAIN_ARGS).unlink()  # flags are not what this case is about
        (path / STATE_DIR).mkdir()
        (path / TRAINER_STATE).write_text(
            json.dumps({"step": 2, "epoch": 0, "batches_in_epoch": 2, "eval": {}})
        )
        (path / BASE_MODEL).write_text(json.dumps(base_model_identity(self.llama)))
        return str(path)

    def full_disk(self, files: dict[str, str] | None = None, *, size: str = "64k", leave: int = 0) -> Path:
        """A real, small tmpfs mounted at root/disk holding ``files``, then filled up to ``leave`` free bytes."""
        if sys.platform != "linux" or os.geteuid() != 0:
            pytest.skip("a full disk is simulated with a tmpfs mount, which needs root on Linux")
        disk = self.root / "disk"
        disk.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True, text=True
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        self._finalizers.append(lambda: subprocess.run(["umount", "-l", str(disk)], check=True))
        for name, text in (files or {}).items():
            self.file(f"disk/{name}", text)
        filler = disk / ".filler"
        with open(filler, "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError as err:  # full: that is the point
                assert err.errno == errno.ENOSPC
        os.truncate(filler, max(0, filler.stat().st_size - leave))
        return disk


def write_rolebench(folder: Path, test_questions: int = 1) -> str:
    """A RoleBench-zh-shaped folder: one role, one train question, ``test_questions`` test questions."""
    folder.mkdir(parents=True)
    (folder / "profiles-zh_desc.json").write_text(json.dumps({"李白": "唐代诗人。"}, ensure_ascii=False))
    question = {
        "role": "李白",
        "question": "李白，你好？",
        "generated": ["好", "很好"],
        "type": "script_based",
    }
    many = [{**question, "question": f"第{i}个问题：{'长' * 100}？"} for i in range(test_questions)]
    for subset in ("role_specific", "general"):
        for split, records in (("train", [question]), ("test", many)):
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            (folder / f"rolebench-zh_{subset}_{split}.jsonl").write_text(lines, encoding="utf-8")
    return str(folder)


def predict_argv(w: Workspace, *flags: str, model: str | None = None) -> list[str]:
    data = ["--data_path", w.data(), "--output_path", w.path("preds.jsonl")]
    return ["--model_path", model or w.model, *data, "--device", "cpu", "--no-do_sample", *flags]


def ppl_argv(w: Workspace, *flags: str, model: str | None = None) -> list[str]:
    return ["ppl", "--model_path", model or w.model, "--data_path", w.data(), "--device", "cpu", *flags]


def merge_argv(
    w: Workspace, *flags: str, base: str | None = None, adapter: str | None = None, out: str | None = None
) -> list[str]:
    return [
        "--ori_model_dir", base or w.model, "--model_dir", adapter or w.adapter,
        "--save_model_dir", out or w.path("merged"), "--device", "cpu", *flags,
    ]  # fmt: skip


def train_argv(w: Workspace, *flags: str, model: str | None = None, data: str | None = None) -> list[str]:
    return [
        "--model_name_or_path", model or w.model, "--train_path", data or w.jsonl("train.jsonl", GOOD, GOOD),
        "--output_dir", w.path("out"), "--precision", "fp32", "--quantization", "none", *flags,
    ]  # fmt: skip


def demo_argv(w: Workspace, model: str) -> list[str]:
    profiles = w.file("profiles.json", json.dumps({"李白": "唐代诗人。"}, ensure_ascii=False))
    return ["--model_path", model, "--desc_path", profiles, "--device", "cpu"]


@dataclass(frozen=True)
class Case:
    """One user error: ``script``'s command line (built from the workspace), the exit status, and a regex the
    last stderr line must match.

    ``creates``: new paths (relative to the workspace) the script may leave behind; none by default.
    ``subprocess``: run ``python SCRIPT.py`` with ``env`` added to the environment (e.g.
    ``{"CUDA_VISIBLE_DEVICES": ""}``), where a process boundary matters. ``skip``: a reason to skip here, or None.
    """

    id: str
    script: str
    argv: Callable[[Workspace], list[str]]
    status: int
    message: str
    creates: tuple[str, ...] = ()
    subprocess: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    skip: Callable[[], str | None] = lambda: None


# train.py makes --output_dir before it reads the data and the model (the training loop owns that).
TRAIN_OUT = ("out",)

CASES = [
    # ---- data_helper.py ----
    Case("data_helper/bad-jsonl-line", "data_helper",
         lambda w: ["conversations", "--input", w.bad_json_line(), "--output", w.path("o.jsonl")],
         1, r"bad\.jsonl:2: invalid JSON .*column"),
    Case("data_helper/bad-jsonl-line (process)", "data_helper",
         lambda w: ["conversations", "--input", w.bad_json_line(), "--output", w.path("o.jsonl")],
         1, r"bad\.jsonl:2: invalid JSON", subprocess=True),
    Case("data_helper/wrong-field", "data_helper",
         lambda w: ["alpaca", "--input", w.jsonl("a.jsonl", {"instruction": "x", "output": 5}),
                    "--output", w.path("o.jsonl")],
         1, r"a\.jsonl:1: alpaca record: field 'output' must be a string, got int"),
    Case("data_helper/unknown-flag-value", "data_helper",
         lambda w: ["rolebench", "--data_dir", write_rolebench(w.root / "rb"), "--out_dir", w.path("o"), "--splits", "dev"],
         2, r"argument --splits: invalid choice: 'dev' \(choose from 'train', 'test'\)"),
    Case("data_helper/unknown-flag", "data_helper",
         lambda w: ["dolly", "--input", w.data(), "--output", w.path("o.jsonl"), "--bogus"],
         2, r"unrecognized arguments: --bogus \(see --help\)"),
    Case("data_helper/output-is-a-file", "data_helper",
         lambda w: ["rolebench", "--data_dir", write_rolebench(w.root / "rb"), "--out_dir", w.file("taken", "x")],
         1, r"--out_dir=.*taken is a file: pass a directory"),
    # Into a new directory: it must not stay behind, empty.
    Case("data_helper/full-disk", "data_helper",
         lambda w: ["conversations", "--input", w.jsonl("big.jsonl", *[GOOD] * 300),
                    "--output", str(w.full_disk({"old.jsonl": "old\n"}) / "new" / "out.jsonl")],
         1, r"no space left on the device while writing .*disk/new/out\.jsonl: free some space"),
    # The new train.jsonl fits, test.jsonl does not: the old pair must stay (never a new train beside an old test).
    Case("data_helper/full-disk-rolebench-pair", "data_helper",
         lambda w: ["rolebench", "--data_dir", write_rolebench(w.root / "rb", test_questions=60),
                    "--out_dir", str(w.full_disk({"rb_out/train.jsonl": "old train\n",
                                                  "rb_out/test.jsonl": "old test\n",
                                                  "rb_out/notes.txt": "mine\n"}, leave=12288) / "rb_out")],
         1, r"no space left on the device while writing .*rb_out/test\.jsonl"),
    # ---- predict.py ----
    Case("predict/bad-jsonl-line", "predict",
         lambda w: ["--model_path", w.model, "--data_path", w.bad_json_line(), "--output_path", w.path("p.jsonl")],
         1, r"bad\.jsonl:2: invalid JSON"),
    Case("predict/wrong-field", "predict",
         lambda w: ["--model_path", w.model, "--data_path", w.jsonl("d.jsonl", {"conversation": []}),
                    "--output_path", w.path("p.jsonl")],
         1, r"d\.jsonl:1: missing field 'conversations'"),
    Case("predict/unknown-flag-value", "predict", lambda w: predict_argv(w, "--quantization", "nf5"),
         2, r"argument --quantization: invalid choice: 'nf5'"),
    Case("predict/impossible-combination", "predict", lambda w: predict_argv(w, "--chat"),
         2, r"--chat is interactive: drop --data_path/--output_path"),
    Case("predict/missing-model-dir", "predict", lambda w: predict_argv(w, model=w.path("nope")),
         1, r"--model_path=.*nope does not exist: pass an existing local directory"),
    Case("predict/hub-id", "predict", lambda w: predict_argv(w, model=HUB_ID),
         1, r"--model_path=baichuan-inc/Baichuan2-7B-Chat looks like a hub id.*download the model first"),
    Case("predict/truncated-adapter", "predict",
         lambda w: predict_argv(w, "--adapter_dir", w.damaged_adapter("weights")),
         1, r"adapter_model\.safetensors is damaged .*copy this one again"),
    Case("predict/bad-adapter-config", "predict",
         lambda w: predict_argv(w, "--adapter_dir", w.damaged_adapter("config")),
         1, r"adapter_config\.json is not valid JSON \(line 1 column \d+"),
    Case("predict/adapter-of-another-base", "predict",
         lambda w: predict_argv(w, "--adapter_dir", w.adapter, model=w.llama),
         1, r"does not match the base model.*pass the base it was trained on as --model_path"),
    Case("predict/truncated-model-safetensors", "predict", lambda w: predict_argv(w, model=w.damaged_model("weights")),
         1, r"model_weights/model\.safetensors is truncated: [\d,]+ of [\d,]+ bytes: copy or download the model"),
    Case("predict/corrupt-tokenizer-model", "predict",
         lambda w: predict_argv(w, model=w.damaged_model("tokenizer")),
         1, r"model_tokenizer/tokenizer\.model is damaged \(it does not parse as a SentencePiece model\)"),
    Case("predict/damaged-config", "predict", lambda w: predict_argv(w, model=w.damaged_model("config")),
         1, r"model_config/config\.json is not valid JSON \(line 1 column \d+.*copy or download the model again"),
    Case("predict/output-parent-is-a-file", "predict",
         lambda w: ["--model_path", w.model, "--data_path", w.data(),
                    "--output_path", str(Path(w.file("taken", "x")) / "p.jsonl")],
         1, r"--output_path=.* cannot be created: .*taken is a file, not a directory"),
    Case("predict/no-gpu", "predict", lambda w: predict_argv(w, "--device", "cuda"),
         1, r"--device cuda: no CUDA device is visible; use --device cpu",
         skip=lambda: "a GPU is visible here" if torch.cuda.is_available() else None),
    Case("predict/full-disk", "predict",
         lambda w: ["--model_path", w.model, "--data_path", w.jsonl("many.jsonl", *[PROMPT] * 40),
                    "--output_path", str(w.full_disk({"preds.jsonl": "old\n"}) / "preds.jsonl"),
                    "--device", "cpu", "--no-do_sample", "--max_new_tokens", "2", "--batch_size", "40"],
         1, r"no space left on the device while writing .*disk/preds\.jsonl: free some space"),
    # ---- merge_params.py ----
    Case("merge_params/missing-model-dir", "merge_params", lambda w: merge_argv(w, base=w.path("nope")),
         1, r"--ori_model_dir=.*nope does not exist"),
    Case("merge_params/hub-id", "merge_params", lambda w: merge_argv(w, base=HUB_ID),
         1, r"--ori_model_dir=baichuan-inc/Baichuan2-7B-Chat looks like a hub id"),
    Case("merge_params/truncated-adapter", "merge_params",
         lambda w: merge_argv(w, adapter=w.damaged_adapter("weights")),
         1, r"adapter_model\.safetensors is damaged"),
    Case("merge_params/bad-adapter-config", "merge_params",
         lambda w: merge_argv(w, adapter=w.damaged_adapter("config")),
         1, r"adapter_config\.json is not valid JSON"),
    Case("merge_params/adapter-of-another-base", "merge_params", lambda w: merge_argv(w, base=w.llama),
         1, r"does not match the base model.*pass the base it was trained on as --ori_model_dir"),
    Case("merge_params/truncated-model-safetensors", "merge_params",
         lambda w: merge_argv(w, base=w.damaged_model("weights")),
         1, r"model\.safetensors is truncated: .*copy or download the model again"),
    Case("merge_params/corrupt-tokenizer-model", "merge_params",
         lambda w: merge_argv(w, base=w.damaged_model("tokenizer")),
         1, r"tokenizer\.model is damaged"),
    Case("merge_params/unknown-flag-value", "merge_params", lambda w: merge_argv(w, "--merge_into", "base"),
         2, r"argument --merge_into: invalid choice: 'base'"),
    Case("merge_params/output-is-a-file", "merge_params",
         lambda w: merge_argv(w, out=w.file("taken", "x")),
         1, r"--save_model_dir=.*taken is a file: pass a directory"),
    Case("merge_params/output-exists", "merge_params",
         lambda w: merge_argv(w, out=str(Path(w.file("m/config.json", "{}")).parent)),
         1, r"--save_model_dir=.* exists and is not empty: pass --overwrite"),
    Case("merge_params/full-disk", "merge_params",
         lambda w: merge_argv(w, "--overwrite", out=str(w.full_disk({"merged/config.json": "{}"}, size="1m") / "merged")),
         1, r"no space left on the device while writing .*disk/merged: free some space"),
    # ---- evaluate.py ----
    Case("evaluate/unknown-subcommand", "evaluate", lambda w: ["bleu", "--pred_path", w.data()],
         2, r"argument command: invalid choice: 'bleu'"),
    Case("evaluate/rouge-bad-jsonl-line", "evaluate", lambda w: ["rouge", "--pred_path", w.jsonl("bad.jsonl", {"prediction": "a", "references": ["a"]}, '{"pre')],
         1, r"bad\.jsonl:2: invalid JSON"),
    Case("evaluate/rouge-wrong-field", "evaluate",
         lambda w: ["rouge", "--pred_path", w.jsonl("p.jsonl", {"prediction": "a", "references": ["b"]},
                                                    {"predicted": "a"})],
         1, r"p\.jsonl:2: expected an object with a string 'prediction'"),
    Case("evaluate/ppl-impossible-combination", "evaluate",
         lambda w: ppl_argv(w, "--max_src_len", "600", "--max_len", "512"),
         2, r"--max_src_len=600 must be smaller than --max_len=512"),
    Case("evaluate/ppl-adapter-of-another-base", "evaluate",
         lambda w: ppl_argv(w, "--adapter_dir", w.adapter, model=w.llama), 1, r"does not match the base model"),
    Case("evaluate/ppl-truncated-model-safetensors", "evaluate",
         lambda w: ppl_argv(w, model=w.damaged_model("weights")), 1, r"model\.safetensors is truncated"),
    Case("evaluate/ppl-corrupt-tokenizer-model", "evaluate",
         lambda w: ppl_argv(w, model=w.damaged_model("tokenizer")), 1, r"tokenizer\.model is damaged"),
    Case("evaluate/ppl-damaged-config", "evaluate", lambda w: ppl_argv(w, model=w.damaged_model("config")),
         1, r"model_config/config\.json is not valid JSON"),
    Case("evaluate/output-json-is-a-directory", "evaluate",
         lambda w: ["rouge", "--pred_path", w.jsonl("p.jsonl", {"prediction": "a", "references": ["a"]}),
                    "--output_json", str(Path(w.file("d/x", "x")).parent)],
         1, r"--output_json=.*d is a directory"),
    # ---- train.py ----
    Case("train/missing-model-dir", "train", lambda w: train_argv(w, model=w.path("nope")),
         2, r"--model_name_or_path=.*nope does not exist"),
    Case("train/hub-id", "train", lambda w: train_argv(w, model=HUB_ID), 2, r"looks like a hub id"),
    Case("train/unknown-flag-value", "train", lambda w: train_argv(w, "--peft", "qlora"),
         2, r"argument --peft: invalid choice: 'qlora'"),
    Case("train/impossible-combination", "train",
         lambda w: train_argv(w, "--peft", "prompt_tuning", "--packing"),
         2, r"--packing cannot be combined with --peft prompt_tuning"),
    Case("train/output-is-a-file", "train", lambda w: [*train_argv(w), "--output_dir", w.file("taken", "x")],
         2, r"--output_dir=.*taken is a file"),
    Case("train/bad-jsonl-line", "train", lambda w: train_argv(w, data=w.bad_json_line()),
         1, r"bad\.jsonl:2: invalid JSON", creates=TRAIN_OUT),
    Case("train/wrong-field", "train",
         lambda w: train_argv(w, data=w.jsonl("t.jsonl", GOOD, {"conversations": [{"role": "bot", "content": "x"}]})),
         1, r"t\.jsonl:2: turn 0: unknown role 'bot'", creates=TRAIN_OUT),
    # ---- train.py --objective dpo: one line naming file:line for each bad preference record ----
    Case("train/dpo-missing-chosen", "train",
         lambda w: train_argv(w, "--objective", "dpo", data=w.jsonl("pairs.jsonl", PAIR, {"prompt": "Q", "rejected": "B"})),
         1, r"pairs\.jsonl:2: missing field 'chosen'", creates=TRAIN_OUT),
    Case("train/dpo-empty-chosen", "train",
         lambda w: train_argv(w, "--objective", "dpo", data=w.jsonl("pairs.jsonl", {**PAIR, "chosen": " "})),
         1, r"pairs\.jsonl:1: 'chosen' is empty", creates=TRAIN_OUT),
    Case("train/dpo-chosen-equals-rejected", "train",
         lambda w: train_argv(w, "--objective", "dpo", data=w.jsonl("pairs.jsonl", PAIR, {**PAIR, "rejected": "A"})),
         1, r"pairs\.jsonl:2: 'chosen' and 'rejected' are the same reply", creates=TRAIN_OUT),
    Case("train/dpo-prompt-ends-with-assistant", "train",
         lambda w: train_argv(w, "--objective", "dpo", data=w.jsonl("pairs.jsonl", {**PAIR, "prompt": GOOD["conversations"]})),
         1, r"pairs\.jsonl:1: the prompt ends with a 'assistant' turn", creates=TRAIN_OUT),
    Case("train/dpo-non-string-content", "train",
         lambda w: train_argv(w, "--objective", "dpo", data=w.jsonl("pairs.jsonl", {**PAIR, "prompt": [{"role": "user", "content": 7}]})),
         1, r"pairs\.jsonl:1: turn 0 \(user\): 'content' must be a string", creates=TRAIN_OUT),
    Case("train/dpo-flag-of-another-objective", "train", lambda w: train_argv(w, "--objective", "orpo", "--precompute_ref"),
         2, r"--precompute_ref: --objective orpo has no reference model"),
    Case("train/truncated-model-safetensors", "train", lambda w: train_argv(w, model=w.damaged_model("weights")),
         1, r"model\.safetensors is truncated", creates=TRAIN_OUT),
    Case("train/corrupt-tokenizer-model", "train", lambda w: train_argv(w, model=w.damaged_model("tokenizer")),
         1, r"tokenizer\.model is damaged", creates=TRAIN_OUT),
    # A checkpoint of another base model (here: recorded for the tiny Llama) is refused before any model loads.
    Case("train/resume-from-another-models-checkpoint", "train",
         lambda w: train_argv(w, "--resume_from_checkpoint", w.foreign_checkpoint()),
         1, r"was trained on the base model .*tiny_llama.*is a different model", creates=TRAIN_OUT),
    # GPUs asked for (CUDA_VISIBLE_DEVICES) but none usable: stop instead of training on the CPU for hours.
    Case("train/cuda-visible-devices-without-a-gpu", "train", lambda w: train_argv(w),
         1, r"CUDA_VISIBLE_DEVICES=0 asks for GPU\(s\), but .*unset CUDA_VISIBLE_DEVICES",
         subprocess=True, env={"CUDA_VISIBLE_DEVICES": "0"},
         skip=lambda: "a GPU is usable here" if torch.cuda.is_available() else None),
    # ---- web_demo.py ----
    Case("web_demo/truncated-model-safetensors", "web_demo", lambda w: demo_argv(w, w.damaged_model("weights")),
         1, r"model\.safetensors is truncated"),
    Case("web_demo/corrupt-tokenizer-model", "web_demo", lambda w: demo_argv(w, w.damaged_model("tokenizer")),
         1, r"tokenizer\.model is damaged"),
    Case("web_demo/system-with-role-profiles", "web_demo", lambda w: [*demo_argv(w, w.model), "--system", "Hi"],
         2, r"--system is the plain assistant's prompt.*drop --system"),
    Case("web_demo/system-template-without-roles", "web_demo",
         lambda w: ["--model_path", w.model, "--system_template", "{role}: {desc}"],
         2, r"--system_template fills in role profiles: pass --desc_path"),
]  # fmt: skip


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots``: kind, permissions and, for files, size and sha256."""
    out: dict[str, tuple] = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            info = path.lstat()
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                out[str(path)] = ("dir", info.st_mode)
            else:
                out[str(path)] = (
                    "file",
                    info.st_mode,
                    info.st_size,
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                )
    return out


@pytest.fixture(scope="module")
def shared_inputs(tiny_baichuan_dir, tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    adapter = make_adapter(tiny_baichuan_dir, tmp_path_factory.mktemp("corpus_adapter"), quantization="none")
    return tiny_baichuan_dir, tiny_llama_dir, adapter


@pytest.fixture
def workspace(shared_inputs, tmp_path, monkeypatch):
    finalizers: list = []
    # In-process train.py sets up a one-rank process group and its environment: keep both to this test.
    saved_env = dict(os.environ)
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    yield Workspace(tmp_path / "ws", *shared_inputs, finalizers)
    for finalize in reversed(finalizers):
        finalize()
    os.environ.clear()
    os.environ.update(saved_env)  # also drops what init_distributed set (absent before: monkeypatch keeps it)


def run_script(case: Case, argv: list[str], capsys) -> tuple[int, str]:
    """Run the case's script on ``argv``: (exit status, stderr)."""
    if case.subprocess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **case.env}
        proc = subprocess.run(
            [sys.executable, f"{case.script}.py", *argv],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        return proc.returncode, proc.stderr
    module = __import__(case.script)
    entry = module.cli if case.script == "train" else module.main
    status = entry(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_case(case: Case, workspace: Workspace, capsys, monkeypatch):
    if reason := case.skip():
        pytest.skip(reason)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    workspace.root.mkdir()
    argv = case.argv(workspace)
    roots = [workspace.root, *(Path(p) for p in (workspace.model, workspace.llama, workspace.adapter))]
    before = snapshot(*roots)
    capsys.readouterr()

    status, err = run_script(case, argv, capsys)

    lines = err.strip().splitlines()
    last = lines[-1] if lines else ""
    assert status == case.status, err[-3000:]
    assert re.search(case.message, last), f"last stderr line: {last!r}"
    assert " ERROR " in last and "Traceback" not in err, err[-3000:]
    assert sum(" ERROR " in line for line in lines) == 1, "more than one error line:\n" + err[-3000:]
    after = snapshot(*roots)
    changed = sorted(p for p in before if before[p] != after.get(p))
    created = sorted(p for p in after if p not in before)
    allowed = {str(workspace.root / c) for c in case.creates}
    assert not changed, f"changed or removed: {changed}"
    assert not [p for p in created if not any(p == a or p.startswith(a + "/") for a in allowed)], created


def test_debug_prints_the_traceback_before_the_same_line(workspace, capsys):
    """--debug (every script) adds the traceback; the last line stays the one-line error."""
    import predict

    workspace.root.mkdir()
    argv = predict_argv(workspace, model=workspace.damaged_model("weights"))
    assert predict.main([*argv, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "SafetensorError" in err  # the cause, chained
    assert re.search(r"model\.safetensors is truncated", err.strip().splitlines()[-1])


def test_unexpected_error_is_one_line_naming_its_traceback_file(caplog, capsys):
    """A bug (not a user error) exits 70 with one line naming the file its traceback went to."""
    import logging

    from sft.core.errors import EXIT_INTERNAL
    from sft.core.runner import run_entry_point

    def buggy(argv: list[str]) -> None:
        raise KeyError("no such thing")

    status = run_entry_point(buggy, [], logger=logging.getLogger("buggy"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    match = re.search(
        r"unexpected error \(a bug; please report it\): KeyError: 'no such thing'; the traceback is in (\S+)",
        last,
    )
    assert status == EXIT_INTERNAL and match, last
    saved = Path(match.group(1))
    assert "raise KeyError" in saved.read_text(encoding="utf-8")
    saved.unlink()
