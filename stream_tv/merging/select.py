"""Exact top-k by magnitude, streamed: a radix select on the bits of ``|x|``.

One histogram pass per 16 bits of the magnitude (bf16/fp16 1, float32 2, float64 4), 65536
counters per target whatever the tensor size; equal magnitudes rank by flat index (the lower
index first), so the kept set is exactly ``k`` elements and the same for any chunking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError

_DIGIT = 16
_BUCKETS = 1 << _DIGIT
MAG_BITS = {2: 15, 4: 31, 8: 63}  # magnitude bits of a float of this many bytes
_KEY_DTYPE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def select_passes(dtype: torch.dtype) -> int:
    """Histogram passes over the data to find an exact k-th largest magnitude of ``dtype``.

    >>> select_passes(torch.bfloat16), select_passes(torch.float32), select_passes(torch.float64)
    (1, 2, 4)
    """
    return -(-MAG_BITS[dtype.itemsize] // _DIGIT)


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """The bits of ``|x|`` as non-negative integers of ``x``'s width (int16, int32, int64):
    ordered as the magnitudes (NaN above inf).

    >>> magnitude_key(torch.tensor([-1.0, 0.5, -0.0, float("inf")])).tolist()
    [1065353216, 1056964608, 0, 2139095040]
    >>> magnitude_key(torch.tensor([-1.0, 2.0], dtype=torch.bfloat16)).dtype
    torch.int16
    """
    n = x.dtype.itemsize
    if not x.is_floating_point() or n not in MAG_BITS:
        raise InputError(f"cannot rank magnitudes of {x.dtype} values", hint="use a float tensor")
    # the sign bit cleared: non-negative in the signed type of the same width, so no widening
    return x.view(_KEY_DTYPE[n]) & ((1 << MAG_BITS[n]) - 1)


@dataclass
class Threshold:
    """Where the top ``m`` magnitudes end: every key above ``key``, and the first ``keep`` (by
    flat index) of the ``ties`` elements whose key equals ``key``."""

    m: int
    key: int
    keep: int
    ties: int


class RadixSelect:
    """Exact top-``m`` thresholds of one tensor's magnitudes, from histogram passes over chunks.

    Order: larger magnitude first, equal magnitudes by lower flat index first. Pass ``p``
    counts the ``p``-th 16-bit digit of the keys (from the top) among the keys whose higher
    digits equal the prefix found so far: 65536 counters per target, whatever the size. Feed
    every chunk of a pass with :meth:`update`, then call :meth:`end_pass`; after
    ``passes`` passes, :attr:`thresholds` holds one :class:`Threshold` per target.

    >>> x = torch.tensor([3.0, -5.0, 3.0, 1.0, 3.0])
    >>> rs = RadixSelect(x.dtype, x.numel(), [2])
    >>> for _ in range(rs.passes):
    ...     rs.update(x[:2]); rs.update(x[2:]); rs.end_pass()
    >>> t = rs.thresholds[0]; (t.key == magnitude_key(torch.tensor(3.0)).item(), t.keep, t.ties)
    (True, 1, 3)
    """

    def __init__(self, dtype: torch.dtype, numel: int, targets: Sequence[int]):
        for m in targets:
            if not 0 < m < numel:
                raise ValueError(f"a top-m target must be in (0, {numel}), not {m}")
        self.passes = select_passes(dtype)
        self._bits = MAG_BITS[dtype.itemsize]
        self._targets = list(targets)
        self._prefix = [0] * len(targets)
        self._above = [0] * len(targets)  # elements known to be larger than the prefix range
        self._pass = 0
        self._hists: dict[int, torch.Tensor] = {}
        self.thresholds: list[Threshold] = []

    @property
    def done(self) -> bool:
        return self._pass == self.passes

    def _shift(self) -> int:
        return _DIGIT * (self.passes - 1 - self._pass)

    def update(self, x: torch.Tensor) -> None:
        """Count one chunk's digits (any shape; the chunks of a pass may come in any order)."""
        self.update_keys(magnitude_key(x.reshape(-1)))

    def update_keys(self, key: torch.Tensor) -> None:
        shift = self._shift()
        high = key >> shift if shift else key  # the digit of this pass and those above it
        for prefix in set(self._prefix):
            if self._pass == 0:  # the top digit, below 2**15: no mask
                h = torch.bincount(high, minlength=_BUCKETS)
            else:
                # inside the prefix's range, high - (prefix << 16) is the digit, 0..65535;
                # outside it clamps to -1 or 65536, the two buckets not counted
                d = (high - (prefix << _DIGIT)).clamp_(-1, _BUCKETS).add_(1)
                h = torch.bincount(d, minlength=_BUCKETS + 2)[1 : _BUCKETS + 1]
            if prefix in self._hists:
                self._hists[prefix] += h
            else:
                self._hists[prefix] = h

    def end_pass(self) -> None:
        """Choose each target's next digit from the pass's histogram."""
        hists = {p: h.cpu() for p, h in self._hists.items()}
        zero = torch.zeros(_BUCKETS, dtype=torch.int64)
        last = self._pass == self.passes - 1
        for j, m in enumerate(self._targets):
            h = hists.get(self._prefix[j], zero)
            need = m - self._above[j]  # the need-th largest inside the prefix range
            suffix = h.flip(0).cumsum(0)  # suffix[t]: count of digits >= 65535 - t
            t = int(torch.searchsorted(suffix, need))  # first t with suffix[t] >= need
            d = _BUCKETS - 1 - t
            self._above[j] += int(suffix[t]) - int(h[d])
            self._prefix[j] = (self._prefix[j] << _DIGIT) | d
            if last:
                self.thresholds.append(Threshold(m, self._prefix[j], m - self._above[j], int(h[d])))
        self._hists = {}
        self._pass += 1


class TopSet:
    """Membership in the top ``m``, from its :class:`Threshold` (``None`` when ``m`` is 0 or
    every element), chunk by chunk in flat index order: a running count of the tied elements
    seen decides which ties are in."""

    def __init__(self, threshold: Threshold | None, m: int):
        self.t = threshold
        self.m = m
        self._seen = 0

    def reset(self) -> None:
        self._seen = 0

    def mask(self, key: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the flat ``key`` chunk; chunks must come in flat index order."""
        t = self.t
        if t is None:
            return torch.full_like(key, self.m > 0, dtype=torch.bool)
        tied = key == t.key
        n_tied = int(tied.sum())
        seen, self._seen = self._seen, self._seen + n_tied
        if seen + n_tied <= t.keep:  # every tie here is in
            return tied.logical_or_(key > t.key)
        if seen >= t.keep:  # none is
            return key > t.key
        ordinal = torch.cumsum(tied, 0).add_(seen - 1)  # among tied elements, in index order
        return (key > t.key).logical_or_(tied.logical_and_(ordinal < t.keep))


def top_k_mask(x: torch.Tensor, k: int, *, rows_per_chunk: int | None = None) -> torch.Tensor:
    """Mask of the ``k`` largest ``|x|`` (ties: lower flat index first), streamed over row
    chunks of ``x``: the same mask as a stable descending sort gives.

    >>> top_k_mask(torch.tensor([1.0, -2.0, 2.0, 0.5]), 2).tolist()
    [False, True, True, False]
    """
    n = x.numel()
    flat_rows = x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(-1, 1)
    step = rows_per_chunk or flat_rows.shape[0] or 1
    chunks = [flat_rows[a : a + step] for a in range(0, flat_rows.shape[0], step)]
    threshold = None
    if 0 < k < n:
        rs = RadixSelect(x.dtype, n, [k])
        for _ in range(rs.passes):
            for c in chunks:
                rs.update(c)
            rs.end_pass()
        threshold = rs.thresholds[0]
    top = TopSet(threshold, min(max(k, 0), n))
    return torch.cat([top.mask(magnitude_key(c.reshape(-1))) for c in chunks]).reshape(x.shape)
