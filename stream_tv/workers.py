"""A statistics job on CPU, split across worker processes (``--workers``).

A job that writes nothing and keeps no state outside its tasks' own ``finish()`` results
(``Job.splittable``: compare) has tensors that are independent of each other. On CPU its
time is the main thread's arithmetic, which one Python process cannot spread over more
cores: torch's elementwise calls on cache-sized blocks are too short for its intra-op
threads, and two Python threads issuing them take turns at the GIL (benchmarks/RESULTS.md,
"a prepare stage not kept"). Worker processes forked from this one share nothing but the
planned tasks, so each runs the whole engine (reader thread, compute, its own three slots)
at full speed on its own core.

- The tasks are cut, in order, into contiguous groups of about equal input bytes (four per
  worker), which the workers take one at a time, so a worker that drew light tensors takes
  more groups; each group is one :func:`stream_tv.engine.run` with the parent's options.
- Each tensor runs whole in one worker, with the same chunk budget as a single process:
  its chunks, blocks and sums are the same, and so is every figure, bit for bit.
- The parent draws the progress bar from counters the workers add to, and merges their
  :class:`~stream_tv.engine.RunStats`.
- The first error a worker reports is raised here, as it was raised there; the other
  workers are then killed (they write nothing). Ctrl-C, or a stop request, ends the run
  the same way, as interrupted.

Workers come from ``fork()``: the tasks (closures over the plan) need no pickling and no
import is repeated. So the split is Linux-only by default, and never taken while other
threads run in this process (a fork copies their locks, not the threads). Each worker
runs torch with one intra-op thread: the workers are the parallelism, and OpenMP's pool
is not usable in a forked child.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any

import torch

from . import collector, engine, memory
from .engine import RunStats, Task
from .errors import EXIT_INTERRUPTED, InputError, Interrupted, WorkerError
from .io.pagecache import available_memory
from .progress import progress_bar

__all__ = [
    "GROUPS_PER_WORKER",
    "MIN_SPLIT_BYTES",
    "WorkerError",
    "groups_of",
    "run_split",
    "worker_count",
]

#: Below this many input bytes a job runs in one process (a fork, an engine start per
#: group and the merge of the results cost more than a second core saves).
MIN_SPLIT_BYTES = 256 * 2**20
#: Groups of tasks per worker: enough that the workers finish together.
GROUPS_PER_WORKER = 4
#: Memory a worker may hold, in chunk budgets (three slots, temporaries, its share of torch).
_CHUNKS_PER_WORKER = 8


def worker_count(
    requested: int | None,
    tasks: Sequence[Task],
    chunk_bytes: int,
    device: torch.device,
) -> int:
    """How many processes run a splittable job. ``requested``: ``None`` chooses (Linux:
    the cores this process may use, at most one per eight chunk budgets of the memory
    available, one below :data:`MIN_SPLIT_BYTES`), an integer is taken as given (at most
    one per task). On a GPU, or with other threads running, always one."""
    if device.type != "cpu" or len(tasks) < 2:
        return 1
    if requested is not None:  # taken as given, at most one per task
        if requested > 1 and not hasattr(os, "fork"):
            raise InputError(
                f"--workers {requested} needs fork(), which this platform lacks",
                hint="use --workers 1",
            )
        count = max(1, min(requested, len(tasks)))
    elif (
        not sys.platform.startswith("linux") or sum(t.input_bytes for t in tasks) < MIN_SPLIT_BYTES
    ):
        return 1
    else:
        available = available_memory()
        by_memory = available // (_CHUNKS_PER_WORKER * chunk_bytes) if available else 1
        count = max(1, min(len(os.sched_getaffinity(0)), by_memory, len(tasks)))
    return count if count == 1 or _forkable() else 1


def _forkable() -> bool:
    # subtle: a thread holding a lock at fork() (a logging handler, a download) leaves it
    # held forever in the child. The split is for this process's main thread alone, once
    # tqdm's monitor (started by any earlier bar, transformers' among them) is stopped: it
    # holds tqdm's lock at times, and the next bar starts a new one.
    monitors = sys.modules.get("tqdm._monitor")
    if monitors is not None:
        for thread in threading.enumerate():
            if isinstance(thread, monitors.TMonitor):
                thread.exit()
    return threading.active_count() == 1


def groups_of(tasks: Sequence[Task], count: int) -> list[list[Task]]:
    """``tasks`` in order, cut into at most ``count`` contiguous groups of about equal input
    bytes (none empty).

    >>> from types import SimpleNamespace as T
    >>> [[t.input_bytes for t in g] for g in groups_of([T(input_bytes=b) for b in (4, 1, 1, 2, 4)], 3)]
    [[4], [1, 1, 2], [4]]
    """
    total = sum(t.input_bytes for t in tasks) or 1
    groups: list[list[Task]] = [[] for _ in range(count)]
    done = 0
    for t in tasks:
        g = min(count - 1, done * count // total)
        groups[g].append(t)
        done += t.input_bytes
    return [g for g in groups if g]


def run_split(
    tasks: Sequence[Task],
    workers: int,
    run_group: Callable[[Sequence[Task], Any], RunStats],
    *,
    progress: bool,
    description: str,
) -> RunStats:
    """Run ``tasks`` in ``workers`` forked processes; their merged statistics.

    ``run_group(tasks, bar)`` is :func:`stream_tv.engine.run` with the job's options and
    ``progress=bar`` (an object the engine reports each chunk to).
    """
    groups = groups_of(tasks, workers * GROUPS_PER_WORKER)
    total = sum(t.input_bytes for t in tasks)
    collector.resume()  # before the forks: the workers collect as a run does
    ctx = multiprocessing.get_context("fork")
    try:
        taken = ctx.Value("l", 0)  # the next group to take (its lock orders the workers)
        done = [ctx.Value("q", 0, lock=False) for _ in range(workers)]  # bytes, per worker
        finished = [ctx.Value("l", 0, lock=False) for _ in range(workers)]  # tasks, per worker
    except OSError:  # no shared memory or semaphores here (a container without /dev/shm)
        return run_group(tasks, progress_bar(progress, total, len(tasks), description))
    procs, conns = [], []
    for i in range(workers):
        receive, send = ctx.Pipe(duplex=False)
        args = (groups, taken, done[i], finished[i], run_group, send)
        proc = ctx.Process(target=_worker, args=args, name=f"stream-tv worker {i}", daemon=True)
        proc.start()
        send.close()
        procs.append(proc)
        conns.append(receive)
    bar = progress_bar(progress, total, len(tasks), description)  # after the forks: a thread
    merged = RunStats()
    try:
        with engine.streaming():
            _gather(procs, conns, merged, bar, done, finished, len(tasks))
    except BaseException as e:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        if isinstance(e, KeyboardInterrupt):  # no Ctrl-C handler here (a library call)
            raise Interrupted("interrupted") from e
        raise
    finally:
        for proc in procs:
            proc.join()
        if bar is not None:
            bar.close()
    return merged


def _gather(procs, conns, merged: RunStats, bar, done, finished, total_tasks: int) -> None:
    """Wait for every worker's statistics, drawing the bar; raise the first error."""
    pending = dict(zip(conns, procs, strict=True))
    shown = 0
    while pending:
        if engine.stop_requested():
            raise Interrupted("interrupted")
        for conn in wait(list(pending), timeout=0.25):
            proc = pending.pop(conn)
            try:
                kind, payload = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError, pickle.UnpicklingError):
                proc.join()
                if engine.stop_requested() or proc.exitcode in (EXIT_INTERRUPTED, -signal.SIGINT):
                    raise Interrupted("interrupted") from None  # Ctrl-C between two groups
                raise WorkerError(
                    f"{proc.name} ended without a result (exit status {proc.exitcode})",
                    hint="a worker killed for memory says so in the kernel log (dmesg); "
                    "rerun with --workers 1 or a smaller --chunk-size",
                ) from None
            if kind == "error":
                raise payload
            _merge(merged, payload)
        if bar is not None:
            now = sum(v.value for v in done)
            bar.update(now - shown)
            shown = now
            tensors = sum(v.value for v in finished)
            bar.set_postfix_str(f"{tensors}/{total_tasks} tensors", refresh=False)


def _merge(into: RunStats, part: RunStats) -> None:
    into.bytes_read += part.bytes_read
    into.bytes_mapped += part.bytes_mapped
    into.bytes_written += part.bytes_written
    into.tasks_done += part.tasks_done
    into.results.update(part.results)
    for name, count in part.nonfinite.items():
        into.nonfinite[name] = into.nonfinite.get(name, 0) + count


class _Counters:
    """What a worker's engine reports its chunks to: the parent's bar reads the counters."""

    def __init__(self, done, finished) -> None:
        self.done, self.finished = done, finished

    def update(self, nbytes: int) -> None:
        self.done.value += nbytes

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.finished.value += 1  # the engine calls this once per finished task

    def close(self) -> None:
        pass


def _worker(groups, taken, done, finished, run_group, send) -> None:
    """A worker's life: take groups until none is left, then send the merged statistics
    (or the first error) up the pipe."""
    # Ctrl-C reaches the whole process group: the engine's handler (inherited) stops at
    # the next chunk, and the parent, stopping too, kills what is left.
    torch.set_num_threads(1)
    # subtle: the objects inherited from the parent (torch's and every module's) are never
    # garbage here, yet each full collection walked them all (4% of a compare worker's CPU)
    # and wrote their reference counts, copying the pages fork() shared. This process is
    # the job's alone and ends with it: they leave the collector for good.
    gc.freeze()
    stats = RunStats()
    try:
        counters = _Counters(done, finished)
        with memory.keeping_slots():  # each group's run takes the previous one's buffers
            while True:
                with taken.get_lock():
                    index = taken.value
                    taken.value += 1
                if index >= len(groups):
                    break
                _merge(stats, run_group(groups[index], counters))
        message = ("stats", stats)
    except BaseException as e:  # noqa: BLE001 - every error goes to the parent, as raised
        message = ("error", _portable(e))
    with contextlib.suppress(OSError):
        send.send_bytes(pickle.dumps(message))
    send.close()


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling, else an error of the same text; the worker's
    traceback attached as a note (shown with ``--debug``)."""
    if isinstance(e, KeyboardInterrupt):
        e = Interrupted("interrupted")
    note = "in a worker process:\n" + "".join(traceback.format_exception(e))
    try:
        copy = pickle.loads(pickle.dumps(e))
    except Exception:  # noqa: BLE001 - whatever does not pickle is sent as text
        copy = RuntimeError(f"{type(e).__name__}: {e}")
    if hasattr(copy, "add_note"):  # Python 3.11+
        copy.add_note(note)
    return copy
