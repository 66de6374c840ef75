"""The official Baichuan2 chat API, ``build_chat_input()`` and ``chat()``, over the project's own pieces.

Users of the official Baichuan2-Chat files know these two functions; they are kept as a thin layer over
the one implementation of each job: the ``baichuan2`` chat template (``sft.data.templates``, the same
prompts training used), history fitting (``sft.inference.chat.fit_history``: oldest rounds dropped first,
the newest always kept, its message cut from the start inside the template when alone too long, the
system prompt and turn tokens kept) and streamed generation
(``sft.inference.generate.stream_reply``). Turn tokens come from the generation config
(``user_token_id`` / ``assistant_token_id``, 195 / 196 in the official files).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transformers import GenerationConfig, PreTrainedTokenizerBase

from sft.data.templates.baichuan2 import Baichuan2Template
from sft.inference.chat import fit_history
from sft.inference.generate import stream_reply

Message = dict[str, str]


def _resolve(model_or_config: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[GenerationConfig, int]:
    """(generation config, context length) of a model, a GenerationConfig or a model directory."""
    if isinstance(model_or_config, str | Path):
        model_dir = Path(model_or_config)
        if not (model_dir / "generation_config.json").is_file():
            raise FileNotFoundError(
                f"build_chat_input: {model_dir}/generation_config.json not found; pass a local model directory "
                "whose generation_config.json names user_token_id/assistant_token_id (no hub ids)."
            )
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        generation_config = GenerationConfig.from_pretrained(model_dir)
        max_length = config.get("model_max_length") or config.get("max_position_embeddings")
    elif isinstance(model_or_config, GenerationConfig):
        generation_config, max_length = model_or_config, None
    else:  # a model: its config knows the context length
        generation_config = model_or_config.generation_config
        config = model_or_config.config
        max_length = getattr(config, "model_max_length", None) or getattr(
            config, "max_position_embeddings", None
        )
    # The tokenizer's limit is the fallback (transformers uses a huge sentinel when it has none).
    return generation_config, int(max_length or tokenizer.model_max_length)


def _split_messages(messages: Sequence[Message]) -> tuple[str, list[Message]]:
    """``(system text, turns)`` of official-style messages (system first, then user/assistant)."""
    if not messages:
        raise ValueError("build_chat_input: messages is empty.")
    system, turns = "", []
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            if index != 0:
                raise ValueError(
                    f"build_chat_input: a system message must come first, found one at index {index}."
                )
            system = message["content"]
        elif role in ("user", "assistant"):
            turns.append({"role": role, "content": message["content"]})
        else:
            raise ValueError(
                f"build_chat_input: message {index} has role {role!r}; only system/user/assistant are supported."
            )
    return system, turns


def _prompt(
    template: Baichuan2Template, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], budget: int
) -> list[int]:
    system, turns = _split_messages(messages)
    # A conversation ending with the assistant's words asks to continue them: its prompt, then those words.
    continued = tokenizer.encode(turns[-1]["content"]) if turns and turns[-1]["role"] == "assistant" else []

    def build(kept: list[Message], max_src_len: int | None) -> list[int]:
        room = None if max_src_len is None else max_src_len - len(continued)
        return template.build_prompt({"system": system, "conversations": kept}, max_src_len=room) + continued

    return fit_history(build, turns, budget).ids


def build_chat_input(
    model_or_config: Any,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    max_new_tokens: int | None = None,
) -> list[int]:
    """Token ids of a Baichuan2-Chat prompt for ``messages``.

    Args:
        model_or_config: a model (its ``generation_config`` gives the turn tokens, its config the context
            length), a ``GenerationConfig`` (context length from the tokenizer), or a model directory.
        tokenizer: the model's tokenizer.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``, system only first.
        max_new_tokens: room kept for the reply; default the generation config's ``max_new_tokens`` (0 if unset).

    Returns:
        The prompt ids, ending with the assistant token, or with the assistant's words when the last
        message is the assistant's (the reply continues them).
    """
    generation_config, max_length = _resolve(model_or_config, tokenizer)
    if max_new_tokens is None:
        max_new_tokens = generation_config.max_new_tokens or 0
    template = Baichuan2Template(tokenizer, generation_config)
    return _prompt(template, tokenizer, messages, max_length - max_new_tokens)


def chat(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    stream: bool = False,
    generation_config: GenerationConfig | None = None,
) -> str | Iterator[str]:
    """Reply of a Baichuan2-Chat model to ``messages``.

    Args:
        model: a causal LM whose ``generation_config`` names the turn tokens.
        tokenizer: its tokenizer.
        messages: the conversation (see :func:`build_chat_input`).
        stream: return an iterator over growing partial replies (each item the whole reply so far)
            instead of the final text.
        generation_config: overrides ``model.generation_config`` for this call; the turn tokens come
            from it when it names them, else from the model's.

    Returns:
        The reply text (special tokens removed), or with ``stream=True`` an iterator over growing partial
        texts whose last item is the full reply.
    """
    config = copy.deepcopy(generation_config or model.generation_config)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    turns_config = config if getattr(config, "user_token_id", None) is not None else model.generation_config
    _, max_length = _resolve(model, tokenizer)
    template = Baichuan2Template(tokenizer, turns_config)
    prompt = _prompt(template, tokenizer, messages, max_length - (config.max_new_tokens or 0))
    pieces = stream_reply(model, tokenizer, prompt, config)
    if not stream:
        return "".join(pieces)
    return _growing(pieces)


def _growing(pieces: Iterator[str]) -> Iterator[str]:
    """The reply so far after each new piece (an empty reply still ends with the empty full text)."""
    reply, yielded = "", False
    for piece in pieces:
        if piece:
            reply += piece
            yielded = True
            yield reply
    if not yielded:
        yield reply


__all__ = ["build_chat_input", "chat"]
