"""Flags declared once, as typed dataclass fields: argparse flags, ``--help`` and the docs' flag tables.

Every script declares its arguments as dataclass fields made with :func:`flag` (a help text, optional
``choices``, ``aliases``, ...); :func:`add_arguments` turns a dataclass into argparse flags of the same names,
one ``--help`` section per group dataclass, and :func:`parse_flags` (:func:`parse_command`) reads them back
into the typed object, checked: every problem its ``problems()`` finds is reported together, before any work.
:class:`ArgumentParser` reports a bad flag as one :class:`ArgsError` line; :func:`flag_table` writes docs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sft.core.errors import ArgsError

REQUIRED: Any = dataclasses.MISSING  # flag(REQUIRED, ...): a flag the user must give


DEBUG_FLAG = "--debug"
_COMMAND = "_flags_command"  # where add_command leaves a sub-command's (name, dataclass) in the namespace


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
    default: Any,
    help: str,
    *,
    choices: Iterable[Any] | None = None,
    aliases: Iterable[str] = (),
    option: str | None = None,
    positional: bool = False,
    action: str | None = None,
    const: Any = None,
) -> Any:
    """A dataclass field that becomes the flag ``--<name>`` (plus ``aliases``) with this help text.

    The field's type is the flag's: ``bool`` a ``--x/--no-x`` pair (``action="store_true"``: a plain switch
    ``--x``), ``list[T]`` one or more values (a list default is copied for each instance), ``T | None`` a
    ``T`` that may be left out. ``default=REQUIRED`` makes a required flag; ``option`` spells the flag when it
    is not ``--<name>`` (``--type`` for ``out_type``, ``--vocab-size``); ``positional`` makes a required
    argument without a flag name. ``const``: the value may be left out, and the bare flag gives ``const``
    (``--modelfile`` / ``--modelfile PATH``). Fields are keyword-only, so required ones may follow defaults.
    """
    metadata = {"help": help, "aliases": tuple(aliases), "option": option, "positional": positional}
    metadata.update(choices=choices and tuple(choices), action=action, const=const)
    if isinstance(default, list):
        return dataclasses.field(default_factory=default.copy, metadata=metadata, kw_only=True)
    return dataclasses.field(default=default, metadata=metadata, kw_only=True)


def flag_of(cls: type, name: str, *, defaults_from: str | None = None) -> Any:
    """The flag ``name`` of the dataclass ``cls``, declared again in another one (another script, section or
    place in ``--help``). ``defaults_from``: its default becomes None and the help says where the value then
    comes from (``evaluate.py ppl``: "default: the adapter's train_args.json ...")."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if defaults_from is None:
        return dataclasses.field(
            default=f.default, default_factory=f.default_factory, metadata=f.metadata, kw_only=True
        )
    metadata = {**f.metadata, "help": f"{f.metadata['help']} (default: {defaults_from})"}
    return dataclasses.field(default=None, metadata=metadata, kw_only=True)


def _declaring_class(cls: type, name: str) -> type:
    """The most derived class in ``cls``'s hierarchy that declares field ``name`` (its ``--help`` section)."""
    return next(klass for klass in cls.__mro__ if name in inspect.get_annotations(klass))


def _section(klass: type) -> str | None:
    """The ``--help`` section of the flags that ``klass`` declares: its ``flag_group`` if it sets one (None:
    the parser's own "options" list), else the first line of its docstring."""
    if "flag_group" in vars(klass):
        return klass.flag_group
    return (klass.__doc__ or klass.__name__).strip().splitlines()[0].rstrip(".")


def _add_flag(target: Any, f: dataclasses.Field, tp: Any) -> None:
    """``add_argument`` for the field ``f`` of type ``tp`` (``X | None`` counts as X)."""
    if isinstance(tp, types.UnionType):
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    meta = f.metadata
    # argparse %-formats help strings ("%(default)s"): a literal % (e.g. "~30% slower") must be doubled.
    kwargs: dict[str, Any] = {"help": meta["help"].replace("%", "%%")}
    if tp is bool:
        kwargs["action"] = meta["action"] or argparse.BooleanOptionalAction
    else:
        if typing.get_origin(tp) is list:
            kwargs["nargs"], tp = "+", typing.get_args(tp)[0]
        kwargs["type"] = tp
        if meta.get("const") is not None:
            kwargs.update(nargs="?", const=meta["const"])
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
    if meta["positional"]:
        target.add_argument(f.name, **kwargs)
        return
    if f.default_factory is not dataclasses.MISSING:
        kwargs["default"] = f.default_factory()
    elif f.default is dataclasses.MISSING:
        kwargs.update(default=None, required=True)
    else:
        kwargs["default"] = f.default
    target.add_argument(meta["option"] or f"--{f.name}", *meta["aliases"], dest=f.name, **kwargs)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one flag per field of the dataclass ``cls`` to ``parser`` (returned), in the order of the fields.

    The fields ``cls`` declares itself are the script's own flags, listed under "options"; an inherited field
    goes into the ``--help`` section of the group dataclass that declares it (:func:`_section`), so a dataclass
    made of groups (``TrainArgs``) shows one section per group.
    """
    hints = typing.get_type_hints(cls)
    sections: dict[type, Any] = {cls: parser}
    for f in dataclasses.fields(cls):
        owner = _declaring_class(cls, f.name)
        if owner not in sections:
            title = _section(owner)
            sections[owner] = parser if title is None else parser.add_argument_group(title)
        _add_flag(sections[owner], f, hints[f.name])
    return parser


def add_command(
    commands: argparse._SubParsersAction, name: str, cls: type, **kwargs: Any
) -> argparse.ArgumentParser:
    """The sub-command ``name`` (``commands`` = a parser's ``add_subparsers()``) with the flags of the dataclass
    ``cls``; ``kwargs`` (help, description, formatter_class) go to ``add_parser``. See :func:`parse_command`."""
    parser = add_arguments(commands.add_parser(name, **kwargs), cls)
    parser.set_defaults(**{_COMMAND: (name, cls)})
    return parser


def _checked(parser: argparse.ArgumentParser, cls: type, namespace: argparse.Namespace) -> Any:
    """The parsed flags as a ``cls``, if its ``problems()`` (when it has one) finds none; else every problem at
    once: one :class:`ArgsError` (exit status 2), or a plain argparse parser's usage error (exit status 2 too)."""
    args = cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})
    problems = args.problems() if hasattr(args, "problems") else []
    if problems and isinstance(parser, ArgumentParser):
        raise ArgsError(problems)
    if problems:
        parser.error("; ".join(problems))
    return args


def parse_flags(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str] | None) -> Any:
    """The command line ``argv`` as a ``cls`` (whose flags :func:`add_arguments` gave ``parser``), checked
    before any work: the problems its ``problems()`` method finds are reported together."""
    return _checked(parser, cls, parser.parse_args(argv))


def parse_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[str, Any]:
    """The sub-command of ``argv`` (see :func:`add_command`) and its flags as its dataclass, checked."""
    namespace = parser.parse_args(argv)
    name, cls = getattr(namespace, _COMMAND)
    return name, _checked(parser, cls, namespace)


def flag_table(cls: type) -> str:
    """Markdown tables of the flags of ``cls``, one per declaring dataclass (for docs/, kept current by a test)."""
    sections: dict[type, list[str]] = {}
    for f in dataclasses.fields(cls):
        owner = _declaring_class(cls, f.name)
        names = " / ".join(f"`{n}`" for n in (f"--{f.name}", *f.metadata["aliases"]))
        default = f.default if f.default is not dataclasses.MISSING else ""
        shown = {"True": "on", "False": "off", "": ""}.get(str(default), f"`{default}`")
        text = f.metadata["help"].replace("|", "\\|")
        if f.metadata["choices"]:
            text += " One of " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
        sections.setdefault(owner, []).append(f"| {names} | {shown} | {text} |")
    out = []
    for owner, rows in sections.items():
        out += [
            f"**{_section(owner)}**",
            "",
            "| flag | default | meaning |",
            "| --- | --- | --- |",
            *rows,
            "",
        ]
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
