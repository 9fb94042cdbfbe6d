"""Figures derived from a report's rows: means and extremes that skip nulls, the verdicts."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from stream_tv.stats import TensorComparison

__all__ = ["EXPLAINED_COSINE", "explained", "mean", "norm_ratio", "reduce", "within_fraction"]

#: A covered tensor counts as "explained" by LoRA in the headline when its cosine is at
#: least this, or when every element of L - T is within the finetuned dtype's rounding.
EXPLAINED_COSINE = 0.999


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None if there are none."""
    kept = [v for v in values if v is not None]
    return math.fsum(kept) / len(kept) if kept else None


def reduce(fn: Callable[[list[float]], float], values: Iterable[float | None]) -> float | None:
    """``fn`` (min, max) of the values that are not None; None if there are none."""
    kept = [v for v in values if v is not None]
    return fn(kept) if kept else None


def within_fraction(tensors: Iterable[TensorComparison]) -> float | None:
    """Fraction of elements within rounding, over the tensors that have the figure."""
    rows = [(t.within_rounding, t.numel) for t in tensors if t.within_rounding is not None]
    total = sum(n for _, n in rows)
    if not rows or total == 0:
        return None
    return math.fsum(w * n for w, n in rows) / total


def explained(t: TensorComparison) -> bool:
    """The headline's rule: all differences within rounding, or cosine >= EXPLAINED_COSINE."""
    if t.within_rounding == 1.0:
        return True
    return t.cosine is not None and t.cosine >= EXPLAINED_COSINE


def norm_ratio(tensors: list[TensorComparison]) -> float | None:
    """The median ``lora_norm / tv_norm`` over ``tensors`` (None if no tensor has both)."""
    ratios = sorted(
        t.lora_norm / t.tv_norm for t in tensors if t.lora_norm is not None and t.tv_norm
    )
    if not ratios:
        return None
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
