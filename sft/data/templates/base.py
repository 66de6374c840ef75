"""The piece model every chat template renders into, and how samples are assembled from it.

A template renders a conversation as a *prefix* (BOS / system text) followed by one rendered turn
per conversation turn. A rendered turn is four pieces::

    head     role marker before the text        (never learned)
    content  the turn's text                    (learned only for a learned assistant turn)
    end      end-of-turn ids, e.g. [eos]        (learned with the content)
    tail     separator after the turn           (never learned)

Labels come from these positions, never from token values: Baichuan's pad == unk == 0 and a
Llama pad may equal EOS, so a mask made by comparing ids would hide or leak the EOS label.

Loss placement (``loss_on``): ``"all"`` every assistant turn in one sample (default), ``"last"``
only the final assistant turn, ``"each"`` one sample per assistant turn with the history before it
as unlearned context. Every learned answer ends with the end-of-turn id, which is learned.

Truncation (:func:`assemble`): the prompt side is cut to ``max_src_len`` -- oldest history rounds
first, then the start of the last user text -- and the answer only when it alone overflows
``max_len`` (its end ids kept).

A named template also carries its format's other renderings, text whose ``{NAME}`` placeholders are
the special tokens of :meth:`Template.special_texts`: ``JINJA`` (:meth:`Template.chat_template`) and
Ollama's Go ``GO_TEMPLATE`` with its ``GO_STOPS`` (:mod:`sft.export.ollama`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sft.data import LOSS_PLACEMENTS
from sft.data.formats import IGNORE_INDEX, normalize_record

_CACHE_LIMIT = 500_000  # distinct strings kept in a template's text -> ids cache

# A piece of a rendered turn: text to tokenise, or literal token ids.
Piece = str | tuple[int, ...]


def single_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` when the vocabulary has it as one token, else None."""
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None


@dataclass
class RenderedTurn:
    """One turn as pieces (see module docstring). ``head_first`` replaces ``head`` when the turn
    opens the sample (Llama-2 puts the system block inside the first ``[INST]``)."""

    role: str
    head: list[Piece]
    content: str
    end: list[Piece]
    tail: list[Piece]
    head_first: list[Piece] | None = None


@dataclass
class TokTurn:
    """A rendered turn with every piece tokenised."""

    role: str
    head: list[int]
    content: list[int]
    end: list[int]
    tail: list[int]
    head_first: list[int]


@dataclass
class TokConversation:
    """A tokenised conversation. ``keep_final_tail``: a sample ends with its answer's tail (unlearned),
    as the model's own chat template renders it (``tokenizer`` template)."""

    prefix: list[int]
    turns: list[TokTurn]
    keep_final_tail: bool = False


@dataclass
class AssembleResult:
    """One encoded sample plus what truncation did to it (``None`` ids when it was dropped)."""

    input_ids: list[int] | None
    labels: list[int] | None
    truncated_prompt: bool = False
    truncated_answer: bool = False
    dropped: str | None = None


class Template:
    """Base class: subclasses define :meth:`render_prefix` and :meth:`render_turn`, and the forms below."""

    name = "base"
    END_TOKEN: str | None = None  # ends an answer where the vocabulary has it as one token (else EOS)
    JINJA: str | None = None  # a jinja chat template; None where the format has no agreed one (alpaca)
    GO_TEMPLATE: str | None = None  # Ollama's text/template over .System and .Messages (BOS: the tokenizer's)
    GO_STOPS: tuple[str, ...] = ()  # the Modelfile's stop strings

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"template {self.name!r}: the tokenizer has no eos_token_id; set eos_token")
        end = single_token_id(tokenizer, self.END_TOKEN) if self.END_TOKEN else None
        self._end = end if end is not None else self.eos_id
        self.bos = (tokenizer.bos_token_id,) if tokenizer.bos_token_id is not None else ()  # a piece, or none
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def for_model(cls, tokenizer: Any, model_dir: Any) -> Template:
        """The template for a tokenizer and its model directory (``get_template`` builds it so)."""
        return cls(tokenizer)

    # ---- rendering (subclasses) -------------------------------------------------------------
    def render_prefix(self, system: str) -> list[Piece]:
        raise NotImplementedError

    def render_turn(self, role: str, content: str, system: str) -> RenderedTurn:
        raise NotImplementedError

    @property
    def end_id(self) -> int:
        """The id that ends (and is learned at the end of) an assistant answer."""
        return self._end

    def special_texts(self) -> dict[str, str]:
        """Text of the special tokens the forms name: ``{BOS}``, ``{EOS}`` and ``{END}`` (ends an answer)."""
        token = self.tokenizer.convert_ids_to_tokens
        return {"BOS": self.tokenizer.bos_token or "", "EOS": token(self.eos_id), "END": token(self.end_id)}

    def _fill(self, form: str) -> str:
        for key, value in self.special_texts().items():
            form = form.replace("{" + key + "}", value)
        return form

    def chat_template(self) -> str | None:
        """A jinja chat template that renders this template's prompts, for tokenizers without their own.

        train.py puts it into the tokenizer it saves with every checkpoint, so a checkpoint and the model
        merged from it carry the format training used: ``tokenizer.apply_chat_template`` renders the same
        ids (``llama2``: the same text; None for ``alpaca``, whose blocks have no agreed jinja form).
        """
        return self._fill(self.JINJA) if self.JINJA else None

    def go_template(self) -> str | None:
        """The format as an Ollama Modelfile ``TEMPLATE`` for this tokenizer, or None where it has none."""
        return self._fill(self.GO_TEMPLATE) if self.GO_TEMPLATE else None

    def stop_strings(self) -> list[str]:
        """The Modelfile's ``PARAMETER stop`` strings: where a generated answer is over."""
        return [self._fill(stop) for stop in self.GO_STOPS]

    def fingerprint(self) -> str:
        """Everything that changes the token layout (part of the dataset cache key)."""
        return f"{self.name}:eos={self.end_id}"

    # ---- shared helpers ---------------------------------------------------------------------
    @staticmethod
    def system_text(record: dict[str, Any]) -> str:
        system = record.get("system") or ""
        tools = record.get("tools")
        if tools:
            listing = json.dumps(tools, ensure_ascii=False, indent=None)
            system = f"{system}\n\nAvailable tools:\n{listing}" if system else f"Available tools:\n{listing}"
        return system

    @staticmethod
    def turn_text(turn: dict[str, Any]) -> str:
        if turn["role"] == "tool":
            return "[tool call] " + turn["content"]
        if turn["role"] == "observation":
            return "[observation] " + turn["content"]
        return turn["content"]

    def render(self, record: dict[str, Any], loss_on: str = "all") -> tuple[list[Piece], list[RenderedTurn]]:
        """A normalised record as pieces (``loss_on`` matters only to templates that render each sample
        on its own, see :meth:`samples`)."""
        system = self.system_text(record)
        turns = [self.render_turn(t["role"], self.turn_text(t), system) for t in record["conversations"]]
        return self.render_prefix(system), turns

    def texts_of(self, rendered: tuple[list[Piece], list[RenderedTurn]]) -> list[str]:
        """Every string in a rendered conversation (to tokenise them in one batch)."""
        prefix, turns = rendered
        out = [p for p in prefix if isinstance(p, str)]
        for t in turns:
            for pieces in (t.head, t.end, t.tail, t.head_first or []):
                out.extend(p for p in pieces if isinstance(p, str))
            out.append(t.content)
        return out

    def tokenize_texts(self, texts: Sequence[str], batch_size: int = 1024) -> None:
        """Tokenise new strings in batches into the template's text -> ids cache."""
        if len(self._cache) > _CACHE_LIMIT:
            # Long-running callers (web demo) build prompts forever; misses are re-tokenised on demand.
            self._cache.clear()
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for start in range(0, len(new), batch_size):
            chunk = new[start : start + batch_size]
            ids = self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
            self._cache.update(zip(chunk, ids))

    def _ids(self, pieces: list[Piece]) -> list[int]:
        out: list[int] = []
        for p in pieces:
            out.extend(self._text_ids(p) if isinstance(p, str) else p)
        return out

    def _text_ids(self, text: str) -> list[int]:
        if not text:
            return []
        if text not in self._cache:
            self.tokenize_texts([text])
        return self._cache[text]

    def tokenize_rendered(self, rendered: tuple[list[Piece], list[RenderedTurn]]) -> TokConversation:
        prefix, turns = rendered
        tok_turns = []
        for t in turns:
            head = self._ids(t.head)
            tok_turns.append(
                TokTurn(
                    role=t.role,
                    head=head,
                    content=self._text_ids(t.content),
                    end=self._ids(t.end),
                    tail=self._ids(t.tail),
                    head_first=self._ids(t.head_first) if t.head_first is not None else head,
                )
            )
        return TokConversation(self._ids(prefix), tok_turns)

    def tokenize_record(self, record: dict[str, Any]) -> TokConversation:
        return self.tokenize_rendered(self.render(record))

    def samples(
        self,
        rendered: Any,
        loss_on: str,
        *,
        max_len: int | None = None,
        max_src_len: int | None = None,
        is_skip: bool = False,
    ) -> list[AssembleResult]:
        """The training samples of a rendered record: one per :func:`sample_plan` entry, cut by
        :func:`assemble` (``None`` ids where a sample was dropped)."""
        conv = self.tokenize_rendered(rendered)
        return [
            assemble(conv, target, learned, max_len=max_len, max_src_len=max_src_len, is_skip=is_skip)
            for target, learned in sample_plan(conv, loss_on)
        ]

    def clear_cache(self) -> None:
        """Drop the text -> ids cache (it only grows while a dataset is encoded)."""
        self._cache.clear()

    # ---- public API -------------------------------------------------------------------------
    def encode(self, record: dict[str, Any], loss_on: str = "all") -> list[tuple[list[int], list[int]]]:
        """Encode a training record without truncation.

        Returns one ``(input_ids, labels)`` pair for ``loss_on="all"|"last"`` and one per assistant
        turn for ``"each"``; labels are unshifted (the model shifts) with -100 where no loss.
        """
        record = normalize_record(record)
        return [(res.input_ids, res.labels) for res in self.samples(self.render(record, loss_on), loss_on)]

    def build_prompt(self, record: dict[str, Any], max_src_len: int | None = None) -> list[int]:
        """Prompt ids ending where the (last) assistant answer starts, for generation.

        A record ending with an assistant turn gives the prompt for that turn; a record ending with
        ``user``/``observation`` gets an assistant head appended. With ``max_src_len`` the prompt
        is truncated as in training (oldest rounds first, then the start of the last user text).
        """
        record = normalize_record(record, for_generation=True)
        turns = record["conversations"]
        if turns[-1]["role"] != "assistant":
            # A placeholder answer: only its head is used.
            record = {**record, "conversations": [*turns, {"role": "assistant", "content": "x"}]}
        conv = self.tokenize_record(record)
        target = len(conv.turns) - 1
        fit = _fit_prompt(conv, target, max_src_len)
        if fit is None:
            raise ValueError(
                f"the prompt cannot be cut to max_src_len={max_src_len} tokens (system text too long)"
            )
        return _build_prompt(conv, fit[0], target, fit[1])[0]


# ---- sample assembly and truncation ---------------------------------------------------------


def sample_plan(conv: TokConversation, loss_on: str) -> list[tuple[int, set[int]]]:
    """``(target assistant turn, learned turn indices)`` per sample for a loss placement."""
    if loss_on not in LOSS_PLACEMENTS:
        raise ValueError(f"loss_on must be one of {LOSS_PLACEMENTS}, got {loss_on!r}")
    assistant = [i for i, t in enumerate(conv.turns) if t.role == "assistant"]
    if loss_on == "all":
        return [(assistant[-1], set(assistant))]
    if loss_on == "last":
        return [(assistant[-1], {assistant[-1]})]
    return [(i, {i}) for i in assistant]


def _round_starts(conv: TokConversation, upto: int) -> list[int]:
    return [i for i in range(upto) if conv.turns[i].role == "user"]


def _build_prompt(
    conv: TokConversation, first: int, target: int, cut_user: int = 0, learned: set[int] | None = None
) -> tuple[list[int], list[int]]:
    """Prefix + turns[first:target] + the target's head, with labels for learned history turns.

    ``cut_user`` tokens are removed from the start of the last user turn's content.
    """
    learned = learned or set()
    last_user = max((i for i in range(first, target) if conv.turns[i].role == "user"), default=None)
    ids = list(conv.prefix)
    labels = [IGNORE_INDEX] * len(ids)
    for i in range(first, target):
        t = conv.turns[i]
        head = t.head_first if i == first else t.head
        content = t.content[cut_user:] if i == last_user else t.content
        body = content + t.end
        ids += head + body + t.tail
        labels += [IGNORE_INDEX] * len(head)
        labels += body if i in learned else [IGNORE_INDEX] * len(body)
        labels += [IGNORE_INDEX] * len(t.tail)
    t = conv.turns[target]
    head = t.head_first if target == first else t.head
    ids += head
    labels += [IGNORE_INDEX] * len(head)
    return ids, labels


def _fit_prompt(conv: TokConversation, target: int, max_src_len: int | None) -> tuple[int, int, bool] | None:
    """Choose the first kept turn and the user cut so the prompt fits ``max_src_len``.

    Oldest complete rounds go first, then tokens from the start of the last user text (the end of
    a question sits next to the answer and matters most). Returns ``(first, cut_user, truncated)``,
    or None when even that is not enough (the system text alone is too long).
    """
    starts = _round_starts(conv, target) or [0]
    k = 0
    length = len(_build_prompt(conv, starts[k], target)[0])
    if max_src_len is None or length <= max_src_len:
        return starts[0], 0, False
    while length > max_src_len and k + 1 < len(starts):
        k += 1
        length = len(_build_prompt(conv, starts[k], target)[0])
    cut = 0
    if length > max_src_len:
        cut = length - max_src_len
        if cut > len(conv.turns[starts[-1]].content):
            return None
    return starts[k], cut, True


def assemble(
    conv: TokConversation,
    target: int,
    learned: set[int],
    *,
    max_len: int | None = None,
    max_src_len: int | None = None,
    is_skip: bool = False,
) -> AssembleResult:
    """Build ``input_ids``/``labels`` for the sample ending at assistant turn ``target``.

    Length handling (the RolePlayProj recipe's ``max_len``/``max_src_len``): the prompt side (all
    before the target answer) is cut to ``max_src_len`` -- oldest history rounds first, then the
    start of the last user text -- and the answer is cut (its end ids kept) only when it alone
    overflows ``max_len``. With ``is_skip`` a sample that would need any cut is dropped instead.
    """
    fit = _fit_prompt(conv, target, max_src_len)
    if fit is None:
        return AssembleResult(None, None, dropped="prompt longer than max_src_len even after truncation")
    first, cut_user, cut_prompt = fit
    if cut_prompt and is_skip:
        return AssembleResult(None, None, dropped="too long (is_skip)")
    prompt, labels = _build_prompt(conv, first, target, cut_user, learned)
    t = conv.turns[target]

    answer = t.content
    tail = t.tail if conv.keep_final_tail else []
    cut_answer = False
    if max_len is not None and len(prompt) + len(answer) + len(t.end) + len(tail) > max_len:
        room = max_len - len(prompt) - len(t.end) - len(tail)
        if is_skip:
            return AssembleResult(None, None, dropped="too long (is_skip)")
        if room < 1:
            return AssembleResult(None, None, dropped="no room for the answer within max_len")
        answer = answer[:room]
        cut_answer = True
    body = answer + t.end
    ids = prompt + body + tail
    labels += list(body) if target in learned else [IGNORE_INDEX] * len(body)
    labels += [IGNORE_INDEX] * len(tail)
    return AssembleResult(ids, labels, truncated_prompt=cut_prompt, truncated_answer=cut_answer)
