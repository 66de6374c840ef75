"""Chat sessions: keeping a conversation's prompt inside the model's context window.

Used by ``predict.py --chat``, the web demo and the official-style ``chat()`` of
``models/baichuan/generation_utils.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def fit_history(
    build: Callable[[list[dict[str, str]]], list[int]],
    history: list[dict[str, str]],
    max_prompt_tokens: int,
) -> tuple[list[int], list[dict[str, str]]]:
    """Drop the oldest rounds of a chat until its prompt fits ``max_prompt_tokens``.

    Args:
        build: turns -> prompt ids (the template, with the system prompt bound).
        history: the conversation so far, ending with the new user turn.
        max_prompt_tokens: the context window minus the room kept for the reply.

    Returns:
        ``(prompt ids, the turns they were built from)``. The newest round (from the last user turn on)
        is always kept, its prompt cut from the left if it alone is too long.
    """
    turns = list(history)
    ids = build(turns)
    while len(ids) > max_prompt_tokens:
        # Drop one round: the oldest user turn and everything up to the next user turn (none: the newest round).
        nxt = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), None)
        if nxt is None:
            break
        turns = turns[nxt:]
        ids = build(turns)
    if len(ids) > max_prompt_tokens:
        ids = ids[-max_prompt_tokens:]
    return ids, turns


def context_window(model: PreTrainedModel) -> int:
    """Positions the model can attend over (``max_position_embeddings`` or Baichuan's ``model_max_length``)."""
    config = model.config
    for name in ("max_position_embeddings", "model_max_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096
