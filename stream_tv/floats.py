"""Float formats, exactly: ulps of bf16/fp16/fp32/fp64 values, distances in ulps, and sums
that cannot under- or overflow (pure tensor maths, any device, no I/O).

>>> import torch
>>> half_ulp(torch.tensor([1.0], dtype=torch.bfloat16)).tolist()
[0.00390625]
>>> x = torch.full((4,), 1e-300, dtype=torch.float64)
>>> float(torch.dot(x, x)), sqrt_of_scaled(combine_scaled(scaled_dots(x)).tolist())
(0.0, 2e-300)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from stream_tv.errors import InputError

__all__ = [
    "BITS_OF",
    "EMPTY_EXPONENT",
    "ULP_UNBOUNDED",
    "add_scaled",
    "combine_scaled",
    "half_ulp",
    "ldexp",
    "max_half_ulp",
    "ordered",
    "scaled_dots",
    "scaled_pair",
    "sqrt_of_scaled",
    "ulp_counts",
    "ulp_distance",
]

#: Finetuned dtypes with a rounding bound, and the same-size integer dtype to read their bits.
BITS_OF = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half an ulp of every element of ``x`` in its own dtype, as float64 (vectorised).

    This is the largest error of rounding a real number to the nearest value of ``x``'s
    dtype that lands on ``x``. The ulp is the spacing from ``|x|`` to the next representable
    value away from zero: ``2**(e - p)`` for ``|x| = m * 2**e`` with ``m`` in ``[0.5, 1)`` and
    ``p`` significand bits (bf16 8, fp16 11, fp32 24, fp64 53); zero and subnormals have the
    subnormal spacing. Non-finite elements get ``inf``. Supports bf16, fp16, fp32 and fp64
    (fp64 subnormals get ``2**-1022``, a harmless overestimate).

    >>> half_ulp(torch.tensor([1.0, 3.0, 0.0], dtype=torch.bfloat16)).tolist()
    [0.00390625, 0.0078125, 4.591774807899561e-41]
    >>> half_ulp(torch.tensor([1.0], dtype=torch.float16)).tolist() == [2.0**-11]
    True
    """
    if x.dtype not in BITS_OF:
        raise InputError(f"no rounding bound for {x.dtype}", hint="use bf16, fp16, fp32 or fp64")
    info = torch.finfo(x.dtype)
    stored = round(-math.log2(info.eps))  # significand bits stored: bf16 7, fp16 10, fp32 23
    bias = 1 - round(math.log2(info.tiny))  # exponent bias: bf16/fp32 127, fp16 15
    all_ones = (1 << (info.bits - 1 - stored)) - 1  # the exponent field of inf and NaN
    # Read the biased exponent field E straight from the bits: exact, on every device, and
    # in the input's width (frexp on a float32 copy costs several times more on big chunks).
    exp = (x.view(BITS_OF[x.dtype]) >> stored) & all_ones
    non_finite = exp == all_ones
    exp.clamp_min_(1)  # zero and subnormals: the spacing of the smallest normal binade
    # half ulp = 2**(E - bias - stored - 1), built as the float64 with that exponent field
    # (the sum is >= 1 except for fp64 subnormals, clamped to 2**-1022).
    field = exp.to(torch.int64).add_(1023 - bias - stored - 1).clamp_min_(1)
    half = field.bitwise_left_shift_(52).view(torch.float64)
    return half.masked_fill_(non_finite, math.inf)


# -- ulp distance ----------------------------------------------------------------------------

#: The distance of a NaN from a number: more steps than any two values of a dtype are apart.
ULP_UNBOUNDED = torch.iinfo(torch.int64).max


def ordered(x: torch.Tensor) -> torch.Tensor:
    """The position of every element of ``x`` in its dtype's ordered sequence of values, as
    int64: 0 for both zeros, +k for the k-th value above zero, -k for the k-th below.

    The sequence is ``-inf, -max, ..., -min_subnormal, 0, min_subnormal, ..., max, +inf``;
    adjacent values differ by 1. NaNs get positions beyond the infinities (meaningless: see
    :func:`ulp_distance`). The bits are sign and magnitude, so the magnitude bits of a
    non-negative float are its position, and a negative float's position is minus those.

    >>> ordered(torch.tensor([-1.0, -0.0, 0.0, 2.0**-133, 1.0], dtype=torch.bfloat16)).tolist()
    [-16256, 0, 0, 1, 16256]
    """
    if x.dtype not in BITS_OF:
        raise InputError(f"no ulp distance for {x.dtype}", hint="use bf16, fp16, fp32 or fp64")
    bits = x.view(BITS_OF[x.dtype]).to(torch.int64)
    magnitude = bits & ((1 << (8 * x.dtype.itemsize - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance of ``a`` and ``b`` (one float dtype) in units in the last place.

    The distance is the number of representable values of the dtype in the half-open
    interval ``(min(a, b), max(a, b)]``, the two zeros counted as one value: 0 when ``a`` and
    ``b`` are equal as numbers (``-0.0`` and ``+0.0`` included), 1 for neighbours, and so on,
    across zero and the subnormals alike: it is ``|ordered(a) - ordered(b)|``. The
    infinities are the values just beyond ``+-max`` (``max`` to ``inf`` is 1, as IEEE's
    ``nextUp(max) = inf``). Two NaNs are at distance 0 (a merge that propagates a NaN
    reproduces it); a NaN and a number are :data:`ULP_UNBOUNDED` apart. Returns int64; fp64
    distances saturate at :data:`ULP_UNBOUNDED`.

    >>> x = torch.tensor([1.0, 1.0, -0.0, 2.0**-133, 65504.0, math.nan], dtype=torch.float16)
    >>> y = torch.tensor([1.0009765625, 0.99951171875, 0.0, -(2.0**-133), math.inf, 1.0],
    ...                  dtype=torch.float16)
    >>> ulp_distance(x, y).tolist()[:5], ulp_distance(x, y).tolist()[5] == ULP_UNBOUNDED
    ([1, 1, 0, 0, 1], True)
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        raise InputError(
            f"ulp distance of {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}",
            hint="both operands need one dtype and one shape",
        )
    oa, ob = ordered(a), ordered(b)
    distance = (oa - ob).abs_()
    if a.dtype == torch.float64:
        # subtle: positions of fp64 values reach +-(2**63 - 2**52); the difference of two of
        # opposite signs can pass 2**63 and wrap. Saturate those.
        room = ULP_UNBOUNDED - oa.abs()
        wraps = ((oa > 0) & (ob < 0) | (oa < 0) & (ob > 0)) & (ob.abs() > room)
        distance.masked_fill_(wraps, ULP_UNBOUNDED)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    distance.masked_fill_(nan_a & nan_b, 0)
    return distance.masked_fill_(nan_a ^ nan_b, ULP_UNBOUNDED)


def ulp_counts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """How many elements of ``a`` and ``b`` are 0 and 1 ulp apart, and the largest distance
    (0-dim int64 tensors): the reductions of :func:`ulp_distance` (``a``, ``b`` non-empty).

    On CPU for bf16/fp16 the same numbers come for a fraction of the work: rows of 256
    elements that are bitwise equal (distance 0) are counted without computing a distance,
    and the others get it in int32 without ``torch.where`` (a block holding a NaN takes
    :func:`ulp_distance` itself).

    >>> x = torch.tensor([1.0, 1.0, 2.0, -0.0], dtype=torch.bfloat16)
    >>> y = torch.tensor([1.0, 1.0078125, 2.03125, 0.0], dtype=torch.bfloat16)
    >>> [int(v) for v in ulp_counts(x, y)]
    [2, 1, 2]
    """
    if a.device.type == "cpu" and a.dtype in _MAGNITUDE_OF_INF and a.numel():
        return _ulp_counts16(a.reshape(-1), b.reshape(-1))
    d = ulp_distance(a, b)
    return torch.count_nonzero(d == 0), torch.count_nonzero(d == 1), d.max()


#: 16-bit dtypes: the magnitude bits of their infinity (above it: NaN).
_MAGNITUDE_OF_INF = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
_ROW = 256


def _ulp_counts16(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`ulp_counts` of flat 16-bit CPU tensors: the rows holding a bitwise
    difference (two fast reductions find them) get distances, the others count as 0."""
    n = a.numel()
    full = n - n % _ROW
    diff = torch.bitwise_xor(a.view(torch.int16), b.view(torch.int16))[:full].view(-1, _ROW)
    hit = ((diff.amin(1) != 0) | (diff.amax(1) != 0)).nonzero().view(-1)
    if 2 * hit.numel() * _ROW > full:  # mostly different: every element, no gathers
        return _dense_counts16(a, b)
    if hit.numel() * _ROW + n - full <= _FEW:  # the usual case: a few rows differ
        return _few_counts16(a, b, hit.numpy(), full)
    rows_a, rows_b = a[:full].view(-1, _ROW)[hit].view(-1), b[:full].view(-1, _ROW)[hit].view(-1)
    some_a, some_b = torch.cat([rows_a, a[full:]]), torch.cat([rows_b, b[full:]])
    if some_a.numel() == 0:
        zero = torch.zeros((), dtype=torch.int64)
        return torch.tensor(n, dtype=torch.int64), zero, zero
    n0, n1, top = _dense_counts16(some_a, some_b)
    return n0 + (full - hit.numel() * _ROW), n1, top


#: Elements to measure at most for numpy to take them: each torch call costs more than
#: measuring this many elements in numpy.
_FEW = 4096


def _few_counts16(a: torch.Tensor, b: torch.Tensor, hit, full: int) -> tuple[torch.Tensor, ...]:
    """:func:`_ulp_counts16` from the ``hit`` rows (a numpy array of row indices below
    ``full // _ROW``) and the tail past ``full``: every other element is bitwise equal. In
    numpy, whose calls cost a microsecond where torch's cost several, on a few elements."""
    inf = _MAGNITUDE_OF_INF[a.dtype]
    ia, ib = a.view(torch.int16).numpy(), b.view(torch.int16).numpy()
    ra = np.concatenate([ia[:full].reshape(-1, _ROW)[hit].ravel(), ia[full:]]).astype(np.int64)
    rb = np.concatenate([ib[:full].reshape(-1, _ROW)[hit].ravel(), ib[full:]]).astype(np.int64)
    ma, mb = ra & 0x7FFF, rb & 0x7FFF  # magnitudes (the int16 view is sign-extended)
    d = np.abs(np.where(ra < 0, -ma, ma) - np.where(rb < 0, -mb, mb))
    nan_a, nan_b = ma > inf, mb > inf
    if nan_a.any() or nan_b.any():  # ulp_distance's rule: two NaNs 0 apart, one unbounded
        d[nan_a & nan_b] = 0
        d[nan_a ^ nan_b] = ULP_UNBOUNDED
    equal = full - hit.size * _ROW  # the rows without a difference
    n0, n1 = int(np.count_nonzero(d == 0)) + equal, int(np.count_nonzero(d == 1))
    top = int(d.max()) if d.size else 0
    return tuple(torch.tensor(v, dtype=torch.int64) for v in (n0, n1, top))


def _dense_counts16(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`ulp_counts` of flat 16-bit CPU tensors, element by element, in int32."""
    inf = _MAGNITUDE_OF_INF[a.dtype]
    ra, rb = a.view(torch.int16).to(torch.int32), b.view(torch.int16).to(torch.int32)
    ma, mb = ra & 0x7FFF, rb & 0x7FFF  # magnitudes (the int16 view is sign-extended)
    if max(int(ma.max()), int(mb.max())) > inf:  # a NaN: the reference way
        d = ulp_distance(a, b)
        return torch.count_nonzero(d == 0), torch.count_nonzero(d == 1), d.max()
    # ordered(): the magnitude, negated where the sign bit is set ((r >> 31) | 1 is -1 or 1)
    ma.mul_(ra.bitwise_right_shift_(31).bitwise_or_(1))
    mb.mul_(rb.bitwise_right_shift_(31).bitwise_or_(1))
    d = ma.sub_(mb).abs_()
    top = d.max().to(torch.int64)
    # Distances capped at 2: nonzero ones count n1 + n2, their sum n1 + 2 * n2.
    capped = d.clamp_max_(2)
    nonzero = torch.count_nonzero(capped)
    total = capped.sum(dtype=torch.int64)
    return d.numel() - nonzero, 2 * nonzero - total, top


def max_half_ulp(x: torch.Tensor) -> torch.Tensor:
    """``half_ulp(x).max()`` (0-dim float64) from one reduction: the half ulp grows with
    the exponent, so the largest is that of the largest magnitude (NaN or inf: inf).

    >>> float(max_half_ulp(torch.tensor([1.0, -3.0, 0.5], dtype=torch.bfloat16)))
    0.0078125
    """
    lo, hi = torch.aminmax(x.reshape(-1))  # one pass, no |x| copy (NaN propagates)
    return half_ulp(torch.maximum(lo.abs(), hi.abs()).reshape(1))[0]


# -- scaled sums: norms and dot products from 1e-300 to 1e300 --------------------------------

# subtle: a float64 sum of squares underflows for elements below ~1e-154 and overflows above
# ~1e154 (|x| = 1e-300 squares to 0). As BLAS nrm2 does, such sums are kept scaled: a sum is
# a pair [value, exponent] meaning value * 2**exponent, with the elements divided by a power
# of two before they are squared, which is exact. Powers of two keep the common case (no
# scaling, exponent 0) bit for bit the plain float64 sum, and make pairs mergeable in any
# order: the merge rescales by exact powers of two.

#: Exponent of a sum that is zero: below every real exponent, so a merge ignores it.
EMPTY_EXPONENT = -(2.0**40)
#: A float64 sum of squares in [2**-900, 2**900] lost nothing to underflow or overflow (its
#: largest square is at least 2**-900 / numel; every lost square is below 2**-1022).
_SAFE = (2.0**-900, 2.0**900)


def scaled_pair(value: torch.Tensor, exponent: torch.Tensor | float) -> torch.Tensor:
    """The scaled sum ``value * 2**exponent`` as a float64 [value, exponent] pair."""
    exp = torch.as_tensor(exponent, dtype=torch.float64, device=value.device)
    return torch.stack([value.to(torch.float64), exp])


def combine_scaled(pairs: list[torch.Tensor]) -> torch.Tensor:
    """The sum of scaled sums, as one pair (exact rescaling by powers of two)."""
    stacked = torch.stack(pairs)
    values, exps = stacked[:, 0], stacked[:, 1]
    exps = torch.where(values == 0, EMPTY_EXPONENT, exps)
    top = exps.max()
    return torch.stack([(values * torch.exp2(exps - top)).sum(), top])


def add_scaled(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``acc + value`` of two scaled pairs (``acc`` None: nothing yet), on ``acc``'s device."""
    return value if acc is None else combine_scaled([acc, value.to(acc.device)])


def _shift(x: torch.Tensor) -> torch.Tensor:
    """A 0-dim float64 ``k`` such that ``x * 2**-k`` has its largest magnitude in [0.5, 1).

    ``k`` is clamped to [-960, 1020] so that ``2**-k`` is a normal float64; zero, NaN and
    infinite maxima give 0 (the sums then stay 0, NaN or inf, as they should).
    """
    amax = torch.linalg.vector_norm(x, ord=math.inf, dtype=torch.float64)
    exp = torch.frexp(amax).exponent.to(torch.float64)
    return exp.clamp(-960.0, 1020.0)


def scaled_dots(a: torch.Tensor, b: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[a.a]`` or ``[a.a, b.b, a.b]`` of float64 blocks, as scaled pairs.

    On CPU the plain dots are kept when the sums of squares are safely in range (the common
    case; a free host check); otherwise, and always on other devices (no synchronisation),
    the operands are scaled by powers of two first.
    """
    if a.device.type == "cpu":
        aa = torch.dot(a, a)
        bb = None if b is None else torch.dot(b, b)
        if _SAFE[0] <= float(aa) <= _SAFE[1] and (bb is None or _SAFE[0] <= float(bb) <= _SAFE[1]):
            if b is None:
                return [scaled_pair(aa, 0.0)]
            return [scaled_pair(aa, 0.0), scaled_pair(bb, 0.0), scaled_pair(torch.dot(a, b), 0.0)]
    ka = _shift(a)
    sa = a * torch.exp2(-ka)
    if b is None:
        return [scaled_pair(torch.dot(sa, sa), 2 * ka)]
    kb = _shift(b)
    sb = b * torch.exp2(-kb)
    return [
        scaled_pair(torch.dot(sa, sa), 2 * ka),
        scaled_pair(torch.dot(sb, sb), 2 * kb),
        scaled_pair(torch.dot(sa, sb), ka + kb),
    ]


def ldexp(x: float, exp: float) -> float:
    """``x * 2**exp`` as a Python float: inf on overflow, 0 on underflow."""
    try:
        return math.ldexp(x, int(exp))
    except OverflowError:
        return math.copysign(math.inf, x)


def sqrt_of_scaled(pair: list[float] | None) -> float:
    """The square root of a scaled sum of squares (its exponent is even)."""
    if pair is None or pair[0] == 0:
        return 0.0
    return ldexp(math.sqrt(pair[0]), pair[1] // 2)
