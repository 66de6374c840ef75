"""The ``tokenizer`` template: conversations rendered by the model's own jinja chat template.

``tokenizer.chat_template`` (transformers reads it from tokenizer_config.json ``chat_template`` or
``chat_template.jinja``) is the one renderer training and serving share: a sample's text is exactly
``tokenizer.apply_chat_template(messages, tokenize=False)`` and its ids are that text tokenised as a
whole, so byte-level BPE merges are those of the full text, never of separately tokenised pieces.

Records map to transformers messages one to one: ``system`` -> a system message; ``user`` and
``assistant`` as they are; a ``tool`` turn (a call made by the assistant) -> an assistant message with
``tool_calls`` (its ``name``/``parameters``, or the JSON ``{"name", "arguments"|"parameters"}`` in its
content; other text stays the message's content); an ``observation`` -> a ``tool`` message; ``tools``
-> ``apply_chat_template(tools=...)`` as ``{"type": "function", "function": ...}`` schemas.

Finding the pieces of the shared model (head / content / end / tail, see :mod:`sft.data.templates`):
every prefix ``messages[:k]`` is rendered, and turn k is the text that rendering ``messages[:k+1]``
adds to rendering ``messages[:k]``. An assistant turn must start with the generation prompt
(``add_generation_prompt=True``), contain its answer verbatim (or stripped), and continue with
special token(s) that end the turn (``<|im_end|>``, ``<|eot_id|>``): those are learned with the
answer; what follows them (chatml's ``"\\n"``) is the unlearned tail. A system prompt the template
adds on its own (SmolLM2's default, Llama-3's date line) lands in the first turn's head, and a
conversation cut to start at a later round gets the head the template gives a first message.
A template for which any of this fails (e.g. one that renders the last answer differently from
earlier ones) is refused with a line that names ``--template``.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from sft.data.formats import normalize_record
from sft.data.templates.base import Template, TokConversation, TokTurn

logger = logging.getLogger(__name__)

# Renders with these turns check, once per template, that the pieces can be found.
_PROBES = (
    {
        "system": "Probe system prompt.",
        "conversations": [
            {"role": "user", "content": "First probe question?"},
            {"role": "assistant", "content": "First probe answer."},
            {"role": "user", "content": "Second probe question?"},
            {"role": "assistant", "content": "Second probe answer."},
        ],
    },
    {
        "conversations": [
            {"role": "user", "content": "Probe question without a system prompt?"},
            {"role": "assistant", "content": "Probe answer."},
        ]
    },
)


def _refusal(reason: str) -> ValueError:
    return ValueError(
        f"template 'tokenizer': cannot find the assistant answers in the tokenizer's chat template "
        f"({reason}); pass --template NAME to use a built-in template instead (e.g. chatml)"
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
    tools = [tool_schema(t) for t in record.get("tools") or []] or None
    return system, messages, tools


@dataclass
class JinjaRendered:
    """A record rendered by the chat template, with character positions of the pieces.

    ``texts[0]`` is the whole conversation; ``spans[k]`` are turn k's head start, content start,
    content stop, end stop and tail stop in it (the prefix is ``texts[0][:spans[0][0]]``).
    ``first_heads[k]`` = ``(i, start, stop)``: turn k's head when it opens the conversation is
    ``texts[i][start:stop]``.
    """

    texts: list[str]
    roles: list[str]
    spans: list[tuple[int, int, int, int, int]]
    first_heads: dict[int, tuple[int, int, int]]


def _find_text(text: str, content: str, start: int, stop: int) -> tuple[int, int] | None:
    """The last place of ``content`` (or its stripped form, as templates that ``trim`` render it)
    in ``text[start:stop]``: the last, since a head may contain the same words (a user saying "user")."""
    for c in dict.fromkeys((content, content.strip())):
        pos = text.rfind(c, start, stop) if c else -1
        if pos >= 0:
            return pos, pos + len(c)
    return None


def _token_cut(offsets: list[tuple[int, int]], ends: list[int], char: int) -> int:
    """Number of tokens left of character position ``char``; a token that straddles it (a BPE merge
    across a piece boundary) goes right, so an answer's first token is learned even when merged."""
    i = bisect.bisect_right(ends, char)
    while i > 0 and offsets[i - 1][0] >= char:  # empty tokens at ``char`` belong to the right
        i -= 1
    return i


class JinjaTemplate(Template):
    """Samples rendered by ``tokenizer.chat_template`` (``--template tokenizer``)."""

    name = "tokenizer"

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "template 'tokenizer': the tokenizer has no chat template (tokenizer_config.json "
                "'chat_template' or chat_template.jinja); pass --template NAME (e.g. chatml)"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"template 'tokenizer' needs a fast tokenizer (character offsets), got "
                f"{type(tokenizer).__name__}; pass --template NAME (e.g. chatml)"
            )
        specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        specials |= set(tokenizer.all_special_tokens)
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
        self._encodings: dict[str, tuple[list[int], list[tuple[int, int]], list[int]]] = {}
        self._system_renders: dict[str, str] = {}  # a data set repeats few system prompts
        self._warned: set[str] = set()
        # The probe refuses an unusable template now, not in the middle of a data set, and finds the
        # id that ends an answer (e.g. <|im_end|>).
        ends = set()
        for probe in _PROBES:
            conv = self.tokenize_record(normalize_record(probe))
            ends.update(t.end[-1] for t in conv.turns if t.role == "assistant")
        if len(ends) != 1:
            raise _refusal(f"the answers end with different tokens {sorted(ends)}")
        self._end = ends.pop()

    def fingerprint(self) -> str:
        source = json.dumps(self.tokenizer.chat_template, sort_keys=True)
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        # A template that writes today's date (Llama-3.2's strftime_now) renders differently each day.
        today = f":{datetime.date.today()}" if "strftime_now" in source else ""
        return f"{super().fingerprint()}:jinja={digest}{today}"

    # ---- rendering --------------------------------------------------------------------------
    def _apply(self, conversations: list[list[dict]], tools: list | None, generation: bool) -> list[str]:
        if not conversations:
            return []
        return self.tokenizer.apply_chat_template(
            conversations, tools=tools, tokenize=False, add_generation_prompt=generation
        )

    def _system_prefix(self, system: list[dict], tools: list | None, full: str) -> str:
        """The rendering of the system message alone when it starts the conversation's, else ''."""
        if not system:
            return ""
        key = json.dumps([system, tools], sort_keys=True)
        if key not in self._system_renders:
            if len(self._system_renders) > 10_000:
                self._system_renders.clear()
            try:
                (self._system_renders[key],) = self._apply([system], tools, False)
            # A template may refuse a conversation without a user message; the system part then
            # stays in the first turn's head (and in the head a later round gets when it opens a sample).
            except (TemplateError, ValueError, TypeError, KeyError, IndexError):
                self._system_renders[key] = ""
        text = self._system_renders[key]
        return text if full.startswith(text) else ""

    def render(self, record: dict[str, Any]) -> JinjaRendered:  # type: ignore[override]
        system, messages, tools = to_messages(record)
        roles = [t["role"] for t in record["conversations"]]
        n = len(messages)
        round_starts = [i for i in range(1, n) if roles[i] == "user"]
        answers = [k for k in range(n) if roles[k] == "assistant"]
        texts = self._apply(
            [system + messages[: k + 1] for k in range(n)] + [[*system, messages[i]] for i in round_starts],
            tools,
            False,
        )
        prompts = dict(zip(answers, self._apply([system + messages[:k] for k in answers], tools, True)))
        full = texts[n - 1]
        ends = [len(self._system_prefix(system, tools, full))] + [len(t) for t in texts[:n]]
        for k in range(n):
            if not full.startswith(texts[k]) or ends[k + 1] < ends[k]:
                raise _refusal(
                    f"the rendering up to turn {k + 1} does not start the rendering of all {n} turns"
                )

        spans = []
        for k, turn in enumerate(record["conversations"]):
            start, stop = ends[k], ends[k + 1]
            if roles[k] == "tool":
                self._check_rendered("tool calls", messages[k].get("tool_calls"), full[start:stop])
            if roles[k] != "assistant":
                found = _find_text(full, turn["content"], start, stop) if roles[k] != "tool" else None
                a, b = found or (stop, stop)
                spans.append((start, a, b, b, stop))
                continue
            prompt = prompts[k]
            if not full.startswith(prompt) or len(prompt) < start:
                raise _refusal("an assistant turn does not start with the generation prompt")
            found = _find_text(full, turn["content"], len(prompt), stop)
            if found is None:
                raise _refusal("an answer is not rendered verbatim")
            a, b = found
            end_marks = list(self._special_re.finditer(full, b, stop))
            if not end_marks:
                raise _refusal("no special end-of-turn token follows an answer")
            spans.append((start, a, b, end_marks[-1].end(), stop))

        self._check_rendered("tool definitions", tools, full)
        first_heads = {}
        for j, i in enumerate(round_starts):
            text = texts[n + j]
            if not text.startswith(full[: ends[0]]):
                raise _refusal("a conversation starting at a later round does not start with the system part")
            found = _find_text(text, messages[i]["content"], ends[0], len(text))
            first_heads[i] = (1 + j, ends[0], found[0] if found else len(text))
        return JinjaRendered([full, *texts[n:]], roles, spans, first_heads)

    def _check_rendered(self, what: str, calls: list | None, text: str) -> None:
        """Warn (once) when the template drops tool calls or definitions it was given: transformers
        renders them the same way, but the model then trains without them."""
        if not calls or what in self._warned:
            return
        function = calls[0].get("function", calls[0]) if isinstance(calls[0], dict) else {}
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name not in text:
            self._warned.add(what)
            logger.warning(
                "the tokenizer's chat template does not render %s (%r is missing from the text): "
                "they are left out of training and prompts; pass --template chatml to keep them",
                what,
                name,
            )

    # ---- tokenising -------------------------------------------------------------------------
    def texts_of(self, rendered: JinjaRendered) -> list[str]:  # type: ignore[override]
        return rendered.texts

    def tokenize_texts(self, texts: list[str], batch_size: int = 256) -> None:
        """Tokenise whole renderings (with character offsets) in batches into the cache."""
        if len(self._encodings) > 50_000:
            self._encodings.clear()  # long-running callers (web demo) re-tokenise on demand
        new = list(dict.fromkeys(t for t in texts if t not in self._encodings))
        for s in range(0, len(new), batch_size):
            chunk = new[s : s + batch_size]
            enc = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            for text, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
                offsets = [tuple(o) for o in offsets]
                self._encodings[text] = (ids, offsets, [e for _, e in offsets])

    def _encoded(self, text: str) -> tuple[list[int], list[tuple[int, int]], list[int]]:
        if text not in self._encodings:
            self.tokenize_texts([text])
        return self._encodings[text]

    def clear_cache(self) -> None:
        super().clear_cache()
        self._encodings.clear()

    def tokenize_rendered(self, rendered: JinjaRendered) -> TokConversation:  # type: ignore[override]
        ids, offsets, ends = self._encoded(rendered.texts[0])

        def piece(a: int, b: int) -> list[int]:
            return ids[_token_cut(offsets, ends, a) : _token_cut(offsets, ends, b)]

        turns = []
        for k, (h, c, e, t, stop) in enumerate(rendered.spans):
            head = piece(h, c)
            if k in rendered.first_heads:
                i, a, b = rendered.first_heads[k]
                f_ids, f_offsets, f_ends = self._encoded(rendered.texts[i])
                first = f_ids[_token_cut(f_offsets, f_ends, a) : _token_cut(f_offsets, f_ends, b)]
            else:
                first = head
            turns.append(TokTurn(rendered.roles[k], head, piece(c, e), piece(e, t), piece(t, stop), first))
        return TokConversation(piece(0, rendered.spans[0][0]), turns, keep_final_tail=True)

    # ---- generation -------------------------------------------------------------------------
    def build_prompt(self, record: dict[str, Any], max_src_len: int | None = None) -> list[int]:
        """``apply_chat_template(history, add_generation_prompt=True)`` tokenised; the history is the
        record without its final assistant turn, if it has one. Longer than ``max_src_len``: cut
        as in training (oldest rounds first, then the start of the last user text)."""
        record = normalize_record(record, for_generation=True)
        turns = record["conversations"]
        history = {**record, "conversations": turns[:-1] if turns[-1]["role"] == "assistant" else turns}
        system, messages, tools = to_messages(history)
        (text,) = self._apply([system + messages], tools, True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_src_len is None or len(ids) <= max_src_len:
            return ids
        return super().build_prompt(record, max_src_len)
