"""The host-side paths a GPU run's bytes can take, each timed alone on this machine.

    python benchmarks/host_paths.py FILE [--chunk 32MiB] [--threads 1,2,4,8] [--out-dir DIR]

FILE (a shard, ideally in the page cache: it is read once first) is streamed in chunks:

- read: ``preadv`` into a reused pinned buffer (the engine's reader now: one thread), and
  the same chunk split into N disjoint ranges read by N threads at once;
- to the device: chunk-sized copies from a pinned and a pageable buffer (``floor.h2d``, its
  best repeat), and copies straight from a read-only mapping of the file (no read at all);
- write: the buffer's bytes ``pwrite`` to a new file in DIR (posix_fallocate first, as the
  shard writer does), by one thread and by N threads on disjoint ranges; the file is
  deleted after.

The reads and writes are io_probe.py's helpers (``pieces``, ``_split``, ``_pread_full``,
``pwrite_pieces``).

Prints one table (GB/s, median of ``--repeat``); with no CUDA the device rows are skipped.
Reports only; checks nothing but that every byte read equals the file's.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import floor  # noqa: E402  (benchmarks/floor.py: the host-to-device rates)
from io_probe import _pread_full, _split, pieces, pwrite_pieces  # noqa: E402

from stream_tv.units import parse_size  # noqa: E402


def read_file(fd: int, size: int, buf: torch.Tensor, chunk: int, pool, threads: int) -> int:
    """``size`` bytes of ``fd`` chunk by chunk into ``buf``; a chunk in ``threads`` aligned
    pieces read at once (io_probe.py's positional reads)."""
    mv = memoryview(buf.numpy())
    done = 0
    for off, n in pieces(size, chunk):
        if threads == 1:
            done += _pread_full(fd, mv[:n], off)
        else:
            parts = _split(n, threads)
            done += sum(
                pool.map(
                    lambda p, off=off: _pread_full(fd, mv[p[0] : p[0] + p[1]], off + p[0]), parts
                )
            )
    return done


def write_file(path: str, size: int, buf: torch.Tensor, chunk: int, pool, threads: int) -> None:
    """``size`` bytes from ``buf`` to a new file (posix_fallocate first, as the writer does),
    each chunk by ``threads`` positional writes on disjoint pieces; the file is deleted."""
    mv = memoryview(buf.numpy())
    try:
        if threads == 1:
            pwrite_pieces(path, mv, size, chunk, presize="fallocate")
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
            for off, n in pieces(size, chunk):
                parts = _split(n, threads)
                list(
                    pool.map(
                        lambda p, off=off: os.pwrite(fd, mv[p[0] : p[0] + p[1]], off + p[0]), parts
                    )
                )
        finally:
            os.close(fd)
    finally:
        os.unlink(path)


def timed(fn, repeat: int) -> float:
    walls = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--chunk", type=parse_size, default=32 << 20)
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out-dir", default=None, help="where the write rows write (default: FILE's)")
    ap.add_argument("--max-bytes", type=parse_size, default=4 << 30, help="read at most this much")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    size = min(os.path.getsize(args.file), args.max_bytes)
    cuda = torch.cuda.is_available()
    buf = torch.empty(args.chunk, dtype=torch.uint8, pin_memory=cuda)
    fd = os.open(args.file, os.O_RDONLY)
    pool = ThreadPoolExecutor(max(threads))
    rows = []
    gb = size / 1e9
    read_file(fd, size, buf, args.chunk, pool, 1)  # into the page cache, if it fits
    print(
        f"# {args.file}: {gb:.2f} GB, chunk {args.chunk >> 20} MiB, {os.cpu_count()} cores, "
        f"cuda {torch.cuda.get_device_name(0) if cuda else 'no'}",
        file=sys.stderr,
    )
    for t in threads:
        s = timed(lambda t=t: read_file(fd, size, buf, args.chunk, pool, t), args.repeat)
        rows.append((f"preadv into a {'pinned' if cuda else 'plain'} buffer, {t} thread(s)", s))
    # the bytes read equal the file's (last chunk)
    off = (size - 1) // args.chunk * args.chunk
    n = size - off
    with open(args.file, "rb") as f:
        f.seek(off)
        want = f.read(n)
    read_file(fd, size, buf, args.chunk, pool, max(threads))
    if bytes(buf[:n].numpy()) != want:
        raise SystemExit("host_paths: a parallel read gave other bytes than the file's")
    if cuda:
        rates = floor.h2d(args.chunk)  # chunk-sized copies, pinned and pageable sources
        for kind in ("pinned", "pageable"):
            rows.append(
                (f"host-to-device from a {kind} buffer (copy alone)", gb / rates[f"{kind}_gbps"])
            )
        dev = torch.empty(args.chunk, dtype=torch.uint8, device="cuda")
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer of a read-only mapping: only read
            whole = torch.frombuffer(mm, dtype=torch.uint8)

        def h2d_mapped():
            for off, n in pieces(size, args.chunk):
                dev[:n].copy_(whole[off : off + n], non_blocking=True)
            torch.cuda.synchronize()

        row = (
            "host-to-device from a read-only mapping of the file (no read)",
            timed(h2d_mapped, args.repeat),
        )
        rows.append(row)
        del whole
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.file))
    target = os.path.join(out_dir, ".host_paths-write.tmp")
    write_file(target, size, buf, args.chunk, pool, 1)  # once untimed: the first pays more
    for t in threads:
        s = timed(lambda t=t: write_file(target, size, buf, args.chunk, pool, t), args.repeat)
        rows.append((f"pwrite from that buffer to a new file, {t} thread(s)", s))
    os.close(fd)
    print("| path | GB/s | s |\n|---|---:|---:|")
    for name, s in rows:
        print(f"| {name} | {gb / s:.2f} | {s:.3f} |")


if __name__ == "__main__":
    main()
