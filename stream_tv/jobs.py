"""The job driver: what every command plugs into, and the one place that runs the engine.

A command is a *planner*: a pure function over headers (checkpoints, adapters) that
returns a :class:`Job`, and that reads no tensor data. The job says

- ``tasks``: one :class:`~stream_tv.engine.Task` per output tensor (or tensor to analyse);
- ``checks``: tasks that write nothing and run first (e.g. integer buffers must be equal),
  so a refusal that depends on data comes before any output file exists;
- ``sources``: the input checkpoints and adapters (never written; their identity keys a
  resume);
- ``output``: where the tasks' outputs go, with the provenance recorded in the index, the
  side files to copy and the ``config.json`` values to change in the copy (``merge``:
  ``tie_word_embeddings`` where PEFT unties a head);
- ``files``: instead of ``output``, files the job assembles itself (:class:`FileOutput`:
  ``extract-lora``'s adapter directory), checked against the inputs the same way, begun
  before the run, fed as the engine's sink, finished after it or aborted;
- ``doubts``: what our own index records about an input that says it is the wrong kind
  (a model given as a task vector, an adapter merged twice): refused unless ``--force``;
- ``command``: its name, which sets its NaN/Inf default (``options.NONFINITE_DEFAULTS``);
- ``result``: how to turn the :class:`Outcome` into the command's result object.

:func:`run_job` runs it: device and chunk budget, output location check, checks, writer
begin (resume/overwrite), free-space check, the engine, side files, index last. It also
decides, once per run, whether the reader drops behind it (``--page-cache``,
:func:`stream_tv.io.pagecache.drops_behind`).
:func:`execute` is the same with an optional sink in place of the writer, which is how
``verify`` replays a command's own plan against an output it wrote. Adding a command means
writing a planner (see ``stream_tv/commands/``) and a CLI entry; nothing here changes.

For example (the whole of ``stream_tv.extract_task_vector``, less ``--skip-unchanged``)::

    b, f = open_checkpoint("base/"), open_checkpoint("finetuned/")
    result = run_job(plan_extract(b, f, Path("tv/")), RunOptions())
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch

from . import __version__, engine
from .engine import RunStats, Sink, Task
from .errors import DiskError, InputError, InternalError, Interrupted, MismatchError
from .io.index import BASE_CONFIG_NAME, Checkpoint, FileIdentity, identity_of  # noqa: F401
from .io.outdir import OutputDir
from .io.pagecache import drops_behind
from .io.writer import (
    OutputPlan,
    ShardWriter,
    check_output_location,
    copy_side_files,
)
from .jsonutil import json_safe
from .options import RunOptions
from .units import format_size

R = TypeVar("R")
CONFIG_NAME = "config.json"

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
    "chat_template.json",
    "*.jinja",  # chat templates (chat_template.jinja and others)
)


@dataclass(frozen=True)
class Output:
    """Where a job writes a checkpoint, and what the index records about it."""

    path: Path
    operation: str  # recorded as metadata["operation"]; verify re-plans from it
    provenance: dict[str, object]  # the rest of the index metadata (inputs, options)
    side_files_from: Path | None = None  # config/tokenizer files copied next to the shards
    empty_hint: str = "check the inputs"  # why an output could hold no tensor, and the fix
    side_files: Mapping[str, str] | None = None  # {source: written name}; None: SIDE_FILES
    config_updates: Mapping[str, object] = field(default_factory=dict)  # set in config.json

    @property
    def metadata(self) -> dict[str, object]:
        return {"stream_tv_version": __version__, "operation": self.operation, **self.provenance}


@dataclass
class Outcome:
    """What running a job did, for its result builder."""

    stats: RunStats  # the main run: task results, NaN/Inf counts
    bytes_read: int  # checks and main run
    seconds: float
    device: torch.device
    output: Path | None = None
    tensors_written: int = 0  # output tensors planned (resumed ones included)
    shards: int = 0
    resumed_shards: int = 0


class FileOutput(Sink, Protocol):
    """Output files a job writes itself (not a sharded checkpoint): a sink for the tasks'
    output rows, opened before the run and finished from its statistics."""

    path: Path

    def begin(self, options: RunOptions) -> None:
        """Check and prepare the location (before any tensor data is read)."""

    def finish(self, stats: RunStats) -> None:
        """Write the files from what the run produced."""


@dataclass
class Job(Generic[R]):
    """A command's plan: tasks, checks, output, and how to build its result."""

    command: str
    tasks: list[Task]
    result: Callable[[Outcome], R]
    sources: Sequence[Any] = ()  # the input checkpoints and adapters: never written
    checks: list[Task] = field(default_factory=list)
    output: Output | None = None
    doubts: list[InputError] = field(default_factory=list)  # refused unless options.force
    description: str | None = None  # progress-bar label (default: the command)
    files: FileOutput | None = None  # files the job writes itself, instead of ``output``
    # Writes nothing and keeps no state but its tasks' finish() results: on CPU its tasks may
    # run in worker processes (stream_tv/workers.py, RunOptions.workers).
    splittable: bool = False

    @property
    def inputs(self) -> list[Path]:
        """Every input file and directory (output locations must not overlap them)."""
        return [p for src in self.sources for p in _paths_of(src)]

    @property
    def identity(self) -> str:
        """Every input file as it was indexed (path, size, mtime, header sha256): a resume
        whose inputs changed, even with size and mtime kept, is refused."""
        return identity_of(s for src in self.sources for s in _sources_of(src))


def run_job(job: Job[R], options: RunOptions) -> R:
    """Run a planned job and return the command's result."""
    return job.result(execute(job, options))


def execute(job: Job[Any], options: RunOptions, *, sink: Sink | None = None) -> Outcome:
    """Run a job's checks and tasks; write its output, or hand the bytes to ``sink``.

    With a ``sink`` (verify), nothing is written and the output location is not used.
    """
    t0 = time.perf_counter()
    device = engine.resolve_device(options.device)
    chunk = options.chunk_bytes or engine.default_chunk_bytes()
    on_nonfinite = options.nonfinite_for(job.command)
    drop_behind = drops_behind(options.page_cache, _footprint(job))

    def stream(tasks: Sequence[Task], into: Sink | None, **kw: Any) -> RunStats:
        return engine.run(
            tasks,
            device=device,
            chunk_bytes=chunk,
            sink=into,
            tune_malloc=options.tune_malloc,
            drop_behind=drop_behind,
            **kw,
        )

    if job.doubts and not options.force:
        raise job.doubts[0]
    writes = job.output is not None and sink is None
    files = job.files if sink is None else None
    for out in (job.output.path if writes else None, files.path if files else None):
        if out is not None:
            check_output(out, job.inputs)
    checked = stream(job.checks, None, progress=False) if job.checks else RunStats()
    label = job.description or job.command
    written: dict[str, Any] = {}
    if writes:
        stats, written = _write(job, options, on_nonfinite, stream, label, drop_behind)
    elif files is not None:
        stats = _write_files(job, files, options, on_nonfinite, stream, label)
        written = {"output": files.path}
    elif job.splittable and sink is None:
        stats = _split(job, options, stream, device, chunk, label, on_nonfinite)
    else:
        stats = stream(
            job.tasks, sink, progress=options.progress, description=label, on_nonfinite=on_nonfinite
        )
    return Outcome(
        stats,
        bytes_read=stats.bytes_read + checked.bytes_read,
        seconds=time.perf_counter() - t0,
        device=device,
        **written,
    )


def _split(
    job: Job[Any], options: RunOptions, stream, device, chunk: int, label: str, on_nonfinite: str
) -> RunStats:
    """A splittable job's tasks, in as many worker processes as
    :func:`stream_tv.workers.worker_count` gives (one: in this process, as any job)."""
    from . import workers

    count = workers.worker_count(options.workers, job.tasks, chunk, device)
    if count == 1:
        return stream(
            job.tasks, None, progress=options.progress, description=label, on_nonfinite=on_nonfinite
        )
    return workers.run_split(
        job.tasks,
        count,
        lambda tasks, bar: stream(tasks, None, progress=bar, on_nonfinite=on_nonfinite),
        progress=options.progress,
        description=label,
    )


def _footprint(job: Job[Any]) -> int:
    """Bytes a run brings into the page cache: each input tensor once, and the output."""
    read = {(s.file, s.start): s.nbytes for t in (*job.checks, *job.tasks) for s in t.inputs}
    return sum(read.values()) + sum(t.out.nbytes for t in job.tasks if t.out is not None)


def check_output(path: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output location that overlaps an input (before any data is read)."""
    check_output_location(path, inputs)


def _write(
    job: Job[Any],
    options: RunOptions,
    on_nonfinite: str,
    stream,
    label: str,
    drop_behind: bool,
) -> tuple[RunStats, dict[str, Any]]:
    out = job.output
    assert out is not None
    writing = [t for t in job.tasks if t.out is not None]
    if not writing:
        raise MismatchError(
            "nothing to write: the output would hold no tensor",
            where=str(out.path),
            hint=out.empty_hint,
        )
    plan = OutputPlan.build([t.out for t in writing], options.shard_bytes)
    metadata = out.metadata
    fingerprint = plan.fingerprint(
        repr(sorted((k, str(v)) for k, v in metadata.items() if k != "stream_tv_version"))
        + f"\non_nonfinite={on_nonfinite}\n"
        + job.identity
    )
    writer = ShardWriter(
        out.path,
        plan,
        fingerprint,
        overwrite=options.overwrite,
        resume=not options.restart,
        fsync=options.fsync,
        drop_behind=drop_behind,
    )
    writer.begin()
    resumed = len(writer.completed)
    try:
        if options.space_check:
            _check_free_space(out.path, plan, writer.completed)
        todo = [t for t in job.tasks if t.out is None or not writer.is_complete(t.out.name)]
        stats = stream(
            todo, writer, progress=options.progress, description=label, on_nonfinite=on_nonfinite
        )
        copy_side_files(out.side_files_from, out.path, out.side_files or SIDE_FILES)
        if out.config_updates:
            update_config(out.path, out.config_updates)
        writer.finish(json_safe(metadata))
    except Interrupted as e:
        writer.abort()
        raise Interrupted(
            f"interrupted; {len(writer.completed)} of {len(plan.shards)} shard(s) "
            "complete and kept",
            where=str(out.path),
            hint="rerun the same command to resume from there, or add --restart to start over",
        ) from e
    except BaseException:
        writer.abort()
        raise
    return stats, {
        "output": out.path,
        "tensors_written": len(writing),
        "shards": len(plan.shards),
        "resumed_shards": resumed,
    }


def _write_files(
    job: Job[Any], files: FileOutput, options: RunOptions, on_nonfinite: str, stream, label: str
) -> RunStats:
    files.begin(options)
    try:
        stats = stream(
            job.tasks,
            files,
            progress=options.progress,
            description=label,
            on_nonfinite=on_nonfinite,
        )
        files.finish(stats)
    except Interrupted as e:
        files.abort()
        raise Interrupted(
            "interrupted; nothing was written",
            where=str(files.path),
            hint="rerun the same command: it starts over",
        ) from e
    except BaseException:
        files.abort()
        raise
    return stats


def update_config(out: Path, updates: Mapping[str, object]) -> None:
    """Set top-level values in the copied ``config.json`` (keys kept in order), atomically
    and never through a link (:class:`~stream_tv.io.outdir.OutputDir`)."""
    path = out / "config.json"
    if not path.is_file():
        raise InternalError(f"{path}: config updates {dict(updates)} but no config.json was copied")
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(updates)
    OutputDir(out).atomic_write("config.json", (json.dumps(data, indent=2) + "\n").encode())


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


def _paths_of(src: Any) -> list[Path]:
    """A checkpoint's files and directory, or an adapter's files and directory."""
    if isinstance(src, Checkpoint):
        paths = list(src.files)
        single_file = (
            src.reference.endswith(".safetensors") and Path(src.reference).expanduser().is_file()
        )
        if src.root is not None and not single_file:  # a file's directory is not an input
            paths.append(src.root)
        return paths
    return [src.weights_file, src.path / "adapter_config.json", src.path]  # an Adapter


def _sources_of(src: Any) -> list[FileIdentity]:
    if isinstance(src, Checkpoint):
        return list(src.sources.values())
    found = [s.source for s in src.tensors.values() if s.source is not None]  # an Adapter
    return found + ([src.config.source] if src.config.source is not None else [])


# ---- what writing commands return -------------------------------------------------------------


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
    nonfinite: dict[str, int] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds > 0 else 0.0


def written(outcome: Outcome) -> dict[str, Any]:
    """The :class:`WriteResult` fields of an outcome, for a command's result class."""
    assert outcome.output is not None
    return {
        "output": outcome.output,
        "tensors": outcome.tensors_written,
        "shards": outcome.shards,
        "bytes_read": outcome.bytes_read,
        "bytes_written": outcome.stats.bytes_written,
        "seconds": outcome.seconds,
        "resumed_shards": outcome.resumed_shards,
        "nonfinite": outcome.stats.nonfinite,
    }
