"""Bitwise facts about CPU chunks, without arithmetic: equal bytes, and the differences that
equal bytes make trivially zero.

>>> import torch
>>> x = torch.tensor([1.0, -0.0, 3.0], dtype=torch.bfloat16)
>>> equal(x, x.clone()), zero_difference(x, x.clone())
(True, True)
>>> zero_difference(torch.tensor([float("inf")]), torch.tensor([float("inf")]))
False
"""

from __future__ import annotations

import torch

__all__ = ["equal", "zero_difference"]


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two chunks (NaN equals NaN with the same bits)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if _memcmp is not None and _plain_cpu(a) and _plain_cpu(b):
        # memcmp: ~5x torch.equal on the same bytes here, and without the GIL (ctypes)
        return _memcmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    if a.is_floating_point():
        return torch.equal(a.view(_int_view(a.dtype)), b.view(_int_view(b.dtype)))
    return torch.equal(a, b)


def zero_difference(f: torch.Tensor, b: torch.Tensor) -> bool:
    """``f - b`` is ``+0.0`` in every element, in any dtype it is computed or stored in:
    non-empty contiguous CPU float chunks with the same bits, all finite (``x - x`` is
    ``+0.0`` for every finite ``x``, ``-0.0`` included; an infinity or a NaN gives NaN).

    Two fast passes (memcmp, then one min/max reduction), where computing the difference
    and rounding it can take several.
    """
    if not (f.is_floating_point() and f.numel() and _plain_cpu(f) and _plain_cpu(b)):
        return False
    if not equal(f, b):
        return False
    lo, hi = torch.aminmax(f.reshape(-1))  # NaN propagates; +-inf shows
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _plain_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.is_contiguous()


def _libc_memcmp():
    try:
        import ctypes

        fn = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):  # no C library to call: torch.equal
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_memcmp = _libc_memcmp()


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[dtype.itemsize]
