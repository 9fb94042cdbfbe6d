"""The shape of the package: one way to pass options, one caller of the engine, and the
limits that keep each part readable (issue "one job driver")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_checkpoint

import stream_tv
from stream_tv import RunOptions, extract_task_vector
from stream_tv.errors import InputError
from stream_tv.options import NONFINITE_DEFAULTS

PACKAGE = Path(stream_tv.__file__).parent


def test_every_public_name_resolves():
    for name in stream_tv.__all__:
        assert getattr(stream_tv, name) is not None, name
    with pytest.raises(AttributeError):
        stream_tv.no_such_name  # noqa: B018


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, stream_tv.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_inspect_reads_headers_without_torch(tmp_path):
    """inspect (like --help) never pays for importing torch: headers are JSON and sizes."""
    save_checkpoint(tmp_path / "m", {"w": torch.ones(3, 2, dtype=torch.bfloat16)}, shards=1)
    code = (
        "import sys; from click.testing import CliRunner; from stream_tv.cli import cli; "
        f"r = CliRunner().invoke(cli, ['inspect', {str(tmp_path / 'm')!r}, '--json']); "
        "print(r.exit_code, 'torch' in sys.modules); print(r.output)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, rest = out.stdout.split("\n", 1)
    assert first == "0 False", out.stdout + out.stderr
    assert '"BF16"' in rest and '"total_params": 6' in rest


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"on_nonfinite": "erorr"}, "on_nonfinite 'erorr' is not one of error, warn, ignore"),
        ({"device": "gpu0"}, "unknown device 'gpu0'"),
        ({"chunk_size": "lots"}, "chunk size: cannot read size 'lots'"),
        ({"max_shard_size": 0}, "max shard size: size 0 must be positive"),
    ],
)
def test_run_options_are_checked_when_made(kwargs, message):
    with pytest.raises(InputError, match=message):
        RunOptions(**kwargs)


def test_sizes_are_parsed_once():
    o = RunOptions(chunk_size="1.5MiB", max_shard_size="2GB")
    assert (o.chunk_bytes, o.shard_bytes) == (1536 * 1024, 2 * 10**9)
    assert RunOptions().chunk_bytes is None  # the engine picks it from free memory


def test_nonfinite_default_does_not_depend_on_how_options_are_passed(tmp_path):
    """extract warns on an inf by default, with no options and with RunOptions() alike."""
    save_checkpoint(tmp_path / "b", {"w": torch.zeros(3)})
    save_checkpoint(tmp_path / "f", {"w": torch.tensor([0.0, float("inf"), 1.0])})
    quiet = RunOptions(progress=False)
    r1 = extract_task_vector(tmp_path / "b", tmp_path / "f", tmp_path / "t1", options=quiet)
    r2 = extract_task_vector(tmp_path / "b", tmp_path / "f", tmp_path / "t2")
    assert r1.nonfinite == r2.nonfinite == {"w": 1}
    assert (
        NONFINITE_DEFAULTS["extract"] == "warn" and RunOptions().nonfinite_for("apply") == "error"
    )
    assert RunOptions(on_nonfinite="ignore").nonfinite_for("apply") == "ignore"


def _modules() -> list[tuple[Path, ast.Module, str]]:
    out = []
    for p in sorted(PACKAGE.rglob("*.py")):
        src = p.read_text()
        out.append((p, ast.parse(src), src))
    return out


def test_no_module_over_600_lines_and_no_function_over_80():
    too_long = []
    for path, tree, src in _modules():
        if src.count("\n") > 600:
            too_long.append(f"{path.relative_to(PACKAGE)}: {src.count(chr(10))} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {n}")
    assert not too_long


def test_no_module_imports_another_modules_private_names():
    private = []
    for path, tree, _ in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (
                node.level or "stream_tv" in (node.module or "")
            ):
                private += [
                    f"{path.relative_to(PACKAGE)}:{node.lineno} {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and a.name != "__version__"
                ]
    assert not private


def test_the_engine_has_one_caller():
    callers = []
    for path, tree, _ in _modules():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "run"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "engine"
            ):
                callers.append(path.name)
    assert callers == ["jobs.py"]
