"""train.py end to end in one process (no launcher), on a tiny Baichuan2 with a real 4-bit (NF4) base.

One uninterrupted run (session fixture) is checked for several things: the loss falls on a small
overfit set, TensorBoard has its tags, checkpoints hold only the adapter and load with
PeftModel.from_pretrained, the base model is untouched, and the reported perplexity equals a hand
computation. A second run resumes from the run's mid-epoch checkpoint and must reproduce the rest
of the loss curve.

On a machine with a GPU these single-process runs train on it; the hand computations they are compared
with run on the CPU, hence the CUDA tolerance below. Runs of several ranks use CPU ranks everywhere
(:data:`CPU_RANKS_ENV`). Helpers here are reused by tests/test_train_multi.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent

# Environment of runs that must use CPU ranks, also on a machine with GPUs: two ranks need not find two GPUs, and
# gloo is the backend either way. CUDA_VISIBLE_DEVICES="" hides the GPUs from torchrun's ranks; the deepspeed
# launcher sets CUDA_VISIBLE_DEVICES for its ranks itself, so DS_ACCELERATOR=cpu makes DeepSpeed (and with it
# sft.core.distributed) choose the CPU.
CPU_RANKS_ENV = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}

# Relative tolerance between a single-process run and a CPU reference (the hand perplexity, evaluate.py on the CPU)
# or a resumed run. On the CPU they agree to rounding (1e-5). On CUDA the run's fp32 matmuls and attention kernels
# reduce in other orders than the CPU's, and cuBLAS / SDPA may choose other algorithms in a resumed process: about
# 1e-6 relative per step, which steps at learning rate 1e-2 amplify, so those comparisons hold to 1e-4.
ON_CUDA = (
    torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
)  # where train.py runs
RTOL = 1e-4 if ON_CUDA else 1e-5

# An overfit set: few short conversations, seen several times.
QA = [
    ("你叫什么名字？", "俺老孙便是齐天大圣孙悟空！"),
    ("你的兵器是什么？", "如意金箍棒，重一万三千五百斤。"),
    ("你住在哪里？", "花果山水帘洞，俺的老家。"),
    ("你会什么本领？", "七十二变，一个筋斗十万八千里。"),
    ("What is your name?", "I am the Monkey King."),
    ("Where do you live?", "On the Mountain of Flowers and Fruit."),
    ("你的师父是谁？", "俺师父是唐三藏，去西天取经。"),
    ("你怕什么？", "俺老孙天不怕地不怕，就怕紧箍咒。"),
]


def write_overfit_data(root: Path, n_train: int = 24) -> tuple[Path, Path]:
    """train.jsonl (the QA pairs repeated to ``n_train`` records) and test.jsonl (the first 5)."""
    root.mkdir(parents=True, exist_ok=True)
    records = [
        {
            "system": "你是孙悟空。",
            "conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        }
        for q, a in QA
    ]
    train, test = root / "train.jsonl", root / "test.jsonl"
    train.write_text(
        "".join(json.dumps(records[i % len(records)], ensure_ascii=False) + "\n" for i in range(n_train)),
        encoding="utf-8",
    )
    test.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:5]), encoding="utf-8")
    return train, test


def train_command(model_dir: Path, data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """The train.py flags every test run shares (small, fast, deterministic)."""
    return [
        "train.py",
        "--model_name_or_path", str(model_dir),
        "--train_path", str(data_dir / "train.jsonl"),
        "--test_path", str(data_dir / "test.jsonl"),
        "--output_dir", str(output_dir),
        "--max_len", "128", "--max_src_len", "96",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--learning_rate", "1e-2", "--weight_decay", "0", "--warmup_ratio", "0",
        "--lr_scheduler", "linear", "--show_loss_step", "1",
        "--lora_dim", "8", "--lora_alpha", "16",
        *extra,
    ]  # fmt: skip


def run(
    command: list[str], *, timeout: int = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a launcher command from the repository root (``env`` added to the environment); fail with its output
    if it fails."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # what an in-process run of train.py in this session may have left set
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def scalars(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from sft.train.plotting import read_scalars

    return read_scalars(output_dir / "runs")


def checkpoint_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def hand_perplexity(
    model_dir: Path, adapter_dir: Path, test_path: Path, quantization: str
) -> tuple[float, int]:
    """(exp(sum NLL / learned tokens), learned tokens): one conversation at a time, full fp32 logits, on the CPU."""
    from peft import PeftModel

    from sft.data.formats import read_conversations
    from sft.data.templates import default_template_name, get_template
    from sft.modeling.loading import keep_4bit_weights_unpacked, load_base_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    base = load_base_model(model_dir, quantization, torch.float32, device_map={"": "cpu"})
    keep_4bit_weights_unpacked(base)  # the fp32 dequantise-then-matmul path that training uses too
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    template = get_template(default_template_name(base.config.model_type), tokenizer, model_dir=model_dir)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for record in read_conversations(test_path):
            for input_ids, labels in template.encode(record):
                logits = model(input_ids=torch.tensor([input_ids])).logits[0].float()
                target = torch.tensor(labels[1:])
                nll += F.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="sum").item()
                tokens += int((target != -100).sum())
    return math.exp(nll / tokens), tokens


def file_digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()
    }


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def single_run(tiny_baichuan_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted 1-process QLoRA run: 24 samples, 6 steps/epoch, 16 steps; saves at 6, 8, 12, 16."""
    root = tmp_path_factory.mktemp("single")
    data_dir = root / "data"
    write_overfit_data(data_dir)
    base_digest = file_digest(tiny_baichuan_dir)
    output_dir = root / "out"
    command = [
        sys.executable,
        *train_command(
            tiny_baichuan_dir, data_dir, output_dir,
            "--gradient_accumulation_steps", "2", "--max_steps", "16", "--save_model_step", "8",
            "--precision", "fp32", "--quantization", "nf4", "--lora_dropout", "0.1",
        ),
    ]  # fmt: skip
    proc = run(command)
    return {
        "root": root,
        "data_dir": data_dir,
        "output_dir": output_dir,
        "model_dir": tiny_baichuan_dir,
        "command": command,
        "base_digest": base_digest,
        "log": proc.stderr,
    }


@pytest.mark.slow
def test_single_process_loss_falls_and_tensorboard_has_tags(single_run):
    series = scalars(single_run["output_dir"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "eval/loss", "eval/ppl"):
        assert tag in series, tag
    assert ("train/gpu_mem_gb" in series) == ON_CUDA  # GPU only
    if ON_CUDA:
        assert all(v > 0 for _, v in series["train/gpu_mem_gb"]), series["train/gpu_mem_gb"]
    losses = [v for _, v in series["train/loss"]]
    assert [s for s, _ in series["train/loss"]] == list(range(1, 17))
    assert losses[-1] < 0.75 * losses[0], losses
    ppl = [v for _, v in series["eval/ppl"]]
    assert [s for s, _ in series["eval/ppl"]] == [6, 8, 12, 16]  # epoch ends and save steps
    assert ppl[-1] < 0.5 * ppl[0], ppl


@pytest.mark.slow
def test_checkpoints_hold_the_adapter_only(single_run):
    from peft import PeftModel
    from safetensors.torch import load_file

    from sft.modeling.loading import load_base_model

    output_dir = single_run["output_dir"]
    names = sorted(p.name for p in output_dir.iterdir() if p.name.startswith("epoch-"))
    assert names == ["epoch-1-step-6", "epoch-2-step-12", "epoch-2-step-8", "epoch-3-step-16"]
    ckpt = output_dir / "epoch-3-step-16"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "train_args.json",
        "trainer_state.json",
        "tokenizer_config.json",
        "tokenizer.model",
    ):
        assert (ckpt / name).is_file(), name
    train_args = json.loads((ckpt / "train_args.json").read_text())
    assert train_args["max_steps"] == 16
    # The template training used is recorded, and the saved tokenizer carries it as a jinja chat template.
    assert train_args["template"] == "baichuan2"
    assert (
        "chat_template" in json.loads((ckpt / "tokenizer_config.json").read_text())
        or (ckpt / "chat_template.jinja").is_file()
    )

    weights = load_file(ckpt / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), list(weights)[:5]
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights}
    assert targets == {"W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"}  # every linear but the head
    assert all(weights[k].abs().max() > 0 for k in weights if ".lora_B." in k)  # B starts at 0: it trained

    # The training state excludes the frozen base (4-bit weights and their quantisation constants).
    state_bytes = sum(p.stat().st_size for p in (ckpt / "training_state").rglob("*.pt"))
    adapter_bytes = (ckpt / "adapter_model.safetensors").stat().st_size
    assert state_bytes < 6 * adapter_bytes + 100_000
    model_states = torch.load(next((ckpt / "training_state").rglob("*model_states.pt")), weights_only=False)
    assert all("lora_" in k for k in model_states["module"]), [
        k for k in model_states["module"] if "lora_" not in k
    ][:5]

    # The base model directory is untouched, and the adapter loads with peft.
    assert file_digest(single_run["model_dir"]) == single_run["base_digest"]
    base = load_base_model(single_run["model_dir"], "nf4", torch.float32)
    model = PeftModel.from_pretrained(base, str(ckpt))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(weights)


@pytest.mark.slow
def test_reported_perplexity_equals_hand_computation(single_run):
    ckpt = single_run["output_dir"] / "epoch-3-step-16"
    reported = checkpoint_state(ckpt)["eval"]
    expected, tokens = hand_perplexity(
        single_run["model_dir"], ckpt, single_run["data_dir"] / "test.jsonl", "nf4"
    )
    assert reported["tokens"] == tokens
    assert reported["ppl"] == pytest.approx(expected, rel=RTOL)


@pytest.mark.slow
def test_evaluate_ppl_reproduces_the_reported_perplexity(single_run, tmp_path):
    """evaluate.py ppl on a checkpoint (NF4 base, settings from its train_args.json) = train.py's eval/ppl.

    Holds on CPUs with AVX512-BF16 too: the loader keeps the 4-bit weights unpacked as training does.
    """
    import evaluate

    ckpt = single_run["output_dir"] / "epoch-3-step-16"
    out = tmp_path / "ppl.json"
    code = evaluate.main(
        [
            "ppl",
            "--model_path", str(single_run["model_dir"]),
            "--adapter_dir", str(ckpt),
            "--data_path", str(single_run["data_dir"] / "test.jsonl"),
            "--device", "cpu",
            "--output_json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    reported = checkpoint_state(ckpt)["eval"]
    assert (result["quantization"], result["dtype"]) == ("nf4", "float32")  # from train_args.json
    assert result["tokens"] == reported["tokens"]
    assert result["ppl"] == pytest.approx(reported["ppl"], rel=RTOL if ON_CUDA else 1e-6)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(single_run):
    """Resume from the mid-epoch checkpoint of step 8 (with dropout on) and compare steps 9..16."""
    resumed_out = single_run["root"] / "resumed"
    resumed_out.mkdir()
    shutil.copytree(single_run["output_dir"] / "epoch-2-step-8", resumed_out / "epoch-2-step-8")
    run([*single_run["command"], "--output_dir", str(resumed_out), "--resume_from_checkpoint", "latest"])

    full = dict(scalars(single_run["output_dir"])["train/loss"])
    resumed = dict(scalars(resumed_out)["train/loss"])
    assert sorted(resumed) == list(range(9, 17))
    for step in range(9, 17):
        assert resumed[step] == pytest.approx(full[step], rel=RTOL, abs=1e-6), step
    full_eval = checkpoint_state(single_run["output_dir"] / "epoch-3-step-16")["eval"]["ppl"]
    resumed_eval = checkpoint_state(resumed_out / "epoch-3-step-16")["eval"]["ppl"]
    assert resumed_eval == pytest.approx(full_eval, rel=RTOL)


def _train_cli(*flags: str) -> subprocess.CompletedProcess:
    """Run ``python train.py FLAGS`` as a user would; returns the finished process (any exit status)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "train.py", *flags],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.parametrize("fault", ["cut_line", "all_too_long"])
def test_bad_data_exits_with_one_line_and_no_traceback(tiny_baichuan_dir, tmp_path, fault):
    train, test = write_overfit_data(tmp_path, n_train=3)
    flags = ["--max_len", "64", "--max_src_len", "32"]
    if fault == "cut_line":
        with train.open("a", encoding="utf-8") as fh:
            fh.write('{"conversations": [\n')
        expected = f"ERROR train: {train}:4: invalid JSON"
    else:  # every test prompt is longer than --max_src_len and --is_skip drops them all
        flags = ["--test_path", str(test), "--max_len", "16", "--max_src_len", "4", "--is_skip"]
        expected = "ERROR train: --train_path: no samples left"
    proc = _train_cli(
        "--model_name_or_path", str(tiny_baichuan_dir), "--train_path", str(train),
        "--output_dir", str(tmp_path / "out"), "--precision", "fp32", *flags,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert expected in proc.stderr
    if fault == "all_too_long":
        assert "raise --max_src_len" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_exit_codes(monkeypatch, tmp_path):
    import train

    assert train.cli(["--model_name_or_path", str(tmp_path / "missing"), "--train_path", "x.jsonl"]) == 2

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "main", interrupted)
    assert train.cli([]) == 130


@pytest.mark.slow
def test_resume_from_a_damaged_checkpoint_names_the_older_one(single_run):
    """A truncated optimizer state (disk full, killed copy) stops the resume with the checkpoint to use instead."""
    out = single_run["root"] / "damaged"
    out.mkdir()
    for name in ("epoch-2-step-8", "epoch-2-step-12"):
        shutil.copytree(single_run["output_dir"] / name, out / name)
    state = out / "epoch-2-step-12" / "training_state" / "state" / "mp_rank_00_model_states.pt"
    state.write_bytes(state.read_bytes()[:100])
    proc = _train_cli(
        *single_run["command"][2:], "--output_dir", str(out), "--resume_from_checkpoint", "latest"
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"checkpoint {out / 'epoch-2-step-12'}: training_state/ cannot be loaded" in proc.stderr
    assert f"--resume_from_checkpoint {out / 'epoch-2-step-8'}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resume_under_zero3_with_a_4bit_base(tiny_llama_dir: Path, tmp_path: Path):
    """ZeRO-3 partitions the adapter and its optimizer state: resuming from step 3 reproduces steps 4..6."""
    data_dir = tmp_path / "data"
    write_overfit_data(data_dir)
    full_out, resumed_out = tmp_path / "full", tmp_path / "resumed"
    command = [
        sys.executable,
        *train_command(
            tiny_llama_dir, data_dir, full_out,
            "--ds_config", "ds_configs/zero3.json", "--gradient_accumulation_steps", "1",
            "--max_steps", "6", "--save_model_step", "3", "--precision", "fp32", "--quantization", "nf4",
        ),
    ]  # fmt: skip
    run(command)
    resumed_out.mkdir()
    shutil.copytree(full_out / "epoch-1-step-3", resumed_out / "epoch-1-step-3")
    run([*command, "--output_dir", str(resumed_out), "--resume_from_checkpoint", "latest"])

    full = dict(scalars(full_out)["train/loss"])
    resumed = dict(scalars(resumed_out)["train/loss"])
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=RTOL, abs=1e-6), step
    full_ppl = checkpoint_state(full_out / "epoch-1-step-6")["eval"]["ppl"]
    assert checkpoint_state(resumed_out / "epoch-1-step-6")["eval"]["ppl"] == pytest.approx(
        full_ppl, rel=RTOL
    )


def test_one_rank_world_ignores_an_inherited_master_port():
    """A single process takes a fresh rendezvous port even when its parent's environment names one that is in
    use, whether the parent set MASTER_PORT by hand or left the rank variables of its own one-rank world (the
    CI failure: an in-process data_helper.py synthesize or evaluate kept listening on the MASTER_PORT that the
    train.py subprocesses of the same test suite inherited, with RANK and WORLD_SIZE, and failed on)."""
    import socket

    child = (
        "import os, torch.distributed as dist; from sft.core import distributed as d; d.init_distributed(); "
        "assert dist.get_world_size() == 1; print(os.environ['MASTER_PORT']); d.destroy()"
    )
    parent = (  # a one-rank world of its own, then a child with its environment, while the world still listens
        "import os, subprocess, sys; from sft.core import distributed as d; d.init_distributed(); "
        f"code = subprocess.run([sys.executable, '-c', {child!r}]).returncode; "
        # Then a second world, and the first one's port put back (as code that saves and restores the rank
        # variables around a run does), bound again: the CI failure's chain.
        "first = os.environ['MASTER_PORT']; d.destroy(); d.init_distributed(); "
        "assert os.environ['MASTER_PORT'] != first; os.environ['MASTER_PORT'] = first; "
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', int(first))); s.listen(); "
        f"sys.exit(code or subprocess.run([sys.executable, '-c', {child!r}]).returncode)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", parent], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        proc = subprocess.run(
            [sys.executable, "-c", child], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] != str(port)
