"""Tiny models of the families users bring (models/tiny_families.py): they build, load through the Auto
classes, run, carry their family's distinguishing feature (checked on the weights or the logits, not only on
the config), and their chat templates render hand-written expected strings whose special tokens are one id.

All seven directories are built once for the session (tests/conftest.py, a few seconds).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from models.tiny_families import FAMILIES, SLIDING_WINDOW, build_tiny_family, main

SYSTEM_CHAT = [
    {"role": "system", "content": "You are Li Bai."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": " I am a poet. "},  # the spaces show which templates trim
]

# The renderings of SYSTEM_CHAT, written out by hand from the public formats.
EXPECTED = {
    "qwen2": (
        "<|im_start|>system\nYou are Li Bai.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi there<|im_end|>\n"
        "<|im_start|>user\nWho are you?<|im_end|>\n"
        "<|im_start|>assistant\n I am a poet. <|im_end|>\n"
    ),
    # The last answer gets an (empty) thinking block, the earlier one does not.
    "qwen3": (
        "<|im_start|>system\nYou are Li Bai.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi there<|im_end|>\n"
        "<|im_start|>user\nWho are you?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n I am a poet. <|im_end|>\n"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are Li Bai.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nI am a poet.<|eot_id|>"
    ),
    "mistral": (
        "<s> [INST] You are Li Bai.\n\nHello [/INST] Hi there</s> [INST] Who are you? [/INST]  I am a poet. </s>"
    ),
    "gemma2": (
        "<bos><start_of_turn>user\nYou are Li Bai.\n\nHello<end_of_turn>\n"
        "<start_of_turn>model\nHi there<end_of_turn>\n"
        "<start_of_turn>user\nWho are you?<end_of_turn>\n"
        "<start_of_turn>model\nI am a poet.<end_of_turn>\n"
    ),
    "phi3": (
        "<|system|>\nYou are Li Bai.<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n"
        "<|user|>\nWho are you?<|end|>\n<|assistant|>\n I am a poet. <|end|>\n<|endoftext|>"
    ),
}
EXPECTED["gemma3"] = EXPECTED["gemma2"]

# The special tokens each rendering must hold as single ids.
TURN_TOKENS = {
    "qwen2": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": ("<s>", "[INST]", "[/INST]", "</s>"),
    "gemma2": ("<bos>", "<start_of_turn>", "<end_of_turn>"),
    "gemma3": ("<bos>", "<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CHAT = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": "22°C"},
    {"role": "assistant", "content": "It is 22°C in Paris."},
]
TOOLS_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
TOOL_TURNS = (
    "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\n22°C\n</tool_response><|im_end|>\n"
)


@pytest.fixture(scope="module")
def family_dirs(tiny_family_dirs: dict[str, Path]) -> dict[str, Path]:
    """family -> a tiny model directory (the session's, tests/conftest.py); read-only by convention."""
    return tiny_family_dirs


@pytest.fixture(scope="module")
def tokenizers(family_dirs: dict[str, Path]) -> dict:
    return {family: AutoTokenizer.from_pretrained(path) for family, path in family_dirs.items()}


def load(path: Path, **config_changes) -> torch.nn.Module:
    """The model in eval mode, optionally with config fields changed (same weights)."""
    config = AutoConfig.from_pretrained(path)
    for key, value in config_changes.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(path, config=config).eval()


def logits(model: torch.nn.Module, length: int = 48) -> torch.Tensor:
    ids = torch.arange(10, 10 + length).unsqueeze(0)  # (1, T) ordinary tokens of every vocabulary
    with torch.no_grad():
        return model(ids).logits[0]  # (T, V)


def tensor_names(path: Path) -> set[str]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_and_runs(family: str, family_dirs: dict[str, Path], tokenizers: dict) -> None:
    path = family_dirs[family]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (path / name).is_file(), name
    assert (path / "tokenizer.model").is_file() == (family in ("mistral", "gemma2", "gemma3", "phi3"))
    model = load(path)
    config = model.config
    assert type(model).__name__ == config.architectures[0]
    assert (config.num_hidden_layers, config.hidden_size) == (6 if family == "gemma3" else 2, 64)

    tokenizer = tokenizers[family]
    ids = tokenizer("Hello world, 你好", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(out).all()
    assert 0.5 < out.std() < 5  # unit-scale logits, not near-uniform ones
    assert len(tokenizer) <= config.vocab_size

    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["pad_token_id"] == tokenizer.pad_token_id == config.pad_token_id
    assert tokenizer.eos_token_id in generation["eos_token_id"]
    assert generation["bos_token_id"] == config.bos_token_id


def test_qwen2_biases_and_tied_head(family_dirs: dict[str, Path]) -> None:
    path = family_dirs["qwen2"]
    names = tensor_names(path)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{proj}.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    assert "lm_head.weight" not in names  # tied, as Qwen2.5-0.5B/1.5B/3B
    model = load(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size > len(
        AutoTokenizer.from_pretrained(path)
    )


def test_qwen3_qk_norm_and_head_dim(family_dirs: dict[str, Path]) -> None:
    path = family_dirs["qwen3"]
    names = tensor_names(path)
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= names
    config = AutoConfig.from_pretrained(path)
    assert config.head_dim == 128 != config.hidden_size // config.num_attention_heads
    assert config.tie_word_embeddings and "lm_head.weight" not in names


def test_llama3_rope_scaling_changes_logits(family_dirs: dict[str, Path]) -> None:
    path = family_dirs["llama3"]
    config = AutoConfig.from_pretrained(path)
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.tie_word_embeddings
    scaled = logits(load(path))
    plain = logits(load(path, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    torch.testing.assert_close(scaled[0], plain[0])  # position 0 is not rotated
    assert (scaled[8:] - plain[8:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_changes_logits_past_the_window(family: str, family_dirs: dict[str, Path]) -> None:
    path = family_dirs[family]
    config = AutoConfig.from_pretrained(path)
    assert config.sliding_window == SLIDING_WINDOW
    if family == "gemma2":  # every other layer
        assert config.layer_types == ["sliding_attention", "full_attention"]
    if family == "gemma3":  # Gemma 3's pattern: 5 sliding, 1 global
        assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    windowed = logits(load(path), length=3 * SLIDING_WINDOW)
    full = logits(load(path, sliding_window=4096), length=3 * SLIDING_WINDOW)
    torch.testing.assert_close(windowed[:SLIDING_WINDOW], full[:SLIDING_WINDOW])
    assert (windowed[SLIDING_WINDOW + 1 :] - full[SLIDING_WINDOW + 1 :]).abs().max() > 1e-4


def test_gemma2_soft_capping_and_scaled_embeddings(family_dirs: dict[str, Path]) -> None:
    path = family_dirs["gemma2"]
    config = AutoConfig.from_pretrained(path)
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (50.0, 30.0)
    assert config.query_pre_attn_scalar == 256 and config.tie_word_embeddings
    model = load(path)
    assert model.model.embed_tokens.embed_scale == pytest.approx(config.hidden_size**0.5)
    capped = logits(model)
    assert capped.abs().max() < 30
    uncapped = logits(load(path, final_logit_softcapping=None))
    assert not torch.allclose(capped, uncapped)
    torch.testing.assert_close(capped, 30 * torch.tanh(uncapped / 30))


def test_gemma3_qk_norm_and_local_rope(family_dirs: dict[str, Path]) -> None:
    path = family_dirs["gemma3"]
    names = tensor_names(path)
    assert "model.layers.0.self_attn.q_norm.weight" in names
    config = AutoConfig.from_pretrained(path)
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1000000.0


def test_phi3_fused_projections(family_dirs: dict[str, Path]) -> None:
    path = family_dirs["phi3"]
    names = tensor_names(path)
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(n.endswith((".q_proj.weight", ".gate_proj.weight", ".up_proj.weight")) for n in names)
    model = load(path)
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.shape == (3 * 64, 64)
    assert layer.mlp.gate_up_proj.weight.shape == (2 * model.config.intermediate_size, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_expected_string(family: str, tokenizers: dict) -> None:
    tokenizer = tokenizers[family]
    rendered = tokenizer.apply_chat_template(SYSTEM_CHAT, tokenize=False)
    assert rendered == EXPECTED[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_turn_tokens_are_single_ids(family: str, tokenizers: dict) -> None:
    tokenizer = tokenizers[family]
    chat = SYSTEM_CHAT
    if family == "qwen3":  # a reasoning turn, so that <think> occurs
        chat = [*SYSTEM_CHAT[:-1], {**SYSTEM_CHAT[-1], "reasoning_content": "Who am I?"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    for token in TURN_TOKENS[family]:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id != tokenizer.unk_token_id, token
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
        assert ids.count(token_id) == rendered.count(token) > 0, token
    if family == "phi3":
        # Phi-3's turn tokens are rstrip tokens: they swallow the whitespace after them (the newlines the
        # template writes, and here an answer's leading space), as in the real tokenizer.
        assert tokenizer.decode(ids) == re.sub(r"(<\|[a-z]+\|>)\s+", r"\1", rendered)
    else:
        assert tokenizer.decode(ids) == rendered


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_stability(family: str, tokenizers: dict) -> None:
    """A conversation cut after an answer renders as a prefix of the whole one -- except Qwen3 (the thinking
    block moves to the last answer) and Phi-3 (an eos token ends every rendering without a generation prompt).
    Cut after a question, with the generation prompt, it is a prefix for every family."""
    tokenizer = tokenizers[family]
    full = tokenizer.apply_chat_template(SYSTEM_CHAT, tokenize=False)
    after_answer = tokenizer.apply_chat_template(SYSTEM_CHAT[:3], tokenize=False)
    assert full.startswith(after_answer) == (family not in ("qwen3", "phi3"))
    after_question = tokenizer.apply_chat_template(
        SYSTEM_CHAT[:4], tokenize=False, add_generation_prompt=True
    )
    assert full.startswith(after_question)


def test_qwen2_default_system_prompt(tokenizers: dict) -> None:
    rendered = tokenizers["qwen2"].apply_chat_template(
        SYSTEM_CHAT[1:2], tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen2_tool_calls(tokenizers: dict) -> None:
    tokenizer = tokenizers["qwen2"]
    rendered = tokenizer.apply_chat_template(TOOL_CHAT, tools=[WEATHER_TOOL], tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n"
        + TOOLS_BLOCK
        + TOOL_TURNS
        + "<|im_start|>assistant\nIt is 22°C in Paris.<|im_end|>\n"
    )
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<tool_call>")) == 3  # two in the instructions, one call


def test_qwen3_tool_calls(tokenizers: dict) -> None:
    rendered = tokenizers["qwen3"].apply_chat_template(TOOL_CHAT, tools=[WEATHER_TOOL], tokenize=False)
    assert rendered == (
        "<|im_start|>system\n"
        + TOOLS_BLOCK
        + TOOL_TURNS
        + "<|im_start|>assistant\n<think>\n\n</think>\n\nIt is 22°C in Paris.<|im_end|>\n"
    )


def test_qwen3_thinking(tokenizers: dict) -> None:
    tokenizer = tokenizers["qwen3"]
    chat = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2", "reasoning_content": "Add them."},
        {"role": "user", "content": "Times 3?"},
        {"role": "assistant", "content": "<think>\n2 times 3.\n</think>\n\n6"},
    ]
    # The earlier answer loses its reasoning; the last one keeps the reasoning written inside its content.
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\nTimes 3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2 times 3.\n</think>\n\n6<|im_end|>\n"
    )
    # A reasoning answer after the last question keeps its block even when it is not the last message.
    assert tokenizer.apply_chat_template(chat[:2], tokenize=False) == (
        "<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n2<|im_end|>\n"
    )
    prompt = "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True) == prompt
    assert (
        tokenizer.apply_chat_template(
            chat[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        == prompt + "<think>\n\n</think>\n\n"
    )


def test_llama3_date_string(tokenizers: dict) -> None:
    rendered = tokenizers["llama3"].apply_chat_template(
        SYSTEM_CHAT[1:2], tokenize=False, add_generation_prompt=True, date_string="07 Dec 2026"
    )
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 07 Dec 2026\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_alternation_is_enforced(family: str, tokenizers: dict) -> None:
    with pytest.raises(Exception, match="alternate"):
        tokenizers[family].apply_chat_template([SYSTEM_CHAT[1], SYSTEM_CHAT[1]], tokenize=False)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])  # one byte-level BPE, one SentencePiece
def test_build_is_deterministic(family: str, family_dirs: dict[str, Path], tmp_path: Path) -> None:
    again = build_tiny_family(family, tmp_path / family)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (again / name).read_bytes() == (family_dirs[family] / name).read_bytes(), name


def test_cli_builds_chosen_families(tmp_path: Path) -> None:
    main([str(tmp_path), "--family", "phi3"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi3"]
    assert (tmp_path / "phi3" / "model.safetensors").is_file()


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny model family 'gpt2'"):
        build_tiny_family("gpt2", tmp_path)
