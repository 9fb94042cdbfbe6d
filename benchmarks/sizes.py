"""Byte sizes on the command line: 4GB = 4e9, 500MB = 5e8, 1GiB = 2^30, 256K = 256e3."""

from __future__ import annotations

_UNITS = {
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "B": 1,
}


def parse_size(text: str) -> int:
    t = text.strip().upper().replace(" ", "")
    for suffix, mult in _UNITS.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)
