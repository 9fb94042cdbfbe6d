"""I/O floors, page-cache eviction and residency, and the host-to-device copy rate.

run.py times each op against what the hardware allows for the same bytes:

    python benchmarks/floor.py io --read F [F ...] [--write OUT --write-bytes N] [--direct]
            [--drop]
        read every file once, sequentially, into one reused buffer (8 MiB pieces; with
        --direct through O_DIRECT into an aligned buffer, so the page cache is bypassed),
        then write N bytes to OUT in 256 KB pieces (the piece size the writer uses, see
        IO_PROBE.md). --drop: buffered, but each piece read and each 64 MiB written is
        dropped from the page cache (posix_fadvise DONTNEED), as stream-tv's
        --page-cache drop does. Prints JSON: read_s, write_s, wall_s, bytes.
    python benchmarks/floor.py evict F [F ...]     posix_fadvise(DONTNEED) each file
    python benchmarks/floor.py resident F [F ...]  fraction of the files' pages in the page cache
    python benchmarks/floor.py drop-caches         sync; echo 3 > /proc/sys/vm/drop_caches
    python benchmarks/floor.py h2d [--bytes N]     pinned and pageable host-to-device GB/s

Nothing here imports torch except ``h2d``: the floor's own start-up is a bare interpreter's,
and its timings (read_s, write_s, wall_s) are taken inside, around the I/O alone.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import sys
import time

READ_PIECE = 8 * 2**20
WRITE_PIECE = 256 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
DROP_CACHES = "/proc/sys/vm/drop_caches"


# --------------------------------------------------------------------------- the I/O floor


DROP_SLACK = 16 * 2**20  # reach back for the folio that straddles a piece's start
WRITEBACK_STEP = 64 * 2**20


def read_files(
    paths: list[str], direct: bool = False, piece: int = READ_PIECE, drop: bool = False
) -> tuple[int, mmap.mmap]:
    """Read every file once into one reused buffer; return (bytes read, the buffer)."""
    buf = mmap.mmap(-1, piece)  # page-aligned: O_DIRECT accepts it
    mv = memoryview(buf)
    total = 0
    for p in paths:
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        fd = os.open(p, flags)
        try:
            off = 0
            while True:
                n = os.preadv(fd, [mv], off)
                if n <= 0:
                    break
                if drop:
                    lo = max(0, off - DROP_SLACK)
                    os.posix_fadvise(fd, lo, off + n - lo, os.POSIX_FADV_DONTNEED)
                off += n
                if n < piece:  # EOF (O_DIRECT returns the short tail of the file)
                    break
            total += off
        finally:
            os.close(fd)
    mv.release()
    return total, buf


def write_bytes(
    path: str, nbytes: int, src: mmap.mmap, piece: int = WRITE_PIECE, drop: bool = False
) -> None:
    """Write ``nbytes`` to a new ``path`` in ``piece``-sized pwrites (taken cyclically from
    ``src``), as the writer does: posix_fallocate first, then 256 KB pieces."""
    mv = memoryview(src)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if nbytes:
            os.posix_fallocate(fd, 0, nbytes)
        off = 0
        while off < nbytes:
            n = min(piece, nbytes - off)
            s = off % (len(mv) - piece + 1) if len(mv) > piece else 0
            off += os.pwrite(fd, mv[s : s + n], off)
            if drop and off % WRITEBACK_STEP == 0:  # start write-back, drop what is clean
                lo = max(0, off - 4 * WRITEBACK_STEP)
                os.posix_fadvise(fd, lo, off - lo, os.POSIX_FADV_DONTNEED)
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
        mv.release()


def io_floor(
    reads: list[str],
    write: str = "",
    write_bytes_n: int = 0,
    direct: bool = False,
    drop: bool = False,
) -> dict:
    t0 = time.perf_counter()
    nread, buf = read_files(reads, direct=direct, drop=drop)
    t1 = time.perf_counter()
    if write:
        write_bytes(write, write_bytes_n, buf, drop=drop)
    t2 = time.perf_counter()
    return {
        "read_s": t1 - t0,
        "write_s": t2 - t1,
        "wall_s": t2 - t0,
        "read_bytes": nread,
        "write_bytes": write_bytes_n if write else 0,
        "direct": direct,
        "drop": drop,
    }


# --------------------------------------------------------------------------- page cache


def evict(paths: list[str]) -> None:
    """Drop the clean cached pages of each file (dirty ones are flushed first)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_caches() -> str:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; '' on success, else why it failed."""
    os.sync()
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
        return ""
    except OSError as e:
        return f"{DROP_CACHES}: {e.strerror or e}"


def can_drop_caches() -> str:
    """'' when dropping the page cache is permitted here, else the reason (nothing dropped)."""
    if not os.path.exists(DROP_CACHES):
        return f"{DROP_CACHES} does not exist"
    if not os.access(DROP_CACHES, os.W_OK):
        return f"{DROP_CACHES} is not writable (needs root, and /proc/sys writable)"
    try:  # writable in name but refused (read-only /proc/sys in a container): try it
        with open(DROP_CACHES, "w") as f:
            f.write("1\n")  # 1 = page cache only; cheap when run once at start
    except OSError as e:
        return f"writing {DROP_CACHES} failed: {e.strerror or e}"
    return ""


_libc = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return _libc


def resident_bytes(path: str) -> tuple[int, int]:
    """(bytes of ``path`` in the page cache, file size), by mincore() on a mapping that is
    never touched (so measuring does not fault pages in)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    lib = _lib()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            if lib.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            n = sum(v & 1 for v in bytes(vec))
        finally:
            lib.munmap(addr, size)
    finally:
        os.close(fd)
    return min(n * PAGE, size), size


def resident_fraction(paths: list[str]) -> float:
    got = tot = 0
    for p in paths:
        r, s = resident_bytes(p)
        got += r
        tot += s
    return got / tot if tot else 0.0


# --------------------------------------------------------------------------- host to device


def h2d(nbytes: int = 2**30, repeat: int = 5) -> dict:
    """Host-to-device copy rate (pinned and pageable source) on the current CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "why": "torch.cuda.is_available() is False"}
    dev = torch.device("cuda")
    out = {"available": True, "device": torch.cuda.get_device_name(dev), "bytes": nbytes}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    for kind in ("pinned", "pageable"):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=(kind == "pinned"))
        src.fill_(1)
        dst.copy_(src, non_blocking=True)  # warm-up: context, allocator, page locking
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        best = min(times)
        out[f"{kind}_gbps"] = nbytes / best / 1e9
        out[f"{kind}_times"] = times
        del src
    t0 = time.perf_counter()
    back = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    back.copy_(dst, non_blocking=True)
    torch.cuda.synchronize()
    out["d2h_pinned_gbps"] = nbytes / (time.perf_counter() - t0) / 1e9
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("io")
    p.add_argument("--read", nargs="+", default=[])
    p.add_argument("--write", default="")
    p.add_argument("--write-bytes", type=int, default=0, help="bytes (an integer)")
    p.add_argument("--direct", action="store_true")
    p.add_argument("--drop", action="store_true")
    for name in ("evict", "resident"):
        sub.add_parser(name).add_argument("files", nargs="+")
    sub.add_parser("drop-caches")
    sub.add_parser("can-drop-caches")
    p = sub.add_parser("h2d")
    p.add_argument("--bytes", type=int, default=2**30)
    args = ap.parse_args(argv)
    if args.cmd == "io":
        print(json.dumps(io_floor(args.read, args.write, args.write_bytes, args.direct, args.drop)))
    elif args.cmd == "evict":
        evict(args.files)
    elif args.cmd == "resident":
        print(json.dumps({"resident": resident_fraction(args.files)}))
    elif args.cmd == "drop-caches":
        why = drop_caches()
        print(json.dumps({"dropped": not why, "why": why}))
        return 1 if why else 0
    elif args.cmd == "can-drop-caches":
        why = can_drop_caches()
        print(json.dumps({"permitted": not why, "why": why}))
    elif args.cmd == "h2d":
        print(json.dumps(h2d(args.bytes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
