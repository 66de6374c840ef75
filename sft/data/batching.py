"""Batches of a tokenised dataset: packing, collators and rank-aware batch samplers.

* :func:`build_dataloader` batches a dataset for training: padded batches (batch maximum rounded up
  to a multiple of 8, right padding, ``attention_mask``) or packed rows (first-fit decreasing into
  rows of ``max_len`` tokens; ``position_ids`` restart at 0 for each sample and no
  ``attention_mask`` is sent, so the models mask attention per document). Every rank gets the same
  number of batches; the order is fixed by ``seed`` and the epoch.
* :func:`build_eval_dataloader` shards without duplicates and pads short shards with dummy batches
  (labels all -100) so that every rank runs the same number of forwards (ZeRO-3 needs that).
* Every batch also carries its sequence boundaries over the flattened ``(B * T)`` tokens,
  ``cu_seq_lens`` (int32) and ``max_length`` (:func:`sequence_boundaries`): FlashAttention's varlen
  arguments, computed here on the host so that no forward derives them from device tensors.

Masks always come from positions, never from token values: pad ids may equal EOS (Llama) or unk
(Baichuan), and the learned EOS must keep its label.

Packed rows are only separated when the model sees ``attention_mask=None`` *and* no cache: call the
model with ``use_cache=False`` in training (transformers' masking_utils skips its packed-sequence
detection when a ``past_key_values`` object exists, and Llama creates one when ``use_cache`` is on).
That detection serves eager and SDPA attention for any number of rows; transformers' FlashAttention
path only finds packed documents in a batch of *one* row, unless it is given the boundaries
(``cu_seq_lens_q/k``, ``max_length_q/k``): :func:`sft.train.inputs.model_inputs` passes them from the batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sft.data.dataset import PAD_MULTIPLE, SFTDataset
from sft.data.formats import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Samples per "mega-batch" that group_by_length sorts by length before cutting batches.
GROUP_MEGABATCH = 64


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def pack_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items into bins of ``capacity`` with first-fit decreasing; deterministic.

    Items are visited longest first (ties by index) and go into the lowest-numbered bin with room.
    A segment tree over the bins' free space finds that bin in O(log n). Returns lists of item
    indices per bin, in bin order.
    """
    lengths = [int(n) for n in lengths]
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(
            f"{len(too_long)} sample(s) longer than the row size {capacity} (e.g. index {too_long[0]})"
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    tree = [capacity] * (2 * size)  # max free space per subtree; leaves are bins (unused bins = empty)
    bins: list[list[int]] = []
    for i in order:
        need = lengths[i]
        node = 1
        while node < size:  # descend to the leftmost leaf with free >= need
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


class PackedRows(Dataset):
    """Rows of packed samples: item ``r`` concatenates the samples of row ``r`` with position ids
    restarting at 0 for each sample."""

    def __init__(self, dataset: SFTDataset, max_len: int) -> None:
        self.dataset = dataset
        self.max_len = max_len
        self.rows = pack_first_fit_decreasing(dataset.lengths, max_len)
        self.lengths = np.array(
            [sum(int(dataset.lengths[i]) for i in row) for row in self.rows], dtype=np.int64
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        parts = [self.dataset.arrays(i) for i in self.rows[r]]
        ids = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        positions = np.concatenate([np.arange(len(p[0])) for p in parts])
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


class _Samples(Dataset):
    """Unpacked samples as numpy arrays (what the padded collator consumes)."""

    def __init__(self, dataset: SFTDataset) -> None:
        self.dataset = dataset
        self.lengths = dataset.lengths

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        ids, labels = self.dataset.arrays(i)
        return {"input_ids": ids, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _right_pad(rows: list[np.ndarray], width: int, fill: int) -> torch.Tensor:
    """Stack token rows into a ``(len(rows), width)`` LongTensor, each row followed by ``fill``."""
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for row, values in enumerate(rows):
        out[row, : len(values)] = torch.as_tensor(np.asarray(values, dtype=np.int64))
    return out


class PaddedCollator:
    """Right-pad to the batch maximum rounded up to a multiple of 8, with ``attention_mask``.

    Labels of padding are -100 and the mask is 0 there -- by position, so a pad id equal to EOS
    never hides a learned EOS.
    """

    def __init__(self, pad_token_id: int, multiple_of: int = PAD_MULTIPLE) -> None:
        self.pad_token_id = pad_token_id
        self.multiple_of = multiple_of

    def __call__(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        if not items:
            return dummy_batch(self.pad_token_id, packed=False)
        lengths = torch.tensor([len(it["input_ids"]) for it in items])
        width = _round_up(int(lengths.max()), self.multiple_of)
        positions = torch.arange(width, dtype=torch.long)
        return _with_boundaries(
            {
                "input_ids": _right_pad([it["input_ids"] for it in items], width, self.pad_token_id),
                "labels": _right_pad([it["labels"] for it in items], width, IGNORE_INDEX),
                "attention_mask": (positions[None, :] < lengths[:, None]).long(),  # (B, T), 1 = real token
                "position_ids": positions.expand(len(items), width).clone(),
            }
        )


class PackedCollator:
    """Stack packed rows, padding each to the batch's longest row (multiple of 8, at most
    ``max_len`` when possible). The padding is its own pseudo-document: positions restart at 0 and
    labels are -100. No ``attention_mask``: the models mask per document from ``position_ids``."""

    def __init__(self, pad_token_id: int, max_len: int, multiple_of: int = PAD_MULTIPLE) -> None:
        self.pad_token_id = pad_token_id
        self.max_len = max_len
        self.multiple_of = multiple_of

    def __call__(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        if not items:
            return dummy_batch(self.pad_token_id, packed=True)
        longest = max(len(it["input_ids"]) for it in items)
        width = max(longest, min(_round_up(longest, self.multiple_of), self.max_len))
        position_ids = _right_pad([it["position_ids"] for it in items], width, 0)
        for row, it in enumerate(items):
            k = len(it["input_ids"])
            position_ids[row, k:] = torch.arange(width - k)  # the padding document starts at position 0
        return _with_boundaries(
            {
                "input_ids": _right_pad([it["input_ids"] for it in items], width, self.pad_token_id),
                "labels": _right_pad([it["labels"] for it in items], width, IGNORE_INDEX),
                "position_ids": position_ids,
            }
        )


def sequence_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Where the sequences of a ``(B, T)`` batch start, over its flattened ``B * T`` tokens.

    A sequence starts at every row start and wherever a position is not the previous one plus one: a packed
    document, or the padding after the last one (which the packed collator numbers from 0). A padded batch
    is one sequence per row; its ``attention_mask`` marks the padding.

    Returns:
        ``(cu_seq_lens, max_length)``: the start offsets followed by ``B * T`` (int32, FlashAttention's
        ``cu_seqlens``), and the longest sequence. The same split transformers derives from the positions of
        a one-row packed batch (``prepare_fa_kwargs_from_position_ids``).
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    offsets = starts.flatten().nonzero().squeeze(-1)
    cu_seq_lens = torch.cat([offsets, torch.tensor([position_ids.numel()])]).to(torch.int32)
    return cu_seq_lens, int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())


def _with_boundaries(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``cu_seq_lens`` and ``max_length`` (a 0-d LongTensor) from the batch's ``position_ids``."""
    cu_seq_lens, max_length = sequence_boundaries(batch["position_ids"])
    return {**batch, "cu_seq_lens": cu_seq_lens, "max_length": torch.tensor(max_length)}


def dummy_batch(pad_token_id: int, *, packed: bool, width: int = PAD_MULTIPLE) -> dict[str, torch.Tensor]:
    """A one-row batch with no learned token (labels all -100): keeps ranks in step in eval.

    Its mask is all ones (a fully masked row can give NaN attention), which is harmless since no
    label is counted.
    """
    batch = {
        "input_ids": torch.full((1, width), pad_token_id, dtype=torch.long),
        "labels": torch.full((1, width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.arange(width, dtype=torch.long).unsqueeze(0),
    }
    if not packed:
        batch["attention_mask"] = torch.ones((1, width), dtype=torch.long)
    return _with_boundaries(batch)


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


class ShardedBatchSampler(Sampler[list[int]]):
    """Training batches for one rank; every rank gets the same number of batches.

    Per epoch the item order is a permutation seeded by ``(seed, epoch)`` (or the identity without
    ``shuffle``); ``group_by_length`` sorts each mega-batch of 64 batches by length before cutting
    batches and then shuffles the batches, so a batch holds similar lengths. Global batch ``j`` goes
    to rank ``j % world_size``. The batch count is made a multiple of ``world_size``: with
    ``drop_last`` the partial last batch and the remainder are dropped; otherwise the first
    batches of the epoch are repeated.

    ``set_epoch(e)`` picks the epoch's order; ``skip_batches(n)`` makes the *next* iteration start
    at this rank's batch ``n`` (resume); ``len()`` is always the full per-rank count.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        group_by_length: bool,
        rank: int,
        world_size: int,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._skip = 0
        if len(self._global_batches()) == 0:
            raise ValueError(
                f"{len(self.lengths)} samples give no full batch of {batch_size} x {world_size} ranks "
                "with drop_last; lower the batch size or set drop_last=False"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, n: int) -> None:
        """Start the next iteration at this rank's batch ``n`` (for resuming mid-epoch)."""
        if not 0 <= n <= len(self):
            raise ValueError(f"cannot skip {n} batches: an epoch has {len(self)} per rank")
        self._skip = n

    def _global_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        bs = self.batch_size
        if self.group_by_length:
            mega = bs * GROUP_MEGABATCH
            batches = []
            for start in range(0, n, mega):
                chunk = order[start : start + mega]
                # Stable sort, longest first: ties keep the shuffled order.
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                batches += [chunk[i : i + bs].tolist() for i in range(0, len(chunk), bs)]
            # Every mega-batch but the last is a multiple of bs, so at most one batch is partial;
            # it stays last so that drop_last removes it.
            full = [b for b in batches if len(b) == bs]
            part = [b for b in batches if len(b) < bs]
            if self.shuffle:
                perm = rng.permutation(len(full))
                full = [full[i] for i in perm]
            batches = full + part
        else:
            batches = [order[i : i + bs].tolist() for i in range(0, n, bs)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == bs]
            keep = len(batches) - len(batches) % self.world_size
            return batches[:keep]
        short = (-len(batches)) % self.world_size
        return batches + [batches[i % len(batches)] for i in range(short)]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        mine = self._global_batches()[self.rank :: self.world_size]
        yield from mine[skip:]

    def __len__(self) -> int:
        n_batches = (
            (len(self.lengths) // self.batch_size)
            if self.drop_last
            else math.ceil(len(self.lengths) / self.batch_size)
        )
        if self.drop_last:
            return n_batches // self.world_size
        return math.ceil(n_batches / self.world_size)


class EvalBatchSampler(Sampler[list[int]]):
    """Eval batches for one rank: each item on exactly one rank (strided shards), in order; short
    shards are padded with empty batches (the collators turn them into dummy batches) so every
    rank runs the same number of batches."""

    def __init__(self, n_items: int, *, batch_size: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.items = list(range(rank, n_items, world_size))
        self.batch_size = batch_size
        self.n_batches = math.ceil(math.ceil(n_items / world_size) / batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        bs = self.batch_size
        batches = [self.items[i : i + bs] for i in range(0, len(self.items), bs)]
        yield from batches
        for _ in range(self.n_batches - len(batches)):
            yield []

    def __len__(self) -> int:
        return self.n_batches

    def set_epoch(self, epoch: int) -> None:
        """Eval order does not depend on the epoch (kept for a uniform sampler interface)."""


# ---------------------------------------------------------------------------------------------
# DataLoaders
# ---------------------------------------------------------------------------------------------


def build_dataloader(
    dataset: SFTDataset,
    *,
    batch_size: int,
    packing: bool,
    max_len: int,
    shuffle: bool,
    seed: int,
    group_by_length: bool,
    rank: int,
    world_size: int,
    pad_token_id: int,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """Training DataLoader of dicts of LongTensors: ``input_ids``, ``labels``, ``position_ids``, the
    sequence boundaries ``cu_seq_lens`` (int32) and ``max_length``, and, for padded batches,
    ``attention_mask``.

    Batches come from a :class:`ShardedBatchSampler` (``loader.batch_sampler`` has
    ``set_epoch``/``skip_batches``). With ``packing`` the batch items are rows of up to ``max_len``
    tokens. ``pin_memory`` (on CUDA) puts the batches in page-locked memory, so that their copies to
    the GPU run asynchronously. Evaluation uses :func:`build_eval_dataloader`.
    """
    if packing and group_by_length:
        raise ValueError("group_by_length has no effect with packing (rows are all ~max_len); turn one off")
    _check_pad(pad_token_id)
    items, collate = _items_and_collate(dataset, packing, max_len, pad_token_id)
    sampler = ShardedBatchSampler(
        items.lengths,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        group_by_length=group_by_length,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
    )
    return DataLoader(items, batch_sampler=sampler, collate_fn=collate, pin_memory=pin_memory)


def _check_pad(pad_token_id: int | None) -> None:
    if pad_token_id is None:
        raise ValueError(
            "pad_token_id is None; set tokenizer.pad_token (e.g. to unk) before building batches"
        )


def build_eval_dataloader(
    dataset: SFTDataset,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    pad_token_id: int,
    packing: bool = False,
    max_len: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Eval DataLoader: every sample counted exactly once over all ranks, same batch count on every
    rank (short shards get dummy batches whose labels are all -100); batches as in
    :func:`build_dataloader`."""
    if packing and max_len is None:
        raise ValueError("packing needs max_len (the row size)")
    _check_pad(pad_token_id)
    items, collate = _items_and_collate(dataset, packing, max_len or 0, pad_token_id)
    sampler = EvalBatchSampler(len(items), batch_size=batch_size, rank=rank, world_size=world_size)
    return DataLoader(items, batch_sampler=sampler, collate_fn=collate, pin_memory=pin_memory)


def _items_and_collate(dataset: SFTDataset, packing: bool, max_len: int, pad_token_id: int):
    if hasattr(dataset, "loader_items"):  # a dataset of another objective (preference pairs) batches itself
        return dataset.loader_items(packing, max_len, pad_token_id)
    if packing:
        rows = PackedRows(dataset, max_len)
        logger.info(
            "packed %d samples into %d rows of %d tokens (fill %.1f%%)",
            len(dataset),
            len(rows),
            max_len,
            100.0 * rows.lengths.sum() / max(1, len(rows) * max_len),
        )
        return rows, PackedCollator(pad_token_id, max_len)
    return _Samples(dataset), PaddedCollator(pad_token_id)
