"""The compare report: one object, four renderings (JSON, Markdown, terminal, plot).

JSON schema, ``schema_version`` 1 (stable: fields are only ever added, under a new version)::

    {"schema_version": 1,
     "inputs":   {...},        # as given by the caller: references, dtypes, adapter r/alpha/
                               # scaling. Optional key "finetuned_dtype" (e.g. "bfloat16")
                               # names the rounding in the headline.
     "summary":  {...},        # over tensors with a LoRA delta AND a nonzero task vector
                               # (category lora_and_changed); nulls are left out of every
                               # mean / min / max, and a figure with no values is null
       "tensors":             N  # how many tensors the summary is over
       "mean_cosine":         x  # mean of the per-tensor cosines
       "min_cosine":          x  # the worst cosine
       "max_abs_diff":        x  # max over tensors of max |L - T|
       "mean_max_abs_diff":   x  # mean over tensors of max |L - T|
       "mean_mean_abs_diff":  x  # mean over tensors of mean |L - T|
       "mean_relative_error": x  # mean over tensors of ||L - T|| / ||T||
     "coverage": {...},        # over every tensor name; the five categories partition them
       "total":        N         # tensors compared
       "lora":         N         # with a LoRA delta (lora_and_changed + lora_unchanged)
       "changed":      N         # T has a nonzero element (lora_and_changed +
                                 #   changed_not_lora + rounding_only)
       "lora_and_changed", "lora_unchanged", "changed_not_lora", "rounding_only",
       "unchanged":    N         # see stream_tv.stats.TensorAccumulator for the definitions
       "lora_fraction_of_changed": x  # lora_and_changed / changed (null if nothing changed)
     "tensors":  [{            # one per tensor, in the caller's order
       "name":           str   # the base checkpoint's tensor name
       "category":       str   # one of the five coverage categories
       "numel":          N     # elements
       "cosine":         x     # <L,T> / (||L|| ||T||), in [-1, 1]; null if a norm is 0
       "max_abs_diff":   x     # max |L - T|
       "mean_abs_diff":  x     # mean |L - T|
       "relative_error": x     # ||L - T|| / ||T||; null if T is zero
       "lora_norm":      x     # ||L|| (Frobenius)
       "tv_norm":        x     # ||T||; the only figure also given for tensors without LoRA
       "rounding_bound": x     # max over elements of half an ulp of the finetuned value in
                               #   its dtype: the largest |L - T| its rounding can explain
       "within_rounding": x    # fraction of elements with |L - T| <= their own half ulp
     }, ...]}

``L`` is the LoRA delta ``scaling * B @ A``, ``T`` the task vector ``finetuned - base``, both
in float64. Fields that need ``L`` are null for tensors without a LoRA delta; no value is
ever NaN or infinite (those become null). Library code here never prints.

>>> from stream_tv.stats import TensorComparison
>>> t = TensorComparison("model.layers.0.mlp.up_proj.weight", "lora_and_changed", 4,
...                      0.5, 1.0, 0.5, 0.9, 1.0, 2.0, 0.25, 0.75)
>>> report = CompareReport(inputs={"base": "b"}, tensors=[t])
>>> report.summary["mean_cosine"], report.coverage["lora_fraction_of_changed"]
(0.5, 1.0)
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from stream_tv.errors import InputError
from stream_tv.stats import (
    CATEGORIES,
    CHANGED_NOT_LORA,
    LORA_AND_CHANGED,
    LORA_UNCHANGED,
    ROUNDING_ONLY,
    UNCHANGED,
    TensorComparison,
)

__all__ = ["CompareReport", "EXPLAINED_COSINE", "layer_of"]

#: A covered tensor counts as "explained" by LoRA in the headline when its cosine is at
#: least this, or when every element of L - T is within the finetuned dtype's rounding.
EXPLAINED_COSINE = 0.999

_WIDTH = 100  # terminal rendering width
_DTYPE_SHORT = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "float64": "fp64",
    "double": "fp64",
}
# The block containers of common architectures: model.layers.N (Llama, Mistral, Qwen),
# transformer.h.N (GPT-2), gpt_neox.layers.N, encoder.block.N (T5), blocks.N, ...
_LAYER = re.compile(r"^(?:(?P<prefix>.*?)\.)?(?:layers|layer|h|blocks|block)\.(?P<index>\d+)\.")


def layer_of(name: str) -> tuple[str, int, str] | None:
    """Split a tensor name into (stack prefix, layer index, module kind); None outside layers.

    >>> layer_of("model.layers.12.self_attn.q_proj.weight")
    ('model', 12, 'q_proj')
    >>> layer_of("transformer.h.3.attn.c_attn.weight")
    ('transformer', 3, 'c_attn')
    >>> layer_of("model.layers.0.self_attn.q_proj.bias")
    ('model', 0, 'q_proj.bias')
    >>> layer_of("model.embed_tokens.weight") is None
    True
    """
    match = _LAYER.match(name)
    if match is None:
        return None
    parts = name[match.end() :].split(".")
    if len(parts) > 1 and parts[-1] == "weight":
        parts = parts[:-1]
    kind = parts[-1]
    if kind == "bias" and len(parts) > 1:
        kind = f"{parts[-2]}.bias"
    return match.group("prefix") or "", int(match.group("index")), kind


def _module_kinds(names: Iterable[str]) -> dict[str, str]:
    """The module kind of every layer tensor, unique within its layer.

    ``layer_of``'s kind is the last name component; where two tensors of one layer share it
    (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``), those tensors are named by their path in
    the layer instead, in every layer, so that a plot series is one module.

    >>> _module_kinds(["transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight",
    ...                "transformer.h.0.attn.c_attn.weight"])  # doctest: +NORMALIZE_WHITESPACE
    {'transformer.h.0.attn.c_proj.weight': 'attn.c_proj',
     'transformer.h.0.mlp.c_proj.weight': 'mlp.c_proj',
     'transformer.h.0.attn.c_attn.weight': 'c_attn'}
    """
    located = {n: loc for n in names if (loc := layer_of(n)) is not None}
    seen: dict[tuple[str, int, str], int] = {}
    for loc in located.values():
        seen[loc] = seen.get(loc, 0) + 1
    clashing = {loc[2] for loc, count in seen.items() if count > 1}
    kinds = {}
    for name, loc in located.items():
        if loc[2] in clashing:
            match = _LAYER.match(name)
            assert match is not None  # layer_of matched it
            kinds[name] = name[match.end() :].removesuffix(".weight")
        else:
            kinds[name] = loc[2]
    return kinds


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return math.fsum(kept) / len(kept) if kept else None


def _reduce(fn: Callable[[list[float]], float], values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return fn(kept) if kept else None


def _json_safe(value: Any) -> Any:
    """Caller-given inputs as JSON: non-finite floats -> null, paths and dtypes -> str."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    text = str(value)  # torch.dtype, enums, ...
    return text.removeprefix("torch.")


def _fmt(x: float | None, digits: int = 3) -> str:
    """A figure for tables: 3 significant digits, 'n/a' for null."""
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 0)}e}"


def _fmt_cos(x: float | None) -> str:
    """A cosine with enough digits to show its distance from 1 (0.99999998 is not 1.000000)."""
    if x is None:
        return "n/a"
    gap = 1.0 - abs(x)
    # subtle: identical L and T give 1 - 2e-16 (the norms' square roots round); 12 decimals
    # would print that as 1.000000000000. Below what 12 decimals show, say 1.0.
    if gap < 5e-13:
        return f"{math.copysign(1.0, x):.1f}"
    decimals = min(12, max(4, math.ceil(-math.log10(gap)) + 1))
    return f"{x:.{decimals}f}"


def _fmt_pct(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x == 1:
        return "100%"
    return f"{min(100 * x, 99.9):.1f}%"  # never print 100% for "almost all"


def _dtype_label(inputs: dict[str, Any]) -> str:
    raw = inputs.get("finetuned_dtype")
    if raw is None:
        return "dtype"
    text = str(raw).removeprefix("torch.")
    return _DTYPE_SHORT.get(text, text)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


#: The headline flags explained tensors whose median ``||L|| / ||T||`` is further from 1.
_SCALE_TOLERANCE = 0.01


def _norm_ratio(tensors: list[TensorComparison]) -> float | None:
    """The median ``lora_norm / tv_norm`` over ``tensors`` (None if no tensor has both)."""
    ratios = sorted(
        t.lora_norm / t.tv_norm for t in tensors if t.lora_norm is not None and t.tv_norm
    )
    if not ratios:
        return None
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def _explained(t: TensorComparison) -> bool:
    if t.within_rounding == 1.0:
        return True
    return t.cosine is not None and t.cosine >= EXPLAINED_COSINE


@dataclass
class CompareReport:
    """The result of ``compare``: the caller's ``inputs`` and one row per tensor.

    ``summary`` and ``coverage`` are derived from ``tensors``; see the module docstring for
    the JSON schema. Renderings: :meth:`to_json`, :meth:`to_markdown`,
    :meth:`render_terminal`, :meth:`plot`; :meth:`headline` says in one line what it means.
    """

    inputs: dict[str, Any]
    tensors: list[TensorComparison] = field(default_factory=list)
    schema_version: ClassVar[int] = 1

    # -- derived figures -----------------------------------------------------------------

    def _covered(self) -> list[TensorComparison]:
        return [t for t in self.tensors if t.category == LORA_AND_CHANGED]

    @property
    def summary(self) -> dict[str, Any]:
        """Figures over tensors with a LoRA delta and a nonzero task vector; nulls left out."""
        covered = self._covered()
        return {
            "tensors": len(covered),
            "mean_cosine": _mean(t.cosine for t in covered),
            "min_cosine": _reduce(min, (t.cosine for t in covered)),
            "max_abs_diff": _reduce(max, (t.max_abs_diff for t in covered)),
            "mean_max_abs_diff": _mean(t.max_abs_diff for t in covered),
            "mean_mean_abs_diff": _mean(t.mean_abs_diff for t in covered),
            "mean_relative_error": _mean(t.relative_error for t in covered),
        }

    @property
    def coverage(self) -> dict[str, Any]:
        """Counts per category over every tensor; the categories partition ``total``."""
        counts = dict.fromkeys(CATEGORIES, 0)
        for t in self.tensors:
            counts[t.category] += 1
        changed = counts[LORA_AND_CHANGED] + counts[CHANGED_NOT_LORA] + counts[ROUNDING_ONLY]
        return {
            "total": len(self.tensors),
            "lora": counts[LORA_AND_CHANGED] + counts[LORA_UNCHANGED],
            "changed": changed,
            **counts,
            "lora_fraction_of_changed": counts[LORA_AND_CHANGED] / changed if changed else None,
        }

    def _within_fraction(self, tensors: list[TensorComparison]) -> float | None:
        """Fraction of elements within rounding, over tensors that have the figure."""
        rows = [(t.within_rounding, t.numel) for t in tensors if t.within_rounding is not None]
        total = sum(n for _, n in rows)
        if not rows or total == 0:
            return None
        return math.fsum(w * n for w, n in rows) / total

    def _mode(self) -> str:
        """What ``L`` is, from ``inputs`` as ``compare`` fills them: ``"adapter"`` (a LoRA
        adapter's delta), ``"task_vectors"`` (the first of two task vectors) or ``"none"``
        (base and finetuned only: no ``L``). Without these keys: ``"adapter"``."""
        if len(self.inputs.get("task_vectors") or ()) == 2:
            return "task_vectors"
        if "adapter" in self.inputs and self.inputs["adapter"] is None:
            return "none"
        return "adapter"

    def headline(self) -> str:
        """One line saying what the figures mean.

        e.g. ``LoRA explains the task vector on 120 of 483 changed tensors (mean cosine
        0.999998, all differences within bf16 rounding); 363 changed outside the adapter, all
        only by bf16 rounding``. A covered tensor is "explained" when its cosine is at least
        :data:`EXPLAINED_COSINE` or all its differences are within rounding. Two task vectors
        read "The first task vector explains the second ..."; without an adapter (base and
        finetuned only) the line says what changed, and nothing about an adapter.
        """
        cov, dtype = self.coverage, _dtype_label(self.inputs)
        mode = self._mode()
        covered = self._covered()
        parts: list[str] = []
        if not self.tensors:
            return "No tensors were compared"
        if mode == "none":
            return self._headline_without_l(cov, dtype)
        two = mode == "task_vectors"
        if cov["changed"] == 0:
            what = "The second task vector" if two else "The task vector"
            parts.append(f"{what} is zero: no tensor of {cov['total']} changed")
        elif cov["lora"] == 0:
            if two:
                parts.append(
                    f"The first task vector has none of the {cov['changed']} changed tensors "
                    "of the second"
                )
            else:
                parts.append(
                    f"The adapter has no delta for any of {cov['changed']} changed tensors"
                )
        elif covered:
            explained = [t for t in covered if _explained(t)]
            # The figures in this clause are over the explained tensors; the departures get
            # their own clause, and the summary table has the figures over all covered ones.
            details = [f"mean cosine {_fmt_cos(_mean(t.cosine for t in explained))}"]
            within = self._within_fraction(explained)
            if within == 1.0:
                details.append(f"all differences within {dtype} rounding")
            elif within is not None:
                details.append(f"{_fmt_pct(within)} of elements within {dtype} rounding")
            # subtle: a cosine is blind to scale; a LoRA merged with another alpha (or a task
            # vector applied at another --scale) would read as "explained". Tensors whose
            # differences are all rounding are explained whatever their norms say.
            ratio = _norm_ratio([t for t in explained if t.within_rounding != 1.0])
            if ratio is not None and abs(ratio - 1) > _SCALE_TOLERANCE:
                details.append(f"but ||L|| / ||T|| = {_fmt(ratio)}")
            subject = (
                "The first task vector explains the second"
                if two
                else ("LoRA explains the task vector")
            )
            parts.append(
                f"{subject} on {len(explained)} of {cov['changed']} changed tensors"
                + (f" ({', '.join(details)})" if explained else "")
            )
            departed = [t for t in covered if not _explained(t)]
            if departed:
                worst = min(departed, key=lambda t: -2.0 if t.cosine is None else t.cosine)
                verb = "departs" if len(departed) == 1 else "depart"
                noun = "tensor" if two else "LoRA tensor"
                parts.append(
                    f"{_count(len(departed), noun)} {verb} from it "
                    f"(worst cosine {_fmt_cos(worst.cosine)} at {worst.name})"
                )
        outside = cov[CHANGED_NOT_LORA] + cov[ROUNDING_ONLY]
        if two:
            if outside and cov["lora"]:
                parts.append(f"{outside} changed only in the second task vector")
            # Tensors both task vectors leave at zero are not news; ones only the second does are.
            dropped = [t for t in self.tensors if t.category == LORA_UNCHANGED and t.lora_norm]
            if dropped:
                verb = "is" if len(dropped) == 1 else "are"
                parts.append(
                    f"{_count(len(dropped), 'tensor')} changed in the first {verb} zero in "
                    "the second"
                )
            return "; ".join(parts)
        if outside and cov["lora"]:
            text = f"{outside} changed outside the adapter"
            if cov[ROUNDING_ONLY] == outside:
                text += f", all only by {dtype} rounding"
            elif cov[ROUNDING_ONLY]:
                text += f", of which {cov[ROUNDING_ONLY]} only by {dtype} rounding"
            parts.append(text)
        elif outside and cov[ROUNDING_ONLY]:
            parts.append(f"{cov[ROUNDING_ONLY]} of them only by {dtype} rounding")
        if cov[LORA_UNCHANGED]:
            n = cov[LORA_UNCHANGED]
            verb = "is" if n == 1 else "are"
            parts.append(f"{_count(n, 'tensor')} with a LoRA delta {verb} unchanged in the model")
        return "; ".join(parts)

    def _headline_without_l(self, cov: dict[str, Any], dtype: str) -> str:
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

    # -- JSON ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the report (schema in the module docstring)."""
        return {
            "schema_version": self.schema_version,
            "inputs": _json_safe(self.inputs),
            "summary": self.summary,
            "coverage": self.coverage,
            "tensors": [t.to_dict() for t in self.tensors],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON text; null for undefined figures, never NaN."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareReport:
        """Read back :meth:`to_dict`'s output; ``summary`` and ``coverage`` are recomputed."""
        version = data.get("schema_version")
        if version != cls.schema_version:
            raise InputError(
                f"unsupported compare report schema_version {version!r}",
                hint=f"this stream-tv reads schema_version {cls.schema_version}",
            )
        return cls(
            inputs=dict(data.get("inputs") or {}),
            tensors=[TensorComparison.from_dict(t) for t in data.get("tensors", [])],
        )

    @classmethod
    def from_json(cls, text: str) -> CompareReport:
        """Read back :meth:`to_json`'s output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"not a JSON compare report: {e}") from None
        if not isinstance(data, dict):
            raise InputError("not a JSON compare report: the top level is not an object")
        return cls.from_dict(data)

    # -- tables shared by Markdown and terminal --------------------------------------------

    def _outside(self, n: int) -> tuple[str, list[TensorComparison], int]:
        """Tensors changed outside ``L`` (not by rounding alone), largest ``||T||`` first:
        a title, the first ``n``, and how many more there are."""
        rows = [t for t in self.tensors if t.category == CHANGED_NOT_LORA]
        rows.sort(key=lambda t: (-(t.tv_norm or 0.0), t.name))
        title = {
            "adapter": "Changed outside the adapter",
            "task_vectors": "Changed only in the second task vector",
            "none": "Changed tensors",
        }[self._mode()]
        return title, rows[:n], max(len(rows) - n, 0)

    def _worst(self, n: int, key: str) -> list[TensorComparison]:
        """The n covered tensors with the lowest cosine / highest relative error."""
        rows = [t for t in self._covered() if getattr(t, key) is not None]
        if key == "cosine":
            rows.sort(key=lambda t: (t.cosine, t.name))
        else:
            rows.sort(key=lambda t: (-t.relative_error, t.name))
        return rows[:n]

    def _summary_rows(self) -> list[tuple[str, str]]:
        s = self.summary
        return [
            ("tensors (LoRA delta and task vector)", str(s["tensors"])),
            ("mean cosine", _fmt_cos(s["mean_cosine"])),
            ("min cosine", _fmt_cos(s["min_cosine"])),
            ("max abs diff", _fmt(s["max_abs_diff"])),
            ("mean max abs diff", _fmt(s["mean_max_abs_diff"])),
            ("mean mean abs diff", _fmt(s["mean_mean_abs_diff"])),
            ("mean relative error", _fmt(s["mean_relative_error"])),
            ("elements within rounding", _fmt_pct(self._within_fraction(self._covered()))),
        ]

    def _coverage_rows(self) -> list[tuple[str, str, str]]:
        cov = self.coverage
        total = cov["total"]
        meaning = {
            LORA_AND_CHANGED: "LoRA delta, tensor changed",
            LORA_UNCHANGED: "LoRA delta, tensor not changed",
            CHANGED_NOT_LORA: "changed, no LoRA delta",
            ROUNDING_ONLY: "changed only by dtype rounding",
            UNCHANGED: "no LoRA delta, not changed",
        }
        rows = [
            (f"{c} ({meaning[c]})", str(cov[c]), _fmt_pct(cov[c] / total) if total else "n/a")
            for c in CATEGORIES
        ]
        rows.append(("total", str(total), "100%" if total else "n/a"))
        return rows

    def _layer_rows(self) -> list[tuple[str, ...]]:
        """Per-layer aggregates, layers in order, non-layer tensors last as 'other'."""
        located = {t.name: layer_of(t.name) for t in self.tensors}
        kinds = _module_kinds(located)
        # subtle: encoder.block.3 and decoder.block.3 are different layers; name the stack
        # only when there is more than one.
        several = len({loc[0] for loc in located.values() if loc is not None}) > 1
        groups: dict[tuple[int, str, int], list[TensorComparison]] = {}
        for t in self.tensors:
            loc = located[t.name]
            key = (1, "", 0) if loc is None else (0, loc[0] if several else "", loc[1])
            groups.setdefault(key, []).append(t)
        rows = []
        for (is_other, prefix, index), members in sorted(groups.items()):
            label = "other" if is_other else (f"{prefix}.{index}" if prefix else str(index))
            covered = [m for m in members if m.category == LORA_AND_CHANGED]
            with_cos = [m for m in covered if m.cosine is not None]
            worst = min(with_cos, key=lambda m: m.cosine).name if with_cos else None
            kind = None
            if worst is not None:
                kind = kinds.get(worst, worst)
            rows.append(
                (
                    label,
                    str(len(members)),
                    str(sum(m.has_lora for m in members)),
                    str(sum(m.changed for m in members)),
                    _fmt_cos(_mean(m.cosine for m in covered)),
                    _fmt_cos(_reduce(min, (m.cosine for m in covered))),
                    _fmt(_reduce(max, (m.relative_error for m in covered))),
                    kind or "",
                )
            )
        return rows

    # -- Markdown ------------------------------------------------------------------------

    def to_markdown(self, *, worst: int = 10) -> str:
        """A Markdown report: headline, inputs, summary, coverage, worst tensors, per layer."""

        def table(
            header: tuple[str, ...], rows: Iterable[tuple[str, ...]], align: str = ""
        ) -> list[str]:
            """A Markdown table; ``align`` has one l/r per column (default: text, then figures)."""
            align = align or "l" + "r" * (len(header) - 1)
            marks = ["---:" if a == "r" else "---" for a in align]
            lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
            return lines + [""]

        title = (
            "# Task vector vs task vector"
            if self._mode() == "task_vectors"
            else "# LoRA delta vs task vector"
        )
        out = [title, "", f"**{self.headline()}**", ""]
        inputs = _json_safe(self.inputs)
        if inputs:
            out += ["## Inputs", ""]
            out += table(("input", "value"), ((k, f"`{v}`") for k, v in inputs.items()), "ll")
        out += ["## Summary", ""]
        out += [
            "Over tensors that have both a LoRA delta and a nonzero task vector; "
            "`L` is the LoRA delta, `T` the task vector.",
            "",
        ]
        out += table(("figure", "value"), self._summary_rows())
        out += ["## Coverage", ""]
        out += table(("category", "tensors", "share"), self._coverage_rows())
        cov = self.coverage
        out += [
            f"LoRA covers {_fmt_pct(cov['lora_fraction_of_changed'])} of the "
            f"{cov['changed']} changed tensors.",
            "",
        ]
        for title, key in (("lowest cosine", "cosine"), ("highest relative error", "rel")):
            rows = self._worst(worst, "cosine" if key == "cosine" else "relative_error")
            out += [f"## Worst tensors by {title}", ""]
            if not rows:
                out += ["No tensor has both a LoRA delta and a task vector.", ""]
                continue
            out += table(
                ("tensor", "cosine", "relative error", "max abs diff", "rounding bound", "within"),
                (
                    (
                        f"`{t.name}`",
                        _fmt_cos(t.cosine),
                        _fmt(t.relative_error),
                        _fmt(t.max_abs_diff),
                        _fmt(t.rounding_bound),
                        _fmt_pct(t.within_rounding),
                    )
                    for t in rows
                ),
            )
        title, rows_o, more = self._outside(worst)
        if rows_o:
            out += [
                f"## {title}",
                "",
                "Not by dtype rounding alone; largest task vector first.",
                "",
            ]
            out += table(
                ("tensor", "task vector norm"), ((f"`{t.name}`", _fmt(t.tv_norm)) for t in rows_o)
            )
            if more:
                out += [f"... and {more} more (all are in the JSON report).", ""]
        out += ["## Per layer", ""]
        out += [
            "Cosine and relative error over the layer's tensors with a LoRA delta and a task "
            "vector; *worst module* has the lowest cosine.",
            "",
        ]
        out += table(
            (
                "layer",
                "tensors",
                "LoRA",
                "changed",
                "mean cosine",
                "min cosine",
                "max rel. error",
                "worst module",
            ),
            self._layer_rows(),
            "lrrrrrrl",
        )
        return "\n".join(out).rstrip() + "\n"

    # -- terminal ------------------------------------------------------------------------

    def render_terminal(self, *, worst: int = 5) -> str:
        """A short plain-text summary that fits 100 columns."""
        out = textwrap.wrap(self.headline(), _WIDTH)
        if self._mode() != "none":  # without L every summary figure would be n/a
            rows = self._summary_rows()
            half = (len(rows) + 1) // 2
            out += ["", "Summary"]
            right_rows = rows[half:] + [("", "")] * (2 * half - len(rows))
            for left, right in zip(rows[:half], right_rows, strict=True):
                cell = f"  {left[0]:<38}{left[1]:>12}"
                if right[0]:
                    cell += f"    {right[0]:<28}{right[1]:>14}"
                out.append(cell.rstrip())
        out += ["", f"  {'Coverage':<54}{'tensors':>10}{'share':>9}"]
        out += [f"  {a:<54}{b:>10}{c:>9}" for a, b, c in self._coverage_rows()]
        for title, key in (
            ("lowest cosine", "cosine"),
            ("highest relative error", "relative_error"),
        ):
            rows_t = self._worst(worst, key)
            if not rows_t:
                continue
            out += ["", f"Worst {len(rows_t)} by {title}"]
            head = f"  {'cosine':>14} {'rel.err':>9} {'max|L-T|':>9} {'within':>7}  "
            out.append(head + "tensor")
            room = _WIDTH - len(head)
            for t in rows_t:
                name = t.name if len(t.name) <= room else "..." + t.name[-(room - 3) :]
                out.append(
                    f"  {_fmt_cos(t.cosine):>14} {_fmt(t.relative_error):>9} "
                    f"{_fmt(t.max_abs_diff):>9} {_fmt_pct(t.within_rounding):>7}  {name}"
                )
        title, rows_o, more = self._outside(worst)
        if rows_o:
            out += ["", f"{title}, largest task vector first", f"  {'||T||':>14}  tensor"]
            room = _WIDTH - 18
            for t in rows_o:
                name = t.name if len(t.name) <= room else "..." + t.name[-(room - 3) :]
                out.append(f"  {_fmt(t.tv_norm):>14}  {name}")
            if more:
                out.append(f"  ... and {more} more")
        return "\n".join(out)

    # -- plot ----------------------------------------------------------------------------

    def plot(self, path: str | Path) -> None:
        """Per-layer cosine and relative error by module kind, as a PNG (or any format
        matplotlib infers from ``path``). Needs matplotlib (``pip install 'stream-tv[plot]'``).
        """
        try:
            import matplotlib
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
            from matplotlib.ticker import FuncFormatter, LogLocator
        except ImportError:
            raise InputError("plotting needs matplotlib: pip install 'stream-tv[plot]'") from None

        series: dict[str, dict[int, tuple[float, float | None]]] = {}
        prefixes = {loc[0] for t in self.tensors if (loc := layer_of(t.name)) is not None}
        kinds = _module_kinds(t.name for t in self.tensors)
        for t in self._covered():
            loc = layer_of(t.name)
            if loc is None or t.cosine is None:
                continue
            kind = kinds[t.name]
            label = f"{loc[0]} {kind}" if len(prefixes) > 1 else kind
            series.setdefault(label, {})[loc[1]] = (t.cosine, t.relative_error)

        # subtle: cosines of a good adapter sit at 0.99999x, a bad one at 0.5; on a linear
        # axis one of the two is invisible. Plot the distance 1 - cos on a log axis.
        floor = 1e-16
        # subtle: no pyplot. A bare Figure on an Agg canvas leaves the caller's backend and
        # pyplot state (a notebook, a GUI) untouched, and needs no display.
        fig = Figure(figsize=(11, 7.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax_cos, ax_rel = fig.subplots(2, 1, sharex=True)
        cmap = matplotlib.colormaps["tab10" if len(series) <= 10 else "tab20"]
        for i, (label, points) in enumerate(sorted(series.items())):
            layers = sorted(points)
            style = {"color": cmap(i % cmap.N), "marker": "o", "markersize": 3, "lw": 1.2}
            ax_cos.plot(layers, [max(1 - points[k][0], floor) for k in layers], **style)
            rel = [points[k][1] for k in layers]
            ax_rel.plot(
                layers,
                [math.nan if r is None else max(r, floor) for r in rel],
                label=label,
                **style,
            )
        for ax in (ax_cos, ax_rel):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
            ax.grid(True, which="major", alpha=0.35)
        ax_cos.axhline(1 - EXPLAINED_COSINE, color="0.4", ls="--", lw=0.9)
        ax_cos.text(
            0.005,
            1 - EXPLAINED_COSINE,
            f" cos = {EXPLAINED_COSINE}",
            transform=ax_cos.get_yaxis_transform(),
            va="bottom",
            fontsize=8,
            color="0.3",
        )
        ax_cos.yaxis.set_major_formatter(FuncFormatter(lambda y, _: _cos_tick(y)))
        ax_cos.invert_yaxis()  # better agreement is higher, as with a plain cosine axis
        ax_cos.set_ylabel("cosine(L, T)  [log scale of 1 - cos]")
        what = "the first task vector L" if self._mode() == "task_vectors" else "LoRA delta L"
        ax_cos.set_title(f"Cosine of {what} and task vector T (higher is better)", fontsize=10)
        ax_rel.set_ylabel("relative error ||L - T|| / ||T||")
        ax_rel.set_title("Relative error (lower is better)", fontsize=10)
        ax_rel.set_xlabel("layer")
        ax_rel.xaxis.get_major_locator().set_params(integer=True)
        if series:
            # "outside" placement makes constrained_layout leave room: nothing is clipped.
            fig.legend(title="module", fontsize=8, title_fontsize=8, loc="outside right upper")
        else:
            ax_cos.text(
                0.5,
                0.5,
                "no tensor with a LoRA delta and a task vector",
                transform=ax_cos.transAxes,
                ha="center",
            )
        s, cov = self.summary, self.coverage
        fig.suptitle(
            f"LoRA vs task vector: {s['tensors']} of {cov['changed']} changed tensors covered, "
            f"mean cos {_fmt_cos(s['mean_cosine'])}, min cos {_fmt_cos(s['min_cosine'])}, "
            f"mean rel. error {_fmt(s['mean_relative_error'])}",
            fontsize=11,
        )
        fig.savefig(path, dpi=120)


def _cos_tick(gap: float) -> str:
    """The cosine at distance ``gap`` from 1, as a tick label: 0.9999, or 1 - 1e-09."""
    if gap <= 0 or not math.isfinite(gap):
        return "1"
    if gap < 1e-6:
        return f"1 - {gap:.0e}"
    return f"{1 - gap:.{max(1, math.ceil(-math.log10(gap)))}f}"
