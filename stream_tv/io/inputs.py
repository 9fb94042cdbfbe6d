"""Opening input files: regular files only, never blocking; JSON parsed with every failure
one clear message; each file's identity recorded so that a change is caught.

An input is read only if it is a regular file (or a symbolic link to one: the Hugging Face
cache is made of them); it is opened ``O_NONBLOCK`` and checked again with ``fstat``, so a
FIFO or a device never blocks a run. :class:`FileIdentity` records device, inode, size,
mtime and a sha256 of the header bytes; the Reader compares it when it opens the file.

>>> brief("x" * 500)[:12]
"'xxxxxxxxxxx"
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import reprlib
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError, InputError, ReferenceNotFoundError

MAX_JSON_DEPTH = 32  # real headers, indexes and configs nest 2-6 levels


@dataclass(frozen=True)
class FileIdentity:
    """An input file as it was when its header was read: what says it is still the same file.

    ``digest`` is the sha256 of the first ``header_bytes`` bytes (a safetensors file's length
    prefix and JSON header; a JSON file's whole content). ``url`` is set, and device, inode and
    mtime are 0, for a file read on the Hugging Face Hub (headers only, never opened here).
    """

    path: Path
    device: int
    inode: int
    size: int
    mtime_ns: int
    header_bytes: int
    digest: str
    url: str | None = None

    def line(self) -> str:
        """``resolved path, size, mtime, header digest``: one line of :meth:`Checkpoint.identity`."""
        where = self.url or os.path.realpath(self.path)
        return f"{where}\t{self.size}\t{self.mtime_ns}\tsha256:{self.digest}"

    def differences(self, st: os.stat_result) -> list[str]:
        """What differs between this identity and ``st`` (an fstat of the file opened again)."""
        pairs = [
            ("device", self.device, st.st_dev),
            ("inode", self.inode, st.st_ino),
            ("size", self.size, st.st_size),
            ("mtime_ns", self.mtime_ns, st.st_mtime_ns),
        ]
        return [f"{name} {old} -> {new}" for name, old, new in pairs if old != new]


def identity_of(sources: Iterable[FileIdentity]) -> str:
    """A stable string naming files and their state, for a resume fingerprint.

    One :meth:`FileIdentity.line` per distinct file, sorted: the same files unchanged give the
    same string in every run; a file replaced, rewritten (size or mtime), or whose header
    changed (even with size and mtime kept) gives another.
    """
    return "\n".join(sorted({s.line() for s in sources}))


# ---- opening inputs: regular files only, never blocking --------------------------------

_FILE_KINDS = [
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
]


def _kind(mode: int) -> str:
    return next((text for test, text in _FILE_KINDS if test(mode)), "not a regular file")


def not_regular(path: Path, mode: int) -> InputError:
    return InputError(
        f"is {_kind(mode)}, not a regular file",
        where=str(path),
        hint="inputs are read from regular files (or symbolic links to them); "
        "put the file itself there",
    )


def os_error(path: Path, e: OSError, what: str = "cannot read") -> InputError:
    """One message per reason an input cannot be opened. All are bad input (exit 2)."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return InputError(
            "permission denied",
            where=str(path),
            hint="make it readable by this user (e.g. `chmod a+r`), or run as a user who can read it",
        )
    if e.errno == errno.ENOENT:
        if os.path.islink(path):
            return ReferenceNotFoundError(
                f"broken symbolic link (to {os.readlink(path)!r}, which does not exist)",
                where=str(path),
                hint="fetch the file it points to again",
            )
        return ReferenceNotFoundError("no such file or directory", where=str(path))
    if e.errno == errno.ELOOP:
        return InputError("symbolic link loop", where=str(path), hint="fix the links")
    return InputError(f"{what}: {e.strerror or e}", where=str(path))


def stat_input(path: Path) -> os.stat_result:
    """``os.stat`` (following symbolic links) with every failure as one :class:`InputError`."""
    try:
        return os.stat(path)
    except OSError as e:
        raise os_error(path, e) from e
    except ValueError as e:  # an embedded NUL byte
        raise InputError(f"unusable file name ({e})", where=repr(str(path))) from e


def open_input(path: Path) -> tuple[int, os.stat_result]:
    """Open an input read-only; return the descriptor and its ``fstat``.

    Only regular files are opened; a symbolic link to one is normal (the Hugging Face cache is
    made of them).

    # subtle: open() on a FIFO blocks until a writer appears, and a character device such as
    # /dev/zero never ends. Both are refused from a stat before opening; the open itself uses
    # O_NONBLOCK, so one swapped in between cannot block either, and the descriptor is checked
    # again with fstat. O_NONBLOCK changes nothing for a regular file.
    """
    st = stat_input(path)
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, st.st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise os_error(path, e, "cannot open") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise not_regular(path, st.st_mode)
    return fd, st


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
    parts = []
    while size > 0:
        part = os.pread(fd, min(size, 1 << 30), offset)
        if not part:
            break
        parts.append(part)
        size -= len(part)
        offset += len(part)
    return b"".join(parts)


# ---- JSON from untrusted files ------------------------------------------------------------

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict = 2, 6, 4
_BRIEF.maxstring, _BRIEF.maxlong, _BRIEF.maxother = 60, 40, 60


def brief(value: object) -> str:
    """``repr`` cut short (depth, length, digits): safe to put any JSON value in a message."""
    return _BRIEF.repr(value)


def parse_json(
    raw: bytes,
    *,
    where: str,
    what: str,
    error: type[InputError] = CorruptCheckpointError,
    hint: str | None = None,
) -> Any:
    """``json.loads`` whose every failure is one ``error`` naming ``where``.

    # subtle: besides JSONDecodeError, json.loads raises RecursionError on deep nesting and a
    # plain ValueError on an integer of more than ``sys.get_int_max_str_digits()`` digits
    # (4300 by default); both would otherwise surface as internal errors.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(
            f"{what} is not valid JSON (not UTF-8: byte {e.start} is {raw[e.start : e.start + 1]!r})",
            where=where,
            hint=hint,
        ) from e
    try:
        return json.loads(text)
    except RecursionError as e:
        raise error(f"{what} is not valid JSON: nested too deeply", where=where, hint=hint) from e
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON ({e})", where=where, hint=hint) from e
    except ValueError as e:  # int over the digit limit
        limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300
        raise error(
            f"{what} holds an integer of more than {limit} digits", where=where, hint=hint
        ) from e


def check_depth(
    value: Any,
    *,
    where: str,
    what: str,
    error: type[InputError] = CorruptCheckpointError,
    limit: int = MAX_JSON_DEPTH,
) -> None:
    """Refuse JSON nested deeper than ``limit`` (later code that recurses, such as
    ``json.dumps`` of metadata into an output index, would hit the recursion limit)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        if depth > limit:
            raise error(f"{what} is nested deeper than {limit} levels", where=where)
        stack.extend((c, depth + 1) for c in children)


def read_json(
    path: Path,
    *,
    what: str,
    limit: int,
    error: type[InputError] = CorruptCheckpointError,
    hint: str | None = None,
) -> tuple[Any, FileIdentity]:
    """Read and parse a JSON input file of at most ``limit`` bytes; also its identity."""
    fd, st = open_input(path)
    try:
        if st.st_size > limit:
            raise error(
                f"{what} is {st.st_size} bytes, over the {limit} a JSON file may have",
                where=str(path),
            )
        raw = pread_exact(fd, limit + 1, 0)
    except OSError as e:
        raise os_error(path, e) from e
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise error(f"{what} is over the {limit} bytes a JSON file may have", where=str(path))
    identity = FileIdentity(
        path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, len(raw),
        hashlib.sha256(raw).hexdigest(),
    )  # fmt: skip
    return parse_json(raw, where=str(path), what=what, error=error, hint=hint), identity


# ---- safetensors headers ------------------------------------------------------------------
