"""Counter-based random bits: a pure function of (seed, tensor, input, element index).

DARE's and DELLA's masks come from here, so they do not depend on the chunk size or the
device, and a rerun draws the same bits.
"""

from __future__ import annotations

import hashlib

import torch

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


def keep_threshold(p: float) -> int:
    """Keep an element when its 32 random bits are below this: P(keep) = round(p * 2**32) / 2**32."""
    return min(1 << 32, round(p * (1 << 32)))
