"""Inputs are never touched, whatever the output directory holds; mixed-up inputs are caught;
a run that never got going, or was killed at its very end, does not block the next one."""

from __future__ import annotations

import hashlib
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
from conftest import load_tensors, save_checkpoint

from stream_tv.cli import cli
from stream_tv.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_VERIFY_FAILED
from stream_tv.io.writer import LOCK_FILE, STATE_DIR, STATE_FILE

INDEX = "model.safetensors.index.json"
Q = ["-q", "--device", "cpu"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (links by their target path, not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def models(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g)}
    ft = {k: v + 0.01 for k, v in base.items()}
    save_checkpoint(tmp_path / "base", base, shards=2)
    save_checkpoint(tmp_path / "ft", ft, shards=2)
    for d in ("base", "ft"):
        (tmp_path / d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp_path / "base", tmp_path / "ft"


def test_state_dir_linked_into_the_base_is_refused(models, tmp_path):
    base, ft = models
    before = digest(base)
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_DIR).symlink_to(base)
    for extra in ([], ["--overwrite"], ["--restart"]):
        r = run("extract", base, ft, "-o", out, *Q, *extra)
        assert r.exit_code == EXIT_BAD_INPUT, r.output
        assert "is a symbolic link" in r.stderr and STATE_DIR in r.stderr
    assert digest(base) == before and not (base / LOCK_FILE).exists()


@pytest.mark.parametrize(
    "link, target",
    [
        ("config.json", "ft/config.json"),
        (f".{INDEX}.tmp", "ft/model-00001-of-00002.safetensors"),
        (".model-00001-of-00001.safetensors.partial", "ft/model-00002-of-00002.safetensors"),
        ("model-00001-of-00001.safetensors", "ft/model-00001-of-00002.safetensors"),
    ],
)
def test_links_planted_in_the_output_are_refused(models, tmp_path, link, target):
    base, ft = models
    before = digest(ft)
    out = tmp_path / "out"
    assert run("apply", base, ft, "-o", out, *Q, "--force").exit_code == 0  # a finished output
    (out / link).unlink(missing_ok=True)
    (out / link).symlink_to(tmp_path / target)
    r = run("apply", base, ft, "-o", out, *Q, "--force", "--overwrite")
    assert r.exit_code == EXIT_BAD_INPUT and "symbolic link" in r.stderr, r.output
    assert link in r.stderr
    assert digest(ft) == before


def test_overwrite_removes_only_what_stream_tv_writes(models, tmp_path):
    base, ft = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "keep.bin").write_bytes(b"x")
    assert run("extract", base, ft, "-o", out, *Q, "--overwrite").exit_code == 0
    assert run("extract", base, ft, "-o", out, *Q, "--overwrite").exit_code == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "keep.bin").exists()


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
def test_compare_report_into_an_input_is_refused(models, flag):
    base, ft = models
    before = digest(base)
    for target in (base / "config.json", base / "new-report.out"):
        r = run("compare", "--base", base, "--finetuned", ft, "-q", flag, target)
        assert r.exit_code == EXIT_BAD_INPUT, r.output
        assert f"{flag} {target} would write into the input" in r.stderr
    assert digest(base) == before


def test_compare_report_that_is_a_link_is_refused(models, tmp_path):
    base, ft = models
    (tmp_path / "r.json").symlink_to(tmp_path / "elsewhere.json")
    r = run("compare", "--base", base, "--finetuned", ft, "-q", "--json", tmp_path / "r.json")
    assert r.exit_code == EXIT_BAD_INPUT and "is a symbolic link" in r.stderr
    assert not (tmp_path / "elsewhere.json").exists()


def test_compare_json_to_stdout(models):
    base, ft = models
    r = run("compare", "--base", base, "--finetuned", ft, "-q", "--json", "-")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)  # stdout holds the JSON alone
    assert report["coverage"]["total"] == 2 and "changed" in r.stderr


def test_output_config_linked_to_the_base_config(models, tmp_path):
    base, ft = models
    before = digest(base)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").symlink_to(base / "config.json")
    for _ in range(2):  # every rerun: the same clear refusal
        r = run("apply", base, ft, "-o", out, *Q, "--force")
        assert r.exit_code == EXIT_BAD_INPUT
        assert "config.json is a symbolic link" in r.stderr and "None" not in r.stderr
    assert digest(base) == before


def test_an_output_without_tensors_is_an_error(tmp_path):
    save_checkpoint(tmp_path / "a", {"x": torch.ones(3)})
    save_checkpoint(tmp_path / "b", {"y": torch.ones(3)})
    r = run("extract", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "tv", *Q, "--allow-missing")
    assert r.exit_code == EXIT_BAD_INPUT
    assert "nothing to write" in r.stderr and "same model" in r.stderr
    assert not (tmp_path / "tv" / INDEX).exists()


def test_a_task_vector_carries_no_config(models, tmp_path):
    """transformers must not load a task vector as a model (it would, given a config); the
    base's config is kept under another name, for binding an adapter to the task vector."""
    base, ft = models
    assert run("extract", base, ft, "-o", tmp_path / "tv", *Q).exit_code == 0
    assert not (tmp_path / "tv" / "config.json").exists()
    kept = tmp_path / "tv" / "base_config.json"
    assert kept.read_bytes() == (base / "config.json").read_bytes()


def test_verify_without_checksums_says_what_it_could_not_check(models, tmp_path):
    base, ft = models
    out = tmp_path / "tv"
    assert run("extract", base, ft, "-o", out, *Q).exit_code == 0
    index = json.loads((out / INDEX).read_text())
    del index["metadata"]["stream_tv_checksums"]
    (out / INDEX).write_text(json.dumps(index))
    r = run("verify", out, "-q")
    assert r.exit_code == EXIT_VERIFY_FAILED and "records no checksums" in r.stderr
    r = run("verify", out, "-q", "--structure-only")
    assert r.exit_code == 0 and "not checked: shard bytes" in r.stdout
    r = run("verify", out, "-q", "--base", base, "--finetuned", ft)  # recomputed: all checked
    assert r.exit_code == 0 and "identical to a recomputation" in r.stdout


@pytest.mark.parametrize("journal", [None, "", "{not json", "[1, 2]", '{"completed": 3}'])
def test_leftovers_of_a_run_that_never_got_going_do_not_block(models, tmp_path, journal):
    """A kill or a full disk at the first journal write: the same command just runs."""
    base, ft = models
    out = tmp_path / "tv"
    (out / STATE_DIR).mkdir(parents=True)
    (out / STATE_DIR / LOCK_FILE).write_text("")
    if journal is not None:
        (out / STATE_DIR / STATE_FILE).write_text(journal)
    (out / ".model-00001-of-00001.safetensors.partial").write_bytes(b"torn")
    r = run("extract", base, ft, "-o", out, *Q)
    assert r.exit_code == 0, r.output
    assert run("verify", out, "-q").exit_code == 0


def test_unreadable_journal_beside_shards_is_refused_and_restart_discards_it(models, tmp_path):
    base, ft = models
    out = tmp_path / "tv"
    assert run("extract", base, ft, "-o", out, *Q, "--max-shard-size", "40B").exit_code == 0
    (out / INDEX).unlink()
    (out / STATE_DIR).mkdir()
    (out / STATE_DIR / STATE_FILE).write_text("{torn")
    r = run("extract", base, ft, "-o", out, *Q, "--max-shard-size", "40B")
    assert r.exit_code == EXIT_BAD_INPUT and "journal cannot be read" in r.stderr
    assert "--restart" in r.stderr
    r = run("extract", base, ft, "-o", out, *Q, "--max-shard-size", "40B", "--restart")
    assert r.exit_code == 0, r.output


def test_a_kill_after_the_journal_went_leaves_no_lock_behind(models, tmp_path):
    base, ft = models
    out = tmp_path / "tv"
    assert run("extract", base, ft, "-o", out, *Q).exit_code == 0
    (out / STATE_DIR).mkdir()
    (out / STATE_DIR / LOCK_FILE).write_text("")  # what a kill there leaves
    r = run("extract", base, ft, "-o", out, *Q)
    assert r.exit_code == EXIT_BAD_INPUT and "already holds a finished model" in r.stderr
    assert not (out / STATE_DIR).exists()  # the stale lock is gone
    assert run("verify", out, "-q").exit_code == 0


def test_the_lock_file_is_removed_by_its_holder(models, tmp_path):
    base, ft = models
    out = tmp_path / "tv"
    assert run("extract", base, ft, "-o", out, *Q).exit_code == 0
    assert not (out / STATE_DIR).exists()


def test_demo_overwrite_keeps_unrelated_files(tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    (root / "mine.txt").write_text("keep me")
    r = run("demo", root, "-q", "--overwrite")
    assert r.exit_code == 0, r.output
    r = run("demo", root, "-q", "--overwrite")
    assert r.exit_code == 0, r.output
    assert (root / "mine.txt").read_text() == "keep me"
    assert (root / "report.json").exists() and (root / "merged" / INDEX).exists()
    assert "report.png" in r.output


def test_demo_does_not_replace_what_it_did_not_make(tmp_path):
    root = tmp_path / "demo"
    (root / "base").mkdir(parents=True)
    (root / "base" / "weights.bin").write_bytes(b"precious")
    r = run("demo", root, "-q", "--overwrite")
    assert r.exit_code == EXIT_BAD_INPUT and "no earlier demo made here" in r.stderr
    assert (root / "base" / "weights.bin").read_bytes() == b"precious"


# ---- mixed-up inputs: what our own index records ----------------------------------------------


@pytest.fixture
def made(models, tmp_path):
    """A task vector and a merged-like model written by stream-tv."""
    base, ft = models
    assert run("extract", base, ft, "-o", tmp_path / "tv", *Q).exit_code == 0
    assert run("apply", base, tmp_path / "tv", "-o", tmp_path / "model", *Q).exit_code == 0
    return base, ft, tmp_path / "tv", tmp_path / "model"


def test_a_model_given_as_a_task_vector_is_refused(made, tmp_path):
    """A model our index records is a fine-tuned model to apply (its task vector taken on
    the fly: base + (model - base) is the model again); --kind tv contradicts the index."""
    base, _, _, model = made
    r = run("apply", base, model, "-o", tmp_path / "again", *Q)
    assert r.exit_code == 0, r.output
    assert "inputs: finetuned" in r.stdout
    got, want = load_tensors(tmp_path / "again"), load_tensors(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    r = run("apply", base, model, "-o", tmp_path / "doubled", "--kind", "tv", *Q)
    assert r.exit_code == EXIT_BAD_INPUT
    assert "INPUT 1 is a fine-tuned model (written by stream-tv apply" in r.stderr
    assert "--force" in r.stderr
    assert not (tmp_path / "doubled").exists()
    r = run("apply", base, model, "-o", tmp_path / "doubled", "--kind", "tv", *Q, "--force")
    assert r.exit_code == 0


def test_a_task_vector_given_as_a_model_is_refused(made, tmp_path):
    base, _, tv, _ = made
    r = run("compare", "--base", base, "--finetuned", tv, "-q")
    assert r.exit_code == EXIT_BAD_INPUT and "--finetuned is a task vector" in r.stderr
    assert "--task-vector" in r.stderr
    r = run("extract", base, tv, "-o", tmp_path / "x", *Q)
    assert r.exit_code == EXIT_BAD_INPUT and "FINETUNED is a task vector" in r.stderr


def test_an_adapter_merged_twice_is_refused(tmp_path):
    from stream_tv.synthetic import llama_config, write_adapter, write_base

    config = llama_config(hidden=64, intermediate=128, layers=1, vocab=128)
    write_base(tmp_path / "base", config, seed=0)
    write_adapter(tmp_path / "lora", config, rank=4, alpha=8)
    merged = tmp_path / "merged"
    assert run("merge", tmp_path / "base", tmp_path / "lora", "-o", merged, *Q).exit_code == 0
    r = run("merge", merged, tmp_path / "lora", "-o", tmp_path / "twice", *Q)
    assert r.exit_code == EXIT_BAD_INPUT and "already has adapter" in r.stderr
    assert "doubles" in r.stderr and "--force" in r.stderr


# ---- Ctrl-C -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.25, 0.5, 0.8, 1.2, 2.0])
def test_ctrl_c_at_any_moment_is_exit_130_without_traceback(models, tmp_path, delay):
    """From the first line of stream-tv's own code to the end (the interpreter's own
    start-up, the first few tens of milliseconds, is Python's: not ours to handle)."""
    base, ft = models
    cmd = [sys.executable, "-m", "stream_tv.cli", "extract", base, ft, "-o", tmp_path / "tv", *Q]
    p = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    if p.poll() is not None:
        pytest.skip(f"the run finished within {delay} s")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert b"Traceback" not in err
    if b"task vector (F32)" in out:  # it had finished its work when the signal came
        assert p.returncode in (0, EXIT_INTERRUPTED), (p.returncode, err)
        return
    assert p.returncode == EXIT_INTERRUPTED, (p.returncode, err)
    assert b"interrupted" in err


def test_a_resume_after_an_input_changed_with_size_and_mtime_kept_is_refused(tmp_path, monkeypatch):
    """The fingerprint holds each input's header digest: an input rewritten in place, same
    size and mtime, is another input, and its run another run (no mixed output)."""
    from stream_tv import engine

    g = torch.Generator().manual_seed(1)
    base = {f"t{i}": torch.randn(64, 64, generator=g) for i in range(6)}
    save_checkpoint(tmp_path / "base", base, shards=2)
    ft = {k: v * 1.5 for k, v in base.items()}
    save_checkpoint(tmp_path / "ft", ft, shards=2)
    out, opts = tmp_path / "tv", [*Q, "--max-shard-size", "20KB", "--chunk-size", "8KB"]
    calls = {"n": 0}
    real = engine._check_finite

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(engine, "_check_finite", interrupt)
        assert run("extract", tmp_path / "base", tmp_path / "ft", "-o", out, *opts).exit_code == 130
    assert list(out.glob("model-*.safetensors"))  # some shards are complete
    shard = tmp_path / "ft" / "model-00002-of-00002.safetensors"
    st = shard.stat()
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].decode()
    raw[8 : 8 + n] = (
        header.replace('"t3"', '"t9"').replace('"t4"', '"t3"').replace('"t9"', '"t4"').encode()
    )
    shard.write_bytes(bytes(raw))  # the same size: two tensors' names swapped
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = run("extract", tmp_path / "base", tmp_path / "ft", "-o", out, *opts)
    assert r.exit_code == EXIT_BAD_INPUT and "unfinished run of a different command" in r.stderr


def test_apply_with_another_dtype_says_so_in_the_config(tmp_path):
    """apply --dtype fp32 on a bf16 base: from_pretrained(dtype='auto') must load float32."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 4, generator=g).to(torch.bfloat16)}
    save_checkpoint(tmp_path / "base", base)
    (tmp_path / "base" / "config.json").write_text(
        json.dumps({"model_type": "llama", "torch_dtype": "bfloat16", "vocab_size": 8})
    )
    save_checkpoint(tmp_path / "tv", {"w": torch.full((4, 4), 1e-3)})
    out = tmp_path / "out"
    assert (
        run("apply", tmp_path / "base", tmp_path / "tv", "-o", out, *Q, "--dtype", "fp32").exit_code
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["vocab_size"] == 8
    r = run("verify", out, "-q", "--base", tmp_path / "base", "--task-vector", tmp_path / "tv")
    assert r.exit_code == 0, r.output
    assert (
        run("apply", tmp_path / "base", tmp_path / "tv", "-o", tmp_path / "same", *Q).exit_code == 0
    )
    assert json.loads((tmp_path / "same" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_chat_templates_are_copied_with_the_model(models, tmp_path):
    base, ft = models
    (base / "chat_template.jinja").write_text("{{ messages }}")
    (base / "tool_use.jinja").write_text("{{ tools }}")
    out = tmp_path / "m"
    assert run("apply", base, ft, "-o", out, *Q, "--force").exit_code == 0
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (out / "tool_use.jinja").read_text() == "{{ tools }}"


def test_the_nan_policy_is_part_of_the_resume_fingerprint(tmp_path):
    """apply --on-nonfinite ignore, interrupted, then rerun under the default (error): not a
    resume (that would finish with NaN under a policy that forbids them)."""
    g = torch.Generator().manual_seed(2)
    base = {f"t{i}": torch.randn(64, 64, generator=g) for i in range(4)}
    save_checkpoint(tmp_path / "base", base)
    tv = {k: torch.zeros_like(v) for k, v in base.items()}
    tv["t3"][0, 0] = float("nan")  # in the last shard
    save_checkpoint(tmp_path / "tv", tv)
    out = tmp_path / "out"
    opts = [*Q, "--max-shard-size", "20KB"]
    args = ("apply", tmp_path / "base", tmp_path / "tv", "-o", out, *opts)
    r = run(*args)  # the default policy refuses the NaN: shards 1-3 kept, not finished
    assert r.exit_code == EXIT_BAD_INPUT and "NaN/Inf" in r.stderr
    assert len(list(out.glob("model-*.safetensors"))) == 3 and not (out / INDEX).exists()
    r = run(*args, "--on-nonfinite", "warn")  # another policy: another run
    assert r.exit_code == EXIT_BAD_INPUT and "unfinished run of a different command" in r.stderr
    r = run(*args, "--on-nonfinite", "warn", "--restart")
    assert r.exit_code == 0 and "warning: 1 NaN/Inf value(s) in t3" in r.stderr, r.output
