"""Tiny model directories load through the Auto classes; the Baichuan2 chat prompt and chat()."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from models.baichuan.generation_utils import build_chat_input, chat
from models.baichuan.tokenization_baichuan import BaichuanTokenizer
from models.tiny import main as tiny_main

USER, ASSISTANT = 195, 196  # what the tiny generation_config.json names, as the official one does


@pytest.fixture(scope="module")
def baichuan(tiny_baichuan_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_baichuan_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_baichuan_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def greedy(baichuan) -> GenerationConfig:
    """The model's generation config (turn tokens included) switched to plain greedy decoding."""
    model, _ = baichuan
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.repetition_penalty = 1.0
    config.temperature = config.top_p = config.top_k = None
    config.max_new_tokens = 12
    return config


# --- the tiny directories ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "model_class", "tokenizer_class"),
    [
        ("tiny_baichuan_dir", "BaichuanForCausalLM", "BaichuanTokenizer"),
        ("tiny_baichuan_alibi_dir", "BaichuanForCausalLM", "BaichuanTokenizer"),
        ("tiny_llama_dir", "LlamaForCausalLM", "LlamaTokenizer"),
    ],
)
def test_tiny_dir_loads_and_generates(
    request: pytest.FixtureRequest, fixture: str, model_class: str, tokenizer_class: str
) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    for name in ["config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"]:
        assert (model_dir / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert type(model).__name__ == model_class
    assert type(tokenizer).__name__ == tokenizer_class
    assert model.config.vocab_size == len(tokenizer) > 1000
    special = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert special == (0, 1, 2, 0)  # unk, bos, eos, pad
    text = "你好，请介绍一下你自己。Hello!"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text

    input_ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=5,
            min_new_tokens=5,
        )
        # Greedy generation picks the argmax of the forward pass: check the first new token by hand.
        first = model(input_ids).logits[0, -1].argmax().item()
    assert output.shape == (1, input_ids.shape[1] + 5)
    assert output[0, input_ids.shape[1]].item() == first


def test_baichuan_config_layouts(tiny_baichuan_dir: Path, tiny_baichuan_alibi_dir: Path) -> None:
    rope = json.loads((tiny_baichuan_dir / "config.json").read_text())
    alibi = json.loads((tiny_baichuan_alibi_dir / "config.json").read_text())
    assert rope["model_type"] == alibi["model_type"] == "baichuan"
    assert rope["model_max_length"] == alibi["model_max_length"] == 4096
    assert rope["max_position_embeddings"] == 4096  # the 7B layout
    assert "max_position_embeddings" not in alibi  # the 13B layout
    assert "auto_map" not in rope
    assert AutoModelForCausalLM.from_pretrained(tiny_baichuan_dir).config.position_embedding_type == "rope"
    assert (
        AutoModelForCausalLM.from_pretrained(tiny_baichuan_alibi_dir).config.position_embedding_type
        == "alibi"
    )


def test_llama_tokenizer_is_llama_style(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tokenizer("你好")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1  # Llama adds BOS
    assert tokenizer.convert_ids_to_tokens(ids[1]).startswith("▁")  # and a dummy-prefix space
    assert tokenizer.decode(ids, skip_special_tokens=True) == "你好"
    assert tokenizer.model_max_length == 4096
    generation = json.loads((tiny_llama_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


def test_turn_tokens(tiny_baichuan_dir: Path, baichuan) -> None:
    model, tokenizer = baichuan
    generation = json.loads((tiny_baichuan_dir / "generation_config.json").read_text())
    assert (generation["user_token_id"], generation["assistant_token_id"]) == (USER, ASSISTANT)
    for key in ["max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"]:
        assert key in generation
    assert (model.generation_config.user_token_id, model.generation_config.assistant_token_id) == (
        USER,
        ASSISTANT,
    )
    assert tokenizer.convert_ids_to_tokens([USER, ASSISTANT]) == ["<reserved_195>", "<reserved_196>"]
    assert tokenizer.decode([USER, ASSISTANT]) == "<reserved_195><reserved_196>"
    # Reserved symbols are whole pieces even inside text.
    assert tokenizer.encode("<reserved_195>") == [USER]


def test_cli_help_and_determinism(tiny_baichuan_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tiny_main(["--help"])
    assert exit_info.value.code == 0
    assert "--arch" in capsys.readouterr().out

    # The CLI with default sizes rebuilds the fixture's model bit for bit: training and weights are seeded.
    tiny_main(["--out", str(tmp_path), "--arch", "baichuan"])
    assert (tmp_path / "tokenizer.model").read_bytes() == (tiny_baichuan_dir / "tokenizer.model").read_bytes()
    rebuilt = load_file(tmp_path / "model.safetensors")
    original = load_file(tiny_baichuan_dir / "model.safetensors")
    assert rebuilt.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(rebuilt[name], tensor), name


# --- build_chat_input ----------------------------------------------------------------------------------------


def _round(
    tokenizer: BaichuanTokenizer, user: str, assistant: str | None = None, *, eos: bool = True
) -> list[int]:
    """One round as the baichuan2 template renders it: an answer in the history ends with EOS, as in training."""
    ids = [USER, *tokenizer.encode(user)]
    if assistant is not None:
        ids += [ASSISTANT, *tokenizer.encode(assistant)] + ([tokenizer.eos_token_id] if eos else [])
    return ids


SYSTEM = "你是孙悟空，说话豪爽。"
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "俺老孙来也！"},
    {"role": "user", "content": "你从哪里来？能不能详细讲讲你的故事，越长越好。"},
    {"role": "assistant", "content": "俺从花果山水帘洞来，一个筋斗十万八千里。"},
    {"role": "user", "content": "你的师父是谁？"},
]


def test_build_chat_input_full_history(baichuan) -> None:
    model, tokenizer = baichuan
    system = tokenizer.encode(SYSTEM)
    expected = (
        system
        + _round(tokenizer, MESSAGES[1]["content"], MESSAGES[2]["content"])
        + _round(tokenizer, MESSAGES[3]["content"], MESSAGES[4]["content"])
        + _round(tokenizer, MESSAGES[5]["content"])
        + [ASSISTANT]
    )
    assert build_chat_input(model, tokenizer, MESSAGES) == expected
    # The system text is plain tokens, first, with no turn marker.
    assert expected[: len(system)] == system and USER not in system
    # A GenerationConfig or the model directory give the same prompt.
    assert build_chat_input(model.generation_config, tokenizer, MESSAGES) == expected
    assert build_chat_input(model.name_or_path, tokenizer, MESSAGES) == expected


def test_build_chat_input_drops_old_rounds(baichuan) -> None:
    model, tokenizer = baichuan
    system = tokenizer.encode(SYSTEM)
    round1 = _round(tokenizer, MESSAGES[1]["content"], MESSAGES[2]["content"])
    round2 = _round(tokenizer, MESSAGES[3]["content"], MESSAGES[4]["content"])
    round3 = _round(tokenizer, MESSAGES[5]["content"])
    assert len(round1) < len(round2)  # the case below needs a short old round behind a long one
    context = model.config.model_max_length

    # Room for system + rounds 2 and 3 but one token short for round 1: round 1 goes.
    budget = len(system) + len(round3) + len(round2) + len(round1) - 1
    ids = build_chat_input(model, tokenizer, MESSAGES, max_new_tokens=context - budget)
    assert ids == system + round2 + round3 + [ASSISTANT]

    # Round 2 does not fit although round 1 alone would: rounds are taken newest first and the first that does
    # not fit ends the history, so round 1 goes too.
    budget = len(system) + len(round3) + len(round1)
    ids = build_chat_input(model, tokenizer, MESSAGES, max_new_tokens=context - budget)
    assert ids == system + round3 + [ASSISTANT]


def test_build_chat_input_keeps_newest_round(baichuan) -> None:
    model, tokenizer = baichuan
    system = tokenizer.encode(SYSTEM)
    message = tokenizer.encode(MESSAGES[5]["content"])
    context = model.config.model_max_length
    # A budget smaller than the newest round alone: it is kept anyway, cut inside its content (its first tokens);
    # the system prompt and the turn tokens survive.
    budget = len(system) + 1 + len(message) + 1 - 3
    ids = build_chat_input(model, tokenizer, MESSAGES, max_new_tokens=context - budget)
    assert ids == [*system, USER, *message[3:], ASSISTANT]
    # Not even the system prompt and the turn tokens fit: refused with the reason, not cut from the left.
    with pytest.raises(ValueError, match="system prompt and the template's headers"):
        build_chat_input(model, tokenizer, MESSAGES, max_new_tokens=context - len(system))


def test_build_chat_input_last_message_from_assistant(baichuan) -> None:
    model, tokenizer = baichuan
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "俺老孙"}]
    # No system message, no trailing assistant token: the prompt continues the assistant's turn.
    assert build_chat_input(model, tokenizer, messages) == _round(tokenizer, "你好", "俺老孙", eos=False)


def test_build_chat_input_errors(baichuan, tiny_llama_dir: Path) -> None:
    model, tokenizer = baichuan
    with pytest.raises(ValueError, match="system message must come first"):
        build_chat_input(
            model, tokenizer, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
        )
    with pytest.raises(ValueError, match="role 'tool'"):
        build_chat_input(model, tokenizer, [{"role": "tool", "content": "a"}])
    with pytest.raises(ValueError, match="user_token_id"):
        build_chat_input(tiny_llama_dir, tokenizer, [{"role": "user", "content": "a"}])


# --- chat ----------------------------------------------------------------------------------------------------


def _greedy_by_hand(model, prompt_ids: list[int], steps: int, eos_token_id: int) -> list[int]:
    """Greedy decoding with full forward passes (no cache): the reference for generate()."""
    ids = list(prompt_ids)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(torch.tensor([ids])).logits[0, -1].argmax().item()
            if next_id == eos_token_id:
                break
            ids.append(next_id)
            new.append(next_id)
    return new


def test_chat_greedy_matches_generate(baichuan, greedy: GenerationConfig) -> None:
    model, tokenizer = baichuan
    messages = MESSAGES[:2]
    reply = chat(model, tokenizer, messages, generation_config=greedy)

    prompt = build_chat_input(model, tokenizer, messages, max_new_tokens=greedy.max_new_tokens)
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=greedy
        )
    new_ids = output[0, len(prompt) :].tolist()
    if new_ids and new_ids[-1] == greedy.eos_token_id:
        new_ids = new_ids[:-1]
    assert new_ids == _greedy_by_hand(model, prompt, greedy.max_new_tokens, eos_token_id=greedy.eos_token_id)
    assert reply == tokenizer.decode(new_ids, skip_special_tokens=True)
    assert len(reply) > 0


def test_chat_stream_yields_growing_prefixes(baichuan, greedy: GenerationConfig) -> None:
    model, tokenizer = baichuan
    messages = MESSAGES[:2]
    full = chat(model, tokenizer, messages, generation_config=greedy)
    parts = list(chat(model, tokenizer, messages, stream=True, generation_config=greedy))
    assert len(parts) >= 2
    for shorter, longer in itertools.pairwise(parts):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    assert parts[-1] == full
