"""Reads of whole tensors or row ranges into reused buffers, or in place from the page
cache; resident memory stays bounded either way.

Rows of a contiguous tensor are one contiguous byte range, so a row range is one positioned
read (``os.preadv``, which releases the GIL) straight into a buffer the engine owns and reuses
(pinned host memory on CUDA). Compared with mapping the whole shard and touching its pages,
this keeps the process's resident memory at the size of the buffers whatever the shard size,
overlaps a cold read from the disk with the compute of the chunk before, and feeds a pinned
buffer for a non-blocking copy to a GPU.

Rows already in the page cache need no read at all: :meth:`Reader.map_rows` maps just their
range (copy-on-write) and hands out a view of it, unmapped when the view is freed. That
saves the copy, which for a job that only looks at its inputs is most of the work: comparing
two warm 2 GiB ranges ran at 19 GB/s mapped, 5-6 GB/s read into buffers (this project's
machines). The engine maps a chunk only when every page of it is resident, so a cold read
still goes through the reader thread's ``preadv``; with drop-behind, only a chunk that was
all cached when the file was opened (one that stays cached: the user's pages) is mapped, as
a range the kernel's readahead brought in since is ours to drop. (Mapping those too left
them cached until the end of the run, and a cold 4 GB compare took 9.6-11.1 s instead of
7.3-7.5 s on this project's VMs, where growing the page cache is slow.)

# subtle: a file truncated by another program while one of its ranges is mapped makes the
# next touch of a page past the new end a SIGBUS, where a read would return short. The
# range is checked against the file's size just before it is mapped; a truncation inside
# the chunk's compute is the one case a mapped run ends without a message (a changed file
# is refused either way: :meth:`Reader.check_unchanged`).

>>> import torch, tempfile, os
>>> from safetensors.torch import save_file
>>> from stream_tv.io.index import read_header
>>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
>>> save_file({"w": torch.arange(12.0).reshape(4, 3)}, path)
>>> spec = read_header(path)["w"]
>>> with Reader() as r:
...     r.read_rows(spec, 1, 3).tolist()
[[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError, InputError
from .inputs import FileIdentity, open_input, pread_exact
from .pagecache import DropBehind, map_resident
from .specs import TensorSpec

#: The fewest bytes :meth:`Reader.map_rows` maps (a smaller read costs less than a mapping).
MIN_MAP_BYTES = 1 << 20

_CHANGED_HINT = (
    "it was modified or replaced while stream-tv was running; rerun the command once nothing "
    "writes to it"
)


class Reader:
    """Positioned reads from many files, one descriptor per file, safe across threads.

    A file is opened on its first read and checked against the :class:`FileIdentity` its
    specs carry (recorded when the header was parsed): the same device, inode, size and
    mtime, and the same header bytes. A file replaced or rewritten between planning and
    reading is refused, never read as if it were the file that was planned.

    ``drop_behind``: pages a read brings in from the disk leave the page cache once read
    (:mod:`stream_tv.io.pagecache`); what was cached before stays either way.
    """

    def __init__(self, *, drop_behind: bool = False) -> None:
        self.drop_behind = drop_behind
        self._fds: dict[Path, int] = {}
        self._ids: dict[Path, FileIdentity | None] = {}
        self._lock = threading.Lock()
        self._drop: dict[int, DropBehind] = {}  # per descriptor (io/pagecache.py)

    def _fd(self, spec: TensorSpec) -> int:
        path = spec.file
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._open(spec)
                    self._ids[path] = spec.source
                    self._fds[path] = fd
        known = self._ids[path]
        if spec.source is not known and spec.source is not None and spec.source != known:
            raise CorruptCheckpointError(
                f"changed since it was indexed: two reads of its header disagree "
                f"(tensor {spec.name!r})",
                where=str(path),
                hint=_CHANGED_HINT,
            )
        return fd

    def _open(self, spec: TensorSpec) -> int:
        source = spec.source
        if source is not None and source.url is not None:
            raise InputError(
                f"tensor {spec.name!r} was indexed from the Hub's headers only ({source.url}); "
                "its data is not on this machine",
                where=str(spec.file),
                hint="open the reference with refs.open_checkpoint to download it",
            )
        fd, st = open_input(path := spec.file)
        try:
            # residency before our first read (the header's)
            drop = DropBehind(fd, st.st_size) if self.drop_behind else None
            if source is not None:
                changes = source.differences(st)
                if not changes:
                    head = pread_exact(fd, source.header_bytes, 0)
                    if hashlib.sha256(head).hexdigest() != source.digest:
                        changes = ["header bytes differ"]
                if changes:
                    raise CorruptCheckpointError(
                        f"changed since it was indexed ({'; '.join(changes)})",
                        where=str(path),
                        hint=_CHANGED_HINT,
                    )
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            os.close(fd)
            raise
        if drop is not None:
            self._drop[fd] = drop
        return fd

    def check_unchanged(self) -> None:
        """fstat every open file again: refuse one whose size or mtime changed since it was
        indexed (written in place while it was read). Cheap; call it before declaring done."""
        for path, fd in list(self._fds.items()):
            source = self._ids.get(path)
            if source is None:
                continue
            changes = source.differences(os.fstat(fd))
            if changes:
                raise CorruptCheckpointError(
                    f"changed while it was read ({'; '.join(changes)})",
                    where=str(path),
                    hint=_CHANGED_HINT,
                )

    def read_into(
        self, spec: TensorSpec, start: int, stop: int, buffer: torch.Tensor
    ) -> torch.Tensor:
        """Read rows ``[start, stop)`` of ``spec`` into ``buffer`` (a uint8 CPU tensor).

        Returns a view of ``buffer`` with the tensor's dtype and shape
        ``(stop - start, *spec.row_shape)`` (1-D tensors: ``(stop - start,)``).
        """
        row_bytes = spec.row_numel * spec.itemsize
        nbytes = (stop - start) * row_bytes
        if buffer.numel() < nbytes:
            raise ValueError(f"buffer of {buffer.numel()} bytes is too small for {nbytes}")
        view = buffer[:nbytes]
        if nbytes:
            self._pread(spec, spec.start + start * row_bytes, memoryview(view.numpy()))
        return view.view(spec.dtype).view(_shape(spec, start, stop))

    def map_rows(self, spec: TensorSpec, start: int, stop: int) -> torch.Tensor | None:
        """Rows ``[start, stop)`` of ``spec`` in place, when every page of them is in the page
        cache: a view of a copy-on-write mapping of their range (writes to it never reach the
        file), shaped as :meth:`read_into`'s. None when one is not resident (read them), or
        when they are fewer than :data:`MIN_MAP_BYTES` or not aligned to their dtype."""
        row_bytes = spec.row_numel * spec.itemsize
        nbytes = (stop - start) * row_bytes
        offset = spec.start + start * row_bytes
        if nbytes < MIN_MAP_BYTES or offset % spec.itemsize:
            return None
        fd = self._fd(spec)
        drop = self._drop.get(fd)
        if drop is not None and drop.brought_in(offset, nbytes):
            return None  # dropped behind once read: a cold range, not kept cached by a mapping
        if os.fstat(fd).st_size < offset + nbytes:
            raise _truncated(spec)
        first = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = map_resident(fd, first, offset + nbytes - first)
        if m is None:
            return None
        view = torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset - first)
        return view.view(spec.dtype).view(_shape(spec, start, stop))

    def read_rows(self, spec: TensorSpec, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` in a new tensor (for small tensors and tests)."""
        buffer = torch.empty((stop - start) * spec.row_numel * spec.itemsize, dtype=torch.uint8)
        return self.read_into(spec, start, stop, buffer)

    def read(self, spec: TensorSpec) -> torch.Tensor:
        """A whole tensor in a new buffer (for small tensors such as LoRA factors)."""
        return self.read_rows(spec, 0, spec.rows)

    def _pread(self, spec: TensorSpec, offset: int, target: memoryview) -> None:
        fd = self._fd(spec)
        done = 0
        total = len(target)
        while done < total:
            try:
                n = os.preadv(fd, [target[done:]], offset + done)
            except OSError as e:
                raise CorruptCheckpointError(
                    f"reading tensor {spec.name!r} failed: {e.strerror}", where=str(spec.file)
                ) from e
            if n == 0:
                raise _truncated(spec)
            done += n
        drop = self._drop.get(fd)
        if drop is not None:
            drop.after_read(offset, total)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                if fd in self._drop:
                    self._drop[fd].release()
                os.close(fd)
            self._fds.clear()
            self._ids.clear()
            self._drop.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shape(spec: TensorSpec, start: int, stop: int) -> tuple[int, ...]:
    return (stop - start, *spec.row_shape) if len(spec.shape) >= 1 else ()


def _truncated(spec: TensorSpec) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"file ended while reading tensor {spec.name!r} (truncated after it was indexed)",
        where=str(spec.file),
        hint="the file changed or was truncated during the run; fetch it again",
    )
