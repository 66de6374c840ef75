"""GPU benchmark: our training pipeline against the RolePlayProj recipe on a Baichuan2-7B-shaped model.

The model is random (no weights can be downloaded), with the official Baichuan2-7B shape (hidden 4096, 32 layers,
32 heads, MLP 11008, 125,696-token vocabulary, RoPE), loaded as train.py loads it: NF4 base, bf16 compute
(`sft.train.model.load_model_for_training`, parameters cast to bf16 as DeepSpeed's bf16 engine does), LoRA with
train.py's defaults (the recipe's: r 16, alpha 64, dropout 0.1, every linear layer but the head), gradient
checkpointing on (the recipe's set-up: its 32k-token run fits in 60 GiB only so). One process, one model, a plain
loop (forward, backward, AdamW on the LoRA parameters); the variants differ only in the data and loss path:

    recipe      benchmarks/bench_train.py's re-implementation: micro-batches padded to their longest sample, no
                attention mask, the whole (B, T, V) logits upcast to fp32 for the loss, `loss.item()` every step,
                the NormHead normalised in every forward (the official modeling file's training path);
    ours        train.py's path: `sft.train.objectives.sft.batch_loss_sums` (head on the learned tokens only, fused linear +
                cross-entropy, right-padded batches without a mask), batches from `sft.data.dataset`;
    ours_liger  ours after `sft.train.kernels.apply_liger` (Liger Kernel's RMSNorm, SwiGLU, RoPE, fused linear CE).

Workloads (docs/PERFORMANCE.md, "GPU check"):

    R   RoleBench-zh sample lengths (benchmarks/data/rolebench_zh_lengths.json: prompt and answer token counts;
        random token ids): samples/s. Recipe at micro-batch 2 as its README runs; ours as train.py would be run
        for speed (length-grouped padded batches, and packed rows), the best of those configurations.
    D   dense rows of 2,048 learned tokens: tokens/s and peak memory at micro-batch 2, and each variant's best
        tokens/s over micro-batches 1, 2, 4, 8.
    L   one sequence at micro-batch 1: peak memory at 8k, 16k and 32k tokens, and the longest trainable length
        extrapolated linearly from them to the device's memory (attention is FlashAttention: memory is linear in
        the length, time quadratic, so the longest lengths themselves are not run).

Writes `bench_gpu.md` (the results table) and `bench_gpu.json` under --out; prints the table and what it skipped.
Every measurement checks the time left (--budget_s) first and is skipped, and listed, when it would not fit.

    python benchmarks/bench_gpu.py --out results/            # on a GPU: ~4 minutes on one H200
    python benchmarks/bench_gpu.py --dry-run --out /tmp/x    # the same code paths, tiny sizes, CPU, ~15 s of CPU time
    python benchmarks/bench_gpu.py --write_lengths           # regenerate the R lengths from ../shared/data
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: the project's packages live at the root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_train import RecipeCollator, recipe_loss  # noqa: E402
from models import register_models  # noqa: E402
from sft.core.flags import add_arguments, flag, parse_flags  # noqa: E402
from sft.data.batching import build_dataloader  # noqa: E402
from sft.data.dataset import SFTDataset  # noqa: E402
from sft.data.formats import IGNORE_INDEX  # noqa: E402
from sft.modeling.loading import torch_dtype  # noqa: E402
from sft.train.args import TrainArgs  # noqa: E402
from sft.train.kernels import apply_liger, liger_problem  # noqa: E402
from sft.train.model import load_model_for_training  # noqa: E402
from sft.train.objectives.sft import batch_loss_sums  # noqa: E402

logger = logging.getLogger("bench_gpu")

LENGTHS_FILE = REPO_ROOT / "benchmarks" / "data" / "rolebench_zh_lengths.json"
VARIANTS = ("recipe", "ours", "ours_liger")
# The official Baichuan2-7B shape; --dry-run uses the tiny one.
SHAPES = {
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
VOCAB = {"7b": 125696, "tiny": 2048}


@dataclass
class Sizes:
    """Workload sizes: the GPU run's, or --dry-run's tiny ones."""

    shape: str
    r_samples: int  # samples drawn (in order) for R; each configuration cycles through them
    r_target_s: float  # timed seconds per R configuration
    r_ours_configs: tuple[tuple[str, int], ...]  # ("grouped", micro-batch) | ("packed", rows of d_row)
    d_row: int
    d_micro_batches: tuple[int, ...]
    d_target_s: float
    l_lengths: tuple[int, ...]
    max_len: int  # longest R sample kept
    precision: str  # compute dtype: bf16 on the GPU; the dry run's fp32 is faster on a small CPU
    warmup_steps: int  # untimed steps before each timing


GPU_SIZES = Sizes("7b", 4096, 4.0, (("grouped", 16), ("grouped", 32), ("packed", 2)), 2048, (1, 2, 4, 8), 3.0,
                  (8192, 16384, 32768), 2048, "bf16", 2)  # fmt: skip
DRY_SIZES = Sizes(
    "tiny", 16, 0.0, (("grouped", 4), ("packed", 2)), 32, (1, 2), 0.0, (32, 64, 128), 128, "fp32", 1
)


# ---------------------------------------------------------------------------------------------
# The R lengths: derived once from RoleBench-zh, committed (../shared does not travel to the GPU)
# ---------------------------------------------------------------------------------------------


def write_lengths(data_dir: Path, out_file: Path, *, samples: int, seed: int) -> dict:
    """Encode a seeded subset of RoleBench-zh train with the baichuan2 template; write prompt/answer token counts.

    The tokenizer is benchmarks/bench_train.py's: a SentencePiece BPE of 8,000 pieces trained on the split (the
    official tokenizer cannot be downloaded). Every record is one user turn and one answer, so a sample is
    `prompt` unlearned tokens followed by `answer` learned ones (the answer and its `</s>`).
    """
    from benchmarks.bench_train import _load_dataset, parse_args, prepare

    with tempfile.TemporaryDirectory(prefix="bench_lengths_") as tmp:
        args = parse_args(
            ["--data_dir", str(data_dir), "--samples", str(samples), "--seed", str(seed), "--max_len", "4096"]
        )
        args.max_src_len = 4000
        spec = prepare(args, Path(tmp))
        from sft.modeling.loading import load_tokenizer

        tokenizer = load_tokenizer(spec["model_dir"])
        dataset = _load_dataset(Path(spec["model_dir"]), tokenizer, Path(spec["data_file"]), args, Path(tmp))
        pairs = []
        for i in range(len(dataset)):
            labels = dataset[i]["labels"]
            prompt = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
            if any(label == IGNORE_INDEX for label in labels[prompt:]):
                raise ValueError(f"sample {i} is not one prompt followed by one answer")
            pairs.append([prompt, len(labels) - prompt])
    report = {
        "source": f"RoleBench-zh train ({data_dir.name}), {len(pairs)} records drawn with seed {seed}",
        "tokenizer": "SentencePiece BPE, 8,000 pieces, trained on the split (benchmarks/bench_train.py)",
        "template": "baichuan2",
        "fields": "[prompt tokens (no loss), answer tokens (learned)] per sample",
        "samples": pairs,
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(report, separators=(",", ":")) + "\n", encoding="utf-8")
    return report


def rolebench_samples(n: int, vocab: int, max_len: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of the first n committed RoleBench-zh lengths (cycled), random token ids."""
    pairs = json.loads(LENGTHS_FILE.read_text(encoding="utf-8"))["samples"]
    rng = random.Random(seed)
    samples = []
    for k in range(n):
        prompt, answer = pairs[k % len(pairs)]
        length = min(prompt + answer, max_len)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        labels = [IGNORE_INDEX] * min(prompt, length) + ids[prompt:]
        samples.append((ids, labels))
    return samples


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def build_model_dir(work_dir: Path, shape: str, device: torch.device, seed: int) -> Path:
    """A random Baichuan2 of `shape` (bf16 weights), initialised on `device` and saved as a model directory."""
    from transformers import AutoModelForCausalLM

    from models.baichuan import BaichuanConfig

    config = BaichuanConfig(vocab_size=VOCAB[shape], position_embedding_type="rope", **SHAPES[shape])
    config.model_max_length = 1 << 20  # lengths are the benchmark's business
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model_dir = work_dir / f"baichuan2-{shape}-random"
    model.save_pretrained(model_dir)
    del model
    _free(device)
    return model_dir


def load_model(model_dir: Path, device: torch.device, precision: str) -> torch.nn.Module:
    """NF4 base + LoRA exactly as train.py builds it, parameters cast to `precision` as DeepSpeed's engine does."""
    args = TrainArgs(
        model_name_or_path=str(model_dir),
        quantization="nf4",
        precision=precision,
        gradient_checkpointing=True,
        attn_implementation="sdpa",
    )
    model = load_model_for_training(args, device)  # quantised: every weight placed on `device` at load time
    dtype = torch_dtype(precision)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model.train()


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@dataclass
class Deadline:
    """The time left of --budget_s, and what was skipped for want of it."""

    budget_s: float
    start: float = field(default_factory=time.perf_counter)
    skipped: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def allows(self, what: str, needs_s: float) -> bool:
        if self.left() >= needs_s:
            return True
        self.skipped.append(f"{what} (needs ~{needs_s:.0f} s, {max(self.left(), 0):.0f} s left)")
        logger.warning("skipped %s: out of time", what)
        return False


class Trainer:
    """One model and optimizer; a training step as each variant takes it."""

    def __init__(self, model: torch.nn.Module, device: torch.device, warmup_steps: int = 2) -> None:
        self.model, self.device, self.warmup_steps = model, device, warmup_steps
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.head = model.get_output_embeddings()

    def adapter(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable (LoRA) parameters."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_adapter(self, adapter: dict[str, torch.Tensor]) -> None:
        for name, param in self.model.named_parameters():
            if name in adapter:
                param.copy_(adapter[name])

    def step(self, variant: str, batch: dict[str, torch.Tensor]) -> None:
        learned = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # CPU labels: no sync
        if variant == "recipe":
            # The official NormHead renormalises its weight in every training forward.
            self.head.cache_normalized_weight = False
            try:
                loss = recipe_loss(self.model, batch, self.device)
                loss.backward()
            finally:
                self.head.cache_normalized_weight = True
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.nll += loss.item() * learned  # the recipe's per-step host sync
            return
        head_loss = "liger" if variant == "ours_liger" else "fused"
        nll_sum, _ = batch_loss_sums(self.model, batch, self.device, head_loss=head_loss)
        (nll_sum / max(learned, 1)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.nll += nll_sum.detach()

    def measure(self, variant: str, batches: Iterator[dict], target_s: float, max_steps: int = 200) -> dict:
        """Untimed warm-up steps, then about `target_s` seconds of steps (at least 2) with one sync at the end."""
        rows = tokens = samples = 0
        _free(self.device)
        warm = time.perf_counter()
        for _ in range(self.warmup_steps):
            self.step(variant, next(batches))
        _sync(self.device)
        per_step = (time.perf_counter() - warm) / self.warmup_steps
        steps = max(2, min(max_steps, math.ceil(target_s / max(per_step, 1e-6))))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(batches)
            self.step(variant, batch)
            rows += batch["labels"].shape[0]
            samples += int(batch.get("n_samples", batch["labels"].shape[0]))
            mask = batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            tokens += int(batch.get("n_tokens", real))
        _sync(self.device)
        seconds = time.perf_counter() - start
        return {
            "steps": steps,
            "seconds": round(seconds, 3),
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "rows_per_step": rows / steps,
            "peak_gib": _peak_gib(self.device),
        }

    def one_step_peak(self, variant: str, batch: dict) -> dict:
        """One step (after a free): its seconds and peak memory."""
        _free(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        self.step(variant, batch)
        _sync(self.device)
        return {"seconds": round(time.perf_counter() - start, 3), "peak_gib": _peak_gib(self.device)}


def _oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _recover(trainer: Trainer) -> None:
    trainer.optimizer.zero_grad(set_to_none=True)
    _free(trainer.device)


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


def _cycle(make: Callable[[], Iterator[dict]]) -> Iterator[dict]:
    while True:
        yield from make()


def r_batches(
    variant_config: tuple[str, int], samples, pad_id: int, max_len: int, seed: int, pin_memory: bool = False
) -> Iterator[dict]:
    """R batches: the recipe's (random order, micro-batch 2, padded, no mask) or ours (sft.data.dataset)."""
    kind, size = variant_config
    if kind == "recipe":
        collate = RecipeCollator(pad_id)
        items = [{"input_ids": ids, "labels": labels} for ids, labels in samples]

        def recipe_epoch() -> Iterator[dict]:
            order = list(range(len(items)))
            random.Random(seed).shuffle(order)
            for k in range(0, len(order) - size + 1, size):
                chosen = [items[i] for i in order[k : k + size]]
                n_tokens = sum(len(it["input_ids"]) for it in chosen)  # real tokens: the recipe sends no mask
                yield {**collate(chosen), "n_samples": size, "n_tokens": n_tokens}

        return _cycle(recipe_epoch)
    dataset = SFTDataset.from_samples(samples, {})
    loader = build_dataloader(
        dataset,
        batch_size=size,
        packing=kind == "packed",
        max_len=max_len,
        shuffle=True,
        seed=seed,
        group_by_length=kind == "grouped",
        rank=0,
        world_size=1,
        pad_token_id=pad_id,
        pin_memory=pin_memory,  # as train.py on CUDA: host-to-device copies that do not block
    )

    def ours_epoch() -> Iterator[dict]:
        for batch in loader:
            if kind == "packed":
                batch["n_samples"], batch["n_tokens"] = _packed_counts(batch)
            yield batch

    return _cycle(ours_epoch)


def _packed_counts(batch: dict) -> tuple[int, int]:
    """(samples, real tokens) of packed rows: documents with a learned token; the row's padding is a
    document of its own (positions restart at 0) that learns nothing."""
    documents = (batch["position_ids"] == 0).cumsum(-1)  # (B, T) document index per row
    learned = batch["labels"] != IGNORE_INDEX
    samples = tokens = 0
    for row in range(documents.shape[0]):
        real = documents[row][learned[row]].unique()
        samples += len(real)
        tokens += int(torch.isin(documents[row], real).sum())
    return samples, tokens


def dense_batch(rows: int, length: int, vocab: int, seed: int) -> dict:
    """Rows of random tokens, every next token learned, positions 0..T-1, no padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=gen)
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": torch.arange(length).expand(rows, length),
    }


def run_r(trainer: Trainer, variants: list[str], sizes: Sizes, vocab: int, deadline: Deadline) -> dict:
    samples = rolebench_samples(sizes.r_samples, vocab, sizes.max_len, seed=0)
    results: dict = {"samples_mean_tokens": sum(len(s[0]) for s in samples) / len(samples)}
    for variant in variants:
        configs = [("recipe", 2)] if variant == "recipe" else list(sizes.r_ours_configs)
        for config in configs:
            name = f"R {variant} {config[0]} {config[1]}"
            if not deadline.allows(name, sizes.r_target_s * 2.5 + 5):
                continue
            try:
                batches = r_batches(config, samples, 0, sizes.max_len, 0, trainer.device.type == "cuda")
                results[f"{variant}/{config[0]}-{config[1]}"] = trainer.measure(
                    variant, batches, sizes.r_target_s
                )
            except RuntimeError as err:
                if not _oom(err):
                    raise
                _recover(trainer)
                results[f"{variant}/{config[0]}-{config[1]}"] = {"oom": True}
            logger.info("%s: %s", name, results.get(f"{variant}/{config[0]}-{config[1]}"))
    return results


def run_d(trainer: Trainer, variants: list[str], sizes: Sizes, vocab: int, deadline: Deadline) -> dict:
    results: dict = {}
    for variant in variants:
        for rows in sizes.d_micro_batches:
            name = f"D {variant} {rows}x{sizes.d_row}"
            if not deadline.allows(name, sizes.d_target_s * 2.5 + 5 * rows / 2):
                continue
            batch = dense_batch(rows, sizes.d_row, vocab, seed=rows)
            try:
                results[f"{variant}/{rows}"] = trainer.measure(
                    variant, iter(lambda b=batch: b, None), sizes.d_target_s
                )
            except RuntimeError as err:
                if not _oom(err):
                    raise
                _recover(trainer)
                results[f"{variant}/{rows}"] = {"oom": True}
                logger.info("%s: out of memory", name)
                break  # larger micro-batches will not fit either
            logger.info("%s: %s", name, results[f"{variant}/{rows}"])
    return results


def run_l(trainer: Trainer, variants: list[str], sizes: Sizes, vocab: int, deadline: Deadline) -> dict:
    results: dict = {}
    device = trainer.device
    capacity = (
        torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    )
    results["capacity_gib"] = capacity
    for variant in variants:
        points = []
        for length in sizes.l_lengths:
            name = f"L {variant} 1x{length}"
            if not deadline.allows(name, 20 * length / 32768 + 5):
                continue
            batch = dense_batch(1, length, vocab, seed=length)
            try:
                if not points:  # warm this variant's kernels at the first length
                    trainer.step(variant, batch)
                measured = trainer.one_step_peak(variant, batch)
            except RuntimeError as err:
                if not _oom(err):
                    raise
                _recover(trainer)
                results[f"{variant}/{length}"] = {"oom": True}
                break
            results[f"{variant}/{length}"] = measured
            if measured["peak_gib"] is not None:
                points.append((length, measured["peak_gib"]))
            logger.info("%s: %s", name, measured)
        if len(points) >= 2 and capacity:
            slope, intercept = _line(points)
            results[f"{variant}/fit"] = {
                "gib_per_1k_tokens": slope * 1024,
                "intercept_gib": intercept,
                "longest_tokens": int((capacity - intercept) / slope) if slope > 0 else None,
                "max_residual_gib": max(abs(m - (intercept + slope * n)) for n, m in points),
            }
    return results


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    return slope, mean_y - slope * mean_x


@torch.no_grad()
def probe_losses(trainer: Trainer, variants: list[str], vocab: int, sizes: Sizes) -> dict:
    """Loss per learned token of the same R batch through each variant's path (eval mode: no dropout)."""
    samples = rolebench_samples(8, vocab, sizes.max_len, seed=1)
    items = [{"input_ids": ids, "labels": labels} for ids, labels in samples]
    recipe_batch = RecipeCollator(0)(items)
    from sft.data.batching import PaddedCollator

    ours_batch = PaddedCollator(0)([{k: torch.tensor(v).numpy() for k, v in it.items()} for it in items])
    learned = int((recipe_batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    trainer.model.eval()
    out = {}
    try:
        for variant in variants:
            if variant == "recipe":
                out[variant] = float(recipe_loss(trainer.model, recipe_batch, trainer.device))
            else:
                head_loss = "liger" if variant == "ours_liger" else "fused"
                nll, n = batch_loss_sums(trainer.model, ours_batch, trainer.device, head_loss=head_loss)
                assert int(n) == learned
                out[variant] = float(nll) / learned
    finally:
        trainer.model.train()
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _best(results: dict, prefix: str, key: str) -> tuple[str | None, float | None]:
    candidates = [(k, v[key]) for k, v in results.items() if k.startswith(prefix) and key in v]
    if not candidates:
        return None, None
    return max(candidates, key=lambda kv: kv[1])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def summary_rows(report: dict) -> list[list[str]]:
    """The table: one row per goal, plus Liger's rows."""
    r, d, lw = report.get("R", {}), report.get("D", {}), report.get("L", {})
    d_row = report.get("sizes", {}).get("d_row", 2048)
    rows = []
    rec_r = r.get("recipe/recipe-2", {}).get("samples_per_s")
    ours_cfg, ours_r = _best(r, "ours/", "samples_per_s")
    _, liger_r = _best(r, "ours_liger/", "samples_per_s")
    rows.append(["R samples/s", _fmt(rec_r), f"{_fmt(ours_r)} ({ours_cfg or '—'})", _fmt(_ratio(ours_r, rec_r)),
                 ">= 20x", _met(_ratio(ours_r, rec_r), 20, above=True), _fmt(liger_r)])  # fmt: skip
    rec_d2, ours_d2 = d.get("recipe/2", {}), d.get("ours/2", {})
    rows.append([f"D tokens/s, 2 x {d_row}", _fmt(rec_d2.get("tokens_per_s"), 0), _fmt(ours_d2.get("tokens_per_s"), 0),
                 _fmt(_ratio(ours_d2.get("tokens_per_s"), rec_d2.get("tokens_per_s"))), "", "",
                 _fmt(d.get("ours_liger/2", {}).get("tokens_per_s"), 0)])  # fmt: skip
    rec_cfg, rec_best = _best(d, "recipe/", "tokens_per_s")
    ours_cfg, ours_best = _best(d, "ours/", "tokens_per_s")
    _, liger_best = _best(d, "ours_liger/", "tokens_per_s")
    rows.append(["D best tokens/s (micro-batch)", f"{_fmt(rec_best, 0)} ({rec_cfg or '—'})",
                 f"{_fmt(ours_best, 0)} ({ours_cfg or '—'})", _fmt(_ratio(ours_best, rec_best)), ">= 2x",
                 _met(_ratio(ours_best, rec_best), 2, above=True), _fmt(liger_best, 0)])  # fmt: skip
    rows.append([f"D peak GiB, 2 x {d_row}", _fmt(rec_d2.get("peak_gib")), _fmt(ours_d2.get("peak_gib")),
                 _fmt(_ratio(ours_d2.get("peak_gib"), rec_d2.get("peak_gib"))), "<= 0.6x",
                 _met(_ratio(ours_d2.get("peak_gib"), rec_d2.get("peak_gib")), 0.6, above=False),
                 _fmt(d.get("ours_liger/2", {}).get("peak_gib"))])  # fmt: skip
    rec_l, ours_l = lw.get("recipe/fit", {}), lw.get("ours/fit", {})
    rows.append(["L longest tokens (linear fit)", _fmt(rec_l.get("longest_tokens")), _fmt(ours_l.get("longest_tokens")),
                 _fmt(_ratio(ours_l.get("longest_tokens"), rec_l.get("longest_tokens"))), ">= 4x",
                 _met(_ratio(ours_l.get("longest_tokens"), rec_l.get("longest_tokens")), 4, above=True),
                 _fmt(lw.get("ours_liger/fit", {}).get("longest_tokens"))])  # fmt: skip
    longest = max(report.get("sizes", {}).get("l_lengths", [0]))
    rows.append([f"L peak GiB, 1 x {longest}", _fmt(lw.get(f"recipe/{longest}", {}).get("peak_gib")),
                 _fmt(lw.get(f"ours/{longest}", {}).get("peak_gib")), "", "", "",
                 _fmt(lw.get(f"ours_liger/{longest}", {}).get("peak_gib"))])  # fmt: skip
    return rows


def _met(ratio: float | None, goal: float, *, above: bool) -> str:
    if ratio is None:
        return "—"
    return "yes" if (ratio >= goal if above else ratio <= goal) else "no"


def markdown(report: dict) -> str:
    header = ["measure", "recipe", "ours", "ours / recipe", "goal", "met", "ours + Liger"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(report)]
    probe = report.get("probe_loss", {})
    lines.append("")
    lines.append(
        "Step-0 loss per learned token, same batch: " + ", ".join(f"{k} {v:.6f}" for k, v in probe.items())
    )
    lines.append(
        f"Device: {report['device']}; torch {report['torch']}; {report['date']}; shape {report['shape']}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


@dataclass
class BenchGpuArgs:
    """The flags of bench_gpu.py."""

    out: Path = flag(Path("bench_gpu_out"), "where bench_gpu.md/.json are written")
    work_dir: Path | None = flag(None, "where the random model is saved (default: temp)")
    budget_s: float = flag(300.0, "seconds for everything; parts that would not fit are skipped")
    dry_run: bool = flag(False, "tiny model and sizes on the CPU", option="--dry-run", action="store_true")
    variants: list[str] = flag(list(VARIANTS), "variants to run", choices=VARIANTS)
    workloads: list[str] = flag(["R", "D", "L"], "workloads", choices=("R", "D", "L"))
    write_lengths: bool = flag(False, f"regenerate {LENGTHS_FILE.name} and exit", action="store_true")
    data_dir: Path = flag(
        REPO_ROOT.parent / "shared" / "data" / "rolebench-zh", "RoleBench-zh folder (for --write_lengths)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/bench_gpu.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return add_arguments(p, BenchGpuArgs)


def main(argv: list[str] | None = None) -> int:
    args = parse_flags(build_parser(), BenchGpuArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    register_models()
    if args.write_lengths:
        report = write_lengths(args.data_dir, LENGTHS_FILE, samples=4096, seed=42)
        logger.info("wrote %s: %s", LENGTHS_FILE, report["source"])
        return 0
    deadline = Deadline(args.budget_s)
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny matrices: more threads only wait for each other
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        raise SystemExit(
            "bench_gpu.py: no CUDA device here; run with --dry-run for the CPU check of the code paths"
        )
    variants = list(args.variants)
    if "ours_liger" in variants and liger_problem(device.type == "cuda"):
        deadline.skipped.append(f"variant ours_liger: {liger_problem(device.type == 'cuda')}")
        variants.remove("ours_liger")

    report: dict = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)",
        "torch": torch.__version__,
        "shape": {**SHAPES[sizes.shape], "vocab_size": VOCAB[sizes.shape]},
        "sizes": {k: v for k, v in vars(sizes).items()},
        "variants": variants,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        work_dir = args.work_dir or Path(tmp)
        started = time.perf_counter()
        model_dir = build_model_dir(work_dir, sizes.shape, device, seed=0)
        trainer = Trainer(load_model(model_dir, device, sizes.precision), device, sizes.warmup_steps)
        adapter_at_start = trainer.adapter()
        report["setup_s"] = round(time.perf_counter() - started, 1)
        logger.info("model ready in %.0f s", report["setup_s"])
        vocab = VOCAB[sizes.shape]
        plain = [v for v in variants if v != "ours_liger"]
        report["probe_loss"] = probe_losses(trainer, plain, vocab, sizes)
        runners = {"R": run_r, "D": run_d, "L": run_l}
        for workload in args.workloads:
            report[workload] = runners[workload](trainer, plain, sizes, vocab, deadline)
        if "ours_liger" in variants and deadline.allows("variant ours_liger", 40):
            trainer.load_adapter(adapter_at_start)  # the probe compares like with like: the untrained adapter
            report["liger_kernels"] = apply_liger(trainer.model.get_base_model())  # irreversible: runs last
            report["probe_loss"].update(probe_losses(trainer, ["ours_liger"], vocab, sizes))
            for workload in args.workloads:
                if (
                    workload == "L"
                ):  # the same loss memory as ours (fused head loss either way): time is short
                    deadline.skipped.append("L ours_liger (its head loss holds no logits either; not run)")
                    continue
                report[workload].update(runners[workload](trainer, ["ours_liger"], sizes, vocab, deadline))
    report["skipped"] = deadline.skipped
    report["total_s"] = round(time.perf_counter() - deadline.start, 1)
    table = markdown(report)
    (args.out / "bench_gpu.md").write_text(table + "\n", encoding="utf-8")
    (args.out / "bench_gpu.json").write_text(
        json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8"
    )
    # The table is this script's product: printed.
    print(table)
    print("skipped: " + ("; ".join(deadline.skipped) if deadline.skipped else "nothing"))
    print(f"total {report['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
