"""The CPU path of :meth:`TensorAccumulator.update`: the same figures, fewer passes and calls.

On a GPU every figure stays a 0-dim tensor on the device (no synchronisation until the
result). On CPU a synchronisation is free, and the cost is elsewhere: each torch call costs
microseconds before it touches an element, and each pass over float64 data that has left
the cache costs a memory round trip. So here each block (L2-sized) computes its figures in
as few calls as possible, hands them to Python in one ``tolist()``, and Python sums them;
the chunk's totals become state tensors once, in the accumulator's own rules. Figures that
are one pass over the raw chunk (the largest half ulp of ``F``, ``F`` bit for bit against
our merge) are computed once per chunk.

What changes against the device path is only the order of float64 additions (and so the
last bits of a sum); every count and every maximum is the same number.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stream_tv.bits import equal
from stream_tv.floats import (
    BITS_OF,
    EMPTY_EXPONENT,
    half_ulp,
    max_half_ulp,
    scaled_dots,
    ulp_counts,
)
from stream_tv.ops import round_to

from . import fused

__all__ = ["BLOCK", "lora_figures", "plain_figures"]

#: Elements per block (float64: 1 MiB per operand).
BLOCK = 1 << 17
#: Plain float64 sums of squares in this range lost nothing (see ``floats._SAFE``).
_SAFE = (2.0**-900, 2.0**900)

#: CPU chunks of LoRA tensors take the compiled kernels of :mod:`stream_tv.stats.fused`
#: when numba is there; False keeps them on torch (the tests compare the two).
FUSED = True

Figures = dict[str, Any]


def lora_figures(
    t: torch.Tensor | None,
    lo: torch.Tensor,
    f: torch.Tensor | None,
    w: torch.Tensor | None,
    merged: torch.Tensor | None,
) -> Figures:
    """The chunk's figures of a tensor with a LoRA delta (flat float64 ``t``, ``lo``; raw
    ``f``, ``w``, ``merged`` or None), keyed like the accumulator's state. ``t=None``: ``T``
    is ``f - w``, exactly, in float64 (``f`` and ``w`` given).

    With numba (:mod:`stream_tv.stats.fused`) the blocks take one compiled pass each; a
    block whose plain sums left the safe range, or that holds a non-finite element, is done
    again here, the torch way."""
    sums = _Sums()
    n = lo.numel()
    scratch = None
    fast = _fused_blocks(t, lo, f, w)
    for i, a in enumerate(range(0, n, BLOCK)):
        b = min(a + BLOCK, n)
        if fast is None or not _fold_fused(sums, fast, i, w is not None):
            if scratch is None:  # float64 rows: L - T, W + L, its rounding error, T
                rows = 4 if w is not None else 1
                scratch = torch.empty((rows, min(n, BLOCK)), dtype=torch.float64)
            _lora_block(sums, scratch, t, lo, f, w, a, b)
    if f is not None:
        if fast is not None and w is not None:  # the largest magnitude of F, as its bits
            top = int(fast[1][:, 3].max())
            bits = torch.tensor([top], dtype=torch.int64).to(BITS_OF[f.dtype])
            sums.add("_max_bound", float(half_ulp(bits.view(f.dtype))[0]))
        else:
            sums.add("_max_bound", float(max_half_ulp(f)))
    if merged is not None:
        cast = merged.to(f.dtype)
        if equal(f, cast):  # the usual case, F is our merge: one memcmp, no count
            sums.add("_exact", n)
        else:
            bits = BITS_OF[f.dtype]
            differ = torch.count_nonzero(torch.bitwise_xor(f.view(bits), cast.view(bits)))
            sums.add("_exact", n - int(differ))
    return sums.totals


def _fused_blocks(t, lo, f, w):
    """The compiled per-block figures, or None where this chunk goes the torch way."""
    if not FUSED or not fused.available() or lo.numel() == 0:
        return None
    if w is not None:
        if f.dtype not in fused.DTYPES or w.dtype not in fused.DTYPES:
            return None
        return fused.lora_blocks(lo, f, w, t, BLOCK)
    sums = fused.sum_blocks(t, lo, BLOCK)
    return None if sums is None else (sums, None)


def _fold_fused(sums: _Sums, fast, i: int, rounding: bool) -> bool:
    """Add block ``i``'s compiled figures; False (nothing added) where the block needs the
    torch way: a plain sum outside the safe range, or a non-finite element."""
    v = fast[0][i].tolist()
    tt, ll, lt, dd, total, worst = v[:6]
    ee = v[6] if rounding else _SAFE[0]
    # the torch way's rule (_pairs3, _pair): plain sums only inside the safe range
    if not (all(_SAFE[0] <= x <= _SAFE[1] for x in (tt, ll, dd, ee)) and math.isfinite(worst)):
        return False
    plain = [[x, 0.0] for x in (tt, ll, lt, dd, ee)]
    rounded = (plain[4], fast[1][i, :3].tolist()) if rounding else None
    _add_block(sums, *plain[:4], worst, total, 0, rounded)
    return True


def _add_block(sums: _Sums, tt, ll, lt, dd, worst, total, nonfinite, rounded) -> None:
    """Fold one block's figures into ``sums``: scaled pairs ``tt``, ``ll``, ``lt``, ``dd``;
    ``rounded``: ``(ee pair, [ulp0, ulp1, ulp_max])``, or None without the base."""
    sums.add_pair("_sum_tt", tt)
    sums.add_pair("_sum_ll", ll)
    sums.add_pair("_dot", lt)
    sums.add_pair("_sum_dd", dd)
    sums.add("_changed", tt[0] != 0)  # T has a nonzero (or NaN) element
    sums.add("_max_abs", worst)
    sums.add("_sum_abs", total)
    sums.add("_nonfinite", nonfinite)
    if rounded is not None:
        ee, (zero, one, top) = rounded
        sums.add_pair("_sum_ee", ee)
        sums.add("_ulp0", zero)
        sums.add("_ulp1", one)
        sums.add("_ulp_max", top)


def _lora_block(sums: _Sums, scratch, t, lo, f, w, a: int, b: int) -> None:
    """The figures of elements ``a:b``, the torch way (a few calls per figure)."""
    d_buf, *more = scratch[:, : b - a]
    lb = lo[a:b]
    if w is not None:
        x_buf, e_buf, t_buf = more
        # (copy, then add or subtract: a kernel of mixed dtypes costs twice as much)
        x = x_buf.copy_(w[a:b])
        tb = t[a:b] if t is not None else t_buf.copy_(f[a:b]).sub_(x)
        x.add_(lb)  # W + L in float64
    else:
        tb = t[a:b]
    d = torch.sub(lb, tb, out=d_buf)
    figs = [torch.dot(tb, tb), torch.dot(lb, lb), torch.dot(lb, tb), torch.dot(d, d)]
    d.abs_()
    figs += [d.max(), d.sum()]
    if w is not None:
        rounded = round_to(x, f.dtype)  # correctly rounded, not via float32
        e = e_buf.copy_(rounded).sub_(x)  # each element's rounding error
        figs.append(torch.dot(e, e))
        counts = torch.stack(ulp_counts(f[a:b], rounded)).tolist()
    v = torch.stack(figs).tolist()
    tt, ll, lt = _pairs3(v[0], v[1], v[2], tb, lb)
    nonfinite = 0 if math.isfinite(v[4]) else _nonfinite(tb, lb)
    rounded = (_pair(v[6], e), counts) if w is not None else None
    _add_block(sums, tt, ll, lt, _pair(v[3], d), v[4], v[5], nonfinite, rounded)


def plain_figures(t: torch.Tensor, f: torch.Tensor | None, w: torch.Tensor | None) -> Figures:
    """The chunk's figures of a tensor without L (flat ``t``; raw ``f``, ``w`` or None)."""
    sums = _Sums()
    n = t.numel()
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        tb = t[a:b]
        if tb.dtype.itemsize <= 4:
            # The squares of 32-bit and narrower floats never leave float64's range.
            norm = float(torch.linalg.vector_norm(tb, dtype=torch.float64))
            tt = [norm * norm, 0.0]
        else:
            tt = scaled_dots(tb)[0].tolist()
        sums.add_pair("_sum_tt", tt)
        sums.add("_changed", tt[0] != 0)
        sums.add("_nonfinite", 0 if math.isfinite(tt[0]) else _nonfinite(tb))
        if f is not None and w is not None:
            fb, wb = f[a:b], w[a:b]
            reference = round_to(wb, f.dtype)  # the correctly rounded round trip of W
            if f.dtype != w.dtype:  # same dtype: round trip == unchanged
                cast = reference if w.dtype != torch.float64 else wb.to(f.dtype)
                sums.add("_round_trip", bool(torch.all(cast == fb)))
            if f.dtype in BITS_OF:
                zero, one, top = torch.stack(ulp_counts(fb, reference)).tolist()
                sums.add("_ulp0", zero)
                sums.add("_ulp1", one)
                sums.add("_ulp_max", top)
    return sums.totals


def _pairs3(tt: float, ll: float, lt: float, t: torch.Tensor, lo: torch.Tensor) -> list:
    """The scaled pairs of ``t.t``, ``lo.lo``, ``lo.t``: the plain dots when both sums of
    squares are safely in range (as ``floats.scaled_dots`` decides), else its own."""
    if _SAFE[0] <= tt <= _SAFE[1] and _SAFE[0] <= ll <= _SAFE[1]:
        return [[tt, 0.0], [ll, 0.0], [lt, 0.0]]
    return [p.tolist() for p in scaled_dots(t, lo)]


def _pair(value: float, x: torch.Tensor) -> list:
    """The scaled pair of ``x.x`` whose plain value is ``value``."""
    if _SAFE[0] <= value <= _SAFE[1]:
        return [value, 0.0]
    return scaled_dots(x)[0].tolist()


def _nonfinite(*chunks: torch.Tensor) -> int:
    """Elements where any of ``chunks`` is NaN or infinite."""
    bad = ~torch.isfinite(chunks[0])
    for chunk in chunks[1:]:
        bad |= ~torch.isfinite(chunk)
    return int(torch.count_nonzero(bad))


class _Sums:
    """Python-side totals of per-block figures, in the accumulator's rules."""

    _OR = ("_changed",)
    _AND = ("_round_trip",)
    _MAX = ("_max_abs", "_max_bound", "_ulp_max")

    def __init__(self) -> None:
        self.totals: Figures = {}
        self._pairs: dict[str, list] = {}

    def add(self, key: str, value: Any) -> None:
        if key not in self.totals:
            self.totals[key] = value
        elif key in self._OR:
            self.totals[key] = self.totals[key] or value
        elif key in self._AND:
            self.totals[key] = self.totals[key] and value
        elif key in self._MAX:
            self.totals[key] = _nan_max(self.totals[key], value)
        else:
            self.totals[key] += value

    def add_pair(self, key: str, pair: list) -> None:
        """Add the scaled sum ``pair`` (``[value, exponent]``) to ``key``'s running pair."""
        old = self.totals.get(key)
        self.totals[key] = pair if old is None else _combine(old, pair)


def _nan_max(a: Any, b: Any) -> Any:
    # torch.maximum's rule: a NaN anywhere wins.
    if isinstance(a, float) and math.isnan(a):
        return a
    if isinstance(b, float) and math.isnan(b):
        return b
    return max(a, b)


def _combine(p: list, q: list) -> list:
    """``floats.combine_scaled`` of two pairs, in Python floats (exact power-of-two scaling)."""
    ep = EMPTY_EXPONENT if p[0] == 0 else p[1]
    eq = EMPTY_EXPONENT if q[0] == 0 else q[1]
    top = max(ep, eq)
    return [_scale(p[0], ep - top) + _scale(q[0], eq - top), top]


def _scale(value: float, exponent: float) -> float:
    return math.ldexp(value, int(max(exponent, -4000.0)))
