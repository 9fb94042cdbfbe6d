"""The compare report's data model: inputs, mode, one row per tensor, derived figures, JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from stream_tv.errors import InputError
from stream_tv.jsonutil import json_safe
from stream_tv.stats import (
    CATEGORIES,
    CHANGED_NOT_LORA,
    LORA_AND_CHANGED,
    LORA_UNCHANGED,
    ROUNDING_ONLY,
    TensorComparison,
)

from . import plot as plotting
from . import text
from .figures import VERDICTS, bit_exact_fraction, mean, reduce, ulp_totals, verdict
from .wording import MODES

__all__ = ["CompareReport"]


@dataclass
class CompareReport:
    """The result of ``compare``: the caller's ``inputs``, the ``mode`` and one row per tensor.

    ``mode`` says what ``L`` is (see :data:`stream_tv.report.wording.MODES`): ``"adapter"``
    (a LoRA adapter's delta; the default), ``"task_vectors"`` (the first of two task
    vectors) or ``"none"`` (base and finetuned only). ``compare`` sets it; nothing guesses it.
    ``summary`` and ``coverage`` are derived from ``tensors``; see :mod:`stream_tv.report` for
    the JSON schema. Renderings: :meth:`to_json`, :meth:`to_markdown`,
    :meth:`render_terminal`, :meth:`plot`; :meth:`headline` says in one line what it means.
    """

    inputs: dict[str, Any]
    tensors: list[TensorComparison] = field(default_factory=list)
    mode: str = "adapter"
    schema_version: ClassVar[int] = 2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(
                f"unknown compare mode {self.mode!r}", hint=f"expected one of {', '.join(MODES)}"
            )

    # -- derived figures -----------------------------------------------------------------

    def covered(self) -> list[TensorComparison]:
        """The tensors with a LoRA delta and a nonzero task vector (``lora_and_changed``)."""
        return [t for t in self.tensors if t.category == LORA_AND_CHANGED]

    def with_lora(self) -> list[TensorComparison]:
        """The tensors with a LoRA delta (``lora_and_changed`` and ``lora_unchanged``)."""
        return [t for t in self.tensors if t.has_lora]

    @property
    def summary(self) -> dict[str, Any]:
        """Figures over the report (see :mod:`stream_tv.report` for what each is over)."""
        covered, lora = self.covered(), self.with_lora()
        verdicts = dict.fromkeys((*VERDICTS, "not_measured"), 0)
        for t in lora:
            verdicts[verdict(t) or "not_measured"] += 1
        ulps = ulp_totals(lora)
        return {
            "tensors": len(covered),
            "mean_cosine": mean(t.cosine for t in covered),
            "min_cosine": reduce(min, (t.cosine for t in covered)),
            "max_abs_diff": reduce(max, (t.max_abs_diff for t in covered)),
            "mean_max_abs_diff": mean(t.max_abs_diff for t in covered),
            "mean_mean_abs_diff": mean(t.mean_abs_diff for t in covered),
            "mean_relative_error": mean(t.relative_error for t in covered),
            "lora_tensors": len(lora),
            "verdicts": verdicts,
            "bit_exact_merge": bit_exact_fraction(lora),
            "ulp_counts": None if ulps is None else ulps[0],
            "ulp_max": None if ulps is None else ulps[1],
            "nonfinite_elements": sum(t.nonfinite for t in self.tensors),
            "nonfinite_tensors": sum(t.nonfinite > 0 for t in self.tensors),
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

    # -- renderings (stream_tv.report.text and .plot) ------------------------------------

    def headline(self) -> str:
        """One line saying what the figures mean (see :func:`stream_tv.report.text.headline`)."""
        return text.headline(self)

    def to_markdown(self, *, worst: int = 10) -> str:
        """A Markdown report: headline, inputs, summary, coverage, worst tensors, per layer."""
        return text.markdown(self, worst=worst)

    def render_terminal(self, *, worst: int = 5) -> str:
        """A short plain-text summary that fits 100 columns."""
        return text.terminal(self, worst=worst)

    def plot(self, path: str | Path) -> None:
        """Per-layer agreement of L and T by module kind, and the tensors changed outside L,
        as a PNG (or any format matplotlib infers from ``path``). Needs matplotlib
        (``pip install 'stream-tv[plot]'``)."""
        plotting.plot(self, path)

    # -- JSON ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the report (schema in :mod:`stream_tv.report`)."""
        return {
            "schema_version": self.schema_version,
            "mode": self.mode,
            "inputs": json_safe(self.inputs),
            "summary": self.summary,
            "coverage": self.coverage,
            "tensors": [{**t.to_dict(), "verdict": verdict(t)} for t in self.tensors],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON text; null for undefined figures, never NaN."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareReport:
        """Read back :meth:`to_dict`'s output; ``summary``, ``coverage`` and each tensor's
        ``verdict`` are derived, so they are recomputed, not read."""
        version = data.get("schema_version")
        if version != cls.schema_version:
            hint = f"this stream-tv reads schema_version {cls.schema_version}"
            if isinstance(version, int) and version < cls.schema_version:
                hint += "; rerun stream-tv compare to write the report again"
            raise InputError(f"unsupported compare report schema_version {version!r}", hint=hint)
        if "mode" not in data:
            raise InputError(
                "the compare report has no mode", hint=f"expected one of {', '.join(MODES)}"
            )
        return cls(
            inputs=dict(data.get("inputs") or {}),
            tensors=[TensorComparison.from_dict(t) for t in data.get("tensors", [])],
            mode=data["mode"],
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
