"""Measure write, read and checksum strategies on this machine's filesystem.

The engine's writer design (piece size, ``write`` vs ``os.pwrite``, pre-sizing) and its
checksum choice follow from these figures. Every measurement moves ``--size`` bytes from one
reused in-memory buffer (already faulted in), is repeated ``--repeat`` times, and the median
is reported; the repeats are interleaved (round r runs every case once). Before each write the
previous file is deleted and ``os.sync()`` flushes dirty pages (untimed); "cold" runs then idle
``--idle`` seconds, so freed guest memory has been handed back to the hypervisor (virtio free
page reporting), as it is when a real job starts writing; "hot" runs write at once into the
memory the deleted file just freed. The page cache is warm for reads. Hash rows are CPU
seconds of this process per GB; "alloc" rows compare a fresh torch tensor per 64 MB chunk
with one reused tensor (first touch of fresh memory is slow on this VM too).

    python benchmarks/io_probe.py --size 1GB --dir /work/bench-work [--repeat 3] [--json P]
        [--conditions cold,hot] [--idle 5] [--sustained 5] [--only SUBSTR,...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import floor  # noqa: E402  (benchmarks/floor.py: page-cache residency)

from stream_tv.io.writer import parse_size  # noqa: E402

BUF = 64 * 1024 * 1024  # the reused source buffer

K = 1024
M = 1024 * 1024


def human(n: int) -> str:
    for unit, mult in (("M", M), ("K", K)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


class Timer:
    """Wall, user and system seconds of this process (children counted separately)."""

    def __enter__(self) -> Timer:
        self.r0 = resource.getrusage(resource.RUSAGE_SELF)
        self.c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.user = (r1.ru_utime - self.r0.ru_utime) + (c1.ru_utime - self.c0.ru_utime)
        self.sys = (r1.ru_stime - self.r0.ru_stime) + (c1.ru_stime - self.c0.ru_stime)


def pieces(total: int, piece: int):
    """(offset, length) of consecutive pieces covering ``total`` bytes."""
    off = 0
    while off < total:
        n = min(piece, total - off)
        yield off, n
        off += n


# --------------------------------------------------------------------------- writers
# Each writer writes ``total`` bytes taken cyclically from ``mv`` (a memoryview of BUF bytes).


def _src(mv: memoryview, off: int, n: int) -> memoryview:
    s = off % len(mv)
    return mv[s : s + n]


def write_pieces(path: str, mv: memoryview, total: int, piece: int, mode: str = "wb") -> None:
    with open(path, mode, buffering=0) as f:
        for off, n in pieces(total, piece):
            f.write(_src(mv, off, n))


def pwrite_pieces(
    path: str, mv: memoryview, total: int, piece: int, presize: str = "", fsync: bool = False
) -> None:
    flags = os.O_WRONLY | os.O_CREAT
    if presize != "existing":
        flags |= os.O_TRUNC
    fd = os.open(path, flags, 0o644)
    try:
        if presize == "ftruncate":
            os.ftruncate(fd, total)
        elif presize == "fallocate":
            os.posix_fallocate(fd, 0, total)
        for off, n in pieces(total, piece):
            os.pwrite(fd, _src(mv, off, n), off)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def direct_pwrite(path: str, src: memoryview, total: int, piece: int, fsync: bool = False) -> None:
    """O_DIRECT: no page cache; ``src`` must be page-aligned (an anonymous mmap), pieces a
    multiple of 4096; the tail is written padded and the file truncated to ``total``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        os.ftruncate(fd, total)
        for off, n in pieces(total, piece):
            padded = (n + 4095) // 4096 * 4096
            os.pwrite(fd, _src(src, off, padded), off)
        os.ftruncate(fd, total)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_drop_behind(path: str, mv: memoryview, total: int, piece: int, window: int) -> None:
    """Buffered writes; every ``window`` bytes, flush the previous window (fdatasync) and drop
    its pages (POSIX_FADV_DONTNEED), so new page-cache pages reuse just-freed memory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        for off, n in pieces(total, piece):
            os.pwrite(fd, _src(mv, off, n), off)
            if off + n - done >= 2 * window:
                os.fdatasync(fd)
                os.posix_fadvise(fd, done, window, os.POSIX_FADV_DONTNEED)
                done += window
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_early_writeback(
    path: str, mv: memoryview, total: int, piece: int, window: int, how: str
) -> None:
    """Durable like ``+ fsync``, but writeback of each finished ``window`` is started at once
    (asynchronously), so the final fsync only waits for the tail. ``how``: "fadvise"
    (POSIX_FADV_DONTNEED on a dirty range starts writeback, then drops what is clean) or
    "sync_file_range" (SYNC_FILE_RANGE_WRITE through ctypes)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, total)
        done = 0
        for off, n in pieces(total, piece):
            os.pwrite(fd, _src(mv, off, n), off)
            if off + n - done >= window:
                if how == "fadvise":
                    os.posix_fadvise(fd, done, off + n - done, os.POSIX_FADV_DONTNEED)
                else:
                    libc.sync_file_range(fd, done, off + n - done, 2)  # SYNC_FILE_RANGE_WRITE
                done = off + n
        os.fsync(fd)
    finally:
        os.close(fd)


def cat_copy(src: str, dst: str) -> None:
    """GNU cat >= 9 copies file to file with copy_file_range (the kernel's piece size)."""
    subprocess.run(f"cat {src!s} > {dst!s}", shell=True, check=True)


def dd_copy(src: str, dst: str, bs: str) -> None:
    """read/write of ``bs`` pieces, the copy loop a small-piece floor uses."""
    subprocess.run(f"dd if={src!s} bs={bs} status=none > {dst!s}", shell=True, check=True)


# --------------------------------------------------------------------------- readers


def read_into(path: str, piece: int) -> None:
    buf = bytearray(piece)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(mv):
            pass


def mmap_copy(path: str, piece: int) -> None:
    """Copy pages of a mapped file into a reused buffer (what a mmap reader does)."""
    import mmap

    buf = bytearray(piece)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        mv = memoryview(m)
        for off, n in pieces(len(m), piece):
            buf[:n] = mv[off : off + n]
        del mv


def cat_null(path: str) -> None:
    subprocess.run(f"cat {path!s} > /dev/null", shell=True, check=True)


# --------------------------------------------------------------------------- cold reads
# What the engine's reader could do when the inputs are not in the page cache: each case
# reads a whole file (or two, alternating, as extract reads base and finetuned) in chunks
# into one reused, page-aligned buffer, the way the reader fills its slots.


def _pread_full(fd: int, mv: memoryview, off: int) -> int:
    """Fill ``mv`` from ``off`` (fewer bytes only at EOF); return the bytes read."""
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], off + done)
        if n <= 0:
            break
        done += n
        if n % 4096:  # a short, unaligned read is EOF (also under O_DIRECT)
            break
    return done


def _split(n: int, parts: int, align: int = 4096) -> list[tuple[int, int]]:
    """``n`` bytes as ``parts`` (offset, length) pieces on ``align`` boundaries."""
    step = max(align, -(-n // parts // align) * align)
    return [(o, min(step, n - o)) for o in range(0, n, step)]


def chunked_read(
    paths: list[str],
    chunk: int,
    threads: int = 1,
    direct: bool = False,
    willneed: int = 0,
    sequential: bool = False,
) -> int:
    """Read ``paths`` chunk by chunk, alternating between them (one chunk of each in turn).

    threads > 1: each chunk is split into that many aligned pieces read at once by a pool
    (positional reads on disjoint ranges; preadv releases the GIL). direct: O_DIRECT into the
    aligned buffer (no page cache). willneed: posix_fadvise(WILLNEED) on the next
    ``willneed`` chunks of the same file before reading this one (the kernel reads ahead
    while the caller works). sequential: posix_fadvise(SEQUENTIAL) at open (larger
    readahead)."""
    from concurrent.futures import ThreadPoolExecutor

    buf = mmap.mmap(-1, chunk)
    mv = memoryview(buf)
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = [os.open(p, flags) for p in paths]
    sizes = [os.fstat(fd).st_size for fd in fds]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    total = 0
    try:
        if sequential:
            for fd in fds:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        offs = [0] * len(fds)
        while any(o < s for o, s in zip(offs, sizes, strict=True)):
            for i, fd in enumerate(fds):
                off = offs[i]
                if off >= sizes[i]:
                    continue
                n = min(chunk, sizes[i] - off)
                if willneed:
                    os.posix_fadvise(fd, off + chunk, willneed * chunk, os.POSIX_FADV_WILLNEED)
                want = -(-n // 4096) * 4096 if direct else n
                if pool is None:
                    got = _pread_full(fd, mv[:want], off)
                else:
                    futs = [
                        pool.submit(_pread_full, fd, mv[o : o + ln], off + o)
                        for o, ln in _split(want, threads)
                    ]
                    got = sum(f.result() for f in futs)
                total += min(got, n)
                offs[i] = off + n
    finally:
        if pool is not None:
            pool.shutdown()
        for fd in fds:
            os.close(fd)
        mv.release()
        buf.close()
    return total


def dd_direct(paths: list[str], bs: str = "8M") -> None:
    for p in paths:
        subprocess.run(
            ["dd", f"if={p}", "of=/dev/null", f"bs={bs}", "iflag=direct", "status=none"], check=True
        )


def evict_files(paths: list[str], how: str) -> None:
    """Drop ``paths`` from the page cache: their pages only (fadvise) or everything (drop)."""
    os.sync()
    if how == "drop":
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_read_cases(one: list[str], two: list[str]) -> list[tuple[str, Callable[[], None]]]:
    """(name, fn) of every cold-read strategy; ``one``: [a file], ``two``: two half files."""
    cases: list[tuple[str, Callable[[], None]]] = [
        ("floor: dd iflag=direct bs=8M", lambda: dd_direct(one)),
        ("floor: dd iflag=direct bs=64M", lambda: dd_direct(one, "64M")),
        ("floor: cat > /dev/null (buffered, kernel readahead)", lambda: cat_null(one[0])),
    ]
    for chunk in (16 * M, 64 * M):
        c = human(chunk)
        cases += [
            (
                f"buffered preadv {c} chunks (the reader now)",
                lambda ch=chunk: chunked_read(one, ch),
            ),
            (
                f"buffered preadv {c}, 2 files alternating (extract's pattern)",
                lambda ch=chunk: chunked_read(two, ch),
            ),
        ]
        for t in (2, 4, 8):
            cases.append(
                (
                    f"parallel pread {c} chunks, {t} threads on disjoint ranges",
                    lambda ch=chunk, t=t: chunked_read(one, ch, threads=t),
                )
            )
        cases += [
            (
                f"O_DIRECT preadv {c} into an aligned reused buffer",
                lambda ch=chunk: chunked_read(one, ch, direct=True),
            ),
            (
                f"O_DIRECT {c}, 4 threads on disjoint ranges",
                lambda ch=chunk: chunked_read(one, ch, threads=4, direct=True),
            ),
            (
                f"O_DIRECT {c}, 8 threads on disjoint ranges",
                lambda ch=chunk: chunked_read(one, ch, threads=8, direct=True),
            ),
            (
                f"O_DIRECT {c}, 2 files alternating, 4 threads",
                lambda ch=chunk: chunked_read(two, ch, threads=4, direct=True),
            ),
            (
                f"buffered {c} + fadvise WILLNEED 1 chunk ahead",
                lambda ch=chunk: chunked_read(one, ch, willneed=1),
            ),
            (
                f"buffered {c} + fadvise WILLNEED 2 chunks ahead",
                lambda ch=chunk: chunked_read(one, ch, willneed=2),
            ),
            (
                f"buffered {c} + fadvise WILLNEED 2 ahead, 2 files alternating",
                lambda ch=chunk: chunked_read(two, ch, willneed=2),
            ),
            (
                f"buffered {c} + fadvise SEQUENTIAL",
                lambda ch=chunk: chunked_read(one, ch, sequential=True),
            ),
            (
                f"buffered {c} + WILLNEED 2 ahead, 4 threads",
                lambda ch=chunk: chunked_read(one, ch, threads=4, willneed=2),
            ),
        ]
    return cases


# --------------------------------------------------------------------------- checksums


def checksum(kind: str, mv: memoryview, total: int, piece: int) -> None:
    if kind == "crc32":
        c = 0
        for off, n in pieces(total, piece):
            c = zlib.crc32(_src(mv, off, n), c)
        return
    if kind.startswith("xxh"):
        import xxhash

        h = getattr(xxhash, kind)()
    else:
        h = hashlib.new(kind)
    for off, n in pieces(total, piece):
        h.update(_src(mv, off, n))
    h.digest()


# --------------------------------------------------------------------------- harness


def run_once(fn: Callable[[], None], before: Callable[[], None] | None) -> dict:
    if before is not None:
        before()
    load = os.getloadavg()[0]
    with Timer() as t:
        fn()
    return {"wall": t.wall, "user": t.user, "sys": t.sys, "load1": load}


def summary(runs: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall", "user", "sys")}
    return {"runs": runs, **med, "min_wall": min(r["wall"] for r in runs)}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem / K**3, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def alloc_fill(total: int, piece: int, reuse: bool) -> None:
    """Fill ``total`` bytes of float32 chunks: a fresh torch tensor per chunk, or one reused."""
    import torch

    n = piece // 4
    keep = torch.empty(n, dtype=torch.float32) if reuse else None
    for _off, _n in pieces(total, piece):
        t = keep if reuse else torch.empty(n, dtype=torch.float32)
        t.fill_(1.0)
        del t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1GB", help="bytes per measurement (1GB = 10^9, 1GiB = 2^30)")
    ap.add_argument("--dir", default="/work/bench-work", help="directory on the filesystem to test")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--idle",
        type=float,
        default=5.0,
        help="seconds idle before each 'cold' run, so freed guest memory is reported "
        "back to the hypervisor (virtio free page reporting) as in a real run",
    )
    ap.add_argument("--conditions", default="cold,hot", help="write conditions to run: cold,hot")
    ap.add_argument(
        "--sustained",
        type=int,
        default=5,
        help="also write N x size in one go without sync (dirty-page throttling); 0: skip",
    )
    ap.add_argument("--only", default="", help="comma list of substrings: run only matching cases")
    ap.add_argument(
        "--suite",
        default="write,read,hash,alloc",
        help="comma list of write,read,hash,alloc,cold-read (cold-read: reads of "
        "files evicted from the page cache before each run)",
    )
    ap.add_argument(
        "--evict",
        default="fadvise",
        choices=["fadvise", "drop"],
        help="cold-read: evict the test files (posix_fadvise DONTNEED) or drop the "
        "whole page cache (echo 3 > /proc/sys/vm/drop_caches, root)",
    )
    ap.add_argument("--json", default="", help="write all runs here")
    args = ap.parse_args(argv)

    total = parse_size(args.size)
    gb = total / 1e9
    work = os.path.join(args.dir, "io-probe")
    os.makedirs(work, exist_ok=True)
    dst = os.path.join(work, "out.bin")
    src = os.path.join(work, "src.bin")

    buf = bytearray(os.urandom(BUF))  # random: nothing compresses, pages faulted in now
    mv = memoryview(buf)

    fs = shutil.disk_usage(args.dir)
    dev = subprocess.run(["df", "-hT", args.dir], capture_output=True, text=True).stdout.strip()
    info = {
        **machine(),
        "dir": args.dir,
        "df": dev,
        "size_bytes": total,
        "free_gb": round(fs.free / 1e9, 1),
        "idle_s": args.idle,
    }
    print(f"# io_probe: {total} bytes ({gb:.2f} GB) per run, median of {args.repeat}")
    print(
        f"# {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, "
        f"python {info['python']}, kernel {info['kernel']}"
    )
    print("# " + dev.replace("\n", "\n# "))
    if "write" in args.suite:
        print(
            f"# hot: new file written right after deleting the previous one (its freed pages "
            f"are reused); cold: delete, sync, idle {args.idle:g} s first"
        )
    if "cold-read" in args.suite:
        print(
            f"# cold read: the file(s) evicted from the page cache before each run ({args.evict}"
            "), checked with mincore; one reused page-aligned buffer per case"
        )

    def fresh_hot() -> None:  # new file each run: delete, flush, go at once
        if os.path.exists(dst):
            os.unlink(dst)
        os.sync()

    def fresh_cold() -> None:  # new file each run, memory freed long enough ago
        fresh_hot()
        time.sleep(args.idle)

    def existing() -> None:  # a fully written file of the right size, flushed, cached
        if not os.path.exists(dst) or os.path.getsize(dst) != total:
            fresh_hot()
            pwrite_pieces(dst, mv, total, 256 * K)
        os.sync()
        time.sleep(args.idle)

    def idle() -> None:
        time.sleep(args.idle)

    write_cases: list[tuple[str, Callable[[], None]]] = []
    for piece in (64 * K, 128 * K, 256 * K, 512 * K, 1 * M, 4 * M, 64 * M):
        name = "f.write whole 64M buffers" if piece == BUF else f"f.write {human(piece)} slices"
        write_cases.append((name, lambda p=piece: write_pieces(dst, mv, total, p)))
    for piece in (256 * K, 1 * M, 4 * M, 64 * M):
        h = human(piece)
        write_cases += [
            (f"os.pwrite {h}", lambda p=piece: pwrite_pieces(dst, mv, total, p)),
            (
                f"os.pwrite {h}, ftruncate presized",
                lambda p=piece: pwrite_pieces(dst, mv, total, p, "ftruncate"),
            ),
            (
                f"os.pwrite {h}, posix_fallocate presized",
                lambda p=piece: pwrite_pieces(dst, mv, total, p, "fallocate"),
            ),
        ]
    import mmap

    aligned = mmap.mmap(-1, BUF)  # page-aligned, for O_DIRECT
    aligned[:] = buf
    amv = memoryview(aligned)
    for piece in (1 * M, 8 * M, 64 * M):
        write_cases.append(
            (
                f"O_DIRECT os.pwrite {human(piece)}, presized",
                lambda p=piece: direct_pwrite(dst, amv, total, p),
            )
        )
    write_cases += [  # durable: the file is on disk when the call returns
        ("os.pwrite 256K + fsync", lambda: pwrite_pieces(dst, mv, total, 256 * K, fsync=True)),
        (
            "os.pwrite 256K, posix_fallocate presized + fsync",
            lambda: pwrite_pieces(dst, mv, total, 256 * K, "fallocate", fsync=True),
        ),
        (
            "O_DIRECT os.pwrite 8M, presized + fsync",
            lambda: direct_pwrite(dst, amv, total, 8 * M, fsync=True),
        ),
        (
            "os.pwrite 256K, posix_fallocate, FADV_DONTNEED per 64M (async writeback) + fsync",
            lambda: write_early_writeback(dst, mv, total, 256 * K, 64 * M, "fadvise"),
        ),
        (
            "os.pwrite 256K, posix_fallocate, sync_file_range per 64M + fsync",
            lambda: write_early_writeback(dst, mv, total, 256 * K, 64 * M, "sync_file_range"),
        ),
    ]
    write_cases.append(
        (
            "os.pwrite 256K, fdatasync + FADV_DONTNEED behind 64M windows",
            lambda: write_drop_behind(dst, mv, total, 256 * K, 64 * M),
        )
    )
    write_cases.append(("cat 1 file > new file (copy_file_range)", lambda: cat_copy(src, dst)))
    write_cases.append(
        ("dd bs=256K 1 file > new file (read/write)", lambda: dd_copy(src, dst, "256K"))
    )

    cases: list[tuple[str, str, Callable[[], None], Callable[[], None] | None]] = []
    conds = [c.strip() for c in args.conditions.split(",") if c.strip() in ("cold", "hot")]
    for cond in conds:
        before = fresh_cold if cond == "cold" else fresh_hot
        cases += [(f"write {cond}", name, fn, before) for name, fn in write_cases]
    cases += [
        (
            "write",
            "os.pwrite 256K, overwrite existing cached file",
            lambda: pwrite_pieces(dst, mv, total, 256 * K, "existing"),
            existing,
        ),
        (
            "write",
            "f.write 64M, overwrite existing cached file",
            lambda: write_pieces(dst, mv, total, BUF, "r+b"),
            existing,
        ),
    ]
    if args.sustained:  # more than the dirty-page limit: writeback throttles buffered writes
        n = args.sustained
        big = n * total
        cases += [
            (
                f"write {n}x",
                f"f.write 256K slices, {n}x size, no sync",
                lambda: write_pieces(dst, mv, big, 256 * K),
                fresh_cold,
            ),
            (
                f"write {n}x",
                f"f.write 64M buffers, {n}x size, no sync",
                lambda: write_pieces(dst, mv, big, BUF),
                fresh_cold,
            ),
            (
                f"write {n}x",
                f"os.pwrite 256K, posix_fallocate presized, {n}x size, no sync",
                lambda: pwrite_pieces(dst, mv, big, 256 * K, "fallocate"),
                fresh_cold,
            ),
            (
                f"write {n}x",
                f"O_DIRECT os.pwrite 8M, presized, {n}x size",
                lambda: direct_pwrite(dst, amv, big, 8 * M),
                fresh_cold,
            ),
            (
                f"write {n}x",
                f"os.pwrite 256K, posix_fallocate, sync_file_range per 64M + fsync, {n}x size",
                lambda: write_early_writeback(dst, mv, big, 256 * K, 64 * M, "sync_file_range"),
                fresh_cold,
            ),
            (
                f"write {n}x",
                f"os.pwrite 256K, posix_fallocate, FADV_DONTNEED per 64M + fsync, {n}x size",
                lambda: write_early_writeback(dst, mv, big, 256 * K, 64 * M, "fadvise"),
                fresh_cold,
            ),
        ]
    for piece in (256 * K, 8 * M):
        cases.append(
            (
                "read",
                f"readinto reused {human(piece)} buffer",
                lambda p=piece: read_into(src, p),
                None,
            )
        )
    cases.append(
        ("read", "mmap, copy 8M slices to reused buffer", lambda: mmap_copy(src, 8 * M), None)
    )
    cases.append(("read", "cat file > /dev/null", lambda: cat_null(src), None))
    for kind in ("crc32", "xxh3_64", "xxh3_128", "blake2b", "sha256"):
        cases.append(
            ("hash", f"{kind} (8M pieces)", lambda k=kind: checksum(k, mv, total, 8 * M), None)
        )
    try:
        import torch  # noqa: F401

        cases += [
            (
                "alloc",
                "torch.empty 64M per chunk + fill (cold)",
                lambda: alloc_fill(total, BUF, False),
                idle,
            ),
            (
                "alloc",
                "one reused 64M tensor, fill (cold)",
                lambda: alloc_fill(total, BUF, True),
                idle,
            ),
        ]
    except ImportError:
        pass

    suites = {x.strip() for x in args.suite.split(",") if x.strip()}
    cases = [c for c in cases if c[0].split(" ")[0] in suites]
    one = [src]
    two = [os.path.join(work, "half-a.bin"), os.path.join(work, "half-b.bin")]
    if "cold-read" in suites:

        def cold(paths: list[str]) -> Callable[[], None]:
            def before() -> None:
                evict_files(paths, args.evict)
                left = floor.resident_fraction(paths)
                if left > 0.01:
                    print(
                        f"# warning: {left:.0%} of {paths} still cached after eviction",
                        file=sys.stderr,
                    )

            return before

        for name, fn in cold_read_cases(one, two):
            cases.append(("cold read", name, fn, cold(two if "2 files" in name else one)))
    if "read" in suites:  # warm reads: re-warm, the cold reads may have evicted the file
        cases = [
            (k, n, f, (lambda: floor.read_files(one)) if k == "read" else b) for k, n, f, b in cases
        ]

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if only:
        cases = [c for c in cases if any(s in c[1] for s in only)]

    # the source file for cat / reads, written once and warmed
    if any(c[0] in ("read", "cold read") or "1 file >" in c[1] for c in cases):
        if not os.path.exists(src) or os.path.getsize(src) != total:
            pwrite_pieces(src, mv, total, 256 * K)
        os.sync()
        cat_null(src)
    if any(c[0] == "cold read" for c in cases):
        for h in two:
            if not os.path.exists(h) or os.path.getsize(h) != total // 2:
                pwrite_pieces(h, mv, total // 2, 256 * K)
        os.sync()

    # Interleaved: round r runs every case once, so slow spells of the host (which come and
    # go over tens of seconds) hit every strategy alike instead of one case's repeats.
    runs: list[list[dict]] = [[] for _ in cases]
    for rnd in range(args.repeat):
        print(f"# round {rnd + 1}/{args.repeat}", file=sys.stderr, flush=True)
        for i, (_kind, _name, fn, before) in enumerate(cases):
            runs[i].append(run_once(fn, before))

    results = []
    print(
        "\n| kind | strategy | median s/GB | GB/s | min s/GB | user s/GB | sys s/GB | runs: wall s "
        "(1-min load avg before) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for i, (kind, name, _fn, _before) in enumerate(cases):
        r = summary(runs[i])
        g = gb * (args.sustained if "x size" in name else 1)
        r.update(kind=kind, name=name, gb=g)
        results.append(r)
        rs = ", ".join(f"{x['wall']:.2f} ({x['load1']:.1f})" for x in r["runs"])
        print(
            f"| {kind} | {name} | {r['wall'] / g:.3f} | {g / r['wall']:.2f} | "
            f"{r['min_wall'] / g:.3f} | {r['user'] / g:.3f} | {r['sys'] / g:.3f} | {rs} |",
            flush=True,
        )

    for p in (dst, src, *two):
        if os.path.exists(p):
            os.unlink(p)
    try:
        os.rmdir(work)
    except OSError:
        pass
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
