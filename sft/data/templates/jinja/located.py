"""Answers located in each sample's own rendering: the ``tokenizer`` template where the piece model does not fit.

Two kinds of chat templates come here (:mod:`sft.data.templates.jinja` tries the piece model first):

* templates that are not prefix-stable: rendering a longer conversation changes an earlier part, so no turn can
  be cut out of a prefix rendering. Qwen3 gives the answers after the last question a ``<think>`` block that
  earlier answers lose; Phi-3 ends every rendering with ``<|endoftext|>``;
* templates that mark the answers with ``{% generation %}``.

A sample (one per :func:`sft.data.templates.base.sample_plan` entry) is the template's rendering of the
conversation up to its target answer, tokenised as a whole. Its learned answers are found in it:

* ``{% generation %}`` templates: the runs of transformers' assistant-token mask
  (``apply_chat_template(..., return_assistant_tokens_mask=True)``), one per assistant message, in order;
* other templates: answer k starts where the rendering of the turns before it *with the generation prompt* ends,
  when that is a prefix of the sample's rendering, so a reasoning block the template writes before the answer
  (Qwen3's ``<think>...</think>``) is learned with it; else where its text (stripped, or after ``</think>``)
  first appears after the previous answer. Character positions become tokens through the tokenizer's offsets.

Either way an answer is learned up to and including the special token that ends it (``<|im_end|>``,
``<|end|>``, ``</s>``): a mask run without one gets the special token right after it.

Truncation is :func:`sft.data.templates.base.assemble`'s: a prompt over ``max_src_len`` is rendered again
without its oldest rounds (so a kept conversation starts as the template starts one), then cut at the start of
its last user text; an answer over ``max_len`` is cut, its end token kept. Nothing here is needed to *prompt* a
model: inference renders the history with the generation prompt (:meth:`JinjaTemplate.build_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft.data import LOSS_PLACEMENTS
from sft.data.formats import IGNORE_INDEX
from sft.data.templates.base import AssembleResult
from sft.data.templates.jinja.messages import find_text, refusal, to_messages

# ``template`` below is a :class:`sft.data.templates.jinja.JinjaTemplate` (which imports this module).
JinjaTemplate = Any


@dataclass
class LocatedRendered:
    """A record whose samples are rendered one by one: ``plan`` holds ``(target, learned message indices)`` per
    sample, ``texts`` each sample's rendering from the first message (re-rendered shorter when truncated)."""

    system: list[dict]
    messages: list[dict]
    tools: list | None
    roles: list[str]
    plan: list[tuple[int, list[int]]]
    texts: list[str]


@dataclass
class _Layout:
    """One sample's tokens: ``spans`` = (answer start, content stop, end stop) token positions per learned
    answer (the target last); ``user`` = the token range of the last user text before the target."""

    ids: list[int]
    spans: list[tuple[int, int, int]]
    user: tuple[int, int]


def render_samples(template: JinjaTemplate, record: dict[str, Any], loss_on: str) -> LocatedRendered:
    """Render every sample of a normalised record for ``loss_on`` (``"all"``: one sample learning every answer,
    ``"last"``: the final one, ``"each"``: one sample per answer, ending with it)."""
    if loss_on not in LOSS_PLACEMENTS:
        raise ValueError(f"loss_on must be one of {LOSS_PLACEMENTS}, got {loss_on!r}")
    system, messages, tools = to_messages(record)
    roles = [t["role"] for t in record["conversations"]]
    answers = [k for k, role in enumerate(roles) if role == "assistant"]
    plan = {
        "all": [(answers[-1], answers)],
        "last": [(answers[-1], answers[-1:])],
        "each": [(k, [k]) for k in answers],
    }[loss_on]
    texts = template.apply([system + messages[: target + 1] for target, _ in plan], tools, False)
    template.check_rendered("tool definitions", tools, texts[-1])
    calls = [c for m in messages for c in m.get("tool_calls", [])]
    template.check_rendered("tool calls", calls, texts[-1])
    return LocatedRendered(system, messages, tools, roles, plan, texts)


def _find_answer(text: str, content: str, start: int) -> tuple[int, int] | None:
    """The first place at or after ``start`` of an answer's text as templates render it: verbatim, stripped
    (``| trim``), or the part after a ``</think>`` block the template took out and wrote itself."""
    forms = [content, content.strip()]
    if "</think>" in content:
        forms.append(content.rsplit("</think>", 1)[1].strip())
    for form in dict.fromkeys(f for f in forms if f):
        pos = text.find(form, start)
        if pos >= 0:
            return pos, pos + len(form)
    return None


def _located_spans(
    template: JinjaTemplate, r: LocatedRendered, first: int, learned: list[int], text: str
) -> list[tuple[int, int, int]]:
    """Character spans (answer start, text stop, end-token stop) of the learned answers in ``text``, the
    rendering of the sample's messages from ``first`` on."""
    prompts = template.apply([r.system + r.messages[first:j] for j in learned], r.tools, True)
    spans, pos = [], 0
    for j, prompt in zip(learned, prompts):
        start = len(prompt) if text.startswith(prompt) and len(prompt) >= pos else None
        found = _find_answer(text, r.messages[j]["content"], pos if start is None else start)
        mark = template.special_re.search(text, found[1]) if found else None
        if mark is None:
            if j != learned[-1]:  # --loss_on last helps only when the final answer can be found
                _located_spans(template, r, first, learned[-1:], text)
            reason = (
                "an answer is not rendered verbatim" if found is None else "no special token ends an answer"
            )
            raise refusal(reason, loss_on_hint=j != learned[-1])
        spans.append((found[0] if start is None else start, found[1], mark.end()))
        pos = mark.end()
    return spans


def _mask_spans(
    template: JinjaTemplate, r: LocatedRendered, first: int, learned: list[int], ids: list[int]
) -> list[tuple[int, int, int]]:
    """Token spans of the learned answers from transformers' assistant-token mask (``{% generation %}``)."""
    messages = r.system + r.messages[first : learned[-1] + 1]
    out = template.tokenizer.apply_chat_template(
        [messages], tools=r.tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = out["assistant_masks"][0]
    if list(out["input_ids"][0]) != list(ids):
        raise refusal("its generation mask was computed over other tokens")
    runs, start = [], None
    for i, on in enumerate([*mask, 0]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    speakers = [k for k in range(first, learned[-1] + 1) if r.messages[k]["role"] == "assistant"]
    if len(runs) != len(speakers):
        raise refusal(f"{len(runs)} {{% generation %}} blocks for {len(speakers)} assistant messages")
    specials = template.special_ids
    spans = []
    for j in learned:
        s, e = runs[speakers.index(j)]
        if ids[e - 1] not in specials and e < len(ids) and ids[e] in specials:
            e += 1  # the end-of-turn token the block leaves out
        c = e
        while c > s + 1 and ids[c - 1] in specials:
            c -= 1
        spans.append((s, c, e))
    return spans


def _layout(
    template: JinjaTemplate, r: LocatedRendered, first: int, learned: list[int], text: str
) -> _Layout:
    encoding = template.encoded(text)
    ids, offsets = encoding[0], encoding[1]
    if template.marks_generation:
        spans = _mask_spans(template, r, first, learned, ids)
        prompt_stop = offsets[spans[-1][0]][0] if spans[-1][0] < len(ids) else len(text)
    else:
        chars = _located_spans(template, r, first, learned, text)
        spans = [tuple(template.token_cut(encoding, c) for c in span) for span in chars]
        prompt_stop = chars[-1][0]
    users = [k for k in range(first, learned[-1]) if r.roles[k] == "user"]
    found = find_text(text, r.messages[users[-1]]["content"], 0, prompt_stop) if users else None
    user = tuple(template.token_cut(encoding, c) for c in found) if found else (0, 0)
    return _Layout(list(ids), spans, user)


def _sample(
    template: JinjaTemplate,
    r: LocatedRendered,
    index: int,
    *,
    max_len: int | None,
    max_src_len: int | None,
    is_skip: bool,
) -> AssembleResult:
    """Sample ``index`` of the plan, truncated as :func:`sft.data.templates.base.assemble` truncates."""
    target, learned = r.plan[index]
    starts = [0] + [i for i in range(1, target) if r.roles[i] == "user"]
    for first in starts:  # oldest rounds first
        text = (
            r.texts[index]
            if first == 0
            else template.apply([r.system + r.messages[first : target + 1]], r.tools, False)[0]
        )
        layout = _layout(template, r, first, [j for j in learned if j >= first], text)
        prompt_len = layout.spans[-1][0]
        if max_src_len is None or prompt_len <= max_src_len:
            break
    cut = prompt_len - max_src_len if max_src_len is not None and prompt_len > max_src_len else 0
    if cut > layout.user[1] - layout.user[0]:
        return AssembleResult(None, None, dropped="prompt longer than max_src_len even after truncation")
    truncated_prompt = first > 0 or cut > 0
    if truncated_prompt and is_skip:
        return AssembleResult(None, None, dropped="too long (is_skip)")
    ids = layout.ids
    labels = [IGNORE_INDEX] * len(ids)
    for s, _, e in layout.spans:
        labels[s:e] = ids[s:e]
    a = layout.user[0]  # then the start of the last user text
    del ids[a : a + cut], labels[a : a + cut]
    s, c, e = (p - cut for p in layout.spans[-1])

    truncated_answer = False
    if max_len is not None and len(ids) > max_len:
        room = max_len - s - (e - c) - (len(ids) - e)
        if is_skip:
            return AssembleResult(None, None, dropped="too long (is_skip)")
        if room < 1:
            return AssembleResult(None, None, dropped="no room for the answer within max_len")
        del ids[s + room : c], labels[s + room : c]
        truncated_answer = True
    return AssembleResult(ids, labels, truncated_prompt=truncated_prompt, truncated_answer=truncated_answer)


def samples(
    template: JinjaTemplate,
    r: LocatedRendered,
    *,
    max_len: int | None = None,
    max_src_len: int | None = None,
    is_skip: bool = False,
) -> list[AssembleResult]:
    """Every sample of a rendered record (``None`` ids where one was dropped)."""
    return [
        _sample(template, r, i, max_len=max_len, max_src_len=max_src_len, is_skip=is_skip)
        for i in range(len(r.plan))
    ]
