"""Drop behind: pages a cold read brought into the page cache leave it once they are read.

A stream reads each byte of its inputs once. Left to itself, the kernel keeps every page it
read in the page cache until memory runs out, so a cold 4 GB extract grows the cache by the
12 GB it reads and writes, and a model larger than RAM pushes everything else on the machine
out of memory. On the benchmark VM, growing the cache into memory the hypervisor had taken
back is also slow: a cold 4 GB extract took 19-20 s, and 8.4-9.6 s when a cgroup limit made
the kernel recycle 2 GB instead (benchmarks/RESULTS.md, run H).

Dropping is not free either: a model that fits in memory and is read again (compare, then
merge) is read from the disk again. So :func:`drops_behind` decides once per run (the
``--page-cache`` option): ``keep`` never drops, ``drop`` always does, and ``auto`` (the
default) drops when the run's inputs and output together exceed the memory available to
this process (``MemAvailable``, and the memory limit of its cgroup when that is lower),
where they could not all stay cached anyway, and on a virtual machine whose balloon reports
free pages to its host (:func:`host_takes_free_pages`). There every page the cache grows
into comes back from the host, a fault each: on the benchmark VMs, which do, dropping made
a warm 4 GB apply 1.3-1.6x and merge 1.4-1.6x faster, and a cold 4 GB extract 3x
(benchmarks/RESULTS.md, runs J and L).

What a file had cached before we came (an earlier run, another program) is the user's, and
stays: :class:`DropBehind` takes the file's residency when it is opened (``mincore`` on a
mapping that is never touched, so looking faults nothing in) and, after each read, drops
(``posix_fadvise(DONTNEED)``) only the pages of the range that were not resident then. A
platform without ``mincore`` or ``posix_fadvise`` drops nothing.

>>> gib, bare = 2**30, {"host_takes_free": False}
>>> drops_behind("auto", 12 * gib, 23 * gib, **bare), drops_behind("auto", 24 * gib, gib, **bare)
(False, True)
>>> drops_behind("auto", 12 * gib, 23 * gib, host_takes_free=True)
True
>>> drops_behind("keep", 2**50, available=1), drops_behind("drop", 1, available=2**50)
(False, True)
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np

from ..options import PAGE_CACHE_CHOICES

__all__ = [
    "DropBehind",
    "available_memory",
    "drops_behind",
    "host_takes_free_pages",
    "map_resident",
    "resident_pages",
]

PAGE = mmap.PAGESIZE
#: How far before a read its drop starts. The page cache holds a file in folios of up to
#: 2 MiB on x86-64 (more with larger base pages); one that straddles the end of a read is
#: not dropped with it (``posix_fadvise`` drops whole folios inside the range only) but with
#: the next read's range, which reaches back this far. Measured: without it a cold 4 GB read
#: left 16% of the file cached, one 2 MiB folio at each tensor and chunk edge.
SLACK = 16 << 20
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None) if hasattr(os, "posix_fadvise") else None


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, *[ctypes.c_int] * 3, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.syscall.restype = ctypes.c_long
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def drops_behind(
    policy: str,
    needed: int,
    available: int | None = None,
    *,
    host_takes_free: bool | None = None,
) -> bool:
    """Whether a run that reads and writes ``needed`` bytes drops behind under ``policy``
    (``available``: the memory it may use, default :func:`available_memory`;
    ``host_takes_free``: default :func:`host_takes_free_pages`)."""
    if policy not in PAGE_CACHE_CHOICES:
        raise ValueError(f"page-cache policy {policy!r} is not one of {PAGE_CACHE_CHOICES}")
    if policy != "auto":
        return policy == "drop"
    if host_takes_free is None:
        host_takes_free = host_takes_free_pages()
    if host_takes_free:
        return True
    if available is None:
        available = available_memory()
    return available is not None and needed > available


#: virtio device id of a memory balloon, and its feature bit VIRTIO_BALLOON_F_REPORTING
_BALLOON, _F_REPORTING = "0x0005", 5


def host_takes_free_pages(root: str = "/sys/bus/virtio/devices") -> bool:
    """Whether this machine is a virtual machine whose memory balloon reports free pages to
    its host (the kernel's negotiated virtio features, one character per bit), which then
    takes them back: every page the page cache grows into is faulted in through the host."""
    try:
        names = os.listdir(root)
    except OSError:
        return False
    for name in names:
        try:
            with open(os.path.join(root, name, "device")) as f:
                if f.read().strip() != _BALLOON:
                    continue
            with open(os.path.join(root, name, "features")) as f:
                bits = f.read().strip()
        except OSError:
            continue
        if len(bits) > _F_REPORTING and bits[_F_REPORTING] == "1":
            return True
    return False


def available_memory() -> int | None:
    """Bytes this process may still fill: ``MemAvailable``, or its cgroup's memory limit
    (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, the tightest on the path up) when
    lower. None where neither can be read."""
    found = [v for v in (_meminfo_available(), _cgroup_limit()) if v is not None]
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limit(root: str = "/sys/fs/cgroup", own: str = "/proc/self/cgroup") -> int | None:
    """The lowest memory limit on this process's cgroup path, or None (no limit, no cgroup)."""
    try:
        with open(own) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = os.path.join(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            try:
                with open(os.path.join(base, *parts[:depth], name)) as f:
                    text = f.read().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 1 << 60:  # v1 "no limit" is ~2**63
                limits.append(int(text))
    return min(limits) if limits else None


def resident_pages(fd: int, size: int) -> np.ndarray | None:
    """One bool per page of the file open as ``fd``: is it in the page cache now? None where
    it cannot be known (no ``mincore``, a file that cannot be mapped).

    With ``cachestat(2)``, 2 MiB blocks all cached or all not are known from their count
    alone, and only a block in between is looked at page by page (``mincore``)."""
    if _LIBC is None or size <= 0:
        return None
    pages = -(-size // PAGE)
    if _all_cached(fd, 0, min(size, PAGE)) is None:  # no cachestat: every page
        return _mincore(fd, 0, size, pages)
    out = np.zeros(pages, dtype=bool)
    for offset in range(0, size, _BLOCK):
        length = min(_BLOCK, size - offset)
        cached = _cached_pages(fd, offset, length)
        first, n = offset // PAGE, -(-length // PAGE)
        if cached is None:
            return _mincore(fd, 0, size, pages)
        if cached >= n:
            out[first : first + n] = True
        elif cached > 0:
            block = _mincore(fd, offset, length, n)
            if block is None:
                return None
            out[first : first + n] = block
    return out


def _mincore(fd: int, offset: int, length: int, pages: int) -> np.ndarray | None:
    addr = _LIBC.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        vec = np.empty(pages, dtype=np.uint8)
        if _LIBC.mincore(addr, length, vec.ctypes.data) != 0:
            return None
    finally:
        _LIBC.munmap(addr, length)
    return (vec & 1).astype(bool)


class _CacheRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


#: ``cachestat(2)`` (Linux 6.5): one number on every architecture (a syscall that new).
_CACHESTAT = 451
_cachestat_works = sys.platform.startswith("linux")


#: The blocks :func:`resident_pages` counts with one ``cachestat`` (a large folio's size).
_BLOCK = 2 << 20


def _cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many pages of the range are in the page cache, by ``cachestat(2)``, which counts
    whole folios (a 4 GiB file in 3 ms, where ``mincore`` looks up each 4 KiB page: ~10% of
    a warm compare's CPU); None where the kernel lacks it."""
    global _cachestat_works
    if _LIBC is None or not _cachestat_works:
        return None
    span, stat = _CacheRange(offset, length), _CacheStat()
    number, file, flags = ctypes.c_long(_CACHESTAT), ctypes.c_long(fd), ctypes.c_long(0)
    if _LIBC.syscall(number, file, ctypes.byref(span), ctypes.byref(stat), flags) != 0:
        _cachestat_works = False  # ENOSYS (an older kernel), or a seccomp filter: mincore
        return None
    return stat.nr_cache


def _all_cached(fd: int, offset: int, length: int) -> bool | None:
    """Whether every page of the range is in the page cache (None: it cannot be counted)."""
    cached = _cached_pages(fd, offset, length)
    return None if cached is None else cached >= -(-length // PAGE)


def map_resident(fd: int, offset: int, length: int) -> mmap.mmap | None:
    """``length`` bytes of the file open as ``fd`` from ``offset`` (a multiple of
    ``mmap.ALLOCATIONGRANULARITY``), mapped copy-on-write, when every page of them is in the
    page cache now; None when one is not, or where it cannot be known or mapped.

    Copy-on-write (``MAP_PRIVATE``): a write to the mapping changes this process's copy of
    the page, never the file. The mapping ends when the object is freed (or closed).
    """
    if _LIBC is None or length <= 0:
        return None
    cached = _all_cached(fd, offset, length)
    if cached is False:
        return None
    try:
        m = mmap.mmap(
            fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
        )
    except (OSError, ValueError):  # a filesystem that cannot map, no memory for the mapping
        return None
    if cached:
        return m
    view = np.frombuffer(m, dtype=np.uint8)
    vec = np.empty(-(-length // PAGE), dtype=np.uint8)
    resident = _LIBC.mincore(view.ctypes.data, length, vec.ctypes.data) == 0
    resident = resident and bool(np.bitwise_and(vec, 1, out=vec).all())
    del view  # the mapping's only export: it can be closed
    if not resident:
        m.close()
        return None
    return m


class DropBehind:
    """Drops from the page cache what reads of one file brought in (see the module).

    ``after_read(offset, length)`` once a range is in our buffer; ``release()`` when the file
    is closed. Pages resident when the file was opened are never dropped."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        if _DONTNEED is None or _all_cached(fd, 0, size):
            self._cold = None  # all of it was cached (cachestat: no page-by-page look)
            return
        self._cold = resident_pages(fd, size)
        if self._cold is not None:
            np.logical_not(self._cold, out=self._cold)
            if not self._cold.any():
                self._cold = None  # all of it was cached: nothing of it is ever ours to drop

    def after_read(self, offset: int, length: int) -> None:
        """Drop the cold pages of ``[offset - SLACK, offset + length)``."""
        if self._cold is None or length <= 0:
            return
        start = max(0, offset - SLACK) // PAGE * PAGE
        self._drop_cold(start, offset + length - start)

    def brought_in(self, offset: int, length: int) -> bool:
        """Whether a page of the range was not resident at open: one a read of ours brought
        in (or will), which is ours to drop, so read, not used in place."""
        if self._cold is None or length <= 0:
            return False
        first, stop = offset // PAGE, min(len(self._cold), -(-(offset + length) // PAGE))
        return bool(self._cold[first:stop].any())

    def release(self) -> None:
        """Drop every page that was not resident at open: the last folio of each read, and
        what the kernel read ahead and we never asked for."""
        if self._cold is not None:
            self._drop_cold(0, len(self._cold) * PAGE)
        self._cold = None

    def _drop_cold(self, offset: int, length: int) -> None:
        cold = self._cold
        first, stop = offset // PAGE, min(len(cold), -(-(offset + length) // PAGE))
        window = cold[first:stop]
        if window.all():  # the usual cold case: one call
            self._drop(offset, length)
            return
        if not window.any():
            return
        # runs of pages that were not resident: starts where a run begins, ends where it ends
        edges = np.flatnonzero(np.diff(np.concatenate(([False], window, [False])).astype(np.int8)))
        for a, b in zip(edges[0::2], edges[1::2], strict=True):
            lo = max(offset, (first + int(a)) * PAGE)
            hi = min(offset + length, (first + int(b)) * PAGE)
            self._drop(lo, hi - lo)

    def _drop(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self.fd, offset, length, _DONTNEED)
        except OSError:  # advice only: a filesystem that refuses it loses nothing
            self._cold = None
            return
