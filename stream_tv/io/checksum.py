"""CRC-32 (zlib's, the one every shard's ``crc32:`` checksum is) at the speed the CPU allows.

``zlib.crc32`` is the reference. Where the system has libdeflate (a C library many Linux
distributions ship), its ``libdeflate_crc32`` computes the same values with carry-less
multiplication: 0.14 s per GB of CPU against zlib 1.2.13's 0.61 on the test VM, a third of
the writer thread's time. It is used through ctypes (which releases the GIL, as zlib does),
only when it is there and agrees with zlib on a test vector; nothing is required.

Without it, a large buffer's CRC is zlib's over a few pieces at once, one thread each,
joined with zlib's own ``crc32_combine`` (the same value, checked on a test vector at
import): on a 16-core H200 machine without libdeflate, ``zlib.crc32`` ran at 2.1 GB/s and
bounded the writer (benchmarks/RESULTS.md, "The second and third GPU calls"). The threads
are started and joined within the call: none is left running (compare's workers fork only
from a process without other threads). With two cores or fewer, one thread, as before.

>>> crc32(b"stream-tv") == zlib.crc32(b"stream-tv")
True
>>> crc32(b"tv", crc32(b"stream-")) == zlib.crc32(b"stream-tv")
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import zlib

import numpy as np

__all__ = ["FAST", "THREADS", "crc32"]

#: Below this many bytes zlib is called directly (the ctypes call costs more than it saves).
_SMALL = 1 << 16


def _load_libdeflate():
    name = ctypes.util.find_library("deflate") or "libdeflate.so.0"
    try:
        fn = ctypes.CDLL(name).libdeflate_crc32
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    probe = np.frombuffer(bytes(range(256)) * 300, dtype=np.uint8)
    if fn(0, probe.ctypes.data, probe.size) != zlib.crc32(probe):  # not the same CRC: unused
        return None
    return fn


_LIBDEFLATE = _load_libdeflate()
#: Whether the fast CRC is in use (reported by the benchmarks).
FAST = _LIBDEFLATE is not None


def _load_combine():
    name = ctypes.util.find_library("z") or "libz.so.1"
    try:
        lib = ctypes.CDLL(name)
        fn = getattr(lib, "crc32_combine64", None) or lib.crc32_combine
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_ulong
    fn.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int64]
    a, b = b"stream-tv " * 7, bytes(range(256)) * 3
    if fn(zlib.crc32(a), zlib.crc32(b), len(b)) != zlib.crc32(a + b):  # another zlib: unused
        return None
    return fn


_COMBINE = None if FAST else _load_combine()
#: Threads of one large CRC without libdeflate (1: zlib's own, in the caller's thread).
THREADS = max(1, min(4, (os.cpu_count() or 1) - 2)) if _COMBINE is not None else 1
#: Bytes per thread below which a CRC is not split.
_PIECE = 4 << 20


def crc32(data, value: int = 0) -> int:
    """``zlib.crc32(data, value)`` for any contiguous buffer (bytes, memoryview, array)."""
    n = memoryview(data).nbytes
    if n < _SMALL:
        return zlib.crc32(data, value)
    if _LIBDEFLATE is not None:
        view = np.frombuffer(data, dtype=np.uint8)
        return _LIBDEFLATE(value, view.ctypes.data, view.size)
    parts = min(THREADS, n // _PIECE)
    if parts < 2:
        return zlib.crc32(data, value)
    return _split_crc32(memoryview(data).cast("B"), value, parts)


def _split_crc32(mv: memoryview, value: int, parts: int) -> int:
    """zlib's CRC of ``mv`` continuing ``value``: ``parts`` pieces, each in its own thread
    (zlib releases the GIL), joined in order with ``crc32_combine``."""
    step = -(-len(mv) // parts)
    pieces = [mv[i : i + step] for i in range(0, len(mv), step)]
    crcs: list[int | None] = [None] * len(pieces)

    def one(i: int) -> None:
        crcs[i] = zlib.crc32(pieces[i])  # left None if it raised: checked below

    threads = [threading.Thread(target=one, args=(i,)) for i in range(1, len(pieces))]
    for t in threads:
        t.start()
    one(0)
    for t in threads:
        t.join()
    if None in crcs:  # a piece's thread failed (it printed why): the caller's own way
        return zlib.crc32(mv, value)
    for piece, crc in zip(pieces, crcs, strict=True):
        value = _COMBINE(value, crc, len(piece))
    return value
