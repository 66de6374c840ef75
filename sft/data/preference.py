"""Preference pairs: a prompt and two replies to it, the ``chosen`` one better than the ``rejected`` one.

One record a line (JSONL, or a JSON array), in either form (docs/DATA.md, "Preference data"):

- TRL's: ``{"prompt": str | [messages], "chosen": reply, "rejected": reply}``, with an optional ``system``
  field or a system message first in ``prompt``;
- this project's: ``{"system"?, "tools"?, "conversations": [prompt turns], "chosen": reply, "rejected": reply}``.

A reply is a string, an assistant message ``{"role": "assistant", "content": str}``, or a list holding one
such message. The prompt can be a whole multi-turn history, tool calls and observations included; it must
end where the assistant answers (a user or observation turn). Each reply is appended to the prompt as its
final assistant turn and the conversation is encoded by the chat template exactly as SFT encodes it, with
only that reply learned (``--loss_on last``).

Lengths are SFT's: the prompt is cut to ``--max_src_len`` (oldest rounds first, then the start of the last
user text: the same cut for both replies, since it depends on the prompt only), and a reply that overflows
``--max_len`` is cut with its end-of-turn kept; with ``--is_skip`` a pair that would need any cut is
skipped. A pair is kept or skipped whole, and the counts are logged.

A :class:`PreferenceDataset` keeps the pairs' sequences in an :class:`sft.data.dataset.SFTDataset`: the
chosen sequence of pair ``i`` is sample ``2 i``, the rejected one ``2 i + 1``.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sft.data.batching import PackedCollator, PaddedCollator, pack_first_fit_decreasing
from sft.data.dataset import SKIP_REASONS, SFTDataset, _cache_key, _load_cache, all_skipped
from sft.data.formats import IGNORE_INDEX, DataFormatError, iter_json_records, normalize_record
from sft.data.templates import Template

logger = logging.getLogger(__name__)

REPLIES = ("chosen", "rejected")


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def _reply_text(value: Any, key: str, source: str, line: int) -> str:
    """The text of a ``chosen``/``rejected`` reply in any of its accepted shapes."""
    if isinstance(value, list):
        if len(value) != 1:
            raise DataFormatError(
                f"{key!r} must be one reply (a string or one assistant message), got a list of {len(value)}",
                source=source,
                line=line,
            )
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", "assistant")
        if role != "assistant":
            raise DataFormatError(
                f"{key!r} must be an assistant message, got role {role!r}", source=source, line=line
            )
        value = value.get("content")
        if not isinstance(value, str):
            raise DataFormatError(
                f"{key!r}: 'content' must be a string, got {type(value).__name__}", source=source, line=line
            )
    if value is None:
        raise DataFormatError(f"missing field {key!r} (the {key} reply)", source=source, line=line)
    if not isinstance(value, str):
        raise DataFormatError(
            f"{key!r} must be a string or an assistant message, got {type(value).__name__}",
            source=source,
            line=line,
        )
    if not value.strip():
        raise DataFormatError(f"{key!r} is empty: a reply to learn from is needed", source=source, line=line)
    return value


def normalize_preference(obj: Any, *, source: str, line: int) -> tuple[dict[str, Any], str, str]:
    """Validate one preference record: ``(prompt record, chosen text, rejected text)``.

    The prompt record is in the conversation format (:func:`sft.data.formats.normalize_record`), ending with
    the turn the replies answer.

    Raises:
        DataFormatError: naming ``source:line`` and what is wrong.
    """
    if not isinstance(obj, dict):
        raise DataFormatError(f"expected a JSON object, got {type(obj).__name__}", source=source, line=line)
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "conversations", *REPLIES)}
    if "conversations" in obj:
        turns = obj["conversations"]
    elif "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            turns = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            turns = prompt
        else:
            raise DataFormatError(
                f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}",
                source=source,
                line=line,
            )
    else:
        raise DataFormatError(
            f"missing field 'prompt' (or 'conversations'); found keys {sorted(obj)}", source=source, line=line
        )
    chosen = _reply_text(obj.get("chosen"), "chosen", source, line)
    rejected = _reply_text(obj.get("rejected"), "rejected", source, line)
    if chosen.strip() == rejected.strip():
        raise DataFormatError(
            "'chosen' and 'rejected' are the same reply: nothing to prefer", source=source, line=line
        )
    record = normalize_record(
        {**extra, "conversations": turns}, source=source, line=line, for_generation=True
    )
    last = record["conversations"][-1]["role"]
    if last not in ("user", "observation"):
        raise DataFormatError(
            f"the prompt ends with a {last!r} turn: it must end with the user (or observation) turn that "
            "'chosen' and 'rejected' answer; move that assistant turn into 'chosen'/'rejected' or drop it",
            source=source,
            line=line,
        )
    return record, chosen, rejected


def read_preferences(path: str | os.PathLike) -> list[tuple[dict[str, Any], str, str]]:
    """Read and validate a preference file (every record; the first bad one raises, naming its line)."""
    pairs = [
        normalize_preference(value, source=str(path), line=line) for line, value in iter_json_records(path)
    ]
    if not pairs:
        raise DataFormatError("no preference records", source=str(path))
    return pairs


def with_reply(record: dict[str, Any], reply: str) -> dict[str, Any]:
    """The conversation ``record`` followed by ``reply`` as its final assistant turn."""
    return {**record, "conversations": [*record["conversations"], {"role": "assistant", "content": reply}]}


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


class PreferenceDataset(Dataset):
    """Encoded pairs; item ``i`` is ``(chosen ids, chosen labels, rejected ids, rejected labels)`` arrays.

    Attributes:
        sequences: the pairs' sequences as SFT samples (chosen ``2 i``, rejected ``2 i + 1``).
        lengths: tokens of each pair (both sequences).
        stats: records, pairs, truncation and skip counts.
        ref_logps: ``(pairs, 2)`` float64 reference log-probs of (chosen, rejected), once computed
            (``--precompute_ref``); batches then carry them.
    """

    def __init__(self, sequences: SFTDataset) -> None:
        self.sequences = sequences
        self.lengths = sequences.lengths[0::2] + sequences.lengths[1::2]
        self.stats = sequences.stats
        self.ref_logps: np.ndarray | None = None
        # Packed rows compute each pair's prompt once (PackedPairRows); only for a model whose attention reads
        # `doc_prefix` (sft.train.attention.shares_prompts).
        self.share_prompt = False

    def __len__(self) -> int:
        return len(self.lengths)

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (*self.sequences.arrays(2 * i), *self.sequences.arrays(2 * i + 1))

    def fingerprint(self) -> str:
        """A hash of every token and label (what reference log-probs computed for it depend on)."""
        import hashlib

        h = hashlib.sha256()
        for array in (self.sequences._ids, self.sequences._labels, self.sequences._offsets):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()

    def loader_items(self, packing: bool, max_len: int, pad_token_id: int) -> tuple[Dataset, Any]:
        """The batch items and collator (:func:`sft.data.batching.build_dataloader` asks for them)."""
        if packing:
            rows = PackedPairRows(self, max_len, share_prompt=self.share_prompt)
            logger.info(
                "packed %d pairs into %d rows of %d tokens (fill %.1f%%%s)",
                len(self),
                len(rows),
                2 * max_len,
                100.0 * rows.lengths.sum() / max(1, len(rows) * 2 * max_len),
                "; each pair's prompt once" if self.share_prompt else "",
            )
            return rows, PairCollator(self, pad_token_id, packed=True, max_len=2 * max_len)
        return _Pairs(self), PairCollator(self, pad_token_id, packed=False)


def load_preference_dataset(
    path: str | os.PathLike,
    template: Template,
    tokenizer: Any,
    *,
    max_len: int,
    max_src_len: int,
    is_skip: bool,
    cache_dir: str | os.PathLike | None = None,
) -> PreferenceDataset:
    """Read a preference file and encode its pairs (see the module docstring for lengths).

    Raises:
        DataFormatError: a bad record, naming file and line.
        ValueError: every pair skipped (the message names the flag to change).
    """
    if not 0 < max_src_len < max_len:
        raise ValueError(f"need 0 < max_src_len < max_len, got max_src_len={max_src_len}, max_len={max_len}")
    params = {"max_len": max_len, "max_src_len": max_src_len, "is_skip": is_skip, "kind": "preference"}
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"pref-{_cache_key([Path(path)], template, tokenizer, params)}.npz"
        if cache_file.is_file() and (sequences := _load_cache(cache_file)) is not None:
            return PreferenceDataset(sequences)

    start = time.perf_counter()
    pairs = read_preferences(path)
    records = [
        with_reply(record, reply) for record, chosen, rejected in pairs for reply in (chosen, rejected)
    ]
    gc_was_enabled = gc.isenabled()
    gc.disable()  # many small lists: the cyclic GC would rescan them over and over
    try:
        rendered = [template.render(r, "last") for r in records]
        template.tokenize_texts([text for r in rendered for text in template.texts_of(r)])
        samples: list[tuple[list[int], list[int]]] = []
        skipped: Counter = Counter()
        truncated_prompt = truncated_answer = 0
        for k in range(0, len(rendered), 2):
            results = []
            for r in rendered[k : k + 2]:
                results += template.samples(
                    r, "last", max_len=max_len, max_src_len=max_src_len, is_skip=is_skip
                )
            dropped = next((res.dropped for res in results if res.dropped), None)
            if dropped:
                skipped[SKIP_REASONS.get(dropped, dropped)] += 1
                continue
            truncated_prompt += results[0].truncated_prompt
            truncated_answer += sum(res.truncated_answer for res in results)
            samples += [(res.input_ids, res.labels) for res in results]
        template.clear_cache()
    finally:
        if gc_was_enabled:
            gc.enable()
    if not samples:
        raise all_skipped("pair", str(path), skipped, max_len, max_src_len)
    sequences = SFTDataset.from_samples(samples, {})
    sequences.stats = {
        "files": [str(path)],
        "records": len(pairs),
        "pairs": len(samples) // 2,
        "truncated_prompt": truncated_prompt,
        "truncated_answer": truncated_answer,
        "skipped": dict(skipped),
        "tokens": int(sequences.lengths.sum()),
        "seconds": round(time.perf_counter() - start, 3),
        "cached": False,
        **params,
    }
    logger.info(
        "encoded %d preference records -> %d pairs in %.2fs (truncated: %d prompts, %d replies; skipped: %s)",
        len(pairs),
        len(samples) // 2,
        sequences.stats["seconds"],
        truncated_prompt,
        truncated_answer,
        dict(skipped) or "none",
    )
    if cache_file is not None:
        sequences.save(cache_file)
    return PreferenceDataset(sequences)


# ---------------------------------------------------------------------------------------------
# Batches of pairs
# ---------------------------------------------------------------------------------------------


class _Pairs(Dataset):
    """Unpacked pairs: item ``i`` is pair ``i``'s two sequences, each its own row of the batch."""

    def __init__(self, dataset: PreferenceDataset) -> None:
        self.dataset = dataset
        self.lengths = dataset.lengths

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        c_ids, c_labels, r_ids, r_labels = self.dataset.arrays(i)
        rows = [{"input_ids": c_ids, "labels": c_labels}, {"input_ids": r_ids, "labels": r_labels}]
        return {"rows": rows, "pairs": [i]}


class PackedPairRows(Dataset):
    """Whole pairs packed into rows of ``2 * max_len`` tokens (first-fit decreasing), a pair's two sequences side by
    side in one row, every sequence a document of its own (positions restart at 0).

    With ``share_prompt`` a pair's prompt is computed once: the chosen sequence is its document as before, and
    the rejected one is a *branch* of it: only its reply, preceded by the prompt's last token (which predicts the
    reply's first), at the positions it has in its own sequence, attending to the chosen document's prompt and
    to itself (``doc_prefix``, see :class:`PairCollator`). Every token then sees exactly what it sees in its own
    sequence, so the log-probs are those of separate sequences, for ~half the prompt tokens.
    """

    def __init__(self, dataset: PreferenceDataset, max_len: int, *, share_prompt: bool = False) -> None:
        self.dataset = dataset
        self.share_prompt = share_prompt
        self.shared = [
            shared_prompt_length(dataset.arrays(i)) if share_prompt else 0 for i in range(len(dataset))
        ]
        lengths = packed_pair_lengths(dataset, self.shared)
        self.rows = pack_first_fit_decreasing(lengths, 2 * max_len)
        self.lengths = np.array([sum(lengths[i] for i in row) for row in self.rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict[str, Any]:
        ids, labels, positions, seq_ids, prefix = [], [], [], [], []
        for k, i in enumerate(self.rows[r]):
            c_ids, c_labels, r_ids, r_labels = self.dataset.arrays(i)
            cut = max(self.shared[i] - 1, 0)  # the rejected branch starts at the prompt's last token
            for s, (seq_ids_, seq_labels, start) in enumerate(((c_ids, c_labels, 0), (r_ids, r_labels, cut))):
                n = len(seq_ids_) - start
                ids.append(seq_ids_[start:])
                labels.append(seq_labels[start:])
                positions.append(np.arange(start, len(seq_ids_)))
                seq_ids.append(np.full(n, 2 * k + s))
                mark = np.zeros(n, dtype=np.int64)
                mark[0] = (
                    start  # a branch's first token: how many tokens of the previous document it attends to
                )
                prefix.append(mark)
        row = {
            "input_ids": np.concatenate(ids),
            "labels": np.concatenate(labels),
            "position_ids": np.concatenate(positions),
            "seq_ids": np.concatenate(seq_ids),
            "prefix": np.concatenate(prefix),
        }
        return {"rows": [row], "pairs": list(self.rows[r])}


def packed_pair_lengths(dataset: PreferenceDataset, shared: list[int]) -> list[int]:
    """Each pair's tokens in a packed row: both sequences, less the prompt tokens its rejected branch takes from
    the chosen sequence (``shared[i]``: pair ``i``'s :func:`shared_prompt_length`, 0 when unshared)."""
    return [int(n) - max(k - 1, 0) for n, k in zip(dataset.lengths, shared, strict=True)]


def shared_prompt_length(arrays: tuple[np.ndarray, ...]) -> int:
    """How many leading tokens a pair's two sequences share, unlearned in both (its prompt)."""
    c_ids, c_labels, r_ids, r_labels = arrays
    n = min(len(c_ids), len(r_ids))
    same = (c_ids[:n] == r_ids[:n]) & (c_labels[:n] == IGNORE_INDEX) & (r_labels[:n] == IGNORE_INDEX)
    return int(np.argmin(same)) if not same.all() else n


class PairCollator:
    """Batches of pairs: SFT's padded or packed rows, plus where each sequence is.

    Besides SFT's keys, a batch has ``seq_ids`` (B, T): the batch sequence each token belongs to (-1 for
    padding), where sequence ``2 k`` is the chosen and ``2 k + 1`` the rejected reply of the batch's pair
    ``k``; ``pair_index`` (P,): the pairs' dataset indices; once computed, ``ref_logps`` (P, 2); and for rows
    whose pairs share their prompt, ``doc_prefix`` (D,): for each document of ``cu_seq_lens``, how many tokens at
    the start of the previous document it also attends to (0 for most).
    """

    def __init__(
        self, dataset: PreferenceDataset, pad_token_id: int, *, packed: bool, max_len: int = 0
    ) -> None:
        self.dataset = dataset
        self.packed = packed
        self.rows = PackedCollator(pad_token_id, max_len) if packed else PaddedCollator(pad_token_id)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [row for it in items for row in it["rows"]]
        pairs = [i for it in items for i in it["pairs"]]
        batch = self.rows(rows)
        seq_ids = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
        offset = 0
        for r, row in enumerate(rows):
            local = row["seq_ids"] if self.packed else np.zeros(len(row["input_ids"]), dtype=np.int64)
            seq_ids[r, : len(local)] = torch.as_tensor(local, dtype=torch.long) + offset
            offset += int(local.max()) + 1 if len(local) else 0
        batch["seq_ids"] = seq_ids
        batch["pair_index"] = torch.tensor(pairs, dtype=torch.long)
        if self.packed and any(row["prefix"].any() for row in rows):
            marks = torch.zeros(batch["input_ids"].shape, dtype=torch.long)
            for r, row in enumerate(rows):
                marks[r, : len(row["prefix"])] = torch.as_tensor(row["prefix"])
            batch["doc_prefix"] = marks.flatten()[batch["cu_seq_lens"][:-1].long()]
        if self.dataset.ref_logps is not None:
            batch["ref_logps"] = torch.as_tensor(self.dataset.ref_logps[pairs], dtype=torch.float64).reshape(
                -1, 2
            )
        return batch
