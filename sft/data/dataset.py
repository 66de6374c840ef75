"""Tokenised SFT datasets: conversation files encoded with a chat template, truncated, cached.

:func:`load_sft_dataset` reads conversation files, encodes them with a chat template (one batched tokenizer
pass over every distinct string), applies ``max_len``/``max_src_len`` truncation and caches the result on
disk, keyed by file content, template, tokenizer and lengths. Batching them is :mod:`sft.data.batching`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from sft.core.atomic import write_file_atomic
from sft.data.formats import IGNORE_INDEX, read_conversations
from sft.data.templates import LOSS_PLACEMENTS, Template

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
PAD_MULTIPLE = 8


# Why assemble() dropped a sample, reworded for the statistics and errors: what happened, with the flags.
# (A prompt that does not fit even with all history dropped and the user text cut away entirely is one
# whose system prompt alone is too long: nothing was truncated.)
SKIP_REASONS = {
    "prompt longer than max_src_len even after truncation": "system prompt alone longer than --max_src_len",
    "too long (is_skip)": "longer than --max_len/--max_src_len (--is_skip)",
    "no room for the answer within max_len": "prompt leaves no room for the answer within --max_len",
}
# What to change when every sample was skipped, per (reworded) reason.
SKIP_FIXES = {
    "system prompt alone longer than --max_src_len": "raise --max_src_len (or shorten the system prompts)",
    "longer than --max_len/--max_src_len (--is_skip)": (
        "raise --max_len/--max_src_len, or drop --is_skip to truncate instead"
    ),
    "prompt leaves no room for the answer within --max_len": "raise --max_len",
}


def all_skipped(
    what: str, sources: str, skipped: Counter, max_len: int, max_src_len: int | None
) -> ValueError:
    """The error for a file whose every ``what`` ("sample", "pair") was skipped: the reasons with their counts and
    what to change for each."""
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
    fix = "; ".join(dict.fromkeys(SKIP_FIXES.get(r, "raise --max_len/--max_src_len") for r in skipped))
    return ValueError(
        f"no {what}s left from {sources}: every {what} was skipped ({reasons}; max_len={max_len}, "
        f"max_src_len={max_src_len}): {fix}"
    )


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


class SFTDataset(Dataset):
    """Encoded samples as flat int32 arrays; item ``i`` is ``{"input_ids": list, "labels": list}``.

    Attributes:
        lengths: token count of every sample (numpy int array).
        stats: records, samples, truncation and skip counts, token counts, encode time.
    """

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, stats: dict) -> None:
        self._ids = input_ids
        self._labels = labels
        self._offsets = offsets
        self.lengths = np.diff(offsets)
        self.stats = stats

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[list[int], list[int]]], stats: dict) -> SFTDataset:
        ids, labels = array("i"), array("i")
        lengths = np.empty(len(samples), dtype=np.int64)
        for k, (s_ids, s_labels) in enumerate(samples):
            ids.extend(s_ids)  # C-level copy of a whole list: much faster than per-token numpy
            labels.extend(s_labels)
            lengths[k] = len(s_ids)
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.frombuffer(ids, dtype=np.int32), np.frombuffer(labels, dtype=np.int32), offsets, stats)

    def __len__(self) -> int:
        return len(self.lengths)

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)`` of sample ``i`` as numpy views (for collators)."""
        a, b = self._offsets[i], self._offsets[i + 1]
        return self._ids[a:b], self._labels[a:b]

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if i < 0:
            i += len(self)
        ids, labels = self.arrays(i)
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def save(self, path: Path) -> None:
        """Write to ``path`` (npz) atomically, so readers never see half a file."""
        write_file_atomic(
            path,
            lambda fh: np.savez(
                fh,
                input_ids=self._ids,
                labels=self._labels,
                offsets=self._offsets,
                stats=np.frombuffer(json.dumps(self.stats).encode(), dtype=np.uint8),
            ),
            encoding=None,
        )

    @classmethod
    def load(cls, path: Path) -> SFTDataset:
        """Read a file written by :meth:`save`; raises ValueError if its arrays do not fit together."""
        with np.load(path, allow_pickle=False) as data:
            stats = json.loads(data["stats"].tobytes().decode())
            ids, labels, offsets = data["input_ids"], data["labels"], data["offsets"]
        consistent = (
            isinstance(stats, dict)
            and len(ids) == len(labels)
            and len(offsets) >= 1
            and offsets[0] == 0
            and offsets[-1] == len(ids)
            and bool(np.all(np.diff(offsets) >= 0))
        )
        if not consistent:
            raise ValueError(f"{path}: inconsistent arrays (not written by this version?)")
        return cls(ids, labels, offsets, stats)


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides token ids: class, vocabulary, special ids and a probe encoding."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    probe = tokenizer(["Hello world, 你好！\n  x", "[INST] ### Response:\n"], add_special_tokens=False)[
        "input_ids"
    ]
    h.update(json.dumps([special, probe]).encode())
    return h.hexdigest()


def _cache_key(paths: list[Path], template: Template, tokenizer: Any, params: dict) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    h.update(template.fingerprint().encode())
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps({**params, "version": CACHE_VERSION}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def load_sft_dataset(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any,
    template: Template,
    *,
    max_len: int,
    max_src_len: int,
    is_skip: bool,
    loss_on: str = "all",
    cache_dir: str | os.PathLike | None = None,
) -> SFTDataset:
    """Read conversation (or Alpaca) JSONL file(s) and encode them into training samples.

    Args:
        path: one file or several (concatenated in order).
        tokenizer: the model's tokenizer (the one ``template`` was built with).
        template: from :func:`sft.data.templates.get_template`.
        max_len: most tokens of a sample; an answer that alone overflows is cut (EOS kept).
        max_src_len: most tokens before the answer; oldest rounds, then the start of the last user
            text are cut.
        is_skip: drop a sample that needs any truncation instead of truncating it.
        loss_on: ``"all"`` | ``"last"`` | ``"each"`` (see :mod:`sft.data.templates`).
        cache_dir: store/reuse the encoded dataset here (keyed by file content, template,
            tokenizer and the arguments above).

    Raises:
        DataFormatError: a bad record, naming file and line.
        ValueError: impossible lengths or an unknown ``loss_on``.
    """
    if loss_on not in LOSS_PLACEMENTS:
        raise ValueError(f"loss_on must be one of {LOSS_PLACEMENTS}, got {loss_on!r}")
    if not 0 < max_src_len < max_len:
        raise ValueError(f"need 0 < max_src_len < max_len, got max_src_len={max_src_len}, max_len={max_len}")
    paths = [Path(path)] if isinstance(path, str | os.PathLike) else [Path(p) for p in path]
    params = {"max_len": max_len, "max_src_len": max_src_len, "is_skip": is_skip, "loss_on": loss_on}

    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"sft-{_cache_key(paths, template, tokenizer, params)}.npz"
        if cache_file.is_file():
            dataset = _load_cache(cache_file)
            if dataset is not None:
                return dataset

    start = time.perf_counter()
    # Millions of small lists are created below; the cyclic GC would rescan them over and over.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        samples, skipped, truncated_prompt, truncated_answer, n_records = _encode_files(
            paths, template, loss_on, max_len, max_src_len, is_skip
        )
    finally:
        if gc_was_enabled:
            gc.enable()
    if not samples:
        raise all_skipped("sample", ", ".join(str(p) for p in paths), skipped, max_len, max_src_len)

    dataset = SFTDataset.from_samples(samples, {})
    dataset.stats = {
        "files": [str(p) for p in paths],
        "records": n_records,
        "samples": len(samples),
        "truncated_prompt": truncated_prompt,
        "truncated_answer": truncated_answer,
        "skipped": dict(skipped),
        "tokens": int(dataset.lengths.sum()),
        "learned_tokens": int((dataset._labels != IGNORE_INDEX).sum()),
        "seconds": round(time.perf_counter() - start, 3),
        "cached": False,
        **params,
    }
    stats = dataset.stats
    logger.info(
        "encoded %d records -> %d samples in %.2fs (truncated: %d prompts, %d answers; skipped: %s)",
        stats["records"],
        stats["samples"],
        stats["seconds"],
        truncated_prompt,
        truncated_answer,
        dict(skipped) or "none",
    )
    if cache_file is not None:
        dataset.save(cache_file)  # temp file + rename: replaces a damaged cache file in one step
    return dataset


def _load_cache(cache_file: Path) -> SFTDataset | None:
    """The dataset cached in ``cache_file``, or None (with a warning) when the file cannot be read.

    A cache file cut short (a run killed while an older version wrote it without a rename, a full
    disk, a partial copy) must not break every later run: it is treated as a miss, the data are
    encoded again from the source files and the file is replaced.
    """
    try:
        dataset = SFTDataset.load(cache_file)
    # Any failure to read a cache is a miss: np.load raises zipfile.BadZipFile, EOFError, OSError,
    # ValueError, KeyError and more for damaged archives. Nothing is lost: the source files are read.
    except Exception as err:
        logger.warning(
            "data cache %s is unreadable (%s: %s): encoding the data again and replacing it",
            cache_file,
            type(err).__name__,
            err,
        )
        return None
    dataset.stats["cached"] = True
    logger.info("loaded %d encoded samples from cache %s", len(dataset), cache_file)
    return dataset


def _encode_files(
    paths: list[Path], template: Template, loss_on: str, max_len: int, max_src_len: int, is_skip: bool
) -> tuple[list[tuple[list[int], list[int]]], Counter, int, int, int]:
    records = []
    for p in paths:
        records.extend(read_conversations(p))
    rendered = [template.render(r, loss_on) for r in records]
    # One batched tokenizer pass over every distinct string (system prompts repeat a lot).
    template.tokenize_texts([text for r in rendered for text in template.texts_of(r)])
    samples: list[tuple[list[int], list[int]]] = []
    skipped: Counter = Counter()
    truncated_prompt = truncated_answer = 0
    for r in rendered:
        for res in template.samples(r, loss_on, max_len=max_len, max_src_len=max_src_len, is_skip=is_skip):
            if res.dropped:
                skipped[SKIP_REASONS.get(res.dropped, res.dropped)] += 1
                continue
            truncated_prompt += res.truncated_prompt
            truncated_answer += res.truncated_answer
            samples.append((res.input_ids, res.labels))
    template.clear_cache()
    return samples, skipped, truncated_prompt, truncated_answer, len(records)
