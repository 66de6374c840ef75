"""The on-disk conversation format: reading, validation and atomic writing.

One conversation per JSONL line::

    {"system": str?, "tools": [...]?,
     "conversations": [{"role": "user"|"assistant"|"tool"|"observation", "content": str, ...}, ...]}

Roles:
  * ``user``        -- the human turn.
  * ``assistant``   -- the model's answer (the only role that can carry loss).
  * ``tool``        -- a tool call made by the assistant (``content``, or ``name`` + ``parameters``).
  * ``observation`` -- the result of the preceding tool call.

A turn sequence must read ``user (tool observation)* (assistant | tool observation ...)`` per round:
it starts with ``user``; ``user`` is followed by ``assistant`` or ``tool``; ``tool`` by ``observation``;
``observation`` by ``assistant`` or ``tool``; ``assistant`` by ``user`` or ``tool``. A training
record needs at least one assistant turn and must end with one.

Accepted as input and normalised to the format above:
  * Alpaca records ``{"instruction", "input"?, "output"}``: with a non-empty ``input`` they read as
    system=instruction, user=input (the RolePlayProj recipe's layout: the instruction is the role's
    system prompt); with an empty ``input`` as user=instruction. ``output`` is the assistant turn.
  * ChatGLM3-style records: a leading ``{"role": "system", "content": ..., "tools": [...]}`` turn
    moves to ``system``/``tools``; a ``tool`` turn carrying an ``observation`` field is split into a
    ``tool`` turn and an ``observation`` turn.

Other top-level keys (``references``, ``meta``, ...) are kept unchanged.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from sft.core.atomic import replacing_dir, write_file_atomic

ROLES = ("user", "assistant", "tool", "observation")
# Labels of a tokenised sample: the token ids to learn, this value where nothing is learned (everywhere in the
# project: templates, datasets, losses).
IGNORE_INDEX = -100
# Which roles may follow which (None = start of the conversation).
_ALLOWED_NEXT: dict[str | None, tuple[str, ...]] = {
    None: ("user",),
    "user": ("assistant", "tool"),
    "assistant": ("user", "tool"),
    "tool": ("observation",),
    "observation": ("assistant", "tool"),
}


class DataFormatError(ValueError):
    """A record that does not follow the conversation format; the message names file and line."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None) -> None:
        self.source = source
        self.line = line
        self.reason = message
        where = f"{source}:{line}: " if source is not None and line is not None else ""
        if source is not None and line is None:
            where = f"{source}: "
        super().__init__(where + message)


def skip_reason(err: DataFormatError) -> str:
    """A short, count-friendly reason for a skipped record (turn index and details dropped)."""
    reason = re.sub(r"^turn \d+( \(\w+\))?: ", "", err.reason)
    return reason.split(";")[0].split(" (")[0].split(", got")[0]


def _fail(message: str, source: str | None, line: int | None) -> DataFormatError:
    return DataFormatError(message, source=source, line=line)


def tool_call_text(turn: dict[str, Any]) -> str:
    """The text a ``tool`` turn is rendered as: its ``content``, else JSON of ``name``/``parameters``."""
    content = turn.get("content")
    if isinstance(content, str) and content.strip():
        return content
    call = {"name": turn.get("name"), "parameters": turn.get("parameters", {})}
    return json.dumps(call, ensure_ascii=False)


def alpaca_to_conversation(
    obj: dict[str, Any], *, source: str | None = None, line: int | None = None
) -> dict:
    """Map an Alpaca ``{"instruction", "input", "output"}`` record to a conversation record."""
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str):
            raise _fail(
                f"alpaca record: field {key!r} must be a string, got {type(obj.get(key)).__name__}",
                source,
                line,
            )
    inp = obj.get("input", "")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise _fail(f"alpaca record: field 'input' must be a string, got {type(inp).__name__}", source, line)
    rest = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output")}
    if inp.strip():
        record = {"system": obj["instruction"], "conversations": [{"role": "user", "content": inp}]}
    else:
        record = {"conversations": [{"role": "user", "content": obj["instruction"]}]}
    record["conversations"].append({"role": "assistant", "content": obj["output"]})
    record.update(rest)
    return record


def normalize_record(
    obj: Any, *, source: str | None = None, line: int | None = None, for_generation: bool = False
) -> dict[str, Any]:
    """Validate one record and return it in the canonical conversation format.

    Args:
        obj: the parsed JSON value of one line.
        source, line: where it came from, for error messages.
        for_generation: allow a conversation that ends with ``user``/``observation`` (a prompt to
            answer) or has no assistant turn; training records must end with an assistant turn.

    Raises:
        DataFormatError: naming ``source:line`` and what is wrong.
    """
    if not isinstance(obj, dict):
        raise _fail(f"expected a JSON object, got {type(obj).__name__}", source, line)
    if "conversations" not in obj and "instruction" in obj:
        obj = alpaca_to_conversation(obj, source=source, line=line)
    if "conversations" not in obj:
        raise _fail(
            "missing field 'conversations' (or 'instruction'/'output' for Alpaca records); "
            f"found keys {sorted(obj)}",
            source,
            line,
        )
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise _fail("'conversations' must be a non-empty list of turns", source, line)

    record = {k: v for k, v in obj.items() if k != "conversations"}
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise _fail(f"'system' must be a string, got {type(system).__name__}", source, line)
    if system is None:
        record.pop("system", None)

    out: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _fail(f"turn {i}: expected an object, got {type(turn).__name__}", source, line)
        role = turn.get("role")
        if role == "system":
            # ChatGLM3 style: a leading system turn carries the system prompt and tool list.
            if i != 0:
                raise _fail(f"turn {i}: a 'system' turn is only allowed first", source, line)
            content = turn.get("content", "")
            if not isinstance(content, str):
                raise _fail("turn 0: system 'content' must be a string", source, line)
            if "system" in record and content:
                raise _fail("both a top-level 'system' and a system turn are given; keep one", source, line)
            if content:
                record["system"] = content
            if "tools" in turn:
                record["tools"] = turn["tools"]
            continue
        if role not in ROLES:
            raise _fail(f"turn {i}: unknown role {role!r}; expected one of {list(ROLES)}", source, line)
        turn = dict(turn)
        if role == "tool":
            content = turn.get("content")
            has_call = isinstance(turn.get("name"), str) and turn["name"]
            if not (isinstance(content, str) and content.strip()) and not has_call:
                raise _fail(
                    f"turn {i}: a tool turn needs 'content' or a 'name' (+ 'parameters')", source, line
                )
            observation = turn.pop("observation", None)
            turn["content"] = tool_call_text(turn)
            out.append(turn)
            if observation is not None:
                if not isinstance(observation, str):
                    observation = json.dumps(observation, ensure_ascii=False)
                out.append({"role": "observation", "content": observation})
            continue
        content = turn.get("content")
        if not isinstance(content, str):
            raise _fail(
                f"turn {i} ({role}): 'content' must be a string, got {type(content).__name__}", source, line
            )
        if role == "assistant" and not content.strip():
            raise _fail(f"turn {i}: empty assistant content (nothing to learn)", source, line)
        out.append(turn)

    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _fail(f"'tools' must be a list, got {type(tools).__name__}", source, line)
    if tools is None:
        record.pop("tools", None)

    validate_turn_order(out, source=source, line=line, for_generation=for_generation)
    record["conversations"] = out
    return record


def validate_turn_order(
    turns: list[dict[str, Any]],
    *,
    source: str | None = None,
    line: int | None = None,
    for_generation: bool = False,
) -> None:
    """Check the role sequence (see module docstring); raise :class:`DataFormatError` if it is wrong."""
    if not turns:
        raise _fail("conversation has no turns", source, line)
    prev: str | None = None
    for i, turn in enumerate(turns):
        role = turn["role"]
        if role not in _ALLOWED_NEXT[prev]:
            after = "at the start" if prev is None else f"after {prev!r}"
            raise _fail(
                f"turn {i}: role {role!r} not allowed {after}; expected one of {list(_ALLOWED_NEXT[prev])} "
                "(conversations alternate user -> assistant, tool -> observation)",
                source,
                line,
            )
        prev = role
    if for_generation:
        return
    if not any(t["role"] == "assistant" for t in turns):
        raise _fail("conversation has no assistant turn (nothing to learn)", source, line)
    if prev != "assistant":
        raise _fail(
            f"conversation ends with a {prev!r} turn; a training record must end with an assistant turn",
            source,
            line,
        )


def iter_json_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_value)`` from a JSONL file or a JSON array file.

    A file whose first non-blank character is ``[`` is read as one JSON array (the line number is
    then the 1-based item index); otherwise every non-blank line is one JSON value. Blank lines are
    ignored. Raises :class:`DataFormatError` for an empty file or a line that is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataFormatError(
            f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): re-save the file as UTF-8",
            source=str(path),
            line=line,
        ) from err
    if not text.strip():
        raise DataFormatError("file is empty (no records)", source=str(path))
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"invalid JSON array: {err.msg}", source=str(path), line=err.lineno
            ) from err
        yield from enumerate(items, start=1)
        return
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"invalid JSON ({err.msg} at column {err.colno}): {raw[:80]!r}", source=str(path), line=lineno
            ) from err
        yield lineno, value


def read_conversations(
    path: str | os.PathLike,
    *,
    skip_invalid: bool = False,
    for_generation: bool = False,
    skipped: Counter | None = None,
) -> list[dict[str, Any]]:
    """Read and validate a conversation (or Alpaca) file; return canonical records.

    Args:
        path: JSONL (or JSON array) file.
        skip_invalid: count invalid records in ``skipped`` instead of raising (malformed JSON and an
            empty file still raise: they are not records).
        for_generation: see :func:`normalize_record`.
        skipped: a Counter that receives ``reason -> count`` for skipped records.
    """
    records = []
    for lineno, value in iter_json_records(path):
        try:
            records.append(
                normalize_record(value, source=str(path), line=lineno, for_generation=for_generation)
            )
        except DataFormatError as err:
            if not skip_invalid:
                raise
            if skipped is not None:
                skipped[skip_reason(err)] += 1
    if not records:
        raise DataFormatError("no valid records", source=str(path))
    return records


def split_prompt(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split a conversation record into the part to prompt with and the reference answers.

    A record that ends with an assistant turn is a test example: that turn is the reference and
    everything before it is the prompt. The record's ``references`` (several answers, e.g. DialogSum
    test, RoleBench) replace it when present. A record ending with a user turn is a bare prompt.
    """
    turns = record["conversations"]
    references = record.get("references")
    if turns[-1]["role"] == "assistant":
        if references is None:
            references = [turns[-1]["content"]]
        turns = turns[:-1]
    prompt_record = {k: v for k, v in record.items() if k not in ("conversations", "references")}
    prompt_record["conversations"] = turns
    return prompt_record, [str(r) for r in (references or [])]


def _write_jsonl(fh: IO[str], records: Iterable[dict[str, Any]]) -> int:
    count = 0
    for record in records:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    return count


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSONL to a temp file next to ``path`` and rename it into place.

    A crash or an error while writing (a full disk) leaves ``path`` as it was, and no temporary file or new
    directory behind; the file's permissions are those of a plain ``open(path, "w")``. Returns the count.
    """
    return write_file_atomic(path, lambda fh: _write_jsonl(fh, records))


def write_jsonl_dir_atomic(
    out_dir: str | os.PathLike, files: Mapping[str, Iterable[dict[str, Any]]]
) -> dict[str, int]:
    """Write several JSONL files into ``out_dir`` as one change: after a crash or an error (a full disk) the
    folder holds all the old files or all the new ones, never a new train.jsonl beside an old test.jsonl.

    Other entries of an existing ``out_dir`` are kept. Returns the count of records per file name.
    """
    counts = {}
    with replacing_dir(out_dir, keep_other_entries=True) as staging:
        for name, records in files.items():
            try:
                with open(staging / name, "x", encoding="utf-8") as fh:
                    counts[name] = _write_jsonl(fh, records)
            except OSError as err:  # a full disk: name the file the user asked for, not the staging copy
                raise OSError(err.errno, err.strerror, str(Path(out_dir) / name)) from err
    return counts
