"""stream_tv.floats: ulp distances, exhaustively for 16-bit floats, against float64 ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stream_tv.errors import InputError
from stream_tv.floats import ULP_UNBOUNDED, ordered, ulp_counts, ulp_distance

SIXTEEN = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def every_value(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 bit patterns of a 16-bit float dtype."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def rank_reference(x: torch.Tensor, universe: torch.Tensor) -> np.ndarray:
    """Rank of each value of ``x`` among the distinct non-NaN values of ``universe``,
    computed in float64 by sorting (the two zeros are one value: -0.0 == 0.0)."""
    values = universe.to(torch.float64).numpy()
    distinct = np.unique(values[~np.isnan(values)])
    return np.searchsorted(distinct, x.to(torch.float64).numpy())


@pytest.mark.parametrize("name", sorted(SIXTEEN))
def test_ulp_distance_of_every_16_bit_value(name):
    """Every bf16 / fp16 bit pattern against several partners: a random permutation, the
    patterns reversed, the next pattern, and zero / +-inf / +-max; NaNs by their rule."""
    dtype = SIXTEEN[name]
    a = every_value(dtype)
    finfo = torch.finfo(dtype)
    g = torch.Generator().manual_seed(0)
    partners = [
        a[torch.randperm(a.numel(), generator=g)],
        a.flip(0),
        a.roll(1),
        *(
            torch.full_like(a, v)
            for v in (0.0, -0.0, math.inf, -math.inf, finfo.max, -finfo.max, finfo.tiny)
        ),
    ]
    nan_a = torch.isnan(a)
    for b in partners:
        got = ulp_distance(a, b)
        assert got.dtype == torch.int64
        nan_b = torch.isnan(b)
        both = ~nan_a & ~nan_b
        want = np.abs(rank_reference(a[both], a) - rank_reference(b[both], a))
        assert np.array_equal(got[both].numpy(), want)
        assert torch.all(got[nan_a & nan_b] == 0)
        assert torch.all(got[nan_a ^ nan_b] == ULP_UNBOUNDED)
        assert torch.equal(got, ulp_distance(b, a))  # symmetric


@pytest.mark.parametrize("name", sorted(SIXTEEN))
def test_ordered_is_the_rank_among_all_values(name):
    dtype = SIXTEEN[name]
    a = every_value(dtype)
    finite = ~torch.isnan(a)
    zero_rank = rank_reference(torch.zeros(1, dtype=dtype), a)[0]
    want = rank_reference(a[finite], a) - zero_rank
    assert np.array_equal(ordered(a)[finite].numpy(), want)


@pytest.mark.parametrize(
    ("dtype", "np_dtype"), [(torch.float32, np.float32), (torch.float64, np.float64)]
)
def test_ulp_distance_counts_nextafter_steps(dtype, np_dtype):
    """Wider floats, sampled: k steps of numpy's nextafter are k ulps, across zero too."""
    rng = np.random.default_rng(1)
    start = (rng.standard_normal(2000) * 10.0 ** rng.integers(-40, 38, 2000)).astype(np_dtype)
    start = np.concatenate([start, np.array([0.0, -0.0], dtype=np_dtype)])
    for k, direction in ((1, np.inf), (7, -np.inf), (300, np.inf)):
        x = start.copy()
        for _ in range(k):
            x = np.nextafter(x, np.array(direction, dtype=np_dtype))
        got = ulp_distance(torch.from_numpy(start), torch.from_numpy(x))
        # nextafter steps over the zeros as one value too: nextafter(tiny, -inf) is 0.0 and
        # nextafter(0.0, -inf) is -tiny, never -0.0.
        assert np.array_equal(got.numpy(), np.full(start.shape, k))
    tiny = np.array([np.finfo(np_dtype).smallest_subnormal], dtype=np_dtype)
    assert ulp_distance(torch.from_numpy(-tiny), torch.from_numpy(tiny)).tolist() == [2]


def test_fp64_distances_saturate_instead_of_wrapping():
    big = torch.tensor([1e308, -1e308, 1.0], dtype=torch.float64)
    d = ulp_distance(big, -big)
    assert d[0] == d[1] == ULP_UNBOUNDED
    assert d[2] == 2 * ordered(torch.tensor([1.0], dtype=torch.float64))[0]


def test_ulp_distance_refuses_mixed_or_unsupported_dtypes():
    with pytest.raises(InputError, match="one dtype and one shape"):
        ulp_distance(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(InputError, match="no ulp distance for torch.float8_e4m3fn"):
        ordered(torch.zeros(2, dtype=torch.float8_e4m3fn))


def _counts_reference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int]:
    d = ulp_distance(a, b)
    return int((d == 0).sum()), int((d == 1).sum()), int(d.max())


@pytest.mark.parametrize("name", sorted(SIXTEEN))
@pytest.mark.parametrize("changed", [0, 1, 3, 15, 40, 300, 5000])
@pytest.mark.parametrize("n", [256 * 64, 256 * 64 + 77, 100])
def test_ulp_counts_takes_every_path_to_the_reference_figures(name, changed, n):
    """ulp_counts of 16-bit CPU tensors (no difference, a few rows in numpy, many rows
    gathered, mostly different, a tail past the last whole row) against ulp_distance's own
    reductions, with NaNs, infinities and both zeros among the changed elements."""
    dtype = SIXTEEN[name]
    g = torch.Generator().manual_seed(changed * 7 + n)
    a = (torch.randn(n, generator=g) * 3).to(dtype)
    b = a.clone()
    where = torch.randperm(n, generator=g)[: min(changed, n)]
    steps = torch.randint(-3, 4, (where.numel(),), generator=g, dtype=torch.int16)
    b.view(torch.int16)[where] += steps
    specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0], dtype=dtype)
    if where.numel() >= 10:  # NaN and infinities against numbers, NaN against NaN, +-0
        a[where[:5]] = specials
        b[where[5:10]] = specials
        b[where[0]] = math.nan
    if where.numel() >= 1:
        b[where[-1]] = -b[where[-1]]  # across zero
    assert tuple(int(v) for v in ulp_counts(a, b)) == _counts_reference(a, b)
    assert tuple(int(v) for v in ulp_counts(a, a.clone())) == (n, 0, 0)
