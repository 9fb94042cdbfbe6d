"""stream_tv.report: derived figures against numpy, and the four renderings."""

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
TOP = {
    "schema_version", "inputs", "summary", "coverage", "tensors",
}  # fmt: skip
SUMMARY = [
    "tensors", "mean_cosine", "min_cosine", "max_abs_diff", "mean_max_abs_diff",
    "mean_mean_abs_diff", "mean_relative_error",
]  # fmt: skip
COVERAGE = [
    "total", "lora", "changed", "lora_and_changed", "lora_unchanged", "changed_not_lora",
    "rounding_only", "unchanged", "lora_fraction_of_changed",
]  # fmt: skip
TENSOR = [
    "name", "category", "numel", "cosine", "max_abs_diff", "mean_abs_diff", "relative_error",
    "lora_norm", "tv_norm", "rounding_bound", "within_rounding",
]  # fmt: skip


def lora_row(name, cosine, rel, *, within=1.0, numel=4096, max_abs=2e-4) -> TensorComparison:
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
        rounding_bound=2.44e-4,
        within_rounding=within,
    )


def plain_row(name, category, tv_norm=0.1) -> TensorComparison:
    return TensorComparison(name, category, 4096, *([None] * 5), tv_norm, None, None)


def demo_report(layers: int = 24) -> CompareReport:
    """A realistic bf16 Llama-like comparison: LoRA on all 7 projections, a few bad layers,
    norms changed only by rounding (fp32 base saved as bf16), one fully fine-tuned MLP."""
    rng = np.random.default_rng(0)
    rows = [plain_row("model.embed_tokens.weight", ROUNDING_ONLY)]
    for i in range(layers):
        for m in MODULES:
            prefix = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            gap = 10 ** rng.uniform(-6.5, -5.5)
            if (i, m) in {(7, "down_proj"), (8, "down_proj")}:
                gap = 0.07  # adapter and merged model part ways
            if i >= 18 and m == "v_proj":
                gap = 10 ** (-4 + (i - 18) * 0.6)
            within = 1.0 if gap < 1e-5 else float(rng.uniform(0.4, 0.95))
            rows.append(
                lora_row(
                    f"model.layers.{i}.{prefix}.{m}.weight",
                    1 - gap,
                    math.sqrt(2 * gap),
                    within=within,
                    max_abs=float(rng.uniform(1e-4, 2.5e-4)) * (1 if gap < 1e-5 else 40),
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
            "base_dtype": torch.float32,
            "finetuned_dtype": torch.bfloat16,
            "r": 16,
            "alpha": 32,
            "scaling": 2.0,
        },
        tensors=rows,
    )


# -- summary and coverage against numpy --------------------------------------------------------

maybe = st.one_of(st.none(), st.floats(-1, 1, allow_nan=False))
positive = st.one_of(st.none(), st.floats(0, 1e3, allow_nan=False))


@st.composite
def rows(draw):
    category = draw(st.sampled_from(CATEGORIES))
    lora = category in (LORA_AND_CHANGED, LORA_UNCHANGED)
    figures = [draw(maybe)] + [draw(positive) for _ in range(4)] if lora else [None] * 5
    return TensorComparison(
        f"model.layers.{draw(st.integers(0, 5))}.{draw(st.sampled_from(MODULES))}.weight",
        category,
        draw(st.integers(0, 10_000)),
        *figures,
        draw(positive),
        draw(positive) if lora else None,
        draw(st.one_of(st.none(), st.floats(0, 1))) if lora else None,
    )


def np_stat(fn, values):
    kept = np.array([v for v in values if v is not None], dtype=np.float64)
    return float(fn(kept)) if kept.size else None


@given(tensors=st.lists(rows(), max_size=30))
@settings(max_examples=100, deadline=None)
def test_summary_and_coverage_match_numpy(tensors):
    report = CompareReport(inputs={}, tensors=tensors)
    covered = [t for t in tensors if t.category == LORA_AND_CHANGED]
    want = {
        "tensors": len(covered),
        "mean_cosine": np_stat(np.mean, [t.cosine for t in covered]),
        "min_cosine": np_stat(np.min, [t.cosine for t in covered]),
        "max_abs_diff": np_stat(np.max, [t.max_abs_diff for t in covered]),
        "mean_max_abs_diff": np_stat(np.mean, [t.max_abs_diff for t in covered]),
        "mean_mean_abs_diff": np_stat(np.mean, [t.mean_abs_diff for t in covered]),
        "mean_relative_error": np_stat(np.mean, [t.relative_error for t in covered]),
    }
    got = report.summary
    assert list(got) == SUMMARY
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-300), key

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

    # JSON: strict (no NaN), parseable, and read back to the same report.
    text = report.to_json()
    data = json.loads(text)
    assert data["summary"] == json.loads(json.dumps(got))
    assert CompareReport.from_json(text) == report


def test_summary_excludes_nulls_and_other_categories():
    report = CompareReport(
        inputs={},
        tensors=[
            lora_row("a", 0.5, 0.2, max_abs=1.0),
            lora_row("b", None, None, max_abs=3.0),  # e.g. a zero B factor
            TensorComparison("c", LORA_UNCHANGED, 4, None, 9.0, 9.0, None, 1.0, 0.0, 1.0, 0.0),
            plain_row("d", CHANGED_NOT_LORA),
        ],
    )
    s = report.summary
    assert s["tensors"] == 2
    assert s["mean_cosine"] == s["min_cosine"] == 0.5
    assert s["max_abs_diff"] == 3.0 and s["mean_max_abs_diff"] == 2.0
    assert s["mean_relative_error"] == 0.2


def test_empty_report_is_all_null():
    report = CompareReport(inputs={}, tensors=[])
    assert report.summary == {"tensors": 0, **dict.fromkeys(SUMMARY[1:])}
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
    assert set(data) == TOP and data["schema_version"] == 1
    assert list(data["summary"]) == SUMMARY and list(data["coverage"]) == COVERAGE
    assert all(list(t) == TENSOR for t in data["tensors"])
    assert data["inputs"]["finetuned"] == "/models/merged"
    assert data["inputs"]["finetuned_dtype"] == "bfloat16"
    assert data["inputs"]["weird"] is None
    assert len(data["tensors"]) == len(report.tensors)
    assert data["tensors"][1]["name"] == "model.layers.0.self_attn.q_proj.weight"
    # null, not NaN, for figures that need a LoRA delta
    assert data["tensors"][0]["cosine"] is None


def test_from_json_rejects_other_schema_versions():
    data = demo_report(layers=1).to_dict()
    data["schema_version"] = 2
    with pytest.raises(InputError, match="schema_version 2"):
        CompareReport.from_dict(data)
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
    none = CompareReport(inputs={}, tensors=[plain_row("a", CHANGED_NOT_LORA)], mode="none")
    assert none.headline() == (
        "1 of 1 tensors changed (no adapter given: nothing to compare the task vector with)"
    )
    with pytest.raises(InputError, match="unknown compare mode 'lora'"):
        CompareReport(inputs={}, tensors=rows, mode="lora")


@pytest.mark.parametrize(
    ("inputs", "mode"),
    [
        ({"task_vectors": ["a", "b"], "adapter": None}, "task_vectors"),
        ({"task_vectors": [], "adapter": None, "base": "b"}, "none"),
        ({"task_vectors": ["a"], "adapter": "x"}, "adapter"),
        ({}, "adapter"),
    ],
)
def test_schema_1_reads_the_mode_from_the_inputs_compare_wrote(inputs, mode):
    report = CompareReport(inputs=inputs, tensors=[lora_row("a", 0.5, 0.1)], mode=mode)
    back = CompareReport.from_json(report.to_json())
    assert back.mode == mode and back == report


# -- headline ----------------------------------------------------------------------------------


def test_headline_says_what_it_means():
    rows = [lora_row(f"model.layers.{i}.q_proj.weight", 0.999998, 1e-3) for i in range(120)]
    rows += [plain_row(f"model.layers.{i}.norm.weight", ROUNDING_ONLY) for i in range(363)]
    report = CompareReport(inputs={"finetuned_dtype": "torch.bfloat16"}, tensors=rows)
    assert report.headline() == (
        "LoRA explains the task vector on 120 of 483 changed tensors (mean cosine "
        "0.9999980, all differences within bf16 rounding); 363 changed outside the "
        "adapter, all only by bf16 rounding"
    )


def test_headline_names_departures_and_mixed_causes():
    report = demo_report()
    line = report.headline()
    assert "\n" not in line
    # 168 covered: 2 bad down_proj and v_proj in layers 20-23 fall below cosine 0.999 with
    # differences beyond rounding; v_proj 18-19 are above it.
    assert line.startswith("LoRA explains the task vector on 162 of 219 changed tensors")
    assert "(mean cosine 0.9999956, 99.8% of elements within bf16 rounding)" in line
    assert (
        "6 LoRA tensors depart from it (worst cosine 0.9000 at "
        "model.layers.23.self_attn.v_proj.weight)" in line
    )
    assert line.endswith("51 changed outside the adapter, of which 50 only by bf16 rounding")


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
            [lora_row("a", 0.2, 1.2, within=0.5), plain_row("b", LORA_UNCHANGED)],
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
            [lora_row("a", 0.5, 0.1, within=1.0), lora_row("b", 0.9995, 0.1, within=0.25)],
            "LoRA explains the task vector on 2 of 2 changed tensors (mean cosine 0.7498, "
            "62.5% of elements within dtype rounding)",
        ),
    ],
)
def test_headline_cases(tensors, expected):
    assert CompareReport(inputs={}, tensors=tensors).headline() == expected


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
    assert md.startswith("# LoRA delta vs task vector\n\n**LoRA explains the task vector on")
    for heading in (
        "## Inputs", "## Summary", "## Coverage", "## Worst tensors by lowest cosine",
        "## Worst tensors by highest relative error", "## Per layer",
    ):  # fmt: skip
        assert f"\n{heading}\n" in md
    assert "| category | tensors | share |" in md
    assert "| lora_and_changed (LoRA delta, tensor changed) | 168 | 76.4% |" in md
    assert "| total | 220 | 100% |" in md
    per_layer = md[md.index("## Per layer") :]
    assert "| layer | tensors | LoRA | changed | mean cosine |" in per_layer
    # layer 7 holds a bad down_proj; layer 3 the fully fine-tuned expert gate
    assert "| 7 | 9 | 7 | 9 |" in per_layer and "| down_proj |" in per_layer
    assert "| 3 | 10 | 7 | 10 |" in per_layer
    assert per_layer.rstrip().splitlines()[-1] == "| other | 3 | 0 | 2 | n/a | n/a | n/a |  |"
    assert md.index("| 2 |", md.index("## Per layer")) < md.index(
        "| 10 |", md.index("## Per layer")
    )
    worst = md[md.index("## Worst tensors by lowest cosine") :]
    order = ["layers.23.self_attn.v_proj", "layers.7.mlp.down_proj", "layers.8.mlp.down_proj"]
    assert sorted(order, key=worst.index) == order


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


def test_terminal_fits_100_columns():
    report = demo_report()
    report.tensors.append(lora_row("x." * 80 + "weight", -0.5, 3.0, within=0.1))  # a very long name
    text = report.render_terminal(worst=5)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    assert "Worst 5 by lowest cosine" in text and "Worst 5 by highest relative error" in text
    assert any(line.strip().startswith("lora_and_changed") and "169" in line for line in lines)
    assert any(line.strip().startswith("total") and "221" in line for line in lines)
    long_line = next(line for line in lines if line.endswith("x.x.x.weight"))
    assert "..." in long_line and len(long_line) == 100  # truncated from the left, tail kept
    assert " ".join(lines[:3]).startswith("LoRA explains the task vector on")


def test_cosines_close_to_one_are_not_rounded_to_one():
    report = CompareReport(inputs={}, tensors=[lora_row("a", 0.99999998, 1e-4)])
    assert "0.999999980" in report.render_terminal()
    assert "| mean cosine | 0.999999980 |" in report.to_markdown()


# -- plot --------------------------------------------------------------------------------------


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "report.png"
    demo_report(layers=8).plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    CompareReport(inputs={}, tensors=[]).plot(tmp_path / "empty.png")  # no data: still a file
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    with pytest.raises(InputError) as info:
        demo_report(layers=1).plot(tmp_path / "x.png")
    assert str(info.value) == "plotting needs matplotlib: pip install 'stream-tv[plot]'"
    assert not (tmp_path / "x.png").exists()
