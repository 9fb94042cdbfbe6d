"""Process memory the engine keeps for reuse: glibc's thresholds, buffer slots kept from
one run to the next inside :func:`keeping_slots`, and per-thread scratch buffers for the
chunks' large temporaries (and files kept open) inside :func:`scratch_space` (no tensor
maths; the files are opened by the callers' openers).

Every fresh page a chunk touches costs a fault, and on the benchmark VMs (Firecracker
guests whose freed memory goes back to the host) a costly one. A run reuses its own buffers;
this module lets it also reuse the allocator's freed blocks and, where one process makes
several runs in a row (a compare worker's groups, stream_tv/workers.py), the previous
run's slots.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Hashable, Iterator
from typing import Any

import torch

__all__ = [
    "keep_slot",
    "keeping_slots",
    "kept_open",
    "kept_slot",
    "reuse_freed_memory",
    "scratch",
    "scratch_space",
]

_MALLOC_TUNED = False
#: Slots left by finished runs, while :func:`keeping_slots` is active (else None).
_KEPT: list[Any] | None = None


def reuse_freed_memory() -> None:
    """Let glibc keep and reuse the memory of freed chunk temporaries (once per process).

    # subtle: glibc serves allocations above a dynamic threshold (at most 32 MiB) with fresh
    # mmap()s and unmaps them on free, so every chunk's float32 temporaries (a LoRA delta,
    # an upcast weight) would fault in new zeroed pages: ~0.5 s per GB here, a third of a
    # merge. With the threshold raised and trimming off, the same few blocks are reused;
    # the heap stays at the size of one chunk's temporaries. Process-wide and not undoable
    # (glibc has no call to return to dynamic thresholds): RunOptions.tune_malloc says so.
    # A temporary allocated between the chunks' large blocks in every chunk fragments that
    # heap (seen: a 4 MiB scratch made an 8 GB compare grow to 2 GB); allocate such lazily.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@contextlib.contextmanager
def keeping_slots() -> Iterator[None]:
    """Runs inside this block hand their buffer slots to the next run instead of freeing
    them (slots above 64 MiB are fresh mmap()s, faulted in page by page by every run).
    The slots are freed when the block ends."""
    global _KEPT
    _KEPT = []
    try:
        yield
    finally:
        _KEPT = None


def kept_slot(pinned: bool) -> Any | None:
    """A slot an earlier run left (pinned or not, as asked), or None."""
    if _KEPT:
        for i, slot in enumerate(_KEPT):
            if slot.pinned == pinned:
                return _KEPT.pop(i)
    return None


def keep_slot(slot: Any) -> None:
    """Hand a finished run's slot to the next run (nothing outside :func:`keeping_slots`)."""
    if _KEPT is not None:
        _KEPT.append(slot)


_SPACE = threading.local()


@contextlib.contextmanager
def scratch_space() -> Iterator[None]:
    """This thread's :func:`scratch` buffers and :func:`kept_open` files, kept until the
    block ends (a run's compute); the files are closed then."""
    _SPACE.buffers, _SPACE.opened, _SPACE.files = {}, {}, contextlib.ExitStack()
    try:
        with _SPACE.files:
            yield
    finally:
        _SPACE.buffers = _SPACE.opened = _SPACE.files = None


@contextlib.contextmanager
def kept_open(key: Hashable, opener: Any) -> Iterator[Any]:
    """``with opener() as f`` once per :func:`scratch_space` for ``key``: later uses in the
    same space get the same open ``f``, closed when the space ends. Outside a space,
    every use opens and closes its own.

    (A LoRA adapter's safetensors file: ``safe_open`` parses its header in ~10 ms for 700
    factors, once per tensor without this: 3.5 s of a 352-tensor adapter's lora-delta.)
    """
    files = getattr(_SPACE, "files", None)
    if files is None:
        with opener() as f:
            yield f
        return
    if key not in _SPACE.opened:
        _SPACE.opened[key] = files.enter_context(opener())
    yield _SPACE.opened[key]


def scratch(key: Hashable, shape: tuple[int, ...], dtype: Any, device: Any) -> Any | None:
    """An uninitialised CPU tensor of ``shape`` and ``dtype`` from this thread's buffer
    ``key``, the same memory at every call: valid until the next ``scratch(key)`` on this
    thread. None outside :func:`scratch_space` or off the CPU (allocate as usual then).

    # subtle: the chunks' large temporaries, allocated and freed once per chunk between
    # small allocations that outlive them, fragment glibc's heap: about half of the 8 GB
    # compare runs grew to 1.2-2.3 GB RSS, faulting in fresh pages (MKL's dgemm writing
    # them: 72% of the faults), 10-30% slower. A kept buffer per product does not move.
    A key must name one caller's one use (two live tensors with one key would alias).
    """
    buffers = getattr(_SPACE, "buffers", None)
    if buffers is None or torch.device(device).type != "cpu":
        return None
    numel = math.prod(shape)
    buf = buffers.get(key)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)
