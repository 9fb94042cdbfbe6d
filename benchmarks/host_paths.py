"""The host-side paths a GPU run's bytes can take, each timed alone on this machine.

    python benchmarks/host_paths.py FILE [--chunk 32MiB] [--threads 1,2,4,8] [--out-dir DIR]

FILE (a shard, ideally in the page cache: it is read once first) is streamed in chunks:

- read: ``preadv`` into a reused pinned buffer (the engine's reader now: one thread), and
  the same chunk split into N disjoint ranges read by N threads at once;
- to the device: the pinned buffer copied host-to-device (non-blocking, then synchronized),
  and a pageable copy straight from a read-only mapping of the file (no read at all);
- write: a pinned buffer's bytes ``pwrite`` n to a new file in DIR (posix_fallocate first, as
  the shard writer does), by one thread and by N threads on disjoint ranges; the file is
  deleted after.

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
from concurrent.futures import ThreadPoolExecutor

import torch


def size_arg(s: str) -> int:
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    for u, m in units.items():
        if s.upper().endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def ranges(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    step = -(-(stop - start) // parts)
    step = -(-step // 4096) * 4096
    return [(a, min(stop, a + step)) for a in range(start, stop, step)]


def read_file(fd: int, size: int, buf: torch.Tensor, chunk: int, pool, threads: int) -> int:
    mv = memoryview(buf.numpy())
    done = 0
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        if threads == 1:
            done += os.preadv(fd, [mv[:n]], off)
        else:
            parts = ranges(0, n, threads)
            done += sum(
                pool.map(lambda r, off=off: os.preadv(fd, [mv[r[0] : r[1]]], off + r[0]), parts)
            )
    return done


def write_file(path: str, size: int, buf: torch.Tensor, chunk: int, pool, threads: int) -> None:
    mv = memoryview(buf.numpy())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            if threads == 1:
                os.pwrite(fd, mv[:n], off)
            else:
                list(
                    pool.map(
                        lambda r, off=off: os.pwrite(fd, mv[r[0] : r[1]], off + r[0]),
                        ranges(0, n, threads),
                    )
                )
    finally:
        os.close(fd)
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
    ap.add_argument("--chunk", type=size_arg, default=32 << 20)
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out-dir", default=None, help="where the write rows write (default: FILE's)")
    ap.add_argument("--max-bytes", type=size_arg, default=4 << 30, help="read at most this much")
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
        dev = torch.empty(args.chunk, dtype=torch.uint8, device="cuda")

        def h2d_pinned():
            for off in range(0, size, args.chunk):
                n = min(args.chunk, size - off)
                dev[:n].copy_(buf[:n], non_blocking=True)
            torch.cuda.synchronize()

        rows.append(
            ("host-to-device from the pinned buffer (copy alone)", timed(h2d_pinned, args.repeat))
        )
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        whole = torch.frombuffer(mm, dtype=torch.uint8)

        def h2d_mapped():
            for off in range(0, size, args.chunk):
                n = min(args.chunk, size - off)
                dev[:n].copy_(whole[off : off + n], non_blocking=True)
            torch.cuda.synchronize()

        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows.append(
                (
                    "host-to-device from a read-only mapping (pageable, no read)",
                    timed(h2d_mapped, args.repeat),
                )
            )
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
