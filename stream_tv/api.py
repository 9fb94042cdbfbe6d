"""The Python API of the task-vector commands: ``inspect``, ``extract``, ``apply``.

Each function resolves its references, validates everything that headers can tell, builds
one :class:`~stream_tv.engine.Task` per tensor and hands them to :func:`write_checkpoint`,
which plans the shards, runs the engine and writes the index last. They return result
objects; they never print (the progress bar, on stderr, is the one exception).

>>> import stream_tv                                    # doctest: +SKIP
>>> r = stream_tv.extract_task_vector("base/", "finetuned/", "tv/")
>>> r.tensors, r.bytes_written, r.output
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, engine, ops
from .errors import DiskError, InputError, MismatchError
from .io.index import Checkpoint, TensorSpec, dtype_name
from .io.writer import (
    OutputPlan,
    OutTensor,
    ShardWriter,
    check_output_location,
    copy_side_files,
    format_size,
    parse_size,
)
from .refs import open_checkpoint

# Files copied from the base next to a written model so transformers loads it directly.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_MAX_SHARD = "5GB"


# ---- inspect ------------------------------------------------------------------------------


@dataclass
class InspectResult:
    reference: str
    files: list[Path]
    tensors: list[TensorSpec]
    total_bytes: int
    total_params: int
    metadata: dict

    def to_dict(self) -> dict:
        return {
            "reference": self.reference,
            "files": [str(f) for f in self.files],
            "total_bytes": self.total_bytes,
            "total_params": self.total_params,
            "dtypes": _count_dtypes(self.tensors),
            "tensors": [
                {
                    "name": s.name,
                    "dtype": s.dtype_str,
                    "shape": list(s.shape),
                    "bytes": s.nbytes,
                    "file": s.file.name,
                }
                for s in self.tensors
            ],
            "metadata": self.metadata,
        }


def _count_dtypes(specs: Sequence[TensorSpec]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in specs:
        d = out.setdefault(s.dtype_str, {"tensors": 0, "params": 0, "bytes": 0})
        d["tensors"] += 1
        d["params"] += s.numel
        d["bytes"] += s.nbytes
    return out


def inspect(reference: str | os.PathLike) -> InspectResult:
    """Tensors, dtypes, shapes, sizes and shards of a checkpoint, from headers only."""
    ckpt = open_checkpoint(reference)
    return InspectResult(
        ckpt.reference,
        ckpt.files,
        list(ckpt.tensors.values()),
        ckpt.total_bytes,
        ckpt.total_params,
        dict(ckpt.metadata),
    )


# ---- shared writing path ------------------------------------------------------------------


@dataclass
class WriteResult:
    """What a command that writes a checkpoint did."""

    output: Path
    tensors: int
    shards: int
    bytes_read: int
    bytes_written: int
    seconds: float
    resumed_shards: int = 0
    notes: list[str] = field(default_factory=list)  # things the user should know
    nonfinite: dict[str, int] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RunOptions:
    """Options every streaming command shares (the CLI's common options)."""

    device: str = "auto"
    chunk_size: int | str | None = None
    max_shard_size: int | str = DEFAULT_MAX_SHARD
    overwrite: bool = False
    progress: bool = True
    on_nonfinite: str = "error"
    restart: bool = False  # discard an unfinished run in the output directory, do not resume
    space_check: bool = True  # refuse up front when the output's file system lacks the space
    fsync: bool = False  # flush each shard to disk before renaming it (power-loss durability)

    def chunk_bytes(self) -> int:
        if self.chunk_size is None:
            return engine.default_chunk_bytes()
        try:
            return parse_size(self.chunk_size)
        except ValueError as e:
            raise InputError(str(e)) from e

    def shard_bytes(self) -> int:
        try:
            return parse_size(self.max_shard_size)
        except ValueError as e:
            raise InputError(str(e)) from e


def write_checkpoint(
    tasks: Sequence[engine.Task],
    out: str | os.PathLike,
    *,
    inputs: Sequence[Path],
    options: RunOptions,
    metadata: dict[str, object],
    description: str,
    side_files_from: Path | None = None,
    checks: Sequence[engine.Task] = (),
) -> WriteResult:
    """Plan shards for the tasks' outputs, run the engine, write the index last.

    ``checks`` are tasks that write nothing (e.g. equality of integer buffers); they run
    first, so a data-dependent refusal comes before any shard is written.
    """
    t0 = time.perf_counter()
    out_path = Path(out)
    check_output_location(out_path, inputs)
    device = engine.resolve_device(options.device)
    chunk = options.chunk_bytes()
    writing = [t for t in tasks if t.out is not None]
    plan = OutputPlan.build([t.out for t in writing], options.shard_bytes())
    fingerprint = plan.fingerprint(
        repr(sorted((k, str(v)) for k, v in metadata.items() if k != "stream_tv_version"))
        + _inputs_identity(inputs)
    )
    writer = ShardWriter(
        out_path,
        plan,
        fingerprint,
        overwrite=options.overwrite,
        resume=not options.restart,
        fsync=options.fsync,
    )
    stats_checks = engine.run(
        checks, device=device, chunk_bytes=chunk, progress=False, on_nonfinite="ignore"
    )
    writer.begin()
    resumed = len(writer.completed)
    try:
        if options.space_check:
            _check_free_space(out_path, plan, writer.completed)
        stats = engine.run(
            [*tasks],
            device=device,
            chunk_bytes=chunk,
            writer=writer,
            progress=options.progress,
            description=description,
            on_nonfinite=options.on_nonfinite,
        )
        copy_side_files(side_files_from, out_path, SIDE_FILES)
        meta = {k: v if isinstance(v, str) else _json_value(v) for k, v in metadata.items()}
        writer.finish(meta)
    except BaseException:
        writer.abort()
        raise
    return WriteResult(
        output=out_path,
        tensors=len(writing),
        shards=len(plan.shards),
        bytes_read=stats.bytes_read + stats_checks.bytes_read,
        bytes_written=stats.bytes_written,
        seconds=time.perf_counter() - t0,
        resumed_shards=resumed,
        nonfinite=stats.nonfinite,
    )


def _inputs_identity(inputs: Sequence[Path]) -> str:
    """Path, size and modification time of every input file, for the resume fingerprint: a
    rerun whose inputs were replaced (same names, other bytes) must not resume."""
    parts = []
    for p in inputs:
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file():
            parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(sorted(parts))


def _check_free_space(out: Path, plan: OutputPlan, completed: dict[int, int]) -> None:
    """Refuse before writing when the output's file system cannot hold the shards still to
    write (shards completed by an interrupted run are already there)."""
    needed = sum(s.size for i, s in enumerate(plan.shards) if i not in completed)
    free = shutil.disk_usage(out).free
    if needed > free:
        raise DiskError(
            f"not enough free space: the output needs {format_size(needed)}, "
            f"the file system has {format_size(free)} free",
            where=str(out),
            hint="free space or choose another output directory; --no-space-check writes anyway",
        )


def _json_value(v: object) -> object:
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (int, float, bool)) or v is None:
        return v
    return str(v)


def input_paths(*ckpts: Checkpoint) -> list[Path]:
    paths: list[Path] = []
    for c in ckpts:
        paths.extend(c.files)
        single_file = c.reference.endswith(".safetensors") and Path(c.reference).expanduser().is_file()
        if c.root is not None and not single_file:  # a file's directory is not an input
            paths.append(c.root)
    return paths


# ---- extract ------------------------------------------------------------------------------


@dataclass
class ExtractResult(WriteResult):
    unchanged: list[str] = field(default_factory=list)  # float tensors equal in both
    skipped: list[str] = field(default_factory=list)  # left out (--skip-unchanged)
    non_float: list[str] = field(default_factory=list)  # integer buffers, checked equal
    missing: list[str] = field(default_factory=list)  # in one model only (--allow-missing)
    dtype_mismatches: list[str] = field(default_factory=list)
    dtype: str = "F32"


def _key_sets(
    base: Checkpoint, other: Checkpoint, *, allow_missing: bool, other_label: str
) -> tuple[list[str], list[str]]:
    """Names to process (in base order) and names present in one model only.

    A non-float tensor (an integer buffer) that only the base has is reported, not an error:
    ``transformers`` does not save non-persistent buffers, so fine-tuned checkpoints often
    lack one their base has.
    """
    only_base = [n for n in base.tensors if n not in other]
    only_other = [n for n in other.tensors if n not in base]
    serious = [n for n in only_base if base[n].is_float] + only_other
    if serious and not allow_missing:
        parts = []
        fb = [n for n in only_base if base[n].is_float]
        if fb:
            parts.append(f"{len(fb)} float tensor(s) only in the base (e.g. {', '.join(fb[:3])})")
        if only_other:
            parts.append(
                f"{len(only_other)} only in the {other_label} (e.g. {', '.join(only_other[:3])})"
            )
        raise MismatchError(
            "the checkpoints do not have the same tensors: " + "; ".join(parts),
            where=f"{base.reference} vs {other.reference}",
            hint="pass --allow-missing to skip them (they are listed in the result)",
        )
    common = [n for n in base.tensors if n in other]
    return common, only_base + only_other


def _check_shapes(base: Checkpoint, other: Checkpoint, names: Sequence[str]) -> None:
    bad = [n for n in names if base[n].shape != other[n].shape]
    if bad:
        n = bad[0]
        raise MismatchError(
            f"shape mismatch for {len(bad)} tensor(s), e.g. {n!r}: "
            f"{list(base[n].shape)} in {base.reference} vs {list(other[n].shape)} in {other.reference}",
            hint="the two checkpoints are not the same architecture",
        )


def _equality_check(name: str, a: TensorSpec, b: TensorSpec, refs: tuple[str, str]) -> engine.Task:
    def compute(chunk: engine.Chunk) -> None:
        x, y = chunk.inputs
        if not ops.equal(x, y):
            raise MismatchError(
                f"non-float tensor {name!r} ({a.dtype_str}) differs between the checkpoints",
                where=f"{refs[0]} vs {refs[1]}",
                hint="integer buffers cannot be turned into a task vector; are these the same architecture?",
            )
        return None

    if a.dtype != b.dtype:
        raise MismatchError(
            f"non-float tensor {name!r} is {a.dtype_str} in one checkpoint and {b.dtype_str} in the other"
        )
    return engine.Task(name, [a, b], compute, min_rows=1)


def _unchanged_scan(
    base: Checkpoint, ft: Checkpoint, names: Sequence[str], options: RunOptions
) -> list[str]:
    """Names whose bytes are equal in both (a cheap scan: a differing tensor usually stops
    at its first chunk)."""
    equal_so_far: dict[str, bool] = {}

    def task(name: str) -> engine.Task:
        def compute(chunk: engine.Chunk) -> None:
            if equal_so_far.get(name, True):
                x, y = chunk.inputs
                equal_so_far[name] = x.dtype == y.dtype and ops.equal(x, y)

        return engine.Task(name, [base[name], ft[name]], compute, min_rows=1)

    engine.run(
        [task(n) for n in names],
        device=engine.resolve_device(options.device),
        chunk_bytes=options.chunk_bytes(),
        progress=options.progress,
        description="scanning",
    )
    return [n for n in names if equal_so_far.get(n, True)]


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
    options = options or RunOptions(on_nonfinite="warn")
    b, f = open_checkpoint(base), open_checkpoint(finetuned)
    names, missing = _key_sets(b, f, allow_missing=allow_missing, other_label="fine-tuned model")
    _check_shapes(b, f, names)
    float_names = [n for n in names if b[n].is_float and f[n].is_float]
    mixed = [n for n in names if b[n].is_float != f[n].is_float]
    if mixed:
        n = mixed[0]
        raise MismatchError(
            f"tensor {n!r} is {b[n].dtype_str} in the base and {f[n].dtype_str} in the fine-tuned model"
        )
    non_float = [n for n in names if not b[n].is_float]
    checks = [_equality_check(n, b[n], f[n], (b.reference, f.reference)) for n in non_float]
    dtype_mismatches = [n for n in float_names if b[n].dtype != f[n].dtype]

    skipped: list[str] = []
    if skip_unchanged:
        check_output_location(Path(out), input_paths(b, f))  # before the scan reads data
        skipped = _unchanged_scan(b, f, float_names, options)
        skipped_set = set(skipped)
        float_names = [n for n in float_names if n not in skipped_set]

    tasks = []
    out_dtypes = set()
    for n in float_names:
        tdtype = dtype or ops.difference_dtype(b[n].dtype, f[n].dtype)
        out_dtypes.add(dtype_name(tdtype))
        tasks.append(_subtract_task(n, b[n], f[n], tdtype))

    metadata: dict[str, object] = {
        "stream_tv_version": __version__,
        "operation": "extract",
        "base": b.reference,
        "finetuned": f.reference,
        "dtype": ",".join(sorted(out_dtypes)) or "none",
    }
    if skipped:
        metadata["skipped_unchanged"] = skipped
    if non_float:
        metadata["non_float_unchanged"] = non_float
    if missing:
        metadata["missing"] = missing
    result = write_checkpoint(
        tasks,
        out,
        inputs=input_paths(b, f),
        options=options,
        metadata=metadata,
        description="extract",
        side_files_from=b.root,
        checks=checks,
    )
    return ExtractResult(
        **vars(result),
        skipped=skipped,
        non_float=non_float,
        missing=missing,
        dtype_mismatches=dtype_mismatches,
        dtype=metadata["dtype"],  # type: ignore[arg-type]
    )


def _subtract_task(name: str, b: TensorSpec, f: TensorSpec, dtype: torch.dtype) -> engine.Task:
    work = ops.compute_dtype(dtype, b.dtype, f.dtype)
    work_row = b.row_numel * work.itemsize if work != dtype else 0

    def compute(chunk: engine.Chunk) -> torch.Tensor:
        base_rows, ft_rows = chunk.inputs
        return ops.subtract(ft_rows, base_rows, out=chunk.out)

    return engine.Task(
        name, [b, f], compute, out=OutTensor(name, dtype, b.shape), work_row_bytes=work_row
    )


# ---- apply --------------------------------------------------------------------------------


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
    options = options or RunOptions(on_nonfinite="error")
    if not task_vectors:
        raise InputError("no task vector given", hint="stream-tv apply BASE TV [TV ...] -o OUT")
    scales = list(scales) if scales else [1.0] * len(task_vectors)
    if len(scales) == 1 and len(task_vectors) > 1:
        scales = scales * len(task_vectors)
    if len(scales) != len(task_vectors):
        raise InputError(
            f"{len(scales)} scales for {len(task_vectors)} task vectors",
            hint="give one --scale per task vector, or one for all",
        )
    b = open_checkpoint(base)
    tvs = [open_checkpoint(t) for t in task_vectors]
    for tv in tvs:
        extra = [n for n in tv.tensors if n not in b]
        if extra:
            raise MismatchError(
                f"{len(extra)} tensor(s) of the task vector are not in the base (e.g. {', '.join(extra[:3])})",
                where=tv.reference,
                hint="was this task vector extracted from another base model?",
            )
        _check_shapes(b, tv, list(tv.tensors))
        bad = [n for n in tv.tensors if not tv[n].is_float or not b[n].is_float]
        if bad:
            raise MismatchError(
                f"tensor {bad[0]!r} is not floating point in the task vector or the base",
                where=tv.reference,
            )

    tasks = []
    untouched = []
    for n, spec in b.tensors.items():
        terms = [(tv[n], s) for tv, s in zip(tvs, scales, strict=True) if n in tv]
        if not terms:
            untouched.append(n)
        out_dtype = dtype if (dtype is not None and spec.is_float) else spec.dtype
        tasks.append(_apply_task(n, spec, terms, out_dtype))

    metadata = {
        "stream_tv_version": __version__,
        "operation": "apply",
        "base": b.reference,
        "task_vectors": [t.reference for t in tvs],
        "scales": scales,
    }
    result = write_checkpoint(
        tasks,
        out,
        inputs=input_paths(b, *tvs),
        options=options,
        metadata=metadata,
        description="apply",
        side_files_from=b.root,
    )
    return ApplyResult(**vars(result), scales=scales, untouched=untouched)


def _apply_task(
    name: str, base: TensorSpec, terms: Sequence[tuple[TensorSpec, float]], dtype: torch.dtype
) -> engine.Task:
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
    return engine.Task(name, specs, compute, out=OutTensor(name, dtype, base.shape), work_row_bytes=work)
