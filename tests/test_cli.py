"""The command line through click's CliRunner: every bad input of issue 2 gets one clear
message naming the file or tensor, exit code 2 and no traceback; results on stdout only."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import load_tensors, save_checkpoint, tiny_state

from stream_tv.cli import cli


def run(*args: object):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def bad(*args: object, names: list | object):
    """Run, expect exit code 2 with one ``error:`` line naming every one of ``names``."""
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in names if isinstance(names, list) else [names]:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def test_help_of_every_command_has_an_example():
    assert cli.commands
    for name in cli.commands:
        r = run(name, "--help")
        assert r.exit_code == 0 and "Example" in r.stdout, name
    assert run("--version").exit_code == 0


def test_nonexistent_path(tmp_path, tiny_pair):
    nope = tmp_path / "does-not-exist"
    msg = bad("inspect", nope, names=nope)
    assert "no such file" in msg
    bad("extract", nope, tiny_pair[3], "-o", tmp_path / "o", names=nope)
    bad("apply", tiny_pair[2], nope, "-o", tmp_path / "o", names=nope)


def test_directory_without_safetensors(tmp_path, tiny_pair):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = bad("extract", empty, tiny_pair[3], "-o", tmp_path / "o", names=empty)
    assert "no safetensors" in msg
    (empty / "pytorch_model.bin").write_bytes(b"x")
    assert "pytorch_model.bin" in bad("inspect", empty, names=empty)


@pytest.fixture
def broken(tmp_path):
    """A fresh (base, ft) pair in tmp_path that a test may damage."""
    base, ft = tiny_state()
    return (
        save_checkpoint(tmp_path / "base", base, shards=3),
        save_checkpoint(tmp_path / "ft", ft, shards=2),
    )


def test_index_naming_a_missing_shard(tmp_path, broken):
    b, f = broken
    shard = f / "model-00002-of-00002.safetensors"
    shard.unlink()
    msg = bad(
        "extract",
        b,
        f,
        "-o",
        tmp_path / "o",
        names=[shard.name, f / "model.safetensors.index.json"],
    )
    assert "does not exist" in msg
    assert not (tmp_path / "o").exists()


def test_truncated_shard(tmp_path, broken):
    b, f = broken
    shard = b / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    assert "truncated" in bad("extract", b, f, "-o", tmp_path / "o", names=shard)
    assert "truncated" in bad("inspect", b, names=shard)
    assert not (tmp_path / "o").exists()


def test_invalid_header(tmp_path, broken):
    b, f = broken
    shard = f / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\x00\xff[!"  # garbage where the JSON header starts
    shard.write_bytes(bytes(data))
    assert "not valid JSON" in bad("extract", b, f, "-o", tmp_path / "o", names=shard)
    shard.write_bytes(b"definitely not safetensors")
    bad("apply", f, b, "-o", tmp_path / "o", names=shard)


def test_key_sets_differ(tmp_path):
    base, ft = tiny_state()
    for n in [
        "lm_head.weight",
        "model.layers.0.row",
        "model.layers.0.conv.weight",
        "model.edge_bf16",
    ]:
        del ft[n]
    b = save_checkpoint(tmp_path / "b", base, shards=2)
    f = save_checkpoint(tmp_path / "f", ft, shards=2)
    msg = bad("extract", b, f, "-o", tmp_path / "o", names=["4 float tensor(s)", "--allow-missing"])
    assert (
        sum(
            n in msg for n in ["lm_head.weight", "model.layers.0.row", "model.layers.0.conv.weight"]
        )
        == 3
    )
    r = run("extract", b, f, "-o", tmp_path / "o", "--allow-missing", "-q")
    assert r.exit_code == 0 and "4 tensor(s) in one model only, skipped" in r.stdout


def test_shape_mismatch(tmp_path):
    base, ft = tiny_state()
    ft["model.layers.0.conv.weight"] = torch.zeros(5, 4, 3)
    b = save_checkpoint(tmp_path / "b", base)
    f = save_checkpoint(tmp_path / "f", ft)
    bad(
        "extract", b, f, "-o", tmp_path / "o",
        names=["model.layers.0.conv.weight", "[5, 3, 4]", "[5, 4, 3]"],
    )  # fmt: skip


def test_dtype_mismatch_is_reported_not_refused(tmp_path):
    base = {"w": torch.randn(4, 3), "v": torch.randn(2)}
    ft = {"w": base["w"].to(torch.bfloat16), "v": base["v"] * 2}
    b = save_checkpoint(tmp_path / "b", base)
    f = save_checkpoint(tmp_path / "f", ft)
    r = run("extract", b, f, "-o", tmp_path / "o", "-q")
    assert r.exit_code == 0
    assert "1 tensor(s) differ in dtype; computed in float32" in r.stdout


def test_output_equal_to_or_inside_an_input(tmp_path, tiny_pair):
    _, _, b, f = tiny_pair
    for out in [b, b / "sub", f / "x" / "y"]:
        msg = bad("extract", b, f, "-o", out, names=out)
        assert "input" in msg
    assert run("extract", b, f, "-o", tmp_path / "tv", "-q").exit_code == 0
    for out in [b, tmp_path / "tv", tmp_path / "tv" / "m", tmp_path]:
        assert "input" in bad("apply", b, tmp_path / "tv", "-o", out, names=out)
    assert not (b / "sub").exists() and not (f / "x").exists()
    assert not (tmp_path / "tv" / "m").exists()


def test_single_file_inputs_side_by_side(tmp_path, monkeypatch):
    """The plainest use: two .safetensors files, the output directory next to them."""
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, tmp_path / "base.safetensors")
    save_file({"w": torch.full((3,), 2.5)}, tmp_path / "ft.safetensors")
    monkeypatch.chdir(tmp_path)
    r = run("extract", "base.safetensors", "ft.safetensors", "-o", "tv", "-q")
    assert r.exit_code == 0, r.output
    assert torch.equal(load_tensors(tmp_path / "tv")["w"], torch.full((3,), 1.5))
    assert run("apply", "base.safetensors", "tv", "-o", "m", "-q").exit_code == 0
    assert torch.equal(load_tensors(tmp_path / "m")["w"], torch.full((3,), 2.5))
    for out in [".", "base.safetensors"]:
        assert "contains the input" in bad(
            "extract", "base.safetensors", "ft.safetensors", "-o", out, names=out
        )


def test_output_exists_needs_overwrite(tmp_path, tiny_pair):
    _, _, b, f = tiny_pair
    out = tmp_path / "o"
    out.mkdir()
    (out / "something").write_text("x")
    msg = bad("extract", b, f, "-o", out, names=[out, "--overwrite"])
    assert "already holds" in msg
    r = run("extract", b, f, "-o", out, "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors.index.json").is_file()
    bad("extract", b, f, "-o", out, names=out)  # a finished output is not replaced either
    assert run("extract", b, f, "-o", out, "-q", "--overwrite").exit_code == 0


@pytest.mark.parametrize(
    "option, value",
    [("--chunk-size", "lots"), ("--max-shard-size", "0"), ("--dtype", "int4"), ("--device", "tpu")],
)
def test_bad_options(tmp_path, tiny_pair, option, value):
    _, _, b, f = tiny_pair
    r = run("extract", b, f, "-o", tmp_path / "o", option, value)
    assert r.exit_code == 2 and value in r.stderr and r.stdout == ""
    assert not (tmp_path / "o").exists()


def test_inspect_json_totals(tiny_pair):
    base, _, b, _ = tiny_pair
    r = run("inspect", b, "--json")
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["total_params"] == sum(t.numel() for t in base.values())
    assert info["total_bytes"] == sum(t.numel() * t.element_size() for t in base.values())
    assert sorted(t["name"] for t in info["tensors"]) == sorted(base)
    assert len(info["files"]) == 3
    assert info["dtypes"]["BF16"]["tensors"] == sum(
        t.dtype == torch.bfloat16 for t in base.values()
    )
    scalar = next(t for t in info["tensors"] if t["name"] == "model.layers.0.scale")
    assert scalar == {
        "name": "model.layers.0.scale",
        "dtype": "F32",
        "shape": [],
        "bytes": 4,
        "file": scalar["file"],
    }
    text = run("inspect", b).stdout
    assert f"{len(base)} tensors" in text and f"{info['total_params']:,} parameters" in text
    assert "scalar" in text and "in 3 file(s)" in text


def test_stdout_carries_only_results(tmp_path, tiny_pair):
    base, ft, b, f = tiny_pair
    r = run("extract", b, f, "-o", tmp_path / "tv", "--chunk-size", "64")
    assert r.exit_code == 0
    assert r.stdout.startswith("task vector (F32,F64): ") and "\r" not in r.stdout
    assert "extract" in r.stderr  # the progress bar went to stderr
    r = run("extract", b, f, "-o", tmp_path / "tv2", "--skip-unchanged", "--quiet")
    assert r.exit_code == 0 and r.stderr == ""
    assert r.stdout.splitlines() == [
        r.stdout.splitlines()[0],
        "skipped 3 unchanged tensor(s)",
        "1 non-float tensor(s) equal in both, not written: model.position_ids",
    ]
    r = run("extract", b, f, "-o", tmp_path / "tv3", "--json")  # JSON only, even with a bar
    result = json.loads(r.stdout)
    assert result["tensors"] == len(load_tensors(tmp_path / "tv3")) and result["skipped"] == []
    r = run(
        "apply", b, tmp_path / "tv", tmp_path / "tv2", "--scale", "0.5", "-o", tmp_path / "m", "-q"
    )
    assert r.exit_code == 0 and r.stderr == ""
    assert (
        r.stdout.splitlines()[1] == "scales: 0.5, 0.5; 1 tensor(s) copied from the base unchanged"
    )
    r = run("apply", b, tmp_path / "tv", "-o", tmp_path / "m2", "-q", "--json")
    assert json.loads(r.stdout)["scales"] == [1.0]
    got = load_tensors(tmp_path / "m2")
    assert all(torch.equal(got[n], ft[n]) for n in base)  # the round trip, through the CLI


def test_apply_scale_count_mismatch(tmp_path, tiny_pair):
    _, _, b, f = tiny_pair
    run("extract", b, f, "-o", tmp_path / "tv", "-q")
    tv = tmp_path / "tv"
    msg = bad(
        "apply",
        b,
        tv,
        tv,
        tv,
        "--scale",
        "1",
        "--scale",
        "2",
        "-o",
        tmp_path / "m",
        names="2 scales for 3",
    )
    assert "--scale" in msg
