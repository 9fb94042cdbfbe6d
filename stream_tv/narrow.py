"""Correctly rounded bf16/fp16 results at float32 cost (CPU), bit for bit the reference.

The reference way to round a value to a 16-bit float once is to compute it in float64 and
round through float32 *to odd* (:func:`round_to_odd32`): float32 keeps enough bits that the
final rounding is then correct. On CPU that costs a dozen float64 passes per element. The
paths here round twice the plain way (to float32, then to the 16-bit type) and repair the
few elements where that can differ.

# subtle: rounding to float32 (nearest) and then to bf16/fp16 (nearest) gives the correctly
# rounded result unless the float32 value is inexact *and* lies exactly halfway between two
# 16-bit values. Every 16-bit value and every midpoint between two of them is a float32
# value, so a nearest float32 on the other side of a midpoint from the exact value cannot
# exist; only a float32 value *on* a midpoint may be wrong. So the suspects are:

- bf16: float32 values whose low 16 bits are ``0x8000`` (exactly the bf16 midpoints);
- fp16 from float64: float32 values whose low 12 bits are zero (every fp16 midpoint, normal,
  subnormal or the overflow threshold 65520, has them; so do a few other values);
- fp16 from ``f - b`` of 32-bit floats: inexact differences (TwoSum's exact error), since
  exact differences of fp16 values have their low bits zero far too often for the test above;
- fp16 from ``f - b`` of two bf16 values: elements with an operand ``0 < |x| < 2**-31``, a
  test on the inputs' bits, no TwoSum (:func:`_tiny_operand` says why no other can be wrong).

Suspects are recomputed the reference way, so every element equals the reference's result
(``benchmarks/exhaustive_rounding.py`` checks all 2**32 pairs of 16-bit inputs). Locating
rare suspects with a bool mask would cost several passes per block, so each block only
writes the minimum (or maximum) of a key over every 256-element row, one fast pass; after
the last block, only the rows that hold a suspect are recomputed, whole, the reference way.

>>> import torch
>>> x = torch.tensor([1 + 2**-8 + 2**-30, 1 + 2**-8], dtype=torch.float64)
>>> round_from_float64(x, torch.bfloat16).tolist(), x.to(torch.bfloat16).tolist()
([1.0078125, 1.0], [1.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .bits import zero_difference

__all__ = ["BLOCK", "ROW", "round_from_float64", "round_to_odd32", "subtract_narrow"]

#: Elements per block: the block's inputs, its float32 scratch and its output stay in L2.
BLOCK = 1 << 16
#: Elements per row of the suspect search (a divisor of BLOCK).
ROW = 256

Parts = Sequence[torch.Tensor]
_INT32_MIN = -(2**31)


def round_to_odd32(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x`` rounded to float32 *to odd*: truncated toward zero, last bit set where
    inexact. Then ``.to(bf16/fp16)`` rounds correctly (float32 has more than 2p+2 bits)."""
    r = x.to(torch.float32)
    back = r.to(torch.float64)
    inexact = back != x
    bits = r.view(torch.int32)
    # Truncate toward zero where nearest rounding went away from it (sign-magnitude bits:
    # one less in the integer view is one ulp closer to zero), then set the last bit.
    bits = torch.where(inexact & (back.abs() > x.abs()), bits - 1, bits)
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32)


def subtract_narrow(f: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = f - b`` correctly rounded to ``out``'s dtype (bf16/fp16), as the float64
    reference rounds it; ``f``, ``b``: bf16, fp16 or fp32 CPU tensors of ``out``'s numel,
    ``out`` contiguous. Returns ``out``.

    # subtle: two values of the output's own 16-bit type need no repair at all, so torch's
    # own 16-bit subtraction (float32, then rounded: the same two roundings) is used, one
    # pass. ``f - b`` is inexact in float32 only when the smaller operand is tiny against
    # the larger (its last bit 2**16 (bf16) or 2**13 (fp16) times below the larger's), and
    # then ``s`` lies so close to the larger operand, itself a 16-bit value, that it cannot
    # be a midpoint. Checked for all 2**32 pairs of each type (exhaustive_rounding.py).
    """

    def value(p: Parts, s: torch.Tensor) -> None:
        s.copy_(p[0])
        s.sub_(p[1])  # float32 (the upcasts are exact, inside the kernel): rounded once

    def exact(p: Parts) -> torch.Tensor:
        return p[0].to(torch.float64).sub_(p[1])

    if f.dtype == b.dtype == out.dtype:
        return torch.sub(f.reshape(out.shape), b.reshape(out.shape), out=out)
    if f.dtype == b.dtype and zero_difference(f, b):
        # A chunk the fine-tune left alone (equal bytes, all finite): +0, no arithmetic.
        return out.zero_()
    if out.dtype == torch.bfloat16:
        key, below, rows, dtype = _bf16_midpoints, _INT32_MIN + 1, 1, torch.int32
    elif f.dtype == b.dtype == torch.bfloat16:
        key, below, rows, dtype = _tiny_operand, _TINY_BELOW, 2, torch.int16
    else:
        key, below, rows, dtype = _inexact_difference, None, 3, torch.int32
    return _rounded(
        out, [f, b], value, key, exact=exact, below=below, scratch=rows, key_dtype=dtype
    )


def round_from_float64(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 CPU ``x`` correctly rounded to bf16/fp16 (a new contiguous tensor), the bits
    of ``round_to_odd32(x).to(dtype)``."""
    out = torch.empty(x.shape, dtype=dtype)

    def value(p: Parts, s: torch.Tensor) -> None:
        s.copy_(p[0])

    if dtype == torch.bfloat16:
        key, below = _bf16_midpoints, _INT32_MIN + 1
    else:
        key, below = _fp16_midpoint_candidates, 1
    return _rounded(out, [x], value, key, exact=lambda p: p[0], below=below)


def _bf16_midpoints(p: Parts, work: torch.Tensor) -> torch.Tensor:
    """Key, in place of the float32 values ``work[0]``: the low 16 bits shifted up, the
    int32 minimum exactly where a value lies halfway between two bf16 values (``0x8000``)."""
    return work[0].view(torch.int32).bitwise_left_shift_(16)


def _fp16_midpoint_candidates(p: Parts, work: torch.Tensor) -> torch.Tensor:
    """Key, in place of the float32 values ``work[0]``: zero where the low 12 bits are."""
    return work[0].view(torch.int32).bitwise_and_(0xFFF)


#: bf16 magnitude bits of 2**-31, and the key's bound: ``(m + 0x7FFF)`` wrapped to int16 is
#: below ``_TINY_BELOW`` exactly where ``1 <= m < _TINY_MAGNITUDE``.
_TINY_MAGNITUDE = (127 - 31) << 7
_TINY_BELOW = -(2**15) + _TINY_MAGNITUDE - 1


def _tiny_operand(p: Parts, work: torch.Tensor) -> torch.Tensor:
    """Key, int16 in ``work[1]`` (two int16 rows in one float32 row), a row per operand:
    ``(|x| bits + 0x7FFF)`` wrapped to int16, below ``_TINY_BELOW`` exactly where
    ``0 < |x| < 2**-31`` (zero maps to the largest key); :func:`_rounded` keeps the smallest
    of both rows.

    # subtle: ``f - b`` of two bf16 values (8-bit significands) needs ``9 + g`` bits, ``g``
    # the gap between their exponents, so ``s = work[0]`` is inexact in float32 only for
    # ``g >= 16``, and then lies within ``2**-15`` (relative) of the larger operand ``L``.
    # Rounding ``s`` to fp16 can differ from rounding ``f - b`` once only where ``s`` sits on
    # an fp16 midpoint: never for ``|s| >= 2**-16`` (where ``L`` is an fp16 value, ``2**-24``
    # dividing it and ``|L| <= 65504``, its nearest midpoints are ``2**-12`` away, relative;
    # above, ``s`` overflows the same way rounded once or twice), never below ``2**-25``.
    # So a wrong element has ``|s| < 2**-16`` and ``s`` inexact: ``|L| < 2**-15`` and the
    # smaller operand, 16 binades below and not zero (else ``s`` is exact), under ``2**-31``.
    # Weights that small and not zero are rare in real models, where a test on ``|s|``
    # alone (small differences are common) flagged most rows. Checked for all 2**32 pairs
    # (benchmarks/exhaustive_rounding.py bf16:fp16).
    """
    k = work[1].view(torch.int16).view(2, -1)
    for x, row in zip(p, k, strict=True):
        torch.bitwise_and(x.view(torch.int16), 0x7FFF, out=row).add_(0x7FFF)
    return k


def _inexact_difference(p: Parts, work: torch.Tensor) -> torch.Tensor:
    """Key: ``|(f - b) - s|`` as int32 bits, nonzero where ``s = work[0] = float32(f - b)``
    is inexact, from TwoSum (Knuth; exact in binary floating point, subnormals included; NaN
    where ``s`` is not finite, which counts as inexact)."""
    f, b = p
    s, t, u = work[0], work[1], work[2]
    torch.sub(s, f, out=t)  # t = s - f
    torch.sub(s, t, out=u)  # u = s - t, the part of s that came from f
    torch.sub(f, u, out=u)  # u = f - u, what of f the sum lost
    t.add_(b)  # t = (s - f) + b, minus what of -b the sum lost
    u.sub_(t)  # u = (f - b) - s, exactly
    return u.abs_().view(torch.int32)  # >= 0 as int32: abs clears the sign of a NaN too


def _rounded(
    out: torch.Tensor,
    inputs: Parts,
    value: Callable[[Parts, torch.Tensor], None],
    key: Callable[[Parts, torch.Tensor], torch.Tensor],
    *,
    exact: Callable[[Parts], torch.Tensor],
    below: int | None,
    scratch: int = 1,
    key_dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """The shared loop: ``out`` (flat) = ``value`` rounded to ``out.dtype``, block by block,
    then the suspects set to ``round_to_odd32(exact(...))``. The suspects: where the integer
    ``key`` is below ``below`` (each row's minimum is kept); or, with ``below=None``, where
    the key (then >= 0) is not zero (each row's maximum). A key of several rows (one per
    operand) marks an element where any of them does. ``scratch``: the float32 rows
    ``key`` uses; ``key_dtype``: the key's."""
    o = out.view(-1)
    flat = [x.reshape(-1) for x in inputs]
    n = o.numel()
    full = n - n % ROW
    work = torch.empty((scratch, min(full, BLOCK)), dtype=torch.float32)
    marks = torch.empty(full // ROW, dtype=key_dtype)
    reduce = torch.amax if below is None else torch.amin
    for start in range(0, full, BLOCK):
        stop = min(start + BLOCK, full)
        parts = [x[start:stop] for x in flat]
        rows = marks[start // ROW : stop // ROW]
        w = work[:, : stop - start]
        value(parts, w[0])
        o[start:stop].copy_(w[0])
        k = key(parts, w)
        if k.dim() == 1:
            reduce(k.view(-1, ROW), 1, out=rows)
        else:
            reduce(k.view(k.shape[0], -1, ROW), (0, 2), out=rows)
    hit = _suspects(marks, below)
    per_pass = BLOCK // ROW
    grid = o[:full].view(-1, ROW)
    # The rows holding a suspect (one in 2**16 elements of a bf16 result holds a midpoint: a
    # few rows per block), every element of them the reference way: the others get the
    # bits they have, and the row needs no search for its suspects.
    for i in range(0, hit.numel(), per_pass):
        rows = hit[i : i + per_pass]
        parts = [x[:full].view(-1, ROW)[rows].view(-1) for x in flat]
        grid[rows] = _reference(exact(parts), o.dtype).view(-1, ROW)
    if full < n:  # the last n % ROW elements: the reference way, all of them
        o[full:] = _reference(exact([x[full:] for x in flat]), o.dtype)
    return out


def _reference(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``round_to_odd32(x).to(dtype)`` of a few float64 CPU elements, the float32 step in
    numpy: a torch call costs several microseconds before it touches an element, a numpy
    call one, and the repair is ten calls on a few hundred elements. The same steps as
    :func:`round_to_odd32` (keep the two alike; exhaustive_rounding.py checks both)."""
    a = x.numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        r = a.astype(np.float32)  # to nearest (inf past float32's range, as torch)
        back = r.astype(np.float64)
    inexact = back != a
    bits = r.view(np.int32)
    bits -= inexact & (np.abs(back) > np.abs(a))  # toward zero where nearest went away
    bits |= inexact  # the last bit set where inexact: to odd
    return torch.from_numpy(r).to(dtype)


def _suspects(key: torch.Tensor, below: int | None) -> torch.Tensor:
    """Flat indices of the suspects among ``key`` (see :func:`_rounded`)."""
    return ((key != 0) if below is None else (key < below)).nonzero().view(-1)
