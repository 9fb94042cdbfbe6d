"""Streaming per-tensor statistics: a LoRA delta ``L`` against a task vector ``T``.

The engine reads one tensor in row chunks and feeds each chunk to a
:class:`TensorAccumulator`; two accumulators fed disjoint chunks of the same tensor can be
merged. :meth:`TensorAccumulator.result` gives a frozen :class:`TensorComparison`, one row of
the compare report (see ``stream_tv.report`` for the JSON schema).

Every sum is accumulated in float64, so the figures do not depend on the chunking beyond
float64 rounding. Nothing here reads files or prints.

>>> import torch
>>> acc = TensorAccumulator("w", numel=4, has_lora=True,
...                         finetuned_dtype=torch.float32, base_dtype=torch.float32)
>>> t = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
>>> acc.update(tv=t[:1], lora=t[:1])          # rows arrive in chunks ...
>>> acc.update(tv=t[1:], lora=2 * t[1:])
>>> r = acc.result()
>>> r.category, round(r.cosine, 6), r.max_abs_diff, r.tv_norm == 30 ** 0.5
('lora_and_changed', 0.979958, 4.0, True)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from stream_tv.errors import InputError, MismatchError
from stream_tv.floats import (
    BITS_OF,
    EMPTY_EXPONENT,
    add_scaled,
    combine_scaled,
    half_ulp,
    ldexp,
    scaled_dots,
    scaled_pair,
    sqrt_of_scaled,
)
from stream_tv.ops import blocks

__all__ = [
    "CATEGORIES",
    "LORA_AND_CHANGED",
    "LORA_UNCHANGED",
    "CHANGED_NOT_LORA",
    "ROUNDING_ONLY",
    "UNCHANGED",
    "TensorAccumulator",
    "TensorComparison",
    "half_ulp",
]

LORA_AND_CHANGED = "lora_and_changed"
LORA_UNCHANGED = "lora_unchanged"
CHANGED_NOT_LORA = "changed_not_lora"
ROUNDING_ONLY = "rounding_only"
UNCHANGED = "unchanged"
#: The coverage categories; every tensor falls in exactly one.
CATEGORIES = (LORA_AND_CHANGED, LORA_UNCHANGED, CHANGED_NOT_LORA, ROUNDING_ONLY, UNCHANGED)

_LORA_CATEGORIES = frozenset({LORA_AND_CHANGED, LORA_UNCHANGED})
_CHANGED_CATEGORIES = frozenset({LORA_AND_CHANGED, CHANGED_NOT_LORA, ROUNDING_ONLY})


@dataclass(frozen=True)
class TensorComparison:
    """The comparison of one tensor: exactly the per-tensor fields of the JSON report.

    ``None`` (JSON null) means "not defined": fields that need a LoRA delta (``cosine``,
    ``max_abs_diff``, ``mean_abs_diff``, ``relative_error``, ``lora_norm``,
    ``rounding_bound``, ``within_rounding``) are ``None`` for tensors without one; ``cosine``
    is ``None`` when either norm is 0, ``relative_error`` when ``tv_norm`` is 0; the rounding
    fields are ``None`` when the finetuned values were not given. A figure is never NaN.
    """

    name: str
    category: str
    numel: int
    cosine: float | None
    max_abs_diff: float | None
    mean_abs_diff: float | None
    relative_error: float | None
    lora_norm: float | None
    tv_norm: float | None
    rounding_bound: float | None
    within_rounding: float | None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise InputError(
                f"unknown category {self.category!r}",
                where=self.name,
                hint=f"expected one of {', '.join(CATEGORIES)}",
            )

    @property
    def has_lora(self) -> bool:
        """The adapter has a delta for this tensor."""
        return self.category in _LORA_CATEGORIES

    @property
    def changed(self) -> bool:
        """The task vector has a nonzero element (rounding-only tensors count as changed)."""
        return self.category in _CHANGED_CATEGORIES

    @property
    def rounding_only(self) -> bool:
        """Changed outside the adapter, and only by a dtype round trip of the base."""
        return self.category == ROUNDING_ONLY

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this tensor, fields in schema order."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorComparison:
        """Inverse of :meth:`to_dict`; raises :class:`InputError` on a missing field."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise InputError(
                f"tensor entry lacks {', '.join(missing)}",
                where=str(data.get("name", "<tensor>")),
                hint="is this a stream-tv compare report, schema_version 1?",
            )
        return cls(**{n: data[n] for n in names})


# Elements per block of the statistics passes on CPU (float64: 1 MiB per operand).
STATS_BLOCK = 1 << 17


def _add(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if acc is None:
        return value
    return acc + value.to(acc.device)


def _max(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if acc is None:
        return value
    # subtle: torch.maximum propagates NaN, so a NaN anywhere ends as a null figure.
    return torch.maximum(acc, value.to(acc.device))


def _and(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if acc is None else acc & value.to(acc.device)


def _or(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if acc is None else acc | value.to(acc.device)


def _finite(value: float | None) -> float | None:
    # JSON has no NaN or Infinity: a figure that is not finite is reported as null.
    return value if value is not None and math.isfinite(value) else None


class TensorAccumulator:
    """Accumulates the comparison of one tensor from its row chunks, in order or merged.

    ``update`` takes the chunk of ``T = finetuned - base`` (``tv``), of the LoRA delta
    (``lora``, when ``has_lora``) and, optionally, the raw ``finetuned`` and ``base`` chunks in
    their own dtypes: ``finetuned`` gives the rounding bound (LoRA tensors) and both give the
    rounding-only test (tensors without LoRA). Shapes of the chunks must agree with each other.

    Categories, decided by :meth:`result`:

    - ``lora_and_changed`` / ``lora_unchanged``: the adapter has a delta and ``T`` has a
      nonzero element / is all zero. The LoRA categories take precedence: a LoRA tensor
      whose ``T`` is only a dtype round trip stays ``lora_and_changed`` (its cosine and
      ``within_rounding`` then say how the delta relates to it).
    - ``rounding_only``: no LoRA delta, ``T`` nonzero, base and finetuned dtypes differ, and
      every element satisfies ``finetuned == base.to(finetuned.dtype)`` (e.g. an fp32 base
      saved again as bf16). Needs ``finetuned`` and ``base`` in every chunk.
    - ``changed_not_lora``: no LoRA delta, ``T`` nonzero, not rounding-only.
    - ``unchanged``: no LoRA delta, ``T`` all zero.

    Rounding: ``rounding_bound`` and ``within_rounding`` need ``finetuned`` in every chunk,
    in bf16, fp16, fp32 or fp64; otherwise they are null. They measure ``|L - T|`` against
    half an ulp of the merged weight, the one rounding a bf16/fp16 merge adds. In fp32
    models the fp32 rounding of PEFT's own delta ``scaling * B @ A`` comes on top, so a few
    elements beyond the bound (``within_rounding`` just under 1) are expected there.

    State lives in 0-dim tensors on the chunks' device, so updates do not synchronise a GPU;
    :meth:`result` does, once.
    """

    def __init__(
        self,
        name: str,
        *,
        numel: int,
        has_lora: bool,
        finetuned_dtype: torch.dtype | None,
        base_dtype: torch.dtype | None,
    ) -> None:
        if numel < 0:
            raise InputError(f"numel must be >= 0, got {numel}", where=name)
        self.name = name
        self.numel = numel
        self.has_lora = has_lora
        self.finetuned_dtype = finetuned_dtype
        self.base_dtype = base_dtype
        # Element counts are Python ints, known from shapes without touching the device.
        self._seen = 0  # elements of T received
        self._rounded = 0  # elements with a rounding bound (LoRA tensors with finetuned)
        self._tripped = 0  # elements tested for the dtype round trip (no LoRA)
        self._changed: torch.Tensor | None = None  # bool: T has a nonzero element
        self._sum_tt: torch.Tensor | None = None  # float64 sums ...
        self._sum_ll: torch.Tensor | None = None
        self._dot: torch.Tensor | None = None
        self._sum_dd: torch.Tensor | None = None  # sum (L - T)^2
        self._sum_abs: torch.Tensor | None = None  # sum |L - T|
        self._max_abs: torch.Tensor | None = None  # max |L - T|
        self._max_bound: torch.Tensor | None = None  # max half-ulp of finetuned
        self._within: torch.Tensor | None = None  # int64: count |L - T| <= half-ulp
        self._round_trip: torch.Tensor | None = None  # bool: all finetuned == base.to(fd)

    def __repr__(self) -> str:
        return (
            f"TensorAccumulator({self.name!r}, numel={self.numel}, has_lora={self.has_lora}, "
            f"seen={self._seen})"
        )

    # -- feeding -------------------------------------------------------------------------

    def update(
        self,
        *,
        tv: torch.Tensor,
        lora: torch.Tensor | None = None,
        finetuned: torch.Tensor | None = None,
        base: torch.Tensor | None = None,
    ) -> None:
        """Add one chunk. ``lora`` must be float64 (``tv`` is upcast, exactly, if needed)."""
        self._check_chunk(tv, lora, finetuned, base)
        n = tv.numel()
        self._seen += n
        if n == 0:
            return
        if self.has_lora:
            assert lora is not None  # checked above
            self._update_lora(tv, lora, finetuned)
        else:
            self._update_plain(tv, finetuned, base)

    def _check_chunk(
        self,
        tv: torch.Tensor,
        lora: torch.Tensor | None,
        finetuned: torch.Tensor | None,
        base: torch.Tensor | None,
    ) -> None:
        if self.has_lora and lora is None:
            raise MismatchError("a tensor with a LoRA delta needs the LoRA chunk", where=self.name)
        if not self.has_lora and lora is not None:
            raise MismatchError(
                "got a LoRA chunk for a tensor declared without LoRA",
                where=self.name,
                hint="create the accumulator with has_lora=True",
            )
        if lora is not None and lora.dtype != torch.float64:
            # subtle: L - T sits at float32 rounding level; float32 L changes max_abs_diff and
            # relative_error by up to 80% on fp32 models.
            raise MismatchError(
                f"the LoRA chunk is {lora.dtype}, not torch.float64",
                where=self.name,
                hint="compute scaling * B @ A in float64",
            )
        for label, other in (("lora", lora), ("finetuned", finetuned), ("base", base)):
            if other is not None and other.shape != tv.shape:
                raise MismatchError(
                    f"{label} chunk has shape {tuple(other.shape)}, "
                    f"task vector chunk {tuple(tv.shape)}",
                    where=self.name,
                )
        for label, chunk, dtype in (
            ("finetuned", finetuned, self.finetuned_dtype),
            ("base", base, self.base_dtype),
        ):
            if chunk is not None and dtype is not None and chunk.dtype != dtype:
                raise MismatchError(
                    f"{label} chunk is {chunk.dtype}, declared {dtype}", where=self.name
                )
        if self._seen + tv.numel() > self.numel:
            raise MismatchError(
                f"received {self._seen + tv.numel()} elements, numel is {self.numel}",
                where=self.name,
            )

    def _update_lora(
        self, tv: torch.Tensor, lora: torch.Tensor, finetuned: torch.Tensor | None
    ) -> None:
        dev = tv.device
        bounded = finetuned is not None and finetuned.dtype in BITS_OF
        parts = [tv, lora.to(dev)] + ([finetuned.to(dev)] if bounded else [])
        scaled: list[list[torch.Tensor]] = [[] for _ in range(4)]  # tt, ll, lt, dd
        sum_abs: list[torch.Tensor] = []  # sum |d|
        nonzero: list[torch.Tensor] = []
        maxima: list[list[torch.Tensor]] = [[], []]  # max |d|, max bound
        within: list[torch.Tensor] = []
        # L2-sized blocks on CPU: the dozen passes below find their block still in cache.
        for block in blocks(*parts, size=STATS_BLOCK):
            t = block[0].to(torch.float64)
            lo = block[1]
            nonzero.append(torch.any(t != 0))
            for i, pair in enumerate(scaled_dots(t, lo)):  # tt, ll, lt
                scaled[i].append(pair)
            # subtle: sum (L - T)^2 directly, not |L|^2 + |T|^2 - 2<L,T>, which cancels to
            # noise exactly when L and T agree, the case this report is about.
            d = lo - t
            scaled[3] += scaled_dots(d)
            d.abs_()  # in place: no second temporary
            sum_abs.append(d.sum())
            maxima[0].append(d.max())
            if bounded:
                bound = half_ulp(block[2])
                maxima[1].append(bound.max())
                within.append(torch.count_nonzero(d <= bound))
        for attr, pairs in zip(("_sum_tt", "_sum_ll", "_dot", "_sum_dd"), scaled, strict=True):
            setattr(self, attr, add_scaled(getattr(self, attr), combine_scaled(pairs)))
        self._sum_abs = _add(self._sum_abs, torch.stack(sum_abs).sum())
        self._changed = _or(self._changed, torch.stack(nonzero).any())
        self._max_abs = _max(self._max_abs, torch.stack(maxima[0]).max())
        if bounded:
            self._max_bound = _max(self._max_bound, torch.stack(maxima[1]).max())
            self._within = _add(self._within, torch.stack(within).sum())
            self._rounded += tv.numel()

    def update_zero(self, finetuned: torch.Tensor) -> None:
        """Add a chunk whose ``T`` is all zero and that has no LoRA delta: the ``finetuned``
        chunk's bytes equal the base's (the caller checked), so there is nothing to compute."""
        numel = finetuned.numel()
        if self.has_lora:
            raise MismatchError("a tensor with a LoRA delta needs the LoRA chunk", where=self.name)
        if self._seen + numel > self.numel:
            raise MismatchError(
                f"received {self._seen + numel} elements, numel is {self.numel}", where=self.name
            )
        self._seen += numel
        self._tripped += numel  # equal bytes: the dtype round trip holds trivially

    def _update_plain(
        self, tv: torch.Tensor, finetuned: torch.Tensor | None, base: torch.Tensor | None
    ) -> None:
        # The cheap path: no float64 copy of the chunk. vector_norm upcasts per element.
        t = tv if tv.dtype.is_floating_point else tv.to(torch.float64)
        self._changed = _or(self._changed, torch.any(t != 0))
        if t.dtype.itemsize <= 4:
            # The squares of 32-bit and narrower floats never leave float64's range.
            norm = torch.linalg.vector_norm(t, dtype=torch.float64)
            pair = scaled_pair(norm * norm, 0.0)
        else:
            pair = combine_scaled(
                [p for (b,) in blocks(t, size=STATS_BLOCK) for p in scaled_dots(b)]
            )
        self._sum_tt = add_scaled(self._sum_tt, pair)
        if (
            finetuned is not None
            and base is not None
            and finetuned.dtype != base.dtype  # same dtype: round trip == unchanged
        ):
            # Exact test on raw dtypes: does casting the base reproduce the finetuned values?
            same = torch.all(base.to(device=finetuned.device, dtype=finetuned.dtype) == finetuned)
            self._round_trip = _and(self._round_trip, same)
            self._tripped += finetuned.numel()

    def merge(self, other: TensorAccumulator) -> None:
        """Add the state of ``other``, fed other chunks of the same tensor, into ``self``."""
        if other is self:
            raise MismatchError("cannot merge an accumulator into itself", where=self.name)
        mine = (self.name, self.numel, self.has_lora, self.finetuned_dtype, self.base_dtype)
        theirs = (other.name, other.numel, other.has_lora, other.finetuned_dtype, other.base_dtype)
        if mine != theirs:
            raise MismatchError(
                f"cannot merge accumulators of different tensors: {mine} vs {theirs}",
                where=self.name,
            )
        if self._seen + other._seen > self.numel:
            raise MismatchError(
                f"merged accumulators hold {self._seen + other._seen} elements, "
                f"numel is {self.numel}",
                where=self.name,
                hint="were the same chunks fed twice?",
            )
        self._seen += other._seen
        self._rounded += other._rounded
        self._tripped += other._tripped
        for attr, combine in (
            ("_changed", _or),
            ("_sum_tt", add_scaled),
            ("_sum_ll", add_scaled),
            ("_dot", add_scaled),
            ("_sum_dd", add_scaled),
            ("_sum_abs", _add),
            ("_max_abs", _max),
            ("_max_bound", _max),
            ("_within", _add),
            ("_round_trip", _and),
        ):
            theirs_value = getattr(other, attr)
            if theirs_value is not None:
                setattr(self, attr, combine(getattr(self, attr), theirs_value))

    # -- result --------------------------------------------------------------------------

    def result(self) -> TensorComparison:
        """The figures and category of the whole tensor; every element must have been fed."""
        if self._seen != self.numel:
            raise MismatchError(
                f"received {self._seen} of {self.numel} elements",
                where=self.name,
                hint="feed every chunk before asking for the result",
            )
        v = self._host_values()
        changed = bool(v["_changed"])
        tv_norm = sqrt_of_scaled(v["_sum_tt"])
        if not self.has_lora:
            return TensorComparison(
                name=self.name,
                category=self._plain_category(changed, bool(v["_round_trip"])),
                numel=self.numel,
                cosine=None,
                max_abs_diff=None,
                mean_abs_diff=None,
                relative_error=None,
                lora_norm=None,
                tv_norm=_finite(tv_norm),
                rounding_bound=None,
                within_rounding=None,
            )
        n = self.numel
        lora_norm = sqrt_of_scaled(v["_sum_ll"])
        cosine = None
        (ll, e_ll), (tt, e_tt), (lt, e_lt) = v["_sum_ll"], v["_sum_tt"], v["_dot"]
        if n and 0 < ll < math.inf and 0 < tt < math.inf and math.isfinite(lt):
            # The scaled sums give the cosine even where a norm overflows float64.
            # subtle: rounding puts dot / (|L| |T|) above 1 when L is a multiple of T; clamp.
            cosine = ldexp(lt / math.sqrt(ll) / math.sqrt(tt), e_lt - e_ll / 2 - e_tt / 2)
            cosine = max(-1.0, min(1.0, cosine))
        relative_error = None
        if tt > 0:  # T is not zero (NaN is not > 0)
            dd, e_dd = v["_sum_dd"]
            relative_error = ldexp(math.sqrt(dd) / math.sqrt(tt), (e_dd - e_tt) / 2)
        has_bound = n > 0 and self._rounded == n
        return TensorComparison(
            name=self.name,
            category=LORA_AND_CHANGED if changed else LORA_UNCHANGED,
            numel=n,
            cosine=_finite(cosine),
            max_abs_diff=_finite(v["_max_abs"]) if n else None,
            mean_abs_diff=_finite(v["_sum_abs"] / n) if n else None,
            relative_error=_finite(relative_error),
            lora_norm=_finite(lora_norm),
            tv_norm=_finite(tv_norm),
            rounding_bound=_finite(v["_max_bound"]) if has_bound else None,
            within_rounding=v["_within"] / n if has_bound else None,
        )

    def _plain_category(self, changed: bool, round_trip: bool) -> str:
        if not changed:
            return UNCHANGED
        if (
            self._tripped == self.numel
            and round_trip
            and self.finetuned_dtype is not None
            and self.finetuned_dtype != self.base_dtype
        ):
            return ROUNDING_ONLY
        return CHANGED_NOT_LORA

    def _host_values(self) -> dict[str, Any]:
        """The state on the host, one device sync: a Python float per 0-dim tensor (``None``
        if unset), a ``[value, exponent]`` list per scaled sum (``[0.0, EMPTY_EXPONENT]`` if unset)."""
        values: dict[str, Any] = dict.fromkeys(_STATE)
        values.update({a: [0.0, EMPTY_EXPONENT] for a in _SCALED})
        names = [a for a in _STATE if getattr(self, a) is not None]
        if names:
            device = getattr(self, names[0]).device
            # Counts fit float64 exactly: no tensor has 2**53 elements.
            parts = [getattr(self, a).to(device, torch.float64).reshape(-1) for a in names]
            flat = torch.cat(parts).tolist()
            for name, part in zip(names, parts, strict=True):
                size = part.numel()
                values[name] = flat[:size] if name in _SCALED else flat[0]
                flat = flat[size:]
        return values


#: The accumulator state that merges and moves to the host.
_STATE = (
    "_changed",
    "_sum_tt",
    "_sum_ll",
    "_dot",
    "_sum_dd",
    "_sum_abs",
    "_max_abs",
    "_max_bound",
    "_within",
    "_round_trip",
)
#: The state kept as scaled sums ([value, exponent] pairs).
_SCALED = frozenset({"_sum_tt", "_sum_ll", "_dot", "_sum_dd"})
