"""Model merging beyond task arithmetic: TIES, DARE, breadcrumbs, DELLA, per row chunk.

Pure maths, no I/O, any device. For one output tensor a :class:`TensorMerger` is fed the
rows ``[start, stop)`` of every input's task vector ``tau_i`` (and of the base), pass after
pass, and returns the merged rows on its last pass. The result depends neither on the chunk
size nor on the device, and a rerun gives the same bytes.

The methods are mergekit 0.1.5's generalized task arithmetic (``merge_group`` in its
``generalized_task_arithmetic.py``; formulas in ``benchmarks/merge_methods/NOTES.md``)::

    d_i   = sparsify(tau_i)                 magnitude top-k, random (DARE), outliers, DELLA
    d_i  *= rescale_i                       l1: ||tau_i||_1 / ||d_i||_1 (mergekit's default)
    wd_i  = w_i * d_i
    ties-like:  s = sign(sum_i wd_i) (0 counts as +);  keep wd_i whose sign is s
                m = sum_i kept wd_i;  div = sum_i kept w_i (0 -> 1)
    linear:     m = sum_i wd_i;       div = sum_i w_i (|div| < 1e-8 -> 1)
    out   = round(base + lambda * (m / div if normalize else m))

Every step is computed in float64 and rounded once to the output dtype (mergekit computes in
its ``dtype:``, e.g. bfloat16, and rounds after each operation). What differs on purpose:

- magnitude ties are broken by element index (the lowest flat index ranks higher); mergekit's
  ``argsort`` is not stable, so which of several equal magnitudes it keeps is arbitrary;
- random masks come from a counter-based hash of (seed, tensor name, input, element index),
  not from torch's global generator: the same bits for any chunking, device or rerun;
- l1 norms for the rescale are summed exactly (integer accumulators), not in float32.

``# subtle:`` mergekit 0.1.5 rescales DARE's kept elements to the l1 norm of the whole task
vector (``rescale="l1"``), not by ``1 / density`` as the DARE paper (``rescale="density"``).
``# subtle:`` the TIES election compares ``sum_i wd_i >= 0``; where float32 rounds that sum
to exactly 0 mergekit elects +, and float64 may keep a tiny negative sum: another disjoint
mean at that element (measured: 2 of 6,600 elements in one fp16 test).

>>> import torch
>>> spec = merge_spec("ties", 2, weights=[1.0, 1.0], density=0.5)
>>> base = torch.zeros(4)
>>> taus = [torch.tensor([0.4, -0.1, 0.2, -0.3]), torch.tensor([0.2, 0.3, -0.1, 0.1])]
>>> merge_tensor(spec, "w", base, taus).tolist()   # top-2 of each, then disjoint mean
[0.30000001192092896, 0.30000001192092896, 0.0, -0.30000001192092896]
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .ops import CPU_BLOCK, round_to

# ---- methods and their parameters -------------------------------------------------------------

MAGNITUDE = "magnitude"  # keep the top-k |tau| (TIES)
RANDOM = "random"  # keep each element with probability density (DARE)
OUTLIERS = "magnitude_outliers"  # drop the top gamma, keep the next density (breadcrumbs)
DELLA = "della_magprune"  # keep with a probability rising with the magnitude rank in a row


@dataclass(frozen=True)
class Method:
    """One merge method as mergekit 0.1.5 registers it."""

    name: str
    consensus: bool  # TIES sign election by the weighted sum
    sparsification: str | None
    normalize: bool  # default of the ``normalize`` parameter
    rescale: bool  # default of the ``rescale`` parameter


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("task_arithmetic", False, None, False, False),
        Method("ties", True, MAGNITUDE, True, False),
        Method("dare_ties", True, RANDOM, False, True),
        Method("dare_linear", False, RANDOM, False, True),
        Method("breadcrumbs", False, OUTLIERS, False, False),
        Method("breadcrumbs_ties", True, OUTLIERS, False, False),
        Method("della", True, DELLA, True, True),
        Method("della_linear", False, DELLA, False, True),
    )
}

RESCALES = ("l1", "density")  # l1: mergekit 0.1.5; density: 1/density, as the DARE paper


@dataclass(frozen=True)
class MergeSpec:
    """Validated parameters of one merge (build it with :func:`merge_spec`)."""

    method: Method
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    gammas: tuple[float, ...]
    epsilons: tuple[float, ...]
    lam: float
    normalize: bool
    rescale: str | None  # None, "l1" or "density"
    seed: int

    @property
    def inputs(self) -> int:
        return len(self.weights)


def merge_spec(
    method: str,
    inputs: int,
    *,
    weights: float | Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] | None = None,
    epsilon: float | Sequence[float] | None = None,
    lam: float = 1.0,
    normalize: bool | None = None,
    rescale: bool | str | None = None,
    seed: int = 0,
) -> MergeSpec:
    """Check a method's parameters for ``inputs`` task vectors; fill in mergekit's defaults.

    ``weights``, ``density``, ``gamma``, ``epsilon``: one value for all inputs or one per
    input. Defaults as in mergekit 0.1.5: weight 1, density 1 (keep everything), gamma 0.01,
    epsilon 0.15; ``normalize`` and ``rescale`` per method (``rescale=True`` is ``"l1"``).

    >>> merge_spec("dare_ties", 2, density=0.3).rescale
    'l1'
    >>> merge_spec("ties", 2, weights=[1, 2, 3])
    Traceback (most recent call last):
    ...
    stream_tv.errors.InputError: ties: 3 weights for 2 inputs (give one weight per input, in input order, or none for 1.0 each)
    """
    m = METHODS.get(method)
    if m is None:
        raise InputError(
            f"unknown merge method {method!r}", hint=f"use one of {', '.join(METHODS)}"
        )
    if inputs < 1:
        raise InputError(f"{method}: no inputs to merge", hint="give at least one task vector")
    sp = m.sparsification

    def per_input(what: str, value, default: float) -> tuple[float, ...]:
        if value is None:
            return (default,) * inputs
        if isinstance(value, (int, float)):
            values = (float(value),) * inputs
        else:
            values = tuple(float(v) for v in value)
            if len(values) != inputs:
                raise InputError(
                    f"{method}: {len(values)} {what}s for {inputs} inputs",
                    hint=f"give one {what} per input, in input order, or none for {default} each",
                )
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise InputError(f"{method}: {what} {v} of input {i + 1} is not finite")
        return values

    def only_for(what: str, value, kinds: tuple[str | None, ...]) -> None:
        if value is not None and sp not in kinds:
            users = [n for n, x in METHODS.items() if x.sparsification in kinds]
            raise InputError(
                f"{method} has no {what} parameter", hint=f"{what} applies to {', '.join(users)}"
            )

    only_for("density", density, (MAGNITUDE, RANDOM, OUTLIERS, DELLA))
    only_for("gamma", gamma, (OUTLIERS,))
    only_for("epsilon", epsilon, (DELLA,))
    if rescale and sp is None:
        raise InputError(
            f"{method} has no rescale parameter (it drops no element)",
            hint="rescale applies to methods that sparsify: ties, dare_*, breadcrumbs*, della*",
        )
    w = per_input("weight", weights, 1.0)
    d = per_input("density", density, 1.0)
    g = per_input("gamma", gamma, 0.01)
    e = per_input("epsilon", epsilon, 0.15)
    for i, x in enumerate(d):
        if not 0 < x <= 1:
            raise InputError(
                f"{method}: density {x} of input {i + 1} is outside (0, 1]",
                hint="density is the fraction of each task vector kept, e.g. 0.5",
            )
    if sp == OUTLIERS:
        for i, x in enumerate(g):
            if not 0 <= x < 1:
                raise InputError(
                    f"{method}: gamma {x} of input {i + 1} is outside [0, 1)",
                    hint="gamma is the fraction of largest magnitudes dropped, e.g. 0.01",
                )
    if sp == DELLA:
        for i, (x, dx) in enumerate(zip(e, d, strict=True)):
            if dx < 1 and not (x >= 0 and dx - x > 0 and dx + x < 1):
                raise InputError(
                    f"{method}: epsilon {x} with density {dx} (input {i + 1}) leaves "
                    f"density +/- epsilon outside (0, 1)",
                    hint=f"choose 0 <= epsilon < {min(dx, 1 - dx):g}",
                )
    if not math.isfinite(lam):
        raise InputError(f"{method}: lambda {lam} is not finite")
    if rescale is None:
        rescale = m.rescale
    if rescale is True:
        rescale = "l1"
    elif rescale is False:
        rescale = None
    elif rescale not in RESCALES:
        raise InputError(
            f"{method}: unknown rescale {rescale!r}", hint=f"use one of {', '.join(RESCALES)}"
        )
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InputError(f"{method}: seed {seed!r} is not an integer in [0, 2**64)")
    return MergeSpec(
        method=m,
        weights=w,
        densities=d,
        gammas=g,
        epsilons=e,
        lam=float(lam),
        normalize=m.normalize if normalize is None else bool(normalize),
        rescale=rescale,
        seed=seed,
    )


# ---- exact streamed top-k: radix select on the magnitude's bits -------------------------------

_DIGIT = 16
_BUCKETS = 1 << _DIGIT
_MAG_BITS = {2: 15, 4: 31, 8: 63}  # magnitude bits of a float of this many bytes


def select_passes(dtype: torch.dtype) -> int:
    """Histogram passes over the data to find an exact k-th largest magnitude of ``dtype``.

    >>> select_passes(torch.bfloat16), select_passes(torch.float32), select_passes(torch.float64)
    (1, 2, 4)
    """
    return -(-_MAG_BITS[dtype.itemsize] // _DIGIT)


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """The bits of ``|x|`` as non-negative int64: ordered as the magnitudes (NaN above inf).

    >>> magnitude_key(torch.tensor([-1.0, 0.5, -0.0, float("inf")])).tolist()
    [1065353216, 1056964608, 0, 2139095040]
    """
    n = x.dtype.itemsize
    if not x.is_floating_point() or n not in _MAG_BITS:
        raise InputError(f"cannot rank magnitudes of {x.dtype} values", hint="use a float tensor")
    if n == 8:
        return x.view(torch.int64) & 0x7FFF_FFFF_FFFF_FFFF
    ints = x.view(torch.int16 if n == 2 else torch.int32).to(torch.int64)
    return ints & ((1 << _MAG_BITS[n]) - 1)


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
        self._bits = _MAG_BITS[dtype.itemsize]
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
        digit = (key >> shift) & (_BUCKETS - 1)
        for prefix in set(self._prefix):
            if self._pass > 0:  # restrict to keys inside the prefix's range
                inside = (key >> (shift + _DIGIT)) == prefix
                d = torch.where(inside, digit, _BUCKETS)
            else:
                d = digit
            h = torch.bincount(d, minlength=_BUCKETS + 1)[:_BUCKETS]
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


# ---- counter-based random bits ----------------------------------------------------------------

_M32 = 0xFFFF_FFFF


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x = x * c mod 2**32`` in place, for int64 ``x`` in [0, 2**32) and ``c < 2**32``.

    # subtle: no product may reach 2**63 (signed overflow): for ``c >= 2**31`` the top bit of
    # ``c`` contributes ``x * 2**31 mod 2**32 = (x & 1) << 31``, the rest ``x * (c - 2**31)``.
    """
    if c >= 1 << 31:
        top = (x & 1).bitwise_left_shift_(31)
        x.mul_(c - (1 << 31)).add_(top)
    else:
        x.mul_(c)
    return x.bitwise_and_(_M32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (Wellons' "lowbias32") in place, on int64 holding 32
    bits."""
    x.bitwise_xor_(x >> 16)
    _mul32_(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def stream_key(seed: int, name: str, index: int) -> tuple[int, int, int]:
    """Three 32-bit keys of the random stream of input ``index`` of tensor ``name``."""
    digest = hashlib.blake2b(
        f"{seed}\0{name}\0{index}".encode(), digest_size=12, person=b"stream_tv.merge"
    ).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


def random_bits(key: tuple[int, int, int], flat_index: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 in [0, 2**32)) per element index: a pure function of the key and
    the index, with integer ops that give the same bits on every device and chunking.

    >>> k = stream_key(0, "w", 0)
    >>> a = random_bits(k, torch.arange(10))
    >>> torch.equal(a[3:7], random_bits(k, torch.arange(3, 7)))
    True
    """
    x = _mix32_((flat_index & _M32).bitwise_xor_(key[0]))
    x.bitwise_xor_(flat_index >> 32).bitwise_xor_(key[1])
    _mix32_(x)
    return _mix32_(x.bitwise_xor_(key[2]))


def _keep_threshold(p: float) -> int:
    """Keep an element when its 32 random bits are below this: P(keep) = round(p * 2**32) / 2**32."""
    return min(1 << 32, round(p * (1 << 32)))


# ---- exact sums of magnitudes -----------------------------------------------------------------


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


# ---- one tensor's merge, pass by pass ---------------------------------------------------------

SELECT, NORMS, MERGE = "select", "norms", "merge"
_RESCALE_EPS = 1e-7  # mergekit: no rescale when either l1 norm is below this
_DIVISOR_EPS = 1e-8  # mergekit: a linear merge's weight sum below this in magnitude is 1


@dataclass
class _Input:
    """What the merger knows about one input of one tensor."""

    index: int
    dtype: torch.dtype | None  # None: absent from this input (a zero task vector)
    weight: float
    density: float
    gamma: float
    epsilon: float
    select: RadixSelect | None = None
    cuts: list[int] = field(default_factory=list)  # magnitude: [k]; outliers: [lo, hi]
    tops: list[TopSet] = field(default_factory=list)  # the top-cut sets, once selected
    key: tuple[int, int, int] | None = None  # random stream
    before: ExactAbsSum | None = None
    after: ExactAbsSum | None = None
    factor: float = 1.0
    sparse: bool = False  # not the identity


class TensorMerger:
    """The merge of one tensor, fed its row chunks pass by pass (see the module docstring).

    ``tau_dtypes[i]`` is input ``i``'s task-vector dtype for this tensor, or ``None`` where
    the input lacks it (a zero task vector, e.g. a module a LoRA adapter does not touch).
    Rows are dim 0 (a 1-D tensor's rows are its elements). For every ``pass_index`` in
    ``range(passes)``, feed the rows in order, ``0`` to ``rows``, in chunks of any size of at
    least :attr:`min_rows`; :meth:`feed` returns the output rows (``out_dtype``) on the last
    pass and ``None`` before. :attr:`pass_kinds` tells what each pass does: ``select``
    (magnitude histograms), ``norms`` (l1 norms for the rescale), ``merge``.

    >>> spec = merge_spec("ties", 1, density=0.5)
    >>> m = TensorMerger(spec, "w", (2, 2), [torch.float32], torch.float32)
    >>> m.pass_kinds
    ('select', 'select', 'merge')
    >>> tau, base = torch.tensor([[1.0, -3.0], [2.0, 0.5]]), torch.zeros(2, 2)
    >>> for p in range(m.passes):
    ...     a = m.feed(p, 0, 1, [tau[:1]], base[:1]); b = m.feed(p, 1, 2, [tau[1:]], base[1:])
    >>> torch.cat([a, b]).tolist()
    [[0.0, -3.0], [2.0, 0.0]]
    """

    def __init__(
        self,
        spec: MergeSpec,
        name: str,
        shape: Sequence[int],
        tau_dtypes: Sequence[torch.dtype | None],
        out_dtype: torch.dtype,
    ):
        if len(tau_dtypes) != spec.inputs:
            raise InputError(
                f"{len(tau_dtypes)} task vectors for a merge of {spec.inputs} inputs",
                where=name,
                hint="give one dtype (or None) per input",
            )
        for dt in (*tau_dtypes, out_dtype):
            if dt is not None and (not dt.is_floating_point or dt.itemsize not in _MAG_BITS):
                raise InputError(
                    f"cannot merge {dt} tensors", where=name, hint="merge float tensors only"
                )
        self.spec = spec
        self.name = name
        self.shape = tuple(shape)
        self.out_dtype = out_dtype
        self.rows = self.shape[0] if len(self.shape) >= 1 else 1
        self.row_numel = math.prod(self.shape[1:]) if len(self.shape) >= 2 else 1
        self.numel = math.prod(self.shape)
        sp = spec.method.sparsification
        self._inputs = [
            _Input(i, dt, spec.weights[i], spec.densities[i], spec.gammas[i], spec.epsilons[i])
            for i, dt in enumerate(tau_dtypes)
        ]
        n = self.numel
        for x in self._inputs:
            if x.dtype is None or sp is None or x.density >= 1 or n == 0:
                continue  # mergekit: density 1 is the identity, no rescale either
            x.sparse = True
            if sp == MAGNITUDE:
                targets = [max(1, int(x.density * n))]
            elif sp == OUTLIERS:
                kept = int(x.density * n)
                n_top = int(x.gamma * n)
                n_bot = max(0, n - kept - n_top)
                targets = [n - n_bot - kept, n - n_bot]  # keep ranks [lo, hi) of the top
            else:
                x.key = stream_key(spec.seed, name, x.index)
                targets = []
            live = sorted({m for m in targets if 0 < m < n})  # 0 and n need no selection
            if live:
                x.select = RadixSelect(x.dtype, n, live)
            x.cuts = targets
            if spec.rescale == "l1":
                x.before, x.after = ExactAbsSum(), ExactAbsSum()
        selects = max((x.select.passes for x in self._inputs if x.select), default=0)
        norms = any(x.before is not None for x in self._inputs)
        self.pass_kinds: tuple[str, ...] = (SELECT,) * selects + (NORMS,) * norms + (MERGE,)
        self._pass = 0
        self._cursor = 0
        self._done = False

    # ---- planning ------------------------------------------------------------------------

    @property
    def passes(self) -> int:
        return len(self.pass_kinds)

    def needs_base(self, pass_index: int) -> bool:
        """Whether pass ``pass_index`` reads the base (only the merge pass does)."""
        return self.pass_kinds[pass_index] == MERGE

    @property
    def min_rows(self) -> int:
        """Fewest rows per chunk: DELLA ranks a 1-D tensor as one row, so it needs it whole."""
        if self.spec.method.sparsification == DELLA and len(self.shape) <= 1:
            return max(self.rows, 1)
        return 1

    def work_bytes_per_row(self) -> int:
        """About how many bytes of temporaries a chunk row costs (for chunk sizing); on CPU
        the work goes through L2-sized blocks, so this bounds GPU chunks mostly."""
        return self.row_numel * 8 * (len(self._inputs) + 6)

    # ---- streaming -----------------------------------------------------------------------

    def feed(
        self,
        pass_index: int,
        start: int,
        stop: int,
        taus: Sequence[torch.Tensor | None],
        base: torch.Tensor | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Take rows ``[start, stop)`` of every task vector (and of the base on the merge
        pass); return the merged rows on the last pass (in ``out`` if given)."""
        if self._done or pass_index != self._pass or start != self._cursor or stop < start:
            raise RuntimeError(
                f"{self.name}: chunk (pass {pass_index}, rows {start}:{stop}) out of order; "
                f"expected pass {self._pass} from row {self._cursor}: feed each pass's rows "
                "in order, all passes in order"
            )
        if stop > self.rows or (stop - start < self.min_rows and stop != self.rows):
            raise RuntimeError(
                f"{self.name}: rows {start}:{stop} of {self.rows} (at least {self.min_rows} per "
                "chunk)"
            )
        if len(taus) != len(self._inputs):
            raise RuntimeError(
                f"{self.name}: {len(taus)} task vectors, expected {len(self._inputs)}"
            )
        kind = self.pass_kinds[pass_index]
        if start == 0:
            self._begin_pass(kind)
        flat = [self._flat(t, x) for t, x in zip(taus, self._inputs, strict=True)]
        result = None
        if kind == SELECT:
            self._select(flat)
        elif kind == NORMS:
            self._norms(start, stop, flat)
        else:
            if base is None:
                raise RuntimeError(f"{self.name}: the merge pass needs the base rows")
            result = self._merge(start, stop, flat, base, out)
        self._cursor = stop
        if stop == self.rows:
            self._end_pass(kind)
        return result

    def _flat(self, t: torch.Tensor | None, x: _Input) -> torch.Tensor | None:
        if x.dtype is None:
            return None
        if t is None or t.dtype != x.dtype:
            got = None if t is None else t.dtype
            raise RuntimeError(f"{self.name}: input {x.index + 1} is {got}, planned {x.dtype}")
        return t.reshape(-1)

    def _blocks(self, rows: int, device: torch.device):
        """Local row ranges: about CPU_BLOCK elements each on CPU (cache-sized temporaries),
        the whole chunk on a GPU."""
        if device.type != "cpu" or self.min_rows > 1:
            yield 0, rows
            return
        step = max(1, CPU_BLOCK // max(self.row_numel, 1))
        for a in range(0, rows, step):
            yield a, min(rows, a + step)

    def _begin_pass(self, kind: str) -> None:
        if kind == SELECT:
            return
        for x in self._inputs:
            if x.cuts and not x.tops:  # selection is over
                found = {t.m: t for t in x.select.thresholds} if x.select else {}
                x.tops = [TopSet(found.get(m), m) for m in x.cuts]
            for top in x.tops:
                top.reset()  # each pass sees the tied elements from the first again

    def _end_pass(self, kind: str) -> None:
        if kind == SELECT:
            for x in self._inputs:
                if x.select is not None and not x.select.done:
                    x.select.end_pass()
        elif kind == NORMS:
            for x in self._inputs:
                if x.before is not None and x.after is not None:
                    before, after = x.before.value(), x.after.value()
                    # mergekit: masked * (before / after), unless either is below 1e-7
                    ok = before >= _RESCALE_EPS and after >= _RESCALE_EPS
                    x.factor = before / after if ok else 1.0
        self._pass += 1
        self._cursor = 0
        self._done = self._pass == len(self.pass_kinds)

    # ---- the passes ----------------------------------------------------------------------

    def _select(self, flat: list[torch.Tensor | None]) -> None:
        for t, x in zip(flat, self._inputs, strict=True):
            if t is None or x.select is None or x.select.done:
                continue
            for a, b in self._blocks(t.numel() // max(self.row_numel, 1), t.device):
                x.select.update_keys(magnitude_key(t[a * self.row_numel : b * self.row_numel]))

    def _keep(self, x: _Input, t: torch.Tensor, first: int, rows: int) -> torch.Tensor | None:
        """The sparsification mask of a block (``rows`` rows from global row ``first``), or
        ``None`` where the input keeps everything."""
        if not x.sparse:
            return None
        sp = self.spec.method.sparsification
        if sp == MAGNITUDE:
            return x.tops[0].mask(magnitude_key(t))
        if sp == OUTLIERS:
            key = magnitude_key(t)
            lo, hi = x.tops
            return hi.mask(key) & ~lo.mask(key)
        index = first * self.row_numel + torch.arange(t.numel(), device=t.device)
        assert x.key is not None
        bits = random_bits(x.key, index)
        if sp == RANDOM:
            return bits < _keep_threshold(x.density)
        return bits.to(torch.float64) < self._della_p(x, t, rows) * float(1 << 32)

    def _della_p(self, x: _Input, t: torch.Tensor, rows: int) -> torch.Tensor:
        """DELLA's keep probability: ``density - eps + 2 eps * rank / (n - 1)`` with ``rank``
        the ascending magnitude rank inside a row (dim 1; a 1-D tensor is one row).

        # subtle: mergekit ranks along dim 1 of the whole tensor, so a chunk of whole rows
        # has every rank it needs; a 1-D tensor is one row, hence min_rows. Equal magnitudes
        # rank by index (stable sort); mergekit's unstable argsort ranks them arbitrarily. A
        # row of one element has no rank range (mergekit divides 0 by 0): it gets p = density.
        """
        view = t.reshape(rows, *self.shape[1:]) if len(self.shape) >= 2 else t.reshape(1, -1)
        dim = 1
        n = view.shape[dim]
        if n <= 1:
            return torch.full(t.shape, x.density, dtype=torch.float64, device=t.device)
        order = torch.sort(magnitude_key(view), dim=dim, stable=True).indices
        ranks = torch.empty_like(order)
        shape = [1] * view.dim()
        shape[dim] = n
        ar = torch.arange(n, device=t.device).reshape(shape).expand_as(order)
        ranks.scatter_(dim, order, ar)
        p = ranks.to(torch.float64) / float(n - 1)
        p = p * (2.0 * x.epsilon)
        p = p + (x.density - x.epsilon)
        return p.reshape(-1)

    def _norms(self, start: int, stop: int, flat: list[torch.Tensor | None]) -> None:
        for t, x in zip(flat, self._inputs, strict=True):
            if t is None or x.before is None or x.after is None:
                continue
            for a, b in self._blocks(stop - start, t.device):
                block = t[a * self.row_numel : b * self.row_numel]
                keep = self._keep(x, block, start + a, b - a)
                x.before.add(block)
                x.after.add(block if keep is None else block * keep)  # NaN * 0 stays NaN

    def _merge(
        self,
        start: int,
        stop: int,
        flat: list[torch.Tensor | None],
        base: torch.Tensor,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        rows = stop - start
        chunk_shape = (rows, *self.shape[1:]) if len(self.shape) >= 1 else ()
        if out is None:
            out = torch.empty(chunk_shape, dtype=self.out_dtype, device=base.device)
        o = out.reshape(-1)
        b_flat = base.reshape(-1)
        for a, b in self._blocks(rows, base.device):
            lo, hi = a * self.row_numel, b * self.row_numel
            terms = []
            for t, x in zip(flat, self._inputs, strict=True):
                if t is None or x.weight == 0:
                    continue  # adds 0 (and, with consensus, never agrees)
                block = t[lo:hi]
                keep = self._keep(x, block, start + a, b - a)
                d = block.to(torch.float64)
                if keep is not None:
                    d = d * keep  # tau * mask, as mergekit: a dropped NaN stays NaN
                    if self.spec.rescale == "l1" and x.factor != 1.0:
                        d = d * x.factor
                    elif self.spec.rescale == "density":
                        d = d * (1.0 / x.density)
                terms.append((d * x.weight, x.weight))
            o[lo:hi].copy_(self._combine(b_flat[lo:hi], terms))
        return out

    def _combine(self, base: torch.Tensor, terms: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
        """``base + lambda * (disjoint / plain) weighted sum``, in float64, rounded once."""
        spec = self.spec
        acc = base.to(torch.float64)
        if spec.method.consensus:
            mixed = torch.zeros_like(acc)
            divisor = torch.zeros_like(acc)
            if terms:
                total = terms[0][0].clone()
                for wd, _ in terms[1:]:
                    total += wd
                positive = total >= 0  # mergekit: a zero sum elects +
                for wd, w in terms:
                    agree = torch.where(positive, wd > 0, wd < 0)
                    mixed += torch.where(agree, wd, 0.0)
                    divisor += agree.to(torch.float64) * w
            divisor = torch.where(divisor == 0, 1.0, divisor)
        else:
            mixed = torch.zeros_like(acc)
            for wd, _ in terms:
                mixed += wd
            total_w = math.fsum(spec.weights)
            divisor = 1.0 if abs(total_w) < _DIVISOR_EPS else total_w
        if spec.normalize:
            mixed = mixed / divisor
        if spec.lam != 1:
            mixed = mixed * spec.lam
        acc += mixed
        return round_to(acc, self.out_dtype)


def merge_tensor(
    spec: MergeSpec,
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor | None],
    *,
    out_dtype: torch.dtype | None = None,
    rows_per_chunk: int | None = None,
) -> torch.Tensor:
    """Merge one in-memory tensor (all passes, chunks of ``rows_per_chunk`` rows): what the
    engine computes when streaming, for tests and small tensors. ``out_dtype``: the base's."""
    m = TensorMerger(
        spec,
        name,
        tuple(base.shape),
        [None if t is None else t.dtype for t in taus],
        out_dtype or base.dtype,
    )
    rows = m.rows
    step = max(rows_per_chunk or rows, m.min_rows, 1)
    ranges = [(a, min(rows, a + step)) for a in range(0, rows, step)] or [(0, 0)]

    def rows_of(t: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
        if t is None:
            return None
        return t.reshape(1)[a:b] if t.dim() == 0 else t[a:b]

    out = []
    for p in range(m.passes):
        for a, b in ranges:
            r = m.feed(p, a, b, [rows_of(t, a, b) for t in taus], rows_of(base, a, b))
            if r is not None:
                out.append(r)
    return torch.cat([r.reshape(-1) for r in out]).reshape(base.shape)
