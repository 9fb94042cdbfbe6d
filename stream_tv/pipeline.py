"""The threads, queues and buffer slots of one :func:`stream_tv.engine.run`, and the
sessions its tasks keep open across them (see the engine's docstring for the stages).

Nothing here is a command's concern: :mod:`stream_tv.engine` builds a :class:`Pipeline`,
runs the compute stage on the main thread, and reports the first error of any stage.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .io.reader import Reader

if TYPE_CHECKING:
    from .engine import Sink, Task

__all__ = [
    "ALIGN",
    "SLOTS",
    "STOP_REQUESTED",
    "Chunk",
    "Pipeline",
    "RunStats",
    "Sessions",
    "Slot",
    "Step",
    "Stop",
    "bytes_of",
]

# A stop asked for from outside the engine (the CLI's Ctrl-C handler): the compute loop
# checks it between chunks and ends the run as a Ctrl-C does, from a safe point.
STOP_REQUESTED = threading.Event()
ALIGN = 64
SLOTS = 3


@dataclass
class RunStats:
    """What one engine run did."""

    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    tasks_done: int = 0
    results: dict[str, Any] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)


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
    prepared: Any = None  # what the task's prepare returned for this chunk


@dataclass
class Step:
    task_index: int
    pass_index: int
    start: int
    stop: int
    first: bool  # first chunk of the task's first pass
    last: bool  # last chunk of the task's last pass
    writes: bool  # a chunk of the pass that produces the output


@dataclass
class Slot:
    """A reusable set of buffers for one chunk in flight: inputs and output, one allocation."""

    pinned: bool
    buffer: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))

    def carve(self, sizes: Sequence[int]) -> list[torch.Tensor]:
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // ALIGN) * ALIGN
        if self.buffer.numel() < total:
            self.buffer = torch.empty(total, dtype=torch.uint8, pin_memory=self.pinned)
        return [self.buffer[o : o + n] for o, n in zip(offsets, sizes, strict=True)]


class Stop(Exception):
    """A stage noticed that another one failed."""


class Sessions:
    """The open sessions of a run, one per task: entered by the stage that runs ``prepare``
    (at most two are open at once, the computing task's and the next one's when the
    prepare thread is ahead), exited after the task's last ``compute``."""

    def __init__(self) -> None:
        self._open: dict[int, tuple[contextlib.ExitStack, Any]] = {}
        self._lock = threading.Lock()

    def state(self, step: Step, task: Task, device: torch.device) -> Any:
        """The task's session state; entered at the task's first step."""
        if step.first and task.session is not None:
            stack = contextlib.ExitStack()
            try:
                value = stack.enter_context(task.session(device))
            except BaseException:
                stack.close()
                raise
            with self._lock:
                self._open[step.task_index] = (stack, value)
            return value
        with self._lock:
            entry = self._open.get(step.task_index)
        return entry[1] if entry is not None else None

    def close(self, task_index: int) -> None:
        with self._lock:
            entry = self._open.pop(task_index, None)
        if entry is not None:
            entry[0].close()

    def close_all(self) -> None:
        with self._lock:
            entries, self._open = list(self._open.values()), {}
        for stack, _ in entries:
            stack.close()


class Pipeline:
    """The queues and threads of one run; the main thread computes (see :func:`_compute`)."""

    def __init__(
        self, tasks: list[Task], steps: list[Step], device: torch.device, sink: Sink | None
    ):
        self.tasks, self.steps, self.device, self.sink = tasks, steps, device, sink
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        # prepare on its own thread: on CPU, when a task has one (see the module docstring)
        self.preparing = not self.cuda and any(t.prepare is not None for t in tasks)
        self.free: queue.Queue[Slot] = queue.Queue()
        for _ in range(SLOTS + self.preparing):
            self.free.put(Slot(pinned=self.cuda))
        self.ready: queue.Queue = queue.Queue(maxsize=1)
        self.read: queue.Queue = queue.Queue(maxsize=1) if self.preparing else self.ready
        self.to_write: queue.Queue = queue.Queue(maxsize=1)
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.reader = Reader()
        self.stats = RunStats()
        self.sessions = Sessions()
        self.threads = [
            threading.Thread(target=self._guard(self._read_stage), name="stream-tv-reader"),
            threading.Thread(target=self._guard(self._write_stage), name="stream-tv-writer"),
        ]
        if self.preparing:
            stage = self._guard(self._prepare_stage)
            self.threads.append(threading.Thread(target=stage, name="stream-tv-prepare"))
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
        raise Stop

    def get(self, q: queue.Queue) -> Any:
        while True:
            if STOP_REQUESTED.is_set() and threading.current_thread() is threading.main_thread():
                raise KeyboardInterrupt  # asked to stop (Ctrl-C in the CLI): the same path
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if self.stopping.is_set():
                    raise Stop from None

    def _guard(self, stage: Callable[[], None]) -> Callable[[], None]:
        def run_stage() -> None:
            try:
                stage()
            except Stop:
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
            sizes = [rows * s.row_numel * s.itemsize for s in task.inputs]
            out_size = rows * task.out_row_bytes if step.writes else 0
            bufs = slot.carve([*sizes, out_size])
            tensors = [
                self.reader.read_into(spec, step.start, step.stop, buf)
                for spec, buf in zip(task.inputs, bufs[:-1], strict=True)
            ]
            self.put(self.read, (step, slot, tensors, bufs[-1]))
        self.put(self.read, None)

    def prepared(self, step: Step, inputs: list[torch.Tensor]) -> tuple[Any, Any]:
        """The task's session state for this step, and what its ``prepare`` returns."""
        task = self.tasks[step.task_index]
        state = self.sessions.state(step, task, self.device)
        if task.prepare is None:
            return state, None
        chunk = Chunk(task, step.pass_index, step.start, step.stop, inputs, None, self.device)
        chunk.state = state
        return state, task.prepare(chunk)

    def _prepare_stage(self) -> None:
        while (item := self.get(self.read)) is not None:
            step, slot, tensors, out_buf = item
            self.put(self.ready, (step, slot, tensors, out_buf, self.prepared(step, tensors)))
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


def bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (a flat ``memoryview``)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
