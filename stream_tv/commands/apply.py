"""``apply``: ``base + sum(scale_i * tv_i)``, rounded once to the base's dtype.

>>> import tempfile
>>> from safetensors.torch import load_file, save_file
>>> d = Path(tempfile.mkdtemp())
>>> save_file({"w": torch.ones(2, 2, dtype=torch.bfloat16)}, d / "base.safetensors")
>>> save_file({"w": torch.full((2, 2), 0.5)}, d / "tv.safetensors")
>>> r = apply_task_vectors(d / "base.safetensors", [d / "tv.safetensors"], d / "out",
...                        scales=[-1.0], options=RunOptions(progress=False))
>>> load_file(d / "out" / "model-00001-of-00001.safetensors")["w"].tolist()
[[0.5, 0.5], [0.5, 0.5]]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import engine, ops, validate
from ..errors import InputError
from ..io.index import MAX_INDEX_BYTES, Checkpoint, TensorSpec, read_json
from ..io.writer import OutTensor
from ..jobs import Job, Outcome, Output, WriteResult, run_job, written
from ..options import RunOptions
from ..refs import open_checkpoint


@dataclass
class ApplyResult(WriteResult):
    scales: list[float] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)  # base tensors no task vector has


def apply_task_vectors(
    base: str | os.PathLike,
    task_vectors: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    scales: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    options: RunOptions | None = None,
) -> ApplyResult:
    """Write ``base + sum(scale_i * tv_i)``: float32 arithmetic, rounded once to the base's
    dtype (or ``dtype``). A tensor missing from a task vector counts as zero; non-float base
    tensors are copied. The output is a model directory (config and tokenizer copied)."""
    if not task_vectors:
        raise InputError("no task vector given", hint="stream-tv apply BASE TV [TV ...] -o OUT")
    b = open_checkpoint(base)
    tvs = [open_checkpoint(t) for t in task_vectors]
    return run_job(
        plan_apply(b, tvs, Path(out), scales=scales, dtype=dtype), options or RunOptions()
    )


def plan_apply(
    b: Checkpoint,
    tvs: Sequence[Checkpoint],
    out: Path,
    *,
    scales: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
) -> Job[ApplyResult]:
    """The job writing ``b + sum(scale_i * tv_i)``."""
    scales = validate.broadcast(scales, len(tvs), "scale", "task vector")
    for tv in tvs:
        validate.subset(
            tv,
            b,
            what="the task vector",
            whole_label="the base",
            hint="was this task vector extracted from another base model?",
        )
        validate.shapes(b, tv, list(tv.tensors))
        validate.floats(tv, list(tv.tensors), also=b)
    tasks = []
    untouched = []
    for n, spec in b.tensors.items():
        terms = [(tv[n], s) for tv, s in zip(tvs, scales, strict=True) if n in tv]
        if not terms:
            untouched.append(n)
        out_dtype = dtype if (dtype is not None and spec.is_float) else spec.dtype
        tasks.append(apply_task(n, spec, terms, out_dtype))
    provenance = {
        "base": b.reference,
        "task_vectors": [t.reference for t in tvs],
        "scales": scales,
    }

    def result(outcome: Outcome) -> ApplyResult:
        return ApplyResult(**written(outcome), scales=scales, untouched=untouched)

    doubts = validate.provenance(b, expected="model", given_as="BASE")
    for i, tv in enumerate(tvs):
        doubts += validate.provenance(tv, expected="task vector", given_as=f"TV {i + 1}")
    return Job(
        "apply",
        tasks,
        result,
        sources=[b, *tvs],
        output=Output(
            out,
            "apply",
            provenance,
            side_files_from=b.root,
            config_updates=_dtype_updates(b, dtype),
        ),
        doubts=doubts,
    )


def _dtype_updates(b: Checkpoint, dtype: torch.dtype | None) -> dict[str, object]:
    """With ``--dtype``, the copied config.json says the dtype written (else
    ``from_pretrained(dtype="auto")`` would load float32 weights as the base's bfloat16)."""
    path = b.root / "config.json" if b.root is not None else None
    if dtype is None or path is None or not path.is_file():
        return {}
    config, _ = read_json(path, what="config.json", limit=MAX_INDEX_BYTES)
    keys = [k for k in ("dtype", "torch_dtype") if isinstance(config, dict) and k in config]
    return dict.fromkeys(keys, str(dtype).removeprefix("torch."))


def apply_task(
    name: str, base: TensorSpec, terms: Sequence[tuple[TensorSpec, float]], dtype: torch.dtype
) -> engine.Task:
    """The task writing ``base + sum(scale * tv)`` for one tensor (a copy when no terms)."""
    specs = [base, *(t for t, _ in terms)]
    factors = [s for _, s in terms]
    compute: Callable[[engine.Chunk], torch.Tensor]
    if not terms:

        def compute(chunk: engine.Chunk) -> torch.Tensor:
            return chunk.out.copy_(ops.round_to(chunk.inputs[0], chunk.out.dtype))

        work = 0
    else:

        def compute(chunk: engine.Chunk) -> torch.Tensor:
            base_rows, *tv_rows = chunk.inputs
            return ops.add_scaled(
                base_rows, list(zip(tv_rows, factors, strict=True)), out=chunk.out
            )

        work = base.row_numel * 4 if dtype.itemsize < 4 else 0
    return engine.Task(
        name, specs, compute, out=OutTensor(name, dtype, base.shape), work_row_bytes=work
    )
