"""Writing files and directories so that a reader finds the old version or the complete new one, never a
mix, even when the writer dies half-way (kill -9, a full disk, a failed check).

- :func:`replacing_file` / :func:`write_file_atomic` / :func:`write_json_atomic`: the content goes to a
  temporary sibling, flushed to disk and renamed over the file when complete. This module is the only place
  in the project where a temporary file is renamed into place (tests/test_architecture.py).
- :func:`replacing_dir`: a new version of a whole directory (a merged model, data_helper's output folder)
  is built in a temporary sibling ``.NAME.tmp-PID`` and swapped with the old one in one rename
  (``renameat2(RENAME_EXCHANGE)``, Linux); the old version is deleted only afterwards. Where the exchange
  is not supported, the old directory is renamed aside (``.NAME.old-PID``) just before the new one is
  renamed in: between those two renames there is no ``NAME``, and the next writer puts the old one back.

One writer per directory at a time: a lock file ``.NAME.lock`` next to it, held with flock, which the kernel
releases when the process dies, however it dies. So a writer holding the lock knows that every
``.NAME.tmp-*`` and ``.NAME.old-*`` was left by a writer that is dead, and cleans them up (the temporary copy
of a killed 7B merge is some 14 GB); those of a writer still running are never touched.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import logging
import os
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import IO, Any, TypeVar

from sft.core.errors import UserError

logger = logging.getLogger(__name__)

T = TypeVar("T")
PAUSE_ENV = "SFT_TEST_PAUSE_AT"  # tests only: see pause_point
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class DirectoryBusyError(UserError):
    """Another process is writing the same directory (its lock is held)."""


def pause_point(name: str) -> None:
    """For tests: when ``$SFT_TEST_PAUSE_AT`` is ``name``, say so on stderr and wait here for ever, so that a
    test can kill -9 the process at exactly this point (tests/test_atomic_writes.py). No effect otherwise."""
    if os.environ.get(PAUSE_ENV) == name:
        sys.stderr.write(f"paused at {name}\n")
        sys.stderr.flush()
        while True:
            time.sleep(3600)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def make_parents(directory: Path) -> list[Path]:
    """``mkdir -p directory``; returns the directories it created, outermost first."""
    missing = []
    current = Path(directory)
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    missing.reverse()
    for path in missing:
        path.mkdir(exist_ok=True)
    return missing


def remove_created(directories: list[Path]) -> None:
    """Remove the directories :func:`make_parents` created, innermost first, as long as they are empty."""
    for path in reversed(directories):
        try:
            path.rmdir()
        except OSError:  # not empty (something else was written there meanwhile) or gone: it stays
            return


def plain_file_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file: 0666 minus the umask (read without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:  # no /proc (not Linux): read the umask by setting it, and back at once
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def restore_default_modes(directory: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Give the files in ``directory`` matching ``pattern`` the mode of a plain new file; returns those changed.

    safetensors 0.8 writes through a temporary file created with mode 0600 and renamed into place (safetensors
    issue #782), so weights would be readable by their owner only while the JSON files beside them follow the
    umask; an inference server running as another user could not open them.
    """
    mode = plain_file_mode()
    changed = []
    for path in sorted(Path(directory).glob(pattern)):
        if path.is_file() and (path.stat().st_mode & 0o777) != mode:
            path.chmod(mode)
            changed.append(path)
    return changed


@contextmanager
def replacing_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` when the block ends normally.

    The temporary file exists (empty) when the block starts; on success it is flushed to disk and renamed
    over ``path``, so a reader finds the old content or the complete new one. It gets the permissions a plain
    ``open(path, "w")`` gives: those of the file it replaces, else 0666 minus the umask. On any failure the
    temporary file and the directories created for ``path`` are removed, and an OSError without a file name
    (a full disk) is raised again naming ``path``.
    """
    path = Path(path)
    created = make_parents(path.parent)
    tmp = None
    try:
        while tmp is None:
            candidate = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
            except FileExistsError:
                continue
            tmp = candidate
        try:
            if path.is_file():
                os.fchmod(fd, stat.S_IMODE(path.stat().st_mode))
        finally:
            os.close(fd)
        yield tmp
        with tmp.open("rb+") as fh:  # whoever wrote it (a library by path, or write_file_atomic) is done
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        remove_created(created)
        if isinstance(err, OSError) and err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def write_file_atomic(
    path: str | os.PathLike, write: Callable[[IO], T], *, encoding: str | None = "utf-8"
) -> T:
    """Write a file through :func:`replacing_file`: ``write(fh)`` writes the content, its result is returned.

    A text file in ``encoding``; ``encoding=None`` writes bytes.
    """
    with replacing_file(path) as tmp, tmp.open("w" if encoding else "wb", encoding=encoding) as fh:
        return write(fh)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """:func:`write_file_atomic` of ``data`` as indented JSON (non-ASCII kept as it is)."""
    write_file_atomic(path, lambda fh: fh.write(json.dumps(data, indent=2, ensure_ascii=False)))


# ---------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------


@contextmanager
def replacing_dir(
    target: str | os.PathLike, *, keep_other_entries: bool = False, wait: bool = False
) -> Iterator[Path]:
    """Build a new version of the directory ``target``; it replaces the old one when the block ends normally.

    Yields an empty staging directory (``.NAME.tmp-PID`` next to ``target``) to fill. When the block
    ends normally, the staging directory is flushed to disk and swapped in for ``target`` in one rename,
    then the old version is deleted; when the block raises (a failed check, a full disk), the staging
    directory is deleted and ``target`` is untouched, as are its parents (created ones are removed again).
    A new ``target`` gets the permissions of the one it replaces, else those of a plain mkdir.

    Args:
        target: the directory to write (a symlink to a directory: the directory it points to).
        keep_other_entries: entries of the old version that the new one lacks are carried over (hard
            links, so nothing is copied): for an output folder that also holds the user's own files.
        wait: wait for another process writing ``target`` to finish instead of raising.

    Raises:
        DirectoryBusyError: another process is writing ``target`` now (without ``wait``).
    """
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()
    created = make_parents(target.parent)
    try:
        with _writer_lock(target, wait=wait) as locked:
            if locked:
                _clean_leftovers(target)
            staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
            if staging.exists():
                shutil.rmtree(staging)
            os.mkdir(staging)
            try:
                if target.is_dir():
                    os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
                yield staging
                if keep_other_entries and target.is_dir():
                    _link_missing_entries(target, staging)
                _fsync_tree(staging)
                pause_point("staged")
                _swap_in(staging, target)
            finally:
                if staging.exists():  # the unfinished new version, or the old one after the exchange
                    shutil.rmtree(staging)
    except BaseException:
        remove_created(created)
        raise


@contextmanager
def _writer_lock(target: Path, *, wait: bool = False) -> Iterator[bool]:
    """Hold ``.NAME.lock`` next to ``target`` (yields False where the file system has no locks)."""
    lock_path = target.parent / f".{target.name}.lock"
    fd = None
    while fd is None:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DirectoryBusyError(
                f"{target} is being written by another process (pid {holder}): wait for it to finish, or "
                "write to another directory"
            ) from None
        except OSError as err:  # e.g. a network file system without locks
            os.close(fd)
            logger.warning(
                "cannot lock %s (%s): leftovers of killed writers of %s are not cleaned up",
                lock_path,
                err.strerror,
                target,
            )
            fd = -1
            break
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(fd).st_ino:
            # The previous holder deleted the lock file between our open and our flock: lock the new one.
            os.close(fd)
            fd = None
    if fd < 0:
        yield False
        return
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except (
            OSError
        ):  # a full disk: the lock holds all the same, only the message of a refusal lacks the pid
            logger.debug("could not write the pid into %s", lock_path)
        yield True
    finally:
        lock_path.unlink(missing_ok=True)  # deleted while still held, so nobody can hold a stale copy
        os.close(fd)


def _leftovers(target: Path, kind: str) -> list[Path]:
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"))


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*"))


def _clean_leftovers(target: Path) -> None:
    """With the lock held: put back an old version a killed writer had set aside, delete the rest."""
    asides = _leftovers(target, "old")
    if asides and not target.exists():
        restored = asides.pop()
        os.rename(restored, target)
        logger.warning(
            "restored %s from %s, set aside by a writer killed while replacing it", target, restored
        )
    for leftover in [*asides, *_leftovers(target, "tmp")]:
        size = _size(leftover)
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
        logger.warning(
            "removed %s (%.1f MB), left behind by a writer of %s that was killed",
            leftover,
            size / 1e6,
            target,
        )


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (or across devices): copy instead
        shutil.copy2(src, dst)


def _link_missing_entries(old: Path, new: Path) -> None:
    """Carry the entries of ``old`` that ``new`` lacks over to ``new`` (hard links)."""
    for entry in old.iterdir():
        dest = new / entry.name
        if dest.exists() or dest.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dest)
        elif entry.is_dir():
            shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(dest))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk, so a renamed-in version is complete on disk."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


@cache
def _renameat2() -> Callable[..., int] | None:
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(staging: Path, target: Path) -> None:
    """Make ``staging`` the ``target``; afterwards ``staging`` holds the old version, or nothing."""
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):
        pause_point("swapped")
    else:
        aside = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, aside)
        pause_point("aside")
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside, target)
            raise
        pause_point("swapped")
        shutil.rmtree(aside)
    _fsync_dir(target.parent)
