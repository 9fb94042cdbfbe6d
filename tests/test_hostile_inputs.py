"""Hostile and unfinished inputs (issue 11, items 5-9 and 12): each refused fast with exit 2
and one message naming the file, never a hang, a blow-up or an "internal error".

Where the old failure was a hang, the test runs under a watchdog (``no_hang``: SIGALRM, which
also interrupts a blocking open()) or in a subprocess with a timeout, memory limit and
measured peak RSS.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_checkpoint
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from stream_tv.cli import cli
from stream_tv.commands import extract as extract_command
from stream_tv.errors import AdapterError, CorruptCheckpointError, InputError, StreamTVError
from stream_tv.io.index import INDEX_NAME, load_checkpoint, read_header
from stream_tv.io.reader import Reader
from stream_tv.lora import Adapter
from stream_tv.lora.config import PatternMatcher, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
EVIL = "([a-z_.0-9]|[a-z_.0-9])*!"  # the issue's key: exponential in re, on every module name


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail (instead of hanging the suite) if the body takes longer than ``seconds``."""

    def fire(*_):
        raise TimeoutError(f"hung: still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def invoke(*args):
    with no_hang():
        return CliRunner().invoke(cli, [str(a) for a in args])


def assert_refused(result, *needles: str) -> str:
    """Exit 2, one message, no traceback or internal error; every needle in stderr."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr
    assert "internal error" not in err and "Traceback" not in result.output, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@dataclass
class Run:
    rc: int | None  # None: killed after the timeout (a hang)
    out: str
    err: str
    max_rss_mb: float


def _limit_memory() -> None:  # in the child: a blow-up fails fast instead of swapping
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def run_cli(*args, timeout: float = 60) -> Run:
    """``python -m stream_tv.cli ARGS`` in a child; its exit code and peak RSS (wait4)."""
    with contextlib.ExitStack() as stack:
        out_f = stack.enter_context(tempfile.TemporaryFile())
        err_f = stack.enter_context(tempfile.TemporaryFile())
        p = subprocess.Popen(
            [sys.executable, "-m", "stream_tv.cli", *map(str, args)],
            cwd=ROOT,
            stdout=out_f,
            stderr=err_f,
            preexec_fn=_limit_memory,
        )
        deadline = time.monotonic() + timeout
        rc = None
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                p.kill()
                _, _, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = rc if rc is not None else -9  # reaped here: keep Popen from waiting
        out_f.seek(0)
        err_f.seek(0)
        return Run(rc, out_f.read().decode(), err_f.read().decode(), usage.ru_maxrss / 1024)


def raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def empty(shape, dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [0, 0]}


# ---- item 5: shapes with a 0 and a huge other size ----------------------------------------


@pytest.mark.parametrize(
    "shape",
    [[2**62, 0], [2**63 - 1, 0], [0, 2**63 - 1], [3, 0, 2**40], [0, 2**20, 2**20, 2**20]],
)
def test_empty_tensor_with_a_huge_size_is_a_valid_empty_tensor(tmp_path, shape):
    path = raw_file(tmp_path / "m.safetensors", {"w": empty(shape)})
    spec = read_header(path)["w"]
    assert spec.shape == tuple(shape) and spec.nbytes == 0 and spec.is_empty
    with Reader() as r:
        t = r.read(spec)
    assert tuple(t.shape) == tuple(shape) and t.numel() == 0
    assert load_checkpoint(tmp_path).total_bytes == 0


@pytest.mark.parametrize(
    "shape, reason",
    [
        ([2**64, 0], "does not fit in a signed 64-bit integer"),
        ([0, 2**64], "does not fit in a signed 64-bit integer"),
        ([2**63, 0], "does not fit in a signed 64-bit integer"),
        ([0, 10**4000], "does not fit in a signed 64-bit integer"),
        ([0, 2**62, 2**62], "torch cannot represent shape"),
        ([2**62, 2**62, 0], "torch cannot represent shape"),
    ],
)
def test_shape_no_tensor_can_have_is_refused_at_header_parse(tmp_path, shape, reason):
    path = raw_file(tmp_path / "m" / "model.safetensors", {"ok": empty([0]), "w": empty(shape)})
    with pytest.raises(CorruptCheckpointError, match=reason) as e:
        read_header(path)
    assert str(e.value).startswith(f"{path}: tensor 'w': ")
    assert len(str(e.value)) < 400  # a 4000-digit size is cut short in the message
    assert_refused(invoke("inspect", path.parent), str(path), "'w'", reason)


@pytest.mark.slow
def test_extract_of_a_huge_empty_tensor_finishes(tmp_path):
    for name in ("base", "ft"):
        raw_file(tmp_path / name / "model.safetensors", {"w": empty([2**62, 0])})
    run = run_cli("extract", tmp_path / "base", tmp_path / "ft", "-o", tmp_path / "o", "-q",
                  "--device", "cpu", timeout=30)  # fmt: skip
    assert run.rc == 0, (run.rc, run.err[-2000:])
    assert run.max_rss_mb < 1024


# ---- item 6: rank_pattern / alpha_pattern keys that backtrack catastrophically ------------


def _first_match_by_re(keys, module):
    return next((k for k in keys if re.match(rf"(.*\.)?({k})$", module)), None)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_catastrophic_pattern_key_is_refused_named(field):
    config = parse_config(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, field: {"q_proj": 4, EVIL: 2}}
    )
    lookup = config.rank_for if field == "rank_pattern" else config.alpha_for
    with no_hang():
        assert lookup("model.layers.0.self_attn.q_proj") == 4  # the first key wins first
        start = time.process_time()
        with pytest.raises(AdapterError) as e:
            lookup("model.layers.0.self_attn.k_proj")
        spent = time.process_time() - start
    msg = str(e.value)
    assert f"field {field!r}" in msg and repr(EVIL) in msg and "backtracks" in msg
    assert spent < 2.0  # the limit is 0.1 s of CPU per module; loose for a loaded machine


def test_catastrophic_pattern_key_is_refused_from_a_thread_too():
    """Off the main thread no signal handler runs: the match goes to a child interpreter."""
    config = parse_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                           "rank_pattern": {"q_proj": 4, EVIL: 2}})  # fmt: skip
    results: dict[str, object] = {}

    def work():
        results["q"] = config.rank_for("model.layers.0.self_attn.q_proj")
        try:
            config.rank_for("model.layers.0.self_attn.k_proj")
        except AdapterError as e:
            results["error"] = str(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "hung"
    assert results["q"] == 4 and repr(EVIL) in str(results.get("error"))


def test_pattern_budget_is_spent_per_key_over_all_modules():
    m = PatternMatcher({r"x+x+y": 1, "q": 2}, limit=0.05, budget=0.0)
    with pytest.raises(AdapterError, match=r"'x\+x\+y' takes too long"):
        m.key_for("model.q")


def test_pattern_key_that_re_cannot_compile_is_refused():
    with pytest.raises(AdapterError, match="rank_pattern.*not a valid regular expression"):
        parse_config({"peft_type": "LORA", "rank_pattern": {"(unclosed": 2}})


_atoms = st.sampled_from(
    ["q_proj", "v_proj", "layers", "mlp", "0", "1", "11", r"\.", ".", ".*", ".+", r"\d", r"\d+",
     "[0-9]", "[01]", "[a-z_]+", r"\w+", "[^.]+", "(q|v)_proj", "(?:up|down)_proj", "_", "^",
     "$", r"\b", "self_attn", "(?i)Q_PROJ", "x?"]
)  # fmt: skip


@st.composite
def _keys(draw):
    parts = draw(st.lists(_atoms, min_size=1, max_size=5))
    key = "".join(parts)
    if draw(st.booleans()):
        key = f"({key})" + draw(st.sampled_from(["", "?", "*", "+", "{1,2}"]))
    if draw(st.booleans()):
        key += "|" + draw(_atoms)
    return key


_modules = st.lists(
    st.sampled_from(["model", "layers", "0", "1", "11", "self_attn", "q_proj", "v_proj", "mlp",
                     "up_proj", "transformer", "h", "c_attn", "experts", "23"]),
    min_size=1, max_size=7,
).map(".".join)  # fmt: skip


def _compiles(key: str) -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            re.compile(rf"(.*\.)?({key})$")
            return True
        except re.error:
            return False


@settings(max_examples=400, deadline=None)
@given(keys=st.lists(_keys().filter(_compiles), max_size=4, unique=True), module=_modules)
def test_bounded_matching_is_re_matching(keys, module):
    """The first key by PEFT's rule (``re.match(rf"(.*\\.)?({k})$", m)``), exactly, for every
    pattern the bound lets through (hypothesis also draws catastrophic ones, refused here)."""
    try:
        got = PatternMatcher(dict.fromkeys(keys, 1)).key_for(module)
    except AdapterError as e:
        assume("takes too long to match" not in str(e))
        raise
    assert got == _first_match_by_re(keys, module)


@settings(max_examples=15, deadline=None)
@given(keys=st.lists(_keys().filter(_compiles), min_size=1, max_size=3, unique=True),
       module=_modules)  # fmt: skip
def test_bounded_matching_in_the_child_interpreter_is_re_matching(keys, module):
    m = PatternMatcher(dict.fromkeys(keys, 1))
    found: list[object] = []
    thread = threading.Thread(target=lambda: found.append(m.key_for(module)))
    thread.start()
    thread.join(30)
    assert found == [_first_match_by_re(keys, module)]


def _base_and_adapter(tmp_path: Path, **config) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    save_file({f"{Q}.weight": torch.randn(8, 6, generator=g)}, str(base / "model.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(
        {f"{P}{Q}.lora_A.weight": torch.randn(2, 6, generator=g),
         f"{P}{Q}.lora_B.weight": torch.randn(8, 2, generator=g)},
        str(adapter / "adapter_model.safetensors"),
    )  # fmt: skip
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **config}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return base, adapter


@pytest.mark.slow
def test_merge_with_a_catastrophic_pattern_exits_2_in_a_child(tmp_path):
    base, adapter = _base_and_adapter(tmp_path, rank_pattern={EVIL: 2})
    run = run_cli("merge", base, adapter, "-o", tmp_path / "out", "-q", timeout=60)
    assert run.rc == 2, (run.rc, run.err[-2000:])
    assert repr(EVIL) in run.err and "internal error" not in run.err
    assert run.max_rss_mb < 1024


@pytest.mark.parametrize("command", ["lora-delta", "compare"])
def test_lora_delta_and_compare_with_a_catastrophic_pattern_exit_2(tmp_path, command):
    base, adapter = _base_and_adapter(tmp_path, alpha_pattern={EVIL: 2})
    args = (
        ["lora-delta", adapter, "-o", tmp_path / "out", "--base", base]
        if command == "lora-delta"
        else ["compare", "--base", base, "--finetuned", base, "--adapter", adapter]
    )
    assert_refused(invoke(*args, "-q"), repr(EVIL), "alpha_pattern")


# ---- item 7: FIFOs and other non-regular files --------------------------------------------


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    "layout",
    ["file-in-dir", "given-directly", "index", "shard-named-by-index", "adapter-config",
     "adapter-weights"],
)  # fmt: skip
def test_fifo_input_is_refused_not_waited_for(tmp_path, layout):
    d = tmp_path / "m"
    if layout == "file-in-dir":
        target = _fifo(d / "model.safetensors")
        load = lambda: load_checkpoint(d)  # noqa: E731
    elif layout == "given-directly":
        target = _fifo(d / "model.safetensors")
        load = lambda: load_checkpoint(target)  # noqa: E731
    elif layout == "index":
        save_checkpoint(d, {"w": torch.ones(2)}, index=False)
        target = _fifo(d / INDEX_NAME)
        load = lambda: load_checkpoint(d)  # noqa: E731
    elif layout == "shard-named-by-index":
        save_checkpoint(d, {"w": torch.ones(2)})
        target = d / "model-00001-of-00001.safetensors"
        target.unlink()
        _fifo(target)
        load = lambda: load_checkpoint(d)  # noqa: E731
    else:
        _, adapter = _base_and_adapter(tmp_path)
        target = adapter / (
            "adapter_config.json" if layout == "adapter-config" else "adapter_model.safetensors"
        )
        target.unlink()
        _fifo(target)
        load = lambda: Adapter.load(adapter)  # noqa: E731
    with no_hang(10), pytest.raises(InputError, match="named pipe") as e:
        load()
    assert str(target) in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["inspect", "extract"])
def test_fifo_shard_through_the_cli_exits_2(tmp_path, command):
    _fifo(tmp_path / "m" / "model.safetensors")
    save_checkpoint(tmp_path / "b", {"w": torch.ones(2)})
    args = ["inspect", tmp_path / "m"]
    if command == "extract":
        args = ["extract", tmp_path / "b", tmp_path / "m", "-o", tmp_path / "o", "-q"]
    run = run_cli(*args, timeout=60)
    assert run.rc == 2 and "named pipe (FIFO)" in run.err, (run.rc, run.err[-2000:])


def test_character_device_and_directory_named_safetensors_are_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").symlink_to("/dev/zero")
    with no_hang(10), pytest.raises(InputError, match="character device"):
        load_checkpoint(d)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()
    with pytest.raises(InputError, match="is a directory, not a regular file"):
        load_checkpoint(d)


def test_symlinks_to_regular_files_are_normal(tmp_path):
    """The Hugging Face cache: snapshot files are symbolic links into blobs/."""
    blobs = save_checkpoint(tmp_path / "blobs", {"a": torch.ones(3), "b": torch.zeros(2)}, shards=2)
    snap = tmp_path / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(os.path.relpath(f, snap))
    ckpt = load_checkpoint(snap)
    with Reader() as r:
        assert torch.equal(r.read(ckpt["a"]), torch.ones(3))
    (snap / "model-00002-of-00002.safetensors").unlink()
    (snap / "model-00002-of-00002.safetensors").symlink_to("../../blobs/gone")
    with pytest.raises(StreamTVError, match="does not exist"):
        load_checkpoint(snap)


def test_reader_refuses_a_file_swapped_for_a_fifo_after_indexing(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2)}, path)
    spec = read_header(path)["w"]
    path.unlink()
    _fifo(path)
    with no_hang(10), Reader() as r, pytest.raises(InputError, match="named pipe"):
        r.read(spec)


def test_permission_denied_is_bad_input_exit_2(tmp_path, monkeypatch):
    d = save_checkpoint(tmp_path / "m", {"w": torch.ones(2)})
    shard = d / "model-00001-of-00001.safetensors"
    if os.geteuid() == 0:  # root reads anything: deny this one file the way the kernel would
        real_open = os.open

        def deny(path, *a, **kw):
            if Path(path) == shard:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *a, **kw)

        monkeypatch.setattr(os, "open", deny)
    else:
        shard.chmod(0)
    with pytest.raises(InputError) as e:
        load_checkpoint(d)
    assert e.value.exit_code == 2 and str(e.value).startswith(f"{shard}: permission denied")
    assert_refused(invoke("inspect", d), str(shard), "permission denied")


# ---- item 8: JSON that breaks json.loads, numbers that break arithmetic -------------------

DEEP = "[" * 100_000 + "]" * 100_000
BIG = "1" * 5000
NESTED_40 = {"a": 1}
for _ in range(40):
    NESTED_40 = {"a": NESTED_40}


def test_deep_and_huge_numbers_in_headers_and_indexes_exit_2(tmp_path):
    cases = {
        "deep-header": (raw_file(tmp_path / "a" / "model.safetensors", DEEP.encode()),
                        "nested too deeply"),
        "big-header": (raw_file(tmp_path / "b" / "model.safetensors",
                                f'{{"w": {{"dtype": "F32", "shape": [{BIG}], "data_offsets": [0, 0]}}}}'.encode()),
                       "more than 4300 digits"),
        "meta-not-string": (raw_file(tmp_path / "c" / "model.safetensors",
                                     {"__metadata__": {"k": NESTED_40}}), "not a string"),
    }  # fmt: skip
    for name, text in {
        "deep-index": DEEP,
        "big-index": f'{{"metadata": {{"total_size": {BIG}}}, "weight_map": {{}}}}',
        "deep-metadata": json.dumps({"metadata": NESTED_40, "weight_map": {}}),
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / INDEX_NAME).write_text(text)
        cases[name] = (tmp_path / name / INDEX_NAME, {"deep-index": "nested too deeply",
                       "big-index": "more than 4300 digits",
                       "deep-metadata": "nested deeper than 32 levels"}[name])  # fmt: skip
    for name, (path, message) in cases.items():
        with pytest.raises(CorruptCheckpointError, match=message) as e:
            load_checkpoint(path.parent)
        assert str(e.value).startswith(f"{path}: "), name
        assert_refused(invoke("inspect", path.parent), str(path), message)


@pytest.mark.parametrize(
    "text, message",
    [
        (DEEP, "nested too deeply"),
        (json.dumps({"peft_type": "LORA", "loftq_config": NESTED_40}), "nested deeper than 32"),
        ('{"peft_type": "LORA", "r": ' + BIG + "}", "more than 4300 digits"),
        ('{"peft_type": "LORA", "lora_alpha": 1e400}', "'lora_alpha': Infinity is not a finite"),
        ('{"peft_type": "LORA", "lora_alpha": 1' + "0" * 400 + "}", "'lora_alpha'"),
        ('{"peft_type": "LORA", "r": 1' + "0" * 30 + "}", "larger than any tensor dimension"),
        ('{"peft_type": "LORA", "alpha_pattern": {"q": 1e999}}', "alpha_pattern['q']"),
        ('{"peft_type": "LORA", "rank_pattern": {"q": 1' + "0" * 100 + "}}", "rank_pattern['q']"),
    ],
)
def test_adapter_config_json_that_breaks_parsers_exits_2(tmp_path, text, message):
    base, adapter = _base_and_adapter(tmp_path)
    (adapter / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterError, match=re.escape(message)) as e:
        load_config(adapter)
    assert str(e.value).startswith(str(adapter / "adapter_config.json"))
    assert_refused(
        invoke("merge", base, adapter, "-o", tmp_path / "out", "-q"), "adapter_config.json"
    )


def test_adapter_config_identity_is_recorded(tmp_path):
    _, adapter = _base_and_adapter(tmp_path)
    config = load_config(adapter)
    path = adapter / "adapter_config.json"
    assert config.source is not None and config.source.size == path.stat().st_size
    assert str(path.resolve()) in config.source.line()


def test_merge_with_a_deeply_nested_base_config_json_exits_2(tmp_path):
    base, adapter = _base_and_adapter(tmp_path)
    (base / "config.json").write_text(DEEP)
    assert_refused(invoke("merge", base, adapter, "-o", tmp_path / "out", "-q"), "config.json")


def test_verify_of_a_deeply_nested_index_reports_it(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / INDEX_NAME).write_text(DEEP)
    r = invoke("verify", tmp_path / "out")
    assert r.exit_code in (2, 3) and "internal error" not in r.stderr, r.output


def test_index_with_shards_in_a_subdirectory_is_read(tmp_path):
    d = tmp_path / "m"
    save_file({"a": torch.arange(3.0)}, str(raw_dir(d / "sub") / "x.safetensors"))
    save_file({"b": torch.ones(2)}, str(d / "y.safetensors"))
    (d / INDEX_NAME).write_text(
        json.dumps({"weight_map": {"a": "./sub//x.safetensors", "b": "y.safetensors"}})
    )
    ckpt = load_checkpoint(d)
    assert [f.relative_to(d).as_posix() for f in ckpt.files] == [
        "sub/x.safetensors",
        "y.safetensors",
    ]
    with Reader() as r:
        assert torch.equal(r.read(ckpt["a"]), torch.arange(3.0))
    r = invoke("inspect", d, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["total_params"] == 5
    for outside in ["sub/../../x.safetensors", "/etc/passwd", "", "sub/"]:
        (d / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": outside}}))
        with pytest.raises(InputError, match="outside its directory|is a directory"):
            load_checkpoint(d)


def raw_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_several_index_files_and_no_model_index_is_ambiguous(tmp_path):
    d = save_checkpoint(tmp_path / "m", {"w": torch.ones(2)})
    (d / INDEX_NAME).rename(d / "a.safetensors.index.json")
    shutil.copy(d / "a.safetensors.index.json", d / "b.safetensors.index.json")
    with pytest.raises(InputError, match="holds 2 index files"):
        load_checkpoint(d)
    assert list(load_checkpoint(d / "b.safetensors.index.json").tensors) == ["w"]


# ---- item 9: unfinished outputs of ours are not inputs ------------------------------------


def _finished_output(tmp_path: Path) -> Path:
    base = save_checkpoint(tmp_path / "b", {"w": torch.ones(4, 4), "v": torch.ones(3)})
    ft = save_checkpoint(tmp_path / "f", {"w": torch.full((4, 4), 2.0), "v": torch.ones(3)})
    out = tmp_path / "tv"
    r = invoke("extract", base, ft, "-o", out, "-q", "--max-shard-size", "40")
    assert r.exit_code == 0, r.output
    return out


def test_journal_or_partial_shard_marks_an_unfinished_output(tmp_path):
    out = _finished_output(tmp_path)
    assert len(load_checkpoint(out).files) == 2
    (out / ".stream-tv").mkdir()
    (out / ".stream-tv" / "lock").write_text("")  # a lock alone (item 17's leftover) is fine
    assert len(load_checkpoint(out)) == 2
    (out / ".stream-tv" / "state.json").write_text(
        json.dumps({"fingerprint": "x", "shards": ["a", "b"], "completed": {"0": 1}})
    )
    for target in (out, out / INDEX_NAME):  # with the index too: killed before the journal went
        with pytest.raises(CorruptCheckpointError) as e:
            load_checkpoint(target)
        msg = str(e.value)
        assert msg.startswith(f"{out}: is an unfinished stream-tv output")
        assert "1 of 2 shard(s) written" in msg and "rerunning the stream-tv command" in msg
    (out / ".stream-tv" / "state.json").unlink()
    (out / INDEX_NAME).unlink()
    (out / ".model-00002-of-00002.safetensors.partial").write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match=r"\.partial is present"):
        load_checkpoint(out)


def test_our_index_naming_a_missing_shard_says_how_to_redo_it(tmp_path):
    out = _finished_output(tmp_path)
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(out)
    assert "this stream-tv output is incomplete" in str(e.value) and "--overwrite" in str(e.value)


def test_numbered_shards_without_index_must_all_be_there(tmp_path):
    d = save_checkpoint(tmp_path / "m", {f"t{i}": torch.ones(2) for i in range(3)}, shards=3)
    (d / INDEX_NAME).unlink()
    assert len(load_checkpoint(d)) == 3
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(InputError, match="has 2 of the 3 shards") as e:
        load_checkpoint(d)
    assert "model-00002-of-00003.safetensors" in str(e.value)


def test_interrupted_extract_is_refused_by_every_command(tmp_path, monkeypatch):
    from stream_tv import engine

    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.weight": torch.randn(16, 16, generator=g) for i in range(6)}
    ft = {k: v * 1.01 for k, v in base.items()}
    b = save_checkpoint(tmp_path / "base", base, shards=2)
    f = save_checkpoint(tmp_path / "ft", ft, shards=2)
    calls = {"n": 0}
    real = engine._check_finite

    def stop(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*args, **kw)

    with monkeypatch.context() as m:
        m.setattr(engine, "_check_finite", stop)
        r = invoke("extract", b, f, "-o", tmp_path / "tv", "-q", "--max-shard-size", "2KB",
                   "--chunk-size", "512")  # fmt: skip
    assert r.exit_code == 130, r.output
    tv = tmp_path / "tv"
    assert list(tv.glob("model-*.safetensors"))  # some shards are done: it looks like a model
    assert_refused(invoke("inspect", tv), "unfinished stream-tv output")
    assert_refused(invoke("apply", b, tv, "-o", tmp_path / "out", "-q"), "unfinished")
    assert not (tmp_path / "out" / INDEX_NAME).exists()


# ---- item 12: an input changed between indexing and reading -------------------------------


def _replace_atomically(path: Path, tensors: dict) -> None:
    tmp = path.with_name("new.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def test_reader_refuses_a_shard_replaced_after_indexing(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4)}, str(path))
    spec = read_header(path)["w"]
    _replace_atomically(path, {"w": torch.full((4,), 7.0)})  # same shape: same offsets
    with Reader() as r, pytest.raises(CorruptCheckpointError) as e:
        r.read(spec)
    msg = str(e.value)
    assert msg.startswith(f"{path}: changed since it was indexed") and "inode" in msg


def test_reader_refuses_a_header_rewritten_with_size_and_mtime_kept(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4)}, str(path), {"note": "aaaa"})
    spec = read_header(path)["w"]
    before = load_checkpoint(path).identity
    st = path.stat()
    data = path.read_bytes().replace(b"aaaa", b"bbbb")
    with open(path, "r+b") as fh:  # in place: same inode
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    with Reader() as r, pytest.raises(CorruptCheckpointError, match="header bytes differ"):
        r.read(spec)
    assert load_checkpoint(path).identity != before


def test_reader_check_unchanged_sees_a_file_written_while_read(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4)}, str(path))
    spec = read_header(path)["w"]
    with Reader() as r:
        r.read(spec)
        r.check_unchanged()
        with open(path, "ab") as fh:
            fh.write(b"x")
        with pytest.raises(CorruptCheckpointError, match="changed while it was read"):
            r.check_unchanged()


def test_two_indexings_that_disagree_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4), "v": torch.ones(2)}, str(path))
    old = read_header(path)
    with Reader() as r:
        r.read(old["w"])
        _replace_atomically(path, {"w": torch.ones(4), "v": torch.zeros(2)})
        new = read_header(path)
        with pytest.raises(CorruptCheckpointError, match="two reads of its header disagree"):
            r.read(new["v"])


def test_checkpoint_identity_is_stable_and_names_every_file(tmp_path):
    d = save_checkpoint(tmp_path / "m", {"a": torch.ones(2), "b": torch.ones(3)}, shards=2)
    one, two = load_checkpoint(d).identity, load_checkpoint(d).identity
    assert one == two and len(one.splitlines()) == 3  # two shards and the index
    for f in (*d.glob("*.safetensors"), d / INDEX_NAME):
        assert str(f.resolve()) in one
    index = d / INDEX_NAME
    st = index.stat()
    index.write_text(index.read_text().replace('"total_size"', '"total_sizE"'))
    os.utime(index, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load_checkpoint(d).identity != one


def test_extract_refuses_a_shard_replaced_between_planning_and_reading(tmp_path, monkeypatch):
    b = save_checkpoint(tmp_path / "b", {"w": torch.ones(8, 8), "v": torch.ones(3)}, shards=2)
    f = save_checkpoint(tmp_path / "f", {"w": torch.ones(8, 8) * 2, "v": torch.ones(3)}, shards=2)
    real = extract_command.open_checkpoint

    def open_then_replace(reference):
        ckpt = real(reference)
        if Path(reference) == f:
            _replace_atomically(f / "model-00001-of-00002.safetensors", {"w": torch.ones(8, 8) * 3})
        return ckpt

    monkeypatch.setattr(extract_command, "open_checkpoint", open_then_replace)
    r = invoke("extract", b, f, "-o", tmp_path / "tv", "-q")
    assert_refused(r, "model-00001-of-00002.safetensors", "changed since it was indexed")
    assert not (tmp_path / "tv" / INDEX_NAME).exists()
