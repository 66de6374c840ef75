"""Records as transformers chat messages, and the small helpers the ``tokenizer`` template's two ways of
finding answers share (:mod:`sft.data.templates.jinja`, :mod:`sft.data.templates.jinja.located`)."""

from __future__ import annotations

import json
from typing import Any

from jinja2 import TemplateError

# What a template may fail with on a conversation it does not accept (roles out of order, no user turn).
RENDER_ERRORS = (TemplateError, ValueError, TypeError, KeyError, IndexError)
Encoding = tuple[list[int], list[tuple[int, int]], list[int]]  # ids, character offsets, offset ends


def refusal(reason: str, loss_on_hint: bool = False) -> ValueError:
    """The one-line refusal of a template whose answers cannot be found (training only)."""
    hint = " or --loss_on last (learn only the final answer)" if loss_on_hint else ""
    return ValueError(
        f"template 'tokenizer': cannot find the assistant answers in the tokenizer's chat template "
        f"({reason}); pass --template NAME to use a built-in template instead (e.g. chatml){hint}"
    )


def tool_schema(tool: Any) -> Any:
    """A record's tool definition as the OpenAI-style schema chat templates expect."""
    if isinstance(tool, dict) and "type" not in tool and "name" in tool:
        return {"type": "function", "function": tool}
    return tool


def tool_call_message(turn: dict[str, Any]) -> dict[str, Any]:
    """A ``tool`` turn as an assistant message with ``tool_calls`` (plain text when it names no call)."""
    name, arguments = turn.get("name"), turn.get("parameters", {})
    if not name:
        try:
            call = json.loads(turn["content"])
        except json.JSONDecodeError:
            call = None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            return {"role": "assistant", "content": turn["content"]}
        name, arguments = call["name"], call.get("arguments", call.get("parameters", {}))
    function = {"name": name, "arguments": arguments}
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": function}]}


def to_messages(record: dict[str, Any]) -> tuple[list[dict], list[dict], list[Any] | None]:
    """``(system messages, one message per turn, tools)`` of a normalised record."""
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    messages = []
    for turn in record["conversations"]:
        if turn["role"] == "tool":
            messages.append(tool_call_message(turn))
        elif turn["role"] == "observation":
            messages.append({"role": "tool", "content": turn["content"]})
        else:
            messages.append({"role": turn["role"], "content": turn["content"]})
            if turn["role"] == "assistant" and isinstance(turn.get("reasoning_content"), str):
                messages[-1]["reasoning_content"] = turn["reasoning_content"]
    tools = [tool_schema(t) for t in record.get("tools") or []] or None
    return system, messages, tools


def find_text(text: str, content: str, start: int, stop: int) -> tuple[int, int] | None:
    """The last place of ``content`` (or its stripped form, as templates that ``trim`` render it)
    in ``text[start:stop]``: the last, since a head may contain the same words (a user saying "user")."""
    for c in dict.fromkeys((content, content.strip())):
        pos = text.rfind(c, start, stop) if c else -1
        if pos >= 0:
            return pos, pos + len(c)
    return None
