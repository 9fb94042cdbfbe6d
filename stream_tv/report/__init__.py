"""The compare report: one object, four renderings (JSON, Markdown, terminal, plot).

The package: :mod:`.model` (the data model, derived figures, JSON), :mod:`.text` (headline,
Markdown, terminal), :mod:`.headline`, :mod:`.plot`, :mod:`.wording` (the phrases of each
comparison mode), :mod:`.figures` (derived figures, the verdicts), :mod:`.fmt` and
:mod:`.layers` (helpers).

JSON schema, ``schema_version`` 2 (stable: fields are only ever added, under a new version;
version 1 lacked ``mode``, the verdicts and the ulp figures, and had ``within_rounding``)::

    {"schema_version": 2,
     "mode":     str,          # what L is: "adapter" (a LoRA adapter's delta), "task_vectors"
                               # (the first of two task vectors), "none" (no L)
     "inputs":   {...},        # as given by the caller: references, dtypes, adapter r/alpha/
                               # scaling. Optional keys "finetuned_dtype", "base_dtype" (e.g.
                               # "bfloat16") name the rounding in the headline.
     "summary":  {...},        # nulls are left out of every mean / min / max, and a figure
                               # with no values is null
       "tensors":             N  # tensors with L and a nonzero T (lora_and_changed); the
       "mean_cosine":         x  #   six figures below are over these
       "min_cosine":          x  # the worst cosine
       "max_abs_diff":        x  # max over tensors of max |L - T|
       "mean_max_abs_diff":   x  # mean over tensors of max |L - T|
       "mean_mean_abs_diff":  x  # mean over tensors of mean |L - T|
       "mean_relative_error": x  # mean over tensors of ||L - T|| / ||T||
       "lora_tensors":        N  # tensors with L (lora_and_changed + lora_unchanged); the
       "verdicts":   {"reproduced": N, "explained_by_rounding": N, "departs": N,
                      "undecided": N, "not_measured": N}   # ... verdicts are over these
       "bit_exact_merge":     x  # element-weighted over those that have it
       "ulp_counts":  [N, N, N]  # summed over those that have them (0, 1, 2+ ulps)
       "ulp_max":             N  # the largest (null if one is unbounded or none measured)
       "nonfinite_elements":  N  # over every tensor: elements where T or L is NaN / inf
       "nonfinite_tensors":   N  # tensors with at least one
     "coverage": {...},        # over every tensor name; the five categories partition them
       "total":        N         # tensors compared
       "lora":         N         # with a LoRA delta (lora_and_changed + lora_unchanged)
       "changed":      N         # T has a nonzero element (lora_and_changed +
                                 #   changed_not_lora + rounding_only)
       "lora_and_changed", "lora_unchanged", "changed_not_lora", "rounding_only",
       "unchanged":    N         # see stream_tv.stats.TensorAccumulator for the definitions
       "lora_fraction_of_changed": x  # lora_and_changed / changed (null if nothing changed)
     "tensors":  [{            # one per tensor, in the caller's order
       "name":            str  # the base checkpoint's tensor name
       "category":        str  # one of the five coverage categories
       "numel":           N    # elements
       "finetuned_dtype": str  # F's dtype, the unit of the ulp figures (null without F)
       "cosine":          x    # <L,T> / (||L|| ||T||), in [-1, 1]; null if a norm is 0
       "max_abs_diff":    x    # max |L - T|
       "mean_abs_diff":   x    # mean |L - T|
       "relative_error":  x    # ||L - T|| / ||T||; null if T is zero
       "lora_norm":       x    # ||L|| (Frobenius)
       "tv_norm":         x    # ||T||; also given for tensors without L
       "rounding_bound":  x    # max over elements of half an ulp of F in its dtype
       "rounding_floor":  x    # ||round(W + L) - (W + L)|| / ||T||: the relative error of a
                               #   perfect merge, rounded once to F's dtype
       "bit_exact_merge": x    # fraction of elements of F equal, bit for bit, to what
                               #   stream-tv merge writes, cast to F's dtype
       "ulp_counts": [N, N, N] # elements of F 0, 1, 2+ ulps from the correctly rounded
                               #   W + L (W alone for tensors without L); they add to numel
       "ulp_max":         N    # the largest distance; null if unbounded (NaN vs a number)
       "nonfinite":       N    # elements where T or L is NaN or infinite
       "verdict":         str  # derived (see stream_tv.report.figures.verdict):
                               #   "reproduced", "explained_by_rounding", "departs",
                               #   "undecided", or null (no L, or not measured)
     }, ...]}

``L`` is the LoRA delta ``scaling * B @ A``, ``T`` the task vector ``finetuned - base``, both
in float64; ``F`` the fine-tuned tensor, ``W`` the base. The ulp distance is
:func:`stream_tv.floats.ulp_distance`. Fields that need ``L`` are null for tensors without a
LoRA delta; fields that need ``F`` or ``W`` are null where they were not given; no value is
ever NaN or infinite (those become null). Library code here never prints.

>>> from stream_tv.stats import TensorComparison
>>> t = TensorComparison("model.layers.0.mlp.up_proj.weight", "lora_and_changed", 4,
...                      0.5, 1.0, 0.5, 0.9, 1.0, 2.0, 0.25, bit_exact_merge=1.0)
>>> report = CompareReport(inputs={"base": "b"}, tensors=[t])
>>> report.summary["verdicts"]["reproduced"], report.coverage["lora_fraction_of_changed"]
(1, 1.0)
>>> CompareReport.from_json(report.to_json()) == report
True
"""

from __future__ import annotations

from .figures import EXPLAINED_COSINE
from .fmt import fmt_cosine as _fmt_cos  # noqa: F401  (kept for callers of the old module)
from .layers import layer_of
from .model import CompareReport

__all__ = ["CompareReport", "EXPLAINED_COSINE", "layer_of"]
