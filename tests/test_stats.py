"""stream_tv.stats against an independent numpy float64 reference."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_tv.errors import InputError, MismatchError
from stream_tv.stats import (
    CATEGORIES,
    CHANGED_NOT_LORA,
    LORA_AND_CHANGED,
    LORA_UNCHANGED,
    ROUNDING_ONLY,
    UNCHANGED,
    TensorAccumulator,
    TensorComparison,
    half_ulp,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FIGURES = ("cosine", "max_abs_diff", "mean_abs_diff", "relative_error", "lora_norm", "tv_norm")


# -- the reference: numpy float64, written without looking at stats.py ----------------------


def ref_half_ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """Half the spacing from |x| to the next value away from zero, via np.spacing."""
    mag = np.abs(values.astype(np.float64))
    if dtype == "float32":
        return np.spacing(mag.astype(np.float32)).astype(np.float64) / 2
    if dtype == "float16":
        return np.spacing(mag.astype(np.float16)).astype(np.float64) / 2
    if dtype == "bfloat16":
        # bf16 is fp32 with 16 significand bits dropped, same exponent range (subnormals too).
        return np.spacing(mag.astype(np.float32)).astype(np.float64) * 2.0**16 / 2
    raise AssertionError(dtype)


# (significand bits, smallest spacing, largest finite value) of each dtype
FORMATS = {
    "bfloat16": (8, 2.0**-133, float(torch.finfo(torch.bfloat16).max)),
    "float16": (11, 2.0**-24, 65504.0),
    "float32": (24, 2.0**-149, float(np.finfo(np.float32).max)),
}


def ref_round(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values correctly rounded (to nearest, ties to even) to ``dtype``, as float64:
    divide each value by its ulp (a power of two: exact), np.rint, multiply back."""
    p, tiny, top = FORMATS[dtype]
    x = np.asarray(x, dtype=np.float64)
    _, e = np.frexp(x)
    ulp = np.maximum(np.ldexp(1.0, e - p), tiny)
    out = np.rint(x / ulp) * ulp
    # at or beyond max + half an ulp of max (the midpoint to the next binade): infinity
    half_top = np.ldexp(1.0, int(np.frexp(top)[1]) - p - 1)
    return np.where(np.abs(x) >= top + half_top, np.copysign(np.inf, x), out)


def ref_rank(values: np.ndarray, dtype: str) -> np.ndarray:
    """Position of float64 ``values`` (representable in ``dtype``) among all values of the
    dtype, zeros counted once: by sorting every value (16-bit), by counting floats (fp32;
    the same bit trick as stats, itself checked against nextafter in test_floats)."""
    if dtype == "float32":
        bits = values.astype(np.float32).view(np.int32).astype(np.int64)
        return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    universe = every.view(DTYPES[dtype]).to(torch.float64).numpy()
    distinct = np.unique(universe[~np.isnan(universe)])
    return np.searchsorted(distinct, values)


def ref_ulp(f: np.ndarray, want: np.ndarray, dtype: str) -> dict:
    """ulp_counts and ulp_max of ``f`` against ``want`` (both finite here)."""
    d = np.abs(ref_rank(f, dtype) - ref_rank(want, dtype))
    counts = (int(np.sum(d == 0)), int(np.sum(d == 1)), int(np.sum(d >= 2)))
    return {"ulp_counts": counts, "ulp_max": int(d.max())}


def reference(lora, tv, finetuned=None, dtype=None, base=None, ours=None) -> dict:
    """Every figure from whole float64 arrays. ``finetuned``, ``base`` and ``ours`` (our
    merge, already in the finetuned dtype) as float64 arrays, ``dtype`` the finetuned one."""
    L = np.asarray(lora, dtype=np.float64).ravel()
    T = np.asarray(tv, dtype=np.float64).ravel()
    D = L - T
    n = L.size
    ln, tn = math.sqrt(float(np.sum(L * L))), math.sqrt(float(np.sum(T * T)))
    cos = None
    if n and ln > 0 and tn > 0:
        cos = float(np.clip(np.sum(L * T) / (ln * tn), -1.0, 1.0))
    out = {
        "numel": n,
        "cosine": cos,
        "max_abs_diff": float(np.max(np.abs(D))) if n else None,
        "mean_abs_diff": float(np.mean(np.abs(D))) if n else None,
        "relative_error": math.sqrt(float(np.sum(D * D))) / tn if tn > 0 else None,
        "lora_norm": ln,
        "tv_norm": tn,
        "changed": bool(np.any(T != 0)),
        "nonfinite": int(np.sum(~np.isfinite(L) | ~np.isfinite(T))),
    }
    if finetuned is not None and n:
        F = np.asarray(finetuned, dtype=np.float64).ravel()
        out["rounding_bound"] = float(ref_half_ulp(F, dtype).max())
        if base is not None:
            exact = np.asarray(base, dtype=np.float64).ravel() + L
            rounded = ref_round(exact, dtype)
            out.update(ref_ulp(F, rounded, dtype))
            e = rounded - exact
            floor = math.sqrt(float(np.sum(e * e))) / tn if tn > 0 else None
            # W + L beyond the dtype's range rounds to inf: no finite floor (JSON null)
            out["rounding_floor"] = floor if floor is not None and math.isfinite(floor) else None
        if ours is not None:
            out["bit_exact_merge"] = float(np.mean(F == np.asarray(ours, np.float64).ravel()))
    return out


NEW_FIGURES = ("rounding_floor", "bit_exact_merge", "ulp_counts", "ulp_max")


def assert_matches(result: TensorComparison, ref: dict) -> None:
    assert result.numel == ref["numel"]
    for name in FIGURES:
        got, want = getattr(result, name), ref[name]
        if want is None:
            assert got is None, name
        else:
            assert got is not None, name
            # cosine: absolute (it can be ~0, where relative tolerance means nothing)
            tol = 1e-12 if name == "cosine" else 0.0
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=tol), (name, got, want)
    if "rounding_bound" in ref:
        assert result.rounding_bound == ref["rounding_bound"]  # exact: same elementwise ops
    for name in NEW_FIGURES:
        got, want = getattr(result, name), ref.get(name)
        if name == "rounding_floor" and want is not None and got is not None:
            assert math.isclose(got, want, rel_tol=1e-9), (name, got, want)
        else:
            assert got == want, (name, got, want)  # counts and fractions: exact
    assert result.nonfinite == ref["nonfinite"]
    assert result.changed == ref["changed"]
    assert result.category == (LORA_AND_CHANGED if ref["changed"] else LORA_UNCHANGED)


# -- fixtures: a realistic LoRA merge --------------------------------------------------------


def merged(rows: int, cols: int, dtype: torch.dtype, seed: int, delta_scale: float = 1e-3):
    """(base, finetuned, T, exact delta): base in `dtype`, finetuned = cast(base + delta)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    delta = torch.randn(rows, cols, generator=g, dtype=torch.float64) * delta_scale
    finetuned = (base.to(torch.float32) + delta.to(torch.float32)).to(dtype)
    tv = finetuned.to(torch.float64) - base.to(torch.float64)
    return base, finetuned, tv, delta


def accumulate(
    name, tv, lora=None, finetuned=None, base=None, *, cuts=(), has_lora=None, merged=None
) -> TensorComparison:
    """Feed row chunks split at `cuts` to one accumulator."""
    has_lora = lora is not None if has_lora is None else has_lora
    acc = TensorAccumulator(
        name,
        numel=tv.numel(),
        has_lora=has_lora,
        finetuned_dtype=None if finetuned is None else finetuned.dtype,
        base_dtype=None if base is None else base.dtype,
    )
    edges = [0, *cuts, tv.shape[0]]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        acc.update(
            tv=tv[a:b],
            lora=None if lora is None else lora[a:b],
            finetuned=None if finetuned is None else finetuned[a:b],
            base=None if base is None else base[a:b],
            merged=None if merged is None else merged[a:b],
        )
    return acc.result()


# -- half_ulp --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "value", "half"),
    [
        (torch.bfloat16, 1.0, 2.0**-8),
        (torch.bfloat16, -1.5, 2.0**-8),
        (torch.bfloat16, 2.0, 2.0**-7),
        (torch.bfloat16, 0.0, 2.0**-134),  # subnormal spacing 2**-133
        (torch.float16, 1.0, 2.0**-11),
        (torch.float16, 0.0, 2.0**-25),
        (torch.float16, 2.0**-20, 2.0**-25),  # fp16 subnormal
        (torch.float16, 2.0**-14, 2.0**-25),  # smallest normal: same spacing as subnormals
        (torch.float16, 65504.0, 16.0),
        (torch.float32, 1.0, 2.0**-24),
        (torch.float32, 2.0**-149, 2.0**-150),
        (torch.float32, 3.0e38, 2.0**103),
        (torch.float64, 1.0, 2.0**-53),
    ],
)
def test_half_ulp_known_values(dtype, value, half):
    assert half_ulp(torch.tensor([value], dtype=dtype)).tolist() == [half]


def test_half_ulp_is_float64_and_inf_for_non_finite():
    out = half_ulp(torch.tensor([float("inf"), float("nan"), 1.0], dtype=torch.bfloat16))
    assert out.dtype == torch.float64
    assert out.tolist() == [math.inf, math.inf, 2.0**-8]


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_half_ulp_matches_numpy_spacing_over_every_binade(name):
    dtype = DTYPES[name]
    info = torch.finfo(dtype)
    exps = torch.arange(math.log2(info.tiny) - 12, math.log2(info.max) - 1)
    values = torch.cat(
        [torch.exp2(exps), 1.37 * torch.exp2(exps), -torch.exp2(exps), torch.zeros(1)]
    )
    x = values.to(dtype)
    x = x[torch.isfinite(x)]
    want = ref_half_ulp(x.to(torch.float32).numpy(), name)
    assert np.array_equal(half_ulp(x).numpy(), want)


def test_half_ulp_bounds_real_rounding():
    """Rounding fp32 values to bf16 never moves them by more than half_ulp of the result."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g) * torch.exp2(
        torch.randint(-30, 30, (10_000,), generator=g)
    )
    r = x.to(torch.bfloat16)
    err = (r.to(torch.float64) - x.to(torch.float64)).abs()
    assert torch.all(err <= half_ulp(r))
    assert torch.any(err > half_ulp(r) / 2)  # and the bound is not loose
    # subtle: float64 -> bf16 in torch goes through fp32 (double rounding), which can exceed
    # half an ulp; stats never rounds float64 values, it only measures them.


# -- whole-tensor figures against the reference ---------------------------------------------


def test_reference_rounding_is_correct_rounding():
    """The test's own rounding agrees with numpy's float64 -> fp16 / fp32 casts (correctly
    rounded) and with torch's fp32 -> bf16 (one rounding) where those apply."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(20_000) * 10.0 ** rng.integers(-45, 39, 20_000)
    x = np.concatenate([x, [65519.99, 65520.0, -65520.0, 2.0**-25, 3 * 2.0**-26]])
    with np.errstate(over="ignore"):
        assert np.array_equal(ref_round(x, "float16"), x.astype(np.float16).astype(np.float64))
        assert np.array_equal(ref_round(x, "float32"), x.astype(np.float32).astype(np.float64))
    x32 = x.astype(np.float32)
    via_torch = torch.from_numpy(x32).to(torch.bfloat16).to(torch.float64).numpy()
    assert np.array_equal(ref_round(x32.astype(np.float64), "bfloat16"), via_torch)


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_lora_figures_match_reference(name):
    base, finetuned, tv, delta = merged(37, 11, DTYPES[name], seed=1)
    ours = finetuned.clone()
    ours.view(-1)[7] = -ours.view(-1)[7]  # our merge differs in one element
    result = accumulate("w", tv, delta, finetuned, base, cuts=(5, 6, 30), merged=ours)
    as64 = lambda x: x.to(torch.float64).numpy()  # noqa: E731
    ref = reference(delta, tv, as64(finetuned), name, as64(base), as64(ours))
    assert_matches(result, ref)
    assert result.category == LORA_AND_CHANGED
    assert result.bit_exact_merge == 1 - 1 / (37 * 11)
    # A PEFT-style merge (the delta rounded to fp32, then W + delta rounded to the dtype):
    # in bf16/fp16 every element is within one ulp of the correctly rounded W + L, and most
    # are exactly it; the delta's own fp32 rounding is a fraction of an fp32 ulp of W + L
    # unless |W + L| is far below |L| (rare elements next to zero).
    n0, n1, more = result.ulp_counts
    assert n0 > 0.99 * result.numel and more == 0 or name == "float32"
    if name != "float32":
        assert result.ulp_max <= 1
    # rounding alone explains L - T: the floor is the relative error itself
    assert result.rounding_floor == pytest.approx(result.relative_error, rel=0.5)


def test_rounding_fields_need_their_inputs_in_every_chunk():
    base, finetuned, tv, delta = merged(6, 3, torch.bfloat16, seed=2)
    declared = {"finetuned_dtype": torch.bfloat16, "base_dtype": torch.bfloat16}
    acc = TensorAccumulator("w", numel=18, has_lora=True, **declared)
    acc.update(tv=tv[:3], lora=delta[:3], finetuned=finetuned[:3], base=base[:3])
    acc.update(tv=tv[3:], lora=delta[3:])  # no finetuned: the bound is unknown for these
    r = acc.result()
    assert r.rounding_bound is None and r.ulp_counts is None and r.ulp_max is None
    assert r.rounding_floor is None and r.bit_exact_merge is None
    assert r.cosine is not None
    # finetuned everywhere but the base in one chunk only: a bound, but no ulp figures
    acc = TensorAccumulator("w", numel=18, has_lora=True, **declared)
    acc.update(tv=tv[:3], lora=delta[:3], finetuned=finetuned[:3], merged=finetuned[:3])
    acc.update(tv=tv[3:], lora=delta[3:], finetuned=finetuned[3:], base=base[3:])
    r = acc.result()
    assert r.rounding_bound is not None and r.ulp_counts is None and r.rounding_floor is None
    assert r.bit_exact_merge is None  # merged in one chunk only
    with pytest.raises(MismatchError, match="merged chunk is compared with the finetuned"):
        TensorAccumulator("w", numel=18, has_lora=True, **declared).update(
            tv=tv, lora=delta, merged=finetuned
        )


def test_ulp_counts_by_hand():
    """W + L lands 0, 1 (either side), 2 and 60 bf16 ulps from F, across zero too."""
    w = torch.tensor([1.0, 1.0, 1.0, 2.0**-133, 1.0, 2.0], dtype=torch.float32)
    lo = torch.tensor([0.5, 2.0**-7, -(2.0**-8), -(2.0**-132), 0.0, 1.0], dtype=torch.float64)
    # correctly rounded W + L: 1.5, 1.0078125, 0.99609375, -2**-133, 1.0, 3.0
    f = torch.tensor(
        [1.5, 1.0, 0.9921875, 2.0**-133, 1.015625, 3.0 + 60 * 2.0**-6], dtype=torch.bfloat16
    )
    tv = f.double() - w.double()
    r = accumulate("w", tv, lo, f, w, cuts=(2,), merged=f.clone())
    # distances: 0, 1 (below), 1 (below), 2 (across zero: -2**-133 -> 0 -> 2**-133), 2, 60
    assert r.ulp_counts == (1, 2, 3) and r.ulp_max == 60
    assert r.bit_exact_merge == 1.0  # F is exactly "our merge" here, whatever W + L says
    assert r.rounding_bound == 2.0**-7  # half an ulp of bf16 values in [2, 4)


# -- nulls, never NaN ---------------------------------------------------------------------


def test_zero_lora_gives_null_cosine_not_nan():
    tv = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    r = accumulate("w", tv, torch.zeros_like(tv))
    assert r.cosine is None and r.lora_norm == 0.0
    assert r.relative_error == 1.0 and r.category == LORA_AND_CHANGED


def test_zero_task_vector_gives_null_cosine_and_relative_error():
    lora = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    r = accumulate("w", torch.zeros_like(lora), lora)
    assert r.cosine is None and r.relative_error is None
    assert r.category == LORA_UNCHANGED and not r.changed and r.has_lora
    assert r.max_abs_diff == 2.0 and r.mean_abs_diff == 1.5


def test_empty_tensor():
    empty = torch.zeros((0, 4), dtype=torch.float64)
    e16 = empty.to(torch.bfloat16)
    r = accumulate("w", empty, empty, e16, e16, merged=e16)
    assert r.numel == 0 and r.category == LORA_UNCHANGED
    assert (r.cosine, r.max_abs_diff, r.mean_abs_diff, r.relative_error) == (None,) * 4
    assert (r.rounding_bound, r.rounding_floor, r.bit_exact_merge) == (None,) * 3
    assert (r.ulp_counts, r.ulp_max, r.nonfinite) == (None, None, 0)
    assert (r.lora_norm, r.tv_norm) == (0.0, 0.0)
    plain = accumulate("b", torch.zeros(0), has_lora=False)
    assert plain.category == UNCHANGED and plain.tv_norm == 0.0


def test_non_finite_figures_become_null():
    tv = torch.tensor([[1.0, float("nan")]], dtype=torch.float64)
    r = accumulate("w", tv, torch.ones_like(tv))
    values = [v for v in r.to_dict().values() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in values)
    assert r.cosine is None and r.max_abs_diff is None
    assert r.nonfinite == 1


@pytest.mark.parametrize("cuts", [(), (1,), (2, 3)])
def test_non_finite_values_are_counted_per_tensor(cuts):
    """NaN and inf in F, W, T or L: every element where T or L is not finite is counted,
    in every chunk; F's NaN against a finite W + L is an unbounded ulp distance."""
    nan, inf = float("nan"), float("inf")
    w = torch.tensor([1.0, inf, 2.0, 3.0, nan], dtype=torch.float32)
    lo = torch.tensor([0.0, 0.0, inf, 0.0, 0.0], dtype=torch.float64)
    f = torch.tensor([1.0, inf, inf, nan, nan], dtype=torch.bfloat16)
    tv = f.double() - w.double()  # [0, nan, inf, nan, nan]
    r = accumulate("w", tv, lo, f, w, cuts=cuts)
    assert r.nonfinite == 4
    # distances: 0, inf-inf 0, inf vs round(inf) 0, NaN vs 3 unbounded, NaN vs NaN 0
    assert r.ulp_counts == (4, 0, 1) and r.ulp_max is None
    assert r.cosine is None and r.relative_error is None and r.lora_norm is None
    plain = accumulate("p", tv.float(), None, f, w, cuts=cuts, has_lora=False)
    assert plain.nonfinite == 4 and plain.tv_norm is None
    assert plain.category == CHANGED_NOT_LORA
    clean = accumulate("c", torch.ones(4, 2), has_lora=False, cuts=cuts)
    assert clean.nonfinite == 0


# -- cosine is never above 1 --------------------------------------------------------------


@given(
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1.0, 3.0, -1.0, 1e-300, 1e300, 7e-5, -123.456, 1 + 2**-52]),
    spread=st.integers(0, 300),
    n=st.integers(1, 200),
)
@settings(max_examples=150, deadline=None)
def test_cosine_of_scaled_copies_is_within_one(seed, scale, spread, n):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(n) * 10.0 ** rng.integers(-spread // 2 - 1, spread // 2 + 1, n)
    tv = torch.from_numpy(t).reshape(n, 1)
    r = accumulate("w", tv, tv * scale, cuts=sorted({int(c) for c in rng.integers(0, n, 3)}))
    if r.cosine is not None:
        assert abs(r.cosine) <= 1 + 1e-12
        assert abs(r.cosine) <= 1.0  # clamped, not merely close
        assert r.cosine == pytest.approx(math.copysign(1.0, scale), abs=1e-9)
    else:  # only when a norm is 0 or overflows float64
        assert r.lora_norm in (0.0, None) or r.tv_norm in (0.0, None)


def exact_figures(lora: torch.Tensor, tv: torch.Tensor) -> dict:
    """Norms, cosine and relative error from exact rational arithmetic (no under/overflow)."""
    L = [Fraction(x) for x in lora.reshape(-1).tolist()]
    T = [Fraction(x) for x in tv.reshape(-1).tolist()]
    ll, tt = sum(x * x for x in L), sum(x * x for x in T)
    lt = sum(a * b for a, b in zip(L, T, strict=True))
    dd = sum((a - b) ** 2 for a, b in zip(L, T, strict=True))

    def root(q: Fraction) -> float:  # sqrt of a rational, correctly scaled by powers of 4
        if q == 0:
            return 0.0
        shift = (q.numerator.bit_length() - q.denominator.bit_length()) // 2
        return math.ldexp(math.sqrt(float(q / Fraction(4) ** shift)), shift)

    cos = None
    if ll and tt:
        cos = root(lt * lt / (ll * tt)) * (1 if lt >= 0 else -1)
    return {
        "lora_norm": root(ll),
        "tv_norm": root(tt),
        "cosine": cos,
        "relative_error": root(dd / tt) if tt else None,
    }


@pytest.mark.parametrize("scale", [1e-300, 2.0**-1060, 1e-160, 1e160, 1e300])
@pytest.mark.parametrize("cuts", [(), (3, 17)])
def test_norms_and_cosine_at_extreme_scales(scale, cuts):
    """Sums of squares of 1e-300 underflow and of 1e300 overflow in float64; the scaled
    accumulation gets the exact figures anyway, chunked or not."""
    g = torch.Generator().manual_seed(5)
    tv = torch.randn(40, 3, generator=g, dtype=torch.float64) * scale
    lora = tv * 0.75 + torch.randn(40, 3, generator=g, dtype=torch.float64) * (scale / 8)
    want = exact_figures(lora, tv)
    assert all(0 < want[k] < math.inf for k in ("lora_norm", "tv_norm"))
    r = accumulate("w", tv, lora, cuts=cuts)
    # subnormal inputs (2**-1060) carry only ~14 significand bits, but exactly so: the
    # figures are still those of the given values.
    for name in ("lora_norm", "tv_norm", "cosine", "relative_error"):
        assert getattr(r, name) == pytest.approx(want[name], rel=1e-13), name
    plain = accumulate("p", tv, cuts=cuts, has_lora=False)
    assert plain.tv_norm == pytest.approx(want["tv_norm"], rel=1e-13)


def test_tiny_and_huge_chunks_of_one_tensor_merge():
    """A chunk at 1e-300 beside a chunk at 1e300: merged in either order, the sums keep the
    large part exactly and the tiny part does not turn into NaN or 0 * inf."""
    g = torch.Generator().manual_seed(6)
    tv = torch.randn(8, 4, generator=g, dtype=torch.float64)
    tv[:4] *= 1e-300
    tv[4:] *= 1e300
    lora = 2 * tv
    want = exact_figures(lora, tv)
    for order in (0, 1):
        parts = [
            TensorAccumulator("w", numel=32, has_lora=True, finetuned_dtype=None, base_dtype=None)
            for _ in range(2)
        ]
        parts[order].update(tv=tv[:4], lora=lora[:4])
        parts[1 - order].update(tv=tv[4:], lora=lora[4:])
        parts[0].merge(parts[1])
        r = parts[0].result()
        assert r.tv_norm == pytest.approx(want["tv_norm"], rel=1e-13)
        assert r.lora_norm == pytest.approx(want["lora_norm"], rel=1e-13)
        assert r.cosine == pytest.approx(1.0, abs=1e-15) and r.cosine <= 1.0
        assert r.relative_error == pytest.approx(1.0, rel=1e-13)


def test_norm_beyond_float64_is_null_but_cosine_is_not():
    """Elements of 1e308: ||T|| exceeds float64 (null), yet the cosine is well defined."""
    tv = torch.full((4, 1), 1e308, dtype=torch.float64)
    r = accumulate("w", tv, tv / 2)
    assert r.tv_norm is None and r.lora_norm == pytest.approx(1e308, rel=1e-15)
    assert r.cosine == 1.0 and r.relative_error == pytest.approx(0.5, rel=1e-15)


def test_identical_vectors_have_cosine_exactly_one_at_most():
    # sums of squares that round differently from the dot: raw ratio exceeds 1 for some seeds
    above = 0
    for seed in range(200):
        x = torch.from_numpy(np.random.default_rng(seed).standard_normal(97) * 1e3)
        dot, n2 = torch.dot(x, x * 3), torch.dot(x * 3, x * 3)
        above += float(dot / n2.sqrt() / torch.dot(x, x).sqrt()) > 1
        r = accumulate("w", x.reshape(-1, 1), x.reshape(-1, 1) * 3)
        assert r.cosine is not None and r.cosine <= 1.0
    assert above > 0, "no adversarial case found: the clamp test proves nothing"


# -- chunked == whole, merge == sequential ----------------------------------------------------


@st.composite
def lora_cases(draw):
    rows = draw(st.integers(0, 40))
    cols = draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["exact", "equal", "scaled", "zero_lora", "zero_tv", "random"]))
    base, finetuned, tv, delta = merged(rows, cols, DTYPES[dtype], seed)
    rng = np.random.default_rng(seed)
    if kind == "equal":
        delta = tv.clone()
    elif kind == "scaled":
        delta = tv * float(rng.choice([2.0, -0.5, 1e-8, 1e8]))
    elif kind == "zero_lora":
        delta = torch.zeros_like(tv)
    elif kind == "zero_tv":
        finetuned, tv = base.clone(), torch.zeros_like(tv)
    elif kind == "random":
        delta = torch.from_numpy(rng.standard_normal((rows, cols)))
    cuts = sorted(draw(st.lists(st.integers(0, rows), max_size=6)))
    # our merge: the finetuned tensor, or it with a few elements moved by an ulp or more
    ours = finetuned.clone()
    if draw(st.booleans()) and ours.numel():
        flat = ours.view(-1)
        picks = rng.integers(0, flat.numel(), rng.integers(1, 4))
        flat[picks] = flat[picks] * 1.5 + 1e-3
    return dtype, base, finetuned, tv, delta, cuts, ours


@given(case=lora_cases(), split=st.integers(0, 6))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_chunked_equals_whole_reference(case, split):
    dtype, base, finetuned, tv, delta, cuts, ours = case
    as64 = lambda x: x.to(torch.float64).numpy()  # noqa: E731
    ref = reference(delta, tv, as64(finetuned), dtype, as64(base), as64(ours))
    whole = accumulate("w", tv, delta, finetuned, base, merged=ours)
    chunked = accumulate("w", tv, delta, finetuned, base, cuts=cuts, merged=ours)
    assert_matches(whole, ref)
    assert_matches(chunked, ref)

    # Two accumulators fed disjoint halves of the chunks, merged (in either order).
    edges = [0, *cuts, tv.shape[0]]
    spans = list(zip(edges[:-1], edges[1:], strict=True))
    for order in (0, 1):
        halves = [
            TensorAccumulator(
                "w",
                numel=tv.numel(),
                has_lora=True,
                finetuned_dtype=finetuned.dtype,
                base_dtype=base.dtype,
            )
            for _ in range(2)
        ]
        for i, (a, b) in enumerate(spans):
            halves[int(i >= split) ^ order].update(
                tv=tv[a:b],
                lora=delta[a:b],
                finetuned=finetuned[a:b],
                base=base[a:b],
                merged=ours[a:b],
            )
        halves[0].merge(halves[1])
        assert_matches(halves[0].result(), ref)


@given(
    rows=st.integers(0, 30),
    cols=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
    cuts=st.lists(st.integers(0, 30), max_size=5),
    kind=st.sampled_from(["changed", "unchanged", "round_trip", "round_trip_but_one"]),
)
@settings(max_examples=150, deadline=None)
def test_plain_tensors_chunked_categories_and_norm(rows, cols, seed, cuts, kind):
    g = torch.Generator().manual_seed(seed)
    exact = torch.randn(rows, cols, generator=g)
    if kind in ("round_trip", "round_trip_but_one"):
        base, finetuned = exact, exact.to(torch.bfloat16)  # fp32 base saved again as bf16
        if kind == "round_trip_but_one" and finetuned.numel():
            finetuned.view(-1)[0] += 1.0
    elif kind == "changed":
        base, finetuned = exact, exact + torch.randn(rows, cols, generator=g)
    else:
        base, finetuned = exact, exact.clone()
    tv = finetuned.to(torch.float32) - base.to(torch.float32)  # exact for these values
    cuts = sorted(c for c in cuts if c <= rows)
    r = accumulate("p", tv, None, finetuned, base, cuts=cuts, has_lora=False)

    changed = bool(np.any(tv.numpy() != 0))
    assert r.changed == changed and not r.has_lora
    assert math.isclose(
        r.tv_norm, float(np.linalg.norm(tv.numpy().astype(np.float64))), rel_tol=1e-9
    )
    want = {
        "changed": CHANGED_NOT_LORA,
        "unchanged": UNCHANGED,
        "round_trip": ROUNDING_ONLY,
        "round_trip_but_one": CHANGED_NOT_LORA,
    }[kind]
    if not changed:
        want = UNCHANGED
    assert r.category == want
    assert (r.cosine, r.lora_norm, r.rounding_bound, r.bit_exact_merge) == (None,) * 4
    assert r.rounding_floor is None
    # F against the correctly rounded round trip of W (here torch's cast is that)
    if r.numel == 0:
        assert r.ulp_counts is None
    elif kind == "round_trip":
        assert r.ulp_counts == (r.numel, 0, 0) and r.ulp_max == 0
    elif kind == "round_trip_but_one":
        assert r.ulp_counts[0] == r.numel - 1 and r.ulp_max >= 1
    want_ulps = (
        ref_ulp(
            finetuned.double().numpy().ravel(),
            ref_round(base.double().numpy().ravel(), str(finetuned.dtype).removeprefix("torch.")),
            str(finetuned.dtype).removeprefix("torch."),
        )
        if r.numel
        else {"ulp_counts": None, "ulp_max": None}
    )
    assert (r.ulp_counts, r.ulp_max) == (want_ulps["ulp_counts"], want_ulps["ulp_max"])


# -- categories -------------------------------------------------------------------------------


def test_rounding_only_needs_different_dtypes_and_both_chunks():
    base = torch.randn(8, 4)
    finetuned = base.to(torch.bfloat16)
    tv = finetuned.float() - base
    assert accumulate("x", tv, None, finetuned, base, has_lora=False).category == ROUNDING_ONLY
    # without the raw chunks, a nonzero T cannot be called rounding-only
    assert accumulate("x", tv, has_lora=False).category == CHANGED_NOT_LORA
    # same dtype: a nonzero T is a real change
    base16 = base.to(torch.bfloat16)
    other = (base16.float() + 1).to(torch.bfloat16)
    tv16 = other.float() - base16.float()
    assert accumulate("x", tv16, None, other, base16, has_lora=False).category == CHANGED_NOT_LORA


def test_lora_takes_precedence_over_rounding_only():
    base = torch.randn(8, 4)
    finetuned = base.to(torch.bfloat16)  # T is only the round trip
    tv = finetuned.double() - base.double()
    lora = torch.full_like(tv, 1e-3)
    r = accumulate("w", tv, lora, finetuned, base)
    assert r.category == LORA_AND_CHANGED and not r.rounding_only


@given(
    flags=st.lists(
        st.tuples(st.booleans(), st.sampled_from(["zero", "round_trip", "real"])),
        min_size=1,
        max_size=12,
    )
)
@settings(max_examples=60, deadline=None)
def test_categories_partition_tensors(flags):
    results = []
    for i, (has_lora, change) in enumerate(flags):
        base = torch.randn(3, 2)
        finetuned = {
            "zero": base.clone(),
            "round_trip": base.to(torch.bfloat16),
            "real": base + 1,
        }[change]
        tv = finetuned.double() - base.double()
        lora = torch.ones_like(tv) if has_lora else None
        results.append(accumulate(f"t{i}", tv, lora, finetuned, base, has_lora=has_lora))
    counts = {c: sum(r.category == c for r in results) for c in CATEGORIES}
    assert sum(counts.values()) == len(flags)
    for r, (has_lora, change) in zip(results, flags, strict=True):
        assert r.has_lora == has_lora
        assert r.changed == (change != "zero")
        assert r.rounding_only == (not has_lora and change == "round_trip")


# -- errors -----------------------------------------------------------------------------------


def make(has_lora=True, numel=4, name="w"):
    return TensorAccumulator(
        name,
        numel=numel,
        has_lora=has_lora,
        finetuned_dtype=torch.bfloat16,
        base_dtype=torch.float32,
    )


def test_errors_name_the_tensor():
    t = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(MismatchError, match="^w: a tensor with a LoRA delta needs"):
        make().update(tv=t)
    with pytest.raises(MismatchError, match="declared without LoRA"):
        make(has_lora=False).update(tv=t, lora=t)
    with pytest.raises(MismatchError, match="not torch.float64"):
        make().update(tv=t, lora=t.float())
    with pytest.raises(MismatchError, match=r"shape \(1, 2\)"):
        make().update(tv=t, lora=t[:1])
    with pytest.raises(MismatchError, match="finetuned chunk is torch.float16"):
        make().update(tv=t, lora=t, finetuned=t.half())
    with pytest.raises(MismatchError, match="received 8 elements, numel is 4"):
        acc = make()
        acc.update(tv=t, lora=t)
        acc.update(tv=t, lora=t)
    with pytest.raises(MismatchError, match="received 0 of 4 elements"):
        make().result()
    with pytest.raises(MismatchError, match="different tensors"):
        make().merge(make(name="v"))
    with pytest.raises(MismatchError, match="into itself"):
        acc = make()
        acc.merge(acc)
    with pytest.raises(InputError, match="unknown category"):
        TensorComparison("w", "changed", 1, *([None] * 8))


def test_merge_detects_double_feeding():
    t = torch.zeros(2, 2, dtype=torch.float64)
    a, b = make(), make()
    a.update(tv=t, lora=t)
    b.update(tv=t, lora=t)
    with pytest.raises(MismatchError, match="fed twice"):
        a.merge(b)


def test_to_dict_and_from_dict_round_trip():
    base, finetuned, tv, delta = merged(5, 3, torch.bfloat16, seed=3)
    r = accumulate("w", tv, delta, finetuned, base, merged=finetuned)
    d = r.to_dict()
    assert isinstance(d["ulp_counts"], list) and d["finetuned_dtype"] == "bfloat16"
    assert list(d) == [
        "name", "category", "numel", "finetuned_dtype", "cosine", "max_abs_diff", "mean_abs_diff",
        "relative_error", "lora_norm", "tv_norm", "rounding_bound", "rounding_floor",
        "bit_exact_merge", "ulp_counts", "ulp_max", "nonfinite",
    ]  # fmt: skip
    assert TensorComparison.from_dict(d) == r
    with pytest.raises(InputError, match="lacks cosine"):
        TensorComparison.from_dict({k: v for k, v in d.items() if k != "cosine"})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_chunks_match_cpu():
    base, finetuned, tv, delta = merged(64, 33, torch.bfloat16, seed=4)
    cpu = accumulate("w", tv, delta, finetuned, base, cuts=(7, 40))
    dev = accumulate("w", tv.cuda(), delta.cuda(), finetuned.cuda(), base.cuda(), cuts=(7, 40))
    for name in (*FIGURES, "rounding_bound", "rounding_floor", "bit_exact_merge"):
        assert getattr(dev, name) == pytest.approx(getattr(cpu, name), rel=1e-12), name
    assert (dev.category, dev.ulp_counts, dev.ulp_max) == (
        cpu.category,
        cpu.ulp_counts,
        cpu.ulp_max,
    )
    tiny = accumulate("t", tv.cuda() * 1e-300, delta.cuda() * 1e-300)  # scaled sums on CUDA
    assert tiny.cosine == pytest.approx(cpu.cosine, rel=1e-12)
    assert tiny.relative_error == pytest.approx(cpu.relative_error, rel=1e-12)
    b32 = torch.randn(16, 8)
    plain = accumulate(
        "p",
        (b32.to(torch.bfloat16).float() - b32).cuda(),
        None,
        b32.to(torch.bfloat16).cuda(),
        b32.cuda(),
        cuts=(3,),
        has_lora=False,
    )
    assert plain.category == ROUNDING_ONLY


def test_rounding_fields_null_for_dtypes_without_a_bound():
    with pytest.raises(InputError, match="no rounding bound for torch.float8_e4m3fn"):
        half_ulp(torch.zeros(2, dtype=torch.float8_e4m3fn))
    tv = torch.ones(2, 2, dtype=torch.float64)
    r = accumulate("w", tv, tv, tv.to(torch.float8_e4m3fn))
    assert r.rounding_bound is None and r.ulp_counts is None and r.cosine == 1.0


def test_update_zero_equals_feeding_a_zero_task_vector():
    """compare's shortcut for untouched chunks (equal bytes) gives the same result as
    feeding their all-zero T, for unchanged and partly changed tensors alike."""
    base = torch.randn(6, 5).to(torch.bfloat16)
    changed = base.clone()
    changed[4, 2] += 1
    for finetuned in (base.clone(), changed):
        a = TensorAccumulator(
            "w", numel=30, has_lora=False, finetuned_dtype=torch.bfloat16, base_dtype=torch.bfloat16
        )
        b = TensorAccumulator(
            "w", numel=30, has_lora=False, finetuned_dtype=torch.bfloat16, base_dtype=torch.bfloat16
        )
        for rows in (slice(0, 3), slice(3, 6)):
            f, x = finetuned[rows], base[rows]
            tv = f.float() - x.float()
            a.update(tv=tv, finetuned=f, base=x)
            if torch.equal(f, x):
                b.update_zero(f)
            else:
                b.update(tv=tv, finetuned=f, base=x)
        assert a.result() == b.result()
    with pytest.raises(MismatchError):
        TensorAccumulator(
            "w", numel=2, has_lora=True, finetuned_dtype=None, base_dtype=None
        ).update_zero(torch.zeros(2))
