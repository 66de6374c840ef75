"""Tiny random models of the families users bring: Qwen2.5, Qwen3, Llama 3.x, Mistral, Gemma 2/3, Phi-3.

Each builder writes a complete model directory in the layout transformers 5.23's ``save_pretrained`` gives,
from transformers' own config and model classes, 2 layers (Gemma 3: 6) of width 64, with the family's
features on:

    qwen2    Qwen2.5-0.5B-Instruct: q/k/v biases, tied embeddings, GQA, vocabulary padded past the tokenizer
    qwen3    Qwen3-0.6B: q_norm/k_norm, head_dim 128 (not hidden/heads), tied embeddings, <think> tokens
    llama3   Llama-3.2-1B-Instruct: rope_type "llama3" (scaled to matter within 64 tokens), tied embeddings
    mistral  Mistral-7B-Instruct: a sliding window of 16 tokens, [INST]/[/INST] control tokens (v0.3 ids)
    gemma2   Gemma-2-2b-it: attention (50) and final (30) logit soft-capping, embeddings scaled by
             sqrt(hidden), query_pre_attn_scalar, a sliding window (16) on every other layer, (1 + w) norms
    gemma3   Gemma-3-1b-it (text only): q/k norms, 5 sliding layers (local RoPE base) then a global one
    phi3     Phi-3.5-mini-instruct: fused qkv_proj and gate_up_proj, <|user|>/<|assistant|>/<|end|> tokens

The tokenizer is of the family's kind, trained here on data/corpus_zh_en.txt (about 2,000 pieces): byte-level
BPE in tokenizer.json alone for qwen2/qwen3 (Qwen2 split, NFC) and llama3 (Llama-3 split); SentencePiece BPE
(tokenizer.model, converted to tokenizer.json) for mistral, gemma2, gemma3 and phi3. The family's special
tokens are registered as special (single ids), and its chat template is written here from the public format:
its output matches the official template's for system/user/assistant conversations, Qwen's tool calls and
Qwen3's <think> handling. Where the official files do not give what a fine-tuning test needs, the choice is
said: every family names a pad token (Llama 3 and Mistral ship none), and Gemma 2 folds a system message into
the first user turn as Gemma 3 does (Gemma 2's own template refuses one).

Files: config.json, model.safetensors (float32), generation_config.json (bos/eos/pad and the official sampling
defaults), tokenizer.json, tokenizer_config.json, chat_template.jinja, and tokenizer.model for SentencePiece.
Deterministic for a seed; all seven build in a few seconds.

CLI:  python -m models.tiny_families OUT_DIR [--family NAME ...] [--seed N]   (writes OUT_DIR/<family>/)
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
import torch

from sft.core.flags import REQUIRED, add_arguments, flag, parse_flags

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS_FILES = (REPO_ROOT / "data" / "corpus_zh_en.txt",)

FAMILIES = ("qwen2", "qwen3", "llama3", "mistral", "gemma2", "gemma3", "phi3")

HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 4
INTERMEDIATE_SIZE = 2 * HIDDEN_SIZE
TOKENIZER_VOCAB = 2000  # requested pieces; SentencePiece may give fewer on a small corpus
SLIDING_WINDOW = 16  # Mistral, Gemma: short enough that a packed test row crosses it
VOCAB_MULTIPLE = 64  # Qwen and Phi-3 pad the embedding past the tokenizer (151936 > 151665, 32064 > 32011)

# The pre-tokenizer splits (regular expressions) of the real tokenizer.json files.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# ----------------------------------------------------------------------------------------------------------
# Chat templates, written here from the public formats (transformers renders them with its jinja environment:
# `tojson`, `raise_exception`, loop controls). Each says what it reproduces and where it is not prefix-stable.
# ----------------------------------------------------------------------------------------------------------

# Qwen2.5: ChatML; a default system prompt when the conversation has none; tools listed in the system turn;
# assistant tool calls as <tool_call> JSON blocks; tool results gathered into one user turn. Prefix-stable.
QWEN2_TEMPLATE = r"""{%- if messages and messages[0].role == 'system' -%}
    {%- set system_text = messages[0].content -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system_text = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' -%}
    {%- set turns = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system_text -}}
{%- if tools -%}
    {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments ' -}}
    {{- 'within <tool_call></tool_call> XML tags:\n<tool_call>\n' -}}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}' -}}
    {{- '\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in turns -%}
    {%- if message.role == 'assistant' and message.tool_calls -%}
        {{- '<|im_start|>assistant' -}}
        {%- if message.content -%}
            {{- '\n' + message.content -}}
        {%- endif -%}
        {%- for call in message.tool_calls -%}
            {%- set call = call.function if call.function is defined else call -%}
            {{- '\n<tool_call>\n{"name": "' + call.name + '", "arguments": ' -}}
            {{- (call.arguments | tojson) + '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or turns[loop.index0 - 1].role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' -}}
        {%- if loop.last or turns[loop.index0 + 1].role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- elif message.role in ('user', 'assistant', 'system') -%}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}
    {%- else -%}
        {{- raise_exception('Unknown role: ' + message.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# Qwen3: ChatML without a default system prompt. The answers after the last real user query (not a tool-result
# wrapper) carry a <think> block, the final one always (empty if it has no reasoning); earlier answers lose
# theirs, so rendering a longer conversation changes an earlier turn: NOT prefix-stable. Reasoning comes from
# `reasoning_content` or from a "<think>...</think>" inside the content. enable_thinking=false closes an empty
# <think> block in the generation prompt.
QWEN3_TEMPLATE = r"""{%- set has_system = messages and messages[0].role == 'system' -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if has_system -%}
        {{- messages[0].content + '\n\n' -}}
    {%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments ' -}}
    {{- 'within <tool_call></tool_call> XML tags:\n<tool_call>\n' -}}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}' -}}
    {{- '\n</tool_call><|im_end|>\n' -}}
{%- elif has_system -%}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' -}}
{%- endif -%}
{%- set query = namespace(index=messages | length - 1, searching=true) -%}
{%- for message in messages | reverse -%}
    {%- set wrapped = message.content is string and message.content.startswith('<tool_response>')
                      and message.content.endswith('</tool_response>') -%}
    {%- if query.searching and message.role == 'user' and message.content is string and not wrapped -%}
        {%- set query.index = messages | length - 1 - loop.index0 -%}
        {%- set query.searching = false -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {%- set content = message.content if message.content is string else '' -%}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {%- set reasoning = '' -%}
        {%- if message.reasoning_content is string -%}
            {%- set reasoning = message.reasoning_content -%}
        {%- elif '</think>' in content -%}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n') -%}
            {%- set reasoning = reasoning.split('<think>')[-1].lstrip('\n') -%}
            {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
        {%- endif -%}
        {%- if loop.index0 > query.index and (loop.last or reasoning) -%}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' -}}
            {{- content.lstrip('\n') -}}
        {%- else -%}
            {{- '<|im_start|>assistant\n' + content -}}
        {%- endif -%}
        {%- for call in message.tool_calls or [] -%}
            {%- if not loop.first or content -%}
                {{- '\n' -}}
            {%- endif -%}
            {%- set call = call.function if call.function is defined else call -%}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' -}}
            {{- call.arguments if call.arguments is string else (call.arguments | tojson) -}}
            {{- '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- elif message.role != 'system' -%}
        {{- raise_exception('Unknown role: ' + message.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\n\n</think>\n\n' -}}
    {%- endif -%}
{%- endif -%}
"""

# Llama 3.1 (3.2 and 3.3 the same for plain conversations): a system header always, with the knowledge-cutoff
# and date lines (`date_string`, default "26 Jul 2024"; Llama 3.2's own template takes today's date instead);
# contents trimmed. Prefix-stable. Tools are not rendered here (refused, not dropped).
LLAMA3_TEMPLATE = r"""{{- bos_token -}}
{%- if tools -%}
    {{- raise_exception('This template renders no tools.') -}}
{%- endif -%}
{%- set today = date_string if date_string is defined else '26 Jul 2024' -%}
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_text = messages[0].content | trim -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system_text = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' -}}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + today + '\n\n' + system_text + '<|eot_id|>' -}}
{%- for message in turns -%}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' -}}
    {{- (message.content | trim) + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

# Mistral-7B-Instruct v0.1/v0.2 (revised templates): the system message goes in front of the FIRST user
# message; roles alternate; an answer ends with </s>. Prefix-stable. (v0.3's template instead puts the system
# message into the last user message, and only when that message is the last one: not prefix-stable, and
# absent from every training conversation that ends with an answer.)
MISTRAL_TEMPLATE = r"""{{- bos_token -}}
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_prefix = messages[0].content + '\n\n' -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system_prefix = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('After an optional system message, roles must alternate user/assistant.') -}}
    {%- endif -%}
    {%- if message.role == 'user' -%}
        {{- ' [INST] ' + (system_prefix if loop.first else '') + message.content + ' [/INST]' -}}
    {%- elif message.role == 'assistant' -%}
        {{- ' ' + message.content + eos_token -}}
    {%- else -%}
        {{- raise_exception('Only user and assistant roles after an optional system message.') -}}
    {%- endif -%}
{%- endfor -%}
"""

# Gemma 3 (used for Gemma 2 too): no system role, a system message is folded into the first user turn followed
# by a blank line; the assistant is "model"; contents trimmed. Prefix-stable.
GEMMA_TEMPLATE = r"""{{- bos_token -}}
{%- if messages and messages[0].role == 'system' -%}
    {%- set first_prefix = messages[0].content + '\n\n' -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set first_prefix = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('After an optional system message, roles must alternate user/assistant.') -}}
    {%- endif -%}
    {%- set role = 'model' if message.role == 'assistant' else message.role -%}
    {{- '<start_of_turn>' + role + '\n' + (first_prefix if loop.first else '') -}}
    {{- (message.content | trim) + '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""

# Phi-3 / Phi-3.5-mini-instruct: <|role|>, newline, content, <|end|>, newline; an empty system message is
# left out; no BOS; without a generation prompt the rendering ends with the eos token (<|endoftext|>).
# Prefix-stable up to that final eos. The real tokenizer's turn tokens swallow the whitespace after them
# (rstrip), so the newlines written here never become tokens.
PHI3_TEMPLATE = r"""{%- for message in messages -%}
    {%- if message.role == 'system' -%}
        {%- if message.content -%}
            {{- '<|system|>\n' + message.content + '<|end|>\n' -}}
        {%- endif -%}
    {%- elif message.role in ('user', 'assistant') -%}
        {{- '<|' + message.role + '|>\n' + message.content + '<|end|>\n' -}}
    {%- else -%}
        {{- raise_exception('Unknown role: ' + message.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\n' -}}
{%- else -%}
    {{- eos_token -}}
{%- endif -%}
"""


@dataclass(frozen=True)
class SpecialToken:
    """An added token as the real tokenizer declares it."""

    content: str
    special: bool = True
    rstrip: bool = False  # Phi-3's turn tokens swallow the whitespace after them


@dataclass(frozen=True)
class FamilySpec:
    """What makes a tiny model of one family: tokenizer, special tokens, template, generation defaults."""

    architecture: str
    tokenizer_kind: str  # "qwen2-bpe" | "llama3-bpe" | "sentencepiece"
    chat_template: str
    bos: str | None
    eos: str  # the tokenizer's eos_token
    pad: str
    stop_tokens: tuple[str, ...]  # generation_config.eos_token_id, in the official order
    added_tokens: tuple[SpecialToken, ...] = ()  # after the learned vocabulary, in this order
    add_bos_token: bool = False
    model_max_length: int = 32768
    sampling: dict = field(default_factory=dict)  # the official generation_config.json's sampling defaults
    # SentencePiece only: ids 0..3 by role, and pieces the model itself holds right after them.
    sp_ids: dict = field(default_factory=dict)
    sp_control: tuple[str, ...] = ()  # control pieces (Mistral's [INST]): SentencePiece never emits them
    sp_user_defined: tuple[str, ...] = ()  # user-defined pieces (Gemma's turn markers): matched in text
    sp_dummy_prefix: bool = True
    tokenizer_class: str = ""  # SentencePiece only: LlamaTokenizer | GemmaTokenizer


_QWEN_BASE_TOKENS = (
    SpecialToken("<|endoftext|>"),
    SpecialToken("<|im_start|>"),
    SpecialToken("<|im_end|>"),
    SpecialToken("<tool_call>", special=False),
    SpecialToken("</tool_call>", special=False),
)
_LLAMA3_TOKENS = tuple(
    SpecialToken(t)
    for t in (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    )
)
_PHI3_TOKENS = (
    SpecialToken("<|endoftext|>"),
    *(
        SpecialToken(t, rstrip=True)
        for t in (
            "<|assistant|>",
            "<|placeholder1|>",
            "<|placeholder2|>",
            "<|placeholder3|>",
            "<|placeholder4|>",
            "<|system|>",
            "<|end|>",
            "<|placeholder5|>",
            "<|placeholder6|>",
            "<|user|>",
        )
    ),
)
_GEMMA_SP = {
    "sp_ids": {"pad": (0, "<pad>"), "eos": (1, "<eos>"), "bos": (2, "<bos>"), "unk": (3, "<unk>")},
    "sp_control": ("<mask>",),
    "sp_user_defined": ("<start_of_turn>", "<end_of_turn>"),
    "sp_dummy_prefix": False,
    "tokenizer_class": "GemmaTokenizer",
}
_LLAMA_SP_IDS = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>")}

SPECS: dict[str, FamilySpec] = {
    "qwen2": FamilySpec(
        architecture="Qwen2ForCausalLM",
        tokenizer_kind="qwen2-bpe",
        chat_template=QWEN2_TEMPLATE,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
        added_tokens=_QWEN_BASE_TOKENS,
        model_max_length=131072,
        sampling={
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
            "repetition_penalty": 1.05,
        },
    ),
    "qwen3": FamilySpec(
        architecture="Qwen3ForCausalLM",
        tokenizer_kind="qwen2-bpe",
        chat_template=QWEN3_TEMPLATE,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
        added_tokens=(
            *_QWEN_BASE_TOKENS,
            SpecialToken("<tool_response>", special=False),
            SpecialToken("</tool_response>", special=False),
            SpecialToken("<think>", special=False),
            SpecialToken("</think>", special=False),
        ),
        model_max_length=131072,
        sampling={"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20},
    ),
    "llama3": FamilySpec(
        architecture="LlamaForCausalLM",
        tokenizer_kind="llama3-bpe",
        chat_template=LLAMA3_TEMPLATE,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",  # Meta's files name no pad token; this one exists for it
        stop_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        added_tokens=_LLAMA3_TOKENS,
        add_bos_token=True,
        model_max_length=131072,
        sampling={"do_sample": True, "temperature": 0.6, "top_p": 0.9},
    ),
    "mistral": FamilySpec(
        architecture="MistralForCausalLM",
        tokenizer_kind="sentencepiece",
        chat_template=MISTRAL_TEMPLATE,
        bos="<s>",
        eos="</s>",
        pad="<unk>",  # Mistral's files name no pad token
        stop_tokens=("</s>",),
        add_bos_token=True,
        sp_ids=_LLAMA_SP_IDS,
        sp_control=("[INST]", "[/INST]"),
        tokenizer_class="LlamaTokenizer",
    ),
    "gemma2": FamilySpec(
        architecture="Gemma2ForCausalLM",
        tokenizer_kind="sentencepiece",
        chat_template=GEMMA_TEMPLATE,
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        stop_tokens=("<eos>", "<end_of_turn>"),
        add_bos_token=True,
        model_max_length=8192,
        **_GEMMA_SP,
    ),
    "gemma3": FamilySpec(
        architecture="Gemma3ForCausalLM",
        tokenizer_kind="sentencepiece",
        chat_template=GEMMA_TEMPLATE,
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        stop_tokens=("<eos>", "<end_of_turn>"),
        add_bos_token=True,
        sampling={"do_sample": True, "top_k": 64, "top_p": 0.95},
        **_GEMMA_SP,
    ),
    "phi3": FamilySpec(
        architecture="Phi3ForCausalLM",
        tokenizer_kind="sentencepiece",
        chat_template=PHI3_TEMPLATE,
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        stop_tokens=("<|end|>", "<|assistant|>", "<|endoftext|>"),
        added_tokens=_PHI3_TOKENS,
        add_bos_token=False,
        model_max_length=131072,
        sp_ids=_LLAMA_SP_IDS,
        tokenizer_class="LlamaTokenizer",
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------


def _corpus_lines(corpus_files: Sequence[str | Path] | None) -> list[str]:
    lines = []
    for file in [Path(f) for f in (corpus_files or DEFAULT_CORPUS_FILES)]:
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer corpus file {file} does not exist; pass existing text files.")
        lines.extend(file.read_text(encoding="utf-8").splitlines())
    # The role names the templates write at the start of a line, so that they are one or two tokens.
    return [*lines, *[role for role in ("system", "user", "assistant", "tool") for _ in range(20)]]


def _train_byte_level_bpe(lines: list[str], *, split: str, nfc: bool) -> tuple[dict[str, int], list[tuple]]:
    """Train a byte-level BPE model (GPT-2 byte alphabet, the given split); return its vocab and merges."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def _added(token: SpecialToken):
    from tokenizers import AddedToken

    return AddedToken(token.content, special=token.special, normalized=False, rstrip=token.rstrip)


def _add_tokens_in_order(tokenizer, tokens: Sequence[SpecialToken]) -> None:
    """Append the added tokens one by one, so each gets the next id in the family's order."""
    for token in tokens:
        tokenizer.add_tokens([_added(token)], special_tokens=token.special)


def _qwen_tokenizer(spec: FamilySpec, lines: list[str]):
    """Qwen2Tokenizer (the class Qwen's tokenizer_config names) over a byte-level BPE trained here."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = _train_byte_level_bpe(lines, split=QWEN2_SPLIT, nfc=True)
    # No special token through the constructor: it would add them in its own order.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token=None, pad_token=None)
    _add_tokens_in_order(tokenizer, spec.added_tokens)
    return tokenizer


def _llama3_tokenizer(spec: FamilySpec, lines: list[str]):
    """A PreTrainedTokenizerFast as Llama 3 ships it: byte-level BPE with ignore_merges, BOS added by the
    post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _train_byte_level_bpe(lines, split=LLAMA3_SPLIT, nfc=False)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    for token in spec.added_tokens:
        backend.add_special_tokens([_added(token)])
    bos_id = backend.token_to_id(spec.bos)
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{spec.bos}:0 $A:0",
                pair=f"{spec.bos}:0 $A:0 {spec.bos}:1 $B:1",
                special_tokens=[(spec.bos, bos_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _train_sentencepiece(spec: FamilySpec, corpus_files: Sequence[str | Path] | None, seed: int) -> bytes:
    """Train a SentencePiece BPE model (byte fallback, the family's id layout) and return its proto."""
    files = [Path(f) for f in (corpus_files or DEFAULT_CORPUS_FILES)]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer corpus file {file} does not exist; pass existing text files.")
    ids = {f"{role}_id": -1 for role in ("pad", "unk", "bos", "eos")}
    pieces = {}
    for role, (token_id, piece) in spec.sp_ids.items():
        ids[f"{role}_id"] = token_id
        pieces[f"{role}_piece"] = piece
    spm.set_random_generator_seed(seed)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=[str(f) for f in files],
        model_writer=proto,
        model_type="bpe",
        vocab_size=TOKENIZER_VOCAB,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        **ids,
        **pieces,
        control_symbols=list(spec.sp_control),
        user_defined_symbols=list(spec.sp_user_defined),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=spec.sp_dummy_prefix,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        num_threads=1,  # determinism
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return proto.getvalue()


def _sentencepiece_tokenizer(spec: FamilySpec, out: Path, corpus_files, seed: int):
    """The family's SentencePiece model in `out`/tokenizer.model, loaded by the class its files name (which
    transformers 5.23 converts to a fast tokenizer), plus the tokens the real files add after the model's."""
    import transformers

    (out / "tokenizer.model").write_bytes(_train_sentencepiece(spec, corpus_files, seed))
    tokenizer_class = getattr(transformers, spec.tokenizer_class)
    tokenizer = tokenizer_class.from_pretrained(str(out))
    _add_tokens_in_order(tokenizer, spec.added_tokens)
    # Pieces the model holds whose role is special in the real files (Gemma's turn markers are user-defined
    # pieces in its tokenizer.model, special in its tokenizer.json).
    for piece in (*spec.sp_control, *spec.sp_user_defined):
        tokenizer.add_tokens([_added(SpecialToken(piece))], special_tokens=True)
    return tokenizer


def build_tokenizer(family: str, out_dir: str | Path, *, seed: int = 0, corpus_files=None):
    """Train and save the family's tokenizer (with its chat template) into `out_dir`; return it."""
    spec = _spec(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.tokenizer_kind == "sentencepiece":
        tokenizer = _sentencepiece_tokenizer(spec, out, corpus_files, seed)
    elif spec.tokenizer_kind == "qwen2-bpe":
        tokenizer = _qwen_tokenizer(spec, _corpus_lines(corpus_files))
    else:
        tokenizer = _llama3_tokenizer(spec, _corpus_lines(corpus_files))
    # Roles by name: the ids all exist by now.
    tokenizer.bos_token = spec.bos
    tokenizer.eos_token = spec.eos
    tokenizer.pad_token = spec.pad
    if spec.tokenizer_kind == "sentencepiece":
        tokenizer.add_bos_token = spec.add_bos_token
        tokenizer.add_eos_token = False
    tokenizer.model_max_length = spec.model_max_length
    tokenizer.chat_template = spec.chat_template
    tokenizer.save_pretrained(out)

    # transformers 5.23 saves its loading flags among the init kwargs; they describe this run, not the files.
    config_path = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "vocab_file"):
        tokenizer_config.pop(key, None)
    _write_json(config_path, tokenizer_config)
    _check_special_tokens(family, spec, out)
    return tokenizer


def _check_special_tokens(family: str, spec: FamilySpec, out: Path) -> None:
    """Reload the saved tokenizer and check that every token the family declares is one id, whole in text."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(out))
    declared = [t.content for t in spec.added_tokens] + [*spec.sp_control, *spec.sp_user_defined]
    declared += [t for t in (spec.bos, spec.eos, spec.pad) if t is not None]
    for token in declared:
        ids = reloaded.encode(token, add_special_tokens=False)
        if len(ids) != 1 or reloaded.convert_ids_to_tokens(ids[0]) != token:
            raise RuntimeError(f"tiny {family} tokenizer: {token!r} encodes to {ids}, not one id of its own")


# ----------------------------------------------------------------------------------------------------------
# Configs and weights
# ----------------------------------------------------------------------------------------------------------


def _padded(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _config(family: str, tokenizer):
    """The family's transformers config at tiny size, special ids from the tokenizer."""
    import transformers

    spec = _spec(family)
    n_tokens = len(tokenizer)
    ids = {
        "bos_token_id": tokenizer.convert_tokens_to_ids(spec.bos) if spec.bos else None,
        "eos_token_id": tokenizer.convert_tokens_to_ids(spec.eos),
        "pad_token_id": tokenizer.convert_tokens_to_ids(spec.pad),
    }
    common = {
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        **ids,
    }
    if family == "qwen2":
        # Qwen2.5-0.5B: q/k/v biases are built in; tied; GQA; RoPE base 1e6.
        ids["bos_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        return transformers.Qwen2Config(
            **{**common, **ids},
            vocab_size=_padded(n_tokens),
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=False,
        )
    if family == "qwen3":
        # Qwen3-0.6B: q_norm/k_norm are built in; head_dim 128 whatever the width (every dense Qwen3 has 128,
        # and transformers' GGUF reader assumes it: it does not read qwen3.attention.key_length).
        ids["bos_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        return transformers.Qwen3Config(
            **{**common, **ids},
            vocab_size=_padded(n_tokens),
            num_key_value_heads=2,
            head_dim=128,
            max_position_embeddings=40960,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        )
    if family == "llama3":
        # Llama-3.2-1B's rope_type "llama3" with its factor 32 and low/high frequency factors 1/4, but an
        # original context of 128 (not 8192): frequencies with a wavelength over 32 tokens are rescaled, so
        # the scaling changes logits within a 64-token test sequence. Tied embeddings as the 1B/3B models.
        return transformers.LlamaConfig(
            **common,
            vocab_size=n_tokens,
            num_key_value_heads=2,
            head_dim=HIDDEN_SIZE // NUM_HEADS,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        )
    if family == "mistral":
        # Mistral-7B v0.1: sliding-window attention (4096 there, 16 here); GQA.
        return transformers.MistralConfig(
            **common,
            vocab_size=n_tokens,
            num_key_value_heads=2,
            head_dim=HIDDEN_SIZE // NUM_HEADS,
            max_position_embeddings=4096,
            sliding_window=SLIDING_WINDOW,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
    if family == "gemma2":
        # Gemma-2-2b: head_dim 256 = query_pre_attn_scalar (transformers' GGUF reader and llama.cpp assume
        # both), soft-capping 50/30, sliding window on every other layer (the first), tied, gelu-tanh MLP.
        return transformers.Gemma2Config(
            **common,
            vocab_size=n_tokens,
            num_key_value_heads=2,
            head_dim=256,
            query_pre_attn_scalar=256,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=8192,
            rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )
    if family == "gemma3":
        # Gemma-3-1b (text only): q/k norms, head_dim 256 = query_pre_attn_scalar, one KV head, local RoPE
        # base 10k on the sliding layers and 1M on the global one. SIX layers, not two: Gemma 3 is 5 sliding
        # layers then 1 global, and neither GGUF nor its readers can say otherwise (llama.cpp and transformers'
        # GGUF loader assume that pattern), so a 2-layer [sliding, global] model could not be exported.
        return transformers.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 6},
            vocab_size=n_tokens,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )
    if family == "phi3":
        # Phi-3.5-mini: fused qkv_proj and gate_up_proj are built in; MHA; untied; vocabulary padded.
        return transformers.Phi3Config(
            **common,
            vocab_size=_padded(n_tokens),
            num_key_value_heads=NUM_HEADS,
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-5,
            sliding_window=None,
            tie_word_embeddings=False,
        )
    raise AssertionError(family)


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter from a seeded generator so the weights depend on `seed` only.

    Norms scale by 1: weight 1, or 0 in Gemma's (1 + w) norms (a weight of 1 there doubles q and k after
    Gemma 3's q/k norms and makes attention so peaked that f16 rounding moves logits by 0.1). Other tensors
    N(0, 0.02), except the output head -- the embedding where tied -- at std hidden^-0.5: unit-scale logits
    keep a tiny model trainable by LoRA (with 0.02 they are near-uniform and the loss barely moves).
    """
    generator = torch.Generator().manual_seed(seed)
    head = model.get_output_embeddings().weight
    unit_norm = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.fill_(unit_norm)
            elif param is head:
                param.copy_(torch.randn(param.shape, generator=generator) * param.shape[1] ** -0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _spec(family: str) -> FamilySpec:
    if family not in SPECS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return SPECS[family]


def build_tiny_family(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    corpus_files: Sequence[str | Path] | None = None,
) -> Path:
    """Write a tiny random model directory of `family` (one of FAMILIES) and return its path.

    Args:
        family: "qwen2", "qwen3", "llama3", "mistral", "gemma2", "gemma3" or "phi3".
        out_dir: Directory to write (created; files with the same names are overwritten).
        seed: Seed of the weights and of the SentencePiece training (BPE training is deterministic).
        corpus_files: Tokenizer training text; default the repo's data/corpus_zh_en.txt.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = _spec(family)
    out = Path(out_dir)
    tokenizer = build_tokenizer(family, out, seed=seed, corpus_files=corpus_files)
    config = _config(family, tokenizer)
    config.architectures = [spec.architecture]

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # every parameter is redrawn below
    if type(model).__name__ != spec.architecture:
        raise RuntimeError(f"tiny {family}: built {type(model).__name__}, expected {spec.architecture}")
    _init_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in spec.stop_tokens],
        pad_token_id=config.pad_token_id,
        **spec.sampling,
    )
    model.save_pretrained(out)
    logger.info("wrote tiny %s (%s, %d tokens) to %s", family, spec.architecture, len(tokenizer), out)
    return out


def build_all(out_dir: str | Path, families: Sequence[str] = FAMILIES, *, seed: int = 0) -> dict[str, Path]:
    """Build each family into `out_dir`/<family>; return family -> directory."""
    return {family: build_tiny_family(family, Path(out_dir) / family, seed=seed) for family in families}


@dataclass
class FamiliesArgs:
    """The flags of ``python -m models.tiny_families``."""

    out_dir: Path = flag(REQUIRED, "Parent directory; each family goes to OUT_DIR/<family>.", positional=True)
    family: list[str] = flag(list(FAMILIES), "Families to build (default: all).", choices=FAMILIES)
    seed: int = flag(0, "Seed of weights and tokenizer training.")


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: write tiny model directories of the chosen families."""
    parser = argparse.ArgumentParser(
        prog="python -m models.tiny_families",
        description="Write tiny random model directories (config, weights, trained tokenizer with the "
        "family's special tokens and chat template, generation config) of the families users bring.",
    )
    args = parse_flags(add_arguments(parser, FamiliesArgs), FamiliesArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    build_all(args.out_dir, args.family, seed=args.seed)


if __name__ == "__main__":
    main()
