"""The float32 16-bit paths (stream_tv.narrow) give the bits of the float64 reference.

The reference is what ``ops.subtract`` / ``ops.round_to`` computed before: float64, rounded
through float32 to odd. ``benchmarks/exhaustive_rounding.py`` checks every pair of 16-bit
inputs (2**32 per dtype pair); here every 16-bit ``b`` against a spread of ``f`` values.
"""

import math

import pytest
import torch

from stream_tv import ops
from stream_tv.narrow import ROW, round_from_float64, round_to_odd32, subtract_narrow
from stream_tv.stats import half_ulp

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def every_value(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def reference(f: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return round_to_odd32(f.double() - b.double()).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def spread(dtype: torch.dtype, n: int = 48, seed: int = 0) -> torch.Tensor:
    """``n`` values of ``dtype`` from every binade, the specials and the edges."""
    g = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    special = [0.0, -0.0, math.inf, -math.inf, math.nan, info.max, -info.max, info.tiny, 1.0]
    special += [info.tiny * info.eps, 2.0 ** round(math.log2(info.max)), -1.0]
    values = every_value(dtype)
    picked = values[torch.randint(0, values.numel(), (n,), generator=g)]
    return torch.cat([torch.tensor(special).to(dtype), picked])


@pytest.mark.parametrize("src", ["bf16", "fp16"])
@pytest.mark.parametrize("dst", ["bf16", "fp16"])
def test_subtract_narrow_is_the_reference_for_every_16_bit_base(src, dst):
    s, d = DTYPES[src], DTYPES[dst]
    b_all = every_value(s)
    f = spread(s)
    ff = f.repeat_interleave(b_all.numel())
    bb = b_all.repeat(f.numel())
    got = subtract_narrow(ff, bb, torch.empty(ff.numel(), dtype=d))
    assert same_bits(got, reference(ff, bb, d))
    # and with the roles swapped (the large operand second)
    got = subtract_narrow(bb, ff, torch.empty(ff.numel(), dtype=d))
    assert same_bits(got, reference(bb, ff, d))


@pytest.mark.parametrize("dst", ["bf16", "fp16"])
def test_subtract_narrow_of_float32_inputs(dst):
    d = DTYPES[dst]
    g = torch.Generator().manual_seed(1)
    n = 3 * (1 << 16) + 77  # several blocks and a tail
    scale = torch.randint(-140, 120, (n,), generator=g).to(torch.float32).exp2()
    b = torch.randn(n, generator=g) * scale
    # near-equal pairs (exact differences), far-apart pairs (inexact), and midpoints
    f = torch.where(torch.rand(n, generator=g) < 0.5, b * (1 + 2.0**-12), b * 2.0**-30)
    f[::7] = b[::7] + 2.0**-9 * b[::7].abs()
    got = subtract_narrow(f, b, torch.empty(n, dtype=d))
    assert same_bits(got, reference(f, b, d))


@pytest.mark.parametrize("dst", ["bf16", "fp16"])
def test_ops_subtract_takes_the_narrow_path_with_the_same_bits(dst):
    d = DTYPES[dst]
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(300, 257, generator=g) * 0.02).to(torch.bfloat16)
    ft = (base.float() + torch.randn(300, 257, generator=g) * 1e-4).to(torch.bfloat16)
    out = ops.subtract(ft, base, out=torch.empty(300, 257, dtype=d))
    assert same_bits(out, reference(ft, base, d))


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_round_from_float64_around_every_midpoint(name):
    dtype = DTYPES[name]
    g = torch.Generator().manual_seed(3)
    v = every_value(dtype).double()
    v = v[torch.isfinite(v)].sort().values
    mids = (v[:-1] + v[1:]) / 2  # every midpoint, exact in float64
    for scale in (0.0, 2.0**-60, 2.0**-40, 2.0**-30, 2.0**-25, 2.0**-20):
        x = mids * (1 + torch.randn(mids.numel(), generator=g, dtype=torch.float64) * scale)
        x = torch.cat([x, -x])
        assert same_bits(round_from_float64(x, dtype), round_to_odd32(x).to(dtype))
    big = torch.tensor([1e300, -1e300, 1e-300, -1e-300, math.inf, math.nan, 0.0, -0.0])
    big = big.double()
    assert same_bits(round_from_float64(big, dtype), round_to_odd32(big).to(dtype))


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_round_to_keeps_shape_and_takes_strided_and_short_inputs(name):
    dtype = DTYPES[name]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(70, 33, generator=g, dtype=torch.float64).T  # not contiguous
    got = ops.round_to(x, dtype)
    assert got.shape == x.shape
    assert same_bits(got.contiguous(), round_to_odd32(x.contiguous()).to(dtype))
    for n in (0, 1, ROW - 1, ROW, ROW + 1):
        y = torch.randn(n, generator=g, dtype=torch.float64)
        assert same_bits(ops.round_to(y, dtype), round_to_odd32(y).to(dtype))


def test_round_to_with_every_element_a_suspect():
    # fp16 values themselves: all of them have the low 12 bits of float32 zero.
    x = every_value(torch.float16).double()
    x = x[torch.isfinite(x)]
    x = torch.cat([x, x + half_ulp(x.half()) * (1 - 2.0**-40)])
    got = ops.round_to(x, torch.float16)
    assert same_bits(got, round_to_odd32(x).to(torch.float16))


def test_bf16_differences_that_round_twice_wrong_into_fp16_are_repaired():
    # 2**-25 is the midpoint between fp16's 0 and its smallest subnormal: f - b a hair above
    # or below it rounds to float32 *on* it, and then to even (0); once, it rounds away.
    bf = torch.bfloat16
    f = torch.tensor([2.0**-25, 2.0**-25, -(2.0**-25), 3 * 2.0**-25, 2.0**-20, 0.0], dtype=bf)
    b = torch.tensor([-(2.0**-60), 2.0**-60, 2.0**-60, 2.0**-70, 2.0**-60, 0.0], dtype=bf)
    twice = (f.float() - b.float()).to(torch.float16)
    assert twice[0].item() == 0.0 and twice[3].item() == 2.0**-23  # both wrong
    got = subtract_narrow(f, b, torch.empty(6, dtype=torch.float16))
    want = reference(f, b, torch.float16)
    assert same_bits(got, want)
    assert got[:4].tolist() == [2.0**-24, 0.0, -(2.0**-24), 2.0**-24]
    # and inside blocks and rows of exact zeros (unchanged weights), nothing else moves
    big_f = torch.zeros(3 * (1 << 16) + 5, dtype=bf)
    big_b = torch.zeros_like(big_f)
    big_f[1000 : 1000 + 6], big_b[1000 : 1000 + 6] = f, b
    got = subtract_narrow(big_f, big_b, torch.empty(big_f.numel(), dtype=torch.float16))
    assert same_bits(got, reference(big_f, big_b, torch.float16))


def test_small_differences_of_ordinary_weights_need_no_repair(monkeypatch):
    # A fine-tune's differences are often far below 2**-16 while its weights are not: such
    # rows are not suspects (the operands' bits say so), so they are not recomputed.
    import stream_tv.narrow as narrow

    g = torch.Generator().manual_seed(3)
    w = torch.randn(1 << 18, generator=g) * 0.02
    w = torch.where(w.abs() < 2.0**-20, 2.0**-20, w).to(torch.bfloat16)
    f = (w.float() * (1 + torch.randn(w.numel(), generator=g) * 2.0**-9)).to(torch.bfloat16)
    f[7], w[7] = 2.0**-20, 2.0**-40  # one real suspect: an operand under 2**-31
    s = (f.float() - w.float()).abs()
    assert ((s > 0) & (s < 2.0**-16)).view(-1, ROW).any(1).float().mean() > 0.5
    found = []
    real = narrow._suspects
    monkeypatch.setattr(narrow, "_suspects", lambda *a: found.append(real(*a)) or found[-1])
    got = subtract_narrow(f, w, torch.empty(w.numel(), dtype=torch.float16))
    assert same_bits(got, reference(f, w, torch.float16))
    assert found[0].tolist() == [0]  # the row of element 7 alone


@pytest.mark.parametrize("src", ["bf16", "fp16"])
@pytest.mark.parametrize("dst", ["bf16", "fp16"])
def test_an_unchanged_chunk_is_zero_and_its_nonfinite_elements_stay_nan(src, dst):
    # Equal bytes take a shortcut (no arithmetic): +0, where every element is finite. A chunk
    # holding an infinity or a NaN takes the arithmetic: inf - inf is NaN, with its bits.
    s, d = DTYPES[src], DTYPES[dst]
    n = 3 * (1 << 16) + 300  # whole blocks, a partial one, and a tail shorter than a row
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(n, generator=g) * 0.02).to(s)
    base[:5] = torch.tensor([-0.0, 0.0, 1.0, -1.0, 2.0])
    got = subtract_narrow(base.clone(), base, torch.full((n,), 7.0, dtype=d))
    assert not got.any() and not got.signbit().any()  # +0 everywhere, -0.0 - -0.0 included
    base[(1 << 16) + 9], base[2 * (1 << 16) + 3] = math.inf, math.nan
    got = subtract_narrow(base.clone(), base, torch.empty(n, dtype=d))
    assert same_bits(got, reference(base, base, d))
    assert got[(1 << 16) + 9].isnan() and got[2 * (1 << 16) + 3].isnan()
    assert torch.count_nonzero(got.nan_to_num(1.0)) == 2
