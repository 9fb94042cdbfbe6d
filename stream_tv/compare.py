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
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import engine, ops
from .api import RunOptions, _check_shapes, _key_sets
from .errors import InputError
from .io.index import Checkpoint, TensorSpec
from .refs import open_checkpoint
from .report import CompareReport
from .stats import TensorAccumulator


@dataclass
class _Source:
    """Where one tensor's T and L come from."""

    name: str
    inputs: list[TensorSpec]
    base: int | None = None  # index into inputs of the base rows
    finetuned: int | None = None
    tv: int | None = None
    other_tv: int | None = None  # L from a second task vector
    merge: object | None = None  # L from an adapter (a lora TensorMerge)
    replacement: int | None = None  # a full tensor saved in the adapter


def compare(
    *,
    base: str | os.PathLike | None = None,
    finetuned: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    task_vectors: Sequence[str | os.PathLike] = (),
    allow_missing: bool = False,
    options: RunOptions | None = None,
) -> CompareReport:
    """Compare a LoRA delta (or a task vector) with a task vector, tensor by tensor.

    Inputs, one of:
      - ``base`` + ``finetuned`` + ``adapter``: L from the adapter, T = finetuned - base;
      - ``task_vectors=[tv]`` + ``adapter`` (``base`` too for DoRA adapters);
      - ``task_vectors=[a, b]``: L = a, T = b;
      - ``base`` + ``finetuned`` alone: coverage of what changed (no L).
    """
    options = options or RunOptions(on_nonfinite="warn")
    t0 = time.perf_counter()
    b = open_checkpoint(base) if base is not None else None
    f = open_checkpoint(finetuned) if finetuned is not None else None
    tvs = [open_checkpoint(t) for t in task_vectors]
    if f is not None and b is None:
        raise InputError("--finetuned needs --base", hint="T is finetuned - base")
    if f is not None and tvs:
        raise InputError("give either --finetuned (with --base) or --task-vector for T, not both")
    if f is None and not tvs:
        raise InputError(
            "nothing to compare",
            hint="give --base and --finetuned, or --task-vector (and --adapter or a second --task-vector)",
        )
    if len(tvs) > 2 or (len(tvs) == 2 and adapter is not None):
        raise InputError("compare takes an adapter and one task vector, or two task vectors")

    # T's checkpoint(s) decide the tensor names.
    if f is not None:
        assert b is not None
        names, missing = _key_sets(
            b, f, allow_missing=allow_missing, other_label="fine-tuned model"
        )
        _check_shapes(b, f, names)
        reference = b
    else:
        t_ckpt = tvs[-1]
        names, missing = list(t_ckpt.tensors), []
        reference = t_ckpt
        if b is not None:
            extra = [n for n in names if n not in b]
            if extra:
                raise InputError(
                    f"{len(extra)} tensor(s) of the task vector are not in the base "
                    f"(e.g. {', '.join(extra[:3])})"
                )
            _check_shapes(b, t_ckpt, names)
    names = [n for n in names if reference[n].is_float]
    non_float = [n for n in (f or reference).tensors if not (f or reference)[n].is_float]

    plan = None
    adapter_info: dict = {}
    if adapter is not None:
        from .lora import Adapter

        ad = Adapter.load(adapter)
        bind_to = b if b is not None else reference
        plan = ad.bind(bind_to)
        adapter_info = _adapter_summary(ad)
        if b is None and any(getattr(m, "needs_base", False) for m in plan.merges.values()):
            raise InputError(
                "this adapter uses DoRA: its delta depends on the base weights",
                hint="pass --base too",
            )
        # subtle: bound to the task vector, a saved full tensor (modules_to_save) would be
        # read as a replacement with no base to subtract, and L silently left at zero.
        saved = [k for k, m in plan.merges.items() if getattr(m, "replacement", None) is not None]
        if b is None and saved:
            raise InputError(
                f"this adapter saves full tensors (e.g. {saved[0]!r}): their delta is saved - base",
                hint="pass --base too",
            )
    other_tv = tvs[0] if len(tvs) == 2 else None
    if other_tv is not None:
        extra = [n for n in other_tv.tensors if n not in reference]
        if extra:
            raise InputError(
                f"{len(extra)} tensor(s) of {other_tv.reference} are not in {reference.reference} "
                f"(e.g. {', '.join(extra[:3])})"
            )
        _check_shapes(reference, other_tv, list(other_tv.tensors))

    sources = [_source(n, b, f, tvs[-1] if tvs else None, other_tv, plan) for n in names]
    tasks = [_task(s) for s in sources]
    device = engine.resolve_device(options.device)
    stats = engine.run(
        tasks,
        device=device,
        chunk_bytes=options.chunk_bytes(),
        progress=options.progress,
        description="compare",
    )
    results = [stats.results[n] for n in names]
    ft_dtypes = Counter(str((f or reference)[n].dtype).removeprefix("torch.") for n in names)
    base_dtypes = Counter(str(b[n].dtype).removeprefix("torch.") for n in names) if b else Counter()
    inputs = {
        "base": b.reference if b else None,
        "finetuned": f.reference if f else None,
        "adapter": os.fspath(adapter) if adapter is not None else None,
        "task_vectors": [t.reference for t in tvs],
        "finetuned_dtype": ft_dtypes.most_common(1)[0][0] if ft_dtypes and f else None,
        "base_dtype": base_dtypes.most_common(1)[0][0] if base_dtypes else None,
        "device": str(device),
        "seconds": round(time.perf_counter() - t0, 3),
        "bytes_read": stats.bytes_read,
        "missing": missing,
        "non_float_skipped": non_float,
        **({"adapter_config": adapter_info} if adapter_info else {}),
    }
    mode = "task_vectors" if len(tvs) == 2 else ("adapter" if adapter is not None else "none")
    return CompareReport(inputs=inputs, tensors=results, mode=mode)


def _adapter_summary(ad) -> dict:
    info = {}
    for attr in ("r", "lora_alpha", "use_rslora", "use_dora"):
        value = getattr(ad.config, attr, None)
        if value is not None:
            info[attr] = value
    scalings = sorted(
        {round(m.scaling, 12) for m in ad.modules if getattr(m, "scaling", None) is not None}
    )
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
    plan,
) -> _Source:
    src = _Source(name, [])

    def add(spec: TensorSpec) -> int:
        src.inputs.append(spec)
        return len(src.inputs) - 1

    if b is not None:
        src.base = add(b[name])
    if f is not None:
        src.finetuned = add(f[name])
    if tv is not None:
        src.tv = add(tv[name])
    if other_tv is not None and name in other_tv:
        src.other_tv = add(other_tv[name])
    if plan is not None and name in plan.merges:
        src.merge = plan.merges[name]
        replacement = getattr(src.merge, "replacement", None)
        if replacement is not None:
            src.replacement = add(replacement)
    return src


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
    passes = getattr(merge, "passes", 1) if merge is not None else 1
    # 16-bit inputs: their float32 difference is exact. Wider: float64.
    narrow = all(s.itemsize <= 2 for s in src.inputs)
    tv_dtype = torch.float64 if has_lora or not narrow else torch.float32

    lora_free = not has_lora

    def start(device: torch.device) -> None:
        if merge is not None:
            merge.load(device)

    def compute(chunk: engine.Chunk) -> None:
        x = chunk.inputs
        base_rows = x[src.base] if src.base is not None else None
        if chunk.pass_index < passes - 1:
            merge.prepass(base_rows, chunk.start, chunk.stop)
            return None
        if src.finetuned is not None:
            ft_rows = x[src.finetuned]
            if lora_free and ft_rows.dtype == base_rows.dtype and ops.equal(ft_rows, base_rows):
                acc.update_zero(ft_rows)  # the common case: an untouched tensor
                return None
            t = ops.subtract(
                ft_rows,
                base_rows,
                out=torch.empty(ft_rows.shape, dtype=tv_dtype, device=ft_rows.device),
            )
        else:
            t = x[src.tv].to(tv_dtype, copy=True)
        lora = None
        if src.other_tv is not None:
            lora = x[src.other_tv].to(torch.float64)
        elif merge is not None:
            lora = merge.delta_rows(chunk.start, chunk.stop, w_rows=base_rows, dtype=torch.float64)
            if src.replacement is not None and base_rows is not None:
                lora = lora + (x[src.replacement].double() - base_rows.double())
        acc.update(
            tv=t,
            lora=lora,
            finetuned=x[src.finetuned] if src.finetuned is not None else None,
            base=base_rows,
        )
        return None

    def finish():
        if merge is not None:
            merge.unload()
        return acc.result()

    row_bytes = sum(s.row_numel * s.itemsize for s in src.inputs)
    work = main.row_numel * (8 * 4 if has_lora else 8)  # float64 T, L, L-T and products
    return engine.Task(
        src.name,
        src.inputs,
        compute,
        passes=passes,
        work_row_bytes=max(work, row_bytes),
        start=start,
        finish=finish,
    )
