"""The text renderings of a compare report: the headline, Markdown and the terminal summary.

Every phrase that depends on what ``L`` is comes from :data:`~.wording.WORDING`, looked up
once by the report's ``mode``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from stream_tv.jsonutil import json_safe
from stream_tv.stats import (
    CATEGORIES,
    CHANGED_NOT_LORA,
    LORA_AND_CHANGED,
    LORA_UNCHANGED,
    ROUNDING_ONLY,
    UNCHANGED,
    TensorComparison,
)

from .figures import explained, mean, norm_ratio, reduce, within_fraction
from .fmt import count, dtype_label, fmt_cosine, fmt_figure, fmt_percent, verb
from .layers import layer_of, module_kinds
from .wording import WORDING, Wording

if TYPE_CHECKING:
    from .model import CompareReport

__all__ = ["headline", "markdown", "terminal"]

_WIDTH = 100  # terminal rendering width

#: The headline flags explained tensors whose median ``||L|| / ||T||`` is further from 1.
_SCALE_TOLERANCE = 0.01


# -- the headline --------------------------------------------------------------------------


def headline(report: CompareReport) -> str:
    """One line saying what the figures mean.

    e.g. ``LoRA explains the task vector on 120 of 483 changed tensors (mean cosine
    0.999998, all differences within bf16 rounding); 363 changed outside the adapter, all
    only by bf16 rounding``. A covered tensor is "explained" when its cosine is at least
    :data:`~.figures.EXPLAINED_COSINE` or all its differences are within rounding. Two task
    vectors read "The first task vector explains the second ..."; without an adapter (base
    and finetuned only) the line says what changed, and nothing about an adapter.
    """
    if not report.tensors:
        return "No tensors were compared"
    cov, dtype = report.coverage, dtype_label(report.inputs.get("finetuned_dtype"))
    if report.mode == "none":
        return _headline_without_l(cov, dtype)
    words = WORDING[report.mode]
    parts: list[str] = []
    if cov["changed"] == 0:
        parts.append(f"{words.zero}: no tensor of {cov['total']} changed")
    elif cov["lora"] == 0:
        parts.append(words.no_l.format(changed=cov["changed"]))
    elif report.covered():
        parts += _covered_clauses(report.covered(), cov, dtype, words)
    parts += _outside_clauses(report, cov, dtype, words)
    return "; ".join(parts)


def _covered_clauses(
    covered: list[TensorComparison], cov: dict[str, Any], dtype: str, words: Wording
) -> list[str]:
    """How many covered tensors L explains, with what figures, and which depart."""
    good = [t for t in covered if explained(t)]
    # The figures in this clause are over the explained tensors; the departures get their
    # own clause, and the summary table has the figures over all covered ones.
    details = [f"mean cosine {fmt_cosine(mean(t.cosine for t in good))}"]
    within = within_fraction(good)
    if within == 1.0:
        details.append(f"all differences within {dtype} rounding")
    elif within is not None:
        details.append(f"{fmt_percent(within)} of elements within {dtype} rounding")
    # subtle: a cosine is blind to scale; a LoRA merged with another alpha (or a task vector
    # applied at another --scale) would read as "explained". Tensors whose differences are
    # all rounding are explained whatever their norms say.
    ratio = norm_ratio([t for t in good if t.within_rounding != 1.0])
    if ratio is not None and abs(ratio - 1) > _SCALE_TOLERANCE:
        details.append(f"but ||L|| / ||T|| = {fmt_figure(ratio)}")
    parts = [
        f"{words.subject} on {len(good)} of {cov['changed']} changed tensors"
        + (f" ({', '.join(details)})" if good else "")
    ]
    departed = [t for t in covered if not explained(t)]
    if departed:
        worst = min(departed, key=lambda t: -2.0 if t.cosine is None else t.cosine)
        parts.append(
            f"{count(len(departed), words.departing_noun)} "
            f"{verb(len(departed), 'departs', 'depart')} from it "
            f"(worst cosine {fmt_cosine(worst.cosine)} at {worst.name})"
        )
    return parts


def _outside_clauses(
    report: CompareReport, cov: dict[str, Any], dtype: str, words: Wording
) -> list[str]:
    """Tensors changed where L is absent, and tensors where L is given but T is zero."""
    parts = []
    outside = cov[CHANGED_NOT_LORA] + cov[ROUNDING_ONLY]
    rounding = cov[ROUNDING_ONLY] if words.outside_by_rounding else 0
    if outside and cov["lora"]:
        text = words.outside.format(n=outside)
        if rounding == outside:
            text += f", all only by {dtype} rounding"
        elif rounding:
            text += f", of which {rounding} only by {dtype} rounding"
        parts.append(text)
    elif outside and rounding:
        parts.append(f"{rounding} of them only by {dtype} rounding")
    # Tensors both task vectors leave at zero are not news; ones only the second does are.
    unchanged = [
        t
        for t in report.tensors
        if t.category == LORA_UNCHANGED and (t.lora_norm or not words.l_unchanged_needs_nonzero_l)
    ]
    if unchanged:
        n = len(unchanged)
        parts.append(f"{count(n, 'tensor')} {words.l_unchanged.format(verb=verb(n))}")
    return parts


def _headline_without_l(cov: dict[str, Any], dtype: str) -> str:
    """The headline of a comparison without ``L``: what changed, and how."""
    changed, total, rounding = cov["changed"], cov["total"], cov[ROUNDING_ONLY]
    if changed == 0:
        return f"The task vector is zero: no tensor of {total} changed"
    line = f"{changed} of {total} tensors changed"
    if rounding == changed:
        line += f", all only by {dtype} rounding"
    elif rounding:
        line += f", {rounding} of them only by {dtype} rounding"
    return line + " (no adapter given: nothing to compare the task vector with)"


# -- tables shared by Markdown and the terminal --------------------------------------------


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


def _summary_rows(report: CompareReport) -> list[tuple[str, str]]:
    s = report.summary
    return [
        ("tensors (LoRA delta and task vector)", str(s["tensors"])),
        ("mean cosine", fmt_cosine(s["mean_cosine"])),
        ("min cosine", fmt_cosine(s["min_cosine"])),
        ("max abs diff", fmt_figure(s["max_abs_diff"])),
        ("mean max abs diff", fmt_figure(s["mean_max_abs_diff"])),
        ("mean mean abs diff", fmt_figure(s["mean_mean_abs_diff"])),
        ("mean relative error", fmt_figure(s["mean_relative_error"])),
        ("elements within rounding", fmt_percent(within_fraction(report.covered()))),
    ]


_MEANING = {
    LORA_AND_CHANGED: "LoRA delta, tensor changed",
    LORA_UNCHANGED: "LoRA delta, tensor not changed",
    CHANGED_NOT_LORA: "changed, no LoRA delta",
    ROUNDING_ONLY: "changed only by dtype rounding",
    UNCHANGED: "no LoRA delta, not changed",
}


def _coverage_rows(report: CompareReport) -> list[tuple[str, str, str]]:
    cov = report.coverage
    total = cov["total"]
    rows = [
        (f"{c} ({_MEANING[c]})", str(cov[c]), fmt_percent(cov[c] / total) if total else "n/a")
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


def markdown(report: CompareReport, *, worst: int = 10) -> str:
    """A Markdown report: headline, inputs, summary, coverage, worst tensors, per layer."""
    out = [WORDING[report.mode].title, "", f"**{headline(report)}**", ""]
    inputs = json_safe(report.inputs)
    if inputs:
        out += ["## Inputs", ""]
        out += _table(("input", "value"), ((k, f"`{v}`") for k, v in inputs.items()), "ll")
    out += ["## Summary", ""]
    out += [
        "Over tensors that have both a LoRA delta and a nonzero task vector; "
        "`L` is the LoRA delta, `T` the task vector.",
        "",
    ]
    out += _table(("figure", "value"), _summary_rows(report))
    out += ["## Coverage", ""]
    out += _table(("category", "tensors", "share"), _coverage_rows(report))
    cov = report.coverage
    out += [
        f"LoRA covers {fmt_percent(cov['lora_fraction_of_changed'])} of the "
        f"{cov['changed']} changed tensors.",
        "",
    ]
    out += _markdown_worst(report, worst)
    out += _markdown_outside(report, worst)
    out += ["## Per layer", ""]
    out += [
        "Cosine and relative error over the layer's tensors with a LoRA delta and a task "
        "vector; *worst module* has the lowest cosine.",
        "",
    ]
    header = ("layer", "tensors", "LoRA", "changed", "mean cosine", "min cosine")
    header += ("max rel. error", "worst module")
    out += _table(header, _layer_rows(report), "lrrrrrrl")
    return "\n".join(out).rstrip() + "\n"


def _markdown_worst(report: CompareReport, n: int) -> list[str]:
    out = []
    for title, key in (("lowest cosine", "cosine"), ("highest relative error", "relative_error")):
        rows = _worst(report, n, key)
        out += [f"## Worst tensors by {title}", ""]
        if not rows:
            out += ["No tensor has both a LoRA delta and a task vector.", ""]
            continue
        out += _table(
            ("tensor", "cosine", "relative error", "max abs diff", "rounding bound", "within"),
            (
                (
                    f"`{t.name}`",
                    fmt_cosine(t.cosine),
                    fmt_figure(t.relative_error),
                    fmt_figure(t.max_abs_diff),
                    fmt_figure(t.rounding_bound),
                    fmt_percent(t.within_rounding),
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
        ("tensor", "task vector norm"), ((f"`{t.name}`", fmt_figure(t.tv_norm)) for t in rows)
    )
    if more:
        out += [f"... and {more} more (all are in the JSON report).", ""]
    return out


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
            cell = f"  {left[0]:<38}{left[1]:>12}"
            if right[0]:
                cell += f"    {right[0]:<28}{right[1]:>14}"
            out.append(cell.rstrip())
    out += ["", f"  {'Coverage':<54}{'tensors':>10}{'share':>9}"]
    out += [f"  {a:<54}{b:>10}{c:>9}" for a, b, c in _coverage_rows(report)]
    for title, key in (("lowest cosine", "cosine"), ("highest relative error", "relative_error")):
        rows_t = _worst(report, worst, key)
        if not rows_t:
            continue
        out += ["", f"Worst {len(rows_t)} by {title}"]
        head = f"  {'cosine':>14} {'rel.err':>9} {'max|L-T|':>9} {'within':>7}  "
        out.append(head + "tensor")
        for t in rows_t:
            out.append(
                f"  {fmt_cosine(t.cosine):>14} {fmt_figure(t.relative_error):>9} "
                f"{fmt_figure(t.max_abs_diff):>9} {fmt_percent(t.within_rounding):>7}  "
                + _clip(t.name, _WIDTH - len(head))
            )
    title, rows_o, more = _outside(report, worst)
    if rows_o:
        out += ["", f"{title}, largest task vector first", f"  {'||T||':>14}  tensor"]
        out += [f"  {fmt_figure(t.tv_norm):>14}  {_clip(t.name, _WIDTH - 18)}" for t in rows_o]
        if more:
            out.append(f"  ... and {more} more")
    return "\n".join(out)
