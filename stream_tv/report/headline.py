"""The headline: one line saying what a compare report means, in the verdicts' words.

Where the fine-tuned and base weights were measured, it says which LoRA tensors are PEFT's
merge bit for bit, which are base + LoRA up to the dtype's rounding and which depart (by
name); where they were not (two task vectors, a task vector for ``T``), it judges by cosine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stream_tv.stats import CHANGED_NOT_LORA, LORA_UNCHANGED, ROUNDING_ONLY, TensorComparison

from .figures import (
    DEPARTS,
    EXPLAINED,
    REPRODUCED,
    UNDECIDED,
    explained_by_cosine,
    mean,
    norm_ratio,
    ulp_totals,
    verdict,
)
from .fmt import count, dtype_label, fmt_cosine, fmt_count, fmt_figure, fmt_percent, verb
from .wording import WORDING, Wording

if TYPE_CHECKING:
    from .model import CompareReport

__all__ = ["headline"]

#: The headline flags explained tensors whose median ``||L|| / ||T||`` is further from 1.
_SCALE_TOLERANCE = 0.01
#: Tensors named in a clause before "and N more".
_NAMED = 3


def headline(report: CompareReport) -> str:
    """One line saying what the figures mean.

    e.g. ``All 24 LoRA tensors are exactly base + LoRA merged as PEFT does (bit for bit);
    78 others changed only by bf16 rounding of an fp32 base``, or ``... 1 of 24 LoRA tensors
    departs from base + LoRA: model.layers.3.mlp.down_proj.weight (12 elements more than one
    bf16 ulp away, up to 57 ulps)``. Without measured verdicts: ``LoRA explains the task
    vector on 14 of 14 changed tensors (mean cosine 0.9999990)``, a covered tensor being
    explained when its cosine is at least :data:`~.figures.EXPLAINED_COSINE`. Two task
    vectors read "The first task vector explains the second ..."; without an adapter the
    line says what changed. Non-finite values, if any, come last.
    """
    if not report.tensors:
        return "No tensors were compared"
    cov, words = report.coverage, WORDING[report.mode]
    dtype = dtype_label(report.inputs.get("finetuned_dtype"))
    if report.mode == "none":
        return "; ".join([_headline_without_l(cov, dtype), *_nonfinite(report)])
    lora = report.with_lora()
    judged = any(verdict(t) is not None for t in lora)
    parts: list[str] = []
    if cov["changed"] == 0:
        parts.append(f"{words.zero}: no tensor of {cov['total']} changed")
    if not lora:
        if cov["changed"]:
            parts.append(words.no_l.format(changed=cov["changed"]))
    elif judged:
        parts += _verdict_clauses(lora, _dtype_of(lora, dtype))
    elif cov["changed"] and report.covered():
        parts += _cosine_clauses(report.covered(), cov, dtype, words)
    if judged:
        parts += _others_clauses(report, cov, dtype)
    else:
        parts += _outside_clauses(report, cov, dtype, words)
    return "; ".join(parts + _nonfinite(report))


def _dtype_of(tensors: list[TensorComparison], fallback: str) -> str:
    """The fine-tuned dtype the tensors share, as a short label; ``fallback`` if they differ."""
    dtypes = {t.finetuned_dtype for t in tensors} - {None}
    return dtype_label(dtypes.pop()) if len(dtypes) == 1 else fallback


def _subject(k: int, n: int, first: bool, one: str = "is", many: str = "are") -> str:
    """Who a verdict clause is about: "All 24 LoRA tensors are", "3 of 24 LoRA tensors
    are", or after the first clause just "3 are"."""
    if k == n:
        return f"The LoRA tensor {one}" if n == 1 else f"All {n} LoRA tensors {many}"
    return f"{k} of {n} LoRA tensors {verb(k, one, many)}" if first else f"{k} {verb(k, one, many)}"


def _names(tensors: list[TensorComparison]) -> str:
    names = ", ".join(t.name for t in tensors[:_NAMED])
    return names + (f" and {len(tensors) - _NAMED} more" if len(tensors) > _NAMED else "")


def _verdict_clauses(lora: list[TensorComparison], dtype: str) -> list[str]:
    """One clause per verdict that occurs, best first; the first names the whole count."""
    n = len(lora)
    parts: list[str] = []

    def subject(tensors: list[TensorComparison], one: str = "is", many: str = "are") -> str:
        return _subject(len(tensors), n, not parts, one, many)

    reproduced = [t for t in lora if verdict(t) == REPRODUCED]
    if reproduced:
        parts.append(f"{subject(reproduced)} exactly base + LoRA merged as PEFT does (bit for bit)")
    explained = [t for t in lora if verdict(t) == EXPLAINED]
    if explained:
        (n0, n1, _), _ = ulp_totals(explained)  # type: ignore[misc]
        if n1 == 0:
            parts.append(f"{subject(explained)} exactly base + LoRA, correctly rounded to {dtype}")
        else:
            parts.append(
                f"{subject(explained)} base + LoRA within one {dtype} ulp "
                f"({fmt_percent(n0 / (n0 + n1))} of elements exactly the correctly rounded sum, "
                "the rest one ulp away)"
            )
    departing = sorted(
        (t for t in lora if verdict(t) == DEPARTS),
        key=lambda t: (-(t.ulp_counts[2] if t.ulp_counts else 0), t.name),
    )
    if departing:
        # subtle: an adapter merged at another scale (alpha) departs everywhere with every
        # cosine 1; say so, it is the likely cause.
        ratio = norm_ratio(departing)
        scale = f"; ||L|| / ||T|| = {fmt_figure(ratio)}" if _off_scale(ratio) else ""
        parts.append(
            f"{subject(departing, 'departs', 'depart')} from base + LoRA: {_names(departing)} "
            f"({_beyond(departing, dtype)}{scale})"
        )
    undecided = sorted(
        (t for t in lora if verdict(t) == UNDECIDED),
        key=lambda t: (-(t.ulp_counts[2] if t.ulp_counts else 0), t.name),
    )
    if undecided:
        # subtle: rounding the delta before the sum (as merges do) can put elements near zero
        # many ulps away; without the bit-exact comparison that is not a departure.
        ratio = norm_ratio(undecided)
        scale = f", ||L|| / ||T|| = {fmt_figure(ratio)}" if _off_scale(ratio) else ""
        parts.append(
            f"{subject(undecided)} undecided without a bit-exact comparison with our merge: "
            f"{_names(undecided)} ({_beyond(undecided, dtype)}{scale})"
        )
    unmeasured = [t for t in lora if verdict(t) is None]
    if unmeasured:
        parts.append(f"{subject(unmeasured)} not measured")
    return parts


def _off_scale(ratio: float | None) -> bool:
    """A median ``||L|| / ||T||`` further from 1 than rounding makes it (another alpha)."""
    return ratio is not None and abs(ratio - 1) > _SCALE_TOLERANCE


def _beyond(tensors: list[TensorComparison], dtype: str) -> str:
    """How far the tensors are from base + LoRA: elements beyond one ulp, the furthest."""
    (n0, n1, more), far = ulp_totals(tensors)  # type: ignore[misc]
    text = (
        f"{fmt_count(more)} of {fmt_count(n0 + n1 + more)} elements more than one {dtype} ulp away"
    )
    if far is None:
        return text + ", some NaN where base + LoRA is a number"
    return text + f", up to {fmt_count(far)} ulps"


def _others_clauses(report: CompareReport, cov: dict[str, Any], dtype: str) -> list[str]:
    """The tensors without a LoRA delta that changed, beside measured verdicts."""
    real, rounding = cov[CHANGED_NOT_LORA], cov[ROUNDING_ONLY]
    raw = report.inputs.get("base_dtype")
    base = dtype_label(raw) if raw is not None else None
    of_base = "of the base" if base is None else f"of {'an' if base[0] == 'f' else 'a'} {base} base"
    parts = []
    if real:
        text = f"{real} changed outside the adapter"
        rows = [t for t in report.tensors if t.category == CHANGED_NOT_LORA]
        if all(t.ulp_counts is not None and t.ulp_max is not None for t in rows):
            if max(t.ulp_max for t in rows) <= 1:  # type: ignore[type-var]
                text += f" (all within one {dtype} ulp of the base)"
        parts.append(text)
    if rounding:
        others = "others" if real else verb(rounding, "other", "others")
        parts.append(f"{rounding} {others} changed only by {dtype} rounding {of_base}")
    return [", ".join(parts)] if parts else []


def _cosine_clauses(
    covered: list[TensorComparison], cov: dict[str, Any], dtype: str, words: Wording
) -> list[str]:
    """Without measured verdicts: how many covered tensors L explains by cosine, with what
    figures, and which depart."""
    good = [t for t in covered if explained_by_cosine(t)]
    # The figures in this clause are over the explained tensors; the departures get their
    # own clause, and the summary table has the figures over all covered ones.
    details = [f"mean cosine {fmt_cosine(mean(t.cosine for t in good))}"]
    # subtle: a cosine is blind to scale; a LoRA merged with another alpha (or a task vector
    # applied at another --scale) would read as "explained".
    ratio = norm_ratio(good)
    if _off_scale(ratio):
        details.append(f"but ||L|| / ||T|| = {fmt_figure(ratio)}")
    parts = [
        f"{words.subject} on {len(good)} of {cov['changed']} changed tensors"
        + (f" ({', '.join(details)})" if good else "")
    ]
    departed = [t for t in covered if not explained_by_cosine(t)]
    if departed:
        worst = min(departed, key=lambda t: -2.0 if t.cosine is None else t.cosine)
        parts.append(
            f"{count(len(departed), words.l_tensors)} "
            f"{verb(len(departed), 'departs', 'depart')} from it "
            f"(worst cosine {fmt_cosine(worst.cosine)} at {worst.name})"
        )
    return parts


def _outside_clauses(
    report: CompareReport, cov: dict[str, Any], dtype: str, words: Wording
) -> list[str]:
    """Without measured verdicts: tensors changed where L is absent, and tensors where L is
    given but T is zero."""
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


def _nonfinite(report: CompareReport) -> list[str]:
    rows = [t for t in report.tensors if t.nonfinite]
    if not rows:
        return []
    total = sum(t.nonfinite for t in rows)
    return [
        f"{fmt_count(total)} non-finite {verb(total, 'value', 'values')} (NaN or inf) in "
        f"{count(len(rows), 'tensor')}: {_names(rows)}"
    ]


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
