"""Byte sizes as people write them, both ways; no torch, so the CLI can use it at import.

>>> parse_size("256MB"), parse_size("1.5GiB"), parse_size(1024)
(256000000, 1610612736, 1024)
>>> format_size(1_500_000_000)
'1.50 GB'
"""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal, as Hugging Face counts), ``"64MiB"`` -> 67108864.

    Raises ``ValueError`` for text that is not a positive size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot read size {text!r}; write e.g. 64MB, 5GB or 1GiB")
        # Fraction, not float: "0.29GB" is 290000000 bytes, not 289999999.
        value = int(Fraction(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


def format_size(n: float) -> str:
    """Decimal units with two decimals (``format_size(999) == '999 B'``)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
