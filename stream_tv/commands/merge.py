"""``merge`` and ``lora-delta``: a LoRA adapter merged into its base, or written as a delta.

The planners bind the adapter(s) to the base from headers (:mod:`stream_tv.lora.bind`) and
make one task per output tensor that streams rows through the tensor's
:class:`~stream_tv.lora.plan.TensorMerge`, opened on the device for the task's chunks.

Example (not run here)::

    import stream_tv
    r = stream_tv.merge_lora("base/", "adapter/", "merged/")
    r.merged, r.replaced, r.output

Several adapters: ``merge_lora(base, [a, b], out, weights=[0.7, 0.3])``. A weight multiplies
an adapter's scaling, like PEFT's ``set_scale``. ``precision="exact-peft"`` (default) applies
the adapters one after the other with a rounding to the weight dtype after each, as PEFT's
``merge_and_unload()`` does with several active adapters; ``precision="fp32"`` keeps the sum
in float32 and rounds once: better for bf16/fp16 models when several adapters, an Embedding
LoRA (PEFT rounds its delta to the weight dtype before adding it) or a tied head (two
layers add into one tensor) are merged, and identical to PEFT otherwise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import engine, ops, validate
from ..errors import InputError
from ..io.index import Checkpoint, TensorSpec, dtype_name
from ..io.writer import OutTensor
from ..jobs import Job, Outcome, Output, WriteResult, run_job, written
from ..lora import PRECISIONS, Adapter, MergePlan, TensorMerge
from ..lora import delta as D
from ..options import RunOptions
from ..refs import open_checkpoint

AdapterRef = str | os.PathLike


# ---- merge ------------------------------------------------------------------------------------


@dataclass
class MergeResult(WriteResult):
    adapters: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    precision: str = "exact-peft"
    merged: list[str] = field(default_factory=list)  # base tensors LoRA layers change
    replaced: list[str] = field(default_factory=list)  # replaced by tensors saved in the adapter
    untouched: int = 0  # base tensors copied unchanged
    lora_modules: int = 0
    dropped: dict[str, str] = field(default_factory=dict)  # base tensors not written, and why
    config_updates: dict[str, object] = field(default_factory=dict)  # set in config.json
    basis: str = ""  # where the modules' kinds, ties and dtypes came from


def merge_lora(
    base: str | os.PathLike,
    adapters: AdapterRef | Sequence[AdapterRef],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    precision: str = "exact-peft",
    layouts: Mapping[str, bool] | None = None,
    options: RunOptions | None = None,
) -> MergeResult:
    """Write ``base`` with the LoRA adapter(s) merged in, as PEFT's ``merge_and_unload()``.

    With ``precision="exact-peft"`` the merged weights are PEFT's bit for bit on CPU (PEFT
    loads the adapter onto the base, merges, and ``save_pretrained`` writes it). The output is
    a model directory: shards, index, and the base's config and tokenizer files (config.json
    changed where PEFT's merge changes it). With the model definition (``transformers`` and
    the base's config.json) the tensors are named and typed as PEFT's save writes them.
    ``layouts`` (module pattern -> ``True`` for a GPT-2 Conv1D) settles square layouts
    without it. Everything is checked from headers before the first byte is written.
    """
    b = open_checkpoint(base)
    loaded = [Adapter.load(r) for r in _adapter_list(adapters)]
    job = plan_merge(b, loaded, Path(out), weights=weights, precision=precision, layouts=layouts)
    return run_job(job, options or RunOptions())


def plan_merge(
    b: Checkpoint,
    adapters: Sequence[Adapter],
    out: Path,
    *,
    weights: Sequence[float] | None = None,
    precision: str = "exact-peft",
    layouts: Mapping[str, bool] | None = None,
) -> Job[MergeResult]:
    """The job writing ``b`` with ``adapters`` merged in."""
    if precision not in PRECISIONS:
        raise InputError(
            f"unknown precision {precision!r}", hint=f"use one of {', '.join(PRECISIONS)}"
        )
    if not adapters:
        raise InputError("no adapter given", hint="stream-tv merge BASE ADAPTER -o OUT")
    weights = validate.broadcast(weights, len(adapters), "weight", "adapter")
    plan = bind_all(adapters, weights, b, layouts=layouts)
    plan.check(precision)
    tasks = [
        merge_task(plan.merges[o.key], precision)
        if o.key in plan.merges
        else copy_task(o.key, o.spec, o.dtype)
        for o in plan.outputs
    ]
    provenance: dict[str, object] = {
        "base": b.reference,
        "adapters": [a.reference for a in adapters],
        "weights": weights,
        "precision": precision,
        **layout_provenance(layouts),
    }

    def result(outcome: Outcome) -> MergeResult:
        return MergeResult(
            **written(outcome),
            adapters=[a.reference for a in adapters],
            weights=weights,
            precision=precision,
            merged=[k for k, t in plan.merges.items() if t.steps],
            replaced=[k for k, t in plan.merges.items() if t.replacement is not None],
            untouched=len(plan.untouched),
            lora_modules=len(plan.modules),
            dropped=dict(plan.dropped),
            config_updates=dict(plan.config_updates),
            basis=plan.basis,
        )

    return Job(
        "merge",
        tasks,
        result,
        sources=[b, *adapters],
        output=Output(
            out,
            "merge",
            provenance,
            side_files_from=b.root,
            config_updates=plan.config_updates,
        ),
        doubts=[
            *validate.provenance(b, expected="model", given_as="BASE"),
            *validate.already_merged(b, [(a.reference, a.path) for a in adapters]),
        ],
    )


def copy_task(name: str, spec: TensorSpec, dtype: torch.dtype) -> engine.Task:
    """The task writing a base tensor the adapters leave alone (rounded once to ``dtype``).

    In its own dtype the rows are handed back as read: the engine writes them from the
    buffer they were read into, without a copy.
    """

    def compute(chunk: engine.Chunk) -> torch.Tensor:
        rows = chunk.inputs[0]
        if rows.dtype == dtype:
            return rows
        return chunk.out.copy_(ops.round_to(rows, dtype))

    return engine.Task(name, [spec], compute, out=OutTensor(name, dtype, spec.shape))


def merge_task(tm: TensorMerge, precision: str) -> engine.Task:
    """The task writing one merged tensor (a DoRA prepass first when it needs one)."""
    passes = tm.passes

    def compute(chunk: engine.Chunk) -> torch.Tensor | None:
        w, rt = chunk.inputs[0], chunk.state
        if chunk.pass_index < passes - 1:
            rt.prepass(w, chunk.start, chunk.stop, precision=precision)
            return None
        return rt.merge_rows(w, chunk.start, chunk.stop, chunk.out, precision=precision)

    # float32 temporaries per row: the delta, the running weight and W + D (DoRA).
    temporaries = 3 if any(s.dora for s in tm.steps) or len(tm.steps) > 1 else 2
    return engine.Task(
        tm.key,
        tm.merge_inputs,
        compute,
        out=OutTensor(tm.key, tm.dtype, tm.shape),
        passes=passes,
        work_row_bytes=math.prod(tm.shape[1:]) * 4 * temporaries,
        session=tm.open,
    )


# ---- lora-delta -----------------------------------------------------------------------------


@dataclass
class LoraDeltaResult(WriteResult):
    adapter: str = ""
    base: str | None = None
    dtype: str = "F32"
    replaced: list[str] = field(default_factory=list)
    basis: str = ""


def lora_delta(
    adapter: AdapterRef,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    weight: float = 1.0,
    layouts: Mapping[str, bool] | None = None,
    options: RunOptions | None = None,
) -> LoraDeltaResult:
    """Write the adapter's effective delta as a task vector, under the base's tensor names.

    Only the tensors the adapter changes are written (``apply`` counts a missing tensor as
    zero). Without ``base``: ``scaling * B @ A`` (transposed to the stored layout, from the
    adapter's ``fan_in_fan_out``), names ``<module>.weight``. With ``base``: base names (a
    tied head lands on the input embedding, summed with its own delta), and the deltas that
    need the base: DoRA (``m / ||W + D|| * (W + D) - W``) and full tensors saved in the
    adapter (``saved - base``). float32 (default) gives PEFT's own delta bits for plain LoRA;
    float64 computes the products in float64; bf16/fp16 round the float32 delta once.
    """
    ad = Adapter.load(adapter)
    b = open_checkpoint(base) if base is not None else None
    job = plan_lora_delta(ad, Path(out), base=b, dtype=dtype, weight=weight)
    return run_job(job, options or RunOptions())


def plan_lora_delta(
    ad: Adapter,
    out: Path,
    *,
    base: Checkpoint | None = None,
    dtype: torch.dtype = torch.float32,
    weight: float = 1.0,
    layouts: Mapping[str, bool] | None = None,
) -> Job[LoraDeltaResult]:
    """The job writing ``ad``'s delta (under ``base``'s names when given)."""
    if not dtype.is_floating_point:
        raise InputError(f"--dtype must be a float type, not {dtype}")
    plan = bind_all([ad], [weight], base, layouts=layouts)
    tasks = [delta_task(tm, dtype, name) for name, tm in plan.by_base_name().items()]
    provenance: dict[str, object] = {
        "adapter": ad.reference,
        "base": base.reference if base is not None else "",
        "weight": weight,
        "dtype": dtype_name(dtype),
        **layout_provenance(layouts),
    }

    def result(outcome: Outcome) -> LoraDeltaResult:
        return LoraDeltaResult(
            **written(outcome),
            adapter=ad.reference,
            base=base.reference if base is not None else None,
            dtype=dtype_name(dtype),
            replaced=[k for k, t in plan.by_base_name().items() if t.replacement is not None],
            basis=plan.basis,
        )

    return Job(
        "lora-delta",
        tasks,
        result,
        sources=[*([base] if base is not None else []), ad],
        output=Output(
            out, "lora-delta", provenance, empty_hint="the adapter changes no tensor of the base"
        ),
        doubts=validate.provenance(base, expected="model", given_as="--base") if base else [],
    )


def delta_task(tm: TensorMerge, dtype: torch.dtype, name: str | None = None) -> engine.Task:
    """The task writing one tensor's delta in ``dtype`` under ``name`` (default: its output
    name), with ``saved - base`` added for a tensor the adapter replaces."""
    name = name or tm.key
    work = torch.float64 if dtype == torch.float64 else tm.work_dtype
    inputs: list[TensorSpec] = []
    if tm.replacement is not None:
        inputs = [tm.replacement, tm.spec]  # the steps apply to the replacement
    elif tm.needs_base:
        inputs = [tm.spec]
    passes = tm.passes
    row_bytes = math.prod(tm.shape[1:]) * work.itemsize

    def compute(chunk: engine.Chunk) -> torch.Tensor | None:
        x, rt = chunk.inputs, chunk.state
        w = x[0] if inputs else None
        if chunk.pass_index < passes - 1:
            rt.prepass(w, chunk.start, chunk.stop)
            return None
        if not inputs and chunk.device.type == "cpu":
            # Plain LoRA on CPU: the product block by block into one kept buffer, each block
            # rounded into the output while it is still in the cache (the bits of the whole
            # product: each block is whole windows). One pass over memory instead of three
            # (product, scaling, rounding) and no fresh pages (benchmarks/RESULTS.md, run AI).
            for a, b in D.row_blocks(chunk.start, chunk.stop, row_bytes):
                d = rt.delta_rows(a, b, dtype=work, scratch="lora-delta")
                chunk.out[a - chunk.start : b - chunk.start].copy_(ops.round_to(d, chunk.out.dtype))
            return chunk.out
        d = rt.delta_rows(chunk.start, chunk.stop, w_rows=w, dtype=work)
        if tm.replacement is not None:
            replaced = w.to(tm.dtype).to(work)
            d = d + (replaced - x[1].to(work))
        return chunk.out.copy_(ops.round_to(d, chunk.out.dtype))

    return engine.Task(
        name,
        inputs,
        compute,
        out=OutTensor(name, dtype, tm.shape),
        passes=passes,
        work_row_bytes=math.prod(tm.shape[1:]) * work.itemsize * 3,
        session=tm.open,
    )


# ---- shared -----------------------------------------------------------------------------------


def _adapter_list(adapters: AdapterRef | Sequence[AdapterRef]) -> list[AdapterRef]:
    if isinstance(adapters, (str, os.PathLike)):
        return [adapters]
    refs = list(adapters)
    if not refs:
        raise InputError("no adapter given", hint="stream-tv merge BASE ADAPTER -o OUT")
    return refs


def bind_all(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    base: Checkpoint | None,
    *,
    layouts: Mapping[str, bool] | None = None,
    stand_in: bool = False,
) -> MergePlan:
    """The plan of ``adapters`` on ``base``, each adapter's scaling times its weight
    (``stand_in``: ``base`` is a task vector with the base's names, see ``Adapter.bind``)."""
    plans = [a.bind(base, layouts=layouts, stand_in=stand_in) for a in adapters]
    if len(plans) == 1 and weights[0] == 1.0:
        return plans[0]
    return MergePlan.combine(list(zip(plans, weights, strict=True)))


def layout_provenance(layouts: Mapping[str, bool] | None) -> dict[str, object]:
    """``--fan-in-fan-out`` / ``--no-fan-in-fan-out`` patterns, as the index records them
    (``verify`` binds with the same ones)."""
    if not layouts:
        return {}
    return {
        "fan_in_fan_out": [p for p, v in layouts.items() if v],
        "no_fan_in_fan_out": [p for p, v in layouts.items() if not v],
    }


def recorded_layouts(metadata: Mapping[str, object]) -> dict[str, bool]:
    """The layout patterns an index records (:func:`layout_provenance`), as ``layouts``."""
    out: dict[str, bool] = {}
    for key, value in (("fan_in_fan_out", True), ("no_fan_in_fan_out", False)):
        patterns = metadata.get(key)
        if isinstance(patterns, list):
            out.update(dict.fromkeys((str(p) for p in patterns), value))
    return out
