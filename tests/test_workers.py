"""``compare`` split across worker processes (stream_tv/workers.py): the same report bit
for bit, every error of a worker raised in the parent, Ctrl-C and a dead worker handled,
and the worker count chosen only where a split is safe."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("peft")
pytest.importorskip("transformers")

import peft_fixtures as pf  # noqa: E402

from stream_tv import RunOptions, compare, engine, workers  # noqa: E402
from stream_tv.cli import cli  # noqa: E402
from stream_tv.errors import InputError, Interrupted  # noqa: E402
from stream_tv.stats import TensorAccumulator  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="workers fork()")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return pf.build_case("llama-bf16-linear", tmp_path_factory)


def run(built, count: int | None, chunk: str = "3KB"):
    options = RunOptions(device="cpu", chunk_size=chunk, progress=False, workers=count)
    return compare(base=built.base, finetuned=built.merged, adapter=built.adapter, options=options)


def figures(report) -> dict:
    data = json.loads(report.to_json())
    data.pop("inputs", None)  # seconds and the device string
    return data


def test_a_split_compare_reports_the_same_figures_bit_for_bit(built, monkeypatch, tmp_path):
    log = tmp_path / "pids"  # each task's finish() notes its process (a worker's memory is its own)
    original = TensorAccumulator.result

    def result(self):
        with log.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return original(self)

    monkeypatch.setattr(TensorAccumulator, "result", result)
    one = run(built, 1)
    assert set(log.read_text().split()) == {str(os.getpid())}
    log.unlink()
    three = run(built, 3)
    pids = log.read_text().split()
    assert len(pids) == len(one.tensors)  # each tensor once
    assert len(set(pids)) >= 2 and str(os.getpid()) not in pids  # in the workers
    assert figures(three) == figures(one)
    assert [t.name for t in three.tensors] == [t.name for t in one.tensors]
    assert three.inputs["bytes_read"] == one.inputs["bytes_read"]


def test_an_error_in_a_worker_is_raised_as_it_was_raised_there(built, monkeypatch):
    victim = next(t.name for t in run(built, 1).tensors if t.has_lora)
    original = TensorAccumulator.update

    def update(self, **kw):
        if self.name == victim:
            raise InputError("a bad tensor", where=victim, hint="the hint")
        return original(self, **kw)

    monkeypatch.setattr(TensorAccumulator, "update", update)
    with pytest.raises(InputError) as info:
        run(built, 2)
    assert str(info.value) == f"{victim}: a bad tensor (the hint)"
    assert info.value.hint == "the hint"
    assert any("in a worker process" in n for n in getattr(info.value, "__notes__", [""]))


def test_a_worker_that_dies_is_reported_not_waited_for(built, monkeypatch):
    monkeypatch.setattr(TensorAccumulator, "update", lambda self, **kw: os._exit(9))
    t0 = time.monotonic()
    with pytest.raises(workers.WorkerError, match=r"ended without a result \(exit status 9\)"):
        run(built, 2)
    assert time.monotonic() - t0 < 60


def _sleeping_group(tasks, bar):
    time.sleep(60)
    raise AssertionError("not stopped")


@pytest.mark.parametrize(
    "alarm",
    [
        # What the CLI's Ctrl-C handler does in the parent: request_stop().
        lambda *a: engine.request_stop(),
        # A library call has no handler: SIGINT raises KeyboardInterrupt while it waits.
        signal.default_int_handler,
    ],
    ids=["stop-request", "keyboard-interrupt"],
)
def test_a_stop_ends_every_worker_as_interrupted(alarm):
    # The workers would sleep for a minute: they are killed, and the run ends interrupted.
    tasks = [engine.Task(f"t{i}", [], lambda c: None) for i in range(4)]
    before = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            workers.run_split(tasks, 2, _sleeping_group, progress=False, description="x")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    assert time.monotonic() - t0 < 10


def test_the_worker_count_is_one_where_a_split_is_not_safe_or_not_worth_it():
    tasks = [_Sized(2**30) for _ in range(8)]
    assert workers.worker_count(3, tasks, 2**20, CPU) == 3
    assert workers.worker_count(30, tasks, 2**20, CPU) == 8  # one task per worker at most
    assert workers.worker_count(4, tasks, 2**20, torch.device("cuda")) == 1
    assert workers.worker_count(None, [_Sized(2**20)] * 8, 2**20, CPU) == 1  # too small
    if sys.platform.startswith("linux"):
        cores = len(os.sched_getaffinity(0))
        assert workers.worker_count(None, tasks, 2**20, CPU) == min(cores, 8)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:  # another thread running: fork() would copy its locks, held
        assert workers.worker_count(4, tasks, 2**20, CPU) == 1
    finally:
        stop.set()
        other.join()


class _Sized:
    def __init__(self, nbytes: int) -> None:
        self.input_bytes = nbytes


def test_groups_are_contiguous_and_cover_every_task():
    tasks = [_Sized(n) for n in (5, 1, 1, 1, 1, 9, 2, 2)]
    groups = workers.groups_of(tasks, 4)
    assert [t for g in groups for t in g] == tasks
    assert all(groups) and len(groups) <= 4


def test_workers_must_be_a_positive_whole_number(built):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="workers"):
            RunOptions(workers=bad)
    result = CliRunner().invoke(
        cli,
        ["compare", "--base", str(built.base), "--finetuned", str(built.merged), "--workers", "0"],
    )
    assert result.exit_code == 2 and "--workers" in result.output
    assert "Traceback" not in result.output


def test_the_cli_takes_workers_and_prints_the_same_report(built, tmp_path):
    args = ["compare", "--base", str(built.base), "--finetuned", str(built.merged)]
    args += ["--adapter", str(built.adapter), "--device", "cpu", "--chunk-size", "3KB", "-q"]
    runs = [CliRunner().invoke(cli, [*args, "--workers", n]) for n in ("1", "2")]
    assert [r.exit_code for r in runs] == [0, 0], runs[1].output
    assert runs[0].output == runs[1].output


def test_without_shared_memory_the_job_runs_in_this_process(built, monkeypatch):
    one = run(built, 1)

    def refuse(self, *args, **kwargs):
        raise OSError(38, "Function not implemented")  # what a missing /dev/shm gives

    monkeypatch.setattr(type(multiprocessing.get_context("fork")), "Value", refuse)
    assert figures(run(built, 2)) == figures(one)


def test_scratch_products_are_the_fresh_products_bit_for_bit():
    from stream_tv import memory
    from stream_tv.lora import delta as D

    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 300, generator=g, dtype=torch.float64)
    B = torch.randn(700, 16, generator=g, dtype=torch.float64)
    assert memory.scratch("k", (2, 2), torch.float64, "cpu") is None  # outside a space
    with memory.scratch_space():
        for start, stop in [(0, 700), (5, 77), (64, 65), (600, 700)]:
            kept = D.product_rows(B, A, start, stop, scratch="k")
            fresh = D.product_rows(B, A, start, stop)
            assert torch.equal(kept, fresh) and kept.data_ptr() != fresh.data_ptr()
        # one key, one buffer: the next use writes over the last one's memory
        first = memory.scratch("k", (3, 4), torch.float64, "cpu")
        second = memory.scratch("k", (2, 4), torch.float64, "cpu")
        other = memory.scratch("j", (2, 4), torch.float64, "cpu")
        assert first.data_ptr() == second.data_ptr() != other.data_ptr()


def test_a_compare_of_inputs_used_in_place_reports_the_same_figures(built, monkeypatch):
    from stream_tv.io import reader

    read = run(built, 2)
    monkeypatch.setattr(reader, "MIN_MAP_BYTES", 1)  # this tiny model's chunks mapped too
    original, used = reader.Reader.map_rows, []

    def map_rows(self, spec, start, stop):
        rows = original(self, spec, start, stop)
        used.append(rows is not None)
        return rows

    monkeypatch.setattr(reader.Reader, "map_rows", map_rows)
    mapped = run(built, 1)  # in this process, where the calls can be seen
    assert sum(used) > len(used) // 2
    assert figures(mapped) == figures(read)
    assert figures(run(built, 2)) == figures(read)  # and in workers
