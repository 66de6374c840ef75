"""Tokenised datasets on the real data: speed, cache, packing (loss equality through the tiny models),
padding, and rank sharding for training and evaluation."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft.data.batching import (
    PaddedCollator,
    ShardedBatchSampler,
    build_dataloader,
    build_eval_dataloader,
    pack_first_fit_decreasing,
)
from sft.data.converters import convert_dialogsum, convert_rolebench
from sft.data.dataset import SFTDataset, load_sft_dataset
from sft.data.formats import IGNORE_INDEX, DataFormatError, write_jsonl_atomic
from sft.data.templates import get_template

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def baichuan(tiny_baichuan_dir: Path):
    tok = AutoTokenizer.from_pretrained(str(tiny_baichuan_dir))
    return tok, get_template("baichuan2", tok, tiny_baichuan_dir)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory, shared_data_dir: Path) -> dict[str, Path]:
    """A few real RoleBench and DialogSum test records in the conversation format."""
    out = tmp_path_factory.mktemp("data")
    rb, _ = convert_rolebench(shared_data_dir / "rolebench-zh", "test", roles=["李白", "张飞"], max_answers=1)
    ds, _ = convert_dialogsum(shared_data_dir / "dialogsum" / "dialogsum.test.jsonl")
    files = {"rolebench": out / "rb.jsonl", "dialogsum": out / "ds.jsonl"}
    write_jsonl_atomic(files["rolebench"], rb[::40][:8])
    write_jsonl_atomic(
        files["dialogsum"], [r for r in ds if len(r["conversations"][0]["content"]) < 500][:24]
    )
    return files


def test_rolebench_train_tokenises_in_seconds(shared_data_dir: Path, baichuan, tmp_path: Path):
    """Both splits' worth of the train set, all roles, two answers each: ~13k samples."""
    tok, template = baichuan
    records, _ = convert_rolebench(shared_data_dir / "rolebench-zh", "train")
    write_jsonl_atomic(tmp_path / "train.jsonl", records)

    def load() -> SFTDataset:
        return load_sft_dataset(
            tmp_path / "train.jsonl",
            tok,
            template,
            max_len=1024,
            max_src_len=768,
            is_skip=False,
            cache_dir=tmp_path / "cache",
        )

    start = time.perf_counter()
    ds = load()
    seconds = time.perf_counter() - start
    logger.info("RoleBench-zh train: %d samples, %d tokens in %.2fs", len(ds), ds.stats["tokens"], seconds)
    assert len(ds) == len(records) == 13223
    assert seconds < 20, f"tokenising took {seconds:.1f}s"
    # The cache returns the same samples without re-tokenising.
    again = load()
    assert again.stats["cached"] and again[123] == ds[123] and len(again) == len(ds)
    assert (again.lengths == ds.lengths).all()


def test_cache_key_covers_lengths_and_content(small_files, baichuan, tmp_path: Path):
    tok, template = baichuan
    src = tmp_path / "data.jsonl"
    src.write_bytes(small_files["dialogsum"].read_bytes())
    kwargs = dict(max_src_len=128, is_skip=False, cache_dir=tmp_path / "cache")
    first = load_sft_dataset(src, tok, template, max_len=160, **kwargs)
    assert load_sft_dataset(src, tok, template, max_len=160, **kwargs).stats["cached"]
    assert not load_sft_dataset(src, tok, template, max_len=200, **kwargs).stats["cached"]
    src.write_text(src.read_text().splitlines()[0] + "\n")  # new content -> new entry
    changed = load_sft_dataset(src, tok, template, max_len=160, **kwargs)
    assert not changed.stats["cached"] and len(changed) == 1 < len(first)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_cache_file_is_a_miss_and_replaced(small_files, baichuan, tmp_path: Path, caplog, damage):
    """A cache file cut short (or overwritten) must not break every later run: warn, re-encode, replace."""
    tok, template = baichuan
    kwargs = dict(max_len=160, max_src_len=128, is_skip=False, cache_dir=tmp_path / "cache")
    first = load_sft_dataset(small_files["dialogsum"], tok, template, **kwargs)
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    data = cache_file.read_bytes()
    cache_file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 100)
    with caplog.at_level(logging.WARNING, logger="sft.data.dataset"):
        again = load_sft_dataset(small_files["dialogsum"], tok, template, **kwargs)
    assert f"data cache {cache_file} is unreadable" in caplog.text
    assert not again.stats["cached"] and [again[i] for i in range(len(again))] == [
        first[i] for i in range(len(first))
    ]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache_file.name]  # no temp file left
    assert load_sft_dataset(small_files["dialogsum"], tok, template, **kwargs).stats["cached"]  # replaced


def test_skip_reasons_and_no_samples_error_name_the_flags(baichuan, tmp_path: Path):
    """Each skip reason says what happened (a system prompt alone longer than max_src_len: nothing was
    truncated); the error when nothing is left names --max_len/--max_src_len and, with is_skip, --is_skip."""
    tok, template = baichuan

    def no_samples(record: dict, **lengths) -> str:
        src = tmp_path / "data.jsonl"
        src.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
        with pytest.raises(ValueError) as raised:
            load_sft_dataset(src, tok, template, **lengths)
        message = str(raised.value)
        assert message.startswith(f"no samples left from {src}: every sample was skipped (1 ")
        return message

    def chat(system: str, user: str) -> dict:
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": "好"}]
        return {"system": system, "conversations": turns}

    long_system = chat("你是李白，一位豪放的诗人。" * 10, "你好")
    for is_skip in (False, True):  # dropped either way: --is_skip is not the fix
        message = no_samples(long_system, max_len=64, max_src_len=16, is_skip=is_skip)
        assert "(1 system prompt alone longer than --max_src_len; max_len=64, max_src_len=16)" in message
        assert message.endswith(": raise --max_src_len (or shorten the system prompts)")
        assert "truncat" not in message and "is_skip" not in message

    long_user = chat("", "你好" * 40)
    message = no_samples(long_user, max_len=64, max_src_len=16, is_skip=True)
    assert "(1 longer than --max_len/--max_src_len (--is_skip);" in message
    assert message.endswith(": raise --max_len/--max_src_len, or drop --is_skip to truncate instead")
    # The prompt is cut to exactly max_src_len = max_len - 1: the answer has no room left.
    message = no_samples(long_user, max_len=17, max_src_len=16, is_skip=False)
    assert "(1 prompt leaves no room for the answer within --max_len;" in message
    assert message.endswith(": raise --max_len")


def test_truncation_counts_reported(small_files, baichuan):
    tok, template = baichuan
    full = load_sft_dataset(
        small_files["dialogsum"], tok, template, max_len=4096, max_src_len=4000, is_skip=False
    )
    cut = load_sft_dataset(
        small_files["dialogsum"], tok, template, max_len=160, max_src_len=128, is_skip=False
    )
    skip = load_sft_dataset(
        small_files["dialogsum"], tok, template, max_len=160, max_src_len=128, is_skip=True
    )
    assert full.stats["truncated_prompt"] == 0 and cut.stats["truncated_prompt"] > 0
    assert max(cut.lengths) <= 160 and len(cut) == len(full)
    assert len(skip) == len(full) - sum(skip.stats["skipped"].values()) < len(full)
    for i in range(len(cut)):  # every truncated sample still ends with a learned EOS
        assert cut[i]["labels"][-1] == tok.eos_token_id


def test_alpaca_input_and_bad_file(baichuan, tmp_path: Path):
    tok, template = baichuan
    ds = load_sft_dataset(
        REPO / "data" / "example_alpaca.json", tok, template, max_len=256, max_src_len=200, is_skip=False
    )
    assert len(ds) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"conversations": []}\n')
    with pytest.raises(DataFormatError, match=rf"{bad}:2: 'conversations' must be a non-empty list"):
        load_sft_dataset(bad, tok, template, max_len=256, max_src_len=200, is_skip=False)


# ---- packing --------------------------------------------------------------------------------


def test_first_fit_decreasing_packs_whole_samples():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 100, size=500).tolist()
    rows = pack_first_fit_decreasing(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))  # each sample in exactly one row
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert rows == pack_first_fit_decreasing(lengths, 128)  # deterministic
    assert len(rows) <= int(1.25 * sum(lengths) / 128) + 1  # FFD packs tightly
    assert pack_first_fit_decreasing([60, 50, 40, 30, 20], 100) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="longer than the row size"):
        pack_first_fit_decreasing([10, 200], 128)


def _loader(ds: SFTDataset, **kwargs):
    """build_dataloader for one rank, in order, no length grouping; a test passes what it exercises."""
    settings = dict(
        batch_size=4,
        packing=False,
        max_len=64,
        shuffle=False,
        seed=0,
        group_by_length=False,
        rank=0,
        world_size=1,
        pad_token_id=0,
    )
    return build_dataloader(ds, **{**settings, **kwargs})


def test_packed_rows_restart_positions(small_files, baichuan):
    tok, template = baichuan
    ds = load_sft_dataset(
        small_files["rolebench"], tok, template, max_len=1024, max_src_len=768, is_skip=False
    )
    loader = _loader(ds, batch_size=2, packing=True, max_len=1024, pad_token_id=tok.pad_token_id)
    rows = loader.dataset.rows
    seen = 0
    for batch in loader:
        # No mask: documents from positions, and their boundaries over the flattened batch.
        assert set(batch) == {"input_ids", "labels", "position_ids", "cu_seq_lens", "max_length"}
        width = batch["input_ids"].shape[1]
        boundaries = [
            r * width + s for r, pos in enumerate(batch["position_ids"]) for s in (pos == 0).nonzero()
        ]
        assert batch["cu_seq_lens"].tolist() == [*boundaries, batch["input_ids"].numel()]
        assert batch["cu_seq_lens"].dtype == torch.int32
        assert int(batch["max_length"]) == int(batch["cu_seq_lens"].diff().max())
        for row_ids, row_labels, row_pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
            starts = (row_pos == 0).nonzero().flatten().tolist()
            samples = rows[seen]
            seen += 1
            for k, i in enumerate(samples):  # each sample intact at its start, positions 0..n-1
                n = int(ds.lengths[i])
                a = starts[k]
                assert row_ids[a : a + n].tolist() == ds[i]["input_ids"]
                assert row_labels[a : a + n].tolist() == ds[i]["labels"]
                assert row_pos[a : a + n].tolist() == list(range(n))
            end = sum(int(ds.lengths[i]) for i in samples)
            assert (row_labels[end:] == IGNORE_INDEX).all()
    assert seen == len(rows) and sorted(i for r in rows for i in r) == list(range(len(ds)))


def _nll(model, batch) -> tuple[float, int]:
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
            use_cache=False,
        )
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total.item(), int((labels != IGNORE_INDEX).sum())


@pytest.mark.parametrize("arch", ["baichuan", "llama"])
def test_packed_loss_equals_unpacked(arch, small_files, tiny_baichuan_dir, tiny_llama_dir):
    """Sum NLL over learned tokens / their count is the same packed and padded (use_cache=False:
    see sft/data/dataset.py -- a cache object turns off transformers' packed-sequence detection)."""
    model_dir = {"baichuan": tiny_baichuan_dir, "llama": tiny_llama_dir}[arch]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    template = get_template({"baichuan": "baichuan2", "llama": "llama2"}[arch], tok, model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ds = load_sft_dataset(
        small_files["rolebench"], tok, template, max_len=1024, max_src_len=768, is_skip=False
    )
    results = {}
    for packing in (False, True):
        loader = _loader(
            ds, packing=packing, max_len=1024, shuffle=True, seed=3, pad_token_id=tok.pad_token_id
        )
        sums = [_nll(model, b) for b in loader]
        results[packing] = (sum(s for s, _ in sums), sum(n for _, n in sums))
    assert results[True][1] == results[False][1] == ds.stats["learned_tokens"]
    assert len(_loader(ds, packing=True, max_len=1024).dataset) < len(ds)
    packed, padded = (results[p][0] / results[p][1] for p in (True, False))
    assert packed == pytest.approx(padded, rel=1e-5)


# ---- padding --------------------------------------------------------------------------------


def test_padding_keeps_eos_label_when_pad_equals_eos():
    eos = 2
    ds = SFTDataset.from_samples(
        [([5, 6, 7, eos], [-100, -100, 7, eos]), ([5, 9, eos], [-100, 9, eos])], stats={}
    )
    items = [
        {"input_ids": np.array(ds[i]["input_ids"]), "labels": np.array(ds[i]["labels"])} for i in range(2)
    ]
    batch = PaddedCollator(pad_token_id=eos)(items)
    assert batch["input_ids"].shape == (2, 8)  # batch maximum 4 rounded up to a multiple of 8
    assert batch["labels"][1].tolist() == [-100, 9, eos] + [-100] * 5
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 5
    assert batch["input_ids"][1].tolist() == [5, 9, eos] + [eos] * 5
    assert batch["position_ids"][0].tolist() == list(range(8))


# ---- sharding -------------------------------------------------------------------------------


def _dataset(n: int, seed: int = 0) -> SFTDataset:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        k = int(rng.integers(3, 40))
        ids = [10 + i] * k
        samples.append((ids, [-100, *ids[1:]]))
    return SFTDataset.from_samples(samples, {})


def _first_tokens(loader) -> list[list[int]]:
    return [[int(x) - 10 for x in b["input_ids"][:, 0]] for b in loader]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_train_sharding_equal_batches_and_deterministic(group_by_length):
    ds = _dataset(203)

    def loaders(seed=1):
        return [
            _loader(ds, shuffle=True, seed=seed, group_by_length=group_by_length, rank=r, world_size=2)
            for r in range(2)
        ]

    ranks = loaders()
    batches = [_first_tokens(dl) for dl in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) == len(ranks[1]) == 26  # ceil(51 / 2)
    seen = Counter(i for rank in batches for b in rank for i in b)
    # Every sample once; the 51st (partial) batch count is evened out by repeating one batch.
    assert set(seen) == set(range(203)) and sum(seen.values()) == 203 + 4
    assert batches == [_first_tokens(dl) for dl in loaders()]  # same seed, same order
    assert batches != [_first_tokens(dl) for dl in loaders(seed=2)]
    ranks[0].batch_sampler.set_epoch(1)
    assert _first_tokens(ranks[0]) != batches[0]
    # Resume: skip the first 5 batches of epoch 1 on this rank.
    epoch1 = _first_tokens(ranks[0])
    ranks[0].batch_sampler.skip_batches(5)
    assert _first_tokens(ranks[0]) == epoch1[5:]
    assert _first_tokens(ranks[0]) == epoch1  # the skip applies to one iteration only
    if group_by_length:
        # Batches hold similar lengths: far less spread inside a batch than across the data.
        spreads = [np.ptp(ds.lengths[b]) for b in (b for rank in batches for b in rank) if len(b) == 4]
        assert np.mean(spreads) < 0.25 * np.ptp(ds.lengths)


def test_train_sharding_drop_last():
    ds = _dataset(203)
    ranks = [_loader(ds, shuffle=True, seed=1, rank=r, world_size=3, drop_last=True) for r in range(3)]
    batches = [_first_tokens(dl) for dl in ranks]
    assert [len(b) for b in batches] == [16, 16, 16] == [len(dl) for dl in ranks]  # 50 full batches -> 48
    flat = [i for rank in batches for b in rank for i in b]
    assert len(flat) == len(set(flat)) == 192 and all(len(b) == 4 for rank in batches for b in rank)


@pytest.mark.parametrize(("world_size", "packing"), [(2, False), (3, False), (2, True)])
def test_eval_sharding_counts_each_sample_once(world_size, packing):
    ds = _dataset(11)
    loaders = [
        build_eval_dataloader(
            ds, batch_size=2, rank=r, world_size=world_size, pad_token_id=0, packing=packing, max_len=64
        )
        for r in range(world_size)
    ]
    per_rank = [list(dl) for dl in loaders]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(loaders[0])
    learned = Counter()
    for batches in per_rank:
        for b in batches:
            for row_ids, row_labels in zip(b["input_ids"], b["labels"]):
                for tok in row_ids[row_labels != IGNORE_INDEX].tolist():
                    learned[tok - 10] += 1
    assert learned == Counter({i: int(ds.lengths[i]) - 1 for i in range(11)})
    dummies = [b for batches in per_rank for b in batches if (b["labels"] == IGNORE_INDEX).all()]
    if not packing:
        assert len(dummies) == sum(len(b) for b in per_rank) - sum(
            -(-len(range(r, 11, world_size)) // 2) for r in range(world_size)
        )


def test_impossible_combinations_fail_fast():
    ds = _dataset(5)
    with pytest.raises(ValueError, match="group_by_length has no effect with packing"):
        _loader(ds, batch_size=2, packing=True, shuffle=True, group_by_length=True)
    with pytest.raises(ValueError, match="no full batch"):
        ShardedBatchSampler(
            ds.lengths,
            batch_size=4,
            shuffle=False,
            seed=0,
            group_by_length=False,
            rank=0,
            world_size=2,
            drop_last=True,
        )
    with pytest.raises(ValueError, match="max_src_len < max_len"):
        load_sft_dataset("x.jsonl", None, None, max_len=10, max_src_len=10, is_skip=False)
