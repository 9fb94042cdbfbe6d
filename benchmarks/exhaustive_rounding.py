"""Exhaustive proof that the float32 16-bit paths of ``stream_tv.ops`` are bit-identical to
the float64 reference (rounding through float32 to odd), for every pair of 16-bit inputs.

    python benchmarks/exhaustive_rounding.py [--pairs bf16:bf16,bf16:fp16,fp16:fp16,fp16:bf16]
        [--round-to N]

``--pairs IN:OUT``: ``ops.subtract(f, b, out=OUT)`` for every ``f`` and every ``b`` of
dtype IN (2**32 pairs per line, all NaN payloads included), against
``round_to_odd32(f.double() - b.double()).to(OUT)``, the path ``subtract`` took
before. ``--round-to N``: ``ops.round_to`` of N random float64 values around every 16-bit
midpoint (and of N plain random ones) against the same reference. Prints the mismatches
(none expected) and the time taken; exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stream_tv import ops  # noqa: E402
from stream_tv.narrow import round_to_odd32 as reference_odd  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def every_value(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def pairs(src: torch.dtype, dst: torch.dtype, rows: int = 256) -> int:
    values = every_value(src)
    bad = 0
    for i in range(0, values.numel(), rows):
        f = values[i : i + rows].repeat_interleave(values.numel())
        b = values.repeat(f.numel() // values.numel())
        got = ops.subtract(f, b, out=torch.empty(f.numel(), dtype=dst))
        want = reference_odd(f.double() - b.double()).to(dst)
        diff = (got.view(torch.int16) != want.view(torch.int16)).nonzero().view(-1)
        if diff.numel():
            bad += diff.numel()
            j = int(diff[0])
            print(
                f"  mismatch {f[j].item()!r} - {b[j].item()!r}: {got[j].item()!r} vs {want[j].item()!r}"
            )
    return bad


def around_midpoints(dtype: torch.dtype, n: int, seed: int = 0) -> int:
    g = torch.Generator().manual_seed(seed)
    v = every_value(dtype).double()
    v = v[torch.isfinite(v)].sort().values
    mids = (v[:-1] + v[1:]) / 2  # exact in float64
    bad = 0
    for scale in (0.0, 2.0**-60, 2.0**-40, 2.0**-30, 2.0**-26, 2.0**-24, 2.0**-20):
        noise = torch.randn(mids.numel(), generator=g, dtype=torch.float64) * scale
        x = mids * (1 + noise)
        spread = torch.randint(-160, 130, (n,), generator=g).to(torch.float64).exp2()
        x = torch.cat([x, -x, torch.randn(n, generator=g, dtype=torch.float64) * spread])
        got = ops.round_to(x, dtype)
        want = reference_odd(x).to(dtype)
        diff = (got.view(torch.int16) != want.view(torch.int16)).nonzero().view(-1)
        bad += diff.numel()
        for j in diff[:3].tolist():
            print(f"  round_to mismatch {x[j].item()!r}: {got[j].item()!r} vs {want[j].item()!r}")
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="bf16:bf16,bf16:fp16,fp16:fp16,fp16:bf16")
    p.add_argument("--round-to", type=int, default=1 << 20)
    a = p.parse_args()
    bad = 0
    for item in filter(None, a.pairs.split(",")):
        src, dst = item.split(":")
        t = time.perf_counter()
        n = pairs(DTYPES[src], DTYPES[dst])
        print(
            f"subtract {src} - {src} -> {dst}: 2**32 pairs, {n} mismatches, {time.perf_counter() - t:.0f} s"
        )
        bad += n
    if a.round_to:
        for name, dtype in DTYPES.items():
            t = time.perf_counter()
            n = around_midpoints(dtype, a.round_to)
            print(f"round_to float64 -> {name}: {n} mismatches, {time.perf_counter() - t:.0f} s")
            bad += n
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
