"""Kill tests: the real CLI in a subprocess, killed at chosen points, then rerun.

The model is a small Llama (real ``transformers`` names and shapes, ~76 MB of task vector in
~10 shards), so a finished output loads with ``transformers`` and a killed one must not.

Kill points are reached by polling the output directory for temporary and finished shard
files (no test hook in the product). The points that only last microseconds (between two
shards, inside the index write, between the index and the journal removal) are widened by a
wrapper that runs ``stream_tv.cli.main`` with one writer function patched to pause there;
the kill itself is still a SIGKILL of the real process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_checkpoint

from stream_tv.cli import cli
from stream_tv.errors import EXIT_INTERRUPTED, EXIT_VERIFY_FAILED
from stream_tv.io.writer import STATE_DIR, STATE_FILE

pytestmark = pytest.mark.slow

INDEX = "model.safetensors.index.json"
OPTS = ["-q", "--device", "cpu", "--max-shard-size", "9MB", "--chunk-size", "1MB"]

# Runs the CLI with one writer step pausing (after writing a marker file) so a SIGKILL lands
# exactly there. KILL_POINT: "after-shard-K" | "index" | "journal".
WRAPPER = """
import os, sys, time
from pathlib import Path
import stream_tv.io.writer as w
point, marker = os.environ["KILL_POINT"], Path(os.environ["KILL_MARKER"])
def pause():
    marker.write_text(point)
    time.sleep(600)
if point.startswith("after-shard-"):
    k, close = int(point.rsplit("-", 1)[1]), w.ShardWriter._close_shard
    def _close_shard(self, i):
        close(self, i)
        if len(self.completed) == k:
            pause()
    w.ShardWriter._close_shard = _close_shard
elif point == "index":
    atomic = w.OutputDir.atomic_write
    def atomic_write(self, name, data, **kw):
        if name == w.INDEX_NAME:
            (self.path / ("." + name + ".tmp")).write_bytes(data[: len(data) // 2])
            pause()
        atomic(self, name, data, **kw)
    w.OutputDir.atomic_write = atomic_write
elif point == "journal":
    remove = w.OutputDir.remove
    def remove_(self, name):
        if name.endswith(w.STATE_FILE):
            pause()
        remove(self, name)
    w.OutputDir.remove = remove_
from stream_tv.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(base, finetuned) directories of a tiny Llama in bf16, with config.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    ft = {k: (v.float() * 1.01 + 1e-3).to(torch.bfloat16) for k, v in base.items()}
    root = tmp_path_factory.mktemp("llama")
    for name, state, shards in (("base", base, 3), ("ft", ft, 2)):
        save_checkpoint(root / name, state, shards=shards)
        config.save_pretrained(root / name)
    return root / "base", root / "ft", root


@pytest.fixture(scope="module")
def reference(llama):
    base, ft, root = llama
    out = root / "reference"
    r = CliRunner().invoke(cli, ["extract", str(base), str(ft), "-o", str(out), *OPTS])
    assert r.exit_code == 0, r.output
    files = files_of(out)
    assert len([n for n in files if n.startswith("model-")]) >= 8
    return files


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def completed(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("model-*.safetensors"))


def partials(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".model-*.partial"))


def run_until(args, out: Path, condition, *, sig=signal.SIGKILL, env=None, wrapper=False):
    """Start the CLI, poll until ``condition(out)`` holds, send ``sig``; return
    (returncode, stderr, what the directory held when the signal was sent)."""
    code = ["-c", WRAPPER] if wrapper else ["-m", "stream_tv.cli"]
    p = subprocess.Popen(
        [sys.executable, *code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 120
    seen = None
    try:
        while p.poll() is None and time.monotonic() < deadline:
            if out.is_dir() and condition(out):
                seen = (completed(out), partials(out))
                p.send_signal(sig)
                break
            time.sleep(0.001)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert seen is not None, f"the run ended before the kill point (rc={p.returncode}): {err}"
    return p.returncode, err, seen


def assert_not_a_finished_model(out: Path, base: Path) -> None:
    """No index, verify fails, and transformers refuses to load it (even with a config)."""
    from transformers import AutoModelForCausalLM

    assert not (out / INDEX).exists()
    assert not (out / "model.safetensors").exists()
    r = CliRunner().invoke(cli, ["verify", str(out), "-q"])
    assert r.exit_code == EXIT_VERIFY_FAILED, r.output
    if not (out / "config.json").exists():
        (out / "config.json").write_bytes((base / "config.json").read_bytes())
    with pytest.raises((OSError, ValueError)):
        AutoModelForCausalLM.from_pretrained(out)
    (out / "config.json").unlink()  # the rerun copies it again


def rerun_and_compare(llama, out: Path, reference: dict[str, bytes]) -> str:
    base, ft, _ = llama
    r = CliRunner().invoke(cli, ["extract", str(base), str(ft), "-o", str(out), *OPTS])
    assert r.exit_code == 0, r.output
    assert files_of(out) == reference
    assert not (out / STATE_DIR).exists()
    return r.output


def cmd(llama, out: Path) -> list:
    base, ft, _ = llama
    return ["extract", base, ft, "-o", out, *OPTS]


def test_reference_loads_with_transformers(llama, reference, tmp_path):
    """The positive control: a finished output is a checkpoint transformers loads, given a
    config (a task vector carries none of its own: it must not load as a model by itself)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tv"
    out.mkdir()
    for n, b in reference.items():
        (out / n).write_bytes(b)
    assert "config.json" not in reference
    (out / "config.json").write_bytes((llama[0] / "config.json").read_bytes())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.model.embed_tokens.weight.shape == (8192, 512)


@pytest.mark.parametrize("shards_done", [0, 3])
def test_sigkill_during_a_shard_write(llama, reference, tmp_path, shards_done):
    out = tmp_path / "tv"

    def during_write(d: Path) -> bool:
        return bool(partials(d)) and len(completed(d)) >= shards_done

    rc, _, (done, partial) = run_until(cmd(llama, out), out, during_write)
    assert rc == -signal.SIGKILL and partial and len(done) >= shards_done
    assert_not_a_finished_model(out, llama[0])
    kept = completed(out)
    output = rerun_and_compare(llama, out, reference)
    if kept:
        assert f"resumed: {len(kept)} shard(s)" in output


def test_sigkill_between_shards(llama, reference, tmp_path):
    out = tmp_path / "tv"
    marker = tmp_path / "marker"
    env = {"KILL_POINT": "after-shard-4", "KILL_MARKER": str(marker)}
    rc, _, (done, partial) = run_until(
        cmd(llama, out), out, lambda d: marker.exists(), env=env, wrapper=True
    )
    assert rc == -signal.SIGKILL
    assert len(done) == 4 and not partial  # shard 4 finished and journaled, 5 not begun
    journal = json.loads((out / STATE_DIR / STATE_FILE).read_text())
    assert len(journal["completed"]) == 4
    assert_not_a_finished_model(out, llama[0])
    assert "resumed: 4 shard(s)" in rerun_and_compare(llama, out, reference)


def test_sigkill_while_writing_the_index(llama, reference, tmp_path):
    out = tmp_path / "tv"
    marker = tmp_path / "marker"
    env = {"KILL_POINT": "index", "KILL_MARKER": str(marker)}
    rc, _, (done, partial) = run_until(
        cmd(llama, out), out, lambda d: marker.exists(), env=env, wrapper=True
    )
    assert rc == -signal.SIGKILL and not partial
    assert len(done) == len([n for n in reference if n.startswith("model-")])
    assert (out / f".{INDEX}.tmp").exists()  # half an index, under its temporary name
    assert_not_a_finished_model(out, llama[0])
    output = rerun_and_compare(llama, out, reference)
    assert f"resumed: {len(done)} shard(s)" in output
    assert not (out / f".{INDEX}.tmp").exists()


def test_sigkill_after_the_index_before_the_journal_is_removed(llama, reference, tmp_path):
    """The index is the last thing written: a directory that has it is complete (and
    loadable); the rerun re-verifies the shards and removes the journal."""
    out = tmp_path / "tv"
    marker = tmp_path / "marker"
    env = {"KILL_POINT": "journal", "KILL_MARKER": str(marker)}
    rc, _, _ = run_until(cmd(llama, out), out, lambda d: marker.exists(), env=env, wrapper=True)
    assert rc == -signal.SIGKILL
    assert (out / INDEX).exists() and (out / STATE_DIR / STATE_FILE).exists()
    assert files_of(out) == reference
    rerun_and_compare(llama, out, reference)


def test_sigkill_twice_then_finish(llama, reference, tmp_path):
    """Resume of a resumed run: kill, rerun, kill again further on, rerun to the end."""
    out = tmp_path / "tv"
    run_until(cmd(llama, out), out, lambda d: len(completed(d)) >= 2 and bool(partials(d)))
    first = completed(out)
    run_until(
        cmd(llama, out), out, lambda d: len(completed(d)) >= len(first) + 2 and bool(partials(d))
    )
    assert len(completed(out)) >= len(first) + 2
    rerun_and_compare(llama, out, reference)


def test_sigint_exits_130_and_keeps_completed_shards(llama, reference, tmp_path):
    out = tmp_path / "tv"
    t = {}

    def mid_run(d: Path) -> bool:
        hit = len(completed(d)) >= 2 and bool(partials(d))
        if hit:
            t["sent"] = time.monotonic()
        return hit

    rc, err, (done, _) = run_until(cmd(llama, out), out, mid_run, sig=signal.SIGINT)
    assert rc == EXIT_INTERRUPTED, err
    assert time.monotonic() - t["sent"] < 10, "Ctrl-C must stop the run promptly"
    assert "interrupted" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err
    assert set(done) <= set(completed(out))  # completed shards kept
    assert not partials(out) and not (out / INDEX).exists()
    assert (out / STATE_DIR / STATE_FILE).exists()
    kept = completed(out)
    assert f"resumed: {len(kept)} shard(s)" in rerun_and_compare(llama, out, reference)
