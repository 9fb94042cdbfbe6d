"""The CLI's collector pause around its start-up (stream_tv/collector.py), and the other
process-wide settings the console script makes for itself."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from stream_tv import collector, engine, workers
from stream_tv.engine import RunStats, Task
from stream_tv.errors import InputError


@pytest.fixture
def paused():
    """The CLI's pause, undone afterwards (this test process keeps collecting)."""
    frozen = gc.get_freeze_count()
    collector.pause_for_startup()
    yield
    collector.resume()
    gc.enable()
    if frozen == 0:
        gc.unfreeze()


def test_a_run_turns_the_paused_collector_back_on_with_the_start_up_frozen(paused):
    assert not gc.isenabled()
    with engine.streaming():
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
    collector.resume()  # a second run: nothing more to do
    assert gc.isenabled()


def test_a_library_caller_sees_its_collector_as_it_left_it():
    frozen = gc.get_freeze_count()
    gc.disable()
    try:
        with engine.streaming():
            assert not gc.isenabled()  # disabled by the caller, not by stream-tv: left so
    finally:
        gc.enable()
    with engine.streaming():
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen


def _collecting_group(tasks, bar) -> RunStats:
    if not gc.isenabled():
        raise InputError("the collector is off in this worker")
    return RunStats()


def test_workers_forked_after_the_pause_collect(paused):
    tasks = [Task(f"t{i}", [], lambda c: None) for i in range(4)]
    workers.run_split(tasks, 2, _collecting_group, progress=False, description="x")
    assert gc.isenabled()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
@pytest.mark.parametrize("given", [None, "3"])
def test_the_cli_starts_no_openblas_pool_unless_told_to(given):
    # numpy's OpenBLAS reads its thread count once, when it loads: the CLI sets it first.
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    code = (
        "import os, sys\n"
        "from stream_tv import console\n"
        "sys.argv = ['stream-tv', '--version']\n"
        "try:\n"
        "    console.main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "import numpy\n"
        "print(len(os.listdir('/proc/self/task')))\n"
        "print(os.environ['OPENBLAS_NUM_THREADS'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    threads, value = out.stdout.strip().splitlines()[-2:]
    assert value == (given or "1")
    if given is None:
        assert threads == "1"  # numpy loaded its BLAS, and started no thread beside this one
