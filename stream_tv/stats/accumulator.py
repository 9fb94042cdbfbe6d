"""The streaming accumulator of one tensor's comparison (see :mod:`stream_tv.stats`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from stream_tv.errors import InputError, MismatchError
from stream_tv.floats import (
    BITS_OF,
    EMPTY_EXPONENT,
    add_scaled,
    combine_scaled,
    ldexp,
    max_half_ulp,
    scaled_dots,
    scaled_pair,
    sqrt_of_scaled,
    ulp_counts,
)
from stream_tv.ops import blocks, round_to

from . import cpu
from .record import (
    CHANGED_NOT_LORA,
    LORA_AND_CHANGED,
    LORA_UNCHANGED,
    ROUNDING_ONLY,
    UNCHANGED,
    TensorComparison,
)

__all__ = ["STATS_BLOCK", "TensorAccumulator"]

# Elements per block of the statistics passes on CPU (float64: 1 MiB per operand).
STATS_BLOCK = 1 << 17
#: CPU chunks take :mod:`stream_tv.stats.cpu` (same figures, less work); False sends them
#: through the device path, as on a GPU (the tests compare the two).
CPU_FIGURES = True
#: ``ulp_max`` at or above this is reported as unbounded (see ``floats.ULP_UNBOUNDED``).
_UNBOUNDED_AT = 2.0**62


def _add(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if acc is None else acc + value.to(acc.device)


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


#: How each piece of state combines: within a chunk (a list of per-block values) and across
#: chunks or merged accumulators (two values).
_RULES: dict[str, tuple[Callable[[list[torch.Tensor]], torch.Tensor], Callable]] = {
    "or": (lambda v: torch.stack(v).any(), _or),
    "and": (lambda v: torch.stack(v).all(), _and),
    "add": (lambda v: torch.stack(v).sum(), _add),
    "max": (lambda v: torch.stack(v).max(), _max),
    "scaled": (combine_scaled, add_scaled),
}
#: The accumulator's device state and its rule.
_STATE = {
    "_changed": "or",  # bool: T has a nonzero element
    "_sum_tt": "scaled",  # sum T^2
    "_sum_ll": "scaled",  # sum L^2
    "_dot": "scaled",  # sum L T
    "_sum_dd": "scaled",  # sum (L - T)^2
    "_sum_ee": "scaled",  # sum (round(W + L) - (W + L))^2
    "_sum_abs": "add",  # sum |L - T|
    "_max_abs": "max",  # max |L - T|
    "_max_bound": "max",  # max half-ulp of F
    "_round_trip": "and",  # bool: all F == W.to(F.dtype)
    "_ulp0": "add",  # int64 counts of elements 0 / 1 ulp from the reference
    "_ulp1": "add",
    "_ulp_max": "max",
    "_exact": "add",  # int64: F bits == merged bits
    "_nonfinite": "add",  # int64: T or L not finite
}
#: The dtype of each piece of state that is not float64 (or a scaled pair).
_FIGURE_DTYPES = {
    "_changed": torch.bool,
    "_round_trip": torch.bool,
    "_ulp0": torch.int64,
    "_ulp1": torch.int64,
    "_ulp_max": torch.int64,
    "_exact": torch.int64,
    "_nonfinite": torch.int64,
}


def _count_nonfinite(probe: torch.Tensor, *chunks: torch.Tensor) -> torch.Tensor:
    """Elements where any of ``chunks`` is NaN or infinite. ``probe`` is a figure computed
    from all of them that is finite when they all are: on CPU a finite probe skips the
    count (a free host check); elsewhere the count always runs (no synchronisation)."""
    if probe.device.type == "cpu" and math.isfinite(float(probe)):
        return torch.zeros((), dtype=torch.int64)
    bad = ~torch.isfinite(chunks[0])
    for chunk in chunks[1:]:
        bad |= ~torch.isfinite(chunk)
    return torch.count_nonzero(bad)


def _lt_block(t: torch.Tensor, lo: torch.Tensor) -> dict[str, torch.Tensor]:
    """The L / T figures of one flat float64 block."""
    tt, ll, lt = scaled_dots(t, lo)
    # subtle: sum (L - T)^2 directly, not |L|^2 + |T|^2 - 2<L,T>, which cancels to noise
    # exactly when L and T agree, the case this report is about.
    d = lo - t
    (dd,) = scaled_dots(d)
    d.abs_()  # in place: no second temporary
    worst = d.max()
    return {
        # T has a nonzero (or NaN) element exactly when its sum of squares is not 0 (a
        # scaled sum: elements whose squares underflow still count)
        "_changed": tt[0] != 0,
        "_sum_tt": tt,
        "_sum_ll": ll,
        "_dot": lt,
        "_sum_dd": dd,
        "_sum_abs": d.sum(),
        "_max_abs": worst,
        "_nonfinite": _count_nonfinite(worst, t, lo),
    }


def _ulp_block(f: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Counts of ``f`` at 0 and 1 ulp from ``reference`` (same dtype), and the largest."""
    zero, one, top = ulp_counts(f, reference)
    return {"_ulp0": zero, "_ulp1": one, "_ulp_max": top}


def _merge_block(
    f: torch.Tensor, w: torch.Tensor | None, lo: torch.Tensor, merged: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The rounding figures of a LoRA block: F against the correctly rounded W + L (with W)
    and against our merge (with ``merged``)."""
    out = {"_max_bound": max_half_ulp(f)}
    if w is not None:
        exact = w.to(torch.float64) + lo  # W + L, in float64
        rounded = round_to(exact, f.dtype)  # correctly rounded, not via float32
        out.update(_ulp_block(f, rounded))
        (out["_sum_ee"],) = scaled_dots(rounded.to(torch.float64) - exact)
    if merged is not None:
        # subtle: "merged, then saved in F's dtype" is torch's cast, what save_pretrained
        # with a torch_dtype does (float64 -> bf16 rounds twice there, as it would here).
        cast = merged.to(f.dtype)
        bits = BITS_OF[f.dtype]
        out["_exact"] = torch.count_nonzero(f.view(bits) == cast.view(bits))
    return out


def _plain_block(
    t: torch.Tensor, f: torch.Tensor | None, w: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The figures of one flat block of a tensor without L: ||T||, and F against W."""
    if t.dtype.itemsize <= 4:
        # The squares of 32-bit and narrower floats never leave float64's range.
        norm = torch.linalg.vector_norm(t, dtype=torch.float64)
        tt = scaled_pair(norm * norm, 0.0)
    else:
        (tt,) = scaled_dots(t)
    out = {"_changed": tt[0] != 0, "_sum_tt": tt, "_nonfinite": _count_nonfinite(tt[0], t)}
    if f is not None and w is not None:
        w = w.to(f.device)
        reference = round_to(w, f.dtype)  # the correctly rounded round trip of W
        if f.dtype != w.dtype:  # same dtype: round trip == unchanged
            # The category's test is torch's cast, exact on raw dtypes (see _merge_block).
            cast = reference if w.dtype != torch.float64 else w.to(f.dtype)
            out["_round_trip"] = torch.all(cast == f)
        if f.dtype in BITS_OF:
            out.update(_ulp_block(f, reference))
    return out


class TensorAccumulator:
    """Accumulates the comparison of one tensor from its row chunks, in order or merged.

    ``update`` takes the chunk of ``T = finetuned - base`` (``tv``), of the LoRA delta
    (``lora``, when ``has_lora``) and, optionally, the raw ``finetuned`` (``F``) and ``base``
    (``W``) chunks in their own dtypes, and ``merged``: what ``stream-tv merge`` writes for
    this chunk (any float dtype; it is cast to ``F``'s dtype). Shapes must agree.

    Categories, decided by :meth:`result`:

    - ``lora_and_changed`` / ``lora_unchanged``: the adapter has a delta and ``T`` has a
      nonzero element / is all zero. The LoRA categories take precedence: a LoRA tensor
      whose ``T`` is only a dtype round trip stays ``lora_and_changed``.
    - ``rounding_only``: no LoRA delta, ``T`` nonzero, base and finetuned dtypes differ, and
      every element satisfies ``finetuned == base.to(finetuned.dtype)`` (e.g. an fp32 base
      saved again as bf16). Needs ``finetuned`` and ``base`` in every chunk.
    - ``changed_not_lora``: no LoRA delta, ``T`` nonzero, not rounding-only.
    - ``unchanged``: no LoRA delta, ``T`` all zero.

    Rounding, each figure only when its inputs came with every chunk (else null), ``F`` in
    bf16, fp16, fp32 or fp64:

    - ``rounding_bound`` (``F``): the largest half ulp of ``F``;
    - ``ulp_counts`` / ``ulp_max`` (``F``, ``W``): ``F`` against the correctly rounded
      ``W + L`` (LoRA tensors) or ``W`` (others), ``W + L`` summed in float64 and rounded
      once to ``F``'s dtype (:func:`stream_tv.ops.round_to`, not torch's double rounding);
    - ``rounding_floor`` (``F``, ``W``, LoRA): ``||round(W + L) - (W + L)|| / ||T||``, the
      relative error that rounding a perfect merge to ``F``'s dtype gives by itself;
    - ``bit_exact_merge`` (``F``, ``merged``, LoRA): the fraction of elements of ``F`` equal,
      bit for bit, to ``merged`` cast to ``F``'s dtype.

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
        self._bounded = 0  # elements with a rounding bound (LoRA tensors with F)
        self._tripped = 0  # elements tested for the dtype round trip (no LoRA)
        self._ulp_seen = 0  # elements with ulp figures (F and W given)
        self._exact_seen = 0  # elements compared with our merge (F and merged given)
        self._zero_ulps = 0  # elements fed by update_zero: F is W, bit for bit
        for attr in _STATE:
            setattr(self, attr, None)

    def __repr__(self) -> str:
        return (
            f"TensorAccumulator({self.name!r}, numel={self.numel}, has_lora={self.has_lora}, "
            f"seen={self._seen})"
        )

    # -- feeding -------------------------------------------------------------------------

    def update(
        self,
        *,
        tv: torch.Tensor | None,
        lora: torch.Tensor | None = None,
        finetuned: torch.Tensor | None = None,
        base: torch.Tensor | None = None,
        merged: torch.Tensor | None = None,
    ) -> None:
        """Add one chunk. ``lora`` must be float64 (``tv`` is upcast, exactly, if needed).

        ``tv=None`` with ``finetuned`` and ``base``: ``T`` is their exact float64 difference,
        computed here (on CPU block by block, so that no float64 copy of the chunk is made).
        """
        if tv is None:
            if finetuned is None or base is None:
                raise MismatchError("tv=None needs the finetuned and base chunks", where=self.name)
            if not (self.has_lora and CPU_FIGURES and _all_cpu(lora, finetuned, base, merged)):
                tv = finetuned.to(torch.float64) - base.to(torch.float64)
        self._check_chunk(finetuned if tv is None else tv, lora, finetuned, base, merged)
        n = finetuned.numel() if tv is None else tv.numel()
        self._seen += n
        if n == 0:
            return
        measurable = finetuned is not None and finetuned.dtype in BITS_OF
        with_base = measurable and base is not None
        if CPU_FIGURES and _all_cpu(tv, lora, finetuned, base, merged):
            self._fold_figures(self._cpu_figures(tv, lora, finetuned, base, merged))
        else:
            self._fold(self._device_parts(tv, lora, finetuned, base, merged))
        if self.has_lora:
            self._bounded += n if measurable else 0
            self._exact_seen += n if measurable and merged is not None else 0
        elif finetuned is not None and base is not None and finetuned.dtype != base.dtype:
            self._tripped += n
        self._ulp_seen += n if with_base else 0

    def _cpu_figures(self, tv, lora, finetuned, base, merged) -> dict[str, Any]:
        """The chunk's figures, computed the CPU way (:mod:`stream_tv.stats.cpu`)."""
        flat = [None if x is None else x.reshape(-1) for x in (finetuned, base, merged)]
        f, w, m = flat
        if self.has_lora:
            if f is None or f.dtype not in BITS_OF:
                f = w = m = None
            if tv is None and w is None:
                tv = finetuned.to(torch.float64) - base.to(torch.float64)
            t = None if tv is None else tv.reshape(-1).to(torch.float64)
            return cpu.lora_figures(t, lora.reshape(-1), f, w, m)
        t = tv if tv.dtype.is_floating_point else tv.to(torch.float64)
        pair = f is not None and w is not None
        return cpu.plain_figures(t.reshape(-1), f if pair else None, w if pair else None)

    def _fold_figures(self, figures: dict[str, Any]) -> None:
        """Add a chunk's Python figures (``cpu``'s) to the state, in each piece's rule."""
        for attr, value in figures.items():
            rule = _STATE[attr]
            if rule == "scaled":
                value = torch.tensor(value, dtype=torch.float64)
            else:
                dtype = _FIGURE_DTYPES.get(attr, torch.float64)
                value = torch.tensor(value, dtype=dtype)
            setattr(self, attr, _RULES[rule][1](getattr(self, attr), value))

    def _device_parts(self, tv, lora, finetuned, base, merged) -> dict[str, list[torch.Tensor]]:
        """The chunk's figures as per-block device tensors (no synchronisation)."""
        measurable = finetuned is not None and finetuned.dtype in BITS_OF
        with_base = measurable and base is not None
        dev = tv.device
        parts: dict[str, list[torch.Tensor]] = {}
        if self.has_lora:
            assert lora is not None  # checked above
            chunks = [tv, lora.to(dev)]
            if measurable:
                chunks += [finetuned.to(dev)]
                chunks += [base.to(dev) if with_base else None]
                chunks += [merged.to(dev) if merged is not None else None]
            for t, lo, *rest in _blocks(chunks):
                t = t.to(torch.float64)
                _append(parts, _lt_block(t, lo))
                if rest:
                    _append(parts, _merge_block(rest[0], rest[1], lo, rest[2]))
        else:
            # The cheap path: no float64 copy of the chunk. vector_norm upcasts per element.
            t = tv if tv.dtype.is_floating_point else tv.to(torch.float64)
            pair = finetuned is not None and base is not None
            chunks = [t] + ([finetuned.to(dev), base.to(dev)] if pair else [])
            for t_b, *rest in _blocks(chunks):
                _append(parts, _plain_block(t_b, *(rest or (None, None))))
        return parts

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
        if finetuned.dtype in BITS_OF:  # ... and every element is 0 ulps from W
            self._ulp_seen += numel
            self._zero_ulps += numel

    def _check_chunk(
        self,
        tv: torch.Tensor,
        lora: torch.Tensor | None,
        finetuned: torch.Tensor | None,
        base: torch.Tensor | None,
        merged: torch.Tensor | None,
    ) -> None:
        if self.has_lora and lora is None:
            raise MismatchError("a tensor with a LoRA delta needs the LoRA chunk", where=self.name)
        if not self.has_lora and lora is not None:
            raise MismatchError(
                "got a LoRA chunk for a tensor declared without LoRA",
                where=self.name,
                hint="create the accumulator with has_lora=True",
            )
        if merged is not None and (not self.has_lora or finetuned is None):
            raise MismatchError(
                "a merged chunk is compared with the finetuned chunk of a LoRA tensor",
                where=self.name,
                hint="pass finetuned= with merged=, for tensors with a LoRA delta",
            )
        if lora is not None and lora.dtype != torch.float64:
            # subtle: L - T sits at float32 rounding level; float32 L changes max_abs_diff and
            # relative_error by up to 80% on fp32 models.
            raise MismatchError(
                f"the LoRA chunk is {lora.dtype}, not torch.float64",
                where=self.name,
                hint="compute scaling * B @ A in float64",
            )
        named = (("lora", lora), ("finetuned", finetuned), ("base", base), ("merged", merged))
        for label, other in named:
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

    def _fold(self, parts: dict[str, list[torch.Tensor]]) -> None:
        """Reduce one chunk's per-block values and add them to the state."""
        for attr, values in parts.items():
            reduce, combine = _RULES[_STATE[attr]]
            setattr(self, attr, combine(getattr(self, attr), reduce(values)))

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
        for count in ("_seen", "_bounded", "_tripped", "_ulp_seen", "_exact_seen", "_zero_ulps"):
            setattr(self, count, getattr(self, count) + getattr(other, count))
        for attr, rule in _STATE.items():
            theirs_value = getattr(other, attr)
            if theirs_value is not None:
                setattr(self, attr, _RULES[rule][1](getattr(self, attr), theirs_value))

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
        n = self.numel
        tv_norm = sqrt_of_scaled(v["_sum_tt"])
        dtype = self.finetuned_dtype
        common = {
            "name": self.name,
            "numel": n,
            "finetuned_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            "tv_norm": _finite(tv_norm),
            "nonfinite": int(v["_nonfinite"] or 0),
            **self._ulp_figures(v),
        }
        if not self.has_lora:
            return TensorComparison(
                category=self._plain_category(bool(v["_changed"]), bool(v["_round_trip"])),
                **dict.fromkeys(_LORA_FIGURES),
                **common,
            )
        (ll, e_ll), (tt, e_tt), (lt, e_lt) = v["_sum_ll"], v["_sum_tt"], v["_dot"]
        cosine = None
        if n and 0 < ll < math.inf and 0 < tt < math.inf and math.isfinite(lt):
            # The scaled sums give the cosine even where a norm overflows float64.
            # subtle: rounding puts dot / (|L| |T|) above 1 when L is a multiple of T; clamp.
            cosine = ldexp(lt / math.sqrt(ll) / math.sqrt(tt), e_lt - e_ll / 2 - e_tt / 2)
            cosine = max(-1.0, min(1.0, cosine))
        relative_error = floor = None
        if tt > 0:  # T is not zero (NaN is not > 0)
            dd, e_dd = v["_sum_dd"]
            relative_error = ldexp(math.sqrt(dd) / math.sqrt(tt), (e_dd - e_tt) / 2)
            if common["ulp_counts"] is not None:
                ee, e_ee = v["_sum_ee"]
                floor = ldexp(math.sqrt(ee) / math.sqrt(tt), (e_ee - e_tt) / 2)
        exact = n > 0 and self._exact_seen == n
        return TensorComparison(
            category=LORA_AND_CHANGED if v["_changed"] else LORA_UNCHANGED,
            cosine=_finite(cosine),
            max_abs_diff=_finite(v["_max_abs"]) if n else None,
            mean_abs_diff=_finite(v["_sum_abs"] / n) if n else None,
            relative_error=_finite(relative_error),
            lora_norm=_finite(sqrt_of_scaled(v["_sum_ll"])),
            rounding_bound=_finite(v["_max_bound"]) if n and self._bounded == n else None,
            rounding_floor=_finite(floor),
            bit_exact_merge=(v["_exact"] or 0) / n if exact else None,
            **common,
        )

    def _ulp_figures(self, v: dict[str, Any]) -> dict[str, Any]:
        """``ulp_counts`` and ``ulp_max`` if every element was measured, else nulls."""
        n = self.numel
        if n == 0 or self._ulp_seen != n:
            return {"ulp_counts": None, "ulp_max": None}
        n0 = int(v["_ulp0"] or 0) + self._zero_ulps
        n1 = int(v["_ulp1"] or 0)
        top = v["_ulp_max"] or 0.0  # only update_zero chunks: all 0
        return {
            "ulp_counts": (n0, n1, n - n0 - n1),
            "ulp_max": int(top) if top < _UNBOUNDED_AT else None,
        }

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
        if unset), a ``[value, exponent]`` list per scaled sum (``[0.0, EMPTY]`` if unset)."""
        values: dict[str, Any] = dict.fromkeys(_STATE)
        values.update({a: [0.0, EMPTY_EXPONENT] for a, rule in _STATE.items() if rule == "scaled"})
        names = [a for a in _STATE if getattr(self, a) is not None]
        if names:
            device = getattr(self, names[0]).device
            # Counts fit float64 exactly: no tensor has 2**53 elements.
            parts = [getattr(self, a).to(device, torch.float64).reshape(-1) for a in names]
            flat = torch.cat(parts).tolist()
            for name, part in zip(names, parts, strict=True):
                size = part.numel()
                values[name] = flat[:size] if _STATE[name] == "scaled" else flat[0]
                flat = flat[size:]
        return values


#: The fields of a tensor without L that need L: all null.
_LORA_FIGURES = (
    "cosine",
    "max_abs_diff",
    "mean_abs_diff",
    "relative_error",
    "lora_norm",
    "rounding_bound",
    "rounding_floor",
    "bit_exact_merge",
)


def _all_cpu(*chunks: torch.Tensor | None) -> bool:
    return all(c is None or c.device.type == "cpu" for c in chunks)


def _blocks(chunks: list[torch.Tensor | None]):
    """Aligned flat blocks of the given chunks, ``None`` standing for an absent one."""
    present = [c for c in chunks if c is not None]
    for block in blocks(*present, size=STATS_BLOCK):
        it = iter(block)
        yield [None if c is None else next(it) for c in chunks]


def _append(parts: dict[str, list[torch.Tensor]], values: dict[str, torch.Tensor]) -> None:
    for key, value in values.items():
        parts.setdefault(key, []).append(value)
