"""Per-layer LoRA maths on row chunks: bitwise equal to the whole-tensor computation PEFT does.

The CPU traps these tests pin down (see ``stream_tv/lora/delta.py``):

- a product's bits depend on the shape of the call (MKL uses other kernels for a few rows or
  a remainder of rows), so chunks take aligned windows of the full product;
- ``torch.sqrt`` on float32 is not correctly rounded, the norm kernels' ``std::sqrt`` is;
- DoRA's norm over stored rows (Embedding, Conv1D) is a sequential float32 sum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stream_tv.lora import delta as D


def chunks(total: int, size: int):
    return [(s, min(s + size, total)) for s in range(0, total, size)]


def sampled_chunks(total: int, size: int, keep: int = 400):
    """The chunks of ``size`` rows that touch the first, middle or last ``keep`` rows (every
    chunk when the tensor is short): the places where windows start, clip and end."""
    mid = total // 2
    spans = [(0, keep), (mid - keep // 2, mid + keep // 2), (total - keep, total)]
    return [(s, e) for s, e in chunks(total, size) if any(s < b and e > a for a, b in spans)]


def random_cuts(total: int, cuts: list[int]):
    points = sorted({0, total, *[c % total for c in cuts]})
    return list(zip(points[:-1], points[1:], strict=True))


# ---- windows ---------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(total=st.integers(1, 5000), a=st.integers(0, 4999), n=st.integers(1, 600))
def test_window_covers_aligned_and_long_enough(total, a, n):
    start = a % total
    stop = min(total, start + n)
    lo, hi = D.window(start, stop, total)
    assert 0 <= lo <= start < stop <= hi <= total
    assert lo % D.WINDOW_ALIGN == 0
    assert hi == total or hi % D.WINDOW_ALIGN == 0
    assert hi - lo >= min(total, D.WINDOW_MIN_ROWS)


def test_window_rejects_bad_ranges():
    for bad in [(0, 0, 5), (3, 2, 5), (0, 6, 5), (-1, 2, 5)]:
        with pytest.raises(ValueError):
            D.window(*bad)


SHAPES = [  # (rows of the product, other dim, rank): remainders of 1..63 rows, K up to 256
    (64, 32, 4),
    (257, 129, 3),
    (1000, 64, 8),
    (4099, 512, 64),
    (333, 777, 32),
    (2048, 300, 256),
    (150, 4096, 16),
    (300, 48, 4),
]


@pytest.mark.parametrize(("m", "n", "r"), SHAPES)
def test_windowed_rows_equal_full_product_for_every_chunk_size(m, n, r):
    g = torch.Generator().manual_seed(m * 7 + n)
    A, B = torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)
    full = B @ A
    for size in (1, 2, 3, 7, 64, 100, m):
        for s, e in sampled_chunks(m, size):
            assert torch.equal(D.product_rows(B, A, s, e), full[s:e]), (size, s, e)


@pytest.mark.parametrize(("n", "m", "r"), SHAPES)
def test_windowed_columns_equal_full_product_for_every_chunk_size(n, m, r):
    """Conv1D / Embedding rows are columns of ``B @ A``."""
    g = torch.Generator().manual_seed(m * 5 + n)
    A, B = torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)
    full_t = (B @ A).T
    for size in (1, 2, 3, 7, 100, n):
        for s, e in sampled_chunks(n, size):
            assert torch.equal(D.product_cols_t(B, A, s, e), full_t[s:e]), (size, s, e)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 1500),
    n=st.integers(1, 300),
    r=st.sampled_from([1, 2, 4, 8, 16, 64]),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
)
@example(m=1497, n=1, r=8, cuts=[64])  # a gemv: windows alone gave 1 element other bits
@example(m=1, n=1497, r=16, cuts=[64])
def test_windowed_rows_any_chunking(m, n, r, cuts):
    g = torch.Generator().manual_seed(m + 31 * n + r)
    A, B = torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)
    full = B @ A
    got = torch.cat([D.product_rows(B, A, s, e) for s, e in random_cuts(m, cuts)])
    assert torch.equal(got, full)
    cols = torch.cat([D.product_cols_t(B, A, s, e) for s, e in random_cuts(n, cuts)])
    assert torch.equal(cols, full.T)


def test_subtle_small_products_take_another_kernel():
    """What happens without windows: 1-row products (and, with MKL, 2-3 row products and
    remainders) give other bits than the same rows of the full product. A chunk of B's rows
    alone is therefore not enough; this documents it on the CPU the tests run on."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 1000, 64, 8
    A, B = torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)
    full = B @ A
    naive = {size: torch.cat([B[s:e] @ A for s, e in chunks(m, size)]) for size in (1, 2, 3, 64)}
    diff = {size: int((x != full).sum()) for size, x in naive.items()}
    if diff[1] == 0:
        pytest.skip(f"this BLAS computes 1-row products like the full product ({diff})")
    assert diff[1] > 0
    # the differences are rounding-level: one product's last bits
    assert torch.allclose(naive[1], full, rtol=1e-5, atol=1e-6)
    # with windows, every chunk size (1 included) is exact
    for size in (1, 2, 3):
        got = torch.cat([D.product_rows(B, A, s, e) for s, e in chunks(m, size)])
        assert torch.equal(got, full)


def test_linear_conv1d_embedding_deltas():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 300, generator=g), torch.randn(272, 4, generator=g)
    s = 2.5
    full = (B @ A) * s
    assert torch.equal(D.linear_delta_rows(A, B, s, 10, 200), full[10:200])
    assert torch.equal(D.linear_delta_rows(A, B, s, 5, 290, fan_in_fan_out=True), full.T[5:290])
    assert torch.equal(D.embedding_delta_rows(A, B, s, 299, 300), full.T[299:300])


def test_conv2d_deltas_1x1_and_kxk():
    g = torch.Generator().manual_seed(4)
    s = 1.5
    A1, B1 = torch.randn(4, 8, 1, 1, generator=g), torch.randn(300, 4, 1, 1, generator=g)
    full1 = (B1.squeeze(3).squeeze(2) @ A1.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * s
    got1 = torch.cat([D.conv2d_delta_rows(A1, B1, s, a, b) for a, b in chunks(300, 7)])
    assert torch.equal(got1, full1)
    A3, B3 = torch.randn(4, 3, 3, 3, generator=g), torch.randn(8, 4, 1, 1, generator=g)
    full3 = torch.nn.functional.conv2d(A3.transpose(0, 1), B3).transpose(0, 1) * s
    cache: dict = {}
    got3 = torch.cat([D.conv2d_delta_rows(A3, B3, s, a, b, cache=cache) for a, b in chunks(8, 3)])
    assert torch.equal(got3, full3) and "conv" in cache


# ---- roundings ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_one_and_two_roundings(dtype):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 48, generator=g).to(dtype)
    d = torch.randn(64, 48, generator=g) * 1e-2
    once = D.add_rounding_once(w, d, torch.empty_like(w))
    assert torch.equal(once, (w.float() + d).to(dtype))
    twice = D.add_rounding_twice(w, d, torch.empty_like(w))
    assert torch.equal(twice, w + d.to(dtype))
    if dtype != torch.float32:
        assert not torch.equal(once, twice)  # the second rounding is visible


# ---- norms ----------------------------------------------------------------------------------


def test_exact_sqrt_is_correctly_rounded_torch_sqrt_is_not():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(200_000, generator=g) * 100
    exact = torch.from_numpy(np.sqrt(x.numpy()))  # IEEE sqrt
    assert torch.equal(D.exact_sqrt(x), exact)
    if torch.equal(torch.sqrt(x), exact):
        pytest.skip("this build's torch.sqrt is correctly rounded")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "cols"), [(300, 48), (48, 144), (1000, 64), (5, 3)])
def test_squares_accumulator_equals_peft_strided_norm(dtype, rows, cols):
    """PEFT (Embedding/Conv1D DoRA): ``linalg.norm(W.T + 1 * D.T, dim=1)`` with ``D`` a
    transposed product; here the same expression, against chunked accumulation."""
    g = torch.Generator().manual_seed(rows + cols)
    W = torch.randn(rows, cols, generator=g).to(dtype)
    A, B = torch.randn(4, rows, generator=g), torch.randn(cols, 4, generator=g)
    delta = (B @ A).T * 0.5  # (rows, cols), strided like PEFT's
    peft = torch.linalg.norm(W.T + 1 * delta.T, dim=1).to(torch.float32)
    for size in (1, 2, 3, 7, rows):
        acc = D.SquaresAccumulator(cols)
        for s, e in chunks(rows, size):
            acc.update(W[s:e] + delta[s:e], s, e, W[s:e].double() + delta[s:e].double())
        assert torch.equal(acc.norm(), peft), size
        ref = torch.linalg.vector_norm((W.double() + delta.double()), dim=0)
        assert torch.allclose(acc.norm64(), ref, rtol=1e-12)


def test_squares_accumulator_rejects_out_of_order_rows():
    acc = D.SquaresAccumulator(3)
    acc.update(torch.ones(2, 3), 0, 2)
    with pytest.raises(RuntimeError, match="in order"):
        acc.update(torch.ones(2, 3), 4, 6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_norms_per_chunk_equal_full(dtype):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(272, 48, generator=g).to(dtype)
    d = torch.randn(272, 48, generator=g) * 0.1
    full = torch.linalg.norm(W + d, dim=1).to(torch.float32)
    got = torch.cat([D.dora_row_norm(W[s:e] + d[s:e]) for s, e in chunks(272, 3)])
    assert torch.equal(got, full)
    W4 = torch.randn(16, 8, 3, 3, generator=g)
    full4 = (W4 + 0).norm(p=2, dim=(1, 2, 3), keepdim=True).reshape(-1)
    got4 = torch.cat([D.dora_row_norm(W4[s:e]) for s, e in chunks(16, 5)])
    assert torch.equal(got4, full4)


def _wide_factors(rank: int, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 factors over a wide range of magnitudes, subnormals and zeros included."""
    g = torch.Generator().manual_seed(seed)

    def one(*shape):
        x = torch.randn(*shape, generator=g) * 2.0 ** torch.randint(-140, 120, shape, generator=g)
        x[torch.rand(*shape, generator=g) < 0.05] = 0.0
        return x.float()

    return one(rank, cols), one(rows, rank)


@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.5, 4.0, 2.0**-10, 2.0**40, -2.0])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_a_power_of_two_folded_into_a_gives_the_scaled_products_bits(scaling, fan_in_fan_out):
    A, B = _wide_factors(16, 700, 300, seed=int(abs(scaling) * 7) % 1000)
    A2, B2, s2 = D.scaled_factors(A, B, scaling, torch.float64)
    assert s2 == 1.0
    A64, B64 = A.double(), B.double()
    size = 300 if fan_in_fan_out else 700
    for start, stop in [(0, size), (0, 1), (65, 283), (size - 7, size)]:
        folded = D.linear_delta_rows(A2, B2, s2, start, stop, fan_in_fan_out=fan_in_fan_out)
        scaled = D.linear_delta_rows(A64, B64, scaling, start, stop, fan_in_fan_out=fan_in_fan_out)
        assert torch.equal(folded.view(torch.int64), scaled.view(torch.int64))


@pytest.mark.parametrize(
    "scaling, dtype, wide",
    [(16 / 8**0.5, torch.float64, False), (2.0, torch.float32, False), (2.0, torch.float64, True)],
    ids=["not-a-power-of-two", "float32-product", "float64-factors"],
)
def test_the_scaling_stays_on_the_product_where_folding_could_change_a_bit(scaling, dtype, wide):
    A, B = torch.ones(2, 3), torch.ones(4, 2)
    if wide:
        A, B = A.double(), B.double()
    A2, B2, s2 = D.scaled_factors(A, B, scaling, dtype)
    assert s2 == scaling and torch.equal(A2, A.to(dtype)) and A2.dtype == B2.dtype == dtype


@pytest.mark.parametrize(
    ("start", "stop", "row_bytes"),
    [(0, 1, 4), (0, 300, 192), (5, 1500, 8192), (256, 257, 8192), (100, 5000, 1), (0, 4096, 4096)],
)
def test_row_blocks_cut_whole_windows_whose_products_have_the_full_products_bits(
    start, stop, row_bytes
):
    blocks = D.row_blocks(start, stop, row_bytes)
    assert blocks[0][0] == start and blocks[-1][1] == stop
    assert all(a < b for a, b in blocks)
    assert all(b == a2 for (_, b), (a2, _) in zip(blocks[:-1], blocks[1:], strict=True))
    rows = max(D.WINDOW_MIN_ROWS, D.BLOCK_BYTES // row_bytes // D.WINDOW_ALIGN * D.WINDOW_ALIGN)
    assert rows % D.WINDOW_ALIGN == 0
    assert all(b % rows == 0 for _, b in blocks[:-1])  # inner cuts: each block its own window
    assert all(b - a <= rows for a, b in blocks)
    g = torch.Generator().manual_seed(stop)
    B, A = torch.randn(stop, 8, generator=g), torch.randn(8, 24, generator=g)
    full = B @ A
    got = torch.cat([D.product_rows(B, A, a, b) for a, b in blocks])
    assert torch.equal(got, full[start:stop])
