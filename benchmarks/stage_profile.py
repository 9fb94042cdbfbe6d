"""Where one stream-tv run's time goes: the engine's three threads, stage by stage.

    python benchmarks/stage_profile.py [--top N] [--sync] [--json PATH] -- \\
        merge BASE ADAPTER -o OUT --overwrite --device cuda

runs the CLI in this process with the engine's stages timed (a wrapper around each, no other
change), then prints, per thread, the seconds spent in each stage and waiting on each queue:

    reader   read (preadv into a slot), map (a resident chunk used in place), waiting for a
             free slot, waiting to hand a chunk on
    main     waiting for a read chunk, to the device, session (a task's per-tensor set-up:
             LoRA factors loaded), compute, NaN/Inf check, to the host, waiting to hand on
    writer   waiting for a computed chunk, waiting for the GPU (the copy back), write (the
             sink: pwrite to the shard file)

A stage's seconds are wall time on its thread; on a GPU a stage that only queues work takes
little, and the wait shows up where a later call first needs the result (the NaN/Inf check's
``bool``, the writer's event). ``--sync`` adds a device synchronize after each compute, so
that the GPU's time for a chunk is counted there (slower: the copies no longer overlap).
``--top N`` adds cProfile's N most expensive functions of the main thread (cumulative).
Worker processes (compare on several CPU cores) are timed too: each writes its figures
when it ends, and they are reported per worker, against that worker's own engine time.
Reports only; checks nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import json
import os
import pstats
import sys
import tempfile
import threading
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

TIMES: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
RUNS: list[dict] = []
_LOCK = threading.Lock()


def _thread() -> str:
    name = threading.current_thread().name
    return {"stream-tv-reader": "reader", "stream-tv-writer": "writer"}.get(
        name, "main" if threading.current_thread() is threading.main_thread() else name
    )


def _add(label: str, seconds: float) -> None:
    with _LOCK:
        cell = TIMES[(_thread(), label)]
        cell[0] += seconds
        cell[1] += 1


def timed(label: str, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _add(label, time.perf_counter() - t0)

    return wrapper


class _TimedSink:
    def __init__(self, sink):
        self._sink = sink
        self.write = timed("write (sink)", sink.write)

    def __getattr__(self, name):
        return getattr(self._sink, name)


def _timed_session(session):
    if session is None:
        return None

    @contextlib.contextmanager
    def opened(device):
        t0 = time.perf_counter()
        cm = session(device)
        state = cm.__enter__()
        _add("session (open)", time.perf_counter() - t0)
        try:
            yield state
        except BaseException:
            if not cm.__exit__(*sys.exc_info()):
                raise
        else:
            t1 = time.perf_counter()
            cm.__exit__(None, None, None)
            _add("session (close)", time.perf_counter() - t1)

    return opened


def install(sync: bool) -> None:
    import torch

    from stream_tv import engine
    from stream_tv.io import reader

    queue_names = {}

    init = engine._Pipeline.__init__

    def pipeline_init(self, tasks, steps, device, sink, **kw):
        def compute(fn):
            if not (sync and device.type == "cuda"):
                return timed("compute", fn)

            def synced(chunk):
                t0 = time.perf_counter()
                out = fn(chunk)
                _add("compute (queued)", time.perf_counter() - t0)
                t1 = time.perf_counter()
                torch.cuda.synchronize(device)
                _add("compute (GPU, synchronized)", time.perf_counter() - t1)
                return out

            return synced

        tasks = [
            dataclasses.replace(t, compute=compute(t.compute), session=_timed_session(t.session))
            for t in tasks
        ]
        init(self, tasks, steps, device, _TimedSink(sink) if sink is not None else None, **kw)
        queue_names[id(self.free)] = "free slot"
        queue_names[id(self.ready)] = "read chunk"
        queue_names[id(self.to_write)] = "computed chunk"

    engine._Pipeline.__init__ = pipeline_init
    get, put = engine._Pipeline.get, engine._Pipeline.put

    def timed_get(self, q):
        t0 = time.perf_counter()
        try:
            return get(self, q)
        finally:
            _add(f"wait for a {queue_names.get(id(q), '?')}", time.perf_counter() - t0)

    def timed_put(self, q, item):
        t0 = time.perf_counter()
        try:
            return put(self, q, item)
        finally:
            _add(f"hand on ({queue_names.get(id(q), '?')} queue)", time.perf_counter() - t0)

    engine._Pipeline.get, engine._Pipeline.put = timed_get, timed_put
    reader.Reader.read_into = timed("read (preadv)", reader.Reader.read_into)
    reader.Reader.map_rows = timed("map (in place)", reader.Reader.map_rows)
    engine._to_device = timed("to the device", engine._to_device)
    engine._to_host = timed("to the host", engine._to_host)
    engine._check_finite = timed("NaN/Inf check", engine._check_finite)
    if torch.cuda.is_available():
        torch.cuda.Event.synchronize = timed(
            "wait for the GPU (event)", torch.cuda.Event.synchronize
        )

    run = engine.run

    def timed_run(*a, **k):
        t0 = time.perf_counter()
        stats = run(*a, **k)
        RUNS.append(
            {
                "wall_s": time.perf_counter() - t0,
                "bytes_read": stats.bytes_read,
                "bytes_mapped": stats.bytes_mapped,
                "bytes_written": stats.bytes_written,
                "tasks": stats.tasks_done,
            }
        )
        return stats

    engine.run = timed_run  # stream_tv.jobs calls it as engine.run
    from stream_tv import workers

    worker = workers._worker  # run_split starts it by this name, after the fork

    def timed_worker(*a, **k):
        TIMES.clear()  # the parent's, inherited at the fork
        RUNS.clear()
        try:
            return worker(*a, **k)
        finally:
            where = os.environ.get("STAGE_PROFILE_DIR")
            if where:
                with open(os.path.join(where, f"worker-{os.getpid()}.json"), "w") as f:
                    cells = [[t, label, s, n] for (t, label), (s, n) in TIMES.items()]
                    json.dump({"times": cells, "runs": RUNS}, f)

    workers._worker = timed_worker


def report(total: float, top: str | None, workers: list[dict]) -> dict:
    """Print the figures of this process and of each worker; return them."""
    processes = [("", dict(TIMES), RUNS)]
    for i, w in enumerate(workers):
        cells = {(t, label): [s, n] for t, label, s, n in w["times"]}
        processes.append((f"worker {i} ", cells, w["runs"]))
    lines = [f"process {total:.2f} s (from this script's start)"]
    stages = []
    order = {"reader": 0, "main": 1, "writer": 2}
    for prefix, times, runs in processes:
        if not runs and not times:
            continue
        engine_s = sum(r["wall_s"] for r in runs)
        lines += [
            "",
            f"{prefix or 'this process '}: engine.run {engine_s:.2f} s in {len(runs)} run(s)",
        ]
        for r in runs:
            gb = r["bytes_read"] / 1e9
            lines.append(
                f"  run {r['wall_s']:.2f} s: read {gb:.2f} GB "
                f"({gb / max(r['wall_s'], 1e-9):.2f} GB/s, {r['bytes_mapped'] / 1e9:.2f} GB in "
                f"place), wrote {r['bytes_written'] / 1e9:.2f} GB, {r['tasks']} tensors"
            )
        lines += [
            "",
            "| thread | stage | seconds | calls | % of engine.run |",
            "|---|---|---:|---:|---:|",
        ]
        rows = sorted(times.items(), key=lambda kv: (order.get(kv[0][0], 3), -kv[1][0]))
        for (thread, label), (s, n) in rows:
            pct = 100 * s / engine_s if engine_s else 0.0
            lines.append(f"| {prefix}{thread} | {label} | {s:.3f} | {n} | {pct:.1f} |")
            stages.append({"thread": prefix + thread, "stage": label, "seconds": s, "calls": n})
    if top:
        lines += ["", "main thread, cProfile (cumulative):", "```", top.rstrip(), "```"]
    print("\n".join(lines), file=sys.stderr)
    return {"process_s": total, "runs": RUNS, "workers": workers, "stages": stages}


def main() -> None:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--top", type=int, default=0, help="cProfile's N top functions (main thread)")
    ap.add_argument("--sync", action="store_true", help="synchronize the GPU after each compute")
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the stream-tv arguments")
    args = ap.parse_args()
    argv = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    install(args.sync)
    where = tempfile.mkdtemp(prefix="stage-profile-")
    os.environ["STAGE_PROFILE_DIR"] = where
    from stream_tv.console import main as cli_main

    prof = cProfile.Profile() if args.top else None
    code = 0
    try:
        if prof is not None:
            prof.enable()
        cli_main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        if prof is not None:
            prof.disable()
    top = None
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(args.top)
        top = buf.getvalue()
        top = top[top.find("   ncalls") :] if "   ncalls" in top else top
    found = []
    for name in sorted(os.listdir(where)):
        with open(os.path.join(where, name)) as f:
            found.append(json.load(f))
        os.unlink(os.path.join(where, name))
    os.rmdir(where)
    figures = report(time.perf_counter() - t_start, top, found)
    figures["exit"] = code
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    sys.exit(code)


if __name__ == "__main__":
    main()
