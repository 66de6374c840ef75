"""sft.inference.serving.LiveBatcher: live replies decoded together give each reply's own greedy answer (the one
generate() gives it alone), requests join and leave between steps, and a reply whose reader leaves stops at the
next step. Tiny random Llama and Baichuan2."""

from __future__ import annotations

import threading
import time

import pytest

from tests.test_generate import greedy_config, random_prompts


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tiny_baichuan_dir):
    from sft.inference.loading import load_for_inference

    return {"llama": load_for_inference(tiny_llama_dir), "baichuan": load_for_inference(tiny_baichuan_dir)}


def alone(model, tokenizer, prompt, config) -> str:
    """generate()'s answer to the prompt on its own (batch 1), as text."""
    from sft.inference.generate import hf_generate_ids

    return tokenizer.decode(hf_generate_ids(model, [prompt], config)[0], skip_special_tokens=True)


def read_all(stream, out: list, index: int, started: threading.Event | None = None) -> None:
    text = ""
    for piece in stream:
        text += piece
        if started is not None:
            started.set()
    out[index] = text


def wait_idle(batcher, seconds: float = 5.0) -> None:
    """Until no reply is decoded (a reader sees its end just before its row leaves the batch)."""
    deadline = time.monotonic() + seconds
    while batcher.live():
        assert time.monotonic() < deadline, f"{batcher.live()} replies still decoded"
        time.sleep(0.01)


@pytest.mark.parametrize("family", ["llama", "baichuan"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_live_replies_are_each_replys_own_greedy_answer(family, penalty, models, caplog):
    from sft.inference.serving import LiveBatcher

    caplog.set_level("INFO", logger="sft.inference.serving")
    model, tokenizer = models[family]
    batcher = LiveBatcher(model, tokenizer, max_live=3)
    prompts = random_prompts(model, (9, 4, 17, 6, 12), seed=1)
    configs = [
        greedy_config(model, tokenizer, max_new_tokens=n, repetition_penalty=penalty)
        for n in (20, 6, 14, 25, 3)
    ]
    expected = [alone(model, tokenizer, p, c) for p, c in zip(prompts, configs)]

    # One alone: the greedy loop at batch 1, generate()'s tokens.
    assert "".join(batcher.stream(prompts[0], configs[0])) == expected[0]

    # Five readers, three live at a time, arriving while others decode: each joins a running batch.
    got: list = [None] * 5
    threads = []
    for i, (prompt, config) in enumerate(zip(prompts, configs)):
        started = threading.Event()
        thread = threading.Thread(target=read_all, args=(batcher.stream(prompt, config), got, i, started))
        thread.start()
        threads.append(thread)
        started.wait(timeout=60)  # the next one arrives mid-reply
    for thread in threads:
        thread.join(timeout=120)
    assert got == expected and all(expected)
    wait_idle(batcher)
    joined = [r.getMessage() for r in caplog.records if "joined" in r.getMessage()]
    assert any("joined 2 live" in m for m in joined), joined  # some replies really shared decode steps


def test_a_closed_reply_leaves_at_the_next_step_and_the_others_go_on(models, caplog):
    from sft.inference.serving import LiveBatcher

    caplog.set_level("INFO", logger="sft.inference.serving")
    model, tokenizer = models["llama"]
    batcher = LiveBatcher(model, tokenizer, max_live=2)
    long = greedy_config(model, tokenizer, max_new_tokens=3000)
    prompts = random_prompts(model, (8, 5), seed=2)
    short = greedy_config(model, tokenizer, max_new_tokens=40)
    expected = alone(model, tokenizer, prompts[1], short)

    # A reply that would run 3,000 tokens (no stop id: only its reader can end it).
    long.eos_token_id = [model.config.vocab_size + 7]
    stream = batcher.stream(prompts[0], long)
    next(stream)
    got: list = [None]
    other = threading.Thread(target=read_all, args=(batcher.stream(prompts[1], short), got, 0))
    other.start()
    for _ in range(5):
        next(stream)
    stream.close()
    other.join(timeout=60)
    assert got[0] == expected  # the other reply is untouched by its neighbour leaving
    wait_idle(batcher)
    ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reply 1:")]
    assert len(ended) == 2 and "closed after" in ended[1], ended
    tokens = int(ended[1].split("after ")[1].split()[0])
    assert 6 <= tokens <= 8, ended  # 6 pieces read, then at most the step in flight


def test_sampling_settings_and_what_is_refused(models):
    from sft.inference.serving import LiveBatcher, choose_processors
    from sft.inference.settings import GenerationArgs, build_generation_config

    model, tokenizer = models["baichuan"]
    batcher = LiveBatcher(model, tokenizer, max_live=2, seed=5)
    prompt = random_prompts(model, (7,), seed=3)[0]
    greedy = greedy_config(model, tokenizer, max_new_tokens=10)
    top1 = build_generation_config(
        model, tokenizer, GenerationArgs(do_sample=True, top_k=1, max_new_tokens=10)
    )
    assert "".join(batcher.stream(prompt, top1)) == "".join(
        batcher.stream(prompt, greedy)
    )  # top-1 draw = argmax
    names = [
        type(p).__name__
        for p in choose_processors(
            build_generation_config(
                model,
                tokenizer,
                GenerationArgs(do_sample=True, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.1),
            )
        )
    ]
    assert names == [
        "RepetitionPenaltyLogitsProcessor",
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
    ]
    beams = greedy_config(model, tokenizer, max_new_tokens=10, num_beams=2)
    with pytest.raises(ValueError, match="num_beams=2"):
        "".join(batcher.stream(prompt, beams))


def test_close_ends_live_replies_and_stops_the_loop(models):
    """close() (also run at interpreter exit): a live reply's reader sees its end, the loop thread is gone, and a
    later request is refused instead of waiting forever. A loop thread left running into interpreter shutdown
    made the process abort ("terminate called without an active exception")."""
    from sft.inference.serving import LiveBatcher

    model, tokenizer = models["llama"]
    batcher = LiveBatcher(model, tokenizer, max_live=2)
    endless = greedy_config(model, tokenizer, max_new_tokens=3000)
    endless.eos_token_id = [model.config.vocab_size + 7]  # no stop id: only close() can end it
    got: list = [None]
    started = threading.Event()
    reader = threading.Thread(
        target=read_all,
        args=(batcher.stream(random_prompts(model, (6,), seed=4)[0], endless), got, 0, started),
    )
    reader.start()
    assert started.wait(60)
    batcher.close()
    reader.join(timeout=60)
    assert not reader.is_alive() and got[0]  # its text so far, then the end
    assert not batcher._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        next(batcher.stream([1, 2, 3], endless))


def counting_prefills(monkeypatch) -> list[int]:
    """From now on, how many positions of each prompt the live batcher computes (the rest read from a cache)."""
    from sft.inference import serving
    from sft.inference.kv_cache import prefill_alone

    computed = []

    def counting(model, prompt, capacity=None, *, prefix=None):
        computed.append(len(prompt) - (prefix[0][0].shape[-2] if prefix else 0))
        return prefill_alone(model, prompt, capacity, prefix=prefix)

    monkeypatch.setattr(serving, "prefill_alone", counting)
    return computed


def answer_ids(model, prompt, config) -> list[int]:
    """generate()'s greedy ids for the prompt alone: a live reply's ids (the first test's claim)."""
    from sft.inference.generate import hf_generate_ids

    return hf_generate_ids(model, [prompt], config)[0]


@pytest.mark.parametrize("family", ["llama", "baichuan"])
def test_a_prompt_computes_only_what_follows_the_start_it_shares_with_earlier_ones(
    family, models, monkeypatch
):
    """The web demo's chats all begin with one system prompt, and a chat's next prompt begins with its last prompt
    and reply: that start is read from their cache, and every reply is still its own greedy answer."""
    from sft.inference.serving import LiveBatcher

    model, tokenizer = models[family]
    computed = counting_prefills(monkeypatch)
    batcher = LiveBatcher(model, tokenizer, max_live=2)
    system = random_prompts(model, [20], seed=4)[0]
    first = system + random_prompts(model, [7], seed=5)[0]
    other = system + random_prompts(model, [9], seed=6)[0]  # another chat: shares the system prompt
    unrelated = random_prompts(model, [12], seed=7)[0]
    config = greedy_config(model, tokenizer, max_new_tokens=5)
    "".join(batcher.stream(first, config))
    answer = answer_ids(model, first, config)
    assert len(answer) == 5  # no early stop: the last id was chosen, never fed, so 4 are in the cache
    follow_up = first + answer[:3] + random_prompts(model, [4], seed=8)[0]  # the same chat, one turn on
    prompts = [follow_up, other, unrelated]
    got = ["".join(batcher.stream(prompt, config)) for prompt in prompts]
    batcher.close()
    assert got == [alone(model, tokenizer, prompt, config) for prompt in prompts]
    # follow_up: `first` and 3 ids of its reply are shared; other: the system prompt; unrelated: nothing.
    assert computed == [27, len(follow_up) - 30, 9, 12]


@pytest.mark.parametrize("family", ["llama", "baichuan"])
def test_each_chat_reads_its_own_history_whoever_was_served_in_between(family, models, monkeypatch):
    """Two chats take turns: each chat's second prompt computes only its new message, what follows its first
    prompt and reply, though the other chat was served in between; those are then dropped (the second prompt and
    reply start with them), and every reply is still its own greedy answer."""
    from sft.inference.serving import LiveBatcher

    model, tokenizer = models[family]
    computed = counting_prefills(monkeypatch)
    batcher = LiveBatcher(model, tokenizer, max_live=2)
    config = greedy_config(model, tokenizer, max_new_tokens=5)
    system = random_prompts(model, [20], seed=4)[0]
    firsts = [system + random_prompts(model, [n], seed=seed)[0] for n, seed in ((30, 5), (25, 6))]
    seconds, got = [], []
    for first, seed in zip(firsts, (8, 9), strict=True):
        got.append("".join(batcher.stream(first, config)))
        fed = answer_ids(model, first, config)[:-1]  # the reply's ids but the last (chosen, never fed)
        seconds.append(first + fed + random_prompts(model, [4], seed=seed)[0])  # the chat's next message
    got += ["".join(batcher.stream(prompt, config)) for prompt in seconds]
    held = batcher.prompt_caches.prompts()
    batcher.close()
    prompts = [*firsts, *seconds]
    assert got == [alone(model, tokenizer, prompt, config) for prompt in prompts]
    # chat 2's first prompt shares the system prompt with chat 1's; each second prompt computes its new message
    assert computed == [50, 25, 4, 4]
    replies = [answer_ids(model, prompt, config) for prompt in (seconds[1], seconds[0])]
    assert held == [seconds[1] + replies[0][:-1], seconds[0] + replies[1][:-1]]


@pytest.mark.parametrize("family", ["llama", "baichuan"])
def test_replies_decoded_together_leave_their_own_keys_and_values(family, models):
    """Replies of different lengths decoded in one padded batch: each one's kept cache is its prompt and fed ids,
    as a prefill of that sequence computes them (to rounding: decode steps and a prefill multiply in other
    shapes)."""
    import torch

    from sft.inference.kv_cache import prefill_alone
    from sft.inference.serving import LiveBatcher

    model, tokenizer = models[family]
    batcher = LiveBatcher(model, tokenizer, max_live=3)
    prompts = random_prompts(model, (21, 34, 17), seed=11)
    configs = [greedy_config(model, tokenizer, max_new_tokens=n) for n in (9, 4, 12)]
    got: list = [None] * 3
    threads = [
        threading.Thread(target=read_all, args=(batcher.stream(p, c), got, i))
        for i, (p, c) in enumerate(zip(prompts, configs, strict=True))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    wait_idle(batcher)
    held = dict(zip(map(tuple, batcher.prompt_caches.prompts()), batcher.prompt_caches.caches(), strict=True))
    batcher.close()
    for prompt, config in zip(prompts, configs, strict=True):
        sequence = prompt + answer_ids(model, prompt, config)[:-1]
        kept = held[tuple(sequence)]
        with torch.inference_mode():
            whole = prefill_alone(model, sequence)[0]
        for mine, theirs in zip(kept.layers, whole.layers, strict=True):
            assert mine.keys.shape == theirs.keys.shape
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-5)


def test_prompt_caches_hold_the_most_recently_used_within_their_bytes(models):
    import torch

    from sft.inference.kv_cache import PromptCaches, cache_bytes, prefill_alone

    model, _ = models["llama"]
    config = model.config
    system = random_prompts(model, [20], seed=4)[0]
    chats = [system + random_prompts(model, [10], seed=seed)[0] for seed in (5, 6, 7)]
    with torch.inference_mode():
        caches = [prefill_alone(model, prompt)[0] for prompt in chats]
    size = cache_bytes(caches[0])
    # keys and values, fp32
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    assert size == 30 * per_position

    store = PromptCaches(2 * size + size // 10)  # room for two caches of 30 positions, or of 30 and 32
    store.add(chats[0], caches[0])
    store.add(chats[1], caches[1])
    assert store.prompts() == [chats[1], chats[0]] and store.bytes == 2 * size
    prefix = store.prefix_for(chats[0] + [3, 4])  # all of chats[0]: now the most recently used
    assert [k.shape[-2] for k, _ in prefix] == [30] * config.num_hidden_layers
    assert all(torch.equal(k, layer.keys) and torch.equal(v, layer.values)
               for (k, v), layer in zip(prefix, caches[0].layers, strict=True))  # fmt: skip
    assert store.prompts() == [chats[0], chats[1]]
    shared = store.prefix_for([*system, 5, 6, 7])  # the system prompt: from the most recently used
    assert shared[0][0].shape[-2] == 20 and shared[0][0].data_ptr() == caches[0].layers[0].keys.data_ptr()
    assert store.prefix_for(random_prompts(model, [40], seed=9)[0]) is None

    store.add(chats[2], caches[2])  # over the budget: the least recently used goes
    assert store.prompts() == [chats[2], chats[0]]
    longer = chats[0] + [3, 4]
    with torch.inference_mode():
        longer_cache = prefill_alone(model, longer)[0]
    store.add(longer, longer_cache)  # starts with all of chats[0], which it replaces
    assert store.prompts() == [longer, chats[2]]

    small = PromptCaches(size - 1)  # one cache alone is over the budget: nothing is held
    small.add(chats[0], caches[0])
    assert len(small) == 0 and small.prefix_for(chats[0]) is None
