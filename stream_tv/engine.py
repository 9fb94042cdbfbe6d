"""The one streaming loop every command runs: read chunk -> device -> compute -> write.

A command's planner turns its inputs into :class:`Task` s (one per output tensor, or per
tensor to analyse); :func:`stream_tv.jobs.execute` hands them here. The engine splits each
task into row ranges that fit the chunk budget and runs three stages at once, joined by
small queues:

    reader thread   preadv rows of every input into a free buffer slot     (_read_stage)
    main thread     to the device (pinned buffer, non-blocking copy),      (_to_device)
                    task.compute(chunk), NaN/Inf check, copy back          (_compute)
    writer thread   hand the output bytes to the sink, free the slot       (_write_stage)

so reading chunk i+1, computing chunk i and writing chunk i-1 overlap. Three slots are
allocated once and reused: resident memory is about 3 slots + one chunk of temporaries,
whatever the tensor, shard or model size. The sink is anything with ``write(name, offset,
bytes)`` and ``abort()``: the shard writer, or verify's comparing sink.

A task may hold state from its first chunk to its last (LoRA factors on the device, a DoRA
norm accumulator): ``Task.session(device)`` is a context manager entered before the first
chunk and exited after the last, or on any error, so nothing stays loaded.

``# subtle:`` a chunk is never a single row unless the tensor has one row (``min_rows``).
On CPU a matrix product over a few rows can take another kernel whose bits differ from the
same rows of the full product; the LoRA code goes further and computes each chunk's product
on an aligned window of at least 256 rows (see ``stream_tv/lora/delta.py``), because on
MKL/AVX-512 even 2- and 3-row products differ. ``merge`` must reproduce PEFT's bits.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from . import collector, memory
from .errors import InputError, Interrupted, NonFiniteError, invariant
from .io.index import TensorSpec
from .io.pagecache import available_memory
from .io.reader import Reader
from .io.writer import OutTensor
from .progress import progress_bar

# A stop asked for from outside the engine (the CLI's Ctrl-C handler): the compute loop
# checks it between chunks and ends the run as a Ctrl-C does, from a safe point.
_STOP_REQUESTED = threading.Event()
_RUNNING = threading.Event()

DEFAULT_CHUNK_MIN = 8 * 2**20
DEFAULT_CHUNK_MAX = 64 * 2**20
_ALIGN = 64
_SLOTS = 3
_SPARE_CORES = 2  # the reader and writer threads


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
    state: Any = None  # what the task's session yielded


@dataclass
class Task:
    """One tensor's work: which inputs to read row-aligned, and what to do with each chunk.

    ``compute(chunk)`` returns the output rows (ideally ``chunk.out`` filled in place), or
    ``None`` when the task writes nothing (statistics, equality checks). With ``passes > 1``
    the rows are streamed several times, in order; only the last pass writes. ``session``
    (optional) opens per-task state on the device for the task's chunks (``chunk.state``);
    ``finish()`` gives the task's result (e.g. its statistics) after its last chunk.
    """

    name: str
    inputs: Sequence[TensorSpec]
    compute: Callable[[Chunk], torch.Tensor | None]
    out: OutTensor | None = None
    passes: int = 1
    min_rows: int = 2
    work_row_bytes: int = 0  # temporaries compute needs per row, for chunk sizing
    session: Callable[[torch.device], contextlib.AbstractContextManager[Any]] | None = None
    finish: Callable[[], Any] | None = None

    @property
    def rows(self) -> int:
        if self.out is not None:
            return _rows(self.out.shape)
        return self.inputs[0].rows if self.inputs else 0

    @property
    def out_row_bytes(self) -> int:
        if self.out is None:
            return 0
        return math.prod(self.out.shape[1:] if len(self.out.shape) >= 2 else ()) * (
            self.out.dtype.itemsize
        )

    @property
    def input_bytes(self) -> int:
        return sum(s.nbytes for s in self.inputs) * self.passes


class Sink(Protocol):
    """Where the output bytes of a run go (the shard writer, or verify's comparison)."""

    def write(self, name: str, offset: int, data: memoryview) -> None:
        """Bytes ``[offset, offset + len(data))`` of output tensor ``name``, in order."""

    def abort(self) -> None:
        """The run failed or was interrupted: drop what is unfinished."""


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


def default_chunk_bytes(available: int | None = None) -> int:
    """A chunk budget from free memory: 1/32 of what is available, within 8-64 MiB (more
    buys no speed: see benchmarks/RESULTS.md).

    >>> default_chunk_bytes(2**30) == 32 * 2**20, default_chunk_bytes(2**20) == DEFAULT_CHUNK_MIN
    (True, True)
    """
    if available is None:
        available = available_memory()
    if available is None:
        return DEFAULT_CHUNK_MAX
    return int(min(DEFAULT_CHUNK_MAX, max(DEFAULT_CHUNK_MIN, available // 32)))


@dataclass
class RunStats:
    """What one engine run did."""

    seconds: float = 0.0
    bytes_read: int = 0
    bytes_mapped: int = 0  # of bytes_read: used in place from the page cache (Reader.map_rows)
    bytes_written: int = 0
    tasks_done: int = 0
    results: dict[str, Any] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)


def running() -> bool:
    """Whether a run is streaming now (in this process)."""
    return _RUNNING.is_set()


def request_stop() -> None:
    """Ask the current run to stop at its next chunk, as Ctrl-C would (safe from a signal
    handler: it only sets an event)."""
    _STOP_REQUESTED.set()


def stop_requested() -> bool:
    return _STOP_REQUESTED.is_set()


@contextlib.contextmanager
def streaming() -> Iterator[None]:
    """Mark this process as streaming (:func:`running`) with no stop asked yet; a run, or
    the parent of worker processes (stream_tv/workers.py), is inside it. The CLI's
    collector, paused for its start-up, is back on from here (stream_tv/collector.py)."""
    collector.resume()
    _STOP_REQUESTED.clear()
    _RUNNING.set()
    try:
        yield
    finally:
        _RUNNING.clear()


def run(
    tasks: Sequence[Task],
    *,
    device: torch.device,
    chunk_bytes: int,
    sink: Sink | None = None,
    progress: bool | Any = True,
    description: str = "stream-tv",
    on_nonfinite: str = "ignore",
    tune_malloc: bool = True,
    drop_behind: bool = False,
) -> RunStats:
    """Stream every task through the pipeline; return counts, timings and task results.

    ``on_nonfinite``: ``"error"`` raises :class:`NonFiniteError` at the first output chunk
    holding NaN/Inf, ``"warn"`` counts them per tensor in ``RunStats.nonfinite``,
    ``"ignore"`` skips the check. ``drop_behind``: see :class:`~stream_tv.io.reader.Reader`.
    ``progress``: a bar or not, or an object taking the bar's calls (``update(bytes)``, and
    ``set_postfix_str`` once per finished task).
    On any error (Ctrl-C becomes :class:`Interrupted`) the
    sink is aborted and the error raised.
    """
    t0 = time.perf_counter()
    with streaming():
        if tune_malloc:
            memory.reuse_freed_memory()
        steps = list(_plan_steps(tasks, chunk_bytes))
        pipe = _Pipeline(list(tasks), steps, device, sink, drop_behind=drop_behind)
        bar = progress
        if isinstance(progress, bool):
            bar = progress_bar(progress, sum(t.input_bytes for t in tasks), len(tasks), description)
        try:
            with _fewer_torch_threads(_SPARE_CORES), contextlib.ExitStack() as sessions:
                pipe.start()
                with memory.scratch_space():
                    _compute(pipe, sessions, on_nonfinite, bar)
                pipe.join()
            while not pipe.errors and not pipe.free.empty():  # all back: the next run's
                memory.keep_slot(pipe.free.get())
            if pipe.errors:
                raise pipe.errors[0]
            pipe.reader.check_unchanged()  # no input written while it was read: else all is void
        except BaseException as e:
            pipe.stop()
            if sink is not None:
                sink.abort()
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted("interrupted") from e
            if isinstance(e, _Stop) and pipe.errors:
                raise pipe.errors[0] from None
            raise
        finally:
            pipe.reader.close()
            if bar is not None:
                bar.close()
        pipe.stats.seconds = time.perf_counter() - t0
        return pipe.stats


# ---- the stages -------------------------------------------------------------------------


@dataclass
class _Step:
    task_index: int
    pass_index: int
    start: int
    stop: int
    first: bool  # first chunk of the task's first pass
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


class _Stop(Exception):
    """A stage noticed that another one failed."""


class _Pipeline:
    """The queues and threads of one run; the main thread computes (see :func:`_compute`)."""

    def __init__(
        self,
        tasks: list[Task],
        steps: list[_Step],
        device: torch.device,
        sink: Sink | None,
        *,
        drop_behind: bool = False,
    ):
        self.tasks, self.steps, self.device, self.sink = tasks, steps, device, sink
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.free: queue.Queue[_Slot] = queue.Queue()
        for _ in range(_SLOTS):
            self.free.put(memory.kept_slot(self.cuda) or _Slot(pinned=self.cuda))
        self.ready: queue.Queue = queue.Queue(maxsize=1)
        self.to_write: queue.Queue = queue.Queue(maxsize=1)
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.reader = Reader(drop_behind=drop_behind)
        # Resident input rows are used in place (no copy) on CPU; on a GPU they go through
        # the pinned slots. Dropping behind is unchanged: a chunk is mapped only when all of
        # it is cached, and what was cached at open is never dropped (io/pagecache.py); pages
        # that came in since (the kernel's readahead) are dropped when the file is closed.
        self.map_inputs = not self.cuda
        self.stats = RunStats()
        self.threads = [
            threading.Thread(target=self._guard(self._read_stage), name="stream-tv-reader"),
            threading.Thread(target=self._guard(self._write_stage), name="stream-tv-writer"),
        ]
        for th in self.threads:
            th.daemon = True

    def start(self) -> None:
        for th in self.threads:
            th.start()

    def join(self) -> None:
        for th in self.threads:
            th.join()

    def stop(self) -> None:
        self.stopping.set()
        for th in self.threads:
            if th.is_alive():
                th.join(timeout=10)

    def put(self, q: queue.Queue, item: object) -> None:
        while not self.stopping.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    def get(self, q: queue.Queue) -> Any:
        while True:
            if _STOP_REQUESTED.is_set() and threading.current_thread() is threading.main_thread():
                raise KeyboardInterrupt  # asked to stop (Ctrl-C in the CLI): the same path
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if self.stopping.is_set():
                    raise _Stop from None

    def _guard(self, stage: Callable[[], None]) -> Callable[[], None]:
        def run_stage() -> None:
            try:
                stage()
            except _Stop:
                pass
            except BaseException as e:  # handed to the main thread
                self.errors.append(e)
                self.stopping.set()

        return run_stage

    def _read_stage(self) -> None:
        for step in self.steps:
            task = self.tasks[step.task_index]
            slot = self.get(self.free)
            rows = step.stop - step.start
            mapped = [
                self.reader.map_rows(spec, step.start, step.stop) if self.map_inputs else None
                for spec in task.inputs
            ]
            sizes = [
                0 if m is not None else rows * s.row_numel * s.itemsize
                for s, m in zip(task.inputs, mapped, strict=True)
            ]
            out_size = rows * task.out_row_bytes if step.writes else 0
            bufs = slot.carve([*sizes, out_size])
            tensors = [
                m if m is not None else self.reader.read_into(spec, step.start, step.stop, buf)
                for spec, m, buf in zip(task.inputs, mapped, bufs[:-1], strict=True)
            ]
            self.stats.bytes_mapped += sum(
                m.numel() * m.element_size() for m in mapped if m is not None
            )
            self.put(self.ready, (step, slot, tensors, bufs[-1]))
        self.put(self.ready, None)

    def _write_stage(self) -> None:
        while (item := self.get(self.to_write)) is not None:
            task, step, slot, host_out, event = item
            if host_out is not None and self.sink is not None:
                if event is not None:
                    event.synchronize()
                offset = step.start * task.out_row_bytes
                self.sink.write(task.out.name, offset, bytes_of(host_out))
                self.stats.bytes_written += host_out.numel() * host_out.element_size()
            self.free.put(slot)


def _compute(pipe: _Pipeline, sessions: contextlib.ExitStack, on_nonfinite: str, bar) -> None:
    """The main thread's stage: each chunk to the device, through its task, and back."""
    stats = pipe.stats
    state = None
    while (item := pipe.get(pipe.ready)) is not None:
        step, slot, host_inputs, out_buf = item
        task = pipe.tasks[step.task_index]
        if step.first and task.session is not None:
            state = sessions.enter_context(task.session(pipe.device))
        inputs, out = _to_device(pipe, task, step, host_inputs, out_buf)
        chunk = Chunk(task, step.pass_index, step.start, step.stop, inputs, out, pipe.device)
        chunk.state = state
        result = task.compute(chunk)
        host_out, event = None, None
        if step.writes:
            invariant(result is not None, f"task {task.name} returned no rows to write")
            _check_finite(task.name, result, on_nonfinite, stats)
            host_out, event = _to_host(
                pipe, result, slot, out_buf, task.out.dtype, out.shape, host_inputs
            )
        if step.last:
            sessions.close()  # the task's session ends with its last chunk
            state = None
            if task.finish is not None:
                stats.results[task.name] = task.finish()
            stats.tasks_done += 1
            if bar is not None:
                bar.set_postfix_str(f"{stats.tasks_done}/{len(pipe.tasks)} tensors", refresh=False)
        pipe.put(pipe.to_write, (task, step, slot, host_out, event))
        nbytes = sum(x.numel() * x.element_size() for x in host_inputs)
        stats.bytes_read += nbytes
        if bar is not None:
            bar.update(nbytes)
    pipe.put(pipe.to_write, None)


def _to_device(
    pipe: _Pipeline, task: Task, step: _Step, host_inputs: list[torch.Tensor], out_buf
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The chunk's inputs on the compute device, and where its output rows go."""
    out_shape = _chunk_shape(task.out.shape, step.stop - step.start) if step.writes else ()
    if not pipe.cuda:
        out = out_buf.view(task.out.dtype).view(out_shape) if step.writes else None
        return host_inputs, out
    with torch.cuda.stream(pipe.copy_stream):
        inputs = [x.to(pipe.device, non_blocking=True) for x in host_inputs]
    compute_stream = torch.cuda.current_stream(pipe.device)
    compute_stream.wait_stream(pipe.copy_stream)
    for x in inputs:  # used on the compute stream: don't recycle them early
        x.record_stream(compute_stream)
    out = torch.empty(out_shape, dtype=task.out.dtype, device=pipe.device) if step.writes else None
    return inputs, out


def _to_host(pipe: _Pipeline, result: torch.Tensor, slot: _Slot, out_buf, dtype, shape, inputs):
    """The output rows in host memory (and a CUDA event to wait for): the slot's, or the
    rows of an input the result is, unchanged."""
    host_out = out_buf.view(dtype).view(shape)
    if pipe.cuda:
        host_out.copy_(result, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host_out, event
    if result.data_ptr() != host_out.data_ptr():
        if result.dtype == dtype and result.shape == shape and _an_input(result, slot, inputs):
            # The rows are an input's, unchanged (merge's and apply's untouched tensors):
            # in this slot, freed only after the write, or in place from the page cache
            # (Reader.map_rows: a mapping no one writes to, kept while the writer holds
            # it). The writer takes them from there, no copy.
            return result, None
        host_out.copy_(result)
    return host_out, None


def _an_input(t: torch.Tensor, slot: _Slot, inputs: Sequence[torch.Tensor]) -> bool:
    """``t`` is contiguous and its bytes lie in ``slot``'s buffer, or it is a whole input."""
    if not t.is_contiguous() or t.device != slot.buffer.device:
        return False
    first, n = t.data_ptr(), t.numel() * t.element_size()
    start = slot.buffer.data_ptr()
    if start <= first and first + n <= start + slot.buffer.numel():  # a uint8 buffer
        return True
    return any(x.data_ptr() == first and x.numel() == t.numel() for x in inputs)


@contextlib.contextmanager
def _fewer_torch_threads(spare: int) -> Iterator[None]:
    """Leave ``spare`` cores to the reader and writer threads for the run, then restore.

    torch's own worker threads, which spin between the many small block operations, would
    otherwise take those cores from them. Restored on every exit, errors included.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before - spare))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chunk_shape(shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
    if len(shape) >= 2:
        return (rows, *shape[1:])
    return (rows,) if shape else ()


def _plan_steps(tasks: Sequence[Task], chunk_bytes: int) -> Iterator[_Step]:
    for i, task in enumerate(tasks):
        data_row = sum(s.row_numel * s.itemsize for s in task.inputs) + task.out_row_bytes
        if data_row == 0:
            # An empty tensor (a zero in its shape, e.g. [2**62, 0]), or rows of no bytes:
            # one step, whatever the first dimension, so it is finished (and written).
            ranges = [(0, task.rows)]
        else:
            per_chunk = max(1, chunk_bytes // (data_row + task.work_row_bytes))
            ranges = row_ranges(task.rows, per_chunk, task.min_rows) or [(0, 0)]
        for p in range(task.passes):
            final = p == task.passes - 1
            for j, (a, b) in enumerate(ranges):
                yield _Step(
                    i,
                    p,
                    a,
                    b,
                    first=p == 0 and j == 0,
                    last=final and j == len(ranges) - 1,
                    writes=final and task.out is not None,
                )


def _check_finite(name: str, x: torch.Tensor, mode: str, stats: RunStats) -> None:
    if mode == "ignore" or not x.is_floating_point() or x.numel() == 0:
        return
    # One cheap reduction on the common path. NaN and +-Inf absorb addition, so a finite sum
    # proves every element finite: 19-25 GB/s on one thread, against 6-8 for aminmax. A sum
    # of finite elements can overflow, though; then min and max, which cannot, decide.
    # (sum(dtype=float64) would first copy the chunk to float64: 10x slower.)
    if bool(torch.isfinite(x.sum())):
        return
    lo, hi = torch.aminmax(x)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    bad = int((~torch.isfinite(x)).sum())
    if bad == 0:
        return
    if mode == "error":
        raise NonFiniteError(
            f"{bad} NaN/Inf value(s) in output tensor {name!r}",
            hint="check the inputs (stream-tv inspect), or pass --on-nonfinite warn to write "
            "them anyway",
        )
    stats.nonfinite[name] = stats.nonfinite.get(name, 0) + bad


def bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (a flat ``memoryview``)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
