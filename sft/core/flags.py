"""Flags declared once, as typed dataclass fields: argparse flags, ``--help`` and the docs' flag tables.

Arguments are declared as dataclass fields made with :func:`flag` (a help text, optional ``choices`` and
``aliases``); :func:`add_arguments` turns a dataclass -- or some of its fields -- into argparse flags of the
same names, one argparse group per dataclass a field was declared in, and :func:`from_namespace` reads them
back into the typed object. ``--help`` and the Markdown flag tables of docs/ (:func:`flag_table`) come from
the same help texts. :class:`ArgumentParser` reports a bad flag as one :class:`ArgsError` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sft.core.errors import ArgsError

REQUIRED: Any = dataclasses.MISSING  # flag(REQUIRED, ...): a flag the user must give


DEBUG_FLAG = "--debug"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default, except where there is none to show (None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)


class _DebugFlag(argparse.Action):
    """``--debug`` in ``--help``; :func:`run_entry_point` takes it off the command line before parsing, so it
    never reaches a namespace (nor the argument dataclasses)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *args: Any) -> None:
        pass


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' argparse: a bad flag or value raises :class:`ArgsError` (one log line, exit status 2)
    instead of printing the whole usage, and ``--help`` lists ``--debug``. Sub-parsers inherit both."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.add_help:
            self.add_argument(
                DEBUG_FLAG,
                nargs=0,
                action=_DebugFlag,
                default=argparse.SUPPRESS,
                help="On an error, also print the traceback.",
            )

    def error(self, message: str) -> typing.NoReturn:
        """Called by argparse for an unknown flag, a bad value or a missing required flag."""
        raise ArgsError([f"{message} (see --help)"])


def flag(
    default: Any, help: str, *, choices: Iterable[Any] | None = None, aliases: Iterable[str] = ()
) -> Any:
    """A dataclass field that becomes the flag ``--<name>`` (plus ``aliases``) with this help text.

    ``default=REQUIRED`` makes a required flag (such fields come first in their dataclass).
    """
    metadata: dict[str, Any] = {"help": help, "aliases": tuple(aliases)}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


def _field_type(cls: type, name: str) -> type:
    """The runtime type of a field (annotations are strings under ``from __future__``); ``X | None`` -> X."""
    tp = typing.get_type_hints(cls)[name]
    if isinstance(tp, types.UnionType):
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    return tp


def _declaring_class(cls: type, name: str) -> type:
    """The class in ``cls``'s hierarchy that declares field ``name`` (its docstring titles the flag group)."""
    for klass in reversed(cls.__mro__):
        if name in inspect.get_annotations(klass):
            return klass
    return cls


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults_from: str | None = None,
    grouped: bool = True,
) -> None:
    """Add one flag per field of the dataclass ``cls`` to ``parser``.

    Args:
        parser: the parser (or sub-parser) to extend.
        cls: a dataclass whose fields were made with :func:`flag`.
        only / exclude: restrict to these field names (``only`` keeps its own order).
        defaults_from: every default becomes None and the help says where the value comes from
            instead (``evaluate.py ppl``: "default: the adapter's train_args.json").
        grouped: put the flags into one argparse group per declaring dataclass, titled by the first
            line of its docstring (what ``--help`` shows as sections).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(only) if only is not None else list(fields)
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}")
    groups: dict[type, Any] = {}
    for name in names:
        if name in set(exclude):
            continue
        f = fields[name]
        owner = _declaring_class(cls, name)
        target: Any = parser
        if grouped:
            if owner not in groups:
                title = (owner.__doc__ or owner.__name__).strip().splitlines()[0].rstrip(".")
                groups[owner] = parser.add_argument_group(title)
            target = groups[owner]
        tp = _field_type(cls, name)
        # argparse %-formats help strings ("%(default)s"): a literal % (e.g. "~30% slower") must be doubled.
        help_text = f.metadata["help"].replace("%", "%%")
        default = f.default if f.default is not dataclasses.MISSING else None
        if defaults_from is not None:
            help_text += f" (default: {defaults_from})"
            default = None
        kwargs: dict[str, Any] = {"default": default, "help": help_text, "dest": name}
        if f.default is dataclasses.MISSING and defaults_from is None:
            kwargs["required"] = True
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        target.add_argument(f"--{name}", *f.metadata.get("aliases", ()), **kwargs)


def from_namespace(cls: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of ``cls`` from the parsed flags (fields missing from the namespace keep their default)."""
    values = {
        f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)
    }
    return cls(**{**values, **overrides})


def flag_table(cls: type) -> str:
    """Markdown tables of the flags of ``cls``, one per declaring dataclass (for docs/, kept current by a test)."""
    sections: dict[type, list[str]] = {}
    for f in dataclasses.fields(cls):
        owner = _declaring_class(cls, f.name)
        names = " / ".join(f"`{n}`" for n in (f"--{f.name}", *f.metadata.get("aliases", ())))
        default = f.default if f.default is not dataclasses.MISSING else ""
        shown = (
            "on"
            if default is True
            else "off"
            if default is False
            else f"`{default}`"
            if default != ""
            else ""
        )
        text = f.metadata["help"].replace("|", "\\|")
        if "choices" in f.metadata:
            text += " One of " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
        sections.setdefault(owner, []).append(f"| {names} | {shown} | {text} |")
    out = []
    for owner, rows in sections.items():
        title = (owner.__doc__ or owner.__name__).strip().splitlines()[0].rstrip(".")
        out += [f"**{title}**", "", "| flag | default | meaning |", "| --- | --- | --- |", *rows, ""]
    return "\n".join(out)


def generated_block(name: str, text: str) -> str:
    """``text`` between the markers of a generated block of a Markdown file."""
    return f"<!-- generated:{name} (do not edit: python -m sft.train.args --update-docs) -->\n{text.strip()}\n<!-- /generated:{name} -->"


def replace_generated(path: Path, name: str, text: str) -> None:
    """Replace the generated block ``name`` of the Markdown file ``path`` by ``text``."""
    content = path.read_text(encoding="utf-8")
    start = content.index(f"<!-- generated:{name} ")
    end = content.index(f"<!-- /generated:{name} -->") + len(f"<!-- /generated:{name} -->")
    path.write_text(content[:start] + generated_block(name, text) + content[end:], encoding="utf-8")
