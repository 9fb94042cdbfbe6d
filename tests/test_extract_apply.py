"""extract / apply against whole-model float64 arithmetic, the round trip, and real loaders.

References are computed here, in float64, without the library's ops:

- extract: ``correctly_rounded(ft64 - base64, out_dtype)``, compared bit for bit. (Not
  ``(ft64 - base64).to(out_dtype)``: torch converts float64 to bf16/fp16 through float32,
  rounding twice; ``correctly_rounded`` rounds once, by scaling and ``torch.round``.)
- apply: ``base64 + sum(scale_i * tv64_i)``. The contract computes in float32 and rounds once
  to the output dtype, so the assertion is ``|out - ref| <= ulp_T(ref) + sum_k ulp32(p_k)/2``
  where ``p_k`` are the partial sums: one ulp of the output dtype T (float32 rounding can
  push a value across a rounding boundary of T), plus float32's rounding of each partial
  sum, which only shows under cancellation. Exact (bit for bit) in the one-TV scale-1 case
  on exact differences: that is the round trip.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tensors, save_checkpoint, tiny_state
from safetensors import safe_open
from safetensors.torch import load_file

from stream_tv import RunOptions, apply_task_vectors, extract_task_vector, ops
from stream_tv.errors import MismatchError

F64 = torch.float64
FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# ---- float64 references ------------------------------------------------------------------


def correctly_rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 ``x`` to ``dtype`` once, to nearest even (subnormals and overflow too)."""
    x = x.to(F64)
    if dtype == F64:
        return x.clone()
    fi = torch.finfo(dtype)
    p = 1 - int(torch.log2(torch.tensor(fi.eps, dtype=F64)))  # significand bits
    emin = int(torch.log2(torch.tensor(fi.tiny, dtype=F64)))  # exponent of the smallest normal
    _, e = torch.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
    q = (e - 1).clamp(min=emin) - (p - 1)  # exponent of one ulp at x
    step = torch.pow(torch.tensor(2.0, dtype=F64), q.to(F64))
    r = torch.round(x / step) * step  # both exact: powers of two in float64's range
    r = torch.where(r.abs() > fi.max, torch.copysign(torch.tensor(float("inf"), dtype=F64), r), r)
    r = torch.where(torch.isfinite(x), r, x)
    return r.to(dtype)  # exact: r is representable


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64), the unit of the tolerances."""
    fi = torch.finfo(dtype)
    p = 1 - int(torch.log2(torch.tensor(fi.eps, dtype=F64)))
    emin = int(torch.log2(torch.tensor(fi.tiny, dtype=F64)))
    _, e = torch.frexp(x.to(F64))
    return torch.pow(torch.tensor(2.0, dtype=F64), ((e - 1).clamp(min=emin) - (p - 1)).to(F64))


def exact_difference(ft: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``ft - base`` in float64, asserting it is exact (TwoSum error is zero)."""
    a, b = ft.to(F64), -base.to(F64)
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    assert torch.all(err == 0), "test data must have exact float64 differences"
    return s


def float32_difference_is_exact(ft: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per element: is ``ft - base`` exactly representable in float32?"""
    a, b = ft.to(F64), -base.to(F64)
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    return (err == 0) & (s.to(torch.float32).to(F64) == s)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (tells -0.0 from 0.0), dtype and shape included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def default_tv_dtype(b: torch.Tensor, f: torch.Tensor) -> torch.dtype:
    return F64 if F64 in (b.dtype, f.dtype) else torch.float32


def opts(chunk="1GB", shard="5GB", **kw) -> RunOptions:
    kw.setdefault("on_nonfinite", "warn")
    return RunOptions(device="cpu", chunk_size=chunk, max_shard_size=shard, progress=False, **kw)


def test_reference_rounds_once():
    """The reference itself: the double-rounding trap that torch's own cast falls into."""
    x = torch.tensor([1 + 2**-8 + 2**-24, 1 + 2**-11 + 2**-30, 2.0**-133, 1e39], dtype=F64)
    assert correctly_rounded(x[:1], torch.bfloat16).item() == 1 + 2**-7
    assert x[:1].to(torch.bfloat16).item() == 1.0  # torch: float64 -> float32 -> bf16
    assert correctly_rounded(x[1:2], torch.float16).item() == 1 + 2**-10
    assert correctly_rounded(x[2:3], torch.bfloat16).item() == 2.0**-133  # bf16 subnormal
    assert correctly_rounded(x[3:], torch.float16).item() == float("inf")
    y = torch.randn(10_000, dtype=torch.float32).to(F64)  # float32 values: one rounding anyway
    for dt in (torch.bfloat16, torch.float16):
        assert same_bits(correctly_rounded(y, dt), y.to(dt))


# ---- extract -----------------------------------------------------------------------------


def check_extract(out, base, ft, dtype=None, skipped=()):
    tv = load_tensors(out)
    expected = set()
    for name, b in base.items():
        f = ft[name]
        if not b.is_floating_point() or name in skipped:
            assert name not in tv
            continue
        expected.add(name)
        out_dtype = dtype or default_tv_dtype(b, f)
        ref = correctly_rounded(exact_difference(f, b), out_dtype)
        assert same_bits(tv[name], ref), name
    assert set(tv) == expected


CHUNKS = ["64", "700B", "4KB", "1GB"]  # 64 bytes: two-row chunks everywhere


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16, torch.float32])
def test_extract_equals_correctly_rounded_reference(tiny_pair, tmp_path, dtype):
    base, ft, bdir, fdir = tiny_pair
    outputs = []
    for i, chunk in enumerate(CHUNKS):
        out = tmp_path / f"tv{i}"
        r = extract_task_vector(bdir, fdir, out, dtype=dtype, options=opts(chunk, shard="2KB"))
        check_extract(out, base, ft, dtype)
        assert r.non_float == ["model.position_ids"]
        assert r.shards == len(list(out.glob("model-*.safetensors"))) > 1
        outputs.append(out)
        if dtype == torch.float16:  # 65504 -> -65504: the difference overflows fp16
            assert r.nonfinite == {"model.edge_fp16": 1}
        else:
            assert r.nonfinite == {}
    # Determinism: the same bytes whatever the chunk size.
    names = sorted(p.name for p in outputs[0].iterdir())
    for other in outputs[1:]:
        assert sorted(p.name for p in other.iterdir()) == names
        for n in names:
            if n.endswith(".safetensors"):
                assert (other / n).read_bytes() == (outputs[0] / n).read_bytes(), n


def test_extract_fp16_to_bf16_rounds_once(tiny_pair, tmp_path):
    """-2^-24 -> 1 + 2^-8 (fp16): the difference 1 + 2^-8 + 2^-24 needs 25 bits; rounding it
    to float32 first lands on the bf16 tie and gives 1.0; rounding once gives 1 + 2^-7."""
    _, _, bdir, fdir = tiny_pair
    extract_task_vector(bdir, fdir, tmp_path / "tv", dtype=torch.bfloat16, options=opts())
    edge = load_tensors(tmp_path / "tv")["model.edge_fp16"]
    assert edge[3].item() == 1 + 2**-7


def test_extract_across_shard_sizes_same_tensors(tiny_pair, tmp_path):
    base, ft, bdir, fdir = tiny_pair
    ref = None
    for shard in ["1", "1KB", "3KB", "5GB"]:
        out = tmp_path / shard
        r = extract_task_vector(bdir, fdir, out, options=opts("256", shard=shard))
        tensors = load_tensors(out)
        if shard == "1":  # every tensor in a shard of its own
            assert r.shards == len(tensors)
        if shard == "5GB":
            assert r.shards == 1
        if ref is None:
            ref = tensors
        assert ref.keys() == tensors.keys()
        assert all(same_bits(ref[k], tensors[k]) for k in ref)
    check_extract(tmp_path / "5GB", base, ft)


def test_extract_skip_unchanged(tiny_pair, tmp_path):
    base, ft, bdir, fdir = tiny_pair
    out = tmp_path / "tv"
    r = extract_task_vector(bdir, fdir, out, skip_unchanged=True, options=opts("64"))
    # identical bytes: the frozen tensors, and the empty one (vacuously)
    frozen = [
        "model.layers.0.empty",
        "model.layers.1.frozen.weight",
        "model.layers.1.frozen16.weight",
    ]
    assert r.skipped == frozen
    check_extract(out, base, ft, skipped=frozen)
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["skipped_unchanged"] == frozen
    assert meta["non_float_unchanged"] == ["model.position_ids"]
    assert meta["operation"] == "extract" and meta["base"] == str(bdir)
    assert meta["finetuned"] == str(fdir)
    # Without the flag, identical tensors are written (as zeros).
    r2 = extract_task_vector(bdir, fdir, tmp_path / "all", options=opts())
    assert r2.skipped == [] and r2.tensors == r.tensors + 3
    zeros = load_tensors(tmp_path / "all")[frozen[1]]
    assert same_bits(zeros, torch.zeros(8, 8))


def test_extract_unequal_integer_buffer_is_an_error(tmp_path):
    base, ft = tiny_state()
    ft["model.position_ids"] = ft["model.position_ids"].clone()
    ft["model.position_ids"][0, 7] = 99
    b = save_checkpoint(tmp_path / "b", base, shards=2)
    f = save_checkpoint(tmp_path / "f", ft, shards=2)
    with pytest.raises(MismatchError, match="model.position_ids"):
        extract_task_vector(b, f, tmp_path / "tv", options=opts("64"))
    assert not (tmp_path / "tv").exists()  # refused before anything was written


def test_extract_missing_integer_buffer_is_reported(tmp_path):
    base, ft = tiny_state()
    del ft["model.position_ids"]
    b = save_checkpoint(tmp_path / "b", base, shards=2)
    f = save_checkpoint(tmp_path / "f", ft, shards=2)
    r = extract_task_vector(b, f, tmp_path / "tv", options=opts())
    assert r.missing == ["model.position_ids"] and r.non_float == []
    check_extract(tmp_path / "tv", base, ft | {"model.position_ids": base["model.position_ids"]})
    meta = json.loads((tmp_path / "tv" / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["missing"] == ["model.position_ids"]


def test_extract_missing_float_tensors(tmp_path):
    base, ft = tiny_state()
    gone = ["model.layers.0.row", "model.layers.0.scale", "lm_head.weight", "model.edge_bf16"]
    for n in gone:
        del ft[n]
    ft["extra.weight"] = torch.ones(2)
    b = save_checkpoint(tmp_path / "b", base, shards=3)
    f = save_checkpoint(tmp_path / "f", ft, shards=3)
    with pytest.raises(MismatchError) as e:
        extract_task_vector(b, f, tmp_path / "tv", options=opts())
    msg = str(e.value)
    assert "4 float tensor(s) only in the base" in msg and "1 only in the fine-tuned" in msg
    assert "model.layers.0.row" in msg and "extra.weight" in msg and "--allow-missing" in msg
    assert not (tmp_path / "tv").exists()
    r = extract_task_vector(b, f, tmp_path / "tv", allow_missing=True, options=opts())
    assert sorted(r.missing) == sorted([*gone, "extra.weight"])
    kept = {k: v for k, v in base.items() if k not in gone}
    check_extract(tmp_path / "tv", kept, ft)


def test_extract_dtype_mismatch_computes_in_float32(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(9, 5, generator=g), "v": torch.randn(4, generator=g)}
    ft = {"w": (base["w"] * 1.01).to(torch.bfloat16), "v": base["v"] + 1}
    b = save_checkpoint(tmp_path / "b", base)
    f = save_checkpoint(tmp_path / "f", ft)
    r = extract_task_vector(b, f, tmp_path / "tv", options=opts("64"))
    assert r.dtype_mismatches == ["w"]
    tv = load_tensors(tmp_path / "tv")
    assert tv["w"].dtype == torch.float32
    check_extract(tmp_path / "tv", base, ft)


# ---- apply -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", ["64", "1GB"])
def test_round_trip_is_bit_exact(tiny_pair, tmp_path, chunk):
    """apply(base, extract(base, ft)) == ft, bit for bit, for bf16/fp16/fp32/fp64 tensors."""
    base, ft, bdir, fdir = tiny_pair
    extract_task_vector(bdir, fdir, tmp_path / "tv", options=opts(chunk))
    r = apply_task_vectors(bdir, [tmp_path / "tv"], tmp_path / "m", options=opts(chunk, "3KB"))
    out = load_tensors(tmp_path / "m")
    assert out.keys() == base.keys()
    for name in base:
        assert same_bits(out[name], ft[name]), name
    assert r.untouched == ["model.position_ids"] and r.scales == [1.0]
    # Not trivially exact: some differences were inexact in float32 and still round-trip.
    b, f = base["model.edge_bf16"], ft["model.edge_bf16"]
    assert not float32_difference_is_exact(f, b).all()
    assert {d for d in (t.dtype for t in base.values())} >= set(FLOATS)


def test_round_trip_with_skip_unchanged(tiny_pair, tmp_path):
    """Tensors left out of a task vector count as zero: the base is copied."""
    base, ft, bdir, fdir = tiny_pair
    extract_task_vector(bdir, fdir, tmp_path / "tv", skip_unchanged=True, options=opts())
    r = apply_task_vectors(bdir, [tmp_path / "tv"], tmp_path / "m", options=opts("64"))
    out = load_tensors(tmp_path / "m")
    assert all(same_bits(out[n], ft[n]) for n in base)
    assert r.untouched == [
        "model.layers.0.empty",
        "model.layers.1.frozen.weight",
        "model.layers.1.frozen16.weight",
        "model.position_ids",
    ]


def _random_tv(base, seed, *, dtype=torch.float32, keep=None):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (0.05 * torch.randn(v.shape, generator=g, dtype=F64)).to(dtype)
        for k, v in base.items()
        if v.is_floating_point() and (keep is None or keep(k))
    }


def check_apply(out, base, tvs, scales, dtype=None):
    """``out`` against base64 + sum(scale * tv64) within the documented tolerance."""
    got = load_tensors(out)
    assert got.keys() == base.keys()
    for name, b in base.items():
        o = got[name]
        if not b.is_floating_point():
            assert same_bits(o, b)
            continue
        out_dtype = dtype or b.dtype
        assert o.dtype == out_dtype and o.shape == b.shape
        work64 = F64 in (b.dtype, out_dtype, *(tv[name].dtype for tv in tvs if name in tv))
        acc = b.to(F64)
        slack = torch.zeros_like(acc)
        for tv, s in zip(tvs, scales, strict=True):
            if name in tv:
                s = s if work64 else torch.tensor(s, dtype=torch.float32).item()  # alpha in f32
                acc = acc + s * tv[name].to(F64)
                if not work64:
                    slack += ulp(acc, torch.float32) / 2
        rounded = correctly_rounded(acc, out_dtype)
        over = ~torch.isfinite(rounded)  # overflow: the same infinity
        assert same_bits(o[over], rounded[over]), name
        o, acc, slack = o[~over], acc[~over], slack[~over]
        err = (o.to(F64) - acc).abs()
        assert torch.all(err <= ulp(acc, out_dtype) + slack), name
        if out_dtype != torch.float32 and not work64:  # bf16/fp16: at most one ulp, plainly
            assert torch.all(err <= ulp(acc, out_dtype)), name


def test_apply_several_task_vectors_with_scales(tiny_pair, tmp_path):
    base, _, bdir, _ = tiny_pair
    tv_a = _random_tv(base, 1)
    tv_b = _random_tv(base, 2, dtype=torch.bfloat16, keep=lambda k: "layers.0" in k)  # partial
    tv_c = _random_tv(base, 3, dtype=F64, keep=lambda k: k.startswith("lm_head"))
    paths = [
        save_checkpoint(tmp_path / n, tv, shards=2)
        for n, tv in (("a", tv_a), ("b", tv_b), ("c", tv_c))
    ]
    scales = [0.5, -1.5, 0.3]
    outs = []
    for chunk in ("64", "1GB"):
        out = tmp_path / f"m{chunk}"
        apply_task_vectors(bdir, paths, out, scales=scales, options=opts(chunk, "2KB"))
        check_apply(out, base, [tv_a, tv_b, tv_c], scales)
        outs.append(out)
    for f in outs[0].glob("*.safetensors"):
        assert f.read_bytes() == (outs[1] / f.name).read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_dtype_option(tiny_pair, tmp_path, dtype):
    base, _, bdir, _ = tiny_pair
    tv = _random_tv(base, 4)
    save_checkpoint(tmp_path / "tv", tv)
    apply_task_vectors(bdir, [tmp_path / "tv"], tmp_path / "m", dtype=dtype, options=opts("64"))
    check_apply(tmp_path / "m", base, [tv], [1.0], dtype=dtype)


def test_apply_float64_rounds_once_to_narrow_dtype(tmp_path):
    """float64 inputs with --dtype bf16/fp16: one rounding (torch's own cast rounds twice)."""
    v = 1 + 2**-8 + 2**-30  # nearest bf16: 1 + 2^-7; via float32: 1 + 2^-8, then the tie -> 1
    base = {"w": torch.tensor([1 + 2**-8, v], dtype=F64), "copied": torch.tensor([v], dtype=F64)}
    save_checkpoint(tmp_path / "b", base)
    save_checkpoint(tmp_path / "tv", {"w": torch.tensor([2**-30, 0.0], dtype=F64)})
    for dtype, want in ((torch.bfloat16, 1 + 2**-7), (torch.float16, 1 + 2**-8)):
        out = tmp_path / str(dtype)
        apply_task_vectors(tmp_path / "b", [tmp_path / "tv"], out, dtype=dtype, options=opts())
        got = load_tensors(out)
        assert got["w"].tolist() == [want, want] and got["copied"].tolist() == [want]


def test_apply_negation_and_one_scale_for_all(tiny_pair, tmp_path):
    base, ft, bdir, fdir = tiny_pair
    extract_task_vector(bdir, fdir, tmp_path / "tv", options=opts())
    tv = load_tensors(tmp_path / "tv")
    r = apply_task_vectors(
        bdir, [tmp_path / "tv"], tmp_path / "neg", scales=[-1.0], options=opts("64")
    )
    assert r.scales == [-1.0]
    check_apply(tmp_path / "neg", base, [tv], [-1.0])
    r = apply_task_vectors(
        bdir, [tmp_path / "tv", tmp_path / "tv"], tmp_path / "half", scales=[0.5], options=opts()
    )
    assert r.scales == [0.5, 0.5]
    check_apply(tmp_path / "half", base, [tv, tv], [0.5, 0.5])


def test_apply_rejects_foreign_task_vector(tiny_pair, tmp_path):
    base, _, bdir, _ = tiny_pair
    save_checkpoint(tmp_path / "tv", {"not.in.base": torch.ones(3)})
    with pytest.raises(MismatchError, match="not.in.base"):
        apply_task_vectors(bdir, [tmp_path / "tv"], tmp_path / "m", options=opts())
    save_checkpoint(tmp_path / "tv2", {"model.layers.0.row": torch.ones(33)})
    with pytest.raises(MismatchError, match=r"model\.layers\.0\.row.*\[1, 33\].*\[33\]"):
        apply_task_vectors(bdir, [tmp_path / "tv2"], tmp_path / "m", options=opts())
    with pytest.raises(Exception, match="2 scales for 1 inputs"):
        apply_task_vectors(bdir, [tmp_path / "tv"], tmp_path / "m", scales=[1, 2], options=opts())


# ---- where the round trip cannot hold ----------------------------------------------------


def roundtrip(ft: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """What ``apply(base, extract(base, ft))`` computes, through the library's own ops."""
    tv = ops.subtract(ft, base, out=torch.empty(ft.shape, dtype=torch.float32))
    return ops.add_scaled(base, [(tv, 1.0)], out=torch.empty_like(ft))


def all_finite_values(dtype: torch.dtype) -> torch.Tensor:
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return v[torch.isfinite(v.float())]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_rule_exhaustive(dtype):
    """Every finite fine-tuned value against a spread of base values: the round trip fails
    exactly where |ft| < |base| and ft - base is not a float32 number (or the difference
    overflows float32), and nowhere else. -0.0 comes back as +0.0 (value-equal)."""
    ft = all_finite_values(dtype)
    g = torch.Generator().manual_seed(0)
    pool = all_finite_values(dtype)
    bases = torch.cat(
        [
            pool[torch.randint(0, len(pool), (20,), generator=g)],
            torch.tensor([1.0, -3.0, 2.8e-7, 1e-3, 6e-8, 0.0], dtype=dtype),
        ]
    )
    failures = 0
    for b in bases:
        bb = b.expand(ft.shape)
        got = roundtrip(ft, bb)
        ok = (got.view(torch.int16) == ft.view(torch.int16)) | ((got == 0) & (ft == 0))
        d = ft.to(F64) - bb.to(F64)
        overflow = d.abs() > torch.finfo(torch.float32).max
        predicted_fail = (
            (ft.to(F64).abs() < bb.to(F64).abs()) & ~float32_difference_is_exact(ft, bb)
        ) | overflow
        assert torch.equal(~ok, predicted_fail), (b.item(), ft[ok == predicted_fail][:5])
        failures += int(predicted_fail.sum())
        # exact whenever the exponents are at most 24 - p apart (16 for bf16, 13 for fp16)
        p = {torch.bfloat16: 8, torch.float16: 11}[dtype]
        gap = (torch.frexp(ft.to(F64))[1] - torch.frexp(bb.to(F64))[1]).abs()
        near = (gap <= 24 - p) & (ft != 0) & (bb != 0) & ~overflow
        assert float32_difference_is_exact(ft[near], bb[near]).all()
    assert failures > 0


def test_round_trip_rule_float32_sampled():
    """fp32 models: exact differences always round-trip; an inexact difference with
    |ft| < |base| never does; with |ft| >= |base| it does iff the float32 error of the
    difference is below half an ulp of ft (so usually, not always)."""
    g = torch.Generator().manual_seed(1)
    n = 200_000
    scale = torch.exp2(torch.randint(-40, 40, (2, n), generator=g).float())
    ft, base = torch.randn(2, n, generator=g) * scale
    got = roundtrip(ft, base)
    exact = float32_difference_is_exact(ft, base)
    small = ft.abs() < base.abs()
    assert torch.equal(got[exact], ft[exact])
    assert torch.all(got[small & ~exact] != ft[small & ~exact])
    tv = ft.to(F64) - base.to(F64)
    err = (tv.float().to(F64) - tv).abs()
    half = ulp(ft, torch.float32) / 2
    big = ~small & ~exact & (err != half)  # ties go to even, either way
    assert torch.equal(got[big] == ft[big], err[big] < half[big])


def test_round_trip_failure_end_to_end(tmp_path):
    """The documented failure through the CLI path: a fine-tuned value 2^-20 times its base
    with bits below float32's reach comes back wrong; every other element is exact."""
    base = {"w": torch.tensor([1.0078125, 1.0078125, 3.0, 2.8e-7], dtype=torch.bfloat16)}
    ft = {"w": torch.tensor([2.0**-20 * 1.0078125, 0.5, 3.0, 0.0786], dtype=torch.bfloat16)}
    save_checkpoint(tmp_path / "b", base)
    save_checkpoint(tmp_path / "f", ft)
    extract_task_vector(tmp_path / "b", tmp_path / "f", tmp_path / "tv", options=opts())
    apply_task_vectors(tmp_path / "b", [tmp_path / "tv"], tmp_path / "m", options=opts())
    got = load_tensors(tmp_path / "m")["w"]
    assert (got != ft["w"]).tolist() == [True, False, False, False]
    assert got[0].item() == 2.0**-20  # the low bit of the fine-tuned value is lost
    assert float32_difference_is_exact(ft["w"], base["w"]).tolist() == [False, True, True, False]


# ---- the layout is real ------------------------------------------------------------------


def test_written_layout_is_hugging_face(tiny_pair, tmp_path):
    _, _, bdir, fdir = tiny_pair
    out = tmp_path / "tv"
    r = extract_task_vector(bdir, fdir, out, options=opts("64", shard="1500B"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    assert n == r.shards > 2
    assert [p.name for p in shards] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    total = 0
    seen = {}
    for p in shards:
        with safe_open(p, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            keys = list(f.keys())
            for k in keys:
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
                assert same_bits(t, load_file(p)[k])
        seen.update(dict.fromkeys(keys, p.name))
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total == r.bytes_written
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.name for p in shards), "model.safetensors.index.json"]
    )  # no temporary or state files left


def test_apply_output_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tv = _random_tv(base, 5)
    save_checkpoint(tmp_path / "tv", tv, shards=2)
    apply_task_vectors(
        tmp_path / "base",
        [tmp_path / "tv"],
        tmp_path / "out",
        scales=[0.5],
        options=opts("4KB", "20KB"),
    )
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "out" / "config.json").is_file()
    ref_state = {
        k: correctly_rounded(v.to(F64) + 0.5 * tv[k].to(F64), v.dtype) for k, v in base.items()
    }
    ref = transformers.LlamaForCausalLM(config)
    ref.load_state_dict(ref_state)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded(ids).logits, ref.eval()(ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(want, model.eval()(ids).logits)
