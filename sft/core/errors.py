"""The failures every entry point reports: the error roots and the exit statuses.

A failure the user can fix ends a script with one line naming the file, line or flag and the fix
(:func:`describe_failure`), and one of the exit statuses ``EXIT_*`` below (README.md, "When things go
wrong"). An error the user can fix raises a :class:`UserError` subclass (or ValueError/OSError); bad flags
raise :class:`ArgsError` with every problem found.
"""

from __future__ import annotations

import errno
import sys

# The exit statuses of every script (README.md, "When things go wrong").
EXIT_ERROR = 1  # a problem the user can fix: a file, the data, a path, the disk, the hardware
EXIT_USAGE = 2  # the command line itself is wrong (as argparse does)
EXIT_INTERNAL = 70  # an unexpected error, i.e. a bug (EX_SOFTWARE of sysexits.h)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention)


class ArgsError(ValueError):
    """Raised with every problem found in the arguments, one per line (exit status 2)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid arguments:\n  - " + "\n  - ".join(problems))


class UserError(Exception):
    """A failure the user can fix (a damaged file, a busy output directory, ...): the message is one line
    naming the file or flag and the fix; the script exits with :attr:`exit_status`, no traceback."""

    exit_status = EXIT_ERROR


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
    torch = sys.modules.get("torch")  # not imported: then no error of torch's can have ended the script
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
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
