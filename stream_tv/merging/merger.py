"""One tensor's merge, pass by pass: :class:`TensorMerger` (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..ops import CPU_BLOCK, round_to
from .bits import keep_threshold, random_bits, stream_key
from .select import MAG_BITS, RadixSelect, TopSet, magnitude_key
from .spec import DELLA, MAGNITUDE, OUTLIERS, RANDOM, MergeSpec
from .sums import ExactAbsSum

SELECT, NORMS, MERGE = "select", "norms", "merge"
_RESCALE_EPS = 1e-7  # mergekit: no rescale when either l1 norm is below this
_DIVISOR_EPS = 1e-8  # mergekit: a linear merge's weight sum below this in magnitude is 1


@dataclass
class _Input:
    """What the merger knows about one input of one tensor."""

    index: int
    dtype: torch.dtype | None  # None: absent from this input (a zero task vector)
    weight: float
    density: float
    gamma: float
    epsilon: float
    select: RadixSelect | None = None
    cuts: list[int] = field(default_factory=list)  # magnitude: [k]; outliers: [lo, hi]
    tops: list[TopSet] = field(default_factory=list)  # the top-cut sets, once selected
    key: tuple[int, int, int] | None = None  # random stream
    before: ExactAbsSum | None = None
    after: ExactAbsSum | None = None
    factor: float = 1.0
    sparse: bool = False  # not the identity


class TensorMerger:
    """The merge of one tensor, fed its row chunks pass by pass (see the module docstring).

    ``tau_dtypes[i]`` is input ``i``'s task-vector dtype for this tensor, or ``None`` where
    the input lacks it (a zero task vector, e.g. a module a LoRA adapter does not touch).
    Rows are dim 0 (a 1-D tensor's rows are its elements). For every ``pass_index`` in
    ``range(passes)``, feed the rows in order, ``0`` to ``rows``, in chunks of any size of at
    least :attr:`min_rows`; :meth:`feed` returns the output rows (``out_dtype``) on the last
    pass and ``None`` before. :attr:`pass_kinds` tells what each pass does: ``select``
    (magnitude histograms), ``norms`` (l1 norms for the rescale), ``merge``.

    >>> from stream_tv.merging import merge_spec
    >>> spec = merge_spec("ties", 1, density=0.5)
    >>> m = TensorMerger(spec, "w", (2, 2), [torch.float32], torch.float32)
    >>> m.pass_kinds
    ('select', 'select', 'merge')
    >>> tau, base = torch.tensor([[1.0, -3.0], [2.0, 0.5]]), torch.zeros(2, 2)
    >>> for p in range(m.passes):
    ...     a = m.feed(p, 0, 1, [tau[:1]], base[:1]); b = m.feed(p, 1, 2, [tau[1:]], base[1:])
    >>> torch.cat([a, b]).tolist()
    [[0.0, -3.0], [2.0, 0.0]]
    """

    def __init__(
        self,
        spec: MergeSpec,
        name: str,
        shape: Sequence[int],
        tau_dtypes: Sequence[torch.dtype | None],
        out_dtype: torch.dtype,
    ):
        if len(tau_dtypes) != spec.inputs:
            raise InputError(
                f"{len(tau_dtypes)} task vectors for a merge of {spec.inputs} inputs",
                where=name,
                hint="give one dtype (or None) per input",
            )
        for dt in (*tau_dtypes, out_dtype):
            if dt is not None and (not dt.is_floating_point or dt.itemsize not in MAG_BITS):
                raise InputError(
                    f"cannot merge {dt} tensors", where=name, hint="merge float tensors only"
                )
        self.spec = spec
        self.name = name
        self.shape = tuple(shape)
        self.out_dtype = out_dtype
        self.rows = self.shape[0] if len(self.shape) >= 1 else 1
        self.row_numel = math.prod(self.shape[1:]) if len(self.shape) >= 2 else 1
        self.numel = math.prod(self.shape)
        sp = spec.method.sparsification
        self._inputs = [
            _Input(i, dt, spec.weights[i], spec.densities[i], spec.gammas[i], spec.epsilons[i])
            for i, dt in enumerate(tau_dtypes)
        ]
        n = self.numel
        for x in self._inputs:
            if x.dtype is None or sp is None or x.density >= 1 or n == 0:
                continue  # mergekit: density 1 is the identity, no rescale either
            x.sparse = True
            if sp == MAGNITUDE:
                targets = [max(1, int(x.density * n))]
            elif sp == OUTLIERS:
                kept = int(x.density * n)
                n_top = int(x.gamma * n)
                n_bot = max(0, n - kept - n_top)
                targets = [n - n_bot - kept, n - n_bot]  # keep ranks [lo, hi) of the top
            else:
                x.key = stream_key(spec.seed, name, x.index)
                targets = []
            live = sorted({m for m in targets if 0 < m < n})  # 0 and n need no selection
            if live:
                x.select = RadixSelect(x.dtype, n, live)
            x.cuts = targets
            if spec.rescale == "l1":
                x.before, x.after = ExactAbsSum(), ExactAbsSum()
        selects = max((x.select.passes for x in self._inputs if x.select), default=0)
        norms = any(x.before is not None for x in self._inputs)
        self.pass_kinds: tuple[str, ...] = (SELECT,) * selects + (NORMS,) * norms + (MERGE,)
        self._pass = 0
        self._cursor = 0
        self._done = False

    # ---- planning ------------------------------------------------------------------------

    @property
    def passes(self) -> int:
        return len(self.pass_kinds)

    def needs_base(self, pass_index: int) -> bool:
        """Whether pass ``pass_index`` reads the base (only the merge pass does)."""
        return self.pass_kinds[pass_index] == MERGE

    @property
    def min_rows(self) -> int:
        """Fewest rows per chunk: DELLA ranks a 1-D tensor as one row, so it needs it whole."""
        if self.spec.method.sparsification == DELLA and len(self.shape) <= 1:
            return max(self.rows, 1)
        return 1

    def work_bytes_per_row(self) -> int:
        """About how many bytes of temporaries a chunk row costs (for chunk sizing); on CPU
        the work goes through L2-sized blocks, so this bounds GPU chunks mostly."""
        return self.row_numel * 8 * (len(self._inputs) + 6)

    # ---- streaming -----------------------------------------------------------------------

    def feed(
        self,
        pass_index: int,
        start: int,
        stop: int,
        taus: Sequence[torch.Tensor | None],
        base: torch.Tensor | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Take rows ``[start, stop)`` of every task vector (and of the base on the merge
        pass); return the merged rows on the last pass (in ``out`` if given)."""
        if self._done or pass_index != self._pass or start != self._cursor or stop < start:
            raise RuntimeError(
                f"{self.name}: chunk (pass {pass_index}, rows {start}:{stop}) out of order; "
                f"expected pass {self._pass} from row {self._cursor}: feed each pass's rows "
                "in order, all passes in order"
            )
        if stop > self.rows or (stop - start < self.min_rows and stop != self.rows):
            raise RuntimeError(
                f"{self.name}: rows {start}:{stop} of {self.rows} (at least {self.min_rows} per "
                "chunk)"
            )
        if len(taus) != len(self._inputs):
            raise RuntimeError(
                f"{self.name}: {len(taus)} task vectors, expected {len(self._inputs)}"
            )
        kind = self.pass_kinds[pass_index]
        if start == 0:
            self._begin_pass(kind)
        flat = [self._flat(t, x) for t, x in zip(taus, self._inputs, strict=True)]
        result = None
        if kind == SELECT:
            self._select(flat)
        elif kind == NORMS:
            self._norms(start, stop, flat)
        else:
            if base is None:
                raise RuntimeError(f"{self.name}: the merge pass needs the base rows")
            result = self._merge(start, stop, flat, base, out)
        self._cursor = stop
        if stop == self.rows:
            self._end_pass(kind)
        return result

    def _flat(self, t: torch.Tensor | None, x: _Input) -> torch.Tensor | None:
        if x.dtype is None:
            return None
        if t is None or t.dtype != x.dtype:
            got = None if t is None else t.dtype
            raise RuntimeError(f"{self.name}: input {x.index + 1} is {got}, planned {x.dtype}")
        return t.reshape(-1)

    def _blocks(self, rows: int, device: torch.device):
        """Local row ranges: about CPU_BLOCK elements each on CPU (cache-sized temporaries),
        the whole chunk on a GPU."""
        if device.type != "cpu" or self.min_rows > 1:
            yield 0, rows
            return
        step = max(1, CPU_BLOCK // max(self.row_numel, 1))
        for a in range(0, rows, step):
            yield a, min(rows, a + step)

    def _begin_pass(self, kind: str) -> None:
        if kind == SELECT:
            return
        for x in self._inputs:
            if x.cuts and not x.tops:  # selection is over
                found = {t.m: t for t in x.select.thresholds} if x.select else {}
                x.tops = [TopSet(found.get(m), m) for m in x.cuts]
            for top in x.tops:
                top.reset()  # each pass sees the tied elements from the first again

    def _end_pass(self, kind: str) -> None:
        if kind == SELECT:
            for x in self._inputs:
                if x.select is not None and not x.select.done:
                    x.select.end_pass()
        elif kind == NORMS:
            for x in self._inputs:
                if x.before is not None and x.after is not None:
                    before, after = x.before.value(), x.after.value()
                    # mergekit: masked * (before / after), unless either is below 1e-7
                    ok = before >= _RESCALE_EPS and after >= _RESCALE_EPS
                    x.factor = before / after if ok else 1.0
        self._pass += 1
        self._cursor = 0
        self._done = self._pass == len(self.pass_kinds)

    # ---- the passes ----------------------------------------------------------------------

    def _select(self, flat: list[torch.Tensor | None]) -> None:
        for t, x in zip(flat, self._inputs, strict=True):
            if t is None or x.select is None or x.select.done:
                continue
            for a, b in self._blocks(t.numel() // max(self.row_numel, 1), t.device):
                x.select.update_keys(magnitude_key(t[a * self.row_numel : b * self.row_numel]))

    def _keep(self, x: _Input, t: torch.Tensor, first: int, rows: int) -> torch.Tensor | None:
        """The sparsification mask of a block (``rows`` rows from global row ``first``), or
        ``None`` where the input keeps everything."""
        if not x.sparse:
            return None
        sp = self.spec.method.sparsification
        if sp == MAGNITUDE:
            return x.tops[0].mask(magnitude_key(t))
        if sp == OUTLIERS:
            key = magnitude_key(t)
            lo, hi = x.tops
            return hi.mask(key) & ~lo.mask(key)
        index = first * self.row_numel + torch.arange(t.numel(), device=t.device)
        assert x.key is not None
        bits = random_bits(x.key, index)
        if sp == RANDOM:
            return bits < keep_threshold(x.density)
        return bits.to(torch.float64) < self._della_p(x, t, rows) * float(1 << 32)

    def _della_p(self, x: _Input, t: torch.Tensor, rows: int) -> torch.Tensor:
        """DELLA's keep probability: ``density - eps + 2 eps * rank / (n - 1)`` with ``rank``
        the ascending magnitude rank inside a row (dim 1; a 1-D tensor is one row).

        # subtle: mergekit ranks along dim 1 of the whole tensor, so a chunk of whole rows
        # has every rank it needs; a 1-D tensor is one row, hence min_rows. Equal magnitudes
        # rank by index (stable sort); mergekit's unstable argsort ranks them arbitrarily. A
        # row of one element has no rank range (mergekit divides 0 by 0): it gets p = density.
        """
        view = t.reshape(rows, *self.shape[1:]) if len(self.shape) >= 2 else t.reshape(1, -1)
        dim = 1
        n = view.shape[dim]
        if n <= 1:
            return torch.full(t.shape, x.density, dtype=torch.float64, device=t.device)
        order = torch.sort(magnitude_key(view), dim=dim, stable=True).indices
        ranks = torch.empty_like(order)
        shape = [1] * view.dim()
        shape[dim] = n
        ar = torch.arange(n, device=t.device).reshape(shape).expand_as(order)
        ranks.scatter_(dim, order, ar)
        p = ranks.to(torch.float64) / float(n - 1)
        p = p * (2.0 * x.epsilon)
        p = p + (x.density - x.epsilon)
        return p.reshape(-1)

    def _norms(self, start: int, stop: int, flat: list[torch.Tensor | None]) -> None:
        for t, x in zip(flat, self._inputs, strict=True):
            if t is None or x.before is None or x.after is None:
                continue
            for a, b in self._blocks(stop - start, t.device):
                block = t[a * self.row_numel : b * self.row_numel]
                keep = self._keep(x, block, start + a, b - a)
                x.before.add(block)
                x.after.add(block if keep is None else block * keep)  # NaN * 0 stays NaN

    def _merge(
        self,
        start: int,
        stop: int,
        flat: list[torch.Tensor | None],
        base: torch.Tensor,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        rows = stop - start
        chunk_shape = (rows, *self.shape[1:]) if len(self.shape) >= 1 else ()
        if out is None:
            out = torch.empty(chunk_shape, dtype=self.out_dtype, device=base.device)
        o = out.reshape(-1)
        b_flat = base.reshape(-1)
        for a, b in self._blocks(rows, base.device):
            lo, hi = a * self.row_numel, b * self.row_numel
            terms = []
            for t, x in zip(flat, self._inputs, strict=True):
                if t is None or x.weight == 0:
                    continue  # adds 0 (and, with consensus, never agrees)
                block = t[lo:hi]
                keep = self._keep(x, block, start + a, b - a)
                d = block.to(torch.float64, copy=True)  # owned: the products below are in place
                if keep is not None:
                    d.mul_(keep)  # tau * mask, as mergekit: a dropped NaN stays NaN
                    if self.spec.rescale == "l1" and x.factor != 1.0:
                        d.mul_(x.factor)
                    elif self.spec.rescale == "density":
                        d.mul_(1.0 / x.density)
                terms.append((d.mul_(x.weight), x.weight))
            o[lo:hi].copy_(self._combine(b_flat[lo:hi], terms))
        return out

    def _combine(self, base: torch.Tensor, terms: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
        """``base + lambda * (disjoint / plain) weighted sum``, in float64, rounded once."""
        spec = self.spec
        acc = base.to(torch.float64, copy=True)  # a float64 base block is the caller's
        # every step is the float64 operation of the plain formula, in the same order (in
        # place: the terms are this block's own), so the bits are the formula's
        if spec.method.consensus:
            mixed, divisor = _disjoint_sum(terms, acc)
        else:
            mixed = torch.zeros_like(acc)
            for wd, _ in terms:
                mixed += wd
            total_w = math.fsum(spec.weights)
            divisor = 1.0 if abs(total_w) < _DIVISOR_EPS else total_w
        if spec.normalize:
            mixed.div_(divisor)
        if spec.lam != 1:
            mixed.mul_(spec.lam)
        acc += mixed
        return round_to(acc, self.out_dtype)


def _disjoint_sum(
    terms: list[tuple[torch.Tensor, float]], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES' disjoint merge of the weighted terms: the sum of those whose sign agrees with
    their total's (mergekit: a zero total elects +), and the sum of their weights (1 where
    none agrees).

    # subtle: ``agree`` is float64 1/0, so ``term * agree`` replaces ``torch.where(agree, term,
    # 0)`` (4x slower) wherever that is the same number: where no term is NaN (no total is).
    # An infinite term then agrees with its total's sign (infinities of both signs make the
    # total NaN), and a -0.0 product added to ``mixed`` (from +0.0) leaves +0.0.
    """
    mixed = torch.zeros_like(like)
    divisor = torch.zeros_like(like)
    if terms:
        total = terms[0][0].clone()
        for wd, _ in terms[1:]:
            total += wd
        sign = torch.ge(total, 0.0, out=torch.empty_like(like)).mul_(2.0).sub_(1.0)
        exact_product = not math.isnan(float(total.sum()))  # inf - inf here is NaN too
        agree = torch.empty_like(like)
        for wd, w in terms:
            # wd * sign > 0: wd > 0 where + was elected, wd < 0 where -, never 0 or NaN
            torch.gt(torch.mul(sign, wd, out=total), 0.0, out=agree)
            if exact_product:
                mixed.addcmul_(wd, agree)
            else:
                mixed += torch.where(agree.bool(), wd, 0.0)
            divisor.add_(agree, alpha=w)
    return mixed, divisor.masked_fill_(divisor == 0, 1.0)


def merge_tensor(
    spec: MergeSpec,
    name: str,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor | None],
    *,
    out_dtype: torch.dtype | None = None,
    rows_per_chunk: int | None = None,
) -> torch.Tensor:
    """Merge one in-memory tensor (all passes, chunks of ``rows_per_chunk`` rows): what the
    engine computes when streaming, for tests and small tensors. ``out_dtype``: the base's."""
    m = TensorMerger(
        spec,
        name,
        tuple(base.shape),
        [None if t is None else t.dtype for t in taus],
        out_dtype or base.dtype,
    )
    rows = m.rows
    step = max(rows_per_chunk or rows, m.min_rows, 1)
    ranges = [(a, min(rows, a + step)) for a in range(0, rows, step)] or [(0, 0)]

    def rows_of(t: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
        if t is None:
            return None
        return t.reshape(1)[a:b] if t.dim() == 0 else t[a:b]

    out = []
    for p in range(m.passes):
        for a, b in ranges:
            r = m.feed(p, a, b, [rows_of(t, a, b) for t in taus], rows_of(base, a, b))
            if r is not None:
                out.append(r)
    return torch.cat([r.reshape(-1) for r in out]).reshape(base.shape)
