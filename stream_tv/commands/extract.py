"""``extract``: the task vector ``finetuned - base``, tensor by tensor.

>>> import tempfile, torch
>>> from safetensors.torch import save_file
>>> d = Path(tempfile.mkdtemp())
>>> save_file({"w": torch.ones(2, 3)}, d / "base.safetensors")
>>> save_file({"w": torch.full((2, 3), 1.25)}, d / "ft.safetensors")
>>> r = extract_task_vector(
...     d / "base.safetensors", d / "ft.safetensors", d / "tv", options=RunOptions(progress=False)
... )
>>> r.tensors, r.shards, r.dtype, r.bytes_written
(1, 1, 'F32', 24)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import engine, ops, validate
from ..errors import MismatchError
from ..io.index import BASE_CONFIG_NAME, Checkpoint, TensorSpec, dtype_name
from ..io.writer import OutTensor
from ..jobs import Job, Outcome, Output, WriteResult, check_output, run_job, written
from ..options import RunOptions
from ..refs import open_checkpoint


@dataclass
class ExtractResult(WriteResult):
    skipped: list[str] = field(default_factory=list)  # left out (--skip-unchanged)
    non_float: list[str] = field(default_factory=list)  # integer buffers, checked equal
    missing: list[str] = field(default_factory=list)  # in one model only (--allow-missing)
    dtype_mismatches: list[str] = field(default_factory=list)
    dtype: str = "F32"


def extract_task_vector(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    skip_unchanged: bool = False,
    allow_missing: bool = False,
    options: RunOptions | None = None,
) -> ExtractResult:
    """Write the task vector ``finetuned - base`` as a sharded safetensors checkpoint.

    Every float tensor is written, each element the correctly rounded difference in
    ``dtype`` (default float32, float64 for float64 inputs). Non-float tensors (integer
    buffers) are checked equal and not written. ``skip_unchanged`` leaves out tensors whose
    bytes are equal in both models (listed in the index metadata).
    """
    options = options or RunOptions()
    b, f = open_checkpoint(base), open_checkpoint(finetuned)
    skip: list[str] = []
    if skip_unchanged:
        names, _ = validate.key_sets(
            b, f, allow_missing=allow_missing, other_label="fine-tuned model"
        )
        scan = plan_unchanged_scan(b, f, _float_names(b, f, names))
        check_output(Path(out), scan.inputs)  # before the scan reads any data
        skip = run_job(scan, options)
    job = plan_extract(b, f, Path(out), dtype=dtype, allow_missing=allow_missing, skip=skip)
    return run_job(job, options)


def _float_names(b: Checkpoint, f: Checkpoint, names: Sequence[str]) -> list[str]:
    return [n for n in names if b[n].is_float and f[n].is_float]


def plan_extract(
    b: Checkpoint,
    f: Checkpoint,
    out: Path,
    *,
    dtype: torch.dtype | None = None,
    allow_missing: bool = False,
    skip: Sequence[str] = (),
) -> Job[ExtractResult]:
    """The job writing ``f - b``; ``skip``: float tensors left out (found unchanged)."""
    names, missing = validate.key_sets(
        b, f, allow_missing=allow_missing, other_label="fine-tuned model"
    )
    validate.shapes(b, f, names)
    validate.same_kind(b, f, names)
    all_float = _float_names(b, f, names)
    skipped = set(skip)
    float_names = [n for n in all_float if n not in skipped]
    non_float = [n for n in names if not b[n].is_float]
    checks = [equality_check(n, b[n], f[n], (b.reference, f.reference)) for n in non_float]
    tasks = [
        _subtract_task(n, b[n], f[n], dtype or ops.difference_dtype(b[n].dtype, f[n].dtype))
        for n in float_names
    ]
    out_dtypes = ",".join(sorted({dtype_name(t.out.dtype) for t in tasks})) or "none"
    provenance: dict[str, object] = {
        "base": b.reference,
        "finetuned": f.reference,
        "dtype": out_dtypes,
    }
    if skip:
        provenance["skipped_unchanged"] = list(skip)
    if non_float:
        provenance["non_float_unchanged"] = non_float
    if missing:
        provenance["missing"] = missing

    def result(outcome: Outcome) -> ExtractResult:
        return ExtractResult(
            **written(outcome),
            skipped=list(skip),
            non_float=non_float,
            missing=missing,
            dtype_mismatches=[n for n in all_float if b[n].dtype != f[n].dtype],
            dtype=out_dtypes,
        )

    # No config.json: a task vector must never load as a model (transformers would); the
    # base's config is kept as base_config.json, for binding an adapter to the task vector.
    why_empty = "the two checkpoints share no float tensor to subtract"
    if skip:
        why_empty = "every float tensor is unchanged (--skip-unchanged left them all out)"
    elif missing:
        why_empty += f" (--allow-missing left out {len(missing)}): are they the same model?"
    return Job(
        "extract",
        tasks,
        result,
        sources=[b, f],
        checks=checks,
        output=Output(
            out,
            "extract",
            provenance,
            side_files_from=b.root,
            side_files={"config.json": BASE_CONFIG_NAME},
            empty_hint=why_empty,
        ),
        doubts=[
            *validate.provenance(b, expected="model", given_as="BASE"),
            *validate.provenance(f, expected="model", given_as="FINETUNED"),
        ],
    )


def plan_unchanged_scan(b: Checkpoint, f: Checkpoint, names: Sequence[str]) -> Job[list[str]]:
    """The job finding which of ``names`` have equal bytes in both (a cheap scan: a
    differing tensor usually stops mattering at its first chunk)."""
    equal_so_far: dict[str, bool] = {}

    def task(name: str) -> engine.Task:
        def compute(chunk: engine.Chunk) -> None:
            if equal_so_far.get(name, True):
                x, y = chunk.inputs
                equal_so_far[name] = ops.equal(x, y)

        return engine.Task(name, [b[name], f[name]], compute, min_rows=1)

    return Job(
        "scan",
        [task(n) for n in names],
        lambda _: [n for n in names if equal_so_far.get(n, True)],
        sources=[b, f],
        description="scanning",
    )


def equality_check(name: str, a: TensorSpec, b: TensorSpec, refs: tuple[str, str]) -> engine.Task:
    """The check that non-float tensor ``name`` holds the same bytes in both checkpoints."""
    if a.dtype != b.dtype:
        raise MismatchError(
            f"non-float tensor {name!r} is {a.dtype_str} in one checkpoint and {b.dtype_str} in the other"
        )

    def compute(chunk: engine.Chunk) -> None:
        x, y = chunk.inputs
        if not ops.equal(x, y):
            raise MismatchError(
                f"non-float tensor {name!r} ({a.dtype_str}) differs between the checkpoints",
                where=f"{refs[0]} vs {refs[1]}",
                hint="integer buffers cannot be turned into a task vector; are these the same "
                "architecture?",
            )

    return engine.Task(name, [a, b], compute, min_rows=1)


def _subtract_task(name: str, b: TensorSpec, f: TensorSpec, dtype: torch.dtype) -> engine.Task:
    work = ops.compute_dtype(dtype, b.dtype, f.dtype)
    work_row = b.row_numel * work.itemsize if work != dtype else 0

    def compute(chunk: engine.Chunk) -> torch.Tensor:
        base_rows, ft_rows = chunk.inputs
        return ops.subtract(ft_rows, base_rows, out=chunk.out)

    return engine.Task(
        name, [b, f], compute, out=OutTensor(name, dtype, b.shape), work_row_bytes=work_row
    )
