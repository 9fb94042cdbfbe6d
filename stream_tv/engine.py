"""The one streaming loop every command runs: plan -> read chunk -> device -> op -> write.

A command turns its inputs into a list of :class:`Task` s (one per output tensor, or per
tensor to analyse). The engine splits each task into row ranges that fit the chunk budget and
runs three stages at once, joined by small queues:

    reader thread   preadv rows of every input into a free buffer slot
    main thread     move to the device (pinned buffer, non-blocking copy), task.compute(chunk)
    writer thread   copy back, write the bytes into the planned shard, free the slot

so reading chunk i+1, computing chunk i and writing chunk i-1 overlap. Three slots are
allocated once and reused: resident memory is about 3 slots + one chunk of temporaries,
whatever the tensor, shard or model size.

``# subtle:`` a chunk is never a single row unless the tensor has one row (``min_rows``).
On CPU a matrix product over a few rows can take another kernel whose bits differ from the
same rows of the full product; the LoRA code goes further and computes each chunk's product
on an aligned window of at least 256 rows (see ``stream_tv/lora/delta.py``), because on
MKL/AVX-512 even 2- and 3-row products differ. ``merge`` must reproduce PEFT's bits.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InputError, Interrupted, NonFiniteError
from .io.index import TensorSpec
from .io.reader import Reader
from .io.writer import OutTensor, ShardWriter

DEFAULT_CHUNK_MIN = 8 * 2**20
DEFAULT_CHUNK_MAX = 64 * 2**20
_ALIGN = 64
_SLOTS = 3


@dataclass
class Chunk:
    """Rows ``[start, stop)`` of one task, as its compute function sees them."""

    task: Task
    pass_index: int
    start: int
    stop: int
    inputs: list[torch.Tensor]  # one per task input, on the compute device
    out: torch.Tensor | None  # where to put the result (on the compute device), or None
    device: torch.device


@dataclass
class Task:
    """One tensor's work: which inputs to read row-aligned, and what to do with each chunk.

    ``compute(chunk)`` returns the output rows (ideally ``chunk.out`` filled in place), or
    ``None`` when the task writes nothing (statistics, equality checks). With ``passes=2``
    the rows are streamed twice; only the last pass writes. ``finish()`` gives the task's
    result (e.g. its statistics) after its last chunk.
    """

    name: str
    inputs: Sequence[TensorSpec]
    compute: Callable[[Chunk], torch.Tensor | None]
    out: OutTensor | None = None
    passes: int = 1
    min_rows: int = 2
    work_row_bytes: int = 0  # temporaries compute needs per row, for chunk sizing
    finish: Callable[[], Any] | None = None
    start: Callable[[torch.device], None] | None = None  # e.g. load small factors to device

    @property
    def rows(self) -> int:
        if self.out is not None:
            return _rows(self.out.shape)
        return self.inputs[0].rows if self.inputs else 0

    @property
    def out_row_bytes(self) -> int:
        if self.out is None:
            return 0
        return math.prod(self.out.shape[1:] if len(self.out.shape) >= 2 else ()) * self.out.dtype.itemsize

    @property
    def input_bytes(self) -> int:
        return sum(s.nbytes for s in self.inputs) * self.passes


def _rows(shape: Sequence[int]) -> int:
    if len(shape) >= 2:
        return shape[0]
    return math.prod(shape) if shape else 1


def row_ranges(rows: int, per_chunk: int, min_rows: int = 2) -> list[tuple[int, int]]:
    """Split ``rows`` into ranges of ``per_chunk`` rows; no range (not even the last) is
    shorter than ``min_rows`` unless there are fewer rows than that in all.

    >>> row_ranges(10, 4)
    [(0, 4), (4, 8), (8, 10)]
    >>> row_ranges(9, 4)      # a last chunk of one row joins the previous one
    [(0, 4), (4, 9)]
    >>> row_ranges(1, 4), row_ranges(0, 4)
    ([(0, 1)], [])
    """
    per_chunk = max(per_chunk, min_rows, 1)
    ranges = [(s, min(s + per_chunk, rows)) for s in range(0, rows, per_chunk)]
    if len(ranges) > 1 and ranges[-1][1] - ranges[-1][0] < min_rows:
        last = ranges.pop()
        ranges[-1] = (ranges[-1][0], last[1])
    return ranges


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; validate ``cuda:N``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r}", hint="use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {device!r} requested, but CUDA is not available here",
                hint="use --device cpu (or auto)",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"device {device!r} requested, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif dev.type != "cpu":
        raise InputError(f"device type {dev.type!r} is not supported", hint="use cpu or cuda")
    return dev


def default_chunk_bytes() -> int:
    """A chunk budget from free memory: 1/32 of what is available, within 8-64 MiB (more buys no speed: see benchmarks/RESULTS.md)."""
    available = _available_memory()
    if available is None:
        return 64 * 2**20
    return int(min(DEFAULT_CHUNK_MAX, max(DEFAULT_CHUNK_MIN, available // 32)))


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class _Step:
    task_index: int
    pass_index: int
    start: int
    stop: int
    last: bool  # last chunk of the task's last pass
    writes: bool  # a chunk of the pass that produces the output


@dataclass
class _Slot:
    """A reusable set of buffers for one chunk in flight: inputs and output, one allocation."""

    pinned: bool
    buffer: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))

    def carve(self, sizes: Sequence[int]) -> list[torch.Tensor]:
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // _ALIGN) * _ALIGN
        if self.buffer.numel() < total:
            self.buffer = torch.empty(total, dtype=torch.uint8, pin_memory=self.pinned)
        return [self.buffer[o : o + n] for o, n in zip(offsets, sizes, strict=True)]


@dataclass
class RunStats:
    """What one engine run did."""

    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    tasks_done: int = 0
    tasks_skipped: int = 0  # already complete on disk (resume)
    results: dict[str, Any] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)


class _Stop(Exception):
    pass


def run(
    tasks: Sequence[Task],
    *,
    device: torch.device,
    chunk_bytes: int,
    writer: ShardWriter | None = None,
    progress: bool = True,
    description: str = "stream-tv",
    on_nonfinite: str = "ignore",
) -> RunStats:
    """Stream every task through the pipeline; return counts, timings and task results.

    ``on_nonfinite``: ``"error"`` raises :class:`NonFiniteError` at the first output chunk
    holding NaN/Inf, ``"warn"`` counts them per tensor in ``RunStats.nonfinite``,
    ``"ignore"`` skips the check.
    """
    t0 = time.perf_counter()
    stats = RunStats()
    _reuse_freed_memory()
    threads_before = torch.get_num_threads()
    # The reader and writer threads need a core each: torch's own worker threads, which
    # spin between the many small block operations, would otherwise take it from them.
    torch.set_num_threads(max(1, threads_before - 2))
    todo = []
    for t in tasks:
        if writer is not None and t.out is not None and writer.is_complete(t.out.name):
            stats.tasks_skipped += 1
        else:
            todo.append(t)
    steps = list(_plan_steps(todo, chunk_bytes))
    total_bytes = sum(t.input_bytes for t in todo)
    bar = _progress_bar(progress, total_bytes, len(todo), description)

    use_cuda = device.type == "cuda"
    free: queue.Queue[_Slot] = queue.Queue()
    for _ in range(_SLOTS):
        free.put(_Slot(pinned=use_cuda))
    ready: queue.Queue = queue.Queue(maxsize=1)
    to_write: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    errors: list[BaseException] = []
    reader = Reader()
    copy_stream = torch.cuda.Stream(device) if use_cuda else None

    def put(q: queue.Queue, item: object) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    def get(q: queue.Queue) -> Any:
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    raise _Stop from None

    def read_stage() -> None:
        try:
            for step in steps:
                task = todo[step.task_index]
                slot = get(free)
                sizes = [(step.stop - step.start) * s.row_numel * s.itemsize for s in task.inputs]
                out_size = (step.stop - step.start) * task.out_row_bytes if step.writes else 0
                bufs = slot.carve([*sizes, out_size])
                tensors = [
                    reader.read_into(spec, step.start, step.stop, buf)
                    for spec, buf in zip(task.inputs, bufs[:-1], strict=True)
                ]
                put(ready, (step, slot, tensors, bufs[-1]))
            put(ready, None)
        except _Stop:
            pass
        except BaseException as e:  # handed to the main thread
            errors.append(e)
            stop.set()

    def write_stage() -> None:
        try:
            while (item := get(to_write)) is not None:
                task, step, slot, host_out, event = item
                if host_out is not None and writer is not None:
                    if event is not None:
                        event.synchronize()
                    out = task.out
                    offset = step.start * task.out_row_bytes
                    writer.write(out.name, offset, _bytes_of(host_out))
                    stats.bytes_written += host_out.numel() * host_out.element_size()
                free.put(slot)
        except _Stop:
            pass
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [
        threading.Thread(target=read_stage, name="stream-tv-reader", daemon=True),
        threading.Thread(target=write_stage, name="stream-tv-writer", daemon=True),
    ]
    for th in threads:
        th.start()
    started: set[int] = set()
    try:
        while (item := get(ready)) is not None:
            step, slot, host_inputs, out_buf = item
            task = todo[step.task_index]
            if step.task_index not in started:
                started.add(step.task_index)
                if task.start is not None:
                    task.start(device)
            writes = step.writes
            rows = step.stop - step.start
            out_shape = _chunk_shape(task.out.shape, rows) if task.out is not None else ()
            if use_cuda:
                with torch.cuda.stream(copy_stream):
                    inputs = [x.to(device, non_blocking=True) for x in host_inputs]
                compute_stream = torch.cuda.current_stream(device)
                compute_stream.wait_stream(copy_stream)
                for x in inputs:  # used on the compute stream: don't recycle them early
                    x.record_stream(compute_stream)
                out = torch.empty(out_shape, dtype=task.out.dtype, device=device) if writes else None
            else:
                inputs = host_inputs
                out = out_buf.view(task.out.dtype).view(out_shape) if writes else None
            chunk = Chunk(task, step.pass_index, step.start, step.stop, inputs, out, device)
            result = task.compute(chunk)
            host_out = None
            event = None
            if writes:
                if result is None:
                    raise AssertionError(f"task {task.name} returned no rows to write")
                _check_finite(task.name, result, on_nonfinite, stats)
                host_out = out_buf.view(task.out.dtype).view(out_shape)
                if use_cuda:
                    host_out.copy_(result, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                elif result.data_ptr() != host_out.data_ptr():
                    host_out.copy_(result)
            if step.last:
                if task.finish is not None:
                    stats.results[task.name] = task.finish()
                stats.tasks_done += 1
                if bar is not None:
                    bar.set_postfix_str(f"{stats.tasks_done}/{len(todo)} tensors", refresh=False)
            put(to_write, (task, step, slot, host_out, event))
            stats.bytes_read += sum(x.numel() * x.element_size() for x in host_inputs)
            if bar is not None:
                bar.update(sum(x.numel() * x.element_size() for x in host_inputs))
        put(to_write, None)
        for th in threads:
            th.join()
    except KeyboardInterrupt as e:
        stop.set()
        _join(threads)
        if writer is None:
            raise Interrupted("interrupted") from e
        writer.abort()
        raise Interrupted(
            f"interrupted; {len(writer.completed)} of {len(writer.plan.shards)} shard(s) "
            "complete and kept",
            where=str(writer.out),
            hint="rerun the same command to resume from there, or add --restart to start over",
        ) from e
    except BaseException as e:
        stop.set()
        _join(threads)
        if writer is not None:
            writer.abort()
        if isinstance(e, _Stop) and errors:
            raise errors[0] from None
        raise
    finally:
        torch.set_num_threads(threads_before)
        reader.close()
        if bar is not None:
            bar.close()
    if errors:
        if writer is not None:
            writer.abort()
        raise errors[0]
    stats.seconds = time.perf_counter() - t0
    return stats


_MALLOC_TUNED = False


def _reuse_freed_memory() -> None:
    """Let glibc keep and reuse the memory of freed chunk temporaries (once per process).

    # subtle: glibc serves allocations above a dynamic threshold (at most 32 MiB) with fresh
    # mmap()s and unmaps them on free, so every chunk's float32 temporaries (a LoRA delta,
    # an upcast weight) would fault in new zeroed pages: ~0.5 s per GB here, a third of a
    # merge. With the threshold raised and trimming off, the same few blocks are reused;
    # the heap stays at the size of one chunk's temporaries.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _join(threads: Sequence[threading.Thread]) -> None:
    for th in threads:
        th.join(timeout=10)


def _chunk_shape(shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
    if len(shape) >= 2:
        return (rows, *shape[1:])
    return (rows,) if shape else ()


def _plan_steps(tasks: Sequence[Task], chunk_bytes: int) -> Iterator[_Step]:
    for i, task in enumerate(tasks):
        row_cost = sum(s.row_numel * s.itemsize for s in task.inputs) + task.out_row_bytes
        row_cost += task.work_row_bytes
        per_chunk = max(1, chunk_bytes // max(row_cost, 1))
        ranges = row_ranges(task.rows, per_chunk, task.min_rows)
        if not ranges:  # an empty tensor: one empty step so it is finished (and written)
            ranges = [(0, 0)]
        for p in range(task.passes):
            for j, (a, b) in enumerate(ranges):
                final = p == task.passes - 1
                yield _Step(
                    i, p, a, b, last=final and j == len(ranges) - 1, writes=final and task.out is not None
                )


def _check_finite(name: str, x: torch.Tensor, mode: str, stats: RunStats) -> None:
    if mode == "ignore" or not x.is_floating_point() or x.numel() == 0:
        return
    # One cheap reduction on the common path: min and max propagate NaN and show +-Inf, and
    # cannot overflow. (sum(dtype=float64) would first copy the chunk to float64: 10x slower.)
    lo, hi = torch.aminmax(x)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    bad = int((~torch.isfinite(x)).sum())
    if bad == 0:
        return
    if mode == "error":
        raise NonFiniteError(
            f"{bad} NaN/Inf value(s) in output tensor {name!r}",
            hint="check the inputs (stream-tv inspect), or pass --on-nonfinite warn to write them anyway",
        )
    stats.nonfinite[name] = stats.nonfinite.get(name, 0) + bad


def _progress_bar(enabled: bool, total: int, tensors: int, description: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc=description,
        dynamic_ncols=True,
        leave=False,
        mininterval=0.25,
        postfix=f"0/{tensors} tensors",
    )


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (a flat ``memoryview``)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
