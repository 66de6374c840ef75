"""The ``tokenizer`` template: conversations rendered by the model's own jinja chat template.

``tokenizer.chat_template`` (transformers reads it from tokenizer_config.json ``chat_template`` or
``chat_template.jinja``) is the one renderer training and serving share: a sample's text is exactly
``tokenizer.apply_chat_template(messages, tokenize=False)`` and its ids are that text tokenised as a
whole, so byte-level BPE merges are those of the full text, never of separately tokenised pieces.

Records map to transformers messages one to one: ``system`` -> a system message; ``user`` and
``assistant`` as they are (an assistant turn's ``reasoning_content`` goes along, for templates that render
reasoning, Qwen3's); a ``tool`` turn (a call made by the assistant) -> an assistant message with
``tool_calls`` (its ``name``/``parameters``, or the JSON ``{"name", "arguments"|"parameters"}`` in its
content; other text stays the message's content); an ``observation`` -> a ``tool`` message; ``tools``
-> ``apply_chat_template(tools=...)`` as ``{"type": "function", "function": ...}`` schemas.

**Inference** needs the template and nothing else: a prompt is ``apply_chat_template(history,
add_generation_prompt=True)`` tokenised (:meth:`JinjaTemplate.build_prompt`), whatever the template does
(Qwen3's thinking blocks, an end-of-turn marker that is plain text). Generation stops at the special token
that follows an answer (``end_id``), the tokenizer's EOS where none does.

**Training** must know which tokens are answers. Per record:

1. *Prefix-stable* templates (a conversation's rendering starts with the rendering of each of its prefixes:
   chatml, Qwen2.5, Llama 3, Gemma, Mistral v0.1/v0.2) use the piece model of
   :mod:`sft.data.templates.base`: every prefix ``messages[:k]`` is rendered, and turn k is the text that
   rendering ``messages[:k+1]`` adds to rendering ``messages[:k]``. An assistant turn starts with the
   generation prompt (its head), continues with the answer verbatim (or stripped) and special token(s)
   that end the turn (``<|im_end|>``, ``<|eot_id|>``): all from the generation prompt's end to those
   tokens is learned (Mistral's space before the answer included); what follows them (chatml's ``"\\n"``)
   is the unlearned tail. A system prompt the template adds on its own (SmolLM2's default, Llama-3's date
   line) lands in the first turn's head, and a conversation cut to start at a later round gets the head
   the template gives a first message.
2. A template that is not prefix-stable (Qwen3: the last answer gets a ``<think>`` block the earlier ones
   lose; Phi-3: every rendering ends with ``<|endoftext|>``) gets each answer located in its sample's own
   rendering, and one that marks its answers with ``{% generation %}`` gets transformers' assistant-token
   mask (:mod:`sft.data.templates.jinja.located`).

An answer that cannot be found either way (a template that rewrites it) is refused with a line that names
``--template``, and ``--loss_on`` where only an earlier answer is the problem.
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

from sft.data.formats import normalize_record
from sft.data.templates.base import AssembleResult, Template, TokConversation, TokTurn
from sft.data.templates.jinja import located
from sft.data.templates.jinja.messages import RENDER_ERRORS, Encoding, find_text, to_messages

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
GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _NotPrefixStable(ValueError):
    """The piece model does not fit this record's rendering (the located one is tried next)."""


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
        self.special_re = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
        self.special_ids = frozenset(tokenizer.convert_tokens_to_ids(sorted(specials)))
        self.marks_generation = bool(GENERATION_MARK.search(str(tokenizer.chat_template)))
        self._encodings: dict[str, Encoding] = {}
        self._system_renders: dict[str, str] = {}  # a data set repeats few system prompts
        self._warned: set[str] = set()
        self._end = self._probe_end_id()

    def _probe_end_id(self) -> int:
        """The special token the template writes right after an answer (``<|im_end|>``, ``<|end|>``):
        what ends a generated answer. The tokenizer's EOS where it writes none (a plain-text marker)."""
        system, messages, tools = to_messages(normalize_record(_PROBES[0]))
        try:
            (text,) = self.apply([system + messages], tools, False)
        except RENDER_ERRORS:
            return self.eos_id
        found = find_text(text, messages[-1]["content"], 0, len(text))
        mark = self.special_re.search(text, found[1]) if found else None
        return self.tokenizer.convert_tokens_to_ids(mark.group()) if mark else self.eos_id

    def fingerprint(self) -> str:
        source = json.dumps(self.tokenizer.chat_template, sort_keys=True)
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        # A template that writes today's date (Llama-3.2's strftime_now) renders differently each day.
        today = f":{datetime.date.today()}" if "strftime_now" in source else ""
        return f"{super().fingerprint()}:jinja={digest}:v2{today}"

    # ---- rendering --------------------------------------------------------------------------
    def apply(self, conversations: list[list[dict]], tools: list | None, generation: bool) -> list[str]:
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
                (self._system_renders[key],) = self.apply([system], tools, False)
            # A template may refuse a conversation without a user message; the system part then
            # stays in the first turn's head (and in the head a later round gets when it opens a sample).
            except RENDER_ERRORS:
                self._system_renders[key] = ""
        text = self._system_renders[key]
        return text if full.startswith(text) else ""

    def render(self, record: dict[str, Any], loss_on: str = "all") -> Any:
        """The record as pieces of one rendering (prefix-stable templates), else as samples rendered
        on their own with their answers located (:mod:`sft.data.templates.jinja.located`)."""
        if not self.marks_generation:
            try:
                return self._render_pieces(record)
            except _NotPrefixStable:
                pass
        return located.render_samples(self, record, loss_on)

    def _render_pieces(self, record: dict[str, Any]) -> JinjaRendered:
        system, messages, tools = to_messages(record)
        roles = [t["role"] for t in record["conversations"]]
        n = len(messages)
        round_starts = [i for i in range(1, n) if roles[i] == "user"]
        answers = [k for k in range(n) if roles[k] == "assistant"]
        texts = self.apply(
            [system + messages[: k + 1] for k in range(n)] + [[*system, messages[i]] for i in round_starts],
            tools,
            False,
        )
        prompts = dict(zip(answers, self.apply([system + messages[:k] for k in answers], tools, True)))
        full = texts[n - 1]
        ends = [len(self._system_prefix(system, tools, full))] + [len(t) for t in texts[:n]]
        if any(not full.startswith(texts[k]) or ends[k + 1] < ends[k] for k in range(n)):
            raise _NotPrefixStable("a prefix of the conversation does not render as a prefix of it")

        spans = []
        for k, turn in enumerate(record["conversations"]):
            start, stop = ends[k], ends[k + 1]
            if roles[k] == "tool":
                self.check_rendered("tool calls", messages[k].get("tool_calls"), full[start:stop])
            if roles[k] != "assistant":
                found = find_text(full, turn["content"], start, stop) if roles[k] != "tool" else None
                a, b = found or (stop, stop)
                spans.append((start, a, b, b, stop))
                continue
            prompt = prompts[k]
            found = find_text(full, turn["content"], len(prompt), stop)
            end_marks = list(self.special_re.finditer(full, found[1], stop)) if found else []
            if not full.startswith(prompt) or len(prompt) < start or not end_marks:
                raise _NotPrefixStable("an answer is not its generation prompt, its text and a special token")
            # Learned from the end of the generation prompt: what the template writes between it and the
            # answer (Mistral's space) is the model's to write.
            spans.append((start, len(prompt), found[1], end_marks[-1].end(), stop))

        self.check_rendered("tool definitions", tools, full)
        first_heads = {}
        for j, i in enumerate(round_starts):
            text = texts[n + j]
            if not text.startswith(full[: ends[0]]):
                raise _NotPrefixStable("a conversation starting at a later round lacks the system part")
            found = find_text(text, messages[i]["content"], ends[0], len(text))
            first_heads[i] = (1 + j, ends[0], found[0] if found else len(text))
        return JinjaRendered([full, *texts[n:]], roles, spans, first_heads)

    def check_rendered(self, what: str, calls: list | None, text: str) -> None:
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
    def texts_of(self, rendered: Any) -> list[str]:  # type: ignore[override]
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

    def encoded(self, text: str) -> Encoding:
        """``(ids, character offsets, offset ends)`` of a rendering (cached)."""
        if text not in self._encodings:
            self.tokenize_texts([text])
        return self._encodings[text]

    def token_cut(self, encoding: Encoding, char: int) -> int:
        """Number of tokens left of character position ``char``. A token that straddles it goes right
        (a BPE merge across a piece boundary: an answer's first token is learned even when merged), unless
        it is a special token that took the whitespace after it along (Phi-3's ``rstrip`` turn tokens)."""
        ids, offsets, ends = encoding
        i = bisect.bisect_right(ends, char)
        while i > 0 and offsets[i - 1][0] >= char:  # empty tokens at ``char`` belong to the right
            i -= 1
        if i < len(ids) and offsets[i][0] < char and ids[i] in self.special_ids:
            i += 1
        return i

    def clear_cache(self) -> None:
        super().clear_cache()
        self._encodings.clear()

    def tokenize_rendered(self, rendered: JinjaRendered) -> TokConversation:  # type: ignore[override]
        encoding = self.encoded(rendered.texts[0])
        ids = encoding[0]

        def piece(a: int, b: int) -> list[int]:
            return ids[self.token_cut(encoding, a) : self.token_cut(encoding, b)]

        turns = []
        for k, (h, c, e, t, stop) in enumerate(rendered.spans):
            head = piece(h, c)
            if k in rendered.first_heads:
                i, a, b = rendered.first_heads[k]
                first_encoding = self.encoded(rendered.texts[i])
                cut = self.token_cut
                first = first_encoding[0][cut(first_encoding, a) : cut(first_encoding, b)]
            else:
                first = head
            turns.append(TokTurn(rendered.roles[k], head, piece(c, e), piece(e, t), piece(t, stop), first))
        return TokConversation(piece(0, rendered.spans[0][0]), turns, keep_final_tail=True)

    def samples(self, rendered: Any, loss_on: str, **cuts: Any) -> list[AssembleResult]:
        if isinstance(rendered, JinjaRendered):
            return super().samples(rendered, loss_on, **cuts)
        return located.samples(self, rendered, **cuts)

    # ---- generation -------------------------------------------------------------------------
    def build_prompt(self, record: dict[str, Any], max_src_len: int | None = None) -> list[int]:
        """``apply_chat_template(history, add_generation_prompt=True)`` tokenised; the history is the
        record without its final assistant turn, if it has one. Longer than ``max_src_len``: rendered
        again without the oldest rounds, then cut at the start of the last user text (as in training)."""
        record = normalize_record(record, for_generation=True)
        turns = record["conversations"]
        if turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        system, messages, tools = to_messages({**record, "conversations": turns})
        for first in [0] + [i for i in range(1, len(turns)) if turns[i]["role"] == "user"]:
            (text,) = self.apply([system + messages[first:]], tools, True)
            encoding = self.encoded(text)
            if max_src_len is None or len(encoding[0]) <= max_src_len:
                return list(encoding[0])
        ids = encoding[0]
        last_user = max(i for i, t in enumerate(turns) if t["role"] == "user")
        found = find_text(text, turns[last_user]["content"], 0, len(text))
        a, b = (self.token_cut(encoding, c) for c in found) if found else (0, 0)
        cut = len(ids) - max_src_len
        if cut > b - a:
            raise ValueError(
                f"the prompt cannot be cut to max_src_len={max_src_len} tokens (system text too long)"
            )
        return ids[:a] + ids[a + cut :]
