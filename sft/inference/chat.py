"""Chat sessions: keeping a conversation's prompt inside the model's context window.

Used by ``predict.py --chat``, the web demo and the official-style ``chat()`` of
``models/baichuan/generation_utils.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class FittedPrompt(NamedTuple):
    """A chat's prompt that fits: its ids, the turns it was built from, and how many tokens were cut from the
    start of the newest user message (0: none)."""

    ids: list[int]
    turns: list[dict[str, str]]
    cut: int


def fit_history(
    build: Callable[[list[dict[str, str]], int | None], list[int]],
    history: list[dict[str, str]],
    max_prompt_tokens: int,
) -> FittedPrompt:
    """Drop the oldest rounds of a chat until its prompt fits ``max_prompt_tokens``; then cut the newest message.

    The prompt's structure always survives: the system prompt, the template's role headers and the assistant
    header the reply follows. What is cut is content: whole old rounds first, then the start of the newest user
    message (its end sits next to the answer and matters most), inside the template (``max_src_len``).

    Args:
        build: ``(turns, max_src_len) -> prompt ids``: the template with the system prompt bound
            (``Template.build_prompt``, which cuts the last user text to ``max_src_len`` when it is not None).
        history: the conversation so far, ending with the new user turn.
        max_prompt_tokens: the context window minus the room kept for the reply.

    Raises:
        ValueError: the system prompt and the headers alone are longer than ``max_prompt_tokens``.
    """
    turns = list(history)
    ids = build(turns, None)
    while len(ids) > max_prompt_tokens:
        # Drop one round: the oldest user turn and everything up to the next user turn (none: the newest round).
        nxt = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), None)
        if nxt is None:
            break
        turns = turns[nxt:]
        ids = build(turns, None)
    if len(ids) <= max_prompt_tokens:
        return FittedPrompt(ids, turns, 0)
    full = len(ids)
    try:
        ids = build(turns, max_prompt_tokens)
    except ValueError as err:
        raise ValueError(
            f"the prompt cannot fit {max_prompt_tokens} tokens: the system prompt and the template's headers "
            "alone are longer (shorten the system prompt, or lower the reply's max new tokens)"
        ) from err
    return FittedPrompt(ids, turns, full - len(ids))


def context_window(model_or_config: Any) -> int:
    """Positions a model attends over (``max_position_embeddings`` or Baichuan's ``model_max_length``); takes a
    model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "model_max_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096
