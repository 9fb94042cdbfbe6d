"""TIES, DARE, breadcrumbs and DELLA (stream_tv.merging) against references.

- The radix select against stable sorts and ``torch.topk`` (exhaustive on small tensors
  full of ties, and hypothesis);
- the random bits against a pure-Python model of the hash; exact l1 sums against
  ``fractions.Fraction``;
- every method against an independent whole-tensor float64 implementation of mergekit
  0.1.5's formulas (always runs);
- against mergekit 0.1.5 itself, calling its own per-tensor merge on the same tensors
  (``benchmarks/merge_methods/mergekit_tensors.py``), when mergekit is importable or
  ``STREAM_TV_MERGEKIT_PYTHON`` names a python that has it: deterministic methods bit for
  bit against mergekit's float64 arithmetic and within 4 ulps of its float32 arithmetic,
  DARE/DELLA statistically; and end to end against ``mergekit-yaml`` on tiny real models;
- the same bytes for any chunking (1 row, 7 rows, whole tensor) and rerun.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from stream_tv import merging as M
from stream_tv.errors import InputError
from stream_tv.ops import round_to

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT_TENSORS = ROOT / "benchmarks" / "merge_methods" / "mergekit_tensors.py"

ALL_METHODS = list(M.METHODS)
DETERMINISTIC = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]
RANDOMIZED = ["dare_ties", "dare_linear", "della", "della_linear"]
SHAPES = {
    "m": (64, 96),
    "v": (300,),
    "t": (7, 5, 3),
    "r": (1, 50),
    "s": (),
}


# ---- helpers ------------------------------------------------------------------------------------


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Float bits as integers ordered like the floats (so a difference counts ulps)."""
    bits = 8 * x.dtype.itemsize
    i = x.view({16: torch.int16, 32: torch.int32, 64: torch.int64}[bits]).to(torch.int64)
    return torch.where(i < 0, -(i & ((1 << (bits - 1)) - 1)), i)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.dtype == b.dtype and a.shape == b.shape
    return (_ordered(a.reshape(-1)) - _ordered(b.reshape(-1))).abs()


def models(dtype: torch.dtype, seed: int = 0, inputs: int = 3, shapes=SHAPES, spread=0.1):
    """A base, ``inputs`` fine-tunes and their task vectors as ``extract`` makes them
    (float32 for 16-bit models, the models' dtype otherwise)."""
    g = torch.Generator().manual_seed(seed)
    base = {
        k: (0.02 * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)
        for k, s in shapes.items()
    }
    fts = [
        {
            k: (
                b.double() + 0.02 * spread * torch.randn(b.shape, generator=g, dtype=torch.float64)
            ).to(dtype)
            for k, b in base.items()
        }
        for _ in range(inputs)
    ]
    tv = torch.float32 if dtype.itemsize == 2 else dtype
    taus = [{k: f[k].to(tv) - base[k].to(tv) for k in base} for f in fts]
    return base, fts, taus


def ours(spec, base, taus, *, out_dtype=None, rows_per_chunk=None):
    return {
        k: M.merge_tensor(
            spec,
            k,
            base[k],
            [t[k] for t in taus],
            out_dtype=out_dtype,
            rows_per_chunk=rows_per_chunk,
        )
        for k in base
    }


def _exact_abs_sum(t: torch.Tensor) -> float:
    return float(sum((Fraction(v) for v in t.double().abs().reshape(-1).tolist()), Fraction(0)))


def reference_deltas(spec: M.MergeSpec, name: str, base: torch.Tensor, taus) -> torch.Tensor:
    """The weighted sparsified task vectors ``w_i * d_i`` of mergekit 0.1.5's generalized
    task arithmetic, on whole tensors in float64, written from its formulas (not from
    stream_tv's code), with equal magnitudes ranked by index and stream_tv's random bits
    as DARE/DELLA masks; stacked, one row per input."""
    n = base.numel()
    deltas = []
    for i, tau in enumerate(taus):
        t = torch.zeros(n, dtype=torch.float64) if tau is None else tau.double().reshape(-1)
        d, sp = spec.densities[i], spec.method.sparsification
        if sp is None or d >= 1 or tau is None or n == 0:
            deltas.append(t)
            continue
        mag = t.abs()
        desc = torch.sort(mag, descending=True, stable=True).indices  # ties: lower index first
        mask = torch.zeros(n, dtype=torch.float64)
        if sp == M.MAGNITUDE:
            mask[desc[: max(1, int(d * n))]] = 1
        elif sp == M.OUTLIERS:
            target, n_top = int(d * n), int(spec.gammas[i] * n)
            n_bot = max(0, n - target - n_top)
            mask[desc.flip(0)[n_bot : n_bot + target]] = 1
        else:
            bits = M.random_bits(M.stream_key(spec.seed, name, i), torch.arange(n)).double()
            if sp == M.RANDOM:
                mask = (bits < round(d * 2**32)).double()
            else:
                rows = mag.reshape(1, -1) if base.dim() <= 1 else mag.reshape(base.shape)
                L = rows.shape[1]
                # rank along dim 1 = smaller magnitudes + equal ones at a lower index
                a = rows.unsqueeze(2)
                b = rows.unsqueeze(1)
                shape = [1] * (rows.dim() + 1)
                shape[1], shape[2] = L, L
                idx = torch.arange(L)
                lower = (idx.reshape(1, L, 1) > idx.reshape(1, 1, L)).reshape(shape)
                rank = ((b < a) | ((b == a) & lower)).sum(2).double().reshape(-1)
                eps = spec.epsilons[i]
                p = d - eps + rank / (L - 1) * (2 * eps) if L > 1 else torch.full((n,), d)
                mask = (bits < p * 2**32).double()
        masked = t * mask
        if spec.rescale == "l1":
            before, after = _exact_abs_sum(t), _exact_abs_sum(masked)
            if before >= 1e-7 and after >= 1e-7:
                masked = masked * (before / after)
        elif spec.rescale == "density":
            masked = masked * (1 / d)
        deltas.append(masked)
    w = torch.tensor(spec.weights, dtype=torch.float64).reshape(-1, 1)
    return torch.stack(deltas) * w


def reference_merge(spec: M.MergeSpec, name: str, base: torch.Tensor, taus, out_dtype):
    """mergekit's merge of the :func:`reference_deltas`, in float64, rounded once."""
    flat_base = base.double().reshape(-1)
    deltas = reference_deltas(spec, name, base, taus)
    w = torch.tensor(spec.weights, dtype=torch.float64).reshape(-1, 1)
    if spec.method.consensus:
        majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
        agree = deltas.sign() == majority
        mixed = (deltas * agree).sum(0)
        div = (w * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed = deltas.sum(0)
        div = w.sum()
        div = torch.ones(()) if div.abs() < 1e-8 else div
    if spec.normalize:
        mixed = mixed / div
    if spec.lam != 1:
        mixed = mixed * spec.lam
    return round_to(flat_base + mixed, out_dtype).reshape(base.shape)


# ---- radix select -------------------------------------------------------------------------------


def _reference_top(x: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(x.double().abs().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


def _all_top_masks(x: torch.Tensor, rows_per_chunk: int) -> list[torch.Tensor]:
    """Every top-k mask (k = 0..n) of ``x`` from one RadixSelect with all targets."""
    n = x.numel()
    chunks = [x[a : a + rows_per_chunk] for a in range(0, x.shape[0], rows_per_chunk)]
    targets = list(range(1, n))
    found = {}
    if targets:
        rs = M.RadixSelect(x.dtype, n, targets)
        for _ in range(rs.passes):
            for c in reversed(chunks):  # histogram passes do not care about chunk order
                rs.update(c)
            rs.end_pass()
        found = {t.m: t for t in rs.thresholds}
    masks = []
    for k in range(n + 1):
        top = M.TopSet(found.get(k), k)
        masks.append(
            torch.cat([top.mask(M.magnitude_key(c.reshape(-1))) for c in chunks]).reshape(x.shape)
        )
    return masks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 5, 17, 40])
def test_radix_top_k_equals_stable_sort_for_every_k(dtype, n):
    g = torch.Generator().manual_seed(n)
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-3, 3e4, -3e4], dtype=torch.float64)
    x = pool[torch.randint(len(pool), (n,), generator=g)].to(dtype)  # mostly ties
    for rows in (1, 3, n):
        masks = _all_top_masks(x, rows)
        for k in range(n + 1):
            assert torch.equal(masks[k], _reference_top(x, k)), (k, rows)
            kept = torch.sort(x.double().abs()[masks[k]], descending=True).values
            assert torch.equal(kept, torch.topk(x.double().abs(), k).values)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(width=32, allow_nan=False),
            st.sampled_from([0.0, -0.0, 1.5, -1.5, 1e-40, -1e-40]),  # ties, subnormals
        ),
        min_size=1,
        max_size=60,
    ),
    data=st.data(),
)
def test_radix_top_k_hypothesis(values, data):
    x = torch.tensor(values, dtype=torch.float32)
    n = x.numel()
    k = data.draw(st.integers(0, n))
    rows = data.draw(st.integers(1, n))
    assert torch.equal(M.top_k_mask(x, k, rows_per_chunk=rows), _reference_top(x, k))


def test_radix_top_k_of_a_2d_tensor_with_many_ties():
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(-20, 20, (300, 70), generator=g).float() / 8).to(torch.bfloat16)
    for k in (1, 7, 1000, 20999, 21000):
        assert torch.equal(M.top_k_mask(x, k, rows_per_chunk=7), _reference_top(x, k))


def test_threshold_reports_the_tied_elements_to_keep():
    x = torch.tensor([3.0, -5.0, 3.0, 1.0, 3.0, -3.0])
    rs = M.RadixSelect(x.dtype, 6, [3])
    for _ in range(rs.passes):
        rs.update(x)
        rs.end_pass()
    (t,) = rs.thresholds
    assert (t.key, t.keep, t.ties) == (int(M.magnitude_key(torch.tensor(3.0))), 2, 4)


def test_nan_ranks_above_infinity():
    x = torch.tensor([1.0, float("inf"), float("nan"), 2.0])
    assert M.top_k_mask(x, 1).tolist() == [False, False, True, False]
    assert M.top_k_mask(x, 2).tolist() == [False, True, True, False]


# ---- random bits, exact sums ----------------------------------------------------------------------


def _py_mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_random_bits_equal_a_pure_python_model_of_the_hash():
    key = M.stream_key(7, "model.layers.0.mlp.up_proj.weight", 2)
    index = [0, 1, 2, 12345, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 17, 2**50 - 3]
    expect = [
        _py_mix32(_py_mix32(_py_mix32((i & 0xFFFFFFFF) ^ key[0]) ^ (i >> 32) ^ key[1]) ^ key[2])
        for i in index
    ]
    assert M.random_bits(key, torch.tensor(index)).tolist() == expect


def test_random_keep_fraction_and_independence():
    n = 1 << 20
    index = torch.arange(n)
    a = M.random_bits(M.stream_key(0, "w", 0), index) < M.keep_threshold(0.3)
    b = M.random_bits(M.stream_key(0, "w", 1), index) < M.keep_threshold(0.3)
    c = M.random_bits(M.stream_key(1, "w", 0), index) < M.keep_threshold(0.3)
    sigma = math.sqrt(0.3 * 0.7 / n)
    for m in (a, b, c):
        assert abs(m.double().mean().item() - 0.3) < 5 * sigma
    for x, y in ((a, b), (a, c), (a[1:], a[:-1])):  # inputs, seeds, neighbours
        r = torch.corrcoef(torch.stack([x.double(), y.double()]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(n)
    assert M.stream_key(0, "w", 0) != M.stream_key(0, "w2", 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_exact_abs_sum_is_exact_and_independent_of_chunking(dtype):
    g = torch.Generator().manual_seed(1)
    fi = torch.finfo(dtype)
    lo, hi = math.log2(fi.smallest_normal) - 8, math.log2(fi.max) - 16  # subnormals to huge
    x = torch.randn(5000, generator=g, dtype=torch.float64).clamp(-4, 4) * torch.exp2(
        torch.randint(int(lo), int(hi), (5000,), generator=g).double()
    )
    x[:7] = torch.tensor(
        [fi.smallest_normal / 4, -fi.smallest_normal / 8, 0.0, -0.0, fi.max / 2**15, 1.0, 1.0],
        dtype=torch.float64,
    )
    x = x.to(dtype)
    exact = _exact_abs_sum(x)
    for step in (1, 77, 5000):
        s = M.ExactAbsSum()
        for a in range(0, 5000, step):
            s.add(x[a : a + step])
        assert s.value() == exact
    s = M.ExactAbsSum()
    s.add(torch.tensor([1.0, float("inf")]))
    assert s.value() == math.inf
    s.add(torch.tensor([float("nan")]))
    assert math.isnan(s.value())


# ---- parameters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, n, kwargs, message",
    [
        ("tie", 2, {}, "unknown merge method 'tie'"),
        ("ties", 0, {}, "no inputs"),
        ("ties", 2, {"density": 0.0}, "density 0.0 of input 1 is outside (0, 1]"),
        ("ties", 2, {"density": [0.5, 1.5]}, "density 1.5 of input 2 is outside (0, 1]"),
        ("dare_ties", 2, {"density": -0.1}, "outside (0, 1]"),
        ("ties", 2, {"weights": [1.0, 2.0, 3.0]}, "3 weights for 2 inputs"),
        ("ties", 2, {"density": [0.5]}, "1 densities for 2 inputs"),
        ("ties", 2, {"weights": [1.0, float("nan")]}, "weight nan of input 2 is not finite"),
        ("task_arithmetic", 2, {"density": 0.5}, "task_arithmetic has no density parameter"),
        ("ties", 2, {"gamma": 0.1}, "ties has no gamma parameter"),
        ("ties", 2, {"epsilon": 0.1}, "ties has no epsilon parameter"),
        ("task_arithmetic", 2, {"rescale": True}, "no rescale parameter"),
        (
            "breadcrumbs",
            2,
            {"density": 0.5, "gamma": 1.0},
            "gamma 1.0 of input 1 is outside [0, 1)",
        ),
        ("della", 2, {"density": 0.5, "epsilon": 0.5}, "density +/- epsilon outside (0, 1)"),
        ("della", 2, {"density": 0.9}, "epsilon 0.15 with density 0.9"),
        ("della", 2, {"density": 0.5, "epsilon": -0.1}, "outside (0, 1)"),
        ("ties", 2, {"rescale": "l2"}, "unknown rescale 'l2'"),
        ("ties", 2, {"lam": float("inf")}, "lambda inf is not finite"),
        ("dare_ties", 2, {"seed": -1}, "seed -1"),
    ],
)
def test_bad_parameters_are_one_clear_message(method, n, kwargs, message):
    with pytest.raises(InputError) as e:
        M.merge_spec(method, n, **kwargs)
    assert message in str(e.value)
    if "outside" in message or "weights for" in message:
        assert e.value.hint


def test_defaults_follow_mergekit():
    s = M.merge_spec("ties", 2)
    assert (s.weights, s.densities, s.lam, s.normalize, s.rescale) == (
        (1.0, 1.0),
        (1.0, 1.0),
        1.0,
        True,
        None,
    )
    assert M.merge_spec("dare_linear", 1).rescale == "l1"
    assert M.merge_spec("della", 1, density=0.5).epsilons == (0.15,)
    assert M.merge_spec("breadcrumbs", 1, density=0.5).gammas == (0.01,)
    assert M.merge_spec("dare_ties", 1, density=0.5, rescale="density").rescale == "density"
    assert M.merge_spec("della", 1, density=1.0, epsilon=0.5).epsilons == (0.5,)  # identity


def test_merger_refuses_chunks_out_of_order_and_wrong_dtypes():
    spec = M.merge_spec("ties", 1, density=0.5)
    m = M.TensorMerger(spec, "w", (4, 2), [torch.float32], torch.float32)
    tau = torch.ones(4, 2)
    m.feed(0, 0, 2, [tau[:2]])
    with pytest.raises(RuntimeError, match="out of order"):
        m.feed(0, 3, 4, [tau[3:]])
    with pytest.raises(RuntimeError, match="planned torch.float32"):
        m.feed(0, 2, 4, [tau[2:].double()])
    with pytest.raises(InputError, match="cannot merge torch.int64"):
        M.TensorMerger(spec, "w", (4,), [torch.int64], torch.float32)
    with pytest.raises(InputError, match="2 task vectors for a merge of 1"):
        M.TensorMerger(spec, "w", (4,), [torch.float32, None], torch.float32)


def test_passes_per_method_and_dtype():
    def kinds(method, dtypes, **kw):
        spec = M.merge_spec(method, len(dtypes), **kw)
        return M.TensorMerger(spec, "w", (10, 10), dtypes, torch.bfloat16).pass_kinds

    f32, bf16 = torch.float32, torch.bfloat16
    assert kinds("task_arithmetic", [f32, f32]) == ("merge",)
    assert kinds("ties", [f32, f32]) == ("merge",)  # density 1: no selection
    assert kinds("ties", [f32, bf16], density=0.5) == ("select", "select", "merge")
    assert kinds("ties", [bf16, None], density=0.5) == ("select", "merge")
    assert kinds("ties", [f32], density=0.5, rescale=True) == ("select", "select", "norms", "merge")
    assert kinds("breadcrumbs", [torch.float64], density=0.5) == ("select",) * 4 + ("merge",)
    assert kinds("dare_ties", [f32, f32], density=0.5) == ("norms", "merge")
    assert kinds("dare_ties", [f32], density=0.5, rescale="density") == ("merge",)
    assert kinds("della", [f32], density=0.5) == ("norms", "merge")
    spec = M.merge_spec("della", 1, density=0.5)
    assert M.TensorMerger(spec, "b", (300,), [f32], f32).min_rows == 300  # one row: whole


# ---- against an independent float64 implementation ------------------------------------------------

CONFIGS = [
    ("task_arithmetic", {"weights": [1.0, 0.5, -0.7]}),
    ("task_arithmetic", {"weights": [0.3, 0.3, 0.4], "normalize": True, "lam": 0.8}),
    ("task_arithmetic", {"weights": [0.5, -0.5, 0.0], "normalize": True}),  # weight sum 0 -> 1
    ("ties", {"weights": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9]}),
    (
        "ties",
        {
            "weights": [1.0, -0.5, 0.7],
            "density": 0.2,
            "lam": 1.3,
            "normalize": False,
            "rescale": True,
        },
    ),
    ("breadcrumbs", {"weights": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9], "gamma": 0.05}),
    ("breadcrumbs_ties", {"weights": [1.0, 0.5, 0.7], "density": 0.6, "gamma": [0.0, 0.1, 0.5]}),
    ("dare_ties", {"weights": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9], "seed": 3}),
    ("dare_linear", {"weights": [1.0, 0.5, 0.7], "density": 0.4, "normalize": True}),
    ("dare_linear", {"weights": [1.0, 0.5, 0.7], "density": 0.4, "rescale": "density"}),
    ("della", {"weights": [1.0, 0.5, 0.7], "density": 0.5, "epsilon": 0.2}),
    (
        "della_linear",
        {"weights": [1.0, 0.5, 0.7], "density": [0.3, 0.5, 0.7], "epsilon": 0.1, "lam": 2.0},
    ),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    "method, kwargs", CONFIGS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CONFIGS)]
)
def test_equals_a_float64_whole_tensor_reference(method, kwargs, dtype):
    base, _, taus = models(dtype, seed=1)
    taus[1]["m"] = None  # an input without this tensor: a zero task vector
    spec = M.merge_spec(method, 3, **kwargs)
    got = ours(spec, base, taus, rows_per_chunk=7)
    for k in base:
        want = reference_merge(spec, k, base[k], [t[k] for t in taus], dtype)
        assert same_bytes(got[k], want), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "method, kwargs", CONFIGS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CONFIGS)]
)
def test_16_bit_task_vectors_equal_the_reference(method, kwargs, dtype):
    # ``extract --dtype bfloat16`` task vectors: 16-bit magnitude keys, one select pass
    base, _, taus = models(dtype, seed=5)
    taus = [{k: v.to(dtype) for k, v in t.items()} for t in taus]
    spec = M.merge_spec(method, 3, **kwargs)
    got = ours(spec, base, taus, rows_per_chunk=7)
    for k in base:
        want = reference_merge(spec, k, base[k], [t[k] for t in taus], dtype)
        assert same_bytes(got[k], want), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_the_inputs_are_left_as_they_were(dtype):
    # the merge works in place on its own float64 copies; a float64 input is no copy of its own
    base, _, taus = models(dtype, seed=4)
    before = (
        {k: v.clone() for k, v in base.items()},
        [{k: v.clone() for k, v in t.items()} for t in taus],
    )
    for method, kwargs in CONFIGS:
        ours(M.merge_spec(method, 3, **kwargs), base, taus, rows_per_chunk=5)
        assert all(torch.equal(base[k], before[0][k]) for k in base), method
        for t, t0 in zip(taus, before[1], strict=True):
            assert all(torch.equal(t[k], t0[k]) for k in t), method


def test_inputs_with_ties_at_the_threshold_keep_the_lowest_index():
    spec = M.merge_spec("ties", 1, density=0.5)
    tau = torch.tensor([1.0, 2.0, -2.0, 2.0, 0.5, -2.0])  # k = 3 of four tied 2.0s
    got = M.merge_tensor(spec, "w", torch.zeros(6), [tau])
    assert got.tolist() == [0.0, 2.0, -2.0, 2.0, 0.0, 0.0]


def test_absent_input_equals_a_zero_task_vector():
    base, _, taus = models(torch.bfloat16)
    for method, kwargs in CONFIGS:
        spec = M.merge_spec(method, 3, **kwargs)
        zeros = [dict(t) for t in taus]
        zeros[2] = {k: torch.zeros_like(v) for k, v in taus[2].items()}
        absent = [taus[0], taus[1], dict.fromkeys(taus[2])]
        a, b = ours(spec, base, zeros), ours(spec, base, absent)
        assert all(torch.equal(a[k], b[k]) for k in base), method


# ---- chunking, reruns, devices --------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
def test_same_bytes_for_any_chunking_and_rerun(method):
    base, _, taus = models(torch.bfloat16, seed=2)
    kwargs = dict(CONFIGS[[m for m, _ in CONFIGS].index(method)][1])
    spec = M.merge_spec(method, 3, **kwargs)
    whole = ours(spec, base, taus)
    for rows in (1, 7):
        again = ours(spec, base, taus, rows_per_chunk=rows)
        for k in base:
            assert same_bytes(whole[k], again[k]), (k, rows)
    rerun = ours(spec, base, taus, rows_per_chunk=7)
    assert all(torch.equal(whole[k], rerun[k]) for k in base)
    if method in RANDOMIZED:
        other = ours(M.merge_spec(method, 3, **{**kwargs, "seed": 99}), base, taus)
        assert not torch.equal(other["m"], whole["m"])


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della"])
def test_through_the_engine_with_small_chunks(tmp_path, method):
    """The merger as an engine Task (``passes``, ``min_rows``, ``chunk.out``): the engine's
    row chunks of a few hundred bytes give the bytes of one whole-tensor merge."""
    from conftest import save_checkpoint

    from stream_tv import engine
    from stream_tv.io.writer import OutTensor
    from stream_tv.refs import open_checkpoint

    base, _, taus = models(torch.bfloat16, seed=4)
    refs = [open_checkpoint(save_checkpoint(tmp_path / "base", base))]
    refs += [open_checkpoint(save_checkpoint(tmp_path / f"tv{i}", t)) for i, t in enumerate(taus)]
    spec = M.merge_spec(method, 3, **dict(CONFIGS[[m for m, _ in CONFIGS].index(method)][1]))
    got: dict[str, list[torch.Tensor]] = {}
    tasks = []
    for k in base:
        specs = [r.tensors[k] for r in refs]
        m = M.TensorMerger(spec, k, specs[0].shape, [s.dtype for s in specs[1:]], torch.bfloat16)

        def compute(chunk, m=m, k=k):
            r = m.feed(
                chunk.pass_index,
                chunk.start,
                chunk.stop,
                chunk.inputs[1:],
                chunk.inputs[0],
                out=chunk.out,
            )
            if r is not None:
                got.setdefault(k, []).append(r.clone().reshape(-1))
            return r

        tasks.append(
            engine.Task(
                k,
                specs,
                compute,
                out=OutTensor(k, torch.bfloat16, specs[0].shape),
                passes=m.passes,
                min_rows=max(2, m.min_rows),
            )
        )
    engine.run(tasks, device=torch.device("cpu"), chunk_bytes=700, progress=False)
    want = ours(spec, base, taus)
    for k in base:
        assert len(got[k]) > 1 or base[k].dim() < 2 or base[k].shape[0] < 3  # really chunked
        assert same_bytes(torch.cat(got[k]).reshape(base[k].shape), want[k]), k


def test_dare_keeps_an_element_iff_its_bits_are_below_density_times_2_32():
    n = 1000
    bits = M.random_bits(M.stream_key(0, "w", 0), torch.arange(n))
    density = int(bits[0]) / 2**32  # exact: element 0 sits on the boundary, and is dropped
    spec = M.merge_spec("dare_linear", 1, density=density, rescale=False)
    got = M.merge_tensor(
        spec, "w", torch.zeros(n, dtype=torch.float64), [torch.ones(n, dtype=torch.float64)]
    )
    assert torch.equal(got, (bits < bits[0]).double())


def test_different_tensors_get_different_masks():
    spec = M.merge_spec("dare_linear", 1, density=0.5, rescale=False)
    tau = torch.ones(1000)
    a = M.merge_tensor(spec, "a", torch.zeros(1000), [tau])
    b = M.merge_tensor(spec, "b", torch.zeros(1000), [tau])
    assert not torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ALL_METHODS)
def test_same_bytes_on_cuda(method):
    base, _, taus = models(torch.bfloat16, seed=2)
    spec = M.merge_spec(method, 3, **dict(CONFIGS[[m for m, _ in CONFIGS].index(method)][1]))
    cpu = ours(spec, base, taus, rows_per_chunk=7)
    dev = {k: v.cuda() for k, v in base.items()}
    dtaus = [{k: v.cuda() for k, v in t.items()} for t in taus]
    gpu = ours(spec, dev, dtaus, rows_per_chunk=5)
    for k in base:
        assert same_bytes(cpu[k], gpu[k].cpu()), k


# ---- against mergekit 0.1.5 itself --------------------------------------------------------------


def _mergekit_python() -> str | None:
    env = os.environ.get("STREAM_TV_MERGEKIT_PYTHON")
    if env:
        return env
    return sys.executable if importlib.util.find_spec("mergekit") else None


# CI (.ci/run) sets STREAM_TV_REQUIRE_MERGEKIT=1: there a missing mergekit fails, never skips.
MERGEKIT_REQUIRED = os.environ.get("STREAM_TV_REQUIRE_MERGEKIT") == "1"
needs_mergekit = pytest.mark.skipif(
    _mergekit_python() is None and not MERGEKIT_REQUIRED,
    reason="mergekit 0.1.5 not installed (pip install mergekit==0.1.5, or set "
    "STREAM_TV_MERGEKIT_PYTHON to a python that has it)",
)


def mergekit_python() -> str:
    """The python that has mergekit 0.1.5; a failure (not a skip) where CI requires it."""
    py = _mergekit_python()
    if py is None:
        pytest.fail("STREAM_TV_REQUIRE_MERGEKIT=1 but no mergekit: set STREAM_TV_MERGEKIT_PYTHON")
    return py


def run_mergekit(tmp_path: Path, sets: dict, jobs: list[dict]) -> list[dict]:
    """mergekit's own merge of each job's tensor set: ``sets[name] = (base, [finetuned])``."""
    flat = {}
    for s, (base, fts) in sets.items():
        for k, b in base.items():
            flat[f"{s}:{k}/base"] = b.contiguous()
            for i, f in enumerate(fts):
                flat[f"{s}:{k}/{i}"] = f[k].contiguous()
    save_file(flat, tmp_path / "in.safetensors")
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run(
        [
            mergekit_python(),
            str(MERGEKIT_TENSORS),
            str(tmp_path / "in.safetensors"),
            str(tmp_path / "out.safetensors"),
            str(tmp_path / "jobs.json"),
        ],
        check=True,
        capture_output=True,
    )
    out = load_file(tmp_path / "out.safetensors")
    results = []
    for j in range(len(jobs)):
        per_seed = {}
        for key, t in out.items():
            jj, rest = key.split(":", 1)
            if int(jj) == j:
                name, seed = rest.rsplit("@", 1)
                per_seed.setdefault(int(seed), {})[name] = t
        results.append(per_seed)
    return results


def _mk_params(kwargs: dict) -> dict:
    """stream_tv keyword arguments as a mergekit YAML ``parameters:`` block."""
    names = {"weights": "weight", "lam": "lambda"}
    out = {}
    for k, v in kwargs.items():
        if k == "seed":
            continue
        if k == "rescale":
            v = bool(v)
        out[names.get(k, k)] = v
    out.setdefault("weight", [1.0, 1.0, 1.0])
    return out


MK_DETERMINISTIC = [(m, k) for m, k in CONFIGS if m in DETERMINISTIC]


@needs_mergekit
@pytest.mark.slow
def test_deterministic_methods_against_mergekit(tmp_path):
    """Bit for bit against mergekit computing in float64 (its ``dtype: float64``), given
    fine-tuned tensors whose float64 difference is exactly our task vector, with equal
    magnitudes ranked as ours; within 4 ulps of its usual ``dtype: float32`` arithmetic."""
    sets, jobs, cases = {}, [], []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        base, fts, taus = models(dtype, seed=5)
        name = str(dtype).removeprefix("torch.")
        fts64 = [{k: base[k].double() + t[k].double() for k in base} for t in taus]
        sets[name + "64"] = ({k: v.double() for k, v in base.items()}, fts64)
        sets[name] = (base, fts)
        for method, kwargs in MK_DETERMINISTIC:
            p = _mk_params(kwargs)
            jobs.append(
                {
                    "set": name + "64",
                    "method": method,
                    "parameters": p,
                    "dtype": "float64",
                    "out_dtype": None,
                    "stable_ties": True,
                }
            )
            jobs.append(
                {
                    "set": name,
                    "method": method,
                    "parameters": p,
                    "dtype": "float32",
                    "out_dtype": name,
                    "stable_ties": True,
                }
            )
            cases.append((dtype, method, kwargs, base, taus))
    results = run_mergekit(tmp_path, sets, jobs)
    worst, elections = {}, {}
    for c, (dtype, method, kwargs, base, taus) in enumerate(cases):
        mine = ours(M.merge_spec(method, 3, **kwargs), base, taus, rows_per_chunk=7)
        t64, t32 = results[2 * c][0], results[2 * c + 1][0]
        for k in base:
            assert torch.equal(mine[k], round_to(t64[k], dtype)), (dtype, method, k)
            if kwargs.get("rescale"):
                continue  # float32 rescale factors: covered bit for bit by the float64 run
            # float32 arithmetic rounds each step, so compare in ulps of the output dtype at
            # the scale of the largest intermediate (base, result, weighted sum of the task
            # vectors over the smallest divisor), as cancellation makes a result near zero
            # many of its own ulps off
            w = _mk_params(kwargs)["weight"]
            terms = sum(abs(wi) * t[k].double().abs() for wi, t in zip(w, taus, strict=True))
            if kwargs.get("normalize", M.METHODS[method].normalize):
                if M.METHODS[method].consensus:  # divides by a sum of agreeing weights
                    smallest = min(abs(x) for x in w if x != 0)
                else:  # divides by the weight sum (1 when it is about 0)
                    smallest = abs(sum(w)) if abs(sum(w)) >= 1e-8 else 1.0
                terms = terms / min(1.0, smallest)
            terms = terms * max(1.0, abs(kwargs.get("lam", 1.0)))
            scale = torch.maximum(
                torch.maximum(base[k].double().abs(), mine[k].double().abs()), terms
            )
            ulp = torch.finfo(dtype).eps * torch.exp2(
                torch.floor(torch.log2(scale.clamp_min(1e-30)))
            )
            err = (mine[k].double() - t32[k].double()).abs().reshape(-1) / ulp.reshape(-1)
            if M.METHODS[method].consensus:
                # subtle: a weighted sum within float32 rounding of zero may elect the other
                # sign there (e.g. 0.5 * a + 0.7 * b that float32 rounds to exactly 0, which
                # elects +, while its float64 value is -3e-20): another disjoint mean
                wd = reference_deltas(
                    M.merge_spec(method, 3, **kwargs), k, base[k], [t[k] for t in taus]
                )
                near_zero = wd.sum(0).abs() <= 8 * torch.finfo(torch.float32).eps * wd.abs().sum(0)
                elections[(str(dtype), method)] = elections.get((str(dtype), method), 0) + int(
                    (near_zero & (err > 4)).sum()
                )
                err = err[~near_zero]
            err = err.max().item() if err.numel() else 0.0
            worst[(str(dtype), method)] = max(worst.get((str(dtype), method), 0), err)
            assert err <= 4, (dtype, method, k, err)
    print("max difference from mergekit float32, in output ulps at the terms' scale:", worst)
    print("elements > 4 ulps off where float32 rounds the sign election's sum to ~0:", elections)


@needs_mergekit
@pytest.mark.slow
def test_magnitude_ties_are_the_only_difference_from_plain_mergekit(tmp_path):
    """bf16 task vectors are full of equal magnitudes; mergekit's unstable argsort keeps an
    arbitrary subset of those tied at the threshold. The kept counts agree, and masks differ
    only among elements whose magnitude equals the threshold."""
    base, fts, taus = models(torch.bfloat16, seed=6, inputs=1, shapes={"m": (64, 96), "v": (300,)})
    fts64 = [{k: base[k].double() + t[k].double() for k in base} for t in taus]
    sets = {"x": ({k: v.double() for k, v in base.items()}, fts64)}
    jobs = [
        {
            "set": "x",
            "method": "ties",
            "parameters": {"weight": [1.0], "density": [0.3]},
            "dtype": "float64",
        },
        {
            "set": "x",
            "method": "breadcrumbs",
            "parameters": {"weight": [1.0], "density": [0.3], "gamma": 0.1},
            "dtype": "float64",
        },
    ]
    results = run_mergekit(tmp_path, sets, jobs)
    for job, res in zip(jobs, results, strict=True):
        spec = M.merge_spec(
            job["method"],
            1,
            density=0.3,
            **({"gamma": 0.1} if job["method"] == "breadcrumbs" else {}),
        )
        mine = ours(
            spec,
            {k: v.double() for k, v in base.items()},
            [{k: t.double() for k, t in taus[0].items()}],
        )
        differ_total = 0
        for k in base:
            tau = taus[0][k].double().reshape(-1)
            n = tau.numel()
            if job["method"] == "ties":
                cuts = [max(1, int(0.3 * n))]
            else:
                kept, n_top = int(0.3 * n), int(0.1 * n)
                n_bot = max(0, n - kept - n_top)
                cuts = [n - n_bot - kept, n - n_bot]
            ranked = torch.sort(tau.abs(), descending=True).values
            tied = {ranked[c].item() for c in cuts if 0 < c < n and ranked[c - 1] == ranked[c]}
            mask_ours = (mine[k] - base[k].double()).reshape(-1) != 0
            mask_theirs = (res[0][k] - base[k].double()).reshape(-1) != 0
            assert int(mask_ours.sum()) == int(mask_theirs.sum())
            differ = mask_ours != mask_theirs
            differ_total += int(differ.sum())
            assert set(tau[differ].abs().tolist()) <= tied, k
        assert differ_total > 0  # the data does have ties at the threshold
        print(job["method"], "elements kept differently (tied magnitudes):", differ_total)


def _stats(merged: dict, base: dict, taus: list[dict]) -> dict:
    delta = torch.cat([(merged[k].double() - base[k].double()).reshape(-1) for k in base])
    tau = torch.cat([taus[0][k].double().reshape(-1) for k in base])
    return {
        "kept": (delta != 0).double().mean().item(),
        "mean": delta.mean().item(),
        "l1": delta.abs().sum().item() / tau.abs().sum().item(),
    }


@needs_mergekit
@pytest.mark.slow
@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("dare_linear", {"density": 0.3}),
        ("dare_ties", {"density": 0.5, "weights": [1.0, 0.6, 0.8]}),
        ("dare_linear", {"density": 0.7, "weights": [0.5, 0.3, 0.2], "rescale": False}),
        ("della_linear", {"density": 0.4, "epsilon": 0.2}),
        ("della", {"density": 0.5, "epsilon": 0.3, "weights": [1.0, 0.6, 0.8]}),
    ],
)
def test_randomized_methods_agree_statistically_with_mergekit(tmp_path, method, kwargs):
    """Kept fraction, rescaling (l1 of the delta over l1 of the first task vector) and mean
    of the merged delta, over 12 seeds each: ours against mergekit's (float32 arithmetic,
    torch's generator), within 5 standard errors; for one input also the expected values."""
    inputs = len(kwargs.get("weights", [1.0]))
    shapes = {"m": (40, 64), "v": (256,)}
    base, fts, taus = models(torch.float32, seed=7, inputs=inputs, shapes=shapes, spread=1.0)
    seeds = list(range(12))
    job = {
        "set": "x",
        "method": method,
        "parameters": {**_mk_params(kwargs), "weight": kwargs.get("weights", [1.0])},
        "dtype": "float32",
        "out_dtype": "float32",
        "seeds": seeds,
    }
    (theirs,) = run_mergekit(tmp_path, {"x": (base, fts)}, [job])
    s_theirs = [_stats(theirs[s], base, taus) for s in seeds]
    s_ours = [
        _stats(ours(M.merge_spec(method, inputs, **{**kwargs, "seed": s}), base, taus), base, taus)
        for s in seeds
    ]
    for key in ("kept", "mean", "l1"):
        a = torch.tensor([s[key] for s in s_ours], dtype=torch.float64)
        b = torch.tensor([s[key] for s in s_theirs], dtype=torch.float64)
        se = math.sqrt(a.var().item() / len(a) + b.var().item() / len(b))
        slack = 1e-5 * abs(b.mean().item()) + 1e-12  # mergekit's float32 norms and sums
        assert abs(a.mean().item() - b.mean().item()) <= 5 * se + slack, (key, a, b)
    if inputs == 1:
        d = kwargs["density"]
        n = sum(math.prod(s) for s in shapes.values())
        kept = torch.tensor([s["kept"] for s in s_ours]).mean().item()
        assert abs(kept - d) < 5 * math.sqrt(d * (1 - d) / (n * len(seeds)))
        if kwargs.get("rescale", True):  # l1 rescale: the delta keeps the task vector's l1 norm
            assert all(abs(s["l1"] - 1) < 1e-5 for s in s_ours)


@needs_mergekit
@pytest.mark.slow
def test_della_keeps_large_magnitudes_more_often_like_mergekit(tmp_path):
    """DELLA's keep probability rises with the magnitude rank in each row: the top half of
    each row is kept with density + epsilon / 2 on average, the bottom half with
    density - epsilon / 2; ours and mergekit's alike."""
    shapes = {"m": (64, 128)}
    base, fts, taus = models(torch.float32, seed=8, inputs=1, shapes=shapes, spread=1.0)
    d, eps, seeds = 0.5, 0.3, list(range(8))
    job = {
        "set": "x",
        "method": "della_linear",
        "parameters": {"weight": [1.0], "density": [d], "epsilon": eps},
        "dtype": "float32",
        "out_dtype": "float32",
        "seeds": seeds,
    }
    (theirs,) = run_mergekit(tmp_path, {"x": (base, fts)}, [job])
    tau = taus[0]["m"]
    top = tau.abs() >= tau.abs().median(dim=1, keepdim=True).values
    n = top.sum().item() * len(seeds)
    for who, outs in (
        ("mergekit", [theirs[s] for s in seeds]),
        (
            "ours",
            [
                ours(M.merge_spec("della_linear", 1, density=d, epsilon=eps, seed=s), base, taus)
                for s in seeds
            ],
        ),
    ):
        kept = torch.stack([(o["m"] != base["m"]) for o in outs]).double()
        hi, lo = kept[:, top].mean().item(), kept[:, ~top].mean().item()
        tol = 5 * math.sqrt(0.25 / n) + 0.01  # + the rank discretisation of 128 columns
        assert abs(hi - (d + eps / 2)) < tol, (who, hi)
        assert abs(lo - (d - eps / 2)) < tol, (who, lo)


# ---- end to end: mergekit-yaml on tiny real models ------------------------------------------------


@needs_mergekit
@pytest.mark.slow
def test_ties_of_three_tiny_llamas_against_mergekit_yaml(tmp_path):
    """``mergekit-yaml`` (ties, 3 models, ``dtype: float32``, bf16 out) on tiny Llama
    checkpoints against our merge streamed from the same safetensors in 5-row chunks:
    within 4 bf16 ulps wherever no magnitude tie at a threshold is involved."""
    from stream_tv import synthetic

    cfg = synthetic.llama_config(hidden=64, layers=2, vocab=256, dtype=torch.bfloat16)
    dirs = [tmp_path / f"m{i}" for i in range(4)]
    synthetic.write_base(dirs[0], cfg, seed=0)
    base = load_file(next(dirs[0].glob("*.safetensors")))
    g = torch.Generator().manual_seed(11)
    fts = []
    for d in dirs[1:]:
        ft = {
            k: (v.double() + 2e-3 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(
                v.dtype
            )
            for k, v in base.items()
        }
        d.mkdir()
        save_file(ft, d / "model.safetensors", {"format": "pt"})
        (d / "config.json").write_text((dirs[0] / "config.json").read_text())
        fts.append(ft)
    weights, densities = [1.0, 0.5, 0.7], [0.5, 0.3, 0.9]
    models_yaml = "".join(
        f"  - model: {d}\n    parameters: {{weight: {w}, density: {p}}}\n"
        for d, w, p in zip(dirs[1:], weights, densities, strict=True)
    )
    (tmp_path / "ties.yml").write_text(
        f"merge_method: ties\nbase_model: {dirs[0]}\nmodels:\n{models_yaml}dtype: float32\nout_dtype: bfloat16\n"
    )
    yaml_cli = Path(mergekit_python()).parent / "mergekit-yaml"
    subprocess.run(
        [
            str(yaml_cli),
            str(tmp_path / "ties.yml"),
            str(tmp_path / "out"),
            "--no-copy-tokenizer",
            "--lazy-unpickle",
        ],
        check=True,
        capture_output=True,
    )
    theirs = load_file(next((tmp_path / "out").glob("*.safetensors")))
    spec = M.merge_spec("ties", 3, weights=weights, density=densities)
    tied_elements = compared = 0
    for k, b in base.items():
        taus = [f[k].float() - b.float() for f in fts]
        mine = M.merge_tensor(spec, k, b, taus, rows_per_chunk=5)
        u = ulps(mine, theirs[k])
        # elements whose magnitude equals an input's k-th largest may be kept differently
        at_threshold = torch.zeros(b.numel(), dtype=torch.bool)
        for t, dens in zip(taus, densities, strict=True):
            kth = torch.sort(t.abs().reshape(-1), descending=True).values[
                max(1, int(dens * t.numel())) - 1
            ]
            at_threshold |= t.abs().reshape(-1) == kth
        elsewhere = u[~at_threshold]
        assert elsewhere.numel() == 0 or int(elsewhere.max()) <= 4, k
        compared += elsewhere.numel()
        tied_elements += int((u[at_threshold] > 4).sum())
    total = sum(b.numel() for b in base.values())
    print(f"{compared} of {total} elements within 4 ulps; {tied_elements} at a tied threshold")
    assert compared > total / 2


def _disjoint_rule(cols, weights, base):
    """The disjoint sum element by element, in Python floats: elect the sign of the total
    (NaN >= 0 is false: -), sum the terms of that sign, divide by their weights (1 if none)."""
    out = []
    for j, col in enumerate(cols):
        wd = [t * w for t, w in zip(col, weights, strict=True)]
        total = wd[0] + wd[1] + wd[2]
        positive = total >= 0
        agree = [(x > 0) if positive else (x < 0) for x in wd]
        mixed = 0.0
        for x, a in zip(wd, agree, strict=True):
            mixed += x if a else 0.0
        div = sum(w for w, a in zip(weights, agree, strict=True) if a) or 1.0
        out.append(float(base[j]) + mixed / div)
    return out


@pytest.mark.parametrize("with_nan", [False, True])
def test_ties_consensus_with_nan_inf_and_signed_zeros_follows_the_rule(with_nan):
    inf, nan = math.inf, math.nan
    cols = [
        (1.0, -2.0, 0.5),
        (inf, 1.0, -3.0),  # an infinite term agrees with its total
        (-0.0, 0.0, -0.0),
        (-inf, 2.0, 0.0),
        (0.0, 0.0, 0.0),
        (1e308, 1e308, -1.0),  # a total that overflows to inf
    ]
    if with_nan:  # a NaN total: - is elected and the NaN left out (the exact, slower path)
        cols += [(nan, 1.0, -1.0), (inf, -inf, 1.0)]
    weights = [1.0, 0.5, 0.7]
    taus = [torch.tensor([c[i] for c in cols], dtype=torch.float64) for i in range(3)]
    base = torch.linspace(-1, 1, len(cols), dtype=torch.float64)
    spec = M.merge_spec("ties", 3, density=1.0, weights=weights)
    got = M.merge_tensor(spec, "w", base, taus)
    want = torch.tensor(_disjoint_rule(cols, weights, base), dtype=torch.float64)
    assert same_bytes(got, want), (got.tolist(), want.tolist())
    # the same elements inside a larger block of ordinary values: the same numbers
    big = [torch.cat([torch.randn(1000, dtype=torch.float64), t]) for t in taus]
    big_base = torch.cat([torch.zeros(1000, dtype=torch.float64), base])
    assert same_bytes(M.merge_tensor(spec, "w", big_base, big)[1000:], got)
