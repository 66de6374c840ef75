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
    # 20 prompts: a batch of all of them decodes in groups of rows (sft.inference.cpu_decode) where it can.
    prompts = random_prompts(
        model, (7, 19, 3, 11, 19, 40, 2, 33, 25, 9, 30, 14, 38, 5, 21, 27, 16, 36, 12, 29)
    )
    # Stop ids that some rows produce early, so rows leave the batch at different steps.
    free_run = hf_generate_ids(model, prompts, config, batch_size=1)
    config.eos_token_id = [config.eos_token_id, free_run[1][4], free_run[3][2]]
    for batch_size in (1, 5, 20):
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


def test_a_large_padded_batch_attends_group_by_group(models, monkeypatch):
    """At 20 rows of unequal lengths on the CPU, decode steps attend in groups (the path the test above checks
    against generate's tokens), and the model attends with SDPA again afterwards."""
    from sft.inference import cpu_decode
    from sft.inference.generate import greedy_batch

    model, tokenizer = models["llama"]
    config = greedy_config(model, tokenizer, max_new_tokens=4)
    calls = []
    grouped = cpu_decode.grouped_sdpa_attention
    monkeypatch.setattr(
        cpu_decode,
        "grouped_sdpa_attention",
        lambda *a, **k: calls.append(k.get("decode_groups")) or grouped(*a, **k),
    )
    greedy_batch(model, random_prompts(model, range(41, 1, -2)), config, prefill="rows")  # longest first
    groups = [g for g in calls if g is not None]
    assert groups and groups[0] == cpu_decode.column_groups(list(range(0, 40, 2)))
    assert groups[0] == [(0, 8, 0), (8, 16, 16), (16, 20, 32)]
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["llama", "baichuan", "baichuan_alibi"])
def test_a_shared_start_is_prefilled_once_with_generates_tokens(family, models, monkeypatch, request):
    """Prompts that start alike (one chat template's system prompt and headers) compute that start once: later
    rows prefill only the rest, reading the earlier row's keys/values; the tokens stay generate's (ALiBi's
    distances included: Baichuan2-13B's position scheme)."""
    from sft.inference import generate as gen
    from sft.inference.kv_cache import prefill_alone
    from sft.inference.loading import load_for_inference

    if family == "baichuan_alibi":
        model, tokenizer = load_for_inference(request.getfixturevalue("tiny_baichuan_alibi_dir"))
    else:
        model, tokenizer = models[family]
    config = greedy_config(model, tokenizer, max_new_tokens=10)
    system = random_prompts(model, [24], seed=1)[0]
    tails = random_prompts(model, (30, 5, 17, 11, 26, 9), seed=2)
    prompts = [system + tail for tail in tails]
    prompts[3] = (
        prompts[0][:40] + tails[3]
    )  # shares 40 tokens with the first row: more than the system prompt
    prompts.append(random_prompts(model, [33], seed=3)[0])  # shares nothing
    computed = []

    def counting(model, prompt, capacity=None, *, prefix=None):
        computed.append(len(prompt) - (prefix[0][0].shape[-2] if prefix else 0))
        return prefill_alone(model, prompt, capacity, prefix=prefix)

    monkeypatch.setattr(gen, "prefill_alone", counting)
    expected = gen.hf_generate_ids(model, prompts, config, batch_size=1)
    got = gen.generate_ids(model, prompts, config, batch_size=len(prompts))
    assert got == expected
    # Longest first: rows 0 (54 tokens, all computed), 3 (51: 40 shared with row 0), 4 (50), 2 (41), 5 (33: 24
    # shared, the system prompt), 6 (33, nothing shared), 1 (29).
    assert computed == [54, 51 - 40, 50 - 24, 41 - 24, 33 - 24, 33, 29 - 24]


def test_shared_start_picks_the_longest_and_leaves_a_token_to_compute():
    from sft.inference.kv_cache import shared_start

    base = list(range(100, 130))
    prompts = [[*base, 1, 2, 3], base[:20] + [9] * 5, [*base, 1, 2], base[:17], [*base, 1, 2, 3, 4]]
    assert shared_start(prompts, 0) is None  # nothing earlier
    assert shared_start(prompts, 1) == (0, 20)
    assert shared_start(prompts, 2) == (0, 31)  # all but its last token: its logits must be computed
    assert shared_start(prompts, 3) == (0, 16)
    assert shared_start(prompts, 3, minimum=17) is None
    assert shared_start(prompts, 4) == (0, 33)  # the longest start, from the first of equals


@pytest.mark.parametrize("groups", [[(0, 2, 0), (2, 5, 3)], [(0, 5, 0)]])
def test_grouped_attention_is_masked_sdpa_on_fewer_columns(groups):
    """Each group's columns before its first are padding in all its rows: the same attention as the masked SDPA
    over every column, to float32 rounding; without decode_groups it is transformers' SDPA exactly."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sft.inference.cpu_decode import grouped_sdpa_attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    pads = [0, 1, 3, 4, 6]
    query, key, value = torch.randn(5, 6, 1, 16), torch.randn(5, 2, 12, 16), torch.randn(5, 2, 12, 16)
    mask = (torch.arange(12)[None, :] >= torch.tensor(pads)[:, None])[:, None, None, :]
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    got, _ = grouped_sdpa_attention(module, query, key, value, mask, scaling=0.25, decode_groups=groups)
    assert got.shape == expected.shape == (5, 1, 6, 16)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    same, _ = grouped_sdpa_attention(module, query, key, value, mask, scaling=0.25)
    assert torch.equal(same, expected)


@pytest.mark.parametrize("rows", [1, 5, 32])
def test_sliced_output_head_gives_the_same_bits(rows):
    """SmolLM2's head shape (49,152 x 576): the logits computed slice by slice equal the whole product bitwise."""
    from sft.inference.cpu_decode import _sliced_forward

    torch.manual_seed(0)
    head = torch.nn.Linear(576, 49152, bias=False)
    hidden = torch.randn(rows, 1, 576)
    assert torch.equal(_sliced_forward(head)(hidden), head(hidden))


def test_sliced_output_head_is_undone_after_the_block(models):
    from sft.inference.cpu_decode import sliced_output_head

    model, _ = models["llama"]
    head = model.get_output_embeddings()
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        with sliced_output_head(model):
            assert "forward" in vars(head)
            inside = model(input_ids=ids).logits
    assert "forward" not in vars(head)
    assert torch.equal(inside, before)


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
