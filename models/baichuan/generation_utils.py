"""Chat helpers for Baichuan2-Chat models: prompt building in the official turn-token format, and `chat()`.

Prompt format (what the official Baichuan2-Chat models were trained on):

    [system tokens] <user> user text <assistant> reply <user> user text ... <assistant>

`<user>` / `<assistant>` are single reserved tokens whose ids the model directory's `generation_config.json`
names (`user_token_id` / `assistant_token_id`, 195 / 196 in the official files). The system message is plain
text tokens with no marker.

History that does not fit in `model_max_length - max_new_tokens` tokens is dropped a whole round (one user turn
plus the replies after it) at a time, oldest first; the newest round is always kept, and when even that is too
long the prompt keeps its last tokens.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, TextIteratorStreamer

Message = dict[str, str]


def _resolve(model_or_config: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[GenerationConfig, int]:
    """Return (generation config, context length) from a model, a GenerationConfig or a model directory."""
    if isinstance(model_or_config, (str, Path)):
        model_dir = Path(model_or_config)
        if not (model_dir / "generation_config.json").is_file():
            raise FileNotFoundError(
                f"build_chat_input: {model_dir}/generation_config.json not found; pass a local model directory "
                "whose generation_config.json names user_token_id/assistant_token_id (no hub ids)."
            )
        generation_config = GenerationConfig.from_pretrained(model_dir)
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        max_length = config.get("model_max_length") or config.get("max_position_embeddings")
    elif isinstance(model_or_config, GenerationConfig):
        generation_config = model_or_config
        max_length = None
    else:  # a model: its config knows the context length
        generation_config = model_or_config.generation_config
        config = model_or_config.config
        max_length = getattr(config, "model_max_length", None) or getattr(
            config, "max_position_embeddings", None
        )
    # The tokenizer's limit is the fallback (transformers uses a huge sentinel when it has none).
    max_length = max_length or tokenizer.model_max_length
    return generation_config, int(max_length)


def _turn_token_ids(generation_config: GenerationConfig) -> tuple[int, int]:
    user_id = getattr(generation_config, "user_token_id", None)
    assistant_id = getattr(generation_config, "assistant_token_id", None)
    if user_id is None or assistant_id is None:
        raise ValueError(
            "build_chat_input: the generation config has no user_token_id/assistant_token_id; the Baichuan2 chat "
            "format needs them in the model directory's generation_config.json (195/196 in the official files)."
        )
    return int(user_id), int(assistant_id)


def _split_rounds(messages: Sequence[Message]) -> tuple[str, list[list[Message]]]:
    """Split messages into (system text, rounds); a round starts at each user message."""
    system = ""
    rounds: list[list[Message]] = []
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            if index != 0:
                raise ValueError(
                    f"build_chat_input: a system message must come first, found one at index {index}."
                )
            system = message["content"]
        elif role == "user":
            rounds.append([message])
        elif role == "assistant":
            if not rounds:  # a conversation opening with the assistant: its own round
                rounds.append([])
            rounds[-1].append(message)
        else:
            raise ValueError(
                f"build_chat_input: message {index} has role {role!r}; only system/user/assistant are supported."
            )
    return system, rounds


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    user_id: int,
    assistant_id: int,
    max_input_tokens: int,
) -> list[int]:
    """The Baichuan2-Chat prompt: system ids, then as many rounds as fit (newest kept), then `<assistant>`."""
    if not messages:
        raise ValueError("build_chat_input: messages is empty.")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    system, rounds = _split_rounds(messages)
    system_ids = encode(system) if system else []
    history_budget = max_input_tokens - len(system_ids)

    # Newest round first; stop at the first round that does not fit (older ones are dropped with it) and once
    # the budget is used up. The newest round goes in whatever its length.
    history: list[int] = []
    for round_messages in reversed(rounds):
        round_ids: list[int] = []
        for message in round_messages:
            round_ids.append(user_id if message["role"] == "user" else assistant_id)
            round_ids.extend(encode(message["content"]))
        if history and len(history) + len(round_ids) > history_budget:
            break
        history = round_ids + history
        if len(history) >= history_budget:
            break

    input_ids = system_ids + history
    if messages[-1]["role"] != "assistant":
        input_ids.append(assistant_id)
    # An over-long newest round: keep the end, where the question and the assistant token are.
    return input_ids[-max_input_tokens:] if max_input_tokens > 0 else input_ids


def build_chat_input(
    model_or_config: Any,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    max_new_tokens: int | None = None,
) -> list[int]:
    """Token ids of a Baichuan2-Chat prompt for `messages`.

    Args:
        model_or_config: A model (its `generation_config` gives the turn tokens, its `config.model_max_length` the
            context length), a `GenerationConfig` (context length from the tokenizer), or a model directory.
        tokenizer: The model's tokenizer (must not add BOS/EOS: Baichuan2's does not).
        messages: `[{"role": "system"|"user"|"assistant", "content": str}, ...]`, system only first.
        max_new_tokens: Room kept for the reply; default the generation config's `max_new_tokens` (0 if unset).

    Returns:
        The prompt ids, ending with the assistant token unless the last message is the assistant's.
    """
    generation_config, max_length = _resolve(model_or_config, tokenizer)
    user_id, assistant_id = _turn_token_ids(generation_config)
    if max_new_tokens is None:
        max_new_tokens = generation_config.max_new_tokens or 0
    return _prompt_ids(
        tokenizer,
        messages,
        user_id=user_id,
        assistant_id=assistant_id,
        max_input_tokens=max_length - max_new_tokens,
    )


def chat(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    stream: bool = False,
    generation_config: GenerationConfig | None = None,
) -> str | Iterator[str]:
    """Reply of a Baichuan2-Chat model to `messages`.

    Args:
        model: A causal LM whose `generation_config` names the turn tokens.
        tokenizer: Its tokenizer.
        messages: The conversation (see `build_chat_input`).
        stream: Return a generator of growing partial replies (each item the whole reply so far) instead of
            the final text.
        generation_config: Overrides `model.generation_config` for this call. The turn tokens come from it when
            it names them, else from the model's.

    Returns:
        The reply text (special tokens removed), or with `stream=True` an iterator over growing partial texts
        whose last item is the full reply.
    """
    generation_config = generation_config or model.generation_config
    turns_config = (
        generation_config
        if getattr(generation_config, "user_token_id", None) is not None
        else model.generation_config
    )
    user_id, assistant_id = _turn_token_ids(turns_config)
    _, max_length = _resolve(model, tokenizer)
    prompt_ids = _prompt_ids(
        tokenizer,
        messages,
        user_id=user_id,
        assistant_id=assistant_id,
        max_input_tokens=max_length - (generation_config.max_new_tokens or 0),
    )
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    generate_kwargs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "generation_config": generation_config,
    }
    if not stream:
        output = model.generate(**generate_kwargs)
        return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    return _stream_reply(model, tokenizer, generate_kwargs)


def _stream_reply(
    model: Any, tokenizer: PreTrainedTokenizerBase, generate_kwargs: dict[str, Any]
) -> Iterator[str]:
    """Run `generate` in a thread and yield the reply so far after each new piece of text."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(**generate_kwargs, streamer=streamer)
        except BaseException as error:  # re-raised in the consumer's thread below
            errors.append(error)
            streamer.end()  # unblock the consumer, which would otherwise wait forever

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    reply = ""
    yielded = False
    for piece in streamer:
        if piece:
            reply += piece
            yielded = True
            yield reply
    thread.join()
    if errors:
        raise RuntimeError("chat(stream=True): generation failed in the worker thread") from errors[0]
    if not yielded:  # an empty reply still ends the stream with the (empty) full text
        yield reply


__all__ = ["build_chat_input", "chat"]
