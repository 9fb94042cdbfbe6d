"""engine.py and ops.py: row chunking (properties), the streaming loop with real files, error
propagation, and the per-chunk maths."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from conftest import load_tensors
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from stream_tv import engine, ops
from stream_tv.errors import (
    CorruptCheckpointError,
    InputError,
    MismatchError,
    NonFiniteError,
)
from stream_tv.io.index import INDEX_NAME, read_header
from stream_tv.io.writer import OutputPlan, OutTensor, ShardWriter

CPU = torch.device("cpu")

# ---- row_ranges --------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=-2, max_value=60),
    st.integers(min_value=1, max_value=5),
)
def test_row_ranges_properties(rows, per_chunk, min_rows):
    ranges = engine.row_ranges(rows, per_chunk, min_rows)
    if rows == 0:
        assert ranges == []
        return
    assert ranges[0][0] == 0 and ranges[-1][1] == rows  # covers [0, rows) ...
    for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False):
        assert b == c  # ... contiguously, without overlap
    step = max(per_chunk, min_rows, 1)
    for a, b in ranges:
        assert b - a >= min(min_rows, rows)  # never a short chunk, not even the last
        assert b - a <= step + min_rows - 1  # the last may absorb a short tail, no more
    assert all(b - a == step for a, b in ranges[:-1])


def test_row_ranges_examples():
    assert engine.row_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert engine.row_ranges(9, 4) == [(0, 4), (4, 9)]
    assert engine.row_ranges(1, 4) == [(0, 1)] and engine.row_ranges(3, 1) == [(0, 3)]


# ---- the streaming loop ------------------------------------------------------------------


@pytest.fixture
def shard(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(37, 24, generator=g).to(torch.bfloat16),
        "cube": torch.randn(5, 3, 4, generator=g),
        "vec": torch.randn(19, generator=g).half(),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "row": torch.randn(1, 33, generator=g),
        "empty": torch.zeros(0, 8),
    }
    save_file(tensors, tmp_path / "in.safetensors")
    return tensors, read_header(tmp_path / "in.safetensors")


def copy_tasks(specs, seen, *, factor=2.0):
    """Tasks writing ``factor * input`` in float32, recording the row ranges they see."""

    def task(spec):
        def compute(chunk):
            (x,) = chunk.inputs
            seen.setdefault(spec.name, []).append((chunk.start, chunk.stop))
            assert chunk.out.shape == (chunk.stop - chunk.start, *spec.shape[1:]) or (
                spec.shape in [(), (spec.numel,)]
            )
            return torch.mul(x, factor, out=chunk.out)

        return engine.Task(
            spec.name, [spec], compute, out=OutTensor(spec.name, torch.float32, spec.shape)
        )

    return [task(s) for s in specs.values()]


@pytest.mark.parametrize("chunk_bytes", [1, 64, 500, 1 << 30])
def test_engine_streams_row_chunks_in_order(tmp_path, shard, chunk_bytes):
    tensors, specs = shard
    seen: dict = {}
    tasks = copy_tasks(specs, seen)
    plan = OutputPlan.build([t.out for t in tasks], 600)
    writer = ShardWriter(tmp_path / "out", plan, plan.fingerprint())
    writer.begin()
    stats = engine.run(tasks, device=CPU, chunk_bytes=chunk_bytes, sink=writer, progress=False)
    writer.finish({})
    got = load_tensors(tmp_path / "out")
    for name, t in tensors.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t.float() * 2)
    for task in tasks:  # the ranges are row_ranges of the budget, never one row of many
        spec = task.inputs[0]
        cost = spec.row_numel * (spec.itemsize + 4)
        want = engine.row_ranges(spec.rows, max(1, chunk_bytes // cost), 2) or [(0, 0)]
        assert seen[spec.name] == want
        if spec.rows > 1:
            assert all(b - a >= 2 for a, b in seen[spec.name])
    assert stats.tasks_done == len(tasks)
    assert stats.bytes_read == sum(s.nbytes for s in specs.values())
    assert stats.bytes_written == plan.total_size
    if chunk_bytes == 64:
        assert len(seen["big"]) == 18 and seen["big"][-1] == (34, 37)  # odd last chunk


def test_engine_passes_finish_and_start(shard):
    _, specs = shard
    calls = []
    spec = specs["big"]

    def compute(chunk):
        assert chunk.state == "opened on cpu"
        calls.append((chunk.pass_index, chunk.start, chunk.stop, chunk.out is None))
        return None

    @contextlib.contextmanager
    def session(device):
        calls.append(("start", device.type))
        yield f"opened on {device.type}"
        calls.append(("end",))

    task = engine.Task("stat", [spec], compute, passes=2, finish=lambda: "done", session=session)
    stats = engine.run([task], device=CPU, chunk_bytes=96, progress=False)
    ranges = engine.row_ranges(37, 2, 2)
    chunks = [(p, a, b, True) for p in (0, 1) for a, b in ranges]
    assert calls == [("start", "cpu"), *chunks, ("end",)]
    assert stats.results == {"stat": "done"} and stats.bytes_read == 2 * spec.nbytes


def test_engine_error_closes_the_session_and_restores_threads(shard):
    """A task that fails mid-way still has its session closed (no factors left loaded), and
    torch's thread count, lowered for the run, is restored."""
    _, specs = shard
    events = []

    @contextlib.contextmanager
    def session(device):
        events.append("open")
        try:
            yield None
        finally:
            events.append("closed")

    def compute(chunk):
        if chunk.start >= 4:
            raise MismatchError("tensor 'big' is wrong", where="here")

    threads = torch.get_num_threads()
    task = engine.Task("big", [specs["big"]], compute, session=session)
    with pytest.raises(MismatchError, match="'big' is wrong"):
        engine.run([task], device=CPU, chunk_bytes=96, progress=False)
    assert events == ["open", "closed"]
    assert torch.get_num_threads() == threads


def test_engine_empty_tensor_with_a_huge_dimension_is_one_step(tmp_path):
    """[2**62, 0] holds no bytes: one empty step, not 2**62 / chunk ranges."""
    from stream_tv.io.index import TensorSpec

    path = tmp_path / "e.safetensors"
    path.write_bytes(b"")
    spec = TensorSpec("e", torch.float32, (2**62, 0), path, 0, 0)
    seen = []
    task = engine.Task("e", [spec], lambda c: seen.append((c.start, c.stop)))
    engine.run([task], device=CPU, chunk_bytes=64, progress=False)
    assert seen == [(0, 2**62)]


def test_engine_error_propagates_and_leaves_nothing_finished(tmp_path, shard):
    _, specs = shard
    seen: dict = {}
    tasks = copy_tasks(specs, seen)

    def boom(chunk):
        if chunk.start >= 10:
            raise MismatchError("tensor 'big' is wrong", where="here")
        return torch.mul(chunk.inputs[0], 1, out=chunk.out)

    next(t for t in tasks if t.name == "big").compute = boom
    plan = OutputPlan.build([t.out for t in tasks], 10**6)
    writer = ShardWriter(tmp_path / "out", plan, plan.fingerprint())
    writer.begin()
    with pytest.raises(MismatchError, match="'big' is wrong"):
        engine.run(tasks, device=CPU, chunk_bytes=64, sink=writer, progress=False)
    assert not (tmp_path / "out" / INDEX_NAME).exists()
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_engine_file_truncated_after_indexing(tmp_path, shard):
    _, specs = shard
    path = tmp_path / "in.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # specs were read before
    # the Reader sees the new size when it opens the file (io/reader.py identity check)
    with pytest.raises(CorruptCheckpointError, match="changed since it was indexed") as e:
        tasks = [engine.Task(s.name, [s], lambda c: None) for s in specs.values()]
        engine.run(tasks, device=CPU, chunk_bytes=64, progress=False)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("mode", ["error", "warn", "ignore"])
def test_engine_nonfinite_modes(tmp_path, shard, mode):
    _, specs = shard
    tasks = copy_tasks({"big": specs["big"], "vec": specs["vec"]}, {}, factor=float("inf"))
    plan = OutputPlan.build([t.out for t in tasks], 10**6)
    writer = ShardWriter(tmp_path / "out", plan, plan.fingerprint())
    writer.begin()
    run = lambda: engine.run(  # noqa: E731
        tasks, device=CPU, chunk_bytes=200, sink=writer, progress=False, on_nonfinite=mode
    )
    if mode == "error":
        with pytest.raises(NonFiniteError, match="'big'"):
            run()
        return
    stats = run()
    expected = {"big": specs["big"].numel, "vec": specs["vec"].numel}  # x * inf: inf or NaN
    assert stats.nonfinite == (expected if mode == "warn" else {})


def test_resolve_device():
    assert engine.resolve_device("cpu") == CPU
    assert engine.resolve_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(InputError, match="unknown device"):
        engine.resolve_device("gpu0")
    with pytest.raises(InputError, match="not supported"):
        engine.resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            engine.resolve_device("cuda:0")
    lo, hi = engine.DEFAULT_CHUNK_MIN, engine.DEFAULT_CHUNK_MAX
    assert (lo, hi) == (8 * 2**20, 64 * 2**20)
    assert lo <= engine.default_chunk_bytes() <= hi
    assert engine.default_chunk_bytes(available=2**40) == hi  # a big machine: the cap
    assert engine.default_chunk_bytes(available=2**20) == lo  # a small one: the floor
    assert engine.default_chunk_bytes(available=32 * 20 * 2**20) == 20 * 2**20  # 1/32


# ---- ops ---------------------------------------------------------------------------------


def test_difference_and_compute_dtypes():
    bf, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    assert ops.difference_dtype(bf, bf) == f32 and ops.difference_dtype(f16, f32) == f32
    assert ops.difference_dtype(f32, f64) == f64
    assert ops.compute_dtype(f32, bf, bf) == f32 and ops.compute_dtype(bf, bf, bf) == f64
    assert ops.compute_dtype(f32, f64, f32) == f64


def test_ops_subtract_and_add_on_chunks():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    ft = (base.float() * 1.01).to(torch.bfloat16)
    tv = ops.subtract(ft, base, out=torch.empty(6, 5))
    assert torch.equal(tv.double(), ft.double() - base.double())  # exact: same binades
    back = ops.add_scaled(base, [(tv, 1.0), (None, 3.0), (tv, 0.0)], out=torch.empty_like(base))
    assert torch.equal(back, ft)
    same = base.float().clone()  # in place: out may be the base buffer itself
    assert torch.equal(ops.add_scaled(same, [(tv, 1.0)], out=same), ft.float())


def test_ops_equal_is_bitwise():
    a = torch.tensor([0.0, float("nan"), 1.0])
    assert ops.equal(a, a.clone())  # NaN equals the same NaN
    assert not ops.equal(a, torch.tensor([-0.0, float("nan"), 1.0]))  # -0.0 is a change
    assert not ops.equal(a, a.double()) and not ops.equal(a, a[:2])
    assert ops.equal(torch.arange(3), torch.arange(3))


def test_runs_inside_keeping_slots_reuse_one_set_of_slots(shard):
    from stream_tv import memory

    _, specs = shard
    spec = specs["big"]

    def buffers_of_one_run() -> set[int]:
        seen: set[int] = set()

        def compute(chunk):
            seen.add(chunk.inputs[0].untyped_storage().data_ptr())

        engine.run(
            [engine.Task("big", [spec], compute)], device=CPU, chunk_bytes=64, progress=False
        )
        return seen

    with memory.keeping_slots():
        first = buffers_of_one_run()  # (a slot grown for a larger chunk gets a new buffer)
        second, third = buffers_of_one_run(), buffers_of_one_run()
        kept = []
        while (slot := memory.kept_slot(False)) is not None:
            kept.append(slot)
    # each run took the slots the last one left, and handed them back: one set, not three
    assert len(kept) == engine._SLOTS
    assert second <= first and third == second <= {s.buffer.data_ptr() for s in kept}
    assert memory.kept_slot(False) is None  # nothing is kept outside the block


def test_kept_open_opens_once_per_scratch_space_and_closes_at_its_end():
    from stream_tv import memory

    events = []

    @contextlib.contextmanager
    def opener():
        handle = object()
        events.append(("open", handle))
        yield handle
        events.append(("close", handle))

    with memory.kept_open("k", opener) as a:  # outside a space: its own, closed at once
        assert events == [("open", a)]
    assert events[-1] == ("close", a)
    events.clear()
    with memory.scratch_space():
        with memory.kept_open("k", opener) as b:
            pass
        with memory.kept_open("k", opener) as c:
            pass
        with memory.kept_open("other", opener) as d:
            pass
        assert b is c and b is not d and [e for e, _ in events] == ["open", "open"]
    assert sorted(e for e, _ in events) == ["close", "close", "open", "open"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_nonfinite_check_counts_exactly_when_a_finite_sum_overflows(dtype):
    # The check's fast path is a sum: finite elements whose sum overflows (here every one
    # near the dtype's max) must not count, and NaN/Inf among them must, each one.
    big = torch.finfo(dtype).max / 2
    x = torch.full((4096,), big, dtype=dtype)
    assert not bool(torch.isfinite(x.sum()))  # the sum overflows ...
    stats = engine.RunStats()
    engine._check_finite("t", x, "warn", stats)
    assert stats.nonfinite == {}  # ... but nothing is NaN or infinite
    x[7], x[8], x[9] = math.nan, math.inf, -math.inf
    engine._check_finite("t", x, "warn", stats)
    assert stats.nonfinite == {"t": 3}
    with pytest.raises(NonFiniteError, match="3 NaN/Inf"):
        engine._check_finite("t", x, "error", stats)
    engine._check_finite("t", torch.ones(8, dtype=dtype), "error", stats)  # finite: silent


def test_an_input_passed_through_is_written_from_where_it_lies(tmp_path, shard, monkeypatch):
    """A task returning an input chunk unchanged (merge's and apply's untouched tensors):
    the writer gets the input's own memory, in place from the page cache or in the slot,
    never a copy, and writes its bytes."""
    from stream_tv.io import reader

    tensors, specs = shard
    monkeypatch.setattr(reader, "MIN_MAP_BYTES", 1)
    for in_place in (True, False):
        if not in_place:
            monkeypatch.setattr(reader.Reader, "map_rows", lambda self, *a: None)
        given, handed = [], []

        def task(spec, given=given):
            def compute(chunk):
                (x,) = chunk.inputs
                given.append((x.data_ptr(), x.numel() * x.element_size()))
                return x

            return engine.Task(
                spec.name, [spec], compute, out=OutTensor(spec.name, spec.dtype, spec.shape)
            )

        tasks = [task(s) for s in specs.values()]
        plan = OutputPlan.build([t.out for t in tasks], 600)
        out = tmp_path / f"out-{in_place}"
        writer = ShardWriter(out, plan, plan.fingerprint())
        write = writer.write

        def recording(name, offset, data, write=write, handed=handed):
            handed.append((np.frombuffer(data, dtype=np.uint8).ctypes.data, len(data)))
            return write(name, offset, data)

        writer.write = recording
        writer.begin()
        stats = engine.run(tasks, device=CPU, chunk_bytes=64, sink=writer, progress=False)
        writer.finish({})
        assert (stats.bytes_mapped > 0) == in_place
        nonempty = [g for g in given if g[1]]
        assert nonempty and [h for h in handed if h[1]] == nonempty  # the inputs' own bytes
        got = load_tensors(out)
        for name, t in tensors.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 30])
def test_cached_chunks_are_used_in_place_with_the_same_outputs(
    tmp_path, shard, monkeypatch, chunk_bytes
):
    from stream_tv.io import reader

    tensors, specs = shard  # just written: in the page cache
    monkeypatch.setattr(reader, "MIN_MAP_BYTES", 1)  # map even these small chunks
    outs = {}
    for in_place in (True, False):
        if not in_place:
            monkeypatch.setattr(reader.Reader, "map_rows", lambda self, *a: None)
        tasks = copy_tasks(specs, {})
        plan = OutputPlan.build([t.out for t in tasks], 600)
        writer = ShardWriter(tmp_path / f"out-{in_place}", plan, plan.fingerprint())
        writer.begin()
        stats = engine.run(tasks, device=CPU, chunk_bytes=chunk_bytes, sink=writer, progress=False)
        writer.finish({})
        outs[in_place] = load_tensors(tmp_path / f"out-{in_place}")
        assert stats.bytes_read == sum(s.nbytes for s in specs.values())
        if in_place:
            assert 0 < stats.bytes_mapped <= stats.bytes_read
        else:
            assert stats.bytes_mapped == 0
    for name, t in tensors.items():
        assert torch.equal(outs[True][name], t.float() * 2)
        assert torch.equal(outs[True][name], outs[False][name])
