"""The compare report: one object, four renderings (JSON, Markdown, terminal, plot).

The package: :mod:`.model` (the data model, derived figures, JSON), :mod:`.text` (headline,
Markdown, terminal), :mod:`.plot`, :mod:`.wording` (the phrases of each comparison mode),
:mod:`.figures`, :mod:`.fmt` and :mod:`.layers` (helpers).

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

Schema 1 does not store the report's ``mode`` (what ``L`` is); :meth:`CompareReport.from_dict`
reads it from ``inputs`` as ``compare`` fills them (two ``task_vectors``: ``"task_vectors"``;
``"adapter": null``: ``"none"``; else ``"adapter"``).

>>> from stream_tv.stats import TensorComparison
>>> t = TensorComparison("model.layers.0.mlp.up_proj.weight", "lora_and_changed", 4,
...                      0.5, 1.0, 0.5, 0.9, 1.0, 2.0, 0.25, 0.75)
>>> report = CompareReport(inputs={"base": "b"}, tensors=[t])
>>> report.summary["mean_cosine"], report.coverage["lora_fraction_of_changed"]
(0.5, 1.0)
"""

from __future__ import annotations

from .figures import EXPLAINED_COSINE
from .fmt import fmt_cosine as _fmt_cos  # noqa: F401  (kept for callers of the old module)
from .layers import layer_of
from .model import CompareReport

__all__ = ["CompareReport", "EXPLAINED_COSINE", "layer_of"]
