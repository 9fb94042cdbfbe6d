"""Streaming per-tensor statistics: a LoRA delta ``L`` against a task vector ``T``, and the
fine-tuned tensor ``F`` against base + LoRA in units of its dtype's rounding.

The engine reads one tensor in row chunks and feeds each chunk to a
:class:`TensorAccumulator`; two accumulators fed disjoint chunks of the same tensor can be
merged. :meth:`TensorAccumulator.result` gives a frozen :class:`TensorComparison`, one row of
the compare report (see ``stream_tv.report`` for the JSON schema).

Every sum is accumulated in float64 (scaled, so that nothing under- or overflows) and every
count is exact, so the figures do not depend on the chunking beyond float64 rounding.
On CPU, :mod:`~stream_tv.stats.cpu` computes them with fewer passes than the device path,
and :mod:`~stream_tv.stats.fused` (with numba) in one compiled pass per block: the same
counts and maxima, sums to float64 rounding. Nothing here reads files or prints.

>>> import torch
>>> acc = TensorAccumulator("w", numel=4, has_lora=True,
...                         finetuned_dtype=torch.float32, base_dtype=torch.float32)
>>> t = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
>>> acc.update(tv=t[:1], lora=t[:1])          # rows arrive in chunks ...
>>> acc.update(tv=t[1:], lora=2 * t[1:])
>>> r = acc.result()
>>> r.category, round(r.cosine, 6), r.max_abs_diff, r.tv_norm == 30 ** 0.5
('lora_and_changed', 0.979958, 4.0, True)

With the base ``W`` and ``F`` (here bf16, one element a hair off), the ulp figures:

>>> w = torch.tensor([1.0, 2.0, 3.0, 4.0])
>>> lo = torch.full((4,), 0.25, dtype=torch.float64)
>>> f = (w + 0.25).to(torch.bfloat16)
>>> f[3] = 4.28125  # one bf16 ulp above 4.25
>>> acc = TensorAccumulator("w", numel=4, has_lora=True,
...                         finetuned_dtype=torch.bfloat16, base_dtype=torch.float32)
>>> acc.update(tv=f.double() - w.double(), lora=lo, finetuned=f, base=w)
>>> r = acc.result()
>>> r.ulp_counts, r.ulp_max, r.bit_exact_merge
((3, 1, 0), 1, None)
"""

from stream_tv.floats import half_ulp

from .accumulator import STATS_BLOCK, TensorAccumulator
from .record import (
    CATEGORIES,
    CHANGED_NOT_LORA,
    LORA_AND_CHANGED,
    LORA_UNCHANGED,
    ROUNDING_ONLY,
    UNCHANGED,
    TensorComparison,
)

__all__ = [
    "CATEGORIES",
    "CHANGED_NOT_LORA",
    "LORA_AND_CHANGED",
    "LORA_UNCHANGED",
    "ROUNDING_ONLY",
    "STATS_BLOCK",
    "UNCHANGED",
    "TensorAccumulator",
    "TensorComparison",
    "half_ulp",
]
