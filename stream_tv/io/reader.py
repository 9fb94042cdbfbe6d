"""Reads of whole tensors or row ranges into reused buffers; resident memory stays bounded.

Rows of a contiguous tensor are one contiguous byte range, so a row range is one positioned
read (``os.preadv``, which releases the GIL) straight into a buffer the engine owns and reuses
(pinned host memory on CUDA). Compared with mapping the shard and touching its pages, this
keeps the process's resident memory at the size of the buffers whatever the shard size (the
kernel's page cache, which is not ours, still serves repeated reads), costs no page faults,
and feeds a pinned buffer for a non-blocking copy to a GPU.

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

import os
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError, ReferenceNotFoundError
from .index import TensorSpec


class Reader:
    """Positioned reads from many files, one descriptor per file, safe across threads."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise ReferenceNotFoundError(f"cannot open: {e.strerror}", where=str(path)) from e
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._fds[path] = fd
        return fd

    def read_into(self, spec: TensorSpec, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
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
        shape = (stop - start, *spec.row_shape) if len(spec.shape) >= 1 else ()
        return view.view(spec.dtype).view(shape)

    def read_rows(self, spec: TensorSpec, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` in a new tensor (for small tensors and tests)."""
        buffer = torch.empty((stop - start) * spec.row_numel * spec.itemsize, dtype=torch.uint8)
        return self.read_into(spec, start, stop, buffer)

    def read(self, spec: TensorSpec) -> torch.Tensor:
        """A whole tensor in a new buffer (for small tensors such as LoRA factors)."""
        return self.read_rows(spec, 0, spec.rows)

    def _pread(self, spec: TensorSpec, offset: int, target: memoryview) -> None:
        fd = self._fd(spec.file)
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
                raise CorruptCheckpointError(
                    f"file ended while reading tensor {spec.name!r} (truncated after it was indexed)",
                    where=str(spec.file),
                    hint="the file changed or was truncated during the run; fetch it again",
                )
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
