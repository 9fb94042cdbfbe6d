"""Output checkpoints: a shard plan from sizes (pure), shard files written in place, index last.

The plan is made before any tensor byte is read: every output tensor's name, dtype and shape
is known from the input headers, so every shard's header, size and tensor offsets are fixed
up front. Shards are written under a hidden temporary name, checksummed as they are written,
and renamed when complete; ``model.safetensors.index.json`` is written last. A directory
without the index is never a finished model, and ``.stream-tv/state.json`` records which
shards are complete (with their checksum) so an interrupted run resumes.

>>> plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 1)], max_shard_size=8)
[['a', 'b'], ['c'], ['d']]
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DiskError, OutputError
from ..units import format_size, parse_size  # noqa: F401  (re-exported: the writer's sizes)
from .checksum import crc32
from .index import INDEX_NAME, dtype_name
from .outdir import (  # noqa: F401  (re-exported: where the writer keeps its state)
    CHECKSUMS_KEY,
    LOCK_FILE,
    STATE_DIR,
    STATE_FILE,
    OutputDir,
    check_output_location,
    copy_side_files,
)

WRITEBACK_STEP = 64 * 2**20  # bytes between write-back requests (see ShardWriter.write)
_FADVISE = getattr(os, "POSIX_FADV_DONTNEED", 0) if hasattr(os, "posix_fadvise") else 0
_DROP_LAG = 4  # drop_behind: windows before the newest whose clean pages are dropped again
WRITE_PIECE = 256 * 1024  # bytes per write() call; see benchmarks/RESULTS.md ("Writer")


def plan_shards(items: Sequence[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Group ``(name, nbytes)`` in order into shards of at most ``max_shard_size`` bytes.

    A tensor larger than the limit gets a shard of its own (as Hugging Face does); order is
    kept, so shards are read and written sequentially.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, nbytes in items:
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: what the plan needs to lay out bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class ShardLayout:
    """One output shard: its file name, header bytes, and where each tensor starts."""

    name: str
    header: bytes
    offsets: dict[str, int]  # absolute offset of each tensor's first byte
    size: int  # file size

    @staticmethod
    def build(name: str, tensors: Sequence[OutTensor]) -> ShardLayout:
        entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
        position = 0
        spans = []
        for t in tensors:
            entries[t.name] = {
                "dtype": dtype_name(t.dtype),
                "shape": list(t.shape),
                "data_offsets": [position, position + t.nbytes],
            }
            spans.append((t.name, position))
            position += t.nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        header = len(raw).to_bytes(8, "little") + raw
        return ShardLayout(
            name, header, {n: len(header) + p for n, p in spans}, len(header) + position
        )


@dataclass
class OutputPlan:
    """Every output shard, fixed before the first byte is read."""

    shards: list[ShardLayout]
    shard_of: dict[str, int]  # tensor name -> shard index
    total_size: int  # bytes of tensor data, the index's metadata.total_size

    @staticmethod
    def build(tensors: Sequence[OutTensor], max_shard_size: int) -> OutputPlan:
        by_name = {t.name: t for t in tensors}
        groups = plan_shards([(t.name, t.nbytes) for t in tensors], max_shard_size)
        shards = [
            ShardLayout.build(shard_name(i, len(groups)), [by_name[n] for n in group])
            for i, group in enumerate(groups)
        ]
        shard_of = {n: i for i, group in enumerate(groups) for n in group}
        return OutputPlan(shards, shard_of, sum(t.nbytes for t in tensors))

    def fingerprint(self, extra: str = "") -> str:
        """Identifies the plan (and the options that produced it) for resume."""
        h = hashlib.sha256(extra.encode())
        for s in self.shards:
            h.update(s.name.encode())
            h.update(s.header)
        return h.hexdigest()


@dataclass
class _OpenShard:
    layout: ShardLayout
    fd: int
    tmp: Path
    expected: int  # data bytes still to come
    crc: int = 0
    position: int = 0  # next data offset expected for the running checksum
    flushed: int = 0  # bytes before this offset have been handed to write-back


@dataclass
class ShardWriter:
    """Writes a planned checkpoint into ``out``; thread-compatible (one writer thread).

    Usage: ``begin()`` (prepare the directory, honour resume/overwrite), ``write()`` tensor
    bytes in order, ``finish(metadata)`` writes the index and removes the state.
    """

    out: Path
    plan: OutputPlan
    fingerprint: str
    overwrite: bool = False
    resume: bool = True
    fsync: bool = False  # flush each shard before its rename (see _close_shard)
    drop_behind: bool = False  # written pages leave the page cache once on disk (write())
    completed: dict[int, int] = field(default_factory=dict)  # shard index -> crc32
    _open: dict[int, _OpenShard] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dir = OutputDir(self.out)

    # ---- directory preparation -------------------------------------------------------
    def begin(self) -> None:
        try:
            self._begin()
        except BaseException:
            self.dir.unlock()  # a refusal must not keep the directory locked in this process
            raise

    def _begin(self) -> None:
        out, d = self.out, self.dir
        d.claim()  # before reading the journal
        state, unreadable = _read_state(d.state_dir / STATE_FILE)
        finished = (out / INDEX_NAME).is_file()
        # A directory holding only what a run of ours left before it could keep a journal
        # (a kill or a full disk at the first journal write) is free; a readable journal of
        # another command is not silently discarded, even with no shard complete.
        free = d.holds_only_leftovers() and state is None
        if out.exists() and not free:
            if self.resume and state is not None and state.get("fingerprint") == self.fingerprint:
                d.lock()
                if finished:  # killed after the index, before the journal went: redo the end
                    d.remove(INDEX_NAME)
                self.completed = self._verified_completed(state)
                return
            unfinished = (state is not None or unreadable) and not finished
            if not self.overwrite and not (unfinished and not self.resume):
                if finished and state is None:
                    d.unlock(remove=True)  # a kill after the journal went left its lock
                raise self._occupied(unfinished, unreadable, finished)
        else:  # new, empty, or only what a run that never got going left behind
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DiskError(
                    f"cannot create the output directory: {e.strerror}", where=str(out)
                ) from e
        d.lock()
        d.clear()
        self._save_state()

    def _occupied(self, unfinished: bool, unreadable: bool, finished: bool) -> OutputError:
        if unfinished:
            what = (
                "an unfinished run whose journal cannot be read"
                if unreadable
                else "an unfinished run of a different command (other inputs or options)"
            )
            hint = (
                "rerun that command to resume it, pass --restart to discard it, "
                "or choose another directory"
            )
        else:
            what = "a finished model" if finished else "files"
            hint = "pass --overwrite to replace it, or choose another directory"
        return OutputError(f"output directory already holds {what}", where=str(self.out), hint=hint)

    def _verified_completed(self, state: dict) -> dict[int, int]:
        """Completed shards from the journal that are still intact on disk (size + crc32)."""
        done: dict[int, int] = {}
        for key, crc in state.get("completed", {}).items():
            i = int(key)
            layout = self.plan.shards[i]
            path = self.out / layout.name
            if path.is_file() and path.stat().st_size == layout.size and file_crc(path) == crc:
                with open(path, "rb") as f:
                    if f.read(len(layout.header)) == layout.header:
                        done[i] = crc
                        continue
            self.dir.remove(layout.name)
        self.dir.remove_temporaries()
        return done

    def _save_state(self) -> None:
        state = {
            "fingerprint": self.fingerprint,
            "shards": [s.name for s in self.plan.shards],
            "completed": {str(i): c for i, c in sorted(self.completed.items())},
            "checksum": "crc32",
        }
        self.dir.atomic_write(f"{STATE_DIR}/{STATE_FILE}", json.dumps(state, indent=1).encode())

    # ---- writing ------------------------------------------------------------------------
    def is_complete(self, name: str) -> bool:
        return self.plan.shard_of[name] in self.completed

    def write(self, name: str, byte_offset: int, data: memoryview) -> None:
        """Write ``data`` at ``byte_offset`` inside tensor ``name``; bytes arrive in order."""
        if len(data) == 0:
            # subtle: an empty tensor owns no bytes. Opening its shard here would reopen (and
            # truncate) a shard already completed by the tensors before it; a shard of empty
            # tensors only is written by finish().
            return
        i = self.plan.shard_of[name]
        shard = self._open.get(i) or self._open_shard(i)
        start = shard.layout.offsets[name] + byte_offset
        if start != shard.position:
            raise AssertionError(f"out-of-order write in {shard.layout.name}")  # engine bug
        try:
            for k in range(0, len(data), WRITE_PIECE):
                piece = data[k : k + WRITE_PIECE]
                written = 0
                while written < len(piece):
                    written += os.pwrite(shard.fd, piece[written:], start + k + written)
        except OSError as e:
            self._abandon(i)
            raise self._disk_error(e, f"writing {shard.layout.name}") from e
        shard.crc = crc32(data, shard.crc)
        shard.position = start + len(data)
        shard.expected -= len(data)
        if shard.expected == 0:
            self._close_shard(i)
        elif (
            (self.fsync or self.drop_behind)
            and _FADVISE
            and shard.position - shard.flushed >= WRITEBACK_STEP
        ):
            # Start write-back of what is written so far, without waiting for it: the disk
            # works while we compute, so the fsync at the end of the shard finds less left
            # to flush. The same advice drops the pages that are clean by now: with
            # drop_behind it covers the last few windows, whose write-back has had time to
            # finish (io/pagecache.py: a stream that recycles its cache).
            start = shard.flushed
            if self.drop_behind:
                start = max(len(shard.layout.header), start - _DROP_LAG * WRITEBACK_STEP)
            os.posix_fadvise(shard.fd, start, shard.position - start, _FADVISE)
            shard.flushed = shard.position

    def _open_shard(self, i: int) -> _OpenShard:
        layout = self.plan.shards[i]
        tmp = self.out / f".{layout.name}.partial"
        try:
            fd = self.dir.create(tmp.name)
        except OSError as e:
            raise self._disk_error(e, f"creating {tmp.name}") from e
        try:
            if hasattr(os, "posix_fallocate") and layout.size > 0:
                # Reserve the whole shard up front: a full disk shows here, before any data
                # is written, and writes into allocated blocks ran 1.5-2.5x faster on the
                # test VM (benchmarks/IO_PROBE.md).
                try:
                    os.posix_fallocate(fd, 0, layout.size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
            if os.pwrite(fd, layout.header, 0) != len(layout.header):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise self._disk_error(e, f"writing {tmp.name}") from e
        # The checksum covers the whole file (header included), as `crc32 FILE` computes it.
        shard = _OpenShard(
            layout,
            fd,
            tmp,
            layout.size - len(layout.header),
            crc=zlib.crc32(layout.header),
            position=len(layout.header),
        )
        self._open[i] = shard
        if shard.expected == 0:
            self._close_shard(i)
        return shard

    def _close_shard(self, i: int) -> None:
        # With fsync, a shard under its final name (and in the journal) is on disk before the
        # rename. Without it (the default: the wait costs ~0.4 s per GB written here), a kill
        # or Ctrl-C loses nothing (the page cache outlives the process), and after a power
        # loss the resume re-checks each completed shard's size and crc32, and `verify`
        # checks a finished output's crc32s, so a torn file is found, never trusted.
        shard = self._open[i]
        try:
            if self.fsync:
                os.fsync(shard.fd)  # delayed allocation can report a full disk only here
            if self.drop_behind and _FADVISE:
                os.posix_fadvise(shard.fd, 0, 0, _FADVISE)  # what is clean of it by now
        except OSError as e:
            self._abandon(i)
            raise self._disk_error(e, f"finishing {shard.layout.name}") from e
        del self._open[i]
        try:
            os.close(shard.fd)
            os.replace(shard.tmp, self.out / shard.layout.name)
        except OSError as e:
            with contextlib.suppress(OSError):
                shard.tmp.unlink()
            raise self._disk_error(e, f"finishing {shard.layout.name}") from e
        self.completed[i] = shard.crc
        self._save_state()

    def _disk_error(self, e: OSError, doing: str) -> DiskError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskError(
                f"disk full while {doing}: {e.strerror}; the unfinished shard was removed",
                where=str(self.out),
                hint="free space and rerun the same command: completed shards are kept",
            )
        return DiskError(f"{doing} failed: {e.strerror or e}", where=str(self.out))

    def _abandon(self, i: int) -> None:
        shard = self._open.pop(i, None)
        if shard is not None:
            with contextlib.suppress(OSError):
                os.close(shard.fd)
            with contextlib.suppress(OSError):
                shard.tmp.unlink()

    def abort(self) -> None:
        """Drop unfinished shards; completed ones and the journal stay for resume."""
        for i in list(self._open):
            self._abandon(i)
        self.dir.unlock()

    def finish(self, metadata: dict[str, str]) -> Path:
        """Write the index (the mark of a finished model) and remove the journal."""
        for i, layout in enumerate(self.plan.shards):  # shards holding only empty tensors
            if (
                i not in self.completed
                and i not in self._open
                and layout.size == len(layout.header)
            ):
                self._open_shard(i)
        missing = [s.name for i, s in enumerate(self.plan.shards) if i not in self.completed]
        if missing:
            raise AssertionError(f"shards not written: {missing[:3]}")  # engine bug
        checksums = {
            s.name: f"crc32:{self.completed[i]:08x}" for i, s in enumerate(self.plan.shards)
        }
        index = {
            "metadata": {
                "total_size": self.plan.total_size,
                **metadata,
                CHECKSUMS_KEY: checksums,
            },
            "weight_map": {
                name: self.plan.shards[i].name for name, i in sorted(self.plan.shard_of.items())
            },
        }
        self.dir.atomic_write(INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
        self.dir.remove(f"{STATE_DIR}/{STATE_FILE}")
        self.dir.unlock(remove=True)
        return self.out / INDEX_NAME


def _read_state(path: Path) -> tuple[dict | None, bool]:
    """The journal, and whether one is there but cannot be read (torn, garbage, too deep)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, False
    except (OSError, UnicodeDecodeError):
        return None, True
    try:
        state = json.loads(text)
    except (ValueError, RecursionError):
        return None, True
    if not isinstance(state, dict) or not isinstance(state.get("completed", {}), dict):
        return None, True
    return state, False


def file_crc(path: Path) -> int:
    """crc32 of a whole file, read in 8 MiB blocks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            crc = crc32(block, crc)
    return crc
