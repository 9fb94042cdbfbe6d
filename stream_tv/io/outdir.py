"""The output directory: the only place stream-tv writes, and the rules that keep inputs safe.

- Nothing under the output directory is followed as a symbolic link: a directory holding a
  link among its entries (or in ``.stream-tv/``) is refused before anything is written, and
  every file is opened with ``O_NOFOLLOW`` and replaced by a rename, never written in place.
  (The output directory itself may be a link; its real path is what the overlap check with
  the inputs compares.)
- ``--overwrite`` removes only regular files stream-tv writes (shards, index, journal, its
  temporaries); anything else in the directory is left alone.
- One run at a time: ``.stream-tv/lock`` is held with ``flock`` for the whole run, and is
  removed by its holder only, while it still holds it.

>>> is_leftover("model-00001-of-00002.safetensors"), is_leftover(".stream-tv")
(False, True)
>>> is_temporary(".model-00001-of-00002.safetensors.partial"), is_temporary(".config.tmp.json")
(True, True)
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import DiskError, OutputError
from .index import INDEX_NAME

STATE_DIR = ".stream-tv"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
# Index metadata key: {shard file name: "crc32:<8 hex digits>"}, the crc32 of each whole
# shard file as written; `stream-tv verify` checks it.
CHECKSUMS_KEY = "stream_tv_checksums"
SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_TEMP_RE = re.compile(r"^\.(model-\d{5}-of-\d{5}\.safetensors\.partial|.+\.tmp(\.\w+)?)$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class OutputDir:
    """One output directory, as the shard writer uses it."""

    def __init__(self, path: Path):
        self.path = path
        self.state_dir = path / STATE_DIR
        self._lock_fd: int | None = None

    # ---- what is there ------------------------------------------------------------------

    def claim(self) -> None:
        """Before a writer reads the directory's state: refuse what is not a directory or
        holds a link, and lock it if a run was here (a run in progress owns its journal)."""
        if self.path.exists() and not self.path.is_dir():
            raise OutputError("exists and is not a directory", where=str(self.path))
        self.refuse_links()
        if self.state_dir.is_dir():
            self.lock()

    def refuse_links(self) -> None:
        """Refuse a directory that holds a symbolic link where stream-tv would write."""
        for p in [*self._entries(self.path), *self._entries(self.state_dir)]:
            if p.is_symlink():
                raise OutputError(
                    f"{p.relative_to(self.path)} is a symbolic link (to {os.readlink(p)}); "
                    "stream-tv never writes through links in its output directory",
                    where=str(self.path),
                    hint="remove the link, or choose another output directory",
                )
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise OutputError(
                f"{STATE_DIR} exists and is not a directory",
                where=str(self.path),
                hint="remove it, or choose another output directory",
            )

    def holds_only_leftovers(self) -> bool:
        """Empty, or holding nothing but what an unfinished run of ours left behind."""
        return all(is_leftover(p.name) for p in self._entries(self.path))

    @staticmethod
    def _entries(d: Path) -> list[Path]:
        try:
            return sorted(d.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    # ---- the lock -------------------------------------------------------------------------

    def lock(self) -> None:
        """Hold ``.stream-tv/lock`` (created if needed) for this process, or refuse."""
        import fcntl

        if self._lock_fd is not None:
            return
        path = self.state_dir / LOCK_FILE
        for _ in range(3):
            try:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
            except OSError as e:
                raise self.disk_error(e, "creating the lock file") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                raise OutputError(
                    "another stream-tv run is writing to this directory",
                    where=str(self.path),
                    hint="wait for it to finish, or choose another output directory",
                ) from e
            # subtle: a run that finished between our open() and flock() has unlinked the
            # file we hold; a lock on a file no longer at that path protects nothing.
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)
        raise OutputError("could not lock the output directory", where=str(self.path))

    def unlock(self, *, remove: bool = False) -> None:
        """Release the lock; with ``remove``, delete the lock file (and the emptied journal
        directory) first, while still holding it."""
        if self._lock_fd is None:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_dir / LOCK_FILE)
            with contextlib.suppress(OSError):
                os.rmdir(self.state_dir)
        os.close(self._lock_fd)
        self._lock_fd = None

    # ---- removing and writing -------------------------------------------------------------

    def clear(self) -> None:
        """Remove a previous output: the index first, so nothing looks finished meanwhile;
        then shards, temporaries and the journal; only regular files stream-tv writes."""
        self.remove(INDEX_NAME)
        for p in self._entries(self.path):
            if SHARD_RE.match(p.name) or _TEMP_RE.match(p.name) or p.name == "model.safetensors":
                self.remove(p.name)
        for p in self._entries(self.state_dir):
            if p.name != LOCK_FILE and (p.name == STATE_FILE or _TEMP_RE.match(p.name)):
                self.remove(f"{STATE_DIR}/{p.name}")

    def remove(self, name: str) -> None:
        """Unlink ``name`` if it is a regular file (a link or directory is left alone)."""
        p = self.path / name
        try:
            if stat.S_ISREG(os.lstat(p).st_mode):
                p.unlink()
        except FileNotFoundError:
            pass

    def remove_temporaries(self) -> None:
        for p in self._entries(self.path):
            if _TEMP_RE.match(p.name):
                self.remove(p.name)

    def create(self, name: str) -> int:
        """A new, empty file ``name`` for writing (truncated; never through a link)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW | _CLOEXEC
        return os.open(self.path / name, flags, 0o644)

    def atomic_write(self, name: str, data: bytes, *, durable: bool = True) -> None:
        """Write ``name`` through a temporary file renamed over it."""
        try:
            self.replace_with(name, lambda fd, _: _write_all(fd, data), durable=durable)
        except OSError as e:
            raise self.disk_error(e, f"writing {name}") from e

    def replace_with(self, name: str, fill, *, durable: bool = False) -> None:
        """Create a temporary next to ``name``, ``fill(fd, temporary path)`` it, rename it
        over ``name``; raises ``OSError`` (the temporary is removed)."""
        target = self.path / name
        # The temporary keeps the suffix: a writer that picks its format from it still can.
        tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
        fd = self.create(str(tmp.relative_to(self.path)))
        try:
            try:
                fill(fd, tmp)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def copy_in(self, src: Path, name: str) -> None:
        """Copy the regular file ``src`` (an input: read only) to ``name``."""
        try:
            data = src.read_bytes()
        except OSError as e:
            raise DiskError(f"cannot read {src}: {e.strerror}", where=str(src)) from e
        self.atomic_write(name, data, durable=False)

    def disk_error(self, e: OSError, doing: str) -> DiskError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskError(
                f"disk full while {doing}: {e.strerror}",
                where=str(self.path),
                hint="free space and rerun the same command: completed shards are kept",
            )
        if e.errno == errno.ELOOP:
            return DiskError(
                f"{doing}: a symbolic link appeared in the output directory",
                where=str(self.path),
                hint="remove it; stream-tv never writes through links",
            )
        return DiskError(f"{doing} failed: {e.strerror or e}", where=str(self.path))


def is_leftover(name: str) -> bool:
    """A name only an unfinished stream-tv run leaves (journal dir, temporaries)."""
    return name == STATE_DIR or is_temporary(name)


def is_temporary(name: str) -> bool:
    """One of stream-tv's temporary files (a shard being written, a file being replaced)."""
    return bool(_TEMP_RE.match(name))


def copy_side_files(
    src: Path | None, out: Path, names: Sequence[str] | Mapping[str, str]
) -> list[str]:
    """Copy config/tokenizer files that exist in ``src`` into ``out`` (a mapping renames
    them: ``{source name: written name}``); return the names written."""
    copied: list[str] = []
    if src is None or not src.is_dir():
        return copied
    renames = dict(names) if isinstance(names, Mapping) else {n: n for n in names}
    for pattern in [n for n in renames if "*" in n]:  # e.g. "*.jinja": every chat template
        del renames[pattern]
        renames.update({p.name: p.name for p in sorted(src.glob(pattern)) if "/" not in p.name})
    d = OutputDir(out)
    for name, written in renames.items():
        p = src / name
        if p.is_file():
            d.copy_in(p, written)
            copied.append(written)
    return copied


def check_output_location(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output directory equal to, inside, or containing an input (a directory),
    or equal to or containing an input file. A directory next to an input file is fine:
    ``extract base.safetensors ft.safetensors -o tv`` writes nothing beside the inputs."""
    target = out.resolve()
    for p in inputs:
        src = p.resolve()
        if src.is_dir() and (target == src or src in target.parents or target in src.parents):
            raise OutputError(
                f"the output directory overlaps the input {p}",
                where=str(out),
                hint="inputs are never written; choose an output directory outside the inputs",
            )
        if not src.is_dir() and (target == src or target in src.parents):
            raise OutputError(
                f"the output directory contains the input {p}",
                where=str(out),
                hint="choose an output directory that holds no input",
            )


def check_output_file(path: Path, inputs: Sequence[Path], *, flag: str) -> None:
    """Refuse a report file that is, or lies inside, an input, that is a link, or whose
    directory does not exist; checked before any data is read."""
    target = path.absolute()
    if not target.parent.is_dir():
        raise OutputError(f"{flag} {path}: the directory {target.parent} does not exist")
    if target.is_symlink():
        raise OutputError(
            f"{flag} {path} is a symbolic link; stream-tv does not write through links",
            hint="remove the link or choose another file",
        )
    real = target.resolve()
    for p in inputs:
        src = p.resolve()
        if real == src or (src.is_dir() and src in real.parents):
            raise OutputError(
                f"{flag} {path} would write into the input {p}",
                hint="inputs are never written; choose a file outside the inputs",
            )


def write_file(path: Path, data: bytes | None = None, *, render=None) -> None:
    """Write a report file atomically (a temporary next to it, then a rename): ``data``, or
    what ``render(temporary path)`` writes there (e.g. a plot)."""

    def fill(fd: int, tmp: Path) -> None:
        if render is not None:
            render(tmp)
        else:
            _write_all(fd, data or b"")

    try:
        OutputDir(path.absolute().parent).replace_with(path.name, fill)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
