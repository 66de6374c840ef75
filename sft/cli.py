"""What every command-line entry point shares: typed argument dataclasses turned into flags, path
checks for flags, logging and seeding.

Arguments are declared once, as dataclass fields made with :func:`flag` (a help text, optional
``choices`` and ``aliases``); :func:`add_arguments` turns a dataclass -- or some of its fields -- into
argparse flags of the same names, one argparse group per dataclass a field was declared in, and
:func:`from_namespace` reads them back into the typed object. The same dataclass therefore serves
``train.py`` (all of ``TrainArgs``), ``evaluate.py ppl`` (the data settings, with defaults read from a
checkpoint) and ``predict.py`` / ``web_demo.py`` / ``data_helper.py synthesize`` (model loading and
generation settings), and ``--help`` and docs/TRAINING.md's flag tables come from the same help texts.

:func:`run_entry_point` is every script's error handling: a failure the user can fix ends the run with one
log line naming the file, line or flag and the fix, and one of the exit statuses ``EXIT_*`` below; the
traceback only with ``--debug`` (or, for an unexpected error, in a file the line names).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import logging
import os
import random
import sys
import tempfile
import time
import traceback
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REQUIRED: Any = dataclasses.MISSING  # flag(REQUIRED, ...): a flag the user must give


# The exit statuses of every script (README.md, "When things go wrong").
EXIT_ERROR = 1  # a problem the user can fix: a file, the data, a path, the disk, the hardware
EXIT_USAGE = 2  # the command line itself is wrong (as argparse does)
EXIT_INTERNAL = 70  # an unexpected error, i.e. a bug (EX_SOFTWARE of sysexits.h)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention)
DEBUG_FLAG = "--debug"


class ArgsError(ValueError):
    """Raised with every problem found in the arguments, one per line (exit status 2)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid arguments:\n  - " + "\n  - ".join(problems))


class UserError(Exception):
    """A failure the user can fix (a damaged file, a busy output directory, ...): the message is one line
    naming the file or flag and the fix; the script exits with :attr:`exit_status`, no traceback."""

    exit_status = EXIT_ERROR


# ---------------------------------------------------------------------------------------------
# Dataclasses <-> flags
# ---------------------------------------------------------------------------------------------


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
    return f"<!-- generated:{name} (do not edit: python -m sft.args --update-docs) -->\n{text.strip()}\n<!-- /generated:{name} -->"


def replace_generated(path: Path, name: str, text: str) -> None:
    """Replace the generated block ``name`` of the Markdown file ``path`` by ``text``."""
    content = path.read_text(encoding="utf-8")
    start = content.index(f"<!-- generated:{name} ")
    end = content.index(f"<!-- /generated:{name} -->") + len(f"<!-- /generated:{name} -->")
    path.write_text(content[:start] + generated_block(name, text) + content[end:], encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Paths named by flags
# ---------------------------------------------------------------------------------------------


def require_local_dir(path: str | os.PathLike | None, flag_name: str) -> Path:
    """Return ``path`` as a Path if it is an existing local directory, else raise a one-line ValueError.

    Nothing in this project downloads from a model hub: a hub id such as ``baichuan-inc/Baichuan2-7B-Chat``
    must be downloaded by the user first and passed as a local directory.
    """
    if path is None or str(path) == "":
        raise ValueError(f"{flag_name} is required: pass a local model directory")
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(
            f"{flag_name}={path} is a file, not a directory: pass the model directory that contains it"
        )
    looks_like_hub_id = str(path).count("/") == 1 and not str(path).startswith((".", "/", "~"))
    if looks_like_hub_id:
        raise ValueError(
            f"{flag_name}={path} looks like a hub id, but nothing is downloaded here: download the model "
            "first and pass its local directory"
        )
    raise ValueError(f"{flag_name}={path} does not exist: pass an existing local directory")


def output_path_problem(
    path: str | os.PathLike, flag_name: str, *, kind: str, inputs: Mapping[str, str | os.PathLike] = {}
) -> str | None:
    """Why ``path`` cannot be written as an output file or directory (None when it can).

    Checked before any work, so that a typo does not cost hours of training or generation: the path must
    not be (or, for a directory, contain) one of the ``inputs`` (flag -> path), must have the right kind
    when it exists, and its nearest existing ancestor must be a writable directory (missing directories
    are created later).

    Args:
        kind: ``"file"`` or ``"dir"``.
    """
    target = Path(path).expanduser()
    resolved = target.resolve()
    for in_flag, in_path in inputs.items():
        source = Path(in_path).expanduser().resolve()
        if resolved == source or (kind == "dir" and resolved in source.parents):
            return (
                f"{flag_name}={path} is (or contains) {in_flag}={in_path}: writing there would replace the "
                "input; pass a new path"
            )
    if kind == "file" and target.is_dir():
        return f"{flag_name}={path} is a directory: pass a file name such as {target / 'out.jsonl'}"
    if kind == "dir" and target.exists() and not target.is_dir():
        return f"{flag_name}={path} is a file: pass a directory (it is created if missing)"
    existing = target.parent if kind == "file" else target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{flag_name}={path} cannot be created: {existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag_name}={path} is not writable ({existing} denies write access): pass a path you can write to"
    return None


def check_output_path(
    path: str | os.PathLike, flag_name: str, *, kind: str, inputs: Mapping[str, str | os.PathLike] = {}
) -> None:
    """Raise a one-line ValueError when :func:`output_path_problem` finds one."""
    problem = output_path_problem(path, flag_name, kind=kind, inputs=inputs)
    if problem:
        raise ValueError(problem)


# ---------------------------------------------------------------------------------------------
# Process set-up
# ---------------------------------------------------------------------------------------------


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Configure the root logger once per process.

    Only rank 0 logs at ``level``; other ranks log warnings and errors only, prefixed with their rank, so a
    multi-rank run prints one copy of the progress messages but never hides a failure.
    """
    fmt = LOG_FORMAT if rank == 0 else f"[rank{rank}] {LOG_FORMAT}"
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=fmt,
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # These libraries are chatty at INFO; their warnings still come through.
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # On CPU, bitsandbytes tries to fetch an optional kernel package from a hub at every load and warns when it
    # cannot; its built-in CPU path is used instead, so the warning says nothing the user can act on here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---------------------------------------------------------------------------------------------
# Entry points: one line per failure, documented exit statuses
# ---------------------------------------------------------------------------------------------


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its type name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: the file it concerns and, for a full disk, the fix."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {err.filename}" if err.filename else ""
        return f"no space left on the device{where}: free some space, or write to another disk"
    return one_line(err)


def describe_failure(err: BaseException) -> tuple[int, str]:
    """The exit status and the one-line message for an exception that ended a script.

    Errors the user can fix -- bad flags (:class:`ArgsError`), bad data and refused inputs (ValueError), files,
    paths and disks (OSError), a missing package (ImportError), :class:`UserError` -- name what to change. Any
    other exception is a bug: :data:`EXIT_INTERNAL`.
    """
    if isinstance(err, ArgsError):
        return EXIT_USAGE, "invalid arguments: " + "; ".join(" ".join(p.split()) for p in err.problems)
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C)"
    status = getattr(err, "exit_status", None)
    if isinstance(status, int):
        return status, one_line(err)
    if isinstance(err, OSError):
        return EXIT_ERROR, describe_os_error(err)
    if isinstance(err, torch.OutOfMemoryError):
        return EXIT_ERROR, (
            f"out of memory on the GPU ({one_line(err).split('. ')[0]}): lower the batch size, load the base in "
            "4 bits (--quantization nf4) or, when training, add --gradient_checkpointing"
        )
    if isinstance(err, ImportError):
        missing = f"the Python package {err.name!r} is missing" if err.name else one_line(err)
        return EXIT_ERROR, (
            f"{missing}: install the requirements (pip install -r requirements.txt; the web demo also needs "
            "requirements-demo.txt)"
        )
    if isinstance(err, ValueError):
        return EXIT_ERROR, one_line(err)
    return EXIT_INTERNAL, f"unexpected error (a bug; please report it): {type(err).__name__}: {one_line(err)}"


def _save_traceback(err: BaseException, name: str) -> Path | None:
    """Write the traceback of ``err`` to a file in the temp directory; None when that fails too."""
    path = Path(tempfile.gettempdir()) / f"{name}-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.write_text("".join(traceback.format_exception(err)), encoding="utf-8")
    except OSError:
        return None
    return path


def run_entry_point(
    main: Callable[[list[str]], object],
    argv: list[str] | None = None,
    *,
    logger: logging.Logger,
    cleanup: Callable[[], None] | None = None,
    interrupt_hint: str = "",
) -> int:
    """Run a script's ``main(argv)`` and turn how it ended into an exit status.

    ``--debug`` is taken off the command line first (every script accepts it). A failure ends with one log
    line, the last on stderr, naming the file, line or flag and the fix (:func:`describe_failure`), and its
    exit status; with ``--debug`` the traceback is logged before it. An unexpected error (a bug) writes its
    traceback to a file the line names. ``--help`` (SystemExit) passes through.

    Args:
        main: the script's work; an int it returns is the exit status, anything else means 0.
        argv: the command line without the program name (default: ``sys.argv[1:]``).
        logger: the script's logger (the error line carries its name).
        cleanup: called after a failure, before returning (e.g. leave the process group).
        interrupt_hint: appended to the Ctrl-C message (how to continue).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    setup_logging(int(os.environ.get("RANK", 0)))
    try:
        result = main(args)
    except SystemExit:
        raise
    except BaseException as err:  # every way a script can end badly, Ctrl-C included: one line each
        status, message = describe_failure(err)
        if isinstance(err, KeyboardInterrupt) and interrupt_hint:
            message += f": {interrupt_hint}"
        if debug:
            logger.error("traceback (--debug):", exc_info=err)
        elif status == EXIT_INTERNAL:
            saved = _save_traceback(err, logger.name)
            if saved is None:
                logger.error("traceback:", exc_info=err)
            else:
                message += f"; the traceback is in {saved} (or rerun with --debug)"
        if cleanup is not None:
            cleanup()
        logger.log(logging.WARNING if status >= 128 else logging.ERROR, "%s", message)
        return status
    return result if isinstance(result, int) else 0
