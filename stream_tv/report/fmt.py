"""How figures read in the text renderings: significant digits, cosines, shares, dtypes."""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "count",
    "dtype_label",
    "fmt_cosine",
    "fmt_count",
    "fmt_figure",
    "fmt_percent",
    "verb",
]

_DTYPE_SHORT = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "float64": "fp64",
    "double": "fp64",
}


def fmt_figure(x: float | None, digits: int = 3) -> str:
    """A figure for tables: 3 significant digits, 'n/a' for null.

    >>> fmt_figure(0.000123456), fmt_figure(12.3456), fmt_figure(None), fmt_figure(0.0)
    ('1.23e-04', '12.3', 'n/a', '0')
    """
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 0)}e}"


def fmt_cosine(x: float | None) -> str:
    """A cosine with enough digits to show its distance from 1 (0.99999998 is not 1.000000).

    >>> fmt_cosine(0.99999998), fmt_cosine(1 - 2e-16), fmt_cosine(0.5)
    ('0.999999980', '1.0', '0.5000')
    """
    if x is None:
        return "n/a"
    gap = 1.0 - abs(x)
    # subtle: identical L and T give 1 - 2e-16 (the norms' square roots round); 12 decimals
    # would print that as 1.000000000000. Below what 12 decimals show, say 1.0.
    if gap < 5e-13:
        return f"{math.copysign(1.0, x):.1f}"
    decimals = min(12, max(4, math.ceil(-math.log10(gap)) + 1))
    return f"{x:.{decimals}f}"


def fmt_percent(x: float | None) -> str:
    """A share as a percentage, with the digits that matter: never 100% for "almost all",
    never 0% for "a few", and as many decimals as the distance from 0% or 100% needs.

    >>> fmt_percent(1.0), fmt_percent(0.5), fmt_percent(0.764), fmt_percent(0.998)
    ('100%', '50.0%', '76.4%', '99.8%')
    >>> fmt_percent(1 - 1 / 147456), fmt_percent(7e-6), fmt_percent(0.0), fmt_percent(None)
    ('99.9993%', '0.0007%', '0%', 'n/a')
    """
    if x is None:
        return "n/a"
    if x in (0, 1):
        return f"{100 * x:.0f}%"
    pct = 100 * x
    gap = min(pct, 100 - pct)  # distance from the nearer end, in percent
    # subtle: gap >= 10**-decimals, so rounding to that many decimals can reach neither end.
    decimals = 1 if gap >= 0.1 else min(12, math.ceil(-math.log10(gap)))
    return f"{pct:.{decimals}f}%"


def fmt_count(n: int) -> str:
    """An element count with thousands separators.

    >>> fmt_count(147456), fmt_count(7)
    ('147,456', '7')
    """
    return f"{n:,}"


def dtype_label(raw: Any) -> str:
    """A short dtype name for prose (``torch.bfloat16`` -> ``bf16``); ``dtype`` if unknown.

    >>> dtype_label("torch.bfloat16"), dtype_label("float32"), dtype_label(None)
    ('bf16', 'fp32', 'dtype')
    """
    if raw is None:
        return "dtype"
    text = str(raw).removeprefix("torch.")
    return _DTYPE_SHORT.get(text, text)


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1.

    >>> count(1, "tensor"), count(3, "tensor")
    ('1 tensor', '3 tensors')
    """
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def verb(n: int, one: str = "is", many: str = "are") -> str:
    """The verb form that agrees with ``n`` things.

    >>> verb(1), verb(2), verb(2, "departs", "depart")
    ('is', 'are', 'depart')
    """
    return one if n == 1 else many
