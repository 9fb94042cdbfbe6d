"""Reliability, in process: resume, interruption, verify, NaN/Inf, full disk, unwritable
output, concurrent writers, corrupt inputs through the CLI.

Every scenario compares with an uninterrupted run byte for byte (all files of the output
directory), so "resume produces exactly the same output" is checked, not assumed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_tensors, save_checkpoint
from safetensors.torch import save_file

from stream_tv import engine, verify_output
from stream_tv.cli import cli
from stream_tv.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_IO, EXIT_VERIFY_FAILED
from stream_tv.io.writer import CHECKSUMS_KEY, LOCK_FILE, STATE_DIR, STATE_FILE

INDEX = "model.safetensors.index.json"
# Small shards and chunks: ~10 shards, several chunks per tensor.
OPTS = ["-q", "--device", "cpu", "--max-shard-size", "3KB", "--chunk-size", "600"]


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def model_pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = {}
    for i in range(6):
        dtype = (torch.bfloat16, torch.float16, torch.float32)[i % 3]
        base[f"layers.{i}.weight"] = torch.randn(24, 16, generator=g).to(dtype)
        base[f"layers.{i}.bias"] = torch.randn(16, generator=g).to(dtype)
    base["norm.scale"] = torch.tensor(1.5)
    ft = {k: (v.double() * 1.01 + 0.001).to(v.dtype) for k, v in base.items()}
    return base, ft


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base, ft = model_pair()
    save_checkpoint(root / "base", base, shards=2)
    save_checkpoint(root / "ft", ft, shards=3)
    return root / "base", root / "ft"


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    """An uninterrupted extract: {file name: bytes} of the whole output directory."""
    out = tmp_path_factory.mktemp("ref") / "tv"
    r = invoke("extract", *pair, "-o", out, *OPTS)
    assert r.exit_code == 0, r.output
    return files_of(out)


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def shard_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("model-*.safetensors"))


def interrupt_at(monkeypatch, chunk: int) -> None:
    """Raise KeyboardInterrupt in the main thread at the ``chunk``-th output chunk, as a
    Ctrl-C would arrive."""
    calls = {"n": 0}
    real = engine._check_finite

    def check(*args, **kw):
        calls["n"] += 1
        if calls["n"] == chunk:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(engine, "_check_finite", check)


def assert_unfinished(out: Path) -> None:
    """What an interrupted run leaves: no index, no temporary shard, the journal."""
    assert not (out / INDEX).exists()
    assert not list(out.glob(".model-*")), "the unfinished shard must be removed"
    assert (out / STATE_DIR / STATE_FILE).is_file()


# ---- resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 25])
def test_interrupt_then_resume_is_byte_identical(pair, reference, tmp_path, monkeypatch, chunk):
    out = tmp_path / "tv"
    with monkeypatch.context() as m:
        interrupt_at(m, chunk)
        r = invoke("extract", *pair, "-o", out, *OPTS)
    assert r.exit_code == EXIT_INTERRUPTED, r.output
    assert "rerun the same command to resume" in r.stderr and "--restart" in r.stderr
    assert "Traceback" not in r.output
    assert_unfinished(out)
    kept = shard_names(out)
    kept_bytes = {n: (out / n).read_bytes() for n in kept}
    # resume with another chunk size: chunking never changes the bytes
    r = invoke("extract", *pair, "-o", out, *OPTS[:-1], "1000")
    assert r.exit_code == 0, r.output
    if kept:
        assert f"resumed: {len(kept)} shard(s)" in r.output
    assert files_of(out) == reference
    assert all((out / n).read_bytes() == b for n, b in kept_bytes.items())


def test_resume_twice_and_repeat_runs_identical(pair, reference, tmp_path, monkeypatch):
    out = tmp_path / "tv"
    for chunk in (5, 9):  # interrupted twice: the second run resumes, then is interrupted
        with monkeypatch.context() as m:
            interrupt_at(m, chunk)
            assert invoke("extract", *pair, "-o", out, *OPTS).exit_code == EXIT_INTERRUPTED
    assert invoke("extract", *pair, "-o", out, *OPTS).exit_code == 0
    assert files_of(out) == reference
    again = tmp_path / "again"
    assert invoke("extract", *pair, "-o", again, *OPTS[:-1], "64MB").exit_code == 0
    assert files_of(again) == reference


def test_resume_rewrites_a_damaged_completed_shard(pair, reference, tmp_path, monkeypatch):
    out = tmp_path / "tv"
    with monkeypatch.context() as m:
        interrupt_at(m, 40)
        assert invoke("extract", *pair, "-o", out, *OPTS).exit_code == EXIT_INTERRUPTED
    kept = shard_names(out)
    assert len(kept) >= 2
    damaged = out / kept[0]
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x40  # same size, same header: only the checksum can tell
    damaged.write_bytes(bytes(data))
    (out / kept[1]).unlink()
    r = invoke("extract", *pair, "-o", out, *OPTS)
    assert r.exit_code == 0, r.output
    assert f"resumed: {len(kept) - 2} shard(s)" in r.output
    assert files_of(out) == reference


def test_different_command_refuses_then_restart(pair, tmp_path, monkeypatch):
    out = tmp_path / "tv"
    with monkeypatch.context() as m:
        interrupt_at(m, 7)
        assert invoke("extract", *pair, "-o", out, *OPTS).exit_code == EXIT_INTERRUPTED
    before = files_of(out)
    for other in (["--dtype", "bf16"], ["--max-shard-size", "5KB"]):
        r = invoke("extract", *pair, "-o", out, *OPTS, *other)
        assert r.exit_code == EXIT_BAD_INPUT
        assert "unfinished run of a different command" in r.stderr
        assert "--restart" in r.stderr
        assert files_of(out) == before  # nothing touched
    r = invoke("extract", *pair, "-o", out, *OPTS, "--dtype", "bf16", "--restart")
    assert r.exit_code == 0, r.output
    assert "resumed" not in r.output
    fresh = tmp_path / "fresh"
    assert invoke("extract", *pair, "-o", fresh, *OPTS, "--dtype", "bf16").exit_code == 0
    assert files_of(out) == files_of(fresh)


def test_replaced_input_refuses_resume(pair, tmp_path, monkeypatch):
    base, ft = pair
    ft2 = tmp_path / "ft2"
    save_checkpoint(ft2, model_pair()[1], shards=3)
    out = tmp_path / "tv"
    with monkeypatch.context() as m:
        interrupt_at(m, 7)
        assert invoke("extract", base, ft2, "-o", out, *OPTS).exit_code == EXIT_INTERRUPTED
    shard = sorted(ft2.glob("*.safetensors"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # re-downloaded, say
    r = invoke("extract", base, ft2, "-o", out, *OPTS)
    assert r.exit_code == EXIT_BAD_INPUT and "different command" in r.stderr


def test_finished_output_is_not_resumed_silently(pair, reference, tmp_path):
    out = tmp_path / "tv"
    assert invoke("extract", *pair, "-o", out, *OPTS).exit_code == 0
    r = invoke("extract", *pair, "-o", out, *OPTS)
    assert r.exit_code == EXIT_BAD_INPUT and "already holds a finished model" in r.stderr
    r = invoke("extract", *pair, "-o", out, *OPTS, "--overwrite")
    assert r.exit_code == 0 and files_of(out) == reference


def test_killed_between_index_and_journal_removal_completes(pair, reference, tmp_path):
    """A run killed after writing the index but before removing its journal: the same command
    finishes it (verifying every shard) instead of refusing; verify flags it meanwhile."""
    out = write_files(tmp_path / "tv", reference)
    (out / STATE_DIR).mkdir()
    (out / STATE_DIR / STATE_FILE).write_text(json.dumps({"fingerprint": "?", "completed": {}}))
    assert invoke("verify", out).exit_code == EXIT_VERIFY_FAILED
    r = invoke("extract", *pair, "-o", out, *OPTS)
    assert r.exit_code == EXIT_BAD_INPUT  # "?" is not this command's fingerprint
    (out / STATE_DIR / STATE_FILE).write_text(json.dumps(_journal_of(pair, tmp_path)))
    r = invoke("extract", *pair, "-o", out, *OPTS)
    assert r.exit_code == 0, r.output
    assert files_of(out) == reference
    assert not (out / STATE_DIR).exists()


def _journal_of(pair, tmp_path) -> dict:
    """The journal of this command with every shard complete (taken just before finish)."""
    from stream_tv.io import writer

    saved = {}
    real = writer.ShardWriter.finish

    def finish(self, metadata):
        saved.update(json.loads((self.out / STATE_DIR / STATE_FILE).read_text()))
        return real(self, metadata)

    mp = pytest.MonkeyPatch()
    mp.setattr(writer.ShardWriter, "finish", finish)
    try:
        assert invoke("extract", *pair, "-o", tmp_path / "j", *OPTS).exit_code == 0
    finally:
        mp.undo()
    return saved


# ---- checksums in the index and verify ----------------------------------------------------


def test_index_records_crc32_of_each_shard(reference):
    meta = json.loads(reference[INDEX])["metadata"]
    sums = meta[CHECKSUMS_KEY]
    shards = sorted(n for n in reference if n.startswith("model-"))
    assert sorted(sums) == shards and len(shards) >= 5
    for n in shards:
        assert sums[n] == f"crc32:{zlib.crc32(reference[n]):08x}"


def write_files(out: Path, files: dict[str, bytes]) -> Path:
    out.mkdir()
    for n, b in files.items():
        (out / n).write_bytes(b)
    return out


def test_verify_ok_and_recompute(pair, reference, tmp_path):
    out = write_files(tmp_path / "tv", reference)
    r = invoke("verify", out)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("ok: ") and "crc32 checksum(s) match" in r.output
    r = invoke("verify", out, "--base", pair[0], "--finetuned", pair[1], "-q")
    assert r.exit_code == 0, r.output
    assert "identical to a recomputation" in r.output
    r = invoke("verify", out, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["ok"] is True


def test_verify_apply_output(pair, reference, tmp_path):
    tv = write_files(tmp_path / "tv", reference)
    out = tmp_path / "mix"
    r = invoke("apply", pair[0], tv, tv, "--scale", "0.5", "--scale", "-0.25", "-o", out, *OPTS)
    assert r.exit_code == 0, r.output
    r = invoke("verify", out, "--base", pair[0], "--task-vector", tv, "--task-vector", tv)
    assert r.exit_code == 0 and "identical to a recomputation" in r.output, r.output
    r = invoke("verify", out, "--base", pair[0], "--task-vector", tv)
    assert r.exit_code == EXIT_BAD_INPUT and "written from 2 input(s); 1 given" in r.stderr
    r = invoke("verify", out, "--base", pair[0], "--finetuned", pair[1])
    assert r.exit_code == EXIT_BAD_INPUT and "--task-vector" in r.stderr
    r = invoke("verify", out, "--base", pair[0], "--adapter", tmp_path)
    assert r.exit_code == EXIT_BAD_INPUT


def test_verify_adapter_needs_merge(reference, pair, tmp_path):
    out = write_files(tmp_path / "m", reference)
    index = json.loads(reference[INDEX])
    index["metadata"]["operation"] = "merge"
    (out / INDEX).write_text(json.dumps(index))
    r = invoke("verify", out, "--base", pair[0], "--adapter", tmp_path)
    assert r.exit_code == EXIT_BAD_INPUT
    assert "no adapter_model.safetensors" in r.stderr and str(tmp_path) in r.stderr


def _first_tensor(path: Path) -> tuple[int, int]:
    """(header bytes, first tensor's byte count) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    first = min(header.values(), key=lambda v: v["data_offsets"][0])
    return 8 + n, first["data_offsets"][1] - first["data_offsets"][0]


@pytest.mark.parametrize(
    "damage, expect",
    [
        ("flip", "crc32 is"),
        ("flip+crc", "differ from the recomputation"),
        ("delete", "is missing"),
        ("truncate", "truncated"),
        ("no-index", f"no {INDEX}"),
        ("total", "total_size"),
        ("journal", STATE_FILE),
        ("partial", "temporary file"),
        ("stray", "does not name"),
        ("nan", "NaN/Inf in 1 tensor(s)"),
    ],
)
def test_verify_finds_damage(pair, reference, tmp_path, damage, expect):
    out = write_files(tmp_path / "tv", reference)
    shard = out / sorted(n for n in reference if n.startswith("model-"))[1]
    index = json.loads(reference[INDEX])
    start, _ = _first_tensor(shard)
    data = bytearray(shard.read_bytes())
    if damage.startswith("flip"):
        data[start + 1] ^= 0x10
        shard.write_bytes(bytes(data))
        if damage == "flip+crc":
            index["metadata"][CHECKSUMS_KEY][shard.name] = f"crc32:{zlib.crc32(data):08x}"
    elif damage == "delete":
        shard.unlink()
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-4]))
    elif damage == "no-index":
        (out / INDEX).unlink()
    elif damage == "total":
        index["metadata"]["total_size"] += 1
    elif damage == "journal":
        (out / STATE_DIR).mkdir()
        (out / STATE_DIR / STATE_FILE).write_text("{}")
    elif damage == "partial":
        (out / f".{shard.name}.partial").write_bytes(b"x")
    elif damage == "stray":
        (out / "model-00099-of-00099.safetensors").write_bytes(reference[shard.name])
    elif damage == "nan":
        dtype = json.loads(data[8:start])
        dtype.pop("__metadata__")
        name, info = min(dtype.items(), key=lambda kv: kv[1]["data_offsets"][0])
        t = torch.frombuffer(data, dtype=torch.float32, count=1, offset=start)
        t[0] = float("nan")
        shard.write_bytes(bytes(data))
        index["metadata"][CHECKSUMS_KEY][shard.name] = f"crc32:{zlib.crc32(data):08x}"
    if (out / INDEX).exists():
        (out / INDEX).write_text(json.dumps(index))
    args = ["--base", pair[0], "--finetuned", pair[1]] if damage == "flip+crc" else []
    r = invoke("verify", out, *args, "-q")
    assert r.exit_code == EXIT_VERIFY_FAILED, r.output
    assert expect in r.stderr, r.stderr
    assert "verification failed" in r.stderr and "Traceback" not in r.output
    if damage == "flip+crc":
        assert "max abs diff" in r.stderr
    if damage == "nan":
        assert name in r.stderr


def test_verify_accepts_nonfinite_that_comes_from_the_inputs(tmp_path):
    base = {"w": torch.zeros(4, 4), "b": torch.ones(3)}
    ft = {"w": torch.zeros(4, 4), "b": torch.tensor([1.0, float("inf"), 2.0])}
    save_checkpoint(tmp_path / "base", base)
    save_checkpoint(tmp_path / "ft", ft)
    out = tmp_path / "tv"
    r = invoke("extract", tmp_path / "base", tmp_path / "ft", "-o", out, "-q")
    assert r.exit_code == 0 and "warning: 1 NaN/Inf value(s) in b" in r.stderr
    assert invoke("verify", out, "-q").exit_code == EXIT_VERIFY_FAILED
    res = verify_output(out, base=tmp_path / "base", finetuned=tmp_path / "ft")
    assert res.ok and res.nonfinite_from_inputs == {"b": 1}
    assert "coming from the inputs" in res.summary()


# ---- NaN / Inf ----------------------------------------------------------------------------


def test_nonfinite_modes(tmp_path):
    base = {"a": torch.zeros(8, 4), "b": torch.ones(6)}
    ft = {"a": torch.zeros(8, 4), "b": torch.ones(6)}
    ft["a"][3, 1] = float("nan")
    ft["a"][5, 2] = float("inf")
    save_checkpoint(tmp_path / "base", base)
    save_checkpoint(tmp_path / "ft", ft)
    args = [tmp_path / "base", tmp_path / "ft", "-q", "--chunk-size", "64"]
    r = invoke("extract", *args, "-o", tmp_path / "warn")  # default for extract: warn
    assert r.exit_code == 0 and "warning: 2 NaN/Inf value(s) in a" in r.stderr
    r = invoke("extract", *args, "-o", tmp_path / "err", "--on-nonfinite", "error")
    assert r.exit_code == EXIT_BAD_INPUT
    assert "NaN/Inf value(s) in output tensor 'a'" in r.stderr and "--on-nonfinite" in r.stderr
    assert not (tmp_path / "err" / INDEX).exists()
    # apply defaults to error: the count of the chunk holding them is named
    tv = tmp_path / "warn"
    r = invoke("apply", tmp_path / "base", tv, "-o", tmp_path / "applied", "-q")
    assert r.exit_code == EXIT_BAD_INPUT and "2 NaN/Inf value(s) in output tensor 'a'" in r.stderr
    r = invoke(
        "apply", tmp_path / "base", tv, "-o", tmp_path / "a2", "-q", "--on-nonfinite", "warn"
    )
    assert r.exit_code == 0 and "warning: 2 NaN/Inf value(s) in a" in r.stderr


# ---- full disk, unwritable output, concurrent writers ---------------------------------------


def test_disk_full_midway_then_resume(pair, reference, tmp_path, monkeypatch):
    out = tmp_path / "tv"
    calls = {"n": 0}
    real = os.pwrite

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", pwrite)
        r = invoke("extract", *pair, "-o", out, *OPTS)
    assert r.exit_code == EXIT_IO, r.output
    assert "disk full" in r.stderr and "completed shards are kept" in r.stderr
    assert "unfinished shard was removed" in r.stderr
    assert_unfinished(out)
    kept = shard_names(out)
    assert kept, "shards completed before the disk filled are kept"
    r = invoke("extract", *pair, "-o", out, *OPTS)
    assert r.exit_code == 0 and f"resumed: {len(kept)} shard(s)" in r.output
    assert files_of(out) == reference


def test_disk_full_reported_at_fsync(pair, tmp_path, monkeypatch):
    out = tmp_path / "tv"

    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):  # the journal is written at the start (1st call); then the first shard
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        r = invoke("extract", *pair, "-o", out, *OPTS, "--fsync")
    assert r.exit_code == EXIT_IO and "disk full" in r.stderr, r.output
    assert not list(out.glob(".model-*")) and not list(out.glob("model-*"))


def test_free_space_checked_up_front(pair, reference, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "tv"
    need = sum(len(b) for n, b in reference.items() if n.startswith("model-"))
    real = shutil.disk_usage
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
        r = invoke("extract", *pair, "-o", out, *OPTS)
        assert r.exit_code == EXIT_IO
        assert "not enough free space" in r.stderr and "--no-space-check" in r.stderr
        assert f"needs {need / 1000:.2f} KB" in r.stderr and "has 1.00 KB free" in r.stderr
        assert not shard_names(out)
        r = invoke("extract", *pair, "-o", out, *OPTS, "--no-space-check")
        assert r.exit_code == 0, r.output
    assert files_of(out) == reference


def test_unwritable_output(pair, tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with monkeypatch.context() as m:  # as root chmod does not deny: simulate it
        m.setattr(Path, "mkdir", denied)
        r = invoke("extract", *pair, "-o", tmp_path / "new" / "tv", *OPTS)
    assert r.exit_code == EXIT_IO and "cannot create the output directory" in r.stderr
    assert "Permission denied" in r.stderr and "Traceback" not in r.output
    real_open = os.open

    def open_(path, flags, *a, **k):
        if str(path).endswith((LOCK_FILE, ".partial")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, flags, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(os, "open", open_)
        r = invoke("extract", *pair, "-o", tmp_path / "tv2", *OPTS)
    assert r.exit_code == EXIT_IO and "Permission denied" in r.stderr, r.output


def test_second_writer_is_refused_while_the_first_holds_the_lock(
    pair, reference, tmp_path, monkeypatch
):
    out = tmp_path / "tv"
    with monkeypatch.context() as m:
        interrupt_at(m, 7)
        assert invoke("extract", *pair, "-o", out, *OPTS).exit_code == EXIT_INTERRUPTED
    before = files_of(out)
    fd = os.open(out / STATE_DIR / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "the first run", still writing
        for extra in ([], ["--overwrite"], ["--restart"], ["--dtype", "bf16"]):
            r = invoke("extract", *pair, "-o", out, *OPTS, *extra)
            assert r.exit_code == EXIT_BAD_INPUT, (extra, r.output)
            assert "another stream-tv run is writing to this directory" in r.stderr
            assert files_of(out) == before
    finally:
        os.close(fd)
    r = invoke("extract", *pair, "-o", out, *OPTS)
    assert r.exit_code == 0 and files_of(out) == reference


# ---- corrupt inputs through the CLI -------------------------------------------------------


def _good_file(path: Path) -> Path:
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3)}, path, {"format": "pt"})
    return path


def _raw(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


CORRUPT = {
    "truncated": lambda good: good[:-10],
    "header-length-past-end": lambda good: struct.pack("<Q", len(good) * 3) + good[8:],
    "header-garbage": lambda good: struct.pack("<Q", 12) + b"{not json!!}" + good[20:],
    "overlapping-offsets": lambda good: _raw(
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
        },
        bytes(24),
    ),
    "offsets-past-end": lambda good: _raw(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)
    ),
    "unknown-dtype": lambda good: _raw(
        {"a": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)
    ),
}


def make_corrupt(root: Path, case: str) -> tuple[Path, str]:
    """A checkpoint directory damaged as ``case``; returns it and the file to be named."""
    d = root / case
    d.mkdir(parents=True)
    good = _good_file(root / f"{case}-good.safetensors").read_bytes()
    if case == "index-wrong-file":
        (d / "model-00001-of-00001.safetensors").write_bytes(good)
        (d / "other.safetensors").write_bytes(_raw({}))
        index = {"metadata": {}, "weight_map": {"a": "other.safetensors", "b": "other.safetensors"}}
        (d / INDEX).write_text(json.dumps(index))
        return d, INDEX
    (d / "model.safetensors").write_bytes(CORRUPT[case](good))
    return d, "model.safetensors"


CASES = [*CORRUPT, "index-wrong-file"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["inspect", "extract"])
def test_corrupt_input_named_exit_2(tmp_path, case, command):
    bad, named = make_corrupt(tmp_path, case)
    good = tmp_path / "good"
    good.mkdir()
    _good_file(good / "model.safetensors")
    if command == "inspect":
        r = invoke("inspect", bad)
    else:
        r = invoke("extract", good, bad, "-o", tmp_path / "out", "-q")
    assert r.exit_code == EXIT_BAD_INPUT, r.output
    assert r.stderr.startswith("error: ") and named in r.stderr
    assert "Traceback" not in r.output and "internal error" not in r.output
    assert not (tmp_path / "out").exists()


def test_corrupt_inputs_in_subprocesses_no_traceback_no_hang(tmp_path):
    """The real console entry point, each case in its own process under a timeout."""
    procs = {}
    for case in CASES:
        bad, named = make_corrupt(tmp_path, case)
        cmd = ["timeout", "60", sys.executable, "-m", "stream_tv.cli", "inspect", str(bad)]
        procs[case] = (
            named,
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        )
    for case, (named, p) in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == EXIT_BAD_INPUT, (case, p.returncode, err)
        assert named in err and "Traceback" not in err, (case, err)


def test_extract_bytes_match_loaded_tensors(pair, reference, tmp_path):
    """Sanity: the reference output holds ft - base (so byte equality above means something)."""
    out = write_files(tmp_path / "tv", reference)
    tv = load_tensors(out)
    base, ft = model_pair()
    for n in base:
        assert torch.equal(tv[n], ft[n].float() - base[n].float()), n


def test_the_console_exit_keeps_every_output_and_stdout_whole(pair, reference, tmp_path):
    """console.main freezes the collector before exiting (a faster exit): the process's
    outputs are all there, byte for byte, and what it printed reached the pipe in full."""
    out = tmp_path / "tv"
    cmd = [sys.executable, "-m", "stream_tv.cli", "extract", *map(str, pair), "-o", str(out)]
    r = subprocess.run([*cmd, *OPTS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert files_of(out) == reference
    r = subprocess.run(
        [sys.executable, "-m", "stream_tv.cli", "inspect", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["tensors"]) == len(load_tensors(out))
