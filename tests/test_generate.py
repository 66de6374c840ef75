"""sft.inference.generate: our greedy loop gives model.generate's tokens (tiny Llama and Baichuan2, with and
without a repetition penalty, rows ending early); the KV cache holds what DynamicCache holds; anything else
goes through generate; a streamed reply stops generating when its reader closes it."""

from __future__ import annotations

import threading
import time

import pytest
import torch


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tiny_baichuan_dir):
    from sft.inference.loading import load_for_inference

    return {"llama": load_for_inference(tiny_llama_dir), "baichuan": load_for_inference(tiny_baichuan_dir)}


def random_prompts(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def greedy_config(model, tokenizer, **settings):
    from sft.inference.settings import GenerationArgs, build_generation_config

    return build_generation_config(model, tokenizer, GenerationArgs(do_sample=False, **settings))


@pytest.mark.parametrize("family", ["llama", "baichuan"])
@pytest.mark.parametrize("prefill", ["batch", "rows"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_loop_gives_generates_tokens(family, prefill, penalty, models):
    from sft.inference.generate import greedy_batch, hf_generate_ids, loop_problem

    model, tokenizer = models[family]
    config = greedy_config(model, tokenizer, max_new_tokens=12, repetition_penalty=penalty)
    assert loop_problem(model, config) is None
    prompts = random_prompts(model, (7, 19, 3, 11, 19))
    # Stop ids that some rows produce early, so rows leave the batch at different steps.
    free_run = hf_generate_ids(model, prompts, config, batch_size=1)
    config.eos_token_id = [config.eos_token_id, free_run[1][4], free_run[3][2]]
    for batch_size in (1, 5):
        expected = hf_generate_ids(model, prompts, config, batch_size=batch_size)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        got = [None] * len(prompts)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, answer in zip(
                idx, greedy_batch(model, [prompts[i] for i in idx], config, prefill=prefill)
            ):
                got[i] = answer
        assert got == expected, f"batch_size={batch_size}"
    assert any(len(a) < 12 for a in got) and any(len(a) == 12 for a in got)


def test_generate_batch_routes_greedy_through_the_loop_and_the_rest_through_generate(models, monkeypatch):
    """Greedy: our loop, the text of generate()'s ids; sampling (seeded): generate(), its exact draws."""
    from sft.inference import generate as gen
    from sft.inference.settings import GenerationArgs, build_generation_config

    model, tokenizer = models["baichuan"]
    prompts = random_prompts(model, (5, 9, 14))
    config = greedy_config(model, tokenizer, max_new_tokens=8)
    reference = gen.hf_generate_ids(model, prompts, config)
    expected = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in reference]
    loop_calls = []
    loop = gen.greedy_batch
    monkeypatch.setattr(gen, "greedy_batch", lambda *a, **k: loop_calls.append(len(a[1])) or loop(*a, **k))
    assert gen.generate_batch(model, tokenizer, prompts, config, batch_size=2) == expected
    assert loop_calls == [2, 1]  # longest first, in batches of 2

    sampling = build_generation_config(
        model, tokenizer, GenerationArgs(do_sample=True, top_k=5, max_new_tokens=8)
    )
    assert "do_sample=True" in gen.loop_problem(model, sampling)
    torch.manual_seed(3)
    first = gen.generate_ids(model, prompts, sampling, batch_size=3)
    torch.manual_seed(3)
    assert first == gen.hf_generate_ids(model, prompts, sampling, batch_size=3)
    assert loop_calls == [2, 1]


def test_preallocated_layer_holds_what_dynamic_layer_holds():
    from transformers.cache_utils import DynamicLayer

    from sft.inference.kv_cache import PreallocatedLayer

    ref, ours = DynamicLayer(), PreallocatedLayer(capacity=4)  # capacity too small: it must grow
    for n in (3, 1, 1, 2):
        k, v = torch.randn(3, 2, n, 8), torch.randn(3, 2, n, 8)
        expected, got = ref.update(k, v), ours.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
    keep = torch.tensor([0, 2])
    ref.batch_select_indices(keep)
    ours.batch_select_indices(keep)
    assert torch.equal(ref.keys, ours.keys) and torch.equal(ref.values, ours.values)
    assert ours.get_seq_length() == ref.get_seq_length() == 7


def test_rows_join_right_aligned_and_padding_columns_are_trimmed():
    """A row joining a batch sits right-aligned (zeros on its left); a shorter batch is shifted right for a longer
    row; trimming drops columns of padding only."""
    from sft.inference.kv_cache import PreallocatedLayer

    layer = PreallocatedLayer(capacity=1)
    a, b = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    layer.join(a, a + 1, capacity=8)
    assert layer.length == 3 and torch.equal(layer.keys, a)
    layer.join(b, b + 1, capacity=8)  # longer: the first row moves right by 2
    assert layer.length == 5 and layer.keys.shape == (2, 2, 5, 4)
    assert torch.equal(layer.keys[0, :, 2:], a[0]) and not layer.keys[0, :, :2].any()
    assert torch.equal(layer.keys[1], b[0]) and torch.equal(layer.values[1], b[0] + 1)
    layer.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    layer.batch_select_indices(torch.tensor([0]))
    layer.trim_left(2)
    assert layer.length == 4 and torch.equal(layer.keys[0, :, :3], a[0]) and layer.keys[0, :, 3].eq(1).all()


def test_stream_stops_generating_when_its_reader_leaves(models):
    """Closing stream_reply's iterator (what gradio does for a cancelled request) ends generate() within a step:
    the worker thread is gone when close() returns, long before the 4,000 tokens it was asked for."""
    from sft.inference.generate import stream_reply

    model, tokenizer = models["llama"]
    config = greedy_config(model, tokenizer, max_new_tokens=4000)
    config.min_new_tokens = 4000  # no early end: only the stop flag can end it
    stream = stream_reply(model, tokenizer, random_prompts(model, (6,))[0], config)
    pieces = [next(stream) for _ in range(3)]
    start = time.perf_counter()
    stream.close()
    closed_in = time.perf_counter() - start
    assert all(isinstance(p, str) for p in pieces)
    assert not [t for t in threading.enumerate() if t.name == "stream_reply"]
    assert closed_in < 2.0, closed_in
