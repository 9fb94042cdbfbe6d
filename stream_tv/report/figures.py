"""Figures derived from a report's rows: means and extremes that skip nulls, and verdicts.

A LoRA tensor's verdict (:func:`verdict`), in units of its fine-tuned dtype's rounding:

- ``reproduced``: ``F`` is, bit for bit, what ``stream-tv merge`` writes (``bit_exact_merge``
  is 1): this tensor IS PEFT's merge of this adapter;
- ``explained_by_rounding``: every element of ``F`` is within one ulp of the correctly
  rounded ``W + L`` (``ulp_max <= 1``), what another rounding order of the sum can give;
- ``departs``: some element is further, and ``F`` is not our merge either;
- ``undecided``: some element is further, and ``F`` was not compared with our merge;
- ``None``: not measured (no fine-tuned or base values: two task vectors, or a task vector
  given for ``T``); the headline then judges by cosine (:data:`EXPLAINED_COSINE`).

# subtle: more than one ulp from the correctly rounded W + L is not yet a departure. A
# merge rounds the delta before the sum (PEFT: to float32 for Linear and Conv1D, to the
# weight's dtype for Embedding), an error relative to |L|, which is many ulps of W + L
# where W + L is near zero. Measured on PEFT's own merges of the test fixtures (random
# factors, |L| ~ |W|): fp32 models, 10% of elements 2 to 236,572 ulps away; a bf16
# Embedding, 1 element at 3 ulps; an fp32 merge saved as bf16, 1 element at 4 ulps. Only
# the bit-exact comparison with our merge tells those from a changed tensor.

>>> from stream_tv.stats import TensorComparison
>>> row = lambda **kw: TensorComparison("w", "lora_and_changed", 4, *[0.5] * 7, **kw)
>>> verdict(row(bit_exact_merge=1.0)), verdict(row(ulp_counts=(3, 1, 0), ulp_max=1))
('reproduced', 'explained_by_rounding')
>>> verdict(row(ulp_counts=(3, 0, 1), ulp_max=9, bit_exact_merge=0.75))
'departs'
>>> verdict(row(ulp_counts=(3, 0, 1), ulp_max=9)), verdict(row())
('undecided', None)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from stream_tv.stats import TensorComparison

__all__ = [
    "DEPARTS",
    "EXPLAINED",
    "EXPLAINED_COSINE",
    "REPRODUCED",
    "UNDECIDED",
    "VERDICTS",
    "bit_exact_fraction",
    "explained_by_cosine",
    "mean",
    "norm_ratio",
    "reduce",
    "ulp_totals",
    "verdict",
]

REPRODUCED = "reproduced"
EXPLAINED = "explained_by_rounding"
DEPARTS = "departs"
UNDECIDED = "undecided"
#: The verdicts, best first.
VERDICTS = (REPRODUCED, EXPLAINED, DEPARTS, UNDECIDED)

#: Where no verdict can be measured (no fine-tuned weights), a covered tensor counts as
#: "explained" by L in the headline when its cosine is at least this.
EXPLAINED_COSINE = 0.999


def verdict(t: TensorComparison) -> str | None:
    """The verdict of a tensor with a LoRA delta (see the module docstring); None without
    one, or where nothing was measured."""
    if not t.has_lora:
        return None
    if t.bit_exact_merge == 1.0:
        return REPRODUCED
    if t.ulp_counts is None:
        return None
    if t.ulp_max is not None and t.ulp_max <= 1:
        return EXPLAINED
    return UNDECIDED if t.bit_exact_merge is None else DEPARTS


def explained_by_cosine(t: TensorComparison) -> bool:
    """The headline's rule where no verdict is measured: cosine >= EXPLAINED_COSINE."""
    return t.cosine is not None and t.cosine >= EXPLAINED_COSINE


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None if there are none."""
    kept = [v for v in values if v is not None]
    return math.fsum(kept) / len(kept) if kept else None


def reduce(fn: Callable[[list[float]], float], values: Iterable[float | None]) -> float | None:
    """``fn`` (min, max) of the values that are not None; None if there are none."""
    kept = [v for v in values if v is not None]
    return fn(kept) if kept else None


def ulp_totals(tensors: Iterable[TensorComparison]) -> tuple[list[int], int | None] | None:
    """``ulp_counts`` summed and ``ulp_max`` over the tensors that have them (the max is None
    if one is unbounded); None if none has them."""
    rows = [t for t in tensors if t.ulp_counts is not None]
    if not rows:
        return None
    counts = [sum(t.ulp_counts[i] for t in rows) for i in range(3)]  # type: ignore[index]
    maxima = [t.ulp_max for t in rows]
    return counts, None if None in maxima else max(maxima)  # type: ignore[type-var]


def bit_exact_fraction(tensors: Iterable[TensorComparison]) -> float | None:
    """Element-weighted ``bit_exact_merge`` over the tensors that have it."""
    rows = [(t.bit_exact_merge, t.numel) for t in tensors if t.bit_exact_merge is not None]
    total = sum(n for _, n in rows)
    if not rows or total == 0:
        return None
    return math.fsum(f * n for f, n in rows) / total


def norm_ratio(tensors: list[TensorComparison]) -> float | None:
    """The median ``lora_norm / tv_norm`` over ``tensors`` (None if no tensor has both)."""
    ratios = sorted(
        t.lora_norm / t.tv_norm for t in tensors if t.lora_norm is not None and t.tv_norm
    )
    if not ratios:
        return None
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
