"""One pass per block for the figures of a LoRA tensor on CPU, compiled by numba (optional).

:func:`stream_tv.stats.cpu.lora_figures` costs about twenty torch passes per block: the
float64 copies, ``F - W``, ``W + L``, ``L - T``, four dots, ``|L - T|`` and its max and sum,
the correct rounding of ``W + L`` to ``F``'s dtype, its error, and the ulp counts. Here one
compiled loop reads each element of ``L``, ``F`` and ``W`` once and keeps every figure in
registers, for a fraction of the time.

Every per-element value is the one the torch path computes, by the same IEEE operations:
``T = F - W`` and ``W + L`` in float64, ``W + L`` rounded once to ``F``'s dtype (to nearest,
ties to even, as :func:`stream_tv.ops.round_to`), the ulp distance of
:func:`stream_tv.floats.ulp_distance`. What differs is only the order of the float64
additions of the sums (the loop keeps several partial sums, as BLAS does), and so their
last bits; every count and every maximum is the same number. Scaled sums are not done
here: a block whose plain sums left the safe range is done again the torch way.

The module needs numba (``pip install 'stream-tv[fast]'``); :func:`available` says whether
it is there, and :func:`reason` why not. Only the sums are reassociated (``fastmath`` is on the loop's accumulation, not on
the element functions, which are compiled without it).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["COLUMNS", "DTYPES", "available", "lora_blocks", "sum_blocks"]

#: The float columns of :func:`lora_blocks`' first array, by name.
COLUMNS = ("tt", "ll", "lt", "dd", "sum_abs", "max_abs", "ee")
#: The dtypes of ``F`` and ``W`` the kernels read, and the numpy view that selects each.
DTYPES = {
    torch.bfloat16: np.uint16,
    torch.float16: np.int16,
    torch.float32: np.float32,
}

_KERNELS: dict[str, object] | None = None
_MISSING: str | None = None
_EMPTY = np.empty(0, dtype=np.float64)  # "no T given" to the kernel


def available() -> bool:
    """numba is importable and the kernels compiled (once per process, lazily)."""
    return _load() is not None


def reason() -> str | None:
    """Why the kernels are not available (None when they are)."""
    _load()
    return _MISSING


def lora_blocks(
    lo: torch.Tensor, f: torch.Tensor, w: torch.Tensor, t: torch.Tensor | None, block: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per block of ``block`` elements: the float64 figures (:data:`COLUMNS`) and the int64
    counts (elements 0 and 1 ulp from the rounded ``W + L``, the largest distance, the
    largest magnitude bits of ``F``). ``lo``: flat float64; ``f``, ``w``: flat, of
    :data:`DTYPES`; ``t``: flat float64 ``T``, or None for ``F - W``. None where the kernel
    did not compile (a warning says why; the caller takes the torch way)."""
    nb = -(-lo.numel() // block)
    sums = np.empty((nb, len(COLUMNS)), dtype=np.float64)
    counts = np.empty((nb, 4), dtype=np.int64)
    fn, wn = _view(f), _view(w)
    tv = _EMPTY if t is None else t.numpy()
    done = _call("full", tv, lo.numpy(), fn, wn, sums, counts, block)
    return (sums, counts) if done else None


def sum_blocks(t: torch.Tensor, lo: torch.Tensor, block: int) -> np.ndarray | None:
    """Per block: ``tt, ll, lt, dd, sum_abs, max_abs`` of flat float64 ``t`` and ``lo`` (None
    as :func:`lora_blocks`)."""
    sums = np.empty((-(-lo.numel() // block), len(COLUMNS) - 1), dtype=np.float64)
    return sums if _call("sums", t.numpy(), lo.numpy(), sums, block) else None


def _call(name: str, *args) -> bool:
    """Run kernel ``name``; False (and the kernels off for this process) if numba could not
    compile it for these arguments: a numba release this code does not know, say."""
    global _KERNELS, _MISSING
    kernels = _load()
    assert kernels is not None, "a kernel without numba: check available() first"
    from . import numba_kernels  # imported by _load already

    try:
        kernels[name](*args)
    except numba_kernels.COMPILE_ERRORS as exc:
        _KERNELS, _MISSING = None, f"numba could not compile the {name!r} kernel ({exc})"
        warnings.warn(
            f"compare's statistics take the torch way, 2-3x slower: {_MISSING}",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def _view(x: torch.Tensor) -> np.ndarray:
    if x.dtype == torch.float32:
        return x.numpy()
    return x.view(torch.int16).numpy().view(DTYPES[x.dtype])


def _load() -> dict[str, object] | None:
    global _KERNELS, _MISSING
    if _KERNELS is None and _MISSING is None:
        try:
            from . import numba_kernels
        except ImportError as exc:  # numba is not installed (or not for this Python)
            _MISSING = f"numba is not importable ({exc})"
        except RuntimeError as exc:  # numba found no place to cache the compiled kernels
            _MISSING = f"numba cannot compile the kernels here ({exc})"
        else:
            _KERNELS = numba_kernels.KERNELS
    return _KERNELS
