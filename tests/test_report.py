"""stream_tv.report: derived figures and verdicts against independent computations, and the
four renderings in each comparison mode."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_tv.errors import InputError
from stream_tv.report import CompareReport, layer_of
from stream_tv.report.fmt import fmt_percent
from stream_tv.stats import (
    CATEGORIES,
    CHANGED_NOT_LORA,
    LORA_AND_CHANGED,
    LORA_UNCHANGED,
    ROUNDING_ONLY,
    UNCHANGED,
    TensorComparison,
)

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOP = ["schema_version", "mode", "inputs", "summary", "coverage", "tensors"]
SUMMARY = [
    "tensors", "mean_cosine", "min_cosine", "max_abs_diff", "mean_max_abs_diff",
    "mean_mean_abs_diff", "mean_relative_error", "lora_tensors", "verdicts",
    "bit_exact_merge", "ulp_counts", "ulp_max", "nonfinite_elements", "nonfinite_tensors",
]  # fmt: skip
VERDICT_KEYS = ["reproduced", "explained_by_rounding", "departs", "undecided", "not_measured"]
COVERAGE = [
    "total", "lora", "changed", "lora_and_changed", "lora_unchanged", "changed_not_lora",
    "rounding_only", "unchanged", "lora_fraction_of_changed",
]  # fmt: skip
TENSOR = [
    "name", "category", "numel", "finetuned_dtype", "cosine", "max_abs_diff", "mean_abs_diff",
    "relative_error", "lora_norm", "tv_norm", "rounding_bound", "rounding_floor",
    "bit_exact_merge", "ulp_counts", "ulp_max", "nonfinite", "verdict",
]  # fmt: skip
BF16 = "bfloat16"


def lora_row(name, cosine, rel, *, numel=4096, max_abs=2e-4, **rounding) -> TensorComparison:
    """A covered tensor; ``rounding`` sets the ulp fields (none: not measured)."""
    return TensorComparison(
        name=name,
        category=LORA_AND_CHANGED,
        numel=numel,
        cosine=cosine,
        max_abs_diff=max_abs,
        mean_abs_diff=max_abs / 4,
        relative_error=rel,
        lora_norm=1.0,
        tv_norm=1.0,
        rounding_bound=2.44e-4 if rounding else None,
        **rounding,
    )


def reproduced(numel=4096):
    return {"finetuned_dtype": BF16, "bit_exact_merge": 1.0, "ulp_counts": (numel - 2, 2, 0)}


def explained(ones=3, numel=4096, dtype=BF16):
    counts = (numel - ones, ones, 0)
    return {"finetuned_dtype": dtype, "bit_exact_merge": 0.999, "ulp_counts": counts}


def departing(more=100, ulp_max=40, numel=4096, dtype=BF16, bit_exact=0.9):
    counts = (numel - more - 50, 50, more)
    return {"finetuned_dtype": dtype, "bit_exact_merge": bit_exact, "ulp_counts": counts,
            "ulp_max": ulp_max}  # fmt: skip


def with_max(fields):
    """Fill in ulp_max from the counts where it is not given."""
    if "ulp_max" not in fields and fields.get("ulp_counts") is not None:
        c = fields["ulp_counts"]
        fields = {**fields, "ulp_max": 2 if c[2] else (1 if c[1] else 0)}
    return fields


def plain_row(name, category, tv_norm=0.1, **kw) -> TensorComparison:
    return TensorComparison(name, category, 4096, *([None] * 5), tv_norm, None, **kw)


def demo_report(layers: int = 24) -> CompareReport:
    """A realistic bf16 Llama-like comparison: an fp32 base, LoRA on all 7 projections merged
    and saved in bf16 (most reproduced bit for bit, v_proj of the last six layers merged by
    another rounding order), two down_proj tensors changed after the merge, norms changed
    only by rounding, one fully fine-tuned MLP."""
    rng = np.random.default_rng(0)
    rows = [plain_row("model.embed_tokens.weight", ROUNDING_ONLY)]
    for i in range(layers):
        for m in MODULES:
            prefix = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            rel = float(10 ** rng.uniform(-1.3, -0.9))  # rounding of a small delta: large
            fields = reproduced()
            if i >= layers - 6 and m == "v_proj":
                fields = explained(ones=int(rng.integers(1, 5)))
            if (i, m) in {(7, "down_proj"), (8, "down_proj")}:
                fields, rel = departing(more=200, ulp_max=40 if i == 7 else 12), 0.9
            rows.append(
                lora_row(
                    f"model.layers.{i}.{prefix}.{m}.weight",
                    math.sqrt(1 - rel**2),
                    rel,
                    rounding_floor=rel if fields["bit_exact_merge"] > 0.99 else 0.1,
                    **with_max(fields),
                )
            )
        for norm in ("input_layernorm", "post_attention_layernorm"):
            rows.append(plain_row(f"model.layers.{i}.{norm}.weight", ROUNDING_ONLY))
    rows.append(plain_row("model.layers.3.mlp.experts_gate.weight", CHANGED_NOT_LORA, 2.5))
    rows.append(plain_row("model.norm.weight", UNCHANGED, 0.0))
    rows.append(plain_row("lm_head.weight", ROUNDING_ONLY))
    return CompareReport(
        inputs={
            "base": "meta-llama/Llama-3.2-1B",
            "finetuned": Path("/models/merged"),
            "adapter": "./adapter",
            "task_vectors": [],
            "base_dtype": torch.float32,
            "finetuned_dtype": torch.bfloat16,
            "missing": [],
            "adapter_config": {"r": 16, "lora_alpha": 32, "use_rslora": False, "scaling": 2.0},
        },
        tensors=rows,
    )


# -- the verdict, written from its definition ---------------------------------------------------


def want_verdict(t: TensorComparison) -> str | None:
    """reproduced: bit-exact; explained: within one ulp; beyond that departs if compared
    with our merge, else undecided; None unmeasured."""
    if not t.has_lora:
        return None
    if t.bit_exact_merge == 1.0:
        return "reproduced"
    if t.ulp_counts is None:
        return None
    if t.ulp_counts[2] == 0 and (t.ulp_max is None or t.ulp_max <= 1):
        return "explained_by_rounding"
    return "departs" if t.bit_exact_merge is not None else "undecided"


# -- summary and coverage against numpy --------------------------------------------------------

maybe = st.one_of(st.none(), st.floats(-1, 1, allow_nan=False))
positive = st.one_of(st.none(), st.floats(0, 1e3, allow_nan=False))


@st.composite
def rows(draw):
    category = draw(st.sampled_from(CATEGORIES))
    lora = category in (LORA_AND_CHANGED, LORA_UNCHANGED)
    numel = draw(st.integers(0, 10_000))
    figures = [draw(maybe)] + [draw(positive) for _ in range(4)] if lora else [None] * 5
    rounding = {"nonfinite": draw(st.integers(0, 3))}
    if draw(st.booleans()) and numel:
        n1 = draw(st.integers(0, numel))
        more = draw(st.integers(0, numel - n1))
        rounding["ulp_counts"] = (numel - n1 - more, n1, more)
        top = draw(st.one_of(st.none(), st.integers(2, 500))) if more else (1 if n1 else 0)
        rounding["ulp_max"] = top
        rounding["finetuned_dtype"] = draw(st.sampled_from([BF16, "float16", "float32"]))
    if lora and draw(st.booleans()):
        rounding["bit_exact_merge"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
    return TensorComparison(
        f"model.layers.{draw(st.integers(0, 5))}.{draw(st.sampled_from(MODULES))}.weight",
        category,
        numel,
        *figures,
        draw(positive),
        draw(positive) if lora else None,
        **rounding,
    )


def np_stat(fn, values):
    kept = np.array([v for v in values if v is not None], dtype=np.float64)
    return float(fn(kept)) if kept.size else None


@given(tensors=st.lists(rows(), max_size=30), mode=st.sampled_from(["adapter", "task_vectors"]))
@settings(max_examples=100, deadline=None)
def test_summary_and_coverage_match_numpy(tensors, mode):
    report = CompareReport(inputs={}, tensors=tensors, mode=mode)
    covered = [t for t in tensors if t.category == LORA_AND_CHANGED]
    lora = [t for t in tensors if t.has_lora]
    verdicts = [want_verdict(t) or "not_measured" for t in lora]
    ulps = [t for t in lora if t.ulp_counts is not None]
    exact = [(t.bit_exact_merge, t.numel) for t in lora if t.bit_exact_merge is not None]
    want = {
        "tensors": len(covered),
        "mean_cosine": np_stat(np.mean, [t.cosine for t in covered]),
        "min_cosine": np_stat(np.min, [t.cosine for t in covered]),
        "max_abs_diff": np_stat(np.max, [t.max_abs_diff for t in covered]),
        "mean_max_abs_diff": np_stat(np.mean, [t.max_abs_diff for t in covered]),
        "mean_mean_abs_diff": np_stat(np.mean, [t.mean_abs_diff for t in covered]),
        "mean_relative_error": np_stat(np.mean, [t.relative_error for t in covered]),
        "lora_tensors": len(lora),
        "bit_exact_merge": (
            float(np.average([f for f, _ in exact], weights=[n for _, n in exact]))
            if sum(n for _, n in exact)
            else None
        ),
        "nonfinite_elements": sum(t.nonfinite for t in tensors),
        "nonfinite_tensors": sum(1 for t in tensors if t.nonfinite),
    }
    got = report.summary
    assert list(got) == SUMMARY
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-300), key
    assert got["verdicts"] == {k: verdicts.count(k) for k in VERDICT_KEYS}
    if ulps:
        assert got["ulp_counts"] == list(np.sum([t.ulp_counts for t in ulps], axis=0))
        maxima = [t.ulp_max for t in ulps]
        assert got["ulp_max"] == (None if None in maxima else max(maxima))
    else:
        assert got["ulp_counts"] is None and got["ulp_max"] is None

    cov = report.coverage
    assert list(cov) == COVERAGE
    assert sum(cov[c] for c in CATEGORIES) == cov["total"] == len(tensors)
    assert cov["lora"] == cov[LORA_AND_CHANGED] + cov[LORA_UNCHANGED]
    assert cov["changed"] == cov[LORA_AND_CHANGED] + cov[CHANGED_NOT_LORA] + cov[ROUNDING_ONLY]
    assert cov["lora"] == sum(t.has_lora for t in tensors)
    assert cov["changed"] == sum(t.changed for t in tensors)
    if cov["changed"]:
        assert cov["lora_fraction_of_changed"] == cov[LORA_AND_CHANGED] / cov["changed"]
    else:
        assert cov["lora_fraction_of_changed"] is None

    # JSON: strict (no NaN), parseable, the verdicts as derived, and read back the same.
    text = report.to_json()
    data = json.loads(text)
    assert data["summary"] == json.loads(json.dumps(got))
    assert [t["verdict"] for t in data["tensors"]] == [want_verdict(t) for t in tensors]
    back = CompareReport.from_json(text)
    assert back == report and back.to_json() == text


def test_summary_excludes_nulls_and_other_categories():
    report = CompareReport(
        inputs={},
        tensors=[
            lora_row("a", 0.5, 0.2, max_abs=1.0),
            lora_row("b", None, None, max_abs=3.0),  # e.g. a zero B factor
            TensorComparison("c", LORA_UNCHANGED, 4, None, 9.0, 9.0, None, 1.0, 0.0, 1.0),
            plain_row("d", CHANGED_NOT_LORA, nonfinite=2),
        ],
    )
    s = report.summary
    assert s["tensors"] == 2 and s["lora_tensors"] == 3
    assert s["mean_cosine"] == s["min_cosine"] == 0.5
    assert s["max_abs_diff"] == 3.0 and s["mean_max_abs_diff"] == 2.0
    assert s["mean_relative_error"] == 0.2
    assert s["verdicts"]["not_measured"] == 3
    assert (s["nonfinite_elements"], s["nonfinite_tensors"]) == (2, 1)


def test_empty_report_is_all_null():
    report = CompareReport(inputs={}, tensors=[])
    s = report.summary
    assert s["tensors"] == s["lora_tensors"] == s["nonfinite_elements"] == 0
    assert s["verdicts"] == dict.fromkeys(VERDICT_KEYS, 0)
    assert all(s[k] is None for k in SUMMARY[1:7] + ["bit_exact_merge", "ulp_counts", "ulp_max"])
    assert report.coverage["total"] == 0 and report.coverage["lora_fraction_of_changed"] is None
    assert json.loads(report.to_json())["tensors"] == []
    assert report.headline() == "No tensors were compared"
    assert "No tensor has both" in report.to_markdown()


# -- JSON ------------------------------------------------------------------------------------


def test_json_schema_exact_and_strict():
    report = demo_report(layers=3)
    report.inputs["weird"] = float("nan")
    text = report.to_json()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert list(data) == TOP and data["schema_version"] == 2 and data["mode"] == "adapter"
    assert list(data["summary"]) == SUMMARY and list(data["coverage"]) == COVERAGE
    assert list(data["summary"]["verdicts"]) == VERDICT_KEYS
    assert all(list(t) == TENSOR for t in data["tensors"])
    assert data["inputs"]["finetuned"] == "/models/merged"
    assert data["inputs"]["finetuned_dtype"] == "bfloat16"
    assert data["inputs"]["weird"] is None
    assert len(data["tensors"]) == len(report.tensors)
    first = data["tensors"][1]
    assert first["name"] == "model.layers.0.self_attn.q_proj.weight"
    assert first["ulp_counts"] == [4094, 2, 0] and first["verdict"] == "reproduced"
    # null, not NaN, for figures that need a LoRA delta
    assert data["tensors"][0]["cosine"] is None and data["tensors"][0]["verdict"] is None


def test_from_json_rejects_other_schema_versions_and_a_missing_mode():
    data = demo_report(layers=1).to_dict()
    for version, hint in ((1, "rerun stream-tv compare"), (3, "reads schema_version 2")):
        with pytest.raises(InputError, match=f"schema_version {version}") as info:
            CompareReport.from_dict({**data, "schema_version": version})
        assert hint in str(info.value)
    with pytest.raises(InputError, match="has no mode"):
        CompareReport.from_dict({k: v for k, v in data.items() if k != "mode"})
    with pytest.raises(InputError, match="unknown compare mode 'lora'"):
        CompareReport.from_dict({**data, "mode": "lora"})
    with pytest.raises(InputError, match="ulp_counts"):
        bad = {**data["tensors"][1], "ulp_counts": [1, 2, 3]}
        TensorComparison.from_dict(bad)
    with pytest.raises(InputError, match="not a JSON compare report"):
        CompareReport.from_json("[1, 2]")
    with pytest.raises(InputError, match="not a JSON compare report"):
        CompareReport.from_json("{")


# -- mode --------------------------------------------------------------------------------------


def test_mode_is_explicit_never_guessed_from_inputs():
    rows = [lora_row("model.layers.0.q_proj.weight", 0.9999999, 1e-4)]
    tv_inputs = {"task_vectors": ["a", "b"], "adapter": None}
    default = CompareReport(inputs=tv_inputs, tensors=rows)  # inputs say two TVs: ignored
    assert default.mode == "adapter"
    assert default.headline().startswith("LoRA explains the task vector on 1 of 1")
    two = CompareReport(inputs={}, tensors=rows, mode="task_vectors")
    assert two.headline().startswith("The first task vector explains the second on 1 of 1")
    assert two.to_markdown().startswith("# Task vector vs task vector\n")
    assert CompareReport.from_json(two.to_json()).mode == "task_vectors"
    none = CompareReport(inputs={}, tensors=[plain_row("a", CHANGED_NOT_LORA)], mode="none")
    assert none.headline() == (
        "1 of 1 tensors changed (no adapter given: nothing to compare the task vector with)"
    )
    with pytest.raises(InputError, match="unknown compare mode 'lora'"):
        CompareReport(inputs={}, tensors=rows, mode="lora")


# -- headline ----------------------------------------------------------------------------------

INPUTS = {"finetuned_dtype": "bfloat16", "base_dtype": "float32"}


def test_headline_all_reproduced_as_the_issue_words_it():
    rows = [
        lora_row(f"model.layers.{i}.q_proj.weight", 0.6, 0.8, **reproduced()) for i in range(24)
    ]
    rows += [plain_row(f"model.layers.{i}.norm.weight", ROUNDING_ONLY) for i in range(78)]
    report = CompareReport(inputs=INPUTS, tensors=rows)
    assert report.headline() == (
        "All 24 LoRA tensors are exactly base + LoRA merged as PEFT does (bit for bit); "
        "78 others changed only by bf16 rounding of an fp32 base"
    )


def test_headline_keeps_the_digits_that_matter():
    """The MiniLM case of the issue: 1 element in 147,456 one ulp off, not "99.9%"."""
    rows = [
        lora_row(f"l.{i}", 0.9978, 0.07, numel=147456, **with_max(explained(1, 147456)))
        for i in range(5)
    ]
    rows[0] = lora_row("l.0", 0.9978, 0.07, numel=147456, **with_max(explained(0, 147456)))
    line = CompareReport(inputs=INPUTS, tensors=rows).headline()
    assert line == (
        "All 5 LoRA tensors are base + LoRA within one bf16 ulp (99.9995% of elements exactly "
        "the correctly rounded sum, the rest one ulp away)"
    )
    one = CompareReport(inputs=INPUTS, tensors=rows[:2])
    assert "(99.9997% of elements" in one.headline()
    assert fmt_percent(1 - 1 / 147456) == "99.9993%"


def test_headline_names_departures_and_mixed_causes():
    line = demo_report().headline()
    assert "\n" not in line
    assert line == (
        "160 of 168 LoRA tensors are exactly base + LoRA merged as PEFT does (bit for bit); "
        "6 are base + LoRA within one bf16 ulp (99.94% of elements exactly the correctly "
        "rounded sum, the rest one ulp away); 2 depart from base + LoRA: "
        "model.layers.7.mlp.down_proj.weight, model.layers.8.mlp.down_proj.weight (400 of "
        "8,192 elements more than one bf16 ulp away, up to 40 ulps); 1 changed outside the "
        "adapter, 50 others changed only by bf16 rounding of an fp32 base"
    )


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ([plain_row("a", UNCHANGED, 0.0)], "The task vector is zero: no tensor of 1 changed"),
        (
            [plain_row("a", CHANGED_NOT_LORA), plain_row("b", ROUNDING_ONLY)],
            "The adapter has no delta for any of 2 changed tensors; 1 of them only by "
            "dtype rounding",
        ),
        (
            [lora_row("a", 0.2, 1.2), plain_row("b", LORA_UNCHANGED)],
            "LoRA explains the task vector on 0 of 1 changed tensors; 1 LoRA tensor departs "
            "from it (worst cosine 0.2000 at a); 1 tensor with a LoRA delta is unchanged "
            "in the model",
        ),
        (
            [plain_row("a", LORA_UNCHANGED), plain_row("b", LORA_UNCHANGED)]
            + [plain_row("c", CHANGED_NOT_LORA)],
            "1 changed outside the adapter; 2 tensors with a LoRA delta are unchanged in the model",
        ),
        (
            [lora_row("a", 0.9999, 0.1), lora_row("b", 0.9995, 0.1)],
            "LoRA explains the task vector on 2 of 2 changed tensors (mean cosine 0.99970)",
        ),
        (  # departing (not our merge), with a NaN against a number; undecided (not compared)
            [
                lora_row("a", 0.9, 0.1, **departing(5, None, dtype="float16", bit_exact=0.5)),
                lora_row("b", 0.9, 0.1, **departing(7, 9, dtype="float32", bit_exact=None)),
                plain_row("c", CHANGED_NOT_LORA, ulp_counts=(4095, 1, 0), ulp_max=1),
            ],
            "1 of 2 LoRA tensors departs from base + LoRA: a (5 of 4,096 elements more than "
            "one dtype ulp away, some NaN where base + LoRA is a number); 1 is undecided "
            "without a bit-exact comparison with our merge: b (7 of 4,096 elements more than "
            "one dtype ulp away, up to 9 ulps); 1 changed outside the adapter (all within one "
            "dtype ulp of the base)",
        ),
        (  # a LoRA merged at another alpha, not compared with our merge: the scale is named
            [
                TensorComparison(
                    "a",
                    LORA_AND_CHANGED,
                    4096,
                    1.0,
                    1.0,
                    0.5,
                    1.0,
                    2.0,
                    1.0,
                    None,
                    **departing(4000, 300, dtype="bfloat16", bit_exact=None),
                ),
            ],
            "The LoRA tensor is undecided without a bit-exact comparison with our merge: a "
            "(4,000 of 4,096 elements more than one bf16 ulp away, up to 300 ulps, "
            "||L|| / ||T|| = 2)",
        ),
        (
            [lora_row("a", 1.0, 0.0, **with_max(explained(0))), plain_row("b", UNCHANGED)],
            "The LoRA tensor is exactly base + LoRA, correctly rounded to bf16",
        ),
        (
            [lora_row("a", 1.0, 0.0, **reproduced(), nonfinite=3), plain_row("b", UNCHANGED)],
            "The LoRA tensor is exactly base + LoRA merged as PEFT does (bit for bit); 3 "
            "non-finite values (NaN or inf) in 1 tensor: a",
        ),
    ],
)
def test_headline_cases(tensors, expected):
    assert CompareReport(inputs={}, tensors=tensors).headline() == expected


def test_headline_of_two_task_vectors_never_says_lora():
    rows = [lora_row(f"model.layers.{i}.q_proj.weight", 0.99999, 1e-3) for i in range(3)]
    rows += [lora_row("model.layers.3.q_proj.weight", 0.5, 0.9)]
    rows += [plain_row("model.layers.0.k_proj.weight", CHANGED_NOT_LORA)]
    rows += [TensorComparison("z", LORA_UNCHANGED, 4, None, 1.0, 0.5, None, 2.0, 0.0, None)]
    report = CompareReport(inputs={"task_vectors": ["a", "b"]}, tensors=rows, mode="task_vectors")
    line = report.headline()
    assert line == (
        "The first task vector explains the second on 3 of 5 changed tensors (mean cosine "
        "0.9999900); 1 tensor departs from it (worst cosine 0.5000 at "
        "model.layers.3.q_proj.weight); 1 changed only in the second task vector; 1 tensor "
        "changed in the first is zero in the second"
    )
    for text in (line, report.to_markdown(), report.render_terminal()):
        assert "LoRA" not in text and "adapter" not in text, text


# -- Markdown and terminal -----------------------------------------------------------------------


def test_layer_of():
    assert layer_of("model.layers.12.self_attn.q_proj.weight") == ("model", 12, "q_proj")
    assert layer_of("transformer.h.3.attn.c_attn.weight") == ("transformer", 3, "c_attn")
    assert layer_of("transformer.h.3.attn.c_attn.bias") == ("transformer", 3, "c_attn.bias")
    assert layer_of("encoder.block.2.layer.0.SelfAttention.q.weight") == ("encoder", 2, "q")
    assert layer_of("layers.5.mlp.weight") == ("", 5, "mlp")
    assert layer_of("model.embed_tokens.weight") is None
    assert layer_of("lm_head.weight") is None
    assert layer_of("model.hidden.3.weight") is None  # "hidden" is not "h"


def test_markdown_has_the_tables():
    md = demo_report().to_markdown()
    assert md.startswith("# LoRA delta vs task vector\n\n**160 of 168 LoRA tensors are exactly")
    for heading in (
        "## Inputs", "## Summary", "## Coverage", "## Departing tensors",
        "## Worst tensors by lowest cosine", "## Worst tensors by highest relative error",
        "## Changed outside the adapter", "## Per layer",
    ):  # fmt: skip
        assert f"\n{heading}\n" in md
    assert "None" not in md and "[]" not in md and "{" not in md  # no Python reprs
    inputs = md[md.index("## Inputs") : md.index("## Summary")]
    assert "| adapter_config | r=16, lora_alpha=32, use_rslora=no, scaling=2.0 |" in inputs
    assert "| task_vectors | none |" in inputs and "| base_dtype | `float32` |" in inputs
    summary = md[md.index("## Summary") : md.index("## Coverage")]
    assert "| LoRA tensors reproduced (bit for bit) | 160 |" in summary
    assert "| ... explained by bf16 rounding | 6 |" in summary
    assert "| ... departing | 2 |" in summary and "| max ulps from W + L | 40 |" in summary
    assert "| category | tensors | share |" in md
    assert "| lora_and_changed (LoRA delta, tensor changed) | 168 | 76.4% |" in md
    assert "| total | 220 | 100% |" in md
    departing_md = md[md.index("## Departing tensors") : md.index("## Worst tensors")]
    assert departing_md.index("layers.7.mlp.down_proj") < departing_md.index("layers.8.mlp")
    assert "| 3,846 / 50 / 200 | 40 | 90.0% |" in departing_md
    per_layer = md[md.index("## Per layer") :]
    assert "| layer | tensors | LoRA | changed | mean cosine |" in per_layer
    # layer 7 holds a departing down_proj; layer 3 the fully fine-tuned expert gate
    assert "| 7 | 9 | 7 | 9 |" in per_layer and "| down_proj | 1 |" in per_layer
    assert "| 3 | 10 | 7 | 10 |" in per_layer
    assert per_layer.rstrip().splitlines()[-1] == "| other | 3 | 0 | 2 | n/a | n/a | n/a |  | 0 |"
    worst = md[md.index("## Worst tensors by lowest cosine") :]
    order = ["layers.7.mlp.down_proj", "layers.8.mlp.down_proj"]
    assert sorted(order, key=worst.index) == order


def test_markdown_of_two_task_vectors_reads_right():
    rows = [lora_row("model.layers.0.q_proj.weight", 0.99999, 1e-3)]
    rows += [plain_row("model.layers.0.k_proj.weight", CHANGED_NOT_LORA)]
    inputs = {"base": None, "finetuned": None, "adapter": None, "task_vectors": ["/a", "/b"]}
    md = CompareReport(inputs=inputs, tensors=rows, mode="task_vectors").to_markdown()
    assert "None" not in md and "LoRA" not in md and "['" not in md
    assert "| task_vectors | `/a`, `/b` |" in md and "| base |" not in md
    assert "| lora_and_changed (in the first, nonzero in the second) | 1 | 50.0% |" in md
    assert "The first task vector covers 50.0% of the 2 changed tensors." in md
    assert "## Changed only in the second task vector" in md
    assert "| layer | tensors | in first | changed |" in md


def test_markdown_separates_encoder_and_decoder_layers():
    report = CompareReport(
        inputs={},
        tensors=[
            lora_row("encoder.block.0.layer.0.SelfAttention.q.weight", 0.9, 0.1),
            lora_row("decoder.block.0.layer.0.SelfAttention.q.weight", 0.5, 0.1),
        ],
    )
    md = report.to_markdown()
    assert "| decoder.0 | 1 |" in md and "| encoder.0 | 1 |" in md


def test_markdown_and_terminal_count_non_finite_values():
    rows = [lora_row("model.layers.0.q_proj.weight", None, None, **reproduced(), nonfinite=7)]
    report = CompareReport(inputs=INPUTS, tensors=rows)
    md, term = report.to_markdown(), report.render_terminal()
    assert "## Non-finite values" in md and "| `model.layers.0.q_proj.weight` | 7 |" in md
    assert "| non-finite values (NaN, inf) | 7 |" in md
    assert "7 non-finite values (NaN or inf) in 1 tensor" in " ".join(term.splitlines())
    assert json.loads(report.to_json())["summary"]["nonfinite_elements"] == 7


def test_terminal_fits_100_columns():
    report = demo_report()
    long = "x." * 80 + "weight"
    report.tensors.append(lora_row(long, -0.5, 3.0, **with_max(departing(9, 300))))
    text = report.render_terminal(worst=5)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    assert "Worst 5 by lowest cosine" in text and "Worst 5 by highest relative error" in text
    assert "Departing from base + LoRA" in text
    assert any(line.strip().startswith("lora_and_changed") and "169" in line for line in lines)
    assert any(line.strip().startswith("total") and "221" in line for line in lines)
    long_line = next(line for line in lines if line.endswith("x.x.x.weight"))
    assert "..." in long_line and len(long_line) == 100  # truncated from the left, tail kept
    assert " ".join(lines[:3]).startswith("160 of 169 LoRA tensors are exactly")


def test_cosines_close_to_one_are_not_rounded_to_one():
    report = CompareReport(inputs={}, tensors=[lora_row("a", 0.99999998, 1e-4)])
    assert "0.999999980" in report.render_terminal()
    assert "| mean cosine | 0.999999980 |" in report.to_markdown()


# -- plot --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["adapter", "task_vectors", "none"])
def test_plot_writes_png(tmp_path, mode):
    pytest.importorskip("matplotlib")
    path = tmp_path / "report.png"
    report = demo_report(layers=8)
    report.mode = mode
    report.plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    CompareReport(inputs={}, tensors=[], mode=mode).plot(tmp_path / "empty.png")  # still a file
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_plot_labels_every_log_tick_one_way():
    """Both log axes carry one tick notation, minor ticks included (the old cosine panel
    mixed cosine labels on major ticks with 1 - cos labels on minor ones)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatterSciNotation

    from stream_tv.report import plot as plotting

    fig = Figure()
    axes = fig.subplots(2, 1)
    plotting._style_log_axes(*axes)
    for ax in axes:
        assert isinstance(ax.yaxis.get_major_formatter(), LogFormatterSciNotation)
        assert isinstance(ax.yaxis.get_minor_formatter(), LogFormatterSciNotation)


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    with pytest.raises(InputError) as info:
        demo_report(layers=1).plot(tmp_path / "x.png")
    assert str(info.value) == "plotting needs matplotlib: pip install 'stream-tv[plot]'"
    assert not (tmp_path / "x.png").exists()


# -- verdicts on real PEFT merges (the cases of the issue), at the accumulator level ----------


def _peft_merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """PEFT's own merge_and_unload of one LoRA Linear with base weight ``w`` (any dtype)."""
    from collections import OrderedDict

    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(
        OrderedDict(lin=torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    )
    model = model.to(w.dtype)
    model.lin.weight.data.copy_(w)
    config = LoraConfig(r=a.shape[0], lora_alpha=alpha, target_modules=["lin"])
    peft_model = get_peft_model(model, config)
    peft_model.base_model.model.lin.lora_A["default"].weight.data.copy_(a)
    peft_model.base_model.model.lin.lora_B["default"].weight.data.copy_(b)
    return peft_model.merge_and_unload().lin.weight.detach().clone()


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_verdicts_on_real_peft_merges(base_dtype):
    """A Llama-shaped 512-wide LoRA (rank 8, deltas 0.08%-2.5% of the weight norm) merged by
    PEFT and saved in bf16: reproduced bit for bit when compared with the merge, never
    "departs" without it; a tensor changed after the merge departs and is named."""
    pytest.importorskip("peft")
    from stream_tv.stats import TensorAccumulator

    g = torch.Generator().manual_seed(0)
    rows, names = [], []
    for i, share in enumerate((0.0008, 0.005, 0.025)):
        w = (torch.randn(512, 512, generator=g) * 0.02).to(base_dtype)
        a = torch.randn(8, 512, generator=g) / 512**0.5
        b = torch.randn(512, 8, generator=g)
        lora = (2.0 * (b.double() @ a.double())).to(torch.float64)  # alpha 16 / r 8
        scale = share * w.double().norm() / lora.norm()
        b *= float(scale)
        lora *= float(scale)
        merged = _peft_merge(w, a, b, alpha=16)  # what stream-tv merge writes, PEFT-exact
        f = merged.to(torch.bfloat16)  # ... saved in bf16
        if i == 2:  # changed after the merge: a few elements off by many ulps
            f = f.clone()
            f.view(-1)[[5, 900, 77_000]] *= 1.5
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        names.append(name)
        for with_merge in (True, False):
            acc = TensorAccumulator(
                name, numel=w.numel(), has_lora=True, finetuned_dtype=f.dtype, base_dtype=w.dtype
            )
            for r0 in range(0, 512, 200):  # in row chunks
                s = slice(r0, r0 + 200)
                acc.update(
                    tv=f[s].double() - w[s].double(),
                    lora=lora[s],
                    finetuned=f[s],
                    base=w[s],
                    merged=merged[s] if with_merge else None,
                )
            rows.append((with_merge, acc.result()))
    inputs = {"finetuned_dtype": "bfloat16", "base_dtype": str(base_dtype)}
    compared = CompareReport(inputs=inputs, tensors=[t for m, t in rows if m])
    alone = CompareReport(inputs=inputs, tensors=[t for m, t in rows if not m])
    assert compared.summary["verdicts"]["reproduced"] == 2
    assert compared.summary["verdicts"]["departs"] == 1
    line = compared.headline()
    assert line.startswith("2 of 3 LoRA tensors are exactly base + LoRA merged as PEFT does")
    assert f"1 departs from base + LoRA: {names[2]} (3 of 262,144 elements" in line
    # without our merge: within one ulp (or undecided), never a departure; the changed one
    # is still named, as undecided
    verdicts = [alone.summary["verdicts"][k] for k in ("explained_by_rounding", "undecided")]
    assert alone.summary["verdicts"]["departs"] == 0 and sum(verdicts) == 3
    assert names[2] in alone.headline() and "depart" not in alone.headline()
    untouched = [t for t in alone.tensors if t.name != names[2]]
    assert all(t.ulp_max <= 1 for t in untouched)  # PEFT's fp32 add: one ulp at most
