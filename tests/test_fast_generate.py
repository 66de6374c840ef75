"""The issue-19 prototype sft.inference.fast_generate: same greedy tokens as model.generate, cache equal to
DynamicCache's, non-greedy settings refused. Tiny random models (Llama from transformers, our Baichuan2)."""

from __future__ import annotations

import pytest
import torch


def _load(model_dir):
    from models import register_models
    from sft.inference.loading import load_for_inference

    register_models()
    return load_for_inference(model_dir)


def _generate_ids(model, prompts, config, batch_size):
    """generate_batch's steps (longest first, left-padded, model.generate), keeping the ids up to the stop token."""
    from sft.inference.generate import left_pad

    stop = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outs = [None] * len(prompts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = left_pad([prompts[i] for i in idx], config.pad_token_id)
            new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[
                :, ids.shape[1] :
            ]
            for row, i in enumerate(idx):
                tokens = new[row].tolist()
                end = next((j + 1 for j, t in enumerate(tokens) if t in stop), len(tokens))
                outs[i] = tokens[:end]
    return outs


@pytest.mark.parametrize("family", ["llama", "baichuan"])
@pytest.mark.parametrize("prefill", ["batch", "rows"])
def test_same_tokens_as_generate(family, prefill, tiny_llama_dir, tiny_baichuan_dir):
    from sft.inference.fast_generate import fast_generate
    from sft.inference.settings import GenerationArgs, build_generation_config

    model, tokenizer = _load(tiny_llama_dir if family == "llama" else tiny_baichuan_dir)
    config = build_generation_config(
        model, tokenizer, GenerationArgs(do_sample=False, max_new_tokens=12, repetition_penalty=1.0)
    )
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 19, 3, 11, 19)]
    # A stop token that some rows produce early, so rows leave the batch at different steps.
    free_run = _generate_ids(model, prompts, config, batch_size=1)
    config.eos_token_id = [config.eos_token_id, free_run[1][4], free_run[3][2]]
    for batch_size in (1, 5):
        expected = _generate_ids(model, prompts, config, batch_size)
        got = fast_generate(model, prompts, config, batch_size=batch_size, prefill=prefill)
        assert got == expected, f"batch_size={batch_size}"
    assert any(len(a) < 12 for a in got) and any(len(a) == 12 for a in got)


def test_preallocated_layer_holds_what_dynamic_layer_holds():
    from transformers.cache_utils import DynamicLayer

    from sft.inference.fast_generate import PreallocatedLayer

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


def test_refuses_non_greedy_settings(tiny_llama_dir):
    from sft.inference.fast_generate import fast_generate
    from sft.inference.settings import GenerationArgs, build_generation_config

    model, tokenizer = _load(tiny_llama_dir)
    for settings in (GenerationArgs(do_sample=True), GenerationArgs(do_sample=False, repetition_penalty=1.2)):
        config = build_generation_config(model, tokenizer, settings)
        with pytest.raises(ValueError, match="generate_batch"):
            fast_generate(model, [[5, 6, 7]], config)
