"""io/writer.py: the shard planner and size parser (properties), and a planned checkpoint
written piece by piece that real loaders read back."""

from __future__ import annotations

import json
import math
import os
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from conftest import load_tensors
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from stream_tv.errors import OutputError
from stream_tv.io.index import INDEX_NAME, read_header
from stream_tv.io.writer import (
    OutputPlan,
    OutTensor,
    ShardLayout,
    ShardWriter,
    check_output_location,
    format_size,
    parse_size,
    plan_shards,
    shard_name,
)

# ---- plan_shards -------------------------------------------------------------------------

sizes = st.lists(st.integers(min_value=0, max_value=120), max_size=40)


def fewest_shards(items: list[int], limit: int) -> int:
    """Dynamic programme: fewest contiguous groups, each <= limit or a single item."""
    best = [0] + [math.inf] * len(items)
    for j in range(1, len(items) + 1):
        for i in range(j):
            if j - i == 1 or sum(items[i:j]) <= limit:
                best[j] = min(best[j], best[i] + 1)
    return best[-1]


@settings(max_examples=300, deadline=None)
@given(sizes, st.integers(min_value=1, max_value=150))
def test_plan_shards_properties(nbytes, limit):
    items = [(f"t{i}", n) for i, n in enumerate(nbytes)]
    size = dict(items)
    shards = plan_shards(items, limit)
    # order kept, every name exactly once
    assert [n for s in shards for n in s] == [n for n, _ in items]
    if not items:
        assert shards == [[]]
        return
    assert all(shards)
    for s in shards:  # within the limit, unless one oversize tensor alone
        total = sum(size[n] for n in s)
        assert total <= limit or len(s) == 1
    for a, b in zip(shards, shards[1:], strict=False):  # greedy: the next one did not fit
        assert sum(size[n] for n in a) + size[b[0]] > limit
    assert len(shards) == fewest_shards(nbytes, limit)  # and greedy is minimal


def test_plan_shards_examples():
    assert plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards([("big", 100), ("x", 1), ("y", 1)], 10) == [["big"], ["x", "y"]]
    assert plan_shards([("a", 0), ("b", 0)], 1) == [["a", "b"]]
    assert shard_name(0, 3) == "model-00001-of-00003.safetensors"


# ---- parse_size --------------------------------------------------------------------------

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3,
         "M": 10**6, "G": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False),
    st.sampled_from(sorted(UNITS)),
    st.sampled_from(["", " "]),
    st.booleans(),
)
def test_parse_size_property(number, unit, space, lower):
    text = f"{number}{space}{unit.lower() if lower else unit}"
    exact = int(Decimal(number) * UNITS[unit])  # floor of the exact value
    if exact <= 0:
        with pytest.raises(ValueError, match="positive"):
            parse_size(text)
    else:
        assert parse_size(text) == exact
        assert parse_size(f"  {text} ") == exact


@settings(deadline=None)
@given(st.integers(min_value=1, max_value=2**62))
def test_parse_size_int_passthrough(n):
    assert parse_size(n) == n


@pytest.mark.parametrize("bad", ["", "MB", "5 XB", "1e9", "-5MB", "5MB5", "1,5GB", "0", 0, -3])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_parse_size_examples():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64MiB") == 64 * 2**20
    assert parse_size("0.29GB") == 290_000_000  # exact decimal arithmetic, not float
    assert format_size(999) == "999 B" and format_size(1_500_000_000) == "1.50 GB"


# ---- layouts and the writer --------------------------------------------------------------


def test_shard_layout_header():
    tensors = [OutTensor("a", torch.bfloat16, (3,)), OutTensor("b", torch.float32, (2, 2))]
    layout = ShardLayout.build("x.safetensors", tensors)
    hlen = int.from_bytes(layout.header[:8], "little")
    assert hlen % 8 == 0 and len(layout.header) == 8 + hlen
    header = json.loads(layout.header[8:])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"] == {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}
    assert header["b"] == {"dtype": "F32", "shape": [2, 2], "data_offsets": [6, 22]}
    assert layout.offsets == {"a": 8 + hlen, "b": 8 + hlen + 6}
    assert layout.size == 8 + hlen + 22


def write_plan(out: Path, tensors: dict[str, torch.Tensor], max_shard: int, piece: int = 5):
    """Drive a ShardWriter as the engine does: tensors in order, bytes in pieces."""
    plan = OutputPlan.build(
        [OutTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], max_shard
    )
    writer = ShardWriter(out, plan, plan.fingerprint())
    writer.begin()
    for n, t in tensors.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if not data:
            writer.write(n, 0, memoryview(data))
        for k in range(0, len(data), piece):
            writer.write(n, k, memoryview(data[k : k + piece]))
    writer.finish({"operation": "test"})
    return plan


def test_writer_round_trip_with_empty_tensors(tmp_path):
    """Empty tensors first, last, and alone in a shard: a shard the tensors before it have
    already completed must not be reopened."""
    tensors = {
        "e0": torch.zeros(0),
        "a": torch.arange(6, dtype=torch.float32),
        "e1": torch.zeros(0, 3, dtype=torch.bfloat16),  # after "a" completes shard 1
        "b": torch.arange(10, dtype=torch.float16),
        "s": torch.tensor(2.5, dtype=torch.float64),
        "c": torch.ones(3, 2, dtype=torch.int64),
        "e2": torch.zeros(4, 0),
    }
    plan = write_plan(tmp_path / "out", tensors, max_shard=24)
    out = tmp_path / "out"
    assert len(plan.shards) >= 3
    got = load_tensors(out)
    assert got.keys() == tensors.keys()
    for n, t in tensors.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t)
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert index["metadata"]["operation"] == "test"
    assert set(index["weight_map"]) == set(tensors)
    for shard in {*index["weight_map"].values()}:
        read_header(out / shard)  # our own validation accepts it too
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(s.name for s in plan.shards), INDEX_NAME]
    )


def test_writer_only_empty_tensors(tmp_path):
    write_plan(tmp_path / "out", {"e": torch.zeros(0), "f": torch.zeros(2, 0)}, max_shard=8)
    got = load_tensors(tmp_path / "out")
    assert got["e"].shape == (0,) and got["f"].shape == (2, 0)


def test_writer_refuses_out_of_order_bytes(tmp_path):
    plan = OutputPlan.build([OutTensor("a", torch.float32, (4,))], 100)
    writer = ShardWriter(tmp_path / "o", plan, "fp")
    writer.begin()
    with pytest.raises(AssertionError, match="out-of-order"):
        writer.write("a", 4, memoryview(bytes(4)))
    writer.abort()
    assert not list((tmp_path / "o").glob("model-*"))  # nothing that looks finished


def test_writer_existing_output(tmp_path):
    out = tmp_path / "out"
    write_plan(out, {"a": torch.ones(4)}, 100)
    (out / "model-00001-of-00007.safetensors").write_bytes(b"stale shard of an older run")
    (out / "notes.txt").write_text("mine")
    plan = OutputPlan.build([OutTensor("b", torch.float32, (2,))], 100)
    with pytest.raises(OutputError, match="already holds") as e:
        ShardWriter(out, plan, plan.fingerprint("other")).begin()
    assert str(out) in str(e.value) and "--overwrite" in str(e.value)
    assert (out / INDEX_NAME).is_file()  # untouched
    writer = ShardWriter(out, plan, plan.fingerprint("other"), overwrite=True)
    writer.begin()
    writer.write("b", 0, memoryview(torch.full((2,), 7.0).numpy().tobytes()))
    writer.finish({})
    got = load_tensors(out)
    assert list(got) == ["b"] and torch.equal(got["b"], torch.full((2,), 7.0))
    assert sorted(p.name for p in out.iterdir()) == [
        "model-00001-of-00001.safetensors",
        INDEX_NAME,
        "notes.txt",  # not ours: kept
    ]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        ShardWriter(tmp_path / "file", plan, "fp").begin()


def test_check_output_location(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    single = tmp_path / "single" / "model.safetensors"
    single.parent.mkdir()
    single.write_bytes(b"")
    for bad in [base, base / "out", base / "a" / "b", tmp_path, single.parent, single]:
        with pytest.raises(OutputError, match="input") as e:
            check_output_location(bad, [base, single])
        assert str(bad) in str(e.value)
    check_output_location(tmp_path / "elsewhere", [base, single])
    check_output_location(tmp_path / "base-out", [base, single])  # a prefix is not a parent
    check_output_location(single.parent / "tv", [base, single])  # beside an input file


@pytest.mark.parametrize("durable", [False, True])
def test_fsync_flushes_every_shard_only_when_asked(tmp_path, monkeypatch, durable):
    import os

    from stream_tv import RunOptions, extract_task_vector

    base, ft = tmp_path / "base", tmp_path / "ft"
    for d, shift in ((base, 0.0), (ft, 0.5)):
        d.mkdir()
        from safetensors.torch import save_file

        save_file(
            {f"w{i}": torch.full((8, 8), float(i) + shift) for i in range(3)},
            str(d / "m.safetensors"),
        )
    flushed: list[str] = []
    real = os.fsync

    def fsync(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    opts = RunOptions(progress=False, max_shard_size=300, fsync=durable)
    extract_task_vector(base, ft, tmp_path / "tv", options=opts)
    shards = [p for p in flushed if p.endswith(".partial")]
    assert len(shards) == (3 if durable else 0)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
def test_writer_drop_behind_advises_every_written_byte(tmp_path, monkeypatch):
    """With drop_behind, write-back starts every window and each window is advised again
    while later ones are written (its write-back has had time to finish), and the whole shard
    once more at its close; the bytes are those of a plain write."""
    from stream_tv.io import writer as writer_mod

    step = 1 << 16
    monkeypatch.setattr(writer_mod, "WRITEBACK_STEP", step)
    calls: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            calls.append((offset, length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(writer_mod.os, "posix_fadvise", record)
    tensors = {"a": torch.randn(40, 1024), "b": torch.randn(24, 1024)}  # 256 KiB: 4 windows
    plan = OutputPlan.build(
        [OutTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], 1e9
    )
    writer = ShardWriter(tmp_path / "d", plan, plan.fingerprint(), drop_behind=True)
    writer.begin()
    for n, t in tensors.items():
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        for k in range(0, len(data), 8192):
            writer.write(n, k, memoryview(data[k : k + 8192]))
    writer.finish({"operation": "test"})
    write_plan(tmp_path / "p", tensors, int(1e9), piece=8192)
    name = plan.shards[0].name
    assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()
    header = len(plan.shards[0].header)
    windows = [(o, n) for o, n in calls if n > 0]
    assert len(windows) >= 3  # one per window written, before the close
    assert all(o >= header for o, _ in windows)  # the header is never advised mid-shard
    assert windows[-1][1] >= 3 * step  # the newest advice reaches back over older windows
    assert calls[-1] == (0, 0)  # and the close advises the whole shard


def test_writer_without_drop_behind_advises_nothing(tmp_path, monkeypatch):
    from stream_tv.io import writer as writer_mod

    monkeypatch.setattr(writer_mod, "WRITEBACK_STEP", 1 << 16)
    calls = []
    monkeypatch.setattr(writer_mod.os, "posix_fadvise", lambda *a: calls.append(a), raising=False)
    write_plan(tmp_path / "p", {"a": torch.randn(64, 1024)}, int(1e9), piece=8192)
    assert calls == []
