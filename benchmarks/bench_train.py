"""Training-step benchmark: our data + loss pipeline against the RolePlayProj recipe, in one run.

Both variants train the same LoRA model (a tiny Baichuan2 with the official 125,696-token vocabulary, so the
output head and the loss cost what they cost in the real model) for one epoch over the same RoleBench-zh
samples, with a plain PyTorch loop (forward, backward, AdamW on the LoRA parameters):

    recipe  the RolePlayProj recipe: random sample order, every batch right-padded to its longest sample,
            no attention_mask, loss from the full-vocabulary logits upcast to fp32 (what
            `model(input_ids, labels=labels)` does in the official modeling file), `loss.item()` every step;
    ours    what train.py does: samples packed into rows of max_len (position_ids restart per document,
            attention_mask=None), the output head computed only at positions with a learned next token
            (`logits_to_keep`), chunked fp32 loss (`sft.train.objectives.sft.batch_loss_sums`), loss kept on the device.

Each variant runs in a fresh subprocess so that its peak memory (peak RSS from /proc/self/status VmHWM on
CPU, `torch.cuda.max_memory_allocated` on GPU) is its own. Both see the same samples, tokens and learned
tokens (checked). Before training, the parent computes the loss of the untrained model on the same probe
samples through both pipelines; the two must agree (same model, same data), which checks that packing,
`logits_to_keep` and the chunked loss change the cost, not the loss.

    python benchmarks/bench_train.py                  # CPU, fp32 base, 96 samples: ~3 minutes on 2 cores
    python benchmarks/bench_train.py --json bench.json --repeats 3    # alternate runs, keep the fastest
    python benchmarks/bench_train.py --device cuda --precision bf16 --quantization nf4 --samples 2048

See docs/PERFORMANCE.md for recorded results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: the project's packages live at the root
    sys.path.insert(0, str(REPO_ROOT))

from models import register_models  # noqa: E402
from models.tiny import build_tiny_baichuan  # noqa: E402
from sft.core.flags import add_arguments, flag, parse_flags  # noqa: E402
from sft.data.batching import build_dataloader  # noqa: E402
from sft.data.converters import convert_rolebench  # noqa: E402
from sft.data.dataset import SFTDataset, load_sft_dataset  # noqa: E402
from sft.data.formats import (  # noqa: E402
    IGNORE_INDEX,
    write_jsonl_atomic,
)
from sft.data.templates import get_template  # noqa: E402
from sft.modeling.loading import load_base_model, load_tokenizer, torch_dtype  # noqa: E402
from sft.train.model import find_lora_targets  # noqa: E402
from sft.train.objectives.sft import batch_loss_sums  # noqa: E402

logger = logging.getLogger("bench_train")

VARIANTS = ("recipe", "ours")
# Official Baichuan2-7B vocabulary: the output head and the loss scale with it.
BAICHUAN2_VOCAB_SIZE = 125696


# ---------------------------------------------------------------------------------------------
# Set-up shared by both variants (parent process)
# ---------------------------------------------------------------------------------------------


@dataclass
class BenchTrainArgs:
    """The flags of bench_train.py: the data, the model, the run, and a worker's (hidden)."""

    data_dir: Path = flag(
        REPO_ROOT.parent / "shared" / "data" / "rolebench-zh",
        "RoleBench-zh folder (rolebench-zh_*_train.jsonl, profiles-zh_desc.json)",
    )
    work_dir: Path | None = flag(
        None, "where the model, converted data and results are written (default: a temp dir, removed)"
    )
    samples: int = flag(96, "training samples (a seeded subset of the train split)")
    max_len: int = flag(512, "most tokens per sample, and the packed row size")
    max_src_len: int = flag(384, "most prompt tokens per sample")
    recipe_batch_size: int = flag(8, "samples per step of the recipe")
    packed_batch_size: int = flag(
        0, "packed rows per step of ours; 0 = as many rows as hold the recipe's real tokens per step"
    )
    probe_samples: int = flag(16, "samples of the step-0 loss check")
    vocab_size: int = flag(BAICHUAN2_VOCAB_SIZE, "model vocabulary (output head)")
    tokenizer_vocab_size: int = flag(
        8000, "pieces of the tokenizer trained on the train split (sets the token lengths of the samples)"
    )
    hidden_size: int = flag(256, "model width")
    num_layers: int = flag(2, "decoder layers")
    num_heads: int = flag(4, "attention heads")
    lora_r: int = flag(8, "LoRA rank (all linear layers but the head)")
    lora_alpha: int = flag(16, "LoRA alpha")
    lr: float = flag(1e-4, "AdamW learning rate")
    device: str = flag("cpu", "cpu or cuda (cuda:N)")
    precision: str = flag("fp32", "model/compute dtype", choices=("fp32", "bf16", "fp16"))
    quantization: str = flag("none", "storage of the frozen base", choices=("none", "nf4"))
    attn_implementation: str = flag("sdpa", "sdpa, eager or flash_attention_2")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)")
    seed: int = flag(42, "seed of the subset, the order and the LoRA init")
    variants: list[str] = flag(list(VARIANTS), "variants to run, in this order", choices=VARIANTS)
    repeats: int = flag(1, "runs per variant (alternating); the fastest is kept")
    json: Path | None = flag(None, "also write the results to this JSON file")
    loss_rtol: float = flag(1e-4, "largest relative step-0 loss difference accepted")
    # Internal: a worker subprocess runs one variant and writes its result to a file.
    worker: str | None = flag(None, argparse.SUPPRESS, choices=VARIANTS)
    spec: Path | None = flag(None, argparse.SUPPRESS)
    result: Path | None = flag(None, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/bench_train.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return add_arguments(p, BenchTrainArgs)


def parse_args(argv: list[str] | None) -> BenchTrainArgs:
    """The command line as a :class:`BenchTrainArgs` (checked by :func:`validate_args`)."""
    return parse_flags(build_parser(), BenchTrainArgs, argv)


def validate_args(args: BenchTrainArgs) -> None:
    """Collect every problem, then fail once with all of them."""
    problems = []
    if args.repeats < 1:
        problems.append(f"--repeats must be >= 1, got {args.repeats}")
    if args.samples < args.recipe_batch_size:
        problems.append(f"--samples {args.samples} < --recipe_batch_size {args.recipe_batch_size}")
    if not 0 < args.max_src_len < args.max_len:
        problems.append(f"need 0 < --max_src_len < --max_len, got {args.max_src_len} and {args.max_len}")
    if args.vocab_size < args.tokenizer_vocab_size:
        problems.append(
            f"--vocab_size {args.vocab_size} < --tokenizer_vocab_size {args.tokenizer_vocab_size}"
        )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.quantization == "nf4" and args.precision == "fp32" and args.device.startswith("cuda"):
        problems.append("--quantization nf4 on cuda: use --precision bf16 (QLoRA computes in bf16)")
    if not args.data_dir.is_dir():
        problems.append(f"--data_dir {args.data_dir} does not exist (RoleBench-zh lives in ../shared/data)")
    if problems:
        raise SystemExit("bench_train.py: " + "; ".join(problems))


def prepare(args: BenchTrainArgs, work_dir: Path) -> dict:
    """Convert the data, train a tokenizer on it, build the model; return the spec the workers read."""
    records, _ = convert_rolebench(args.data_dir, "train")
    # An in-domain tokenizer: its token lengths are of the order a large Chinese vocabulary gives (the
    # official tokenizer cannot be downloaded here). Every distinct line of the split, once.
    corpus = work_dir / "tokenizer_corpus.txt"
    lines = dict.fromkeys(
        line
        for r in records
        for text in (r.get("system", ""), *(t["content"] for t in r["conversations"]))
        for line in text.split("\n")
        if line.strip()
    )
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")

    subset = random.Random(args.seed).sample(records, min(args.samples, len(records)))
    data_file = work_dir / "train_subset.jsonl"
    write_jsonl_atomic(data_file, subset)

    model_dir = build_tiny_baichuan(
        work_dir / "model",
        position="rope",  # the Baichuan2-7B layout the recipe trains
        vocab_size=args.tokenizer_vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        seed=args.seed,
        corpus_files=[corpus],
    )
    widen_vocabulary(model_dir, args.vocab_size, args.seed)

    # Encode once here; the workers read the cache.
    tokenizer = load_tokenizer(model_dir)
    dataset = _load_dataset(model_dir, tokenizer, data_file, args, work_dir / "cache")
    stats = dict(dataset.stats)
    learned = sum(
        int((torch.tensor(dataset[i]["labels"][1:]) != IGNORE_INDEX).sum()) for i in range(len(dataset))
    )
    n_chars = sum(
        len(r.get("system", "")) + sum(len(t["content"]) for t in r["conversations"]) for r in subset
    )
    mean_len = stats["tokens"] / len(dataset)
    packed_bs = args.packed_batch_size or max(1, round(args.recipe_batch_size * mean_len / args.max_len))
    return {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_dir": str(model_dir),
        "data_file": str(data_file),
        "cache_dir": str(work_dir / "cache"),
        "packed_batch_size": packed_bs,
        "dataset": {
            "samples": len(dataset),
            "tokens": stats["tokens"],
            "learned_tokens": learned,
            "mean_len": round(mean_len, 1),
            "max_len_seen": int(dataset.lengths.max()),
            "chars_per_token": round(n_chars / stats["tokens"], 2),
            "truncated_prompt": stats["truncated_prompt"],
            "truncated_answer": stats["truncated_answer"],
            "skipped": stats["skipped"],
        },
    }


def widen_vocabulary(model_dir: Path, vocab_size: int, seed: int) -> None:
    """Rewrite the model with a `vocab_size` embedding and head (random, seeded).

    The tokenizer keeps its own pieces (ids < its size); the extra rows are never a target but every
    softmax runs over all of them, as in the official 125,696-token model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    if config.vocab_size == vocab_size:
        return
    # save_pretrained rewrites these two in transformers' own layout; keep the official files' layout
    # (generation_config.json carries the user/assistant turn tokens the template needs).
    kept = {
        name: (model_dir / name).read_text(encoding="utf-8")
        for name in ("config.json", "generation_config.json")
    }
    config.vocab_size = vocab_size
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(model_dir)
    official = json.loads(kept["config.json"])
    official["vocab_size"] = vocab_size
    (model_dir / "config.json").write_text(json.dumps(official, indent=2) + "\n", encoding="utf-8")
    (model_dir / "generation_config.json").write_text(kept["generation_config.json"], encoding="utf-8")


def _load_dataset(model_dir: Path, tokenizer, data_file: Path, args, cache_dir: Path) -> SFTDataset:
    template = get_template("baichuan2", tokenizer, model_dir)
    return load_sft_dataset(
        data_file,
        tokenizer,
        template,
        max_len=args.max_len,
        max_src_len=args.max_src_len,
        is_skip=False,
        loss_on="all",
        cache_dir=cache_dir,
    )


# ---------------------------------------------------------------------------------------------
# The recipe's pieces, reproduced (not used anywhere else in the project)
# ---------------------------------------------------------------------------------------------


class RecipeCollator:
    """The recipe's collator: right-pad to the batch's longest sample, no attention_mask."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, it in enumerate(items):
            input_ids[row, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
            labels[row, : len(it["labels"])] = torch.tensor(it["labels"])
        return {"input_ids": input_ids, "labels": labels}


def recipe_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Mean next-token loss as `model(input_ids, labels=labels)` computes it in the official modeling file.

    All T positions go through the output head, and the whole (B, T, V) logits tensor is upcast to fp32
    before the shift and the cross-entropy (a no-op copy-free cast when the model already runs in fp32).
    """
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
    logits = logits.float()
    shift_logits = logits[:, :-1].contiguous()  # (B, T-1, V)
    shift_labels = labels[:, 1:].contiguous()  # (B, T-1)
    return F.cross_entropy(
        shift_logits.view(-1, shift_logits.shape[-1]), shift_labels.view(-1), ignore_index=IGNORE_INDEX
    )


# ---------------------------------------------------------------------------------------------
# Worker: one variant in its own process
# ---------------------------------------------------------------------------------------------


@dataclass
class VariantResult:
    """Every number one variant reports."""

    variant: str
    steps: int = 0
    batch_size: int = 0
    rows: int = 0
    samples: int = 0
    real_tokens: int = 0
    learned_tokens: int = 0
    slots: int = 0  # batch rows x width summed over steps: what the model computes on
    head_positions: int = 0  # rows x positions sent through the output head
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user+sys time of all this process's threads: less sensitive to other processes' load
    train_loss: float = 0.0  # mean NLL per learned token over the epoch
    peak_mem_mb: float = 0.0
    load_mem_mb: float = 0.0  # memory after the model is loaded, before the loop
    memory_kind: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def real_tokens_per_s(self) -> float:
        return self.real_tokens / self.wall_s

    @property
    def learned_tokens_per_s(self) -> float:
        return self.learned_tokens / self.wall_s

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.slots


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's own address space.
    `getrusage(RUSAGE_SELF).ru_maxrss` is no good in a fresh subprocess: Linux carries the parent's
    high-water mark over fork and exec, so a worker started by a 5 GB parent would report >= 5 GB.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    # Other systems: ru_maxrss (KiB on Linux/BSD, bytes on macOS; only reached off Linux).
    divisor = 2**20 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / divisor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_model(spec: dict, device: torch.device) -> torch.nn.Module:
    """The base model (fp32/bf16, or NF4) with LoRA on every linear layer but the head."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    dtype = torch_dtype(spec["precision"])
    quantized = spec["quantization"] != "none"
    model = load_base_model(
        spec["model_dir"],
        spec["quantization"],
        dtype,
        device_map={"": device} if quantized else None,
        attn_implementation=spec["attn_implementation"],
    )
    if not quantized:
        model.to(device)
    model.config.use_cache = False
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(spec["seed"])  # the LoRA A matrices; B starts at zero, so step 0 is the base model
    config = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=0.0,  # dropout would make the two variants' losses differ by chance
        target_modules=find_lora_targets(model),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, config)


def _loader(spec: dict, variant: str, dataset: SFTDataset, pad_token_id: int) -> torch.utils.data.DataLoader:
    if variant == "recipe":
        # The recipe's RandomSampler over samples; seeded so that a rerun sees the same batches.
        generator = torch.Generator().manual_seed(spec["seed"])
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=spec["recipe_batch_size"],
            shuffle=True,
            generator=generator,
            collate_fn=RecipeCollator(pad_token_id),
        )
    return build_dataloader(
        dataset,
        batch_size=spec["packed_batch_size"],
        packing=True,
        max_len=spec["max_len"],
        shuffle=True,
        seed=spec["seed"],
        group_by_length=False,
        rank=0,
        world_size=1,
        pad_token_id=pad_token_id,
    )


@torch.no_grad()
def step0_check(spec: dict) -> dict:
    """Loss per learned token of the untrained model on the same probe samples through both pipelines.

    Runs in the parent process (the workers' memory stays their own). Same model, same samples: the
    losses must agree up to float rounding. The recipe sends no attention_mask, which is harmless here:
    padding sits to the right of every real token and attention is causal, so no real position can
    attend to a pad, and pad positions carry no label. Packing is exact because position_ids restart at
    each document and the model masks attention per document.
    """
    device = torch.device(spec["device"])
    model_dir = Path(spec["model_dir"])
    tokenizer = load_tokenizer(model_dir)
    dataset = _load_dataset(
        model_dir, tokenizer, Path(spec["data_file"]), argparse.Namespace(**spec), Path(spec["cache_dir"])
    )
    pad_id = tokenizer.pad_token_id
    n = min(spec["probe_samples"], len(dataset))
    probe = SFTDataset.from_samples([(dataset[i]["input_ids"], dataset[i]["labels"]) for i in range(n)], {})
    learned = sum(int((torch.tensor(probe[i]["labels"][1:]) != IGNORE_INDEX).sum()) for i in range(n))
    model = _build_model(spec, device)
    model.eval()  # no dropout either way (lora_dropout=0); eval only documents the intent

    recipe_batch = RecipeCollator(pad_id)([probe[i] for i in range(n)])
    recipe = float(recipe_loss(model, recipe_batch, device))

    packed = build_dataloader(
        probe,
        batch_size=n,  # every packed row of the probe in one batch
        packing=True,
        max_len=spec["max_len"],
        shuffle=False,
        seed=0,
        group_by_length=False,
        rank=0,
        world_size=1,
        pad_token_id=pad_id,
    )
    (batch,) = list(packed)
    nll_sum, n_tokens = batch_loss_sums(model, batch, device)
    if int(n_tokens) != learned:
        raise RuntimeError(f"packed probe has {int(n_tokens)} learned tokens, the samples have {learned}")
    ours = float(nll_sum) / learned
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "probe_samples": n,
        "probe_learned_tokens": learned,
        "recipe_loss": recipe,
        "ours_loss": ours,
        "rel_diff": abs(ours - recipe) / abs(recipe),
    }


def run_worker(spec: dict, variant: str) -> VariantResult:
    """Train one epoch with `variant`'s data pipeline and loss; measure time, tokens and memory."""
    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    model_dir = Path(spec["model_dir"])
    tokenizer = load_tokenizer(model_dir)
    dataset = _load_dataset(
        model_dir, tokenizer, Path(spec["data_file"]), argparse.Namespace(**spec), Path(spec["cache_dir"])
    )
    pad_id = tokenizer.pad_token_id
    loader = _loader(spec, variant, dataset, pad_id)

    model = _build_model(spec, device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"])
    result = VariantResult(variant=variant)
    result.batch_size = spec["recipe_batch_size"] if variant == "recipe" else spec["packed_batch_size"]

    _sync(device)
    if device.type == "cuda":
        result.memory_kind = "torch.cuda.max_memory_allocated"
        torch.cuda.reset_peak_memory_stats(device)
        result.load_mem_mb = torch.cuda.memory_allocated(device) / 2**20
    else:
        result.memory_kind = "peak RSS (VmHWM)"
        result.load_mem_mb = _peak_rss_mb()

    # Iterate the batch sampler and collate by hand (what a DataLoader with num_workers=0 does) so that the
    # real-token count of every batch comes from the item lengths, not from the padded tensors. The index
    # lists are drawn once: a second pass over the recipe's RandomSampler would draw another order.
    items, collate = loader.dataset, loader.collate_fn
    batches = list(loader.batch_sampler)

    # Warm-up (untimed): one forward+backward on the first batch, gradients dropped, weights unchanged.
    warm_start = time.perf_counter()
    _train_loss(variant, model, collate([items[i] for i in batches[0]]), device).backward()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    result.extra["warmup_s"] = time.perf_counter() - warm_start

    nll_total = 0.0  # recipe: host float, filled by the per-step .item()
    nll_device = torch.zeros((), dtype=torch.float64, device=device)  # ours: summed on the device
    step_s = []  # per-step times on CPU only (on a GPU they would need a sync per step)
    cpu_start, times_start = time.process_time(), os.times()
    start = last = time.perf_counter()
    for indices in batches:
        batch = collate([items[i] for i in indices])
        labels = batch["labels"]
        learned = int((labels[:, 1:] != IGNORE_INDEX).sum())  # CPU tensor: no device sync
        if variant == "recipe":
            loss = recipe_loss(model, batch, device)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            nll_total += loss.item() * learned  # the recipe's per-step host sync
            result.head_positions += labels.numel()
        else:
            nll_sum, _ = batch_loss_sums(model, batch, device)
            (nll_sum / max(learned, 1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            nll_device += nll_sum.detach()  # no sync: read once after the loop
            result.head_positions += _head_rows(labels)
        result.steps += 1
        result.rows += labels.shape[0]
        result.slots += labels.numel()
        result.real_tokens += int(sum(items.lengths[i] for i in indices))
        result.learned_tokens += learned
        if device.type == "cpu":
            now = time.perf_counter()
            step_s.append(round(now - last, 3))
            last = now
    _sync(device)
    result.wall_s = time.perf_counter() - start
    result.cpu_s = time.process_time() - cpu_start
    times_end = os.times()
    # Kernel time is mostly page faults on freshly mapped large tensors (glibc maps blocks > 32 MiB anew
    # each time); a GPU's caching allocator has no such cost, so it is reported apart.
    result.extra["user_s"] = times_end.user - times_start.user
    result.extra["system_s"] = times_end.system - times_start.system

    result.samples = len(dataset)
    result.train_loss = (nll_total if variant == "recipe" else float(nll_device)) / result.learned_tokens
    if device.type == "cuda":
        result.peak_mem_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result.peak_mem_mb = _peak_rss_mb()
    result.extra["torch_threads"] = torch.get_num_threads()
    result.extra["step_s"] = step_s
    return result


def _train_loss(variant: str, model, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The mean loss per learned token of one batch, as `variant` computes it."""
    if variant == "recipe":
        return recipe_loss(model, batch, device)
    nll_sum, n_tokens = batch_loss_sums(model, batch, device)
    return nll_sum / n_tokens.clamp(min=1)


def _head_rows(labels: torch.Tensor) -> int:
    """Hidden states `batch_loss_sums` sends through the output head: the learned (row, position) pairs."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------
# Parent: run the workers, compare, report
# ---------------------------------------------------------------------------------------------


def run_variant_subprocess(variant: str, spec_file: Path, work_dir: Path) -> VariantResult:
    result_file = work_dir / f"result_{variant}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--spec", str(spec_file)]
    cmd += ["--result", str(result_file)]
    logger.info("running %s in a fresh process", variant)
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    data = json.loads(result_file.read_text(encoding="utf-8"))
    return VariantResult(**data)


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model_name = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    return f"{model_name}, {os.cpu_count()} logical CPUs"


def markdown_table(results: dict[str, VariantResult]) -> str:
    """One row per variant."""
    lines = [
        "| variant | steps | rows/step | wall s | CPU s | real tok/s | learned tok/s | padding "
        "| head positions | peak mem MB | mem above load MB | epoch loss |",
        "|" + "---|" * 12,
    ]
    for r in results.values():
        lines.append(
            f"| {r.variant} | {r.steps} | {r.batch_size} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {r.real_tokens_per_s:.0f} | "
            f"{r.learned_tokens_per_s:.0f} | {100 * r.padding_fraction:.1f}% | {r.head_positions} | "
            f"{r.peak_mem_mb:.0f} | {r.peak_mem_mb - r.load_mem_mb:.0f} | {r.train_loss:.4f} |"
        )
    return "\n".join(lines)


def ratios(results: dict[str, VariantResult]) -> dict[str, float]:
    """ours / recipe for every measured quantity (tokens/s > 1 and the rest < 1 favour ours)."""
    rec, ours = results["recipe"], results["ours"]
    return {
        "wall time": ours.wall_s / rec.wall_s,
        "CPU time": ours.cpu_s / rec.cpu_s,
        "real tokens/s": ours.real_tokens_per_s / rec.real_tokens_per_s,
        "learned tokens/s": ours.learned_tokens_per_s / rec.learned_tokens_per_s,
        "peak memory": ours.peak_mem_mb / rec.peak_mem_mb,
        "memory above load": (ours.peak_mem_mb - ours.load_mem_mb)
        / max(rec.peak_mem_mb - rec.load_mem_mb, 1e-9),
        "token slots computed": ours.slots / rec.slots,
        "output-head positions": ours.head_positions / rec.head_positions,
    }


def check_same_work(results: dict[str, VariantResult]) -> None:
    """Both variants must have trained on exactly the same samples, tokens and learned tokens."""
    rec, ours = results["recipe"], results["ours"]
    for name in ("samples", "real_tokens", "learned_tokens"):
        if getattr(rec, name) != getattr(ours, name):
            raise RuntimeError(
                f"variants differ in {name}: recipe {getattr(rec, name)}, ours {getattr(ours, name)}"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    register_models()
    if args.worker:
        spec = json.loads(args.spec.read_text(encoding="utf-8"))
        result = run_worker(spec, args.worker)
        args.result.write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
        return 0

    validate_args(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        spec = prepare(args, work_dir)
        logger.info("data: %s; ours packs %d rows per step", spec["dataset"], spec["packed_batch_size"])
        spec_file = work_dir / "spec.json"
        spec_file.write_text(json.dumps(spec, indent=2, ensure_ascii=False), encoding="utf-8")
        step0 = step0_check(spec)
        # Alternate the variants so that load from other processes hits both alike; keep each one's fastest run.
        runs: dict[str, list[VariantResult]] = {v: [] for v in args.variants}
        for _ in range(args.repeats):
            for variant in args.variants:
                runs[variant].append(run_variant_subprocess(variant, spec_file, work_dir))
    results = {v: min(rs, key=lambda r: r.wall_s) for v, rs in runs.items()}

    report = {
        "command": " ".join(["python", *sys.argv]) if argv is None else "main(" + repr(argv) + ")",
        "date": date.today().isoformat(),
        "device": device_description(args.device),
        "torch": torch.__version__,
        "settings": {k: v for k, v in spec.items() if k not in ("worker", "spec", "result", "json")},
        "step0": step0,
        "results": {
            k: {
                **asdict(r),
                "real_tokens_per_s": r.real_tokens_per_s,
                "learned_tokens_per_s": r.learned_tokens_per_s,
                "padding_fraction": r.padding_fraction,
                "all_wall_s": [x.wall_s for x in runs[k]],
                "all_cpu_s": [x.cpu_s for x in runs[k]],
            }
            for k, r in results.items()
        },
    }
    # The tables are this script's product: printed.
    print(markdown_table(results))
    if set(results) == set(VARIANTS):
        check_same_work(results)
        report["ratios"] = ratios(results)
        print("\n| ours / recipe | ratio |\n|---|---|")
        for name, value in report["ratios"].items():
            print(f"| {name} | {value:.3f} |")
    print(
        f"\nstep-0 loss per learned token, {step0['probe_samples']} samples, {step0['probe_learned_tokens']} "
        f"learned tokens: recipe {step0['recipe_loss']:.6f}, ours {step0['ours_loss']:.6f} "
        f"(relative difference {step0['rel_diff']:.1e})"
    )
    print(f"data: {spec['dataset']}")
    print(f"device: {report['device']}; torch threads {results[args.variants[0]].extra['torch_threads']}")
    report["total_s"] = time.perf_counter() - started
    print(f"total time {report['total_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        logger.info("wrote %s", args.json)
    if step0["rel_diff"] > args.loss_rtol:
        logger.error(
            "step-0 losses differ by %.2e (> --loss_rtol %.0e): packing, logits_to_keep or the chunked loss "
            "changed the loss, so the timings do not compare like with like",
            step0["rel_diff"],
            args.loss_rtol,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
