"""Chat templates on the tiny tokenizers: exact learned tokens, loss placements, truncation, prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sft.data.formats import IGNORE_INDEX, DataFormatError
from sft.data.templates import assemble, default_template_name, get_template, sample_plan

SYSTEM = "你是李白，为人爽朗大方。"
ANSWERS = ["床前明月光，疑是地上霜。", "Hello world, said the poet!", "举杯邀明月。"]
CHAT = {
    "system": SYSTEM,
    "conversations": [
        {"role": "user", "content": "你好，请作诗"},
        {"role": "assistant", "content": ANSWERS[0]},
        {"role": "user", "content": "Say hello in English."},
        {"role": "assistant", "content": ANSWERS[1]},
        {"role": "user", "content": "再来一句"},
        {"role": "assistant", "content": ANSWERS[2]},
    ],
}
TOOL_CHAT = json.loads(
    (Path(__file__).resolve().parent.parent / "data" / "example_conversations.jsonl")
    .read_text()
    .splitlines()[0]
)
CASES = [("baichuan", name) for name in ("baichuan2", "llama2", "alpaca", "chatml")] + [
    ("llama", name) for name in ("llama2", "alpaca", "chatml")
]


@pytest.fixture(scope="module")
def model_dirs(tiny_baichuan_dir: Path, tiny_llama_dir: Path) -> dict[str, Path]:
    return {"baichuan": tiny_baichuan_dir, "llama": tiny_llama_dir}


@pytest.fixture(scope="module")
def tokenizers(model_dirs) -> dict:
    return {k: AutoTokenizer.from_pretrained(str(d)) for k, d in model_dirs.items()}


def learned_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous runs of learned positions; labels must equal the inputs there (unshifted)."""
    spans, current = [], []
    for tok, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(lab)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def answer_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(("arch", "name"), CASES)
def test_learned_tokens_are_exactly_answer_plus_eos(arch, name, tokenizers, model_dirs):
    tok = tokenizers[arch]
    template = get_template(name, tok, model_dirs[arch])
    ((ids, labels),) = template.encode(CHAT, loss_on="all")
    spans = learned_spans(ids, labels)
    assert len(spans) == 3
    for span, answer in zip(spans, ANSWERS):
        assert span == [*answer_ids(tok, answer), template.end_id]
        assert tok.decode(span[:-1]).strip() == answer
        assert tok.decode(span[-1:]) == tok.convert_ids_to_tokens(template.end_id)
    assert labels[0] == IGNORE_INDEX  # a sample never starts with a learned token (packing relies on it)
    learned = sum(len(s) for s in spans)
    assert learned == sum(len(answer_ids(tok, a)) + 1 for a in ANSWERS)


@pytest.mark.parametrize(("arch", "name"), CASES)
def test_loss_placements(arch, name, tokenizers, model_dirs):
    tok = tokenizers[arch]
    template = get_template(name, tok, model_dirs[arch])
    ((all_ids, _all_labels),) = template.encode(CHAT, "all")
    ((last_ids, last_labels),) = template.encode(CHAT, "last")
    each = template.encode(CHAT, "each")
    assert last_ids == all_ids
    assert learned_spans(last_ids, last_labels) == [[*answer_ids(tok, ANSWERS[2]), template.end_id]]
    assert len(each) == 3
    for k, (ids, labels) in enumerate(each):
        # Sample k: history up to answer k as unlearned context, only answer k learned, ends with EOS.
        assert learned_spans(ids, labels) == [[*answer_ids(tok, ANSWERS[k]), template.end_id]]
        assert ids == all_ids[: len(ids)] and ids[-1] == template.end_id and labels[-1] == template.end_id
    assert each[-1][0] == all_ids


@pytest.mark.parametrize(("arch", "name"), CASES)
def test_tool_and_observation_turns_never_learned(arch, name, tokenizers, model_dirs):
    tok = tokenizers[arch]
    template = get_template(name, tok, model_dirs[arch])
    ((ids, labels),) = template.encode(TOOL_CHAT, "all")
    answers = [t["content"] for t in TOOL_CHAT["conversations"] if t["role"] == "assistant"]
    assert learned_spans(ids, labels) == [[*answer_ids(tok, a), template.end_id] for a in answers]
    text = tok.decode(ids)
    assert "get_weather" in text and "sunny" in text  # tools, call and observation are in the context


def test_baichuan2_turn_tokens_come_from_generation_config(
    tiny_baichuan_dir: Path, tmp_path: Path, tokenizers
):
    tok = tokenizers["baichuan"]
    ((ids, _labels),) = get_template("baichuan2", tok, tiny_baichuan_dir).encode(CHAT, "all")
    system_ids = answer_ids(tok, SYSTEM)
    assert ids[: len(system_ids)] == system_ids and ids[len(system_ids)] == 195  # no BOS, system first
    assert ids.count(195) == 3 and ids.count(196) == 3
    moved = tmp_path / "model"
    shutil.copytree(tiny_baichuan_dir, moved)
    cfg = json.loads((moved / "generation_config.json").read_text())
    cfg.update(user_token_id=197, assistant_token_id=198)
    (moved / "generation_config.json").write_text(json.dumps(cfg))
    ((ids2, _),) = get_template("baichuan2", tok, moved).encode(CHAT, "all")
    assert ids2 == [{195: 197, 196: 198}.get(i, i) for i in ids]
    del cfg["user_token_id"]
    (moved / "generation_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="user_token_id"):
        get_template("baichuan2", tok, moved)
    with pytest.raises(ValueError, match="model directory"):
        get_template("baichuan2", tok, None)


@pytest.mark.parametrize(("arch", "name"), CASES)
def test_build_prompt_matches_training_prefix(arch, name, tokenizers, model_dirs):
    tok = tokenizers[arch]
    template = get_template(name, tok, model_dirs[arch])
    ((ids, labels),) = template.encode(CHAT, "last")
    answer_start = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert template.build_prompt(CHAT) == ids[:answer_start]
    open_chat = {**CHAT, "conversations": CHAT["conversations"][:-1]}
    assert template.build_prompt(open_chat) == ids[:answer_start]
    if name == "baichuan2":
        assert ids[answer_start - 1] == 196
    with pytest.raises(DataFormatError):
        template.build_prompt({"conversations": [{"role": "assistant", "content": "x"}]})


def test_prompt_truncation_keeps_answer_and_drops_oldest_rounds(tokenizers, tiny_baichuan_dir):
    tok = tokenizers["baichuan"]
    template = get_template("baichuan2", tok, tiny_baichuan_dir)
    conv = template.tokenize_record(CHAT)
    target, learned = sample_plan(conv, "all")[0]
    full = assemble(conv, target, learned)
    system_len = len(answer_ids(tok, SYSTEM))
    last_round = len(conv.turns[4].head) + len(conv.turns[4].content) + len(conv.turns[5].head)
    # Room for the system and the last round only: both older rounds go, the last answer stays whole.
    res = assemble(conv, target, learned, max_len=200, max_src_len=system_len + last_round)
    assert res.truncated_prompt and not res.truncated_answer
    assert (
        res.input_ids
        == full.input_ids[:system_len] + full.input_ids[-(last_round + len(conv.turns[5].content) + 1) :]
    )
    assert learned_spans(res.input_ids, res.labels) == [[*answer_ids(tok, ANSWERS[2]), tok.eos_token_id]]
    # Tighter: the start of the last question is cut too (its end, next to the answer, is kept).
    res2 = assemble(conv, target, learned, max_len=200, max_src_len=system_len + last_round - 2)
    user = conv.turns[4].content
    assert len(res2.input_ids) - len(conv.turns[5].content) - 1 == system_len + last_round - 2
    assert res2.input_ids[system_len + 1 : system_len + 1 + len(user) - 2] == user[2:]
    assert learned_spans(res2.input_ids, res2.labels)[-1] == [*answer_ids(tok, ANSWERS[2]), tok.eos_token_id]
    # is_skip drops it instead; a system prompt longer than max_src_len cannot be fixed.
    assert assemble(
        conv, target, learned, max_len=200, max_src_len=system_len + last_round, is_skip=True
    ).dropped
    assert assemble(conv, target, learned, max_len=200, max_src_len=system_len - 1).dropped


def test_llama2_truncation_keeps_system_block(tokenizers, tiny_llama_dir):
    tok = tokenizers["llama"]
    template = get_template("llama2", tok, tiny_llama_dir)
    full = template.build_prompt(CHAT)
    cut = template.build_prompt(CHAT, max_src_len=len(full) - 5)
    assert len(cut) <= len(full) - 5
    text = tok.decode(cut)
    # The oldest round went; the system block moved into the first kept [INST].
    assert text.count("<<SYS>>") == 1 and SYSTEM in text and text.count("[INST]") == 2
    assert ANSWERS[0] not in text and ANSWERS[1] in text


def test_answer_cut_only_when_it_alone_overflows(tokenizers, tiny_llama_dir):
    tok = tokenizers["llama"]
    template = get_template("llama2", tok, tiny_llama_dir)
    long_answer = " ".join(["the moon is bright tonight"] * 40)
    record = {
        "conversations": [
            {"role": "user", "content": "Write a long poem."},
            {"role": "assistant", "content": long_answer},
        ]
    }
    conv = template.tokenize_record(record)
    target, learned = sample_plan(conv, "all")[0]
    prompt_len = len(template.build_prompt(record))
    res = assemble(conv, target, learned, max_len=prompt_len + 20, max_src_len=prompt_len)
    assert res.truncated_answer and not res.truncated_prompt
    assert len(res.input_ids) == prompt_len + 20 and res.input_ids[-1] == tok.eos_token_id
    assert learned_spans(res.input_ids, res.labels) == [
        [*answer_ids(tok, long_answer)[:19], tok.eos_token_id]
    ]
    assert assemble(
        conv, target, learned, max_len=prompt_len + 20, max_src_len=prompt_len, is_skip=True
    ).dropped


def test_default_template_names():
    assert default_template_name("baichuan") == "baichuan2"
    assert default_template_name("llama") == "llama2"
    assert default_template_name("qwen2") == "chatml"
    assert default_template_name("mistral") == "chatml"
    with pytest.raises(ValueError, match="unknown template"):
        get_template("vicuna", None)
