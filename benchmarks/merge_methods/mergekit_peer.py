"""mergekit as the peer of ``stream-tv apply --method ties``: one merge, timed, peak RSS.

    python benchmarks/merge_methods/mergekit_peer.py BASE INPUT [INPUT ...] -o OUT \\
        [--method ties] [--weight 1 0.5 0.7] [--density 0.5] [--dtype float32] \\
        [--out-dtype bfloat16] [--mergekit-yaml PATH] [--json RESULT.json]

Writes the YAML config of the merge to ``OUT/../<OUT name>.yml`` and runs ``mergekit-yaml
CONFIG OUT --lazy-unpickle --no-copy-tokenizer`` (the lowest-memory CPU settings mergekit
has) as a child process forked from this script, which imports nothing heavy: the child's
``ru_maxrss`` (``os.wait4``) is mergekit's peak RSS, not ours. Prints one JSON line (and
writes it to ``--json``): wall seconds from fork to exit, peak RSS, exit code, the config.

``mergekit-yaml`` is found from ``--mergekit-yaml``, else in ``--mergekit-venv``'s ``bin/``,
else next to ``$STREAM_TV_MERGEKIT_PYTHON``,
else on ``PATH``. Inputs are fine-tuned model directories (mergekit takes models, not task
vectors). ``--dtype`` is mergekit's working dtype (``dtype:``; ``float32`` by default, as
bf16 arithmetic is not what stream-tv computes); ``--out-dtype`` defaults to the base's
``torch_dtype`` from its ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def find_mergekit_yaml(explicit: str | None, venv: str | None = None) -> str:
    if explicit:
        return explicit
    if venv:
        return str(Path(venv) / "bin" / "mergekit-yaml")
    py = os.environ.get("STREAM_TV_MERGEKIT_PYTHON")
    if py and (Path(py).parent / "mergekit-yaml").exists():
        return str(Path(py).parent / "mergekit-yaml")
    found = shutil.which("mergekit-yaml")
    if not found:
        sys.exit("mergekit-yaml not found: pass --mergekit-yaml or set STREAM_TV_MERGEKIT_PYTHON")
    return found


def config_yaml(
    method: str,
    base: str,
    inputs: list[str],
    weights: list[float],
    densities: list[float],
    dtype: str,
    out_dtype: str,
) -> str:
    """A mergekit YAML config (JSON is YAML: no yaml package needed here)."""
    models = []
    for path, w, d in zip(inputs, weights, densities, strict=True):
        params: dict[str, float] = {"weight": w}
        if method != "task_arithmetic":
            params["density"] = d
        models.append({"model": os.path.abspath(path), "parameters": params})
    cfg = {
        "merge_method": method,
        "base_model": os.path.abspath(base),
        "models": models,
        "dtype": dtype,
        "out_dtype": out_dtype,
    }
    return json.dumps(cfg, indent=2) + "\n"


def run_measured(argv: list[str], log: Path) -> dict:
    """Fork, exec ``argv``, wait: wall seconds, peak RSS of the child, exit code."""
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        _, status, ru = os.wait4(pid, 0)
    return {
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": ru.ru_maxrss / 1024,  # KiB on Linux
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "rc": os.waitstatus_to_exitcode(status),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--weight", type=float, nargs="+", default=None)
    ap.add_argument("--density", type=float, nargs="+", default=[0.5])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out-dtype", default=None)
    ap.add_argument("--mergekit-yaml", default=None)
    ap.add_argument("--mergekit-venv", default=None, help="a venv with mergekit-yaml in bin/")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--no-version",
        action="store_true",
        help="skip asking mergekit's python for its version after the run (a harness that "
        "times this whole process, as benchmarks/run.py does, should not count it)",
    )
    args = ap.parse_args(argv)

    n = len(args.inputs)
    weights = args.weight or [1.0] * n
    densities = args.density * n if len(args.density) == 1 else args.density
    if len(weights) != n or len(densities) != n:
        ap.error(f"give one --weight and --density per input ({n}), or one for all")
    out_dtype = args.out_dtype
    if out_dtype is None:
        with open(os.path.join(args.base, "config.json")) as f:
            out_dtype = json.load(f).get("torch_dtype", "bfloat16")
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    config = out.parent / f"{out.name}.yml"
    config.write_text(
        config_yaml(args.method, args.base, args.inputs, weights, densities, args.dtype, out_dtype)
    )
    cli = find_mergekit_yaml(args.mergekit_yaml, args.mergekit_venv)
    cmd = [cli, str(config), str(out), "--lazy-unpickle", "--no-copy-tokenizer"]
    result = run_measured(cmd, out.parent / f"{out.name}.log")
    version = ""
    if not args.no_version:
        query = "import importlib.metadata as m; print(m.version('mergekit'))"
        py = str(Path(cli).parent / "python")
        version = subprocess.run([py, "-c", query], capture_output=True, text=True).stdout.strip()
    result = {
        "tool": "mergekit",
        "version": version or None,
        "method": args.method,
        "inputs": n,
        "command": cmd,
        **result,
    }
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0 if result["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
