"""The families' own chat templates (models/tiny_families.py, written from the public formats of Qwen2.5, Qwen3,
Llama 3.1, Mistral v0.1/v0.2, Gemma 2/3 and Phi-3) through the ``tokenizer`` template.

Training: every sample is the template's own rendering of its messages, tokenised as a whole, and exactly the
answers (with the reasoning block Qwen3 writes before the last one, and the special token that ends each) are
learned. Shown as the characters the learned tokens cover in the rendering, written out by hand. Inference:
every prompt is ``apply_chat_template(history, add_generation_prompt=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from models.tiny_families import FAMILIES
from sft.data.formats import IGNORE_INDEX
from sft.data.templates import get_template

CHAT = {
    "system": "You are Li Bai.",
    "conversations": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": " I am a poet. "},  # the spaces show which templates trim
    ],
}
THINKING_CHAT = {
    **CHAT,
    "conversations": [
        CHAT["conversations"][0],
        {**CHAT["conversations"][1], "reasoning_content": "A greeting."},
        CHAT["conversations"][2],
        {**CHAT["conversations"][3], "reasoning_content": "Say who."},
    ],
}

# The characters each learned answer covers in the rendering (--loss_on all): the answer as the template writes
# it through its end-of-turn token. Phi-3's turn tokens swallow the whitespace after them (the answer's leading
# space goes to <|assistant|>, the newline after <|end|> to <|end|>).
LEARNED = {
    "qwen2": ["Hi there<|im_end|>", " I am a poet. <|im_end|>"],
    "qwen3": ["Hi there<|im_end|>", "<think>\n\n</think>\n\n I am a poet. <|im_end|>"],
    "llama3": ["Hi there<|eot_id|>", "I am a poet.<|eot_id|>"],
    "mistral": [" Hi there</s>", "  I am a poet. </s>"],
    "gemma2": ["Hi there<end_of_turn>", "I am a poet.<end_of_turn>"],
    "gemma3": ["Hi there<end_of_turn>", "I am a poet.<end_of_turn>"],
    "phi3": ["Hi there<|end|>\n", "I am a poet. <|end|>\n"],
}
# The same, one sample per answer: Qwen3 writes its (empty) thinking block before whichever answer is last.
LEARNED_EACH = {**LEARNED, "qwen3": ["<think>\n\n</think>\n\nHi there<|im_end|>", LEARNED["qwen3"][1]]}


@pytest.fixture(scope="module")
def tokenizers(tiny_family_dirs: dict[str, Path]) -> dict:
    return {family: AutoTokenizer.from_pretrained(path) for family, path in tiny_family_dirs.items()}


def messages_of(record: dict) -> list[dict]:
    turns = [{k: v for k, v in t.items()} for t in record["conversations"]]
    return [{"role": "system", "content": record["system"]}, *turns]


def learned_texts(tokenizer, text: str, ids: list[int], labels: list[int]) -> list[str]:
    """The characters of ``text`` that each run of learned tokens covers."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoding["input_ids"] == ids
    offsets, runs, start = encoding["offset_mapping"], [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            assert label == ids[i]
            start = i if start is None else start
        elif start is not None:
            runs.append(text[offsets[start][0] : offsets[i - 1][1]])
            start = None
    return runs


@pytest.mark.parametrize("loss_on", ["all", "last", "each"])
@pytest.mark.parametrize("family", FAMILIES)
def test_samples_are_the_templates_rendering_with_the_answers_learned(family, loss_on, tokenizers):
    tokenizer = tokenizers[family]
    template = get_template("tokenizer", tokenizer)
    messages = messages_of(CHAT)
    samples = template.encode(CHAT, loss_on)
    if loss_on == "each":
        expected = [(messages[:3], LEARNED_EACH[family][:1]), (messages, LEARNED_EACH[family][1:])]
    else:
        expected = [(messages, LEARNED[family] if loss_on == "all" else LEARNED[family][1:])]
    assert len(samples) == len(expected)
    for (ids, labels), (sample_messages, learned) in zip(samples, expected):
        text = tokenizer.apply_chat_template(sample_messages, tokenize=False)
        assert learned_texts(tokenizer, text, ids, labels) == learned
    end = tokenizer.convert_ids_to_tokens(template.end_id)
    assert end == {
        "qwen2": "<|im_end|>",
        "qwen3": "<|im_end|>",
        "llama3": "<|eot_id|>",
        "mistral": "</s>",
    }.get(family, "<end_of_turn>" if family.startswith("gemma") else "<|end|>")


@pytest.mark.parametrize("loss_on", ["all", "each"])
def test_qwen3_learns_the_reasoning_of_the_answer_it_renders_it_for(loss_on, tokenizers):
    """Qwen3 keeps reasoning only in answers after the last question: with every answer learned, the first
    loses its reasoning (the template drops it), the last learns it; one sample per answer learns each's."""
    tokenizer = tokenizers["qwen3"]
    template = get_template("tokenizer", tokenizer)
    messages = messages_of(THINKING_CHAT)
    learned_last = "<think>\nSay who.\n</think>\n\n I am a poet. <|im_end|>"
    if loss_on == "all":
        expected = [(messages, ["Hi there<|im_end|>", learned_last])]
    else:
        expected = [
            (messages[:3], ["<think>\nA greeting.\n</think>\n\nHi there<|im_end|>"]),
            (messages, [learned_last]),
        ]
    samples = template.encode(THINKING_CHAT, loss_on)
    for (ids, labels), (sample_messages, learned) in zip(samples, expected, strict=True):
        text = tokenizer.apply_chat_template(sample_messages, tokenize=False)
        assert learned_texts(tokenizer, text, ids, labels) == learned
    # Reasoning written into the content (<think>...</think> before the answer) is read the same way.
    inline = {
        **CHAT,
        "conversations": [
            *CHAT["conversations"][:3],
            {"role": "assistant", "content": "<think>\nSay who.\n</think>\n\n I am a poet. "},
        ],
    }
    ((ids, labels),) = template.encode(inline, "last")
    text = tokenizer.apply_chat_template(messages_of(inline), tokenize=False)
    assert learned_texts(tokenizer, text, ids, labels) == [learned_last]


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_is_the_generation_prompt(family, tokenizers):
    tokenizer = tokenizers[family]
    template = get_template("tokenizer", tokenizer)
    for record in (CHAT, THINKING_CHAT):
        history = {**record, "conversations": record["conversations"][:3]}
        text = tokenizer.apply_chat_template(messages_of(history), tokenize=False, add_generation_prompt=True)
        assert template.build_prompt(history) == tokenizer(text, add_special_tokens=False)["input_ids"]
        # A record that ends with its reference answer is prompted without it.
        assert template.build_prompt(record) == template.build_prompt(history)


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_preference_pairs_with_a_template_that_is_not_prefix_stable(family, tokenizers, tmp_path):
    """DPO data: each reply is the final answer of its own rendering, learned with its end-of-turn token."""
    from sft.data.preference import load_preference_dataset

    tokenizer = tokenizers[family]
    template = get_template("tokenizer", tokenizer)
    pair = {**CHAT, "conversations": CHAT["conversations"][:3], "chosen": "I am a poet.", "rejected": "No."}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    pairs = load_preference_dataset(
        tmp_path / "pairs.jsonl", template, tokenizer, max_len=256, max_src_len=200, is_skip=False
    )
    learned = []
    for reply, (ids, labels) in zip(("I am a poet.", "No."), (pairs.sequences.arrays(i) for i in (0, 1))):
        messages = [*messages_of(pair), {"role": "assistant", "content": reply}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        learned += learned_texts(tokenizer, text, list(ids), list(labels))
    think = "<think>\n\n</think>\n\n" if family == "qwen3" else ""
    end = "<|im_end|>" if family == "qwen3" else "<|end|>\n"
    assert learned == [f"{think}I am a poet.{end}", f"{think}No.{end}"]
