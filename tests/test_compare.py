"""``compare`` end to end on tiny real PEFT models, against a float64 whole-tensor reference.

The reference is computed here, independently of stream_tv: ``T = merged - base`` and
``L = scaling * B @ A`` (transposed for Conv1D and Embedding; the exact DoRA formula; for a
``modules_to_save`` copy, ``saved - base``) in float64, from PEFT's own in-memory modules
(so rsLoRA, ``rank_pattern`` and ``alpha_pattern`` come from PEFT's ``scaling``), and every
figure from whole tensors. ``compare`` must agree within 1e-9 relative with chunks far
smaller than the tensors, and two chunk sizes must agree within 1e-12.

`# subtle:` on fp32 models ``|L - T|`` sits at fp32 rounding level, about ``2**-24 |L|``, so
one float64 ulp of ``L`` (``2**-53 |L|``) is already ~1e-9 of ``max_abs_diff``. Any two
float64 evaluations of ``L`` that round differently (DoRA's column norms summed whole here,
in row chunks by the engine) then differ by ~1e-9 relative in the figures of ``L - T``. The
tolerance of those figures is therefore 1e-9 relative *or* a few float64 ulps of ``L``
(:func:`slack`), which is the most float64 can promise.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_tensors, save_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("peft")
pytest.importorskip("transformers")

import peft_fixtures as pf  # noqa: E402

from stream_tv import (
    RunOptions,  # noqa: E402
    compare,  # noqa: E402
)
from stream_tv.cli import cli  # noqa: E402
from stream_tv.engine import row_ranges  # noqa: E402
from stream_tv.io.outdir import OutputDir  # noqa: E402
from stream_tv.lora.runtime import OpenMerge  # noqa: E402
from stream_tv.report import CompareReport  # noqa: E402
from stream_tv.report.figures import verdict  # noqa: E402
from stream_tv.stats import CATEGORIES, TensorAccumulator  # noqa: E402

# The PEFT fixtures of the issue: Llama bf16/fp32, GPT-2 Conv1D (fan_in_fan_out), Embedding
# LoRA, DoRA (Linear: row norms; Conv1D and Embedding: column norms, two passes), rsLoRA with
# rank/alpha patterns, modules_to_save, lora_bias.
REFERENCE_CASES = [
    "llama-bf16-linear",
    "llama-fp32-linear",
    "gpt2-fp32-conv1d",
    "llama-bf16-embedding",
    "llama-fp32-dora",
    "gpt2-fp32-conv1d-dora",
    "llama-fp32-embedding-dora",
    "llama-fp16-rslora-patterns",
    "llama-bf16-modules-to-save",
    "starcoder2-fp32-lora-bias",
]
SMALL_CHUNK = "3KB"  # 2-row chunks for most tensors (one row of L, T costs ~1.7 KB)
LARGE_CHUNK = "40KB"
FIGURES = (
    "cosine",
    "max_abs_diff",
    "mean_abs_diff",
    "relative_error",
    "lora_norm",
    "tv_norm",
    "rounding_bound",
)
LT_FIGURES = FIGURES[:6]  # the L/T figures; the last one needs the finetuned values


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return lambda name: pf.build_case(name, tmp_path_factory)


def opts(chunk: str | int | None = SMALL_CHUNK) -> RunOptions:
    return RunOptions(device="cpu", chunk_size=chunk, progress=False)


def run(*args: object):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r


def close(a: float | None, b: float | None, rel: float = 1e-9, slack: float = 1e-300) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=slack)


ULPS = 4 * 2.0**-52  # a few float64 ulps, relative


def slack(row: dict, field: str) -> float:
    """What float64 rounding of ``L`` alone can move ``field`` by (see the module docstring)."""
    if "_lora_max" not in row:
        return 1e-300
    if field in ("max_abs_diff", "mean_abs_diff"):
        return ULPS * row["_lora_max"]
    if field == "relative_error" and row["tv_norm"]:
        return ULPS * row["lora_norm"] / row["tv_norm"]
    return 1e-300


# -- the float64 whole-tensor reference ---------------------------------------------------

# (significand bits, frexp exponent of the smallest normal): half an ulp of x is
# 2**(e - p - 1) for |x| = m * 2**e, m in [0.5, 1); zero and subnormals use the smallest
# normal binade.
_PRECISION = {torch.bfloat16: (8, -125), torch.float16: (11, -13), torch.float32: (24, -125)}


def half_ulp_ref(x: torch.Tensor) -> torch.Tensor:
    p, emin = _PRECISION[x.dtype]
    _, e = torch.frexp(x.double().abs())
    e = torch.where(x == 0, torch.full_like(e, emin), e).clamp_min(emin)
    return torch.ldexp(torch.ones(x.shape, dtype=torch.float64), (e - p - 1).double())


def peft_deltas(built: pf.Built) -> dict[str, torch.Tensor]:
    """Base tensor name -> float64 LoRA delta L, from PEFT's in-memory modules."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    base = pf.read_tensors(built.base)
    model = PeftModel.from_pretrained(pf.load_base(built.base), built.adapter)
    out: dict[str, torch.Tensor] = {}
    for mname, mod in model.named_modules():
        key = mname.removeprefix("base_model.model.") + ".weight"
        if isinstance(mod, ModulesToSaveWrapper):
            out[key] = mod.modules_to_save["default"].weight.double() - base[key].double()
            continue
        if not isinstance(mod, LoraLayer) or "default" not in mod.scaling:
            continue
        s = mod.scaling["default"]
        if "default" in mod.lora_A:
            a = mod.lora_A["default"].weight.double()
            b = mod.lora_B["default"].weight.double()
            d = s * (b @ a)  # (out, in)
            columns = mod.fan_in_fan_out  # Conv1D stores (in, out): norms over stored rows
            if columns:
                d = d.T
            bias = mod.lora_B["default"].bias
            if bias is not None:  # lora_bias
                out[key.removesuffix("weight") + "bias"] = s * bias.double()
        else:  # Embedding: A (r, vocab), B (dim, r), weight (vocab, dim)
            a = mod.lora_embedding_A["default"].double()
            b = mod.lora_embedding_B["default"].double()
            d = s * (b @ a).T
            columns = True
        if mod.use_dora.get("default", False):
            w = base[key].double()
            v = w + d
            mag = mod.lora_magnitude_vector["default"].weight.double().reshape(-1)
            if columns:
                d = v * (mag / v.norm(dim=0))[None, :] - w
            else:
                d = v * (mag / v.norm(dim=1))[:, None] - w
        out[key] = d
    return out


def reference(base_dir: Path, merged_dir: Path, deltas: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Every figure and category of every float tensor, from whole float64 tensors."""
    base, merged = load_tensors(base_dir), load_tensors(merged_dir)
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        f = merged[name]
        t = (f.double() - b.double()).reshape(-1)
        tv_norm = t.norm().item()
        changed = bool((t != 0).any())
        row = dict.fromkeys(FIGURES)
        row["numel"] = t.numel()
        row["tv_norm"] = tv_norm
        if name in deltas:
            lo = deltas[name].reshape(-1)
            diff = lo - t
            ln = lo.norm().item()
            bound = half_ulp_ref(f).reshape(-1)
            row.update(
                category="lora_and_changed" if changed else "lora_unchanged",
                cosine=(lo @ t).item() / ln / tv_norm if ln and tv_norm else None,
                max_abs_diff=diff.abs().max().item(),
                mean_abs_diff=diff.abs().mean().item(),
                relative_error=diff.norm().item() / tv_norm if tv_norm else None,
                lora_norm=ln,
                rounding_bound=bound.max().item(),
                _lora_max=lo.abs().max().item(),
            )
        elif not changed:
            row["category"] = "unchanged"
        elif f.dtype != b.dtype and torch.equal(b.to(f.dtype), f):
            row["category"] = "rounding_only"
        else:
            row["category"] = "changed_not_lora"
        out[name] = row
    return out


def assert_matches(report: CompareReport, ref: dict[str, dict], fields=FIGURES) -> None:
    got = {t.name: t for t in report.tensors}
    assert set(got) == set(ref)
    bad = []
    for name, want in ref.items():
        t = got[name]
        if t.category != want["category"] or t.numel != want["numel"]:
            bad.append((name, "category", t.category, want["category"]))
        for f in fields:
            if not close(getattr(t, f), want[f], slack=slack(want, f)):
                bad.append((name, f, getattr(t, f), want[f]))
    assert not bad, bad[:10]


@pytest.fixture
def chunk_rows(monkeypatch):
    """Records (tensor name, rows, lora given) of every TensorAccumulator.update(_zero)."""
    calls: list[tuple[str, int, bool]] = []
    original = TensorAccumulator.update

    def update(self, *, tv, lora=None, finetuned=None, base=None, merged=None):
        chunk = finetuned if tv is None else tv  # tv=None: T made from the raw chunks
        rows = chunk.shape[0] if chunk.dim() else 1
        calls.append((self.name, rows, lora is not None))
        return original(self, tv=tv, lora=lora, finetuned=finetuned, base=base, merged=merged)

    original_zero = TensorAccumulator.update_zero

    def update_zero(self, finetuned):  # an untouched chunk: equal bytes, nothing computed
        calls.append((self.name, finetuned.shape[0] if finetuned.dim() else 1, False))
        return original_zero(self, finetuned)

    monkeypatch.setattr(TensorAccumulator, "update", update)
    monkeypatch.setattr(TensorAccumulator, "update_zero", update_zero)
    return calls


# -- 1. every figure against the float64 reference, independent of the chunk size ----------


@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_figures_match_float64_reference(case, name, chunk_rows):
    built = case(name)
    ref = reference(built.base, built.merged, peft_deltas(built))
    assert any(r["category"] == "lora_and_changed" for r in ref.values())
    small = compare(base=built.base, finetuned=built.merged, adapter=built.adapter, options=opts())
    # the small chunks really split the tensors: most LoRA tensors come in many pieces
    pieces: dict[str, int] = {}
    for tensor, rows, has_lora in chunk_rows:
        pieces[tensor] = pieces.get(tensor, 0) + 1
        assert rows <= 3 or not has_lora or tensor.endswith("bias"), (tensor, rows)
    assert max(pieces.values()) >= 20
    assert_matches(small, ref)
    large = compare(
        base=built.base, finetuned=built.merged, adapter=built.adapter, options=opts(LARGE_CHUNK)
    )
    for a, b in zip(small.tensors, large.tensors, strict=True):
        assert a.name == b.name and a.category == b.category
        for f in FIGURES:
            ok = close(getattr(a, f), getattr(b, f), 1e-12, slack(ref[a.name], f))
            assert ok, (a.name, f, getattr(a, f), getattr(b, f))


def assert_partition(report: CompareReport, names) -> None:
    """Categories partition every float tensor name; the counts add up; |cos| <= 1."""
    names = list(names)
    assert sorted(t.name for t in report.tensors) == sorted(names)
    by_cat = {c: {t.name for t in report.tensors if t.category == c} for c in CATEGORIES}
    assert sum(len(v) for v in by_cat.values()) == len(names) == len(set(names))
    assert set().union(*by_cat.values()) == set(names)
    cov = report.coverage
    assert cov["total"] == len(names)
    assert all(cov[c] == len(by_cat[c]) for c in CATEGORIES)
    assert cov["lora"] == cov["lora_and_changed"] + cov["lora_unchanged"]
    assert (
        cov["changed"] == cov["lora_and_changed"] + cov["changed_not_lora"] + cov["rounding_only"]
    )
    for t in report.tensors:
        assert t.cosine is None or abs(t.cosine) <= 1 + 1e-12
        assert t.has_lora == (t.lora_norm is not None)
    assert report.summary["tensors"] == cov["lora_and_changed"]


def float_names(path: Path) -> list[str]:
    return [n for n, t in load_tensors(path).items() if t.is_floating_point()]


# -- 2. coverage on every fixture, and chunk-size independence as a property ----------------


@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_coverage_partitions_every_fixture(case, name):
    built = case(name)
    report = compare(
        base=built.base, finetuned=built.merged, adapter=built.adapter, options=opts(LARGE_CHUNK)
    )
    assert_partition(report, float_names(built.base))
    # every LoRA target changed the model, nothing else did
    targets = set(peft_deltas(built))
    assert {t.name for t in report.tensors if t.has_lora} == targets
    assert report.coverage["lora_and_changed"] == len(targets)
    assert report.coverage["unchanged"] == report.coverage["total"] - len(targets)
    # PEFT's own merge is ours, bit for bit: every LoRA tensor is reproduced
    assert {verdict(t) for t in report.tensors if t.has_lora} == {"reproduced"}
    assert report.headline().startswith(
        f"All {len(targets)} LoRA tensors are exactly base + LoRA merged as PEFT does (bit for bit)"
    )


@given(chunk=st.integers(2_000, 200_000))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_chunk_size_gives_the_whole_tensor_figures(case, chunk):
    # The most chunk-sensitive fixture: Conv1D DoRA normalises over stored rows (two passes).
    built = case("gpt2-fp32-conv1d-dora")
    ref = _ref_cache(built)
    report = compare(
        base=built.base, finetuned=built.merged, adapter=built.adapter, options=opts(chunk)
    )
    assert_matches(report, ref)


_REFS: dict[Path, dict] = {}


def _ref_cache(built: pf.Built) -> dict:
    if built.base not in _REFS:
        _REFS[built.base] = reference(built.base, built.merged, peft_deltas(built))
    return _REFS[built.base]


# -- 3. fp32 base, bf16 merged model: rounding_only ------------------------------------------


@pytest.fixture(scope="module")
def bf16_merged(case, tmp_path_factory):
    """The fp32 Llama fixture's PEFT merge, saved again in bf16 (what many users upload)."""
    built = case("llama-fp32-linear")
    out = tmp_path_factory.mktemp("bf16-merged")
    pf.load_base(built.merged).to(torch.bfloat16).save_pretrained(out)
    return built, out


def test_fp32_base_bf16_merged_is_rounding_only(bf16_merged):
    built, merged = bf16_merged
    report = compare(base=built.base, finetuned=merged, adapter=built.adapter, options=opts())
    names = float_names(built.base)
    assert_partition(report, names)
    ref = reference(built.base, merged, peft_deltas(built))
    assert_matches(report, ref)
    lora = {t.name for t in report.tensors if t.has_lora}
    assert len(lora) == 14
    for t in report.tensors:
        if t.name in lora:
            assert t.category == "lora_and_changed"
            assert t.ulp_counts[0] > 0.9995 * t.numel, t
            assert t.max_abs_diff <= t.rounding_bound * (1 + 2**-14)
        else:
            assert t.category == "rounding_only", t
    assert report.coverage["rounding_only"] == len(names) - 14 == 7
    # Not every element is the correctly rounded W + L: this bf16 model was rounded twice, by
    # PEFT's fp32 merge (its fp32 delta, then W + delta in fp32) and by .to(bfloat16). The fp32
    # errors are relative to the operands |W| and |L|, not to W + L: where W + L cancels (or
    # sits near a bf16 midpoint) they reach past half a bf16 ulp of the result. Every element
    # beyond its bound is such a case (a few fp32 ulps of the operands), and there are only a
    # few:
    base, bf16 = load_tensors(built.base), load_tensors(merged)
    beyond = 0
    for name, lo in peft_deltas(built).items():
        w, f = base[name].double(), bf16[name]
        excess = ((w + lo) - f.double()).abs() - half_ulp_ref(f)
        beyond += int((excess > 0).sum())
        assert (excess <= 2**-22 * (w.abs() + lo.abs())).all(), name
    assert 0 < beyond < 20
    # the elements beyond half an ulp are those not at the correctly rounded W + L
    assert sum(t.ulp_counts[1] + t.ulp_counts[2] for t in report.tensors if t.has_lora) == beyond
    line = report.headline()
    # ... and yet every LoRA tensor is what our merge writes, cast to bf16, bit for bit: the
    # verdict the issue asks for (issue 12's own example)
    assert all(t.bit_exact_merge == 1.0 for t in report.tensors if t.has_lora)
    assert line == (
        "All 14 LoRA tensors are exactly base + LoRA merged as PEFT does (bit for bit); "
        "7 others changed only by bf16 rounding of an fp32 base"
    )
    assert "depart" not in line


def _cos(report: CompareReport) -> str:
    from stream_tv.report import _fmt_cos

    return _fmt_cos(report.summary["mean_cosine"])


def test_without_adapter_the_headline_says_what_changed(bf16_merged, case):
    built, merged = bf16_merged
    report = compare(base=built.base, finetuned=merged, options=opts(LARGE_CHUNK))
    assert_partition(report, float_names(built.base))
    assert report.coverage["changed_not_lora"] == 14
    assert report.coverage["rounding_only"] == 7
    line = report.headline()
    assert "adapter has" not in line and "LoRA" not in line
    assert line == (
        "21 of 21 tensors changed, 7 of them only by bf16 rounding "
        "(no adapter given: nothing to compare the task vector with)"
    )
    text = report.render_terminal()
    assert "Summary" not in text and "Changed tensors, largest task vector first" in text
    # same dtype, no adapter: plain changes
    built = case("llama-bf16-linear")
    report = compare(base=built.base, finetuned=built.merged, options=opts(LARGE_CHUNK))
    assert report.headline() == (
        "14 of 21 tensors changed (no adapter given: nothing to compare the task vector with)"
    )
    same = compare(base=built.base, finetuned=built.base, options=opts(LARGE_CHUNK))
    assert same.headline() == "The task vector is zero: no tensor of 21 changed"


# -- 4. a full fine-tune of one MLP beside the LoRA ------------------------------------------

MLP = [f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")]


def test_full_mlp_fine_tune_beside_lora(case, tmp_path):
    built = case("llama-bf16-modules-to-save")  # LoRA on q/v, lm_head saved in full
    tensors = load_tensors(built.merged)
    g = torch.Generator().manual_seed(7)
    for name in MLP:
        w = tensors[name]
        tensors[name] = (
            w.double() + 0.01 * torch.randn(w.shape, generator=g, dtype=torch.float64)
        ).to(w.dtype)
    merged = save_checkpoint(tmp_path / "merged", tensors, shards=2)
    shutil.copy(built.merged / "config.json", merged / "config.json")
    report = compare(base=built.base, finetuned=merged, adapter=built.adapter, options=opts())
    assert_partition(report, float_names(built.base))
    assert_matches(report, reference(built.base, merged, peft_deltas(built)))
    outside = [t.name for t in report.tensors if t.category == "changed_not_lora"]
    assert outside == [n for n in float_names(built.base) if n in MLP] and len(outside) == 3
    assert all(t.tv_norm > 0 for t in report.tensors if t.name in MLP)
    cov = report.coverage
    assert (cov["lora_and_changed"], cov["changed"], cov["lora_fraction_of_changed"]) == (
        5,
        8,
        5 / 8,
    )
    assert report.headline() == (
        "All 5 LoRA tensors are exactly base + LoRA merged as PEFT does (bit for bit); 3 "
        "changed outside the adapter"
    )
    # the terminal and Markdown name the tensors changed outside the adapter
    for text in (report.render_terminal(), report.to_markdown()):
        assert all(n in text for n in MLP), text


def test_headline_flags_an_adapter_at_another_scale(case, tmp_path):
    """The adapter's config says alpha 16, the model was merged with alpha 8: every cosine is
    1, yet L is twice T. The headline must not just say "LoRA explains the task vector"."""
    built = case("llama-bf16-linear")
    wrong = pf.edit_adapter_config(built.adapter, tmp_path / "alpha16", lora_alpha=16)
    report = compare(base=built.base, finetuned=built.merged, adapter=wrong, options=opts())
    assert all(t.cosine > 0.9999 for t in report.tensors if t.has_lora)
    assert report.inputs["adapter_config"]["scaling"] == 4.0
    line = report.headline()
    assert line.startswith("All 14 LoRA tensors depart from base + LoRA")
    assert line.endswith("||L|| / ||T|| = 2)")


# -- 5. task vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-bf16-linear", "gpt2-fp32-conv1d"])
def test_task_vector_gives_the_same_figures(case, tmp_path, name):
    built = case(name)
    tv = tmp_path / "tv"
    # A float64 task vector holds finetuned - base exactly. (float32 rounds it for fp32
    # models, and for bf16 ones where the two values' exponents are > 16 apart, which
    # happens here: the figures would then agree to ~1e-7, not 1e-9.)
    r = run("extract", built.base, built.merged, "-o", tv, "-q", "--dtype", "fp64")
    assert r.exit_code == 0, r.output
    direct = compare(base=built.base, finetuned=built.merged, adapter=built.adapter, options=opts())
    via_tv = compare(task_vectors=[tv], adapter=built.adapter, options=opts())
    assert_partition(via_tv, float_names(built.base))
    for a, b in zip(direct.tensors, via_tv.tensors, strict=True):
        assert (a.name, a.category, a.numel) == (b.name, b.category, b.numel)
        for f in LT_FIGURES:
            assert close(getattr(a, f), getattr(b, f)), (a.name, f)
        # no finetuned weights, no rounding to measure against: null, not a made-up figure
        assert b.rounding_bound is None and b.ulp_counts is None
    assert via_tv.inputs["finetuned_dtype"] is None
    line = via_tv.headline()
    assert line.startswith(f"LoRA explains the task vector on {direct.coverage['lora']} of ")
    assert "rounding" not in line
    # --base beside --task-vector changes nothing for a plain LoRA
    with_base = compare(base=built.base, task_vectors=[tv], adapter=built.adapter, options=opts())
    assert [t.to_dict() for t in with_base.tensors] == [t.to_dict() for t in via_tv.tensors]


def test_task_vector_with_dora_needs_the_base(case, tmp_path):
    built = case("llama-fp32-dora")
    tv = tmp_path / "tv"
    assert (
        run("extract", built.base, built.merged, "-o", tv, "-q", "--dtype", "fp64").exit_code == 0
    )
    r = run("compare", "--task-vector", tv, "--adapter", built.adapter, "-q")
    assert r.exit_code == 2
    assert "DoRA" in r.output and "--base" in r.output
    direct = compare(base=built.base, finetuned=built.merged, adapter=built.adapter, options=opts())
    via_tv = compare(base=built.base, task_vectors=[tv], adapter=built.adapter, options=opts())
    for a, b in zip(direct.tensors, via_tv.tensors, strict=True):
        assert a.category == b.category
        for f in LT_FIGURES:
            assert close(getattr(a, f), getattr(b, f)), (a.name, f)


def test_task_vector_with_saved_tensors_needs_the_base(case, tmp_path):
    """modules_to_save: the adapter's lm_head delta is saved - base; without the base it used
    to be left at zero (cosine null, "departs") instead of refused."""
    built = case("llama-bf16-modules-to-save")
    tv = tmp_path / "tv"
    assert (
        run("extract", built.base, built.merged, "-o", tv, "-q", "--dtype", "fp64").exit_code == 0
    )
    _one_error(
        run("compare", "--task-vector", tv, "--adapter", built.adapter, "-q"),
        "saves full tensors",
        "lm_head.weight",
        "--base",
    )
    direct = compare(base=built.base, finetuned=built.merged, adapter=built.adapter, options=opts())
    via_tv = compare(base=built.base, task_vectors=[tv], adapter=built.adapter, options=opts())
    head = next(t for t in via_tv.tensors if t.name == "lm_head.weight")
    assert head.category == "lora_and_changed" and head.max_abs_diff == 0
    for a, b in zip(direct.tensors, via_tv.tensors, strict=True):
        assert a.category == b.category
        for f in LT_FIGURES:
            assert close(getattr(a, f), getattr(b, f)), (a.name, f)


@pytest.fixture(scope="module")
def task_vectors(case, tmp_path_factory):
    """A task vector A (extract of the bf16 Llama fixture), 2A, and A missing two tensors."""
    built = case("llama-bf16-linear")
    root = tmp_path_factory.mktemp("tvs")
    r = run("extract", built.base, built.merged, "-o", root / "a", "-q")
    assert r.exit_code == 0, r.output
    a = load_tensors(root / "a")
    double = save_checkpoint(root / "2a", {k: 2 * v for k, v in a.items()}, shards=3)
    partial = {k: v for k, v in a.items() if k not in MLP[:2]}
    return root / "a", double, save_checkpoint(root / "partial", partial), a


def test_two_identical_task_vectors(task_vectors):
    a, _, _, tensors = task_vectors
    report = compare(task_vectors=[a, a], options=opts())
    assert_partition(report, list(tensors))
    for t in report.tensors:
        assert t.has_lora
        if t.tv_norm:
            assert t.category == "lora_and_changed"
            # 1 to float64 precision (the norms are square roots); no difference at all
            assert t.cosine == pytest.approx(1.0, abs=4e-16)
            assert (t.max_abs_diff, t.mean_abs_diff, t.relative_error) == (0, 0, 0)
            assert t.lora_norm == t.tv_norm
        else:  # zero in both
            assert t.category == "lora_unchanged" and t.cosine is None and t.max_abs_diff == 0
    assert report.headline() == (
        "The first task vector explains the second on 14 of 14 changed tensors (mean cosine 1.0)"
    )
    assert report.to_markdown().startswith("# Task vector vs task vector\n")


def test_task_vector_against_its_double(task_vectors):
    a, double, partial, _ = task_vectors
    report = compare(task_vectors=[a, double], options=opts())
    covered = [t for t in report.tensors if t.category == "lora_and_changed"]
    assert len(covered) == 14
    for t in covered:  # L = A, T = 2A: L - T = -A
        assert t.cosine == pytest.approx(1.0, abs=1e-15)
        assert t.relative_error == pytest.approx(0.5, rel=1e-12)
        assert t.tv_norm == pytest.approx(2 * t.lora_norm, rel=1e-15)
        assert t.max_abs_diff == pytest.approx(t.tv_norm and t.max_abs_diff, rel=0)
    # a cosine is blind to scale: the headline is not
    assert report.headline() == (
        "The first task vector explains the second on 14 of 14 changed tensors "
        f"(mean cosine {_cos(report)}, but ||L|| / ||T|| = 0.5)"
    )
    # reversed, and the first missing two tensors of the second
    report = compare(task_vectors=[partial, double], options=opts())
    assert {t.name for t in report.tensors if t.category == "changed_not_lora"} == set(MLP[:2])
    assert report.headline() == (
        "The first task vector explains the second on 12 of 14 changed tensors "
        f"(mean cosine {_cos(report)}, but ||L|| / ||T|| = 0.5); 2 changed only in the second "
        "task vector"
    )


# -- 6. the three report forms, from the command line ----------------------------------------

TOP = ["schema_version", "mode", "inputs", "summary", "coverage", "tensors"]
SUMMARY = [
    "tensors", "mean_cosine", "min_cosine", "max_abs_diff", "mean_max_abs_diff",
    "mean_mean_abs_diff", "mean_relative_error", "lora_tensors", "verdicts",
    "bit_exact_merge", "ulp_counts", "ulp_max", "nonfinite_elements", "nonfinite_tensors",
]  # fmt: skip
COVERAGE = [
    "total", "lora", "changed", "lora_and_changed", "lora_unchanged", "changed_not_lora",
    "rounding_only", "unchanged", "lora_fraction_of_changed",
]  # fmt: skip
TENSOR = [
    "name", "category", "numel", "finetuned_dtype", *FIGURES, "rounding_floor",
    "bit_exact_merge", "ulp_counts", "ulp_max", "nonfinite", "verdict",
]  # fmt: skip


def _no_nan(token: str):
    raise AssertionError(f"non-JSON constant {token} in the report")


def test_cli_writes_json_markdown_and_png(case, tmp_path):
    pytest.importorskip("matplotlib")
    built = case("gpt2-fp32-conv1d")
    paths = {k: tmp_path / f"r.{k}" for k in ("json", "md", "png")}
    r = run(
        "compare", "--base", built.base, "--finetuned", built.merged, "--adapter", built.adapter,
        "--json", paths["json"], "--markdown", paths["md"], "--plot", paths["png"],
        "--chunk-size", "8KB", "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.output.startswith(
        "All 8 LoRA tensors are exactly base + LoRA merged as PEFT does (bit for bit)"
    )
    assert all(f"wrote {p}" in r.output for p in paths.values())

    data = json.loads(paths["json"].read_text(), parse_constant=_no_nan)
    assert list(data) == TOP and data["schema_version"] == 2
    assert list(data["summary"]) == SUMMARY and list(data["coverage"]) == COVERAGE
    assert all(list(t) == TENSOR for t in data["tensors"])
    assert data["inputs"]["adapter_config"]["scaling"] == 2.0
    assert data["inputs"]["finetuned_dtype"] == "float32"
    # what the file says is what the API computes, and it reads back
    api = compare(
        base=built.base, finetuned=built.merged, adapter=built.adapter, options=opts("8KB")
    )
    assert data["tensors"] == api.to_dict()["tensors"]
    assert data["coverage"] == api.coverage and data["summary"] == api.summary
    back = CompareReport.from_json(paths["json"].read_text())
    assert back.headline() == api.headline()

    md = paths["md"].read_text()
    assert md.startswith("# LoRA delta vs task vector\n\n**All 8 LoRA tensors are exactly")
    per_layer = md[md.index("## Per layer") :]
    assert "| layer | tensors | LoRA | changed | mean cosine |" in per_layer
    assert "\n| 0 | 12 | 4 | 4 |" in per_layer and "\n| 1 | 12 | 4 | 4 |" in per_layer
    assert "\n| other | 4 | 0 | 0 |" in per_layer

    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_plot_has_one_series_per_module(case, tmp_path, monkeypatch):
    """GPT-2 has attn.c_proj and mlp.c_proj in every layer: two series, not one overwritten."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig

    def savefig(self, *args, **kw):
        figures.append(self)
        return original(self, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    built = case("gpt2-fp32-conv1d")
    report = compare(
        base=built.base, finetuned=built.merged, adapter=built.adapter, options=opts(LARGE_CHUNK)
    )
    report.plot(tmp_path / "r.png")
    (legend,) = figures[0].legends
    labels = sorted(t.get_text() for t in legend.get_texts())
    assert labels == ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"]
    # every covered tensor is a point: 4 modules x 2 layers, on both axes
    for axis in figures[0].axes[:2]:
        assert sum(len(line.get_xdata()) for line in axis.get_lines()[:4]) == 8


def test_cli_plot_without_matplotlib(case, tmp_path, monkeypatch):
    built = case("llama-bf16-linear")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    out = tmp_path / "r.png"
    r = run(
        "compare", "--base", built.base, "--finetuned", built.merged, "--adapter", built.adapter,
        "--plot", out, "-q",
    )  # fmt: skip
    assert r.exit_code == 2
    assert "--plot needs matplotlib: pip install 'stream-tv[plot]'" in r.output
    assert not out.exists()


# -- 7. bad input ------------------------------------------------------------------------------


def _edit_adapter(src: Path, dst: Path, edit) -> Path:
    """A copy of adapter ``src`` with its tensors passed through ``edit(dict) -> dict``."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    tensors = pf.read_tensors(dst / "adapter_model.safetensors")
    save_file(edit(tensors), str(dst / "adapter_model.safetensors"))
    return dst


def _one_error(r, *needles: str) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 or lines[0].startswith("Usage:"), r.output
    assert all(n in r.output for n in needles), r.output
    return r.output


def test_adapter_of_another_model_is_refused(case, tmp_path):
    built = case("llama-bf16-linear")
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"

    def moved(t):  # layer 0's q_proj factors renamed to a layer the base does not have
        return {k.replace(q0, q0.replace("layers.0", "layers.7")): v for k, v in t.items()}

    def narrower(t):  # q_proj's A for 40 input features instead of 48
        return {
            k: v[:, :40].contiguous() if k == f"{q0}.lora_A.weight" else v for k, v in t.items()
        }

    args = ("compare", "--base", built.base, "--finetuned", built.merged, "-q", "--adapter")
    bad_key = _edit_adapter(built.adapter, tmp_path / "key", moved)
    _one_error(run(*args, bad_key), "model.layers.7.self_attn.q_proj", "check that the adapter")
    bad_shape = _edit_adapter(built.adapter, tmp_path / "shape", narrower)
    _one_error(run(*args, bad_shape), "model.layers.0.self_attn.q_proj", "[48, 40]", "[48, 48]")
    # a GPT-2 adapter on a Llama base
    _one_error(run(*args, case("gpt2-fp32-conv1d").adapter), "trained on GPT2LMHeadModel")


def test_bad_argument_combinations(case, tmp_path):
    built = case("llama-bf16-linear")
    tv = built.merged  # any checkpoint does for argument checks
    cases = [
        (["--finetuned", built.merged], "--finetuned needs --base"),
        ([], "nothing to compare"),
        (["--base", built.base], "nothing to compare"),
        (["--adapter", built.adapter], "nothing to compare"),
        (["--task-vector", tv] * 3, "an adapter and one task vector, or two task vectors"),
        (
            ["--task-vector", tv, "--task-vector", tv, "--adapter", built.adapter],
            "two task vectors",
        ),
        (["--base", built.base, "--finetuned", built.merged, "--task-vector", tv], "not both"),
        (["--base", built.base, "--finetuned", tmp_path / "nowhere"], "nowhere"),
        (["--base", built.base, "--finetuned", case("gpt2-fp32-conv1d").merged], "same tensors"),
    ]
    for args, needle in cases:
        _one_error(run("compare", "-q", *args), needle)


def test_report_path_that_cannot_be_written(case, tmp_path, monkeypatch):
    """Refused before the models are streamed, as an input error, not an internal one."""
    built = case("llama-bf16-linear")
    args = ("compare", "--base", built.base, "--finetuned", built.merged, "-q")
    streamed = []
    monkeypatch.setattr("stream_tv.engine.run", lambda *a, **k: streamed.append(1))
    for flag in ("--json", "--markdown", "--plot"):
        _one_error(run(*args, flag, tmp_path / "missing" / "r.out"), flag, "does not exist")
    assert not streamed
    (tmp_path / "file").write_text("")
    _one_error(run(*args, "--json", tmp_path / "file" / "r.json"), "does not exist")
    assert not streamed
    monkeypatch.undo()

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(OutputDir, "create", full)
    target = tmp_path / "r.json"
    r = run(*args, "--json", target)  # after the terminal report: one error line at the end
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.splitlines()[-1] == (f"error: cannot write {target}: No space left on device")


# -- 9. memory stays bounded -------------------------------------------------------------------


def test_chunks_stay_within_the_budget(case, chunk_rows, monkeypatch):
    """No tensor, however much bigger than the chunk, is ever held whole in float64: every
    update, every L product and every DoRA prepass gets at most the rows the budget allows."""
    built = case("llama-fp32-embedding-dora")  # a 300-row Embedding DoRA: two passes
    budget = 16 * 1024
    products: list[tuple[str, int]] = []
    original_delta, original_prepass = OpenMerge.delta_rows, OpenMerge.prepass

    def delta_rows(self, start, stop, **kw):
        products.append((self.tm.key, stop - start))
        return original_delta(self, start, stop, **kw)

    def prepass(self, w_rows, start, stop, **kw):
        products.append((self.tm.key, stop - start))
        return original_prepass(self, w_rows, start, stop, **kw)

    monkeypatch.setattr(OpenMerge, "delta_rows", delta_rows)
    monkeypatch.setattr(OpenMerge, "prepass", prepass)
    report = compare(
        base=built.base, finetuned=built.merged, adapter=built.adapter, options=opts(budget)
    )
    base = load_tensors(built.base)
    lora = {t.name for t in report.tensors if t.has_lora}

    def allowed(name: str) -> int:
        # Rows that fit the budget: both inputs in their dtype, plus the float64 working set
        # (T, L, |L - T| and a product for LoRA tensors, T alone otherwise).
        t = base[name]
        row_numel = t[0].numel() if t.dim() > 1 else 1
        row_cost = row_numel * (2 * t.element_size() + 8 * (4 if name in lora else 1))
        per = max(budget // row_cost, 2)
        # the last chunk absorbs a remainder of one row (never a one-row product)
        return max(r[1] - r[0] for r in row_ranges(t.shape[0] if t.dim() else 1, per))

    fed: dict[str, int] = {}
    for name, rows, has_lora in chunk_rows:
        assert has_lora == (name in lora)
        assert rows <= allowed(name), (name, rows, allowed(name))
        fed[name] = fed.get(name, 0) + rows
    for name, rows in products:
        assert rows <= allowed(name), (name, rows, allowed(name))
    # every row fed exactly once; the big tensors came in many chunks
    assert fed == {n: (t.shape[0] if t.dim() else 1) for n, t in base.items()}
    embed = "model.embed_tokens.weight"
    assert embed in lora and base[embed].shape[0] * 48 * 8 > 4 * budget
    assert sum(1 for n, _, _ in chunk_rows if n == embed) >= 300 // allowed(embed)
    assert sum(1 for n, _ in products if n == embed) >= 2 * (300 // allowed(embed))
    assert_matches(report, reference(built.base, built.merged, peft_deltas(built)))


# -- 10. the question the project exists to answer, on realistic deltas -------------------------


def _realistic_merge(root: Path, base_dtype: torch.dtype) -> tuple[Path, Path, Path]:
    """A 512-wide Llama-shaped model, a rank-8 LoRA on the attention and MLP projections
    with deltas of 0.08%-2.5% of the weight norm, merged by PEFT and saved in bf16."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    pf._quiet()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=256,
        max_position_embeddings=64,
    )
    model = tf.LlamaForCausalLM(cfg).to(base_dtype).eval()
    model.save_pretrained(root / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        pf.load_base(root / "base"),
        LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False),
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        modules = [m for m in peft_model.modules() if hasattr(m, "lora_B")]
        for i, m in enumerate(modules):
            w = m.base_layer.weight.float()
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=g))
            b.copy_(torch.randn(b.shape, generator=g))
            target = (0.0008 + (0.025 - 0.0008) * i / (len(modules) - 1)) * w.norm()
            b.mul_(target / (2.0 * (b @ a)).norm())  # scaling = 16 / 8 = 2
    peft_model.save_pretrained(root / "adapter")
    merged = pf.peft_merge(root / "base", [root / "adapter"], root / "merged-full")
    model = pf.load_base(merged).to(torch.bfloat16)
    model.save_pretrained(root / "merged")
    return root / "base", root / "adapter", root / "merged"


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_a_real_merge_saved_in_bf16_is_reproduced_never_departs(tmp_path, base_dtype):
    base, adapter, merged = _realistic_merge(tmp_path, base_dtype)
    ratios = [
        t.lora_norm / load_tensors(base)[t.name].double().norm().item()
        for t in compare(base=base, finetuned=merged, adapter=adapter, options=opts()).tensors
        if t.has_lora
    ]
    assert 0.0007 < min(ratios) and max(ratios) < 0.026  # the deltas are realistic
    report = compare(base=base, finetuned=merged, adapter=adapter, options=opts("64KB"))
    line = report.headline()
    assert line.startswith("All 7 LoRA tensors are exactly base + LoRA merged as PEFT does"), line
    assert "depart" not in line
    if base_dtype == torch.float32:  # the rest of the fp32 base changed by its bf16 save only
        assert line.endswith("others changed only by bf16 rounding of an fp32 base"), line


def test_a_tensor_changed_after_the_merge_departs_and_is_named(tmp_path):
    base, adapter, merged = _realistic_merge(tmp_path, torch.float32)
    tensors = load_tensors(merged)
    name = "model.layers.0.mlp.up_proj.weight"
    edited = tensors[name].clone()
    edited.view(-1)[[5, 500, 5000]] *= 1.5  # three elements, many ulps off
    tensors[name] = edited
    changed = save_checkpoint(tmp_path / "edited", tensors)
    shutil.copy(merged / "config.json", changed / "config.json")
    report = compare(base=base, finetuned=changed, adapter=adapter, options=opts("64KB"))
    line = report.headline()
    assert f"; 1 departs from base + LoRA: {name} (3 of 524,288 elements more than one" in line
    assert line.startswith("6 of 7 LoRA tensors are exactly base + LoRA merged as PEFT does")


def test_nonfinite_values_are_counted_warned_or_refused(case, tmp_path):
    built = case("llama-bf16-linear")
    tensors = load_tensors(built.merged)
    name = "model.layers.0.self_attn.q_proj.weight"
    t = tensors[name].clone()
    t.view(-1)[:3] = float("nan")
    tensors[name] = t
    bad = save_checkpoint(tmp_path / "nan", tensors)
    shutil.copy(built.merged / "config.json", bad / "config.json")
    args = ("compare", "--base", built.base, "--finetuned", bad, "--adapter", built.adapter, "-q")
    r = run(*args)
    assert r.exit_code == 0 and f"warning: 3 NaN/Inf value(s) in {name}" in r.stderr
    report = compare(base=built.base, finetuned=bad, adapter=built.adapter, options=opts())
    assert {x.name: x.nonfinite for x in report.tensors if x.nonfinite} == {name: 3}
    assert report.summary["nonfinite_elements"] == 3
    r = run(*args, "--on-nonfinite", "error")
    assert r.exit_code == 2 and f"{name} (3)" in r.stderr
    r = run(*args, "--on-nonfinite", "ignore")
    assert r.exit_code == 0 and "warning" not in r.stderr
