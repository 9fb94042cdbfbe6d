"""The Python API of the LoRA commands: ``merge`` and ``lora-delta``.

Like :mod:`stream_tv.api`: resolve references, validate everything from headers (the
adapter's :meth:`~stream_tv.lora.Adapter.bind`), build one :class:`~stream_tv.engine.Task`
per output tensor and hand them to :func:`~stream_tv.api.write_checkpoint`. The maths lives
in :mod:`stream_tv.lora`; a task only streams rows through a
:class:`~stream_tv.lora.TensorMerge`.

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

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, engine, ops
from .api import RunOptions, WriteResult, _apply_task, input_paths, write_checkpoint
from .errors import InputError
from .io.index import Checkpoint, TensorSpec, dtype_name
from .io.writer import OutTensor
from .lora import PRECISIONS, Adapter, MergePlan, TensorMerge
from .lora.config import CONFIG_NAME
from .refs import open_checkpoint

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


def merge_lora(
    base: str | os.PathLike,
    adapters: AdapterRef | Sequence[AdapterRef],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    precision: str = "exact-peft",
    device: str = "auto",
    chunk_size: int | str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    options: RunOptions | None = None,
) -> MergeResult:
    """Write ``base`` with the LoRA adapter(s) merged in, as PEFT's ``merge_and_unload()``.

    With ``precision="exact-peft"`` the merged weights are PEFT's bit for bit on CPU (PEFT
    loads the adapter onto the base, merges, and ``save_pretrained`` writes it). The output is
    a model directory: shards, index, and the base's config and tokenizer files. Everything is
    checked from headers before the first byte is written. ``options`` (the CLI's
    :class:`~stream_tv.api.RunOptions`) overrides ``device`` ... ``progress``.
    """
    options = options or RunOptions(
        device=device,
        chunk_size=chunk_size,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress,
        on_nonfinite="error",
    )
    refs = _adapter_list(adapters)
    weights = _weights(weights, len(refs))
    if precision not in PRECISIONS:
        raise InputError(
            f"unknown precision {precision!r}", hint=f"use one of {', '.join(PRECISIONS)}"
        )
    b = open_checkpoint(base)
    loaded = [Adapter.load(r) for r in refs]
    plan = _plan(loaded, weights, b)
    plan.check(precision)
    tasks = merge_tasks(plan, precision)

    metadata: dict[str, object] = {
        "stream_tv_version": __version__,
        "operation": "merge",
        "base": b.reference,
        "adapters": [a.reference for a in loaded],
        "weights": weights,
        "precision": precision,
    }
    result = write_checkpoint(
        tasks,
        out,
        inputs=[*input_paths(b), *_adapter_paths(loaded)],
        options=options,
        metadata=metadata,
        description="merge",
        side_files_from=b.root,
    )
    return MergeResult(
        **vars(result),
        adapters=[a.reference for a in loaded],
        weights=weights,
        precision=precision,
        merged=[k for k, t in plan.merges.items() if t.steps],
        replaced=[k for k, t in plan.merges.items() if t.replacement is not None],
        untouched=len(plan.untouched),
        lora_modules=len(plan.modules),
    )


def merge_tasks(plan: MergePlan, precision: str) -> list[engine.Task]:
    """One task per base tensor, in base order: merged through its TensorMerge, or copied."""
    assert plan.base is not None
    tasks = []
    for name, spec in plan.base.tensors.items():
        tm = plan.merges.get(name)
        tasks.append(
            _merge_task(tm, precision)
            if tm is not None
            else _apply_task(name, spec, [], spec.dtype)
        )
    return tasks


def _merge_task(tm: TensorMerge, precision: str) -> engine.Task:
    passes = tm.passes

    def compute(chunk: engine.Chunk) -> torch.Tensor | None:
        w = chunk.inputs[0]
        if chunk.pass_index < passes - 1:
            tm.prepass(w, chunk.start, chunk.stop, precision=precision)
            return None
        return tm.merge_rows(w, chunk.start, chunk.stop, chunk.out, precision=precision)

    return engine.Task(
        tm.key,
        tm.merge_inputs,
        compute,
        out=OutTensor(tm.key, tm.dtype, tm.shape),
        passes=passes,
        work_row_bytes=_work_row_bytes(tm),
        start=tm.load,
        finish=tm.unload,
    )


def _work_row_bytes(tm: TensorMerge) -> int:
    # float32 temporaries per row: the delta, the running weight and W + D (DoRA).
    row = 1
    for d in tm.shape[1:]:
        row *= d
    return row * 4 * (3 if any(s.dora for s in tm.steps) or len(tm.steps) > 1 else 2)


# ---- lora-delta -----------------------------------------------------------------------------


@dataclass
class LoraDeltaResult(WriteResult):
    adapter: str = ""
    base: str | None = None
    dtype: str = "F32"
    replaced: list[str] = field(default_factory=list)


def lora_delta(
    adapter: AdapterRef,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    weight: float = 1.0,
    device: str = "auto",
    chunk_size: int | str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
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
    options = options or RunOptions(
        device=device,
        chunk_size=chunk_size,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress,
        on_nonfinite="warn",
    )
    if not dtype.is_floating_point:
        raise InputError(f"--dtype must be a float type, not {dtype}")
    ad = Adapter.load(adapter)
    b = open_checkpoint(base) if base is not None else None
    plan = _plan([ad], [weight], b)
    tasks = delta_tasks(plan, dtype)
    metadata: dict[str, object] = {
        "stream_tv_version": __version__,
        "operation": "lora-delta",
        "adapter": ad.reference,
        "base": b.reference if b is not None else "",
        "weight": weight,
        "dtype": dtype_name(dtype),
    }
    result = write_checkpoint(
        tasks,
        out,
        inputs=[*(input_paths(b) if b is not None else []), *_adapter_paths([ad])],
        options=options,
        metadata=metadata,
        description="lora-delta",
    )
    return LoraDeltaResult(
        **vars(result),
        adapter=ad.reference,
        base=b.reference if b is not None else None,
        dtype=dtype_name(dtype),
        replaced=[k for k, t in plan.merges.items() if t.replacement is not None],
    )


def delta_tasks(plan: MergePlan, dtype: torch.dtype) -> list[engine.Task]:
    return [_delta_task(tm, dtype) for tm in plan.merges.values()]


def _delta_task(tm: TensorMerge, dtype: torch.dtype) -> engine.Task:
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inputs: list[TensorSpec] = []
    if tm.replacement is not None:
        inputs = [tm.replacement, tm.spec]  # the steps apply to the replacement
    elif tm.needs_base:
        inputs = [tm.spec]
    passes = tm.passes

    def compute(chunk: engine.Chunk) -> torch.Tensor | None:
        x = chunk.inputs
        w = x[0] if inputs else None
        if chunk.pass_index < passes - 1:
            tm.prepass(w, chunk.start, chunk.stop)
            return None
        d = tm.delta_rows(chunk.start, chunk.stop, w_rows=w, dtype=work)
        if tm.replacement is not None:
            replaced = w.to(tm.dtype).to(work)
            d = d + (replaced - x[1].to(work))
        return chunk.out.copy_(ops.round_to(d, chunk.out.dtype))

    row = 1
    for s in tm.shape[1:]:
        row *= s
    return engine.Task(
        tm.key,
        inputs,
        compute,
        out=OutTensor(tm.key, dtype, tm.shape),
        passes=passes,
        work_row_bytes=row * work.itemsize * 3,
        start=tm.load,
        finish=tm.unload,
    )


# ---- shared -----------------------------------------------------------------------------------


def _adapter_list(adapters: AdapterRef | Sequence[AdapterRef]) -> list[AdapterRef]:
    if isinstance(adapters, (str, os.PathLike)):
        return [adapters]
    refs = list(adapters)
    if not refs:
        raise InputError("no adapter given", hint="stream-tv merge BASE ADAPTER -o OUT")
    return refs


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if not weights:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) == 1 and n > 1:
        return weights * n
    if len(weights) != n:
        raise InputError(
            f"{len(weights)} weights for {n} adapters",
            hint="give one --weight per adapter, in order, or one for all",
        )
    return weights


def _plan(
    adapters: Sequence[Adapter], weights: Sequence[float], base: Checkpoint | None
) -> MergePlan:
    plans = [a.bind(base) for a in adapters]
    if len(plans) == 1 and weights[0] == 1.0:
        return plans[0]
    return MergePlan.combine(list(zip(plans, weights, strict=True)))


def _adapter_paths(adapters: Sequence[Adapter]) -> list[Path]:
    paths: list[Path] = []
    for a in adapters:
        paths += [a.weights_file, a.path / CONFIG_NAME, a.path]
    return paths


# ---- verify: recompute merge and lora-delta outputs -----------------------------------------


def _register_verify() -> None:
    from .verify import Recomputation, VerifyInputs, register_recompute

    def outputs_problems(output: Mapping[str, TensorSpec], tasks: Mapping[str, engine.Task]):
        problems = [
            f"{n}: in the output but not written by the recomputation"
            for n in output
            if n not in tasks
        ]
        absent = [n for n in tasks if n not in output]
        if absent:
            problems.append(
                f"{len(absent)} tensor(s) are missing from the output (e.g. {', '.join(absent[:3])})"
            )
        return problems

    @register_recompute("merge")
    def _recompute_merge(
        given: VerifyInputs, output: Mapping[str, TensorSpec], metadata: Mapping[str, object]
    ) -> Recomputation:
        if given.base is None or given.adapter is None or given.finetuned or given.task_vectors:
            raise InputError(
                "this output was written by 'merge', which verify recomputes from "
                "--base BASE --adapter ADAPTER",
                hint="pass --base BASE --adapter ADAPTER",
            )
        recorded = metadata.get("adapters")
        if isinstance(recorded, list) and len(recorded) != 1:
            raise InputError(
                f"the output merges {len(recorded)} adapters; verify recomputes one",
                hint="verify without inputs checks structure, checksums and NaN/Inf",
            )
        weights = metadata.get("weights") or [1.0]
        precision = str(metadata.get("precision") or "exact-peft")
        b = open_checkpoint(given.base)
        ad = Adapter.load(given.adapter)
        plan = _plan([ad], [float(weights[0])], b)
        plan.check(precision)
        tasks = {t.name: t for t in merge_tasks(plan, precision)}
        return Recomputation(
            f"{b.reference} + {ad.reference}", tasks, outputs_problems(output, tasks)
        )

    @register_recompute("lora-delta")
    def _recompute_delta(
        given: VerifyInputs, output: Mapping[str, TensorSpec], metadata: Mapping[str, object]
    ) -> Recomputation:
        had_base = bool(metadata.get("base"))
        if (
            given.adapter is None
            or given.finetuned
            or given.task_vectors
            or had_base != (given.base is not None)
        ):
            usage = "--adapter ADAPTER" + (" --base BASE" if had_base else "")
            raise InputError(
                f"this output was written by 'lora-delta', which verify recomputes from {usage}",
                hint=f"pass {usage}",
            )
        b = open_checkpoint(given.base) if given.base is not None else None
        ad = Adapter.load(given.adapter)
        plan = _plan([ad], [float(metadata.get("weight") or 1.0)], b)
        first = next(iter(output.values()), None)
        dtype = first.dtype if first is not None else torch.float32
        tasks = {t.name: t for t in delta_tasks(plan, dtype)}
        return Recomputation(ad.reference, tasks, outputs_problems(output, tasks))


_register_verify()
