"""The numba kernels of :mod:`stream_tv.stats.fused` (imported only when numba is).

Element functions are compiled without fastmath, each an exact IEEE computation; only the
kernels' accumulations carry ``reassoc``/``contract``, which lets LLVM keep several partial
sums in vector lanes (the element functions are inlined by LLVM, which keeps each
instruction's own flags). 16-bit floats arrive as integer views: ``uint16`` for bf16,
``int16`` for fp16 (numba has no 16-bit float type).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.errors import NumbaError
from numba.extending import intrinsic, overload

#: What a kernel that numba cannot compile raises (stream_tv.stats.fused falls back on it).
COMPILE_ERRORS = (NumbaError,)

#: ulp_distance of a NaN and a number (floats.ULP_UNBOUNDED).
_UNBOUNDED = np.int64(2**63 - 1)
_MAGNITUDE = np.int64(2**63 - 1)
_SUMS = {"reassoc", "contract"}


def _bitcast(source, target, llvm_target):
    """An intrinsic reading a scalar's bits as another type of the same width."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], llvm_target)

    def typer(typingctx, x):
        return target(source), codegen

    typer.__name__ = f"bitcast_{source}_to_{target}"  # one name per intrinsic (numba's cache)
    return intrinsic(typer)


_i64_as_f64 = _bitcast(types.int64, types.float64, ir.DoubleType())
_f64_as_i64 = _bitcast(types.float64, types.int64, ir.IntType(64))
_i32_as_f32 = _bitcast(types.int32, types.float32, ir.FloatType())
_f32_as_i32 = _bitcast(types.float32, types.int32, ir.IntType(32))


# -- decoding: an element of F or W as float64 (exact), and its ordered position -------------


def value(x):
    """The float64 value of one element (stub: numba picks the implementation by type)."""


def position(x):
    """``(ordered position, is NaN, magnitude bits)`` of one element of F (stub)."""


def rounded(x, proto):
    """float64 ``x`` rounded once to ``proto``'s dtype: ``(value, position, is NaN)`` (stub)."""


@njit
def _bf16_value(b):
    return np.float64(_i32_as_f32(np.int32((np.int64(b) & 0xFFFF) << 16)))


@njit
def _fp16_value(b):
    h = np.int64(b) & 0xFFFF
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    normal = _i64_as_f64(((e + 1008) << 52) | (m << 42))
    special = np.inf if m == 0 else np.nan
    v = m * 2.0**-24 if e == 0 else (special if e == 31 else normal)
    return -v if h & 0x8000 else v


@njit
def _position16(b, inf):
    h = np.int64(b) & 0xFFFF
    m = h & 0x7FFF
    return (-m if h & 0x8000 else m), m > inf, m


@njit
def _round16(x, stored, bias, inf, nan):
    """float64 ``x`` correctly rounded to a 16-bit float with ``stored`` significand bits
    and exponent ``bias``: its bits. Normal results round the float64 significand (the
    carry walks into the exponent, and past the largest finite value to ``inf``);
    subnormal ones are the nearest multiple of the subnormal spacing (an exact scaling)."""
    u = _f64_as_i64(x)
    sign = (u >> 48) & 0x8000
    a = u & _MAGNITUDE
    shift = 52 - stored
    half = (np.int64(1) << (shift - 1)) - 1
    r = ((a + half + ((a >> shift) & 1)) >> shift) - ((1023 - bias) << stored)
    r = min(r, inf)
    spacing = 2.0 ** (bias - 1 + stored)  # 1 / the subnormal spacing
    k = np.int64(np.rint(min(abs(x) * spacing, 2.0 ** (stored + 2))))
    r = r if (a >> 52) >= 1024 - bias else k
    r = nan if a > 0x7FF0000000000000 else r
    return r | sign


@overload(value, inline="never")
def _value(x):
    if x == types.uint16:
        return lambda x: _bf16_value(x)
    if x == types.int16:
        return lambda x: _fp16_value(x)
    if x == types.float32:
        return lambda x: np.float64(x)
    return None


@overload(position, inline="never")
def _position(x):
    if x == types.uint16:
        return lambda x: _position16(x, 0x7F80)
    if x == types.int16:
        return lambda x: _position16(x, 0x7C00)
    if x == types.float32:

        def position32(x):
            b = np.int64(_f32_as_i32(x))
            m = b & 0x7FFFFFFF
            return (-m if b < 0 else m), m > 0x7F800000, m

        return position32
    return None


_FORMATS16 = {
    types.uint16: (7, 127, 0x7F80, 0x7FC0, _bf16_value),  # bf16
    types.int16: (10, 15, 0x7C00, 0x7E00, _fp16_value),  # fp16
}


@overload(rounded, inline="never")
def _rounded(x, proto):
    if proto in _FORMATS16:
        # (significand bits stored, exponent bias, bits of inf, of the quiet NaN, decoder)
        stored, bias, inf, nan, decode = _FORMATS16[proto]

        def half(x, proto):
            r = _round16(x, stored, bias, inf, nan)
            pos, is_nan, _ = _position16(r, inf)
            return decode(r), pos, is_nan

        return half
    if proto == types.float32:

        def fp32(x, proto):
            r = np.float32(x)  # the hardware's float64 -> float32: rounded once, to even
            b = np.int64(_f32_as_i32(r))
            m = b & 0x7FFFFFFF
            return np.float64(r), (-m if b < 0 else m), m > 0x7F800000

        return fp32
    return None


@njit
def _rounding(fi, x):
    """``(error of rounding x to F's dtype, ulp distance of F from it, F's magnitude)``."""
    rv, pr, nan_r = rounded(x, fi)
    pf, nan_f, mag = position(fi)
    dist = abs(pf - pr)
    dist = np.int64(0) if nan_f and nan_r else (_UNBOUNDED if nan_f != nan_r else dist)
    return rv - x, dist, mag


@njit
def _difference(lv, t):
    return lv - t


@njit
def _magnitude_bits(d):
    # |d| as its int64 bits: the order of non-negative floats, a NaN above every number
    # (so the integer max is torch.max's, NaN included).
    return _f64_as_i64(abs(d))


@njit
def _element(fi, wi, lv):
    """``T = F - W``, ``W + L``: exact float64 operations, as the torch path does them."""
    wv = value(wi)
    return value(fi) - wv, wv + lv


# -- the kernels -------------------------------------------------------------------------


@njit(nogil=True, cache=True, fastmath=_SUMS)
def _full(tv, lo, f, w, sums, counts, block):
    """``tv``: ``T``, or empty for ``F - W`` (loop-invariant: LLVM makes two loops of it)."""
    n = lo.size
    given = tv.size > 0
    for bi in range(sums.shape[0]):
        tt = ll = lt = dd = sa = ee = 0.0
        mx = n0 = n1 = top = fmax = np.int64(0)
        for i in range(bi * block, min(n, bi * block + block)):
            lv = lo[i]
            t, x = _element(f[i], w[i], lv)
            if given:
                t = tv[i]
            d = _difference(lv, t)
            e, dist, mag = _rounding(f[i], x)
            tt += t * t
            ll += lv * lv
            lt += lv * t
            dd += d * d
            sa += abs(d)
            ee += e * e
            mx = max(mx, _magnitude_bits(d))
            n0 += dist == 0
            n1 += dist == 1
            top = max(top, dist)
            fmax = max(fmax, mag)
        _store(sums, counts, bi, tt, ll, lt, dd, sa, mx, ee, n0, n1, top, fmax)


@njit(nogil=True, cache=True, fastmath=_SUMS)
def _sums(tv, lo, sums, block):
    n = lo.size
    for bi in range(sums.shape[0]):
        tt = ll = lt = dd = sa = 0.0
        mx = np.int64(0)
        for i in range(bi * block, min(n, bi * block + block)):
            lv = lo[i]
            t = tv[i]
            d = _difference(lv, t)
            tt += t * t
            ll += lv * lv
            lt += lv * t
            dd += d * d
            sa += abs(d)
            mx = max(mx, _magnitude_bits(d))
        _store_sums(sums, bi, tt, ll, lt, dd, sa, mx)


@njit
def _store_sums(sums, bi, tt, ll, lt, dd, sa, mx):
    for j, v in enumerate((tt, ll, lt, dd, sa, _i64_as_f64(mx))):
        sums[bi, j] = v


@njit
def _store(sums, counts, bi, tt, ll, lt, dd, sa, mx, ee, n0, n1, top, fmax):
    _store_sums(sums, bi, tt, ll, lt, dd, sa, mx)
    sums[bi, 6] = ee
    counts[bi, 0] = n0
    counts[bi, 1] = n1
    counts[bi, 2] = top
    counts[bi, 3] = fmax


KERNELS = {"full": _full, "sums": _sums}
