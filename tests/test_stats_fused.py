"""The numba kernels (stream_tv.stats.fused) element by element, against the torch path's own
functions: every 16-bit pattern decoded, the correct rounding of W + L at every kind of
value (midpoints, subnormals, overflow, NaN), and the ulp distance of random pairs."""

import math

import numpy as np
import pytest
import torch

from stream_tv.floats import ulp_distance
from stream_tv.ops import round_to
from stream_tv.stats import fused

pytest.importorskip("numba")

F64 = torch.float64
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def per_element(lo, f, w):
    """The kernel's figures with one element per block."""
    sums, counts = fused.lora_blocks(lo, f, w, None, 1)
    return {name: sums[:, i] for i, name in enumerate(fused.COLUMNS)}, counts


def all_patterns(dtype):
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a, b, equal_nan=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern_decodes_exactly(dtype):
    w = all_patterns(dtype)
    zero = torch.zeros_like(w)
    figs, counts = per_element(torch.zeros(w.numel(), dtype=F64), zero, w)
    # F = 0, L = 0: T = -W, so |L - T| = |W| and T^2 = W^2, each element on its own
    assert same(figs["max_abs"], w.to(F64).abs().numpy())
    assert same(figs["tt"], (w.to(F64) ** 2).numpy())
    # and F's largest magnitude bits (the rounding bound's input) of every pattern
    _, counts = per_element(torch.zeros(w.numel(), dtype=F64), w, zero)
    assert same(counts[:, 3], (w.view(torch.int16).to(torch.int64) & 0x7FFF).numpy())


def rounding_cases(dtype) -> torch.Tensor:
    """float64 values at every hard place for rounding to ``dtype``."""
    g = torch.Generator().manual_seed(0)
    info = torch.finfo(dtype)
    grid = torch.randn(4000, generator=g, dtype=F64) * torch.exp2(
        torch.randint(-160, 130, (4000,), generator=g).to(F64)
    )
    grid = grid.clamp(-3 * info.max, 3 * info.max)
    values = grid.to(dtype).to(F64)  # representable values of the dtype ...
    up = torch.nextafter(values.to(dtype), torch.tensor(math.inf, dtype=dtype)).to(F64)
    mid = (values + up) / 2  # ... their midpoints (exact in float64), and either side
    eps = torch.nextafter(mid, torch.tensor(math.inf, dtype=F64)) - mid
    special = [0.0, -0.0, math.inf, -math.inf, math.nan, info.max, -info.max, info.tiny]
    special += [info.tiny * info.eps / 2, info.tiny * info.eps * 0.75, 1 + 2**-8 + 2**-30]
    big = float(info.max) * (1 + info.eps / 2)  # the overflow threshold: rounds to inf
    special += [big, -big, float(torch.nextafter(torch.tensor(big), torch.tensor(0.0)))]
    return torch.cat([grid, values, mid, mid + eps, mid - eps, torch.tensor(special, dtype=F64)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_is_round_to(dtype):
    x = rounding_cases(dtype)
    w = torch.zeros(x.numel(), dtype=dtype)  # W = 0: W + L is L itself
    reference = round_to(x, dtype)  # the torch path's correct rounding
    figs, counts = per_element(x, reference, w)
    assert (counts[:, 0] == 1).all(), x[torch.from_numpy(counts[:, 0] != 1)][:10]
    error = reference.to(F64) - x
    assert same(figs["ee"], (error * error).numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_ulp_distances_are_ulp_distance(dtype):
    g = torch.Generator().manual_seed(1)
    n = 20000
    bits = torch.finfo(dtype).bits
    kind = torch.int16 if bits == 16 else torch.int32
    span = 2 ** (bits - 1)
    raw = torch.randint(-span, span, (2, n), generator=g, dtype=torch.int64).to(kind)
    f = raw[0].view(dtype)
    near = torch.nextafter(f, torch.tensor(math.inf, dtype=dtype))  # distance 1 (or NaN)
    x = torch.where(torch.arange(n) % 2 == 0, raw[1].view(dtype), near).to(F64)
    w = torch.zeros(n, dtype=dtype)
    _, counts = per_element(x, f, w)
    d = ulp_distance(f, round_to(x, dtype))
    assert same(counts[:, 0], (d == 0).numpy().astype(np.int64))
    assert same(counts[:, 1], (d == 1).numpy().astype(np.int64))
    assert same(counts[:, 2], d.numpy())


def test_without_numba_the_torch_path_is_taken(monkeypatch):
    from stream_tv.stats import cpu

    monkeypatch.setattr(fused, "_KERNELS", None)
    monkeypatch.setattr(fused, "_MISSING", "numba is not importable (test)")
    assert not fused.available() and "numba" in fused.reason()
    lo = torch.full((8,), 0.5, dtype=F64)
    f = torch.ones(8, dtype=torch.bfloat16)
    figures = cpu.lora_figures(None, lo, f, torch.full((8,), 0.5, dtype=torch.bfloat16), None)
    assert figures["_ulp0"] == 8 and figures["_max_abs"] == 0.0


@pytest.mark.parametrize("f_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("given_t", [False, True])
def test_every_dtype_pair_gives_the_torch_figures(monkeypatch, f_dtype, w_dtype, given_t):
    # every signature the dispatch can compile (a finetuned model in one dtype over a base
    # in another), against the torch blocks of the same function
    from stream_tv.stats import cpu

    g = torch.Generator().manual_seed(2)
    n = 3 * cpu.BLOCK // 2  # a full block and a partial one
    w = (torch.randn(n, generator=g) * 0.05).to(w_dtype)
    lo = torch.randn(n, generator=g, dtype=F64) * 1e-3
    f = round_to(w.to(F64) + lo, f_dtype)
    f[::13] = w[::13].to(f_dtype)
    t = f.to(F64) - w.to(F64) if given_t else None
    fast = cpu.lora_figures(t, lo, f, w, None)
    monkeypatch.setattr(cpu, "FUSED", False)
    slow = cpu.lora_figures(t, lo, f, w, None)
    assert fast.keys() == slow.keys()
    for key, value in slow.items():
        if isinstance(value, list):  # a scaled sum [value, exponent]
            assert fast[key][1] == value[1] and math.isclose(fast[key][0], value[0], rel_tol=1e-12)
        elif key == "_sum_abs":  # a plain sum: float64 rounding apart
            assert math.isclose(fast[key], value, rel_tol=1e-12)
        else:  # counts, maxima, flags: the same number
            assert fast[key] == value, key


def test_a_kernel_that_does_not_compile_falls_back_with_a_warning(monkeypatch):
    from numba.core.errors import TypingError

    from stream_tv.stats import cpu

    def broken(*args):
        raise TypingError("this numba cannot type it")

    kernels = dict(fused._load())
    kernels["full"] = broken
    monkeypatch.setattr(fused, "_KERNELS", kernels)
    monkeypatch.setattr(fused, "_MISSING", None)  # both restored after the test
    lo = torch.full((8,), 0.5, dtype=F64)
    f, w = torch.ones(8, dtype=torch.bfloat16), torch.full((8,), 0.5, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="torch way.*could not compile the 'full' kernel"):
        figures = cpu.lora_figures(None, lo, f, w, None)
    assert figures["_ulp0"] == 8 and figures["_max_abs"] == 0.0  # the torch way's figures
    assert not fused.available() and "this numba cannot type it" in fused.reason()
