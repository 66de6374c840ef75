"""Converters from public data sets to conversation records (see :mod:`sft.data.formats`).

Each converter is a pure function returning ``(records, stats)``; ``data_helper.py`` wraps them in
a CLI and writes the files atomically. Every converter is deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft.data.formats import DataFormatError, iter_json_records, normalize_record, skip_reason

ROLEBENCH_SYSTEM_TEMPLATE = (
    "你是{role}，你的特征描述是：{desc}。现在请你回答我的一些问题，以准确展现你的人格特征！"
    "你的说话风格要全面模仿被赋予的人格角色！请不要暴露你是人工智能模型或者语言模型，"
    "你要时刻记住你只被赋予的一个人格角色。说话不要啰嗦，也不要太过于正式或礼貌。"
)
"""Default RoleBench system prompt (the RolePlayProj recipe's wording, with ``{role}``/``{desc}``)."""

ROLEBENCH_SUBSETS = ("role_specific", "general")
# The longest address observed in the role-specific questions is 5 characters ("孙悟空大圣");
# 6 leaves a little room while keeping real clauses such as "张飞将来到耒阳县巡视" (10) intact.
MAX_ADDRESS_CHARS = 6

DOLLY_FORWARD_TEMPLATE = "{instruction}\n\n{context}"
DOLLY_REVERSE_PROMPT = (
    "Below is a response written by an assistant{context_note}. Write the user instruction that this "
    "response answers best: the request a person would most plausibly have typed to get exactly this "
    "response. Reply with the instruction only.\n\n"
    "{context_block}### Response:\n{response}"
)
DIALOGSUM_PROMPT = "Summarize the following dialogue in a few sentences.\n\n{dialogue}"


@dataclass
class ConvertStats:
    """Counts reported by every converter: input units read and skipped (by reason), samples written.

    ``unit`` names what ``read`` counts (records; RoleBench: questions, each written as up to
    ``--max_answers`` samples). Every unit read is either skipped or kept.
    """

    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    unit: str = "records"

    @property
    def kept(self) -> int:
        """Input units that gave at least one sample."""
        return self.read - sum(self.skipped.values())

    def lines(self, name: str) -> list[str]:
        """Human-readable report lines (the CLI prints them)."""
        skipped = sum(self.skipped.values())
        out = [
            f"{name}: {self.unit} read {self.read}, kept {self.kept}, skipped {skipped}; "
            f"samples written {self.written}"
        ]
        out += [f"  skipped ({reason}): {n}" for reason, n in sorted(self.skipped.items())]
        out += [f"  {note}: {n}" for note, n in sorted(self.notes.items())]
        return out


def _need_str(obj: dict, key: str, source: str, line: int, *, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        kind = "missing" if key not in obj else f"a {type(value).__name__}, not a string"
        raise DataFormatError(f"field {key!r} is {kind}", source=source, line=line)
    return value


def _handle(err: DataFormatError, stats: ConvertStats, skip_invalid: bool) -> None:
    if not skip_invalid:
        raise err
    stats.skipped[skip_reason(err)] += 1


# ---------------------------------------------------------------------------------------------
# RoleBench
# ---------------------------------------------------------------------------------------------


def strip_role_address(question: str) -> tuple[str, bool]:
    """Drop the leading address to the role from a role-specific RoleBench question.

    Rule: the text before the first comma ("，" or ",") is an address when it is 1-6 characters
    long and does not start with "在" -- e.g. "皇上，", "陛下，", "华妃娘娘，", "孙悟空大圣，". Scene
    phrases such as "在剧中，" and longer clauses are part of the question and are kept; questions
    without such a prefix are returned unchanged.

    The original recipe used ``"".join(q.split("，")[1:])``, which also deleted every later comma and
    turned questions without a comma (e.g. "皇上对于...？") into empty strings; this rule avoids both.

    Returns:
        (question without the address, whether an address was removed)
    """
    for i, ch in enumerate(question[: MAX_ADDRESS_CHARS + 1]):
        if ch in "，,":
            head, rest = question[:i].strip(), question[i + 1 :].strip()
            if head and not head.startswith("在") and rest:
                return rest, True
            break
    return question, False


def clean_text(text: str) -> str:
    """Normalise line endings and strip stray outer whitespace; inner newlines are kept (they
    separate an instruction from its input in the general split)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def check_system_template(system_template: str) -> None:
    """Raise ValueError unless ``system_template`` uses no fields but ``{role}`` and ``{desc}``."""
    try:
        system_template.format(role="x", desc="y")
    except (KeyError, IndexError) as err:
        raise ValueError(
            f"--system_template may only use the fields {{role}} and {{desc}}; bad field {err}"
        ) from err


def load_profiles(path: str | Path) -> dict[str, str]:
    """Read ``profiles-zh_desc.json`` (role -> description); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"profiles file not found: {path}")
    try:
        profiles = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"invalid JSON: {err.msg}", source=str(path), line=err.lineno) from err
    if not isinstance(profiles, dict) or not profiles:
        raise DataFormatError("expected a non-empty JSON object role -> description", source=str(path))
    for role, desc in profiles.items():
        if not isinstance(desc, str):
            raise DataFormatError(f"description of role {role!r} must be a string", source=str(path))
    return profiles


def convert_rolebench(
    data_dir: str | Path,
    split: str,
    *,
    roles: list[str] | None = None,
    system_template: str = ROLEBENCH_SYSTEM_TEMPLATE,
    max_answers: int = 2,
    seed: int = 42,
    skip_invalid: bool = False,
    profiles_file: str = "profiles-zh_desc.json",
) -> tuple[list[dict[str, Any]], ConvertStats]:
    """Convert one RoleBench-zh split (``train`` or ``test``) to conversation records.

    Merges ``rolebench-zh_role_specific_{split}.jsonl`` and ``rolebench-zh_general_{split}.jsonl``.
    Each question gives up to ``max_answers`` records (one per ``generated`` answer, picked by a
    shuffle seeded with ``seed``, the file name and the line number, so the choice does not depend
    on ``--roles``). Records: ``{"system", "conversations": [user, assistant], "meta": {...}}``; test
    records also carry ``"references"`` (all answers) for ROUGE.
    """
    data_dir = Path(data_dir)
    if max_answers < 1:
        raise ValueError(f"--max_answers must be >= 1, got {max_answers}")
    check_system_template(system_template)
    profiles_path = data_dir / profiles_file
    profiles = load_profiles(profiles_path)
    selected = list(profiles) if roles is None else list(roles)
    missing = [r for r in selected if r not in profiles]
    if missing:
        raise DataFormatError(
            f"role(s) {missing} given in --roles are not in the profiles file (it has {list(profiles)})",
            source=str(profiles_path),
        )

    stats = ConvertStats(unit="questions")
    records: list[dict[str, Any]] = []
    for subset in ROLEBENCH_SUBSETS:
        path = data_dir / f"rolebench-zh_{subset}_{split}.jsonl"
        for lineno, obj in iter_json_records(path):
            stats.read += 1
            try:
                records.extend(
                    _rolebench_record(
                        obj,
                        str(path),
                        lineno,
                        subset,
                        split,
                        profiles,
                        selected,
                        roles is None,
                        system_template,
                        max_answers,
                        seed,
                        stats,
                    )
                )
            except DataFormatError as err:
                _handle(err, stats, skip_invalid)
    stats.written = len(records)
    return records, stats


def _rolebench_record(
    obj: Any,
    source: str,
    line: int,
    subset: str,
    split: str,
    profiles: dict[str, str],
    selected: list[str],
    selected_all: bool,
    system_template: str,
    max_answers: int,
    seed: int,
    stats: ConvertStats,
) -> list[dict[str, Any]]:
    if not isinstance(obj, dict):
        raise DataFormatError(f"expected a JSON object, got {type(obj).__name__}", source=source, line=line)
    role = _need_str(obj, "role", source, line)
    question = clean_text(_need_str(obj, "question", source, line))
    answers = obj.get("generated")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataFormatError("field 'generated' must be a list of strings", source=source, line=line)
    if role not in selected:
        if role not in profiles and selected_all:
            raise DataFormatError(
                f"role {role!r} is not in the profiles file (it has {list(profiles)}); add its description "
                "there or choose roles with --roles",
                source=source,
                line=line,
            )
        stats.skipped["role not selected (--roles)"] += 1
        return []
    kind = obj.get("type", [])
    kinds = [kind] if isinstance(kind, str) else list(kind or [])
    if subset == "role_specific":
        question, stripped = strip_role_address(question)
        stats.notes[
            "role-specific questions with the address removed"
            if stripped
            else "role-specific questions without an address"
        ] += 1
    if not question:
        stats.skipped["empty question"] += 1
        return []
    answers = [clean_text(a) for a in answers]
    if not all(answers):
        stats.notes["empty answers dropped"] += sum(1 for a in answers if not a)
        answers = [a for a in answers if a]
    if not answers:
        stats.skipped["no non-empty answer"] += 1
        return []
    # Seeded per line (random.Random hashes a str seed with sha512: stable across runs and processes).
    rng = random.Random(f"{seed}:{Path(source).name}:{line}")
    chosen = answers[:]
    rng.shuffle(chosen)
    system = system_template.format(role=role, desc=profiles[role])
    meta = {"role": role, "subset": subset, "type": sorted(set(kinds))}
    out = []
    for answer in chosen[:max_answers]:
        record: dict[str, Any] = {
            "system": system,
            "conversations": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ],
            "meta": meta,
        }
        if split == "test":
            record["references"] = answers
        out.append(record)
    return out


# ---------------------------------------------------------------------------------------------
# Dolly
# ---------------------------------------------------------------------------------------------


def reverse_prompt(response: str, context: str = "") -> str:
    """The user turn of an instruction back-translation sample: :data:`DOLLY_REVERSE_PROMPT` around a
    response (and its reference text when there is one), both already cleaned by :func:`clean_text`.

    ``convert_dolly(reverse=True)`` builds its training samples with it, and ``data_helper.py synthesize``
    prompts the trained reverse model with it, so both see exactly the same text.
    """
    return DOLLY_REVERSE_PROMPT.format(
        context_note=" using the reference text below" if context else "",
        context_block=f"### Reference text:\n{context}\n\n" if context else "",
        response=response,
    )


def convert_dolly(
    path: str | Path, *, reverse: bool = False, skip_invalid: bool = False
) -> tuple[list[dict[str, Any]], ConvertStats]:
    """Dolly-15k records (``instruction, context, response, category``) to conversations.

    Forward: user = instruction (+ blank line + context when present), assistant = response.
    ``reverse``: instruction back-translation -- user = a prompt showing the response (and context),
    assistant = the instruction that produced it.
    """
    stats = ConvertStats()
    records = []
    for lineno, obj in iter_json_records(path):
        stats.read += 1
        try:
            if not isinstance(obj, dict):
                raise DataFormatError(
                    f"expected a JSON object, got {type(obj).__name__}", source=str(path), line=lineno
                )
            instruction = clean_text(_need_str(obj, "instruction", str(path), lineno))
            context = clean_text(_need_str(obj, "context", str(path), lineno, optional=True))
            response = clean_text(_need_str(obj, "response", str(path), lineno))
            category = obj.get("category")
        except DataFormatError as err:
            _handle(err, stats, skip_invalid)
            continue
        if not instruction or not response:
            stats.skipped["empty instruction or response"] += 1
            continue
        if reverse:
            user = reverse_prompt(response, context)
            answer = instruction
        else:
            user = (
                DOLLY_FORWARD_TEMPLATE.format(instruction=instruction, context=context)
                if context
                else instruction
            )
            answer = response
        record: dict[str, Any] = {
            "conversations": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        }
        if category is not None:
            record["meta"] = {"category": category, "direction": "reverse" if reverse else "forward"}
        records.append(record)
    stats.written = len(records)
    return records, stats


# ---------------------------------------------------------------------------------------------
# DialogSum
# ---------------------------------------------------------------------------------------------


def convert_dialogsum(
    path: str | Path, *, prompt: str = DIALOGSUM_PROMPT, skip_invalid: bool = False
) -> tuple[list[dict[str, Any]], ConvertStats]:
    """DialogSum records to summarisation conversations.

    Train/dev lines carry ``summary``; test lines carry ``summary1..3``: the record then keeps
    ``"references": [s1, s2, s3]`` (for ROUGE) and uses the first as the assistant turn.
    """
    if "{dialogue}" not in prompt:
        raise ValueError("the DialogSum prompt must contain '{dialogue}'")
    stats = ConvertStats()
    records = []
    for lineno, obj in iter_json_records(path):
        stats.read += 1
        src = str(path)
        try:
            if not isinstance(obj, dict):
                raise DataFormatError(
                    f"expected a JSON object, got {type(obj).__name__}", source=src, line=lineno
                )
            dialogue = clean_text(_need_str(obj, "dialogue", src, lineno))
            if "summary" in obj:
                references = [clean_text(_need_str(obj, "summary", src, lineno))]
            else:
                keys = sorted(k for k in obj if k.startswith("summary") and k[7:].isdigit())
                if not keys:
                    raise DataFormatError("no 'summary' or 'summary1..N' field", source=src, line=lineno)
                references = [
                    clean_text(_need_str(obj, k, src, lineno)) for k in sorted(keys, key=lambda k: int(k[7:]))
                ]
        except DataFormatError as err:
            _handle(err, stats, skip_invalid)
            continue
        if not dialogue or not references[0]:
            stats.skipped["empty dialogue or summary"] += 1
            continue
        record: dict[str, Any] = {
            "conversations": [
                {"role": "user", "content": prompt.format(dialogue=dialogue)},
                {"role": "assistant", "content": references[0]},
            ],
            "meta": {"fname": obj.get("fname"), "topic": obj.get("topic", obj.get("topic1"))},
        }
        if len(references) > 1:
            record["references"] = references
        records.append(record)
    stats.written = len(records)
    return records, stats


# ---------------------------------------------------------------------------------------------
# Alpaca and generic conversations
# ---------------------------------------------------------------------------------------------


def convert_alpaca(
    path: str | Path, *, skip_invalid: bool = False
) -> tuple[list[dict[str, Any]], ConvertStats]:
    """Alpaca ``{"instruction", "input", "output"}`` (JSONL or a JSON array) to conversations."""
    stats = ConvertStats()
    records = []
    for lineno, obj in iter_json_records(path):
        stats.read += 1
        try:
            if not isinstance(obj, dict) or "instruction" not in obj or "output" not in obj:
                got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataFormatError(
                    f"an Alpaca record needs 'instruction' and 'output' (and optional 'input'); got {got}",
                    source=str(path),
                    line=lineno,
                )
            records.append(normalize_record(obj, source=str(path), line=lineno))
        except DataFormatError as err:
            _handle(err, stats, skip_invalid)
    stats.written = len(records)
    return records, stats


def convert_conversations(
    path: str | Path, *, skip_invalid: bool = False
) -> tuple[list[dict[str, Any]], ConvertStats]:
    """Multi-turn chats (ChatGLM3 style: system turn with tools, tool calls, observations),
    validated and normalised to the canonical format."""
    stats = ConvertStats()
    records = []
    for lineno, obj in iter_json_records(path):
        stats.read += 1
        try:
            record = normalize_record(obj, source=str(path), line=lineno)
        except DataFormatError as err:
            _handle(err, stats, skip_invalid)
            continue
        stats.notes["assistant turns"] += sum(t["role"] == "assistant" for t in record["conversations"])
        stats.notes["tool calls"] += sum(t["role"] == "tool" for t in record["conversations"])
        records.append(record)
    stats.written = len(records)
    return records, stats
