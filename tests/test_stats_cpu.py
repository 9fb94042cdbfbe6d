"""The CPU path of TensorAccumulator (stream_tv.stats.cpu) gives the device path's figures:
every count, category and maximum equal, every sum within float64 rounding."""

import dataclasses
import math

import pytest
import torch

from stream_tv.stats import TensorAccumulator, fused
from stream_tv.stats import accumulator as accumulator_module
from stream_tv.stats import cpu as cpu_module

F64 = torch.float64


@pytest.fixture(params=["torch", "numba"])
def kernels(request, monkeypatch):
    """The CPU path with its torch blocks, and with the compiled ones (where numba is)."""
    if request.param == "numba" and not fused.available():
        pytest.skip(fused.reason())
    monkeypatch.setattr(cpu_module, "FUSED", request.param == "numba")
    return request.param


def feed(monkeypatch, cpu_path: bool, chunks, **kw):
    monkeypatch.setattr(accumulator_module, "CPU_FIGURES", cpu_path)
    acc = TensorAccumulator("w", **kw)
    for chunk in chunks:
        acc.update(**chunk)
    return acc.result()


def assert_same(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, float) and isinstance(y, float):
            assert math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-300), (field.name, x, y)
        else:
            assert x == y, (field.name, x, y)


def lora_case(dtype, rows=300, cols=513, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    bm = torch.randn(rows, 8, generator=g, dtype=F64) * 0.01
    am = torch.randn(8, cols, generator=g, dtype=F64) * 0.01
    lo = bm @ am * 2.0
    merged = (w.double() + lo).to(dtype)  # our merge, near enough: some elements differ
    f = merged.clone()
    f.view(-1)[::97] = w.view(-1)[::97]  # and some elements unchanged
    return w, f, lo, merged


def chunks_of(rows, *tensors, step=97):
    return [tuple(t[a : a + step] for t in tensors) for a in range(0, rows, step)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, F64])
@pytest.mark.parametrize("given_tv", [True, False])
def test_lora_figures_agree(monkeypatch, kernels, dtype, given_tv):
    w, f, lo, merged = lora_case(dtype)
    parts = []
    for wc, fc, lc, mc in chunks_of(w.shape[0], w, f, lo, merged):
        tv = fc.double() - wc.double() if given_tv else None
        parts.append({"tv": tv, "lora": lc, "finetuned": fc, "base": wc, "merged": mc})
    kw = {"numel": w.numel(), "has_lora": True, "finetuned_dtype": dtype, "base_dtype": dtype}
    cpu, dev = feed(monkeypatch, True, parts, **kw), feed(monkeypatch, False, parts, **kw)
    assert cpu.ulp_counts is not None and cpu.bit_exact_merge is not None
    assert_same(cpu, dev)


@pytest.mark.parametrize("extreme", ["tiny", "huge", "nan", "inf", "zero"])
def test_lora_figures_agree_at_the_extremes(monkeypatch, kernels, extreme):
    w, f, lo, merged = lora_case(F64, rows=64, cols=300)
    if extreme == "tiny":
        w, f, lo, merged = (x * 1e-300 for x in (w, f, lo, merged))
    elif extreme == "huge":
        w, f, lo, merged = (x * 1e300 for x in (w, f, lo, merged))
    elif extreme == "nan":
        lo[3, 5] = math.nan
    elif extreme == "inf":
        f[7, 2] = math.inf
    else:
        lo.zero_()
        f = w.clone()
    kw = {"numel": w.numel(), "has_lora": True, "finetuned_dtype": F64, "base_dtype": F64}
    parts = [
        {"tv": fc - wc, "lora": lc, "finetuned": fc, "base": wc, "merged": mc}
        for wc, fc, lc, mc in chunks_of(64, w, f, lo, merged, step=20)
    ]
    assert_same(feed(monkeypatch, True, parts, **kw), feed(monkeypatch, False, parts, **kw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("extreme", ["tiny-lora", "nan", "inf", "zero"])
def test_narrow_figures_agree_at_the_extremes(monkeypatch, kernels, dtype, extreme):
    # the dtypes the compiled blocks take: each extreme sends its chunk's block the torch
    # way (a sum outside the safe range, a NaN, an infinity, a zero sum); the others stay.
    w, f, lo, merged = lora_case(dtype, rows=60, cols=300)
    if extreme == "tiny-lora":
        lo[:20] *= 1e-200
    elif extreme == "nan":
        lo[3, 5] = math.nan
    elif extreme == "inf":
        f[7, 2] = math.inf
    else:
        lo[:20].zero_()
        f[:20] = w[:20]
    kw = {"numel": w.numel(), "has_lora": True, "finetuned_dtype": dtype, "base_dtype": dtype}
    parts = [
        {"tv": None, "lora": lc, "finetuned": fc, "base": wc, "merged": mc}
        for wc, fc, lc, mc in chunks_of(60, w, f, lo, merged, step=20)
    ]
    assert_same(feed(monkeypatch, True, parts, **kw), feed(monkeypatch, False, parts, **kw))


@pytest.mark.parametrize(
    ("f_dtype", "w_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, F64)],
)
def test_plain_figures_agree(monkeypatch, f_dtype, w_dtype):
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(200, 301, generator=g) * 0.02).to(w_dtype)
    f = w.to(f_dtype)  # rounding only ...
    kw = {"numel": w.numel(), "has_lora": False, "finetuned_dtype": f_dtype, "base_dtype": w_dtype}
    for changed in (False, True):
        if changed:  # ... or changed
            f = (w.double() + torch.randn(200, 301, generator=g, dtype=F64) * 1e-3).to(f_dtype)
        parts = [
            {"tv": fc.double() - wc.double(), "finetuned": fc, "base": wc}
            for wc, fc in chunks_of(200, w, f, step=64)
        ]
        cpu, dev = feed(monkeypatch, True, parts, **kw), feed(monkeypatch, False, parts, **kw)
        assert_same(cpu, dev)


def test_tv_none_needs_both_chunks():
    acc = TensorAccumulator(
        "w", numel=4, has_lora=True, finetuned_dtype=torch.bfloat16, base_dtype=torch.bfloat16
    )
    with pytest.raises(Exception, match="tv=None"):
        acc.update(tv=None, lora=torch.zeros(4, dtype=F64), finetuned=torch.zeros(4))
