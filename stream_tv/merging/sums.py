"""Exact sums of magnitudes over chunks (the l1 norms of mergekit's rescale)."""

from __future__ import annotations

import math

import torch


class ExactAbsSum:
    """``sum(|x|)`` over chunks, exact until the final rounding to float64: integer mantissa
    sums per binary exponent, so any chunking and any device give the same float.

    >>> s = ExactAbsSum()
    >>> x = torch.tensor([1e16, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    >>> s.add(x[:2]); s.add(x[2:])
    >>> s.value(), float(x.abs().sum())   # adding the ones one by one to 1e16 loses them
    (1.0000000000000004e+16, 1e+16)
    """

    def __init__(self) -> None:
        self._wide: bool | None = None  # float64 values (else float32 and narrower)
        self._acc: list[torch.Tensor] = []
        self._nan = 0
        self._inf = 0

    def add(self, x: torch.Tensor) -> None:
        wide = x.dtype == torch.float64
        if self._wide is None:
            self._wide = wide
        elif wide and not self._wide:
            raise RuntimeError("ExactAbsSum: float64 values after narrower ones")
        if self._wide:  # 11 exponent bits, 52 mantissa bits
            bits, ebits, mbits = x.reshape(-1).to(torch.float64).view(torch.int64), 11, 52
            bits = bits & 0x7FFF_FFFF_FFFF_FFFF
        else:  # float32 holds bf16/fp16 exactly: 8 exponent bits, 23 mantissa bits
            bits = x.reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64)
            bits, ebits, mbits = bits & 0x7FFF_FFFF, 8, 23
        if not self._acc:
            parts = 2 if self._wide else 1
            self._acc = [
                torch.zeros(1 << ebits, dtype=torch.int64, device=bits.device) for _ in range(parts)
            ]
        e = bits >> mbits
        mant = bits & ((1 << mbits) - 1)
        nonfinite = e == (1 << ebits) - 1
        if bool(nonfinite.any()):
            nan = nonfinite & (mant != 0)
            self._nan += int(nan.sum())
            self._inf += int((nonfinite & ~nan).sum())
        normal = e > 0
        mant = torch.where(normal, mant | (1 << mbits), mant)
        e = torch.where(normal, e, 1)  # subnormals: exponent 1 without the implicit bit
        if self._wide:  # 53-bit mantissas in two parts < 2**27: 2**36 terms fit in int64
            self._acc[0].index_add_(0, e, mant >> 26)
            self._acc[1].index_add_(0, e, mant & ((1 << 26) - 1))
        else:  # 24-bit mantissas: 2**39 terms fit
            self._acc[0].index_add_(0, e, mant)

    def value(self) -> float:
        if self._nan:
            return math.nan
        if self._inf:
            return math.inf
        if not self._acc:
            return 0.0
        sums = [a.tolist() for a in self._acc]
        per_exp = [(h << 26) + lo for h, lo in zip(*sums, strict=True)] if self._wide else sums[0]
        # value = mant * 2**(e - bias - mbits), with e >= 1 (subnormals counted at e = 1)
        total = sum(m << (e - 1) for e, m in enumerate(per_exp) if m and e < len(per_exp) - 1)
        scale = 1074 if self._wide else 149
        try:
            return total / (1 << scale)  # int / int is correctly rounded in Python
        except OverflowError:
            return math.inf
