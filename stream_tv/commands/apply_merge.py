"""The per-tensor tasks of ``apply``: every input's task vector rows, merged.

For one base tensor each input contributes a :class:`Term`, the rows of its task vector
``tau_i``, or nothing (a zero task vector):

- a task vector: its rows as stored;
- a fine-tuned model of the base: ``finetuned - base``, chunk by chunk, as ``extract``
  computes it (:func:`stream_tv.ops.subtract`, float32 for 16-bit models, float64 for float64
  ones), so ``apply BASE FT`` and ``apply BASE $(extract BASE FT)`` write the same bytes;
- a PEFT LoRA adapter: its delta as ``lora-delta --base BASE`` computes it (bound to the base
  as ``merge`` binds it, DoRA and saved tensors included), in PEFT's work dtype (float32,
  float64 for float64 weights).

The rows then go through ``task_arithmetic`` (:func:`stream_tv.ops.add_scaled`: today's
``apply``) or a :class:`~stream_tv.merging.TensorMerger` (``ties``, ``dare_*``, ...), pass
after pass: a DoRA prepass first when an adapter needs one, then the merger's passes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import engine, ops
from ..errors import MismatchError
from ..io.index import Checkpoint, TensorSpec
from ..io.writer import OutTensor
from ..lora import Adapter, TensorMerge
from ..merging import MergeSpec, TensorMerger
from .apply_inputs import ADAPTER, FINETUNED, TV, Input


@dataclass(frozen=True)
class Term:
    """Where one input's task vector of one tensor comes from."""

    kind: str  # TV, FINETUNED or ADAPTER
    spec: TensorSpec | None  # what is read: the task vector, the model, an adapter's saved tensor
    dtype: torch.dtype  # of the task-vector rows
    merge: TensorMerge | None = None  # an adapter's plan for the tensor

    @property
    def prepass(self) -> bool:
        return self.merge is not None and self.merge.passes == 2


def bind_adapter(
    ad: Adapter, b: Checkpoint, index: int, layouts: Mapping[str, bool] | None
) -> dict[str, TensorMerge]:
    """The adapter's changes by base tensor name, bound as ``merge`` binds it; a change to a
    tensor the base does not hold (a head PEFT unties) is refused."""
    from .merge import bind_all  # merge.py imports apply.py, which imports this module

    merges = bind_all([ad], [1.0], b, layouts=layouts).by_base_name()
    for name, tm in merges.items():
        if tm.spec is not None and tm.spec.name != name:
            raise MismatchError(
                f"INPUT {index + 1} (an adapter) changes {name!r} from the base's "
                f"{tm.spec.name!r}: apply writes each base tensor under its own name",
                where=ad.reference,
                hint="merge it with stream-tv merge",
            )
        if name not in b or tuple(tm.shape) != b[name].shape:
            have = f"{list(b[name].shape)} in the base" if name in b else "not in the base"
            raise MismatchError(
                f"INPUT {index + 1} (an adapter) changes {name!r} {list(tm.shape)}, {have}",
                where=ad.reference,
                hint="apply writes the base's tensors; merge such an adapter with stream-tv "
                "merge (it unties heads and renames as PEFT does)",
            )
    return merges


def terms_of(
    name: str,
    base: Checkpoint,
    inputs: Sequence[Input],
    bound: Mapping[int, Mapping[str, TensorMerge]],
) -> list[Term | None]:
    """Every input's term for base tensor ``name`` (``None`` where it has none)."""
    terms: list[Term | None] = []
    for i, x in enumerate(inputs):
        if x.kind == ADAPTER:
            tm = bound[i].get(name)
            terms.append(None if tm is None else Term(ADAPTER, tm.replacement, tm.work_dtype, tm))
            continue
        ckpt = x.source
        assert isinstance(ckpt, Checkpoint)
        if name not in ckpt:
            terms.append(None)
        elif x.kind == TV:
            terms.append(Term(TV, ckpt[name], ckpt[name].dtype))
        else:
            dtype = ops.difference_dtype(base[name].dtype, ckpt[name].dtype)
            terms.append(Term(FINETUNED, ckpt[name], dtype))
    return terms


def merged_task(
    name: str,
    base: TensorSpec,
    terms: Sequence[Term | None],
    out_dtype: torch.dtype,
    *,
    spec: MergeSpec | None,
    factors: Sequence[float],
) -> engine.Task:
    """The task writing one merged tensor: ``base + sum(factor_i * tau_i)`` with
    ``spec=None`` (task arithmetic), else ``spec``'s method through a TensorMerger."""
    inputs = [base]
    slots: list[int | None] = []
    for t in terms:
        slots.append(len(inputs) if t is not None and t.spec is not None else None)
        if t is not None and t.spec is not None:
            inputs.append(t.spec)
    pre = int(any(t is not None and t.prepass for t in terms))
    dtypes = [None if t is None else t.dtype for t in terms]

    def new_merger() -> TensorMerger | None:
        return None if spec is None else TensorMerger(spec, name, base.shape, dtypes, out_dtype)

    probe = new_merger()  # passes, min_rows, work: from headers only

    @contextlib.contextmanager
    def session(device: torch.device) -> Iterator[tuple[list, TensorMerger | None]]:
        with contextlib.ExitStack() as stack:
            rts = [
                stack.enter_context(t.merge.open(device)) if t and t.merge else None for t in terms
            ]
            yield rts, new_merger()  # a fresh merger for every run of the task

    def compute(chunk: engine.Chunk) -> torch.Tensor | None:
        rts, merger = chunk.state
        x, base_rows = chunk.inputs, chunk.inputs[0]
        rows = [None if s is None else x[s] for s in slots]
        if chunk.pass_index < pre:
            for t, rt, r in zip(terms, rts, rows, strict=True):
                if t is not None and t.prepass:
                    rt.prepass(_weight_rows(t, r, base_rows), chunk.start, chunk.stop)
            return None
        taus = [
            _tau_rows(t, r, base_rows, rt, chunk.start, chunk.stop)
            for t, r, rt in zip(terms, rows, rts, strict=True)
        ]
        if merger is None:
            return ops.add_scaled(base_rows, list(zip(taus, factors, strict=True)), out=chunk.out)
        p = chunk.pass_index - pre
        return merger.feed(p, chunk.start, chunk.stop, taus, base_rows, out=chunk.out)

    row = base.row_numel
    work = sum(
        row * t.dtype.itemsize * (3 if t.kind == ADAPTER else 1)
        for t in terms
        if t is not None and t.kind != TV
    )
    if probe is not None:
        work += probe.work_bytes_per_row()
    elif out_dtype.itemsize < 4:
        work += row * 4
    return engine.Task(
        name,
        inputs,
        compute,
        out=OutTensor(name, out_dtype, base.shape),
        passes=pre + (probe.passes if probe is not None else 1),
        min_rows=max(2, probe.min_rows if probe is not None else 1),
        work_row_bytes=work,
        session=session,
    )


def _weight_rows(t: Term, rows: torch.Tensor | None, base_rows: torch.Tensor):
    """The rows an adapter's steps apply to (as ``lora-delta`` reads them): the saved
    replacement if any, else the base where the delta depends on it (DoRA, tokens)."""
    assert t.merge is not None
    if t.merge.replacement is not None:
        return rows
    return base_rows if t.merge.needs_base else None


def _tau_rows(
    t: Term | None, rows: torch.Tensor | None, base_rows: torch.Tensor, rt, start: int, stop: int
) -> torch.Tensor | None:
    """One input's task-vector rows ``[start, stop)`` (see the module docstring)."""
    if t is None:
        return None
    if t.kind == TV:
        return rows
    if t.kind == FINETUNED:
        assert rows is not None
        out = torch.empty(rows.shape, dtype=t.dtype, device=rows.device)
        return ops.subtract(rows, base_rows, out=out)
    assert t.merge is not None
    d = rt.delta_rows(start, stop, w_rows=_weight_rows(t, rows, base_rows), dtype=t.dtype)
    if t.merge.replacement is not None:
        assert rows is not None
        d = d + (rows.to(t.merge.dtype).to(t.dtype) - base_rows.to(t.dtype))
    return d.reshape(rows.shape if rows is not None else base_rows.shape)


def task_arithmetic_factors(spec: MergeSpec) -> list[float]:
    """``lambda * w_i`` (over ``sum w`` with ``normalize``, 1 where that is about 0): the
    scales of task arithmetic, as mergekit's ``normalize`` and ``lambda`` give them.

    >>> from stream_tv.merging import merge_spec
    >>> task_arithmetic_factors(merge_spec("task_arithmetic", 2, weights=[1, 3], normalize=True))
    [0.25, 0.75]
    """
    weights = list(spec.weights)
    div = math.fsum(weights) if spec.normalize else 1.0
    if abs(div) < 1e-8:
        div = 1.0
    if div == 1.0 and spec.lam == 1.0:
        return weights  # today's apply: the scales as given, bit for bit
    return [spec.lam * w / div for w in weights]
