"""``compare``: how a LoRA delta relates to the task vector of the model it produced.

For every tensor, ``T`` is the task vector (``finetuned - base``, or a task-vector checkpoint)
and ``L`` the adapter's effective delta (or a second task vector). Both stream through the
engine chunk by chunk; :class:`~stream_tv.stats.TensorAccumulator` folds each chunk into
float64 sums, so memory stays bounded and the figures do not depend on the chunk size.

Where ``L`` exists, both ``L`` and ``T`` are computed in float64: their difference sits at
float32 rounding level, and float32 products would distort ``max_abs_diff`` and
``relative_error``. Elsewhere ``T`` only needs the cheapest exact method: the float32
difference of two 16-bit values is exact.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import engine, ops, validate
from ..errors import InputError, NonFiniteError
from ..io.index import Checkpoint, TensorSpec
from ..io.outdir import check_output_file, write_file
from ..jobs import Job, Outcome, run_job
from ..lora import Adapter, TensorMerge
from ..options import RunOptions
from ..refs import open_checkpoint
from ..report import CompareReport
from ..stats import TensorAccumulator
from .merge import bind_all


def compare(
    *,
    base: str | os.PathLike | None = None,
    finetuned: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    task_vectors: Sequence[str | os.PathLike] = (),
    allow_missing: bool = False,
    json_path: str | os.PathLike | None = None,
    markdown_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    layouts: Mapping[str, bool] | None = None,
    options: RunOptions | None = None,
) -> CompareReport:
    """Compare a LoRA delta (or a task vector) with a task vector, tensor by tensor.

    Inputs, one of:
      - ``base`` + ``finetuned`` + ``adapter``: L from the adapter, T = finetuned - base;
      - ``task_vectors=[tv]`` + ``adapter`` (``base`` too for DoRA adapters);
      - ``task_vectors=[a, b]``: L = a, T = b;
      - ``base`` + ``finetuned`` alone: coverage of what changed (no L).

    ``json_path``, ``markdown_path``, ``plot_path``: report files, checked before any data is
    read (never an input, nor inside one, nor a link) and written before this returns, each
    through a temporary file and a rename. The adapter is bound like ``merge`` binds it (``layouts``: square layouts without the
    model definition); tensors keep the base's names.
    """
    b = open_checkpoint(base) if base is not None else None
    f = open_checkpoint(finetuned) if finetuned is not None else None
    tvs = [open_checkpoint(t) for t in task_vectors]
    ad = Adapter.load(adapter) if adapter is not None else None
    job = plan_compare(
        base=b,
        finetuned=f,
        adapter=ad,
        task_vectors=tvs,
        allow_missing=allow_missing,
        layouts=layouts,
    )
    given = {"--json": json_path, "--markdown": markdown_path, "--plot": plot_path}
    files = {flag: Path(p) for flag, p in given.items() if p is not None}
    if "--plot" in files:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plot needs matplotlib: pip install 'stream-tv[plot]'") from None
    for flag, path in files.items():
        check_output_file(path, job.inputs, flag=flag)
    options = options or RunOptions()
    report = run_job(job, options)
    bad = {t.name: t.nonfinite for t in report.tensors if t.nonfinite}
    if bad and options.nonfinite_for("compare") == "error":
        shown = ", ".join(f"{n} ({c})" for n, c in list(bad.items())[:5])
        raise NonFiniteError(
            f"NaN/Inf in the task vector or the LoRA delta of {len(bad)} tensor(s): {shown}",
            hint="check the inputs (stream-tv inspect), or pass --on-nonfinite warn to report "
            "them (they are counted per tensor and left out of every figure)",
        )
    if "--json" in files:
        write_file(files["--json"], report.to_json().encode())
    if "--markdown" in files:
        write_file(files["--markdown"], report.to_markdown().encode())
    if "--plot" in files:
        write_file(files["--plot"], render=report.plot)
    return report


@dataclass
class _Source:
    """Where one tensor's T and L come from: indices into ``inputs``."""

    name: str
    inputs: list[TensorSpec] = field(default_factory=list)
    base: int | None = None
    finetuned: int | None = None
    tv: int | None = None
    other_tv: int | None = None  # L from a second task vector
    merge: TensorMerge | None = None  # L from an adapter
    replacement: int | None = None  # a full tensor saved in the adapter

    def add(self, spec: TensorSpec) -> int:
        self.inputs.append(spec)
        return len(self.inputs) - 1


def plan_compare(
    *,
    base: Checkpoint | None = None,
    finetuned: Checkpoint | None = None,
    adapter: Adapter | None = None,
    task_vectors: Sequence[Checkpoint] = (),
    allow_missing: bool = False,
    layouts: Mapping[str, bool] | None = None,
) -> Job[CompareReport]:
    """The job comparing L with T for every float tensor of T's checkpoint(s)."""
    b, f, tvs = base, finetuned, list(task_vectors)
    _check_inputs(b, f, adapter, tvs)
    if f is not None:  # T's checkpoint(s) decide the tensor names
        names, missing = validate.key_sets(
            b, f, allow_missing=allow_missing, other_label="fine-tuned model"
        )
        validate.shapes(b, f, names)
        reference = b
    else:
        reference, missing = tvs[-1], []
        names = list(reference.tensors)
        if b is not None:
            validate.subset(reference, b, what="the task vector", whole_label="the base")
            validate.shapes(b, reference, names)
    names = [n for n in names if reference[n].is_float]
    t_ckpt = f or reference
    non_float = [n for n in t_ckpt.tensors if not t_ckpt[n].is_float]
    plan = _bind(adapter, b, reference, layouts) if adapter is not None else None
    other_tv = tvs[0] if len(tvs) == 2 else None
    if other_tv is not None:
        validate.subset(
            other_tv, reference, what=other_tv.reference, whole_label=reference.reference
        )
        validate.shapes(reference, other_tv, list(other_tv.tensors))
    sources = [_source(n, b, f, tvs[-1] if tvs else None, other_tv, plan) for n in names]

    def result(outcome: Outcome) -> CompareReport:
        ft_dtypes = Counter(_dtype(t_ckpt[n]) for n in names)
        base_dtypes = Counter(_dtype(b[n]) for n in names) if b else Counter()
        inputs = {
            "base": b.reference if b else None,
            "finetuned": f.reference if f else None,
            "adapter": adapter.reference if adapter is not None else None,
            "task_vectors": [t.reference for t in tvs],
            "finetuned_dtype": ft_dtypes.most_common(1)[0][0] if ft_dtypes and f else None,
            "base_dtype": base_dtypes.most_common(1)[0][0] if base_dtypes else None,
            "device": str(outcome.device),
            "seconds": round(outcome.seconds, 3),
            "bytes_read": outcome.bytes_read,
            "missing": missing,
            "non_float_skipped": non_float,
            **({"adapter_config": _adapter_summary(adapter)} if adapter is not None else {}),
        }
        mode = "task_vectors" if len(tvs) == 2 else ("adapter" if adapter is not None else "none")
        return CompareReport(
            inputs=inputs, tensors=[outcome.stats.results[n] for n in names], mode=mode
        )

    doubts = []
    for ckpt, flag in ((b, "--base"), (f, "--finetuned")):
        if ckpt is not None:
            doubts += validate.provenance(ckpt, expected="model", given_as=flag)
    for tv in tvs:
        doubts += validate.provenance(tv, expected="task vector", given_as="--task-vector")
    given = [c for c in (b, f, *tvs, adapter) if c is not None]
    tasks = [_task(s) for s in sources]
    return Job("compare", tasks, result, sources=given, doubts=doubts, splittable=True)


def _check_inputs(b, f, adapter, tvs) -> None:
    if f is not None and b is None:
        raise InputError("--finetuned needs --base", hint="T is finetuned - base")
    if f is not None and tvs:
        raise InputError("give either --finetuned (with --base) or --task-vector for T, not both")
    if f is None and not tvs:
        raise InputError(
            "nothing to compare",
            hint="give --base and --finetuned, or --task-vector (and --adapter or a second "
            "--task-vector)",
        )
    if len(tvs) > 2 or (len(tvs) == 2 and adapter is not None):
        raise InputError("compare takes an adapter and one task vector, or two task vectors")


def _bind(
    adapter: Adapter, b: Checkpoint | None, reference: Checkpoint, layouts
) -> dict[str, TensorMerge]:
    """The adapter's merges by base tensor name, bound as ``merge`` binds it."""
    plan = bind_all(
        [adapter], [1.0], b if b is not None else reference, layouts=layouts, stand_in=b is None
    )
    if b is None and any(m.needs_base for m in plan.merges.values()):
        raise InputError(
            "this adapter uses DoRA or trainable tokens: its delta depends on the base weights",
            hint="pass --base too",
        )
    # subtle: bound to the task vector, a saved full tensor (modules_to_save) would be
    # read as a replacement with no base to subtract, and L silently left at zero.
    saved = [k for k, m in plan.merges.items() if m.replacement is not None]
    if b is None and saved:
        raise InputError(
            f"this adapter saves full tensors (e.g. {saved[0]!r}): their delta is saved - base",
            hint="pass --base too",
        )
    return plan.by_base_name()


def _dtype(spec: TensorSpec) -> str:
    return str(spec.dtype).removeprefix("torch.")


def _adapter_summary(ad: Adapter) -> dict:
    info = {}
    for attr in ("r", "lora_alpha", "use_rslora", "use_dora"):
        value = getattr(ad.config, attr, None)
        if value is not None:
            info[attr] = value
    scalings = sorted({round(m.scaling, 12) for m in ad.modules})
    if scalings:
        info["scaling"] = scalings[0] if len(scalings) == 1 else scalings
    info["modules"] = len(ad.modules)
    return info


def _source(
    name: str,
    b: Checkpoint | None,
    f: Checkpoint | None,
    tv: Checkpoint | None,
    other_tv: Checkpoint | None,
    plan: dict[str, TensorMerge] | None,
) -> _Source:
    src = _Source(name)
    if b is not None:
        src.base = src.add(b[name])
    if f is not None:
        src.finetuned = src.add(f[name])
    if tv is not None:
        src.tv = src.add(tv[name])
    if other_tv is not None and name in other_tv:
        src.other_tv = src.add(other_tv[name])
    if plan is not None and name in plan:
        src.merge = plan[name]
        if src.merge.replacement is not None:
            src.replacement = src.add(src.merge.replacement)
    return src


def _merged_rows(rt, chunk: engine.Chunk, x, src: _Source, dtype: torch.dtype) -> torch.Tensor:
    """The rows ``stream-tv merge`` writes for this chunk (PEFT's merge), in the fine-tuned
    tensor's dtype: an fp32 base merged, then saved as bf16, is cast as ``.to()`` does."""
    w = x[src.replacement] if src.replacement is not None else x[src.base]
    out = torch.empty(
        (chunk.stop - chunk.start, *rt.tm.shape[1:]), dtype=rt.tm.dtype, device=w.device
    )
    out = rt.merge_rows(w, chunk.start, chunk.stop, out, precision="exact-peft")
    return out if out.dtype == dtype else out.to(dtype)


def _task(src: _Source) -> engine.Task:
    main = src.inputs[src.finetuned if src.finetuned is not None else src.tv]  # type: ignore[index]
    has_lora = src.merge is not None or src.other_tv is not None
    acc = TensorAccumulator(
        src.name,
        numel=main.numel,
        has_lora=has_lora,
        finetuned_dtype=main.dtype if src.finetuned is not None else None,
        base_dtype=src.inputs[src.base].dtype if src.base is not None else None,
    )
    merge = src.merge
    passes = merge.passes if merge is not None else 1
    # 16-bit inputs: their float32 difference is exact. Wider: float64.
    narrow = all(s.itemsize <= 2 for s in src.inputs)
    tv_dtype = torch.float64 if has_lora or not narrow else torch.float32

    def compute(chunk: engine.Chunk) -> None:
        x, rt = chunk.inputs, chunk.state
        base_rows = x[src.base] if src.base is not None else None
        if chunk.pass_index < passes - 1:
            rt.prepass(base_rows, chunk.start, chunk.stop)
            return None
        if src.finetuned is not None:
            ft_rows = x[src.finetuned]
            if not has_lora and ops.equal(ft_rows, base_rows):
                acc.update_zero(ft_rows)  # the common case: an untouched tensor
                return None
            if has_lora and ft_rows.device.type == "cpu":
                t = None  # the accumulator computes F - W block by block, in cache
            else:
                t = ops.subtract(
                    ft_rows,
                    base_rows,
                    out=torch.empty(ft_rows.shape, dtype=tv_dtype, device=ft_rows.device),
                )
        else:
            t = x[src.tv].to(tv_dtype, copy=True)
        lora = merged = None
        if src.other_tv is not None:
            lora = x[src.other_tv].to(torch.float64)
        elif rt is not None:
            lora = rt.delta_rows(
                chunk.start, chunk.stop, w_rows=base_rows, dtype=torch.float64, scratch="compare"
            )
            if src.replacement is not None and base_rows is not None:
                lora = lora + (x[src.replacement].double() - base_rows.double())
            if src.finetuned is not None and base_rows is not None:
                merged = _merged_rows(rt, chunk, x, src, x[src.finetuned].dtype)
        acc.update(
            tv=t,
            lora=lora,
            finetuned=x[src.finetuned] if src.finetuned is not None else None,
            base=base_rows,
            merged=merged,
        )
        return None

    row_bytes = sum(s.row_numel * s.itemsize for s in src.inputs)
    # float64 T, L, L - T and products; float32 merged rows and their delta
    work = main.row_numel * (8 * 4 + 4 * 3 if has_lora else 8)
    return engine.Task(
        src.name,
        src.inputs,
        compute,
        passes=passes,
        work_row_bytes=max(work, row_bytes),
        session=merge.open if merge is not None else None,
        finish=acc.result,
    )
