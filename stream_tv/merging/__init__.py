"""Model merging beyond task arithmetic: TIES, DARE, breadcrumbs, DELLA, per row chunk.

Pure maths, no I/O, any device. For one output tensor a :class:`TensorMerger` is fed the
rows ``[start, stop)`` of every input's task vector ``tau_i`` (and of the base), pass after
pass, and returns the merged rows on its last pass. The result depends neither on the chunk
size nor on the device, and a rerun gives the same bytes.

The methods are mergekit 0.1.5's generalized task arithmetic (``merge_group`` in its
``generalized_task_arithmetic.py``; formulas in ``benchmarks/merge_methods/NOTES.md``)::

    d_i   = sparsify(tau_i)                 magnitude top-k, random (DARE), outliers, DELLA
    d_i  *= rescale_i                       l1: ||tau_i||_1 / ||d_i||_1 (mergekit's default)
    wd_i  = w_i * d_i
    ties-like:  s = sign(sum_i wd_i) (0 counts as +);  keep wd_i whose sign is s
                m = sum_i kept wd_i;  div = sum_i kept w_i (0 -> 1)
    linear:     m = sum_i wd_i;       div = sum_i w_i (|div| < 1e-8 -> 1)
    out   = round(base + lambda * (m / div if normalize else m))

Every step is computed in float64 and rounded once to the output dtype (mergekit computes in
its ``dtype:``, e.g. bfloat16, and rounds after each operation). What differs on purpose:

- magnitude ties are broken by element index (the lowest flat index ranks higher); mergekit's
  ``argsort`` is not stable, so which of several equal magnitudes it keeps is arbitrary;
- random masks come from a counter-based hash of (seed, tensor name, input, element index),
  not from torch's global generator: the same bits for any chunking, device or rerun;
- l1 norms for the rescale are summed exactly (integer accumulators), not in float32.

``# subtle:`` mergekit 0.1.5 rescales DARE's kept elements to the l1 norm of the whole task
vector (``rescale="l1"``), not by ``1 / density`` as the DARE paper (``rescale="density"``).
``# subtle:`` the TIES election compares ``sum_i wd_i >= 0``; where float32 rounds that sum
to exactly 0 mergekit elects +, and float64 may keep a tiny negative sum: another disjoint
mean at that element (measured: 2 of 6,600 elements in one fp16 test).

The parts: :mod:`.spec` (methods, parameters), :mod:`.select` (exact streamed top-k),
:mod:`.bits` (counter-based random masks), :mod:`.sums` (exact l1 norms), :mod:`.merger`
(:class:`TensorMerger`, the passes of one tensor). ``stream-tv apply --method`` streams them
(``stream_tv/commands/apply_merge.py``).

>>> import torch
>>> spec = merge_spec("ties", 2, weights=[1.0, 1.0], density=0.5)
>>> base = torch.zeros(4)
>>> taus = [torch.tensor([0.4, -0.1, 0.2, -0.3]), torch.tensor([0.2, 0.3, -0.1, 0.1])]
>>> merge_tensor(spec, "w", base, taus).tolist()   # top-2 of each, then disjoint mean
[0.30000001192092896, 0.30000001192092896, 0.0, -0.30000001192092896]
"""

from .bits import keep_threshold, random_bits, stream_key
from .merger import MERGE, NORMS, SELECT, TensorMerger, merge_tensor
from .select import RadixSelect, Threshold, TopSet, magnitude_key, select_passes, top_k_mask
from .spec import (
    DELLA,
    MAGNITUDE,
    METHODS,
    OUTLIERS,
    RANDOM,
    RESCALES,
    MergeSpec,
    Method,
    merge_spec,
)
from .sums import ExactAbsSum

__all__ = [
    "DELLA",
    "MAGNITUDE",
    "MERGE",
    "METHODS",
    "NORMS",
    "OUTLIERS",
    "RANDOM",
    "RESCALES",
    "SELECT",
    "ExactAbsSum",
    "MergeSpec",
    "Method",
    "RadixSelect",
    "TensorMerger",
    "Threshold",
    "TopSet",
    "keep_threshold",
    "magnitude_key",
    "merge_spec",
    "merge_tensor",
    "random_bits",
    "select_passes",
    "stream_key",
    "top_k_mask",
]
