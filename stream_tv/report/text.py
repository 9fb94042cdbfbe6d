"""The text renderings of a compare report: the headline, Markdown and the terminal summary.

Every phrase that depends on what ``L`` is comes from :data:`~.wording.WORDING`, looked up
once by the report's ``mode``; the verdicts are :func:`~.figures.verdict`'s.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from stream_tv.jsonutil import json_safe
from stream_tv.stats import CATEGORIES, CHANGED_NOT_LORA, LORA_AND_CHANGED, TensorComparison

from .figures import DEPARTS, EXPLAINED, REPRODUCED, mean, reduce, verdict
from .fmt import dtype_label, fmt_cosine, fmt_count, fmt_figure, fmt_percent
from .headline import headline
from .layers import layer_of, module_kinds
from .wording import WORDING

if TYPE_CHECKING:
    from .model import CompareReport

__all__ = ["headline", "markdown", "terminal"]

_WIDTH = 100  # terminal rendering width
_SHORT = {REPRODUCED: "reproduced", EXPLAINED: "explained", DEPARTS: "DEPARTS"}


# -- tables shared by Markdown and the terminal --------------------------------------------


def _ulps(t: TensorComparison) -> str:
    """``n0 / n1 / more`` elements at 0, 1 and more ulps; n/a if not measured."""
    if t.ulp_counts is None:
        return "n/a"
    return " / ".join(fmt_count(c) for c in t.ulp_counts)


def _ulp_max(t: TensorComparison) -> str:
    if t.ulp_counts is None:
        return "n/a"
    return "NaN" if t.ulp_max is None else fmt_count(t.ulp_max)


def _outside(report: CompareReport, n: int) -> tuple[str, list[TensorComparison], int]:
    """Tensors changed outside ``L`` (not by rounding alone), largest ``||T||`` first: a
    title, the first ``n``, and how many more there are."""
    rows = [t for t in report.tensors if t.category == CHANGED_NOT_LORA]
    rows.sort(key=lambda t: (-(t.tv_norm or 0.0), t.name))
    return WORDING[report.mode].outside_title, rows[:n], max(len(rows) - n, 0)


def _worst(report: CompareReport, n: int, key: str) -> list[TensorComparison]:
    """The n covered tensors with the lowest cosine / highest relative error."""
    rows = [t for t in report.covered() if getattr(t, key) is not None]
    if key == "cosine":
        rows.sort(key=lambda t: (t.cosine, t.name))
    else:
        rows.sort(key=lambda t: (-t.relative_error, t.name))
    return rows[:n]


def _departing(report: CompareReport) -> list[TensorComparison]:
    """Tensors whose verdict is ``departs``, most elements beyond one ulp first."""
    rows = [t for t in report.tensors if verdict(t) == DEPARTS]
    return sorted(rows, key=lambda t: (-(t.ulp_counts[2] if t.ulp_counts else 0), t.name))


def _summary_rows(report: CompareReport) -> list[tuple[str, str]]:
    s, words = report.summary, WORDING[report.mode]
    dtype = dtype_label(report.inputs.get("finetuned_dtype"))
    rows = []
    if s["lora_tensors"] and s["ulp_counts"] is not None:
        v = s["verdicts"]
        rows += [
            ("LoRA tensors reproduced (bit for bit)", str(v[REPRODUCED])),
            (f"... explained by {dtype} rounding", str(v[EXPLAINED])),
            ("... departing", str(v[DEPARTS])),
        ]
        if v["undecided"]:
            rows.append(("... undecided (fp32: needs our merge)", str(v["undecided"])))
        n0, n1, more = s["ulp_counts"]
        if s["bit_exact_merge"] is not None:
            rows.append(("elements bit-exact as our merge", fmt_percent(s["bit_exact_merge"])))
        rows += [
            ("elements 0 ulp from W + L", fmt_percent(n0 / (n0 + n1 + more or 1))),
            ("elements 1 ulp / more", f"{fmt_count(n1)} / {fmt_count(more)}"),
            ("max ulps from W + L", "NaN" if s["ulp_max"] is None else fmt_count(s["ulp_max"])),
        ]
    if s["nonfinite_elements"]:
        rows.append(("non-finite values (NaN, inf)", fmt_count(s["nonfinite_elements"])))
    return rows + [
        (words.summary_count, str(s["tensors"])),
        ("mean cosine", fmt_cosine(s["mean_cosine"])),
        ("min cosine", fmt_cosine(s["min_cosine"])),
        ("max abs diff", fmt_figure(s["max_abs_diff"])),
        ("mean max abs diff", fmt_figure(s["mean_max_abs_diff"])),
        ("mean mean abs diff", fmt_figure(s["mean_mean_abs_diff"])),
        ("mean relative error", fmt_figure(s["mean_relative_error"])),
    ]


def _coverage_rows(report: CompareReport) -> list[tuple[str, str, str]]:
    cov, meaning = report.coverage, WORDING[report.mode].meaning
    total = cov["total"]
    rows = [
        (f"{c} ({meaning[c]})", str(cov[c]), fmt_percent(cov[c] / total) if total else "n/a")
        for c in CATEGORIES
    ]
    rows.append(("total", str(total), "100%" if total else "n/a"))
    return rows


def _layer_rows(report: CompareReport) -> list[tuple[str, ...]]:
    """Per-layer aggregates, layers in order, non-layer tensors last as 'other'."""
    located = {t.name: layer_of(t.name) for t in report.tensors}
    kinds = module_kinds(located)
    # subtle: encoder.block.3 and decoder.block.3 are different layers; name the stack only
    # when there is more than one.
    several = len({loc[0] for loc in located.values() if loc is not None}) > 1
    groups: dict[tuple[int, str, int], list[TensorComparison]] = {}
    for t in report.tensors:
        loc = located[t.name]
        key = (1, "", 0) if loc is None else (0, loc[0] if several else "", loc[1])
        groups.setdefault(key, []).append(t)
    rows = []
    for (is_other, prefix, index), members in sorted(groups.items()):
        label = "other" if is_other else (f"{prefix}.{index}" if prefix else str(index))
        covered = [m for m in members if m.category == LORA_AND_CHANGED]
        with_cos = [m for m in covered if m.cosine is not None]
        worst = min(with_cos, key=lambda m: m.cosine).name if with_cos else None
        rows.append(
            (
                label,
                str(len(members)),
                str(sum(m.has_lora for m in members)),
                str(sum(m.changed for m in members)),
                fmt_cosine(mean(m.cosine for m in covered)),
                fmt_cosine(reduce(min, (m.cosine for m in covered))),
                fmt_figure(reduce(max, (m.relative_error for m in covered))),
                "" if worst is None else kinds.get(worst, worst),
                str(sum(verdict(m) == DEPARTS for m in members)),
            )
        )
    return rows


# -- Markdown ------------------------------------------------------------------------------


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]], align: str = "") -> list[str]:
    """A Markdown table; ``align`` has one l/r per column (default: text, then figures)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return lines + [""]


def _input_value(value: Any) -> str:
    """An input as Markdown: code for text, lists comma-separated, ``k=v`` for mappings."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_input_value(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return ", ".join(_input_value(v) for v in value) or "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return f"`{value}`"
    return str(value)


def markdown(report: CompareReport, *, worst: int = 10) -> str:
    """A Markdown report: headline, inputs, summary, coverage, departing and worst tensors,
    tensors changed outside L, per layer."""
    words = WORDING[report.mode]
    out = [words.title, "", f"**{headline(report)}**", ""]
    inputs = {k: v for k, v in json_safe(report.inputs).items() if v is not None}
    if inputs:
        out += ["## Inputs", ""]
        out += _table(("input", "value"), ((k, _input_value(v)) for k, v in inputs.items()), "ll")
    if report.mode != "none":
        out += ["## Summary", "", words.summary_intro, ""]
        out += _table(("figure", "value"), _summary_rows(report))
    out += ["## Coverage", ""]
    out += _table(("category", "tensors", "share"), _coverage_rows(report))
    cov = report.coverage
    if words.covers:
        out += [
            f"{words.covers} {fmt_percent(cov['lora_fraction_of_changed'])} of the "
            f"{cov['changed']} changed tensors.",
            "",
        ]
    out += _markdown_departing(report)
    if report.mode != "none":
        out += _markdown_worst(report, worst)
    out += _markdown_outside(report, worst)
    out += _markdown_nonfinite(report)
    out += ["## Per layer", ""]
    out += [
        f"Cosine and relative error over the layer's tensors with {words.l_name or 'L'} and "
        "a nonzero task vector; *worst module* has the lowest cosine.",
        "",
    ]
    header = ("layer", "tensors", words.l_column, "changed", "mean cosine", "min cosine")
    header += ("max rel. error", "worst module", "departs")
    out += _table(header, _layer_rows(report), "lrrrrrrlr")
    return "\n".join(out).rstrip() + "\n"


def _markdown_departing(report: CompareReport) -> list[str]:
    rows = _departing(report)
    if not rows:
        return []
    dtype = dtype_label(report.inputs.get("finetuned_dtype"))
    out = ["## Departing tensors", "", f"More than one {dtype} ulp from base + LoRA.", ""]
    return out + _table(
        ("tensor", "elements 0 / 1 / more ulps", "max ulps", "bit-exact", "cosine", "rel. error"),
        (
            (
                f"`{t.name}`",
                _ulps(t),
                _ulp_max(t),
                fmt_percent(t.bit_exact_merge),
                fmt_cosine(t.cosine),
                fmt_figure(t.relative_error),
            )
            for t in rows
        ),
    )


def _markdown_worst(report: CompareReport, n: int) -> list[str]:
    out = []
    for title, key in (("lowest cosine", "cosine"), ("highest relative error", "relative_error")):
        rows = _worst(report, n, key)
        out += [f"## Worst tensors by {title}", ""]
        if not rows:
            out += ["No tensor has both L and a nonzero task vector.", ""]
            continue
        out += _table(
            ("tensor", "verdict", "cosine", "relative error", "rounding floor", "max ulps"),
            (
                (
                    f"`{t.name}`",
                    (verdict(t) or "n/a").replace("_", " "),
                    fmt_cosine(t.cosine),
                    fmt_figure(t.relative_error),
                    fmt_figure(t.rounding_floor),
                    _ulp_max(t),
                )
                for t in rows
            ),
        )
    return out


def _markdown_outside(report: CompareReport, n: int) -> list[str]:
    title, rows, more = _outside(report, n)
    if not rows:
        return []
    out = [f"## {title}", "", "Not by dtype rounding alone; largest task vector first.", ""]
    out += _table(
        ("tensor", "task vector norm", "max ulps from base"),
        ((f"`{t.name}`", fmt_figure(t.tv_norm), _ulp_max(t)) for t in rows),
    )
    if more:
        out += [f"... and {more} more (all are in the JSON report).", ""]
    return out


def _markdown_nonfinite(report: CompareReport) -> list[str]:
    rows = [t for t in report.tensors if t.nonfinite]
    if not rows:
        return []
    out = ["## Non-finite values", "", "Elements where T or L is NaN or infinite.", ""]
    return out + _table(
        ("tensor", "elements"), ((f"`{t.name}`", fmt_count(t.nonfinite)) for t in rows)
    )


# -- terminal ------------------------------------------------------------------------------


def _clip(name: str, room: int) -> str:
    """``name``, cut from the left to ``room`` characters (the tail names the module)."""
    return name if len(name) <= room else "..." + name[-(room - 3) :]


def terminal(report: CompareReport, *, worst: int = 5) -> str:
    """A short plain-text summary that fits 100 columns."""
    out = textwrap.wrap(headline(report), _WIDTH)
    if report.mode != "none":  # without L every summary figure would be n/a
        rows = _summary_rows(report)
        half = (len(rows) + 1) // 2
        out += ["", "Summary"]
        right_rows = rows[half:] + [("", "")] * (2 * half - len(rows))
        for left, right in zip(rows[:half], right_rows, strict=True):
            cell = f"  {left[0]:<38}{left[1]:>10}"
            if right[0]:
                cell += f"    {right[0]:<36}{right[1]:>8}"
            out.append(cell.rstrip())
    out += ["", f"  {'Coverage':<68}{'tensors':>10}{'share':>10}"]
    out += [f"  {a:<68}{b:>10}{c:>10}" for a, b, c in _coverage_rows(report)]
    out += _terminal_tensors(report, worst)
    title, rows_o, more = _outside(report, worst)
    if rows_o:
        out += ["", f"{title}, largest task vector first", f"  {'||T||':>14}  tensor"]
        out += [f"  {fmt_figure(t.tv_norm):>14}  {_clip(t.name, _WIDTH - 18)}" for t in rows_o]
        if more:
            out.append(f"  ... and {more} more")
    return "\n".join(out)


def _terminal_tensors(report: CompareReport, n: int) -> list[str]:
    """The departing tensors, then the worst by cosine and by relative error."""
    out = []
    head = f"  {'verdict':<10} {'cosine':>14} {'rel.err':>9} {'floor':>9} {'max ulps':>9}  "
    sections = [("Departing from base + LoRA", _departing(report)[:n])]
    if report.mode != "none":
        sections += [
            (f"Worst {len(rows)} by {title}", rows)
            for title, key in (("lowest cosine", "cosine"), ("highest relative error", "rel"))
            if (rows := _worst(report, n, "cosine" if key == "cosine" else "relative_error"))
        ]
    for title, rows in sections:
        if not rows:
            continue
        out += ["", title, head + "tensor"]
        for t in rows:
            out.append(
                f"  {_SHORT.get(verdict(t) or '', verdict(t) or 'n/a'):<10} "
                f"{fmt_cosine(t.cosine):>14} {fmt_figure(t.relative_error):>9} "
                f"{fmt_figure(t.rounding_floor):>9} {_ulp_max(t):>9}  "
                + _clip(t.name, _WIDTH - len(head))
            )
    return out
