"""What the CLI's start-up costs, and which import brings torch in.

    python benchmarks/startup.py [--model DIR] [--repeat 5] [--out STARTUP-run.md]

Measures, each in a fresh process (median of ``--repeat``): ``python -c pass``,
``python -c 'import torch'``, ``python -c 'import stream_tv.cli'``, ``stream-tv --help`` and
``stream-tv inspect MODEL`` (``python -m stream_tv.cli`` from this checkout). Then, with
``python -X importtime``, the import tree of the three stream-tv commands: the cumulative
time per top-level package, and the chain of imports through which each first reaches
torch. Last, from the source alone (ast), every ``stream_tv`` module that imports torch,
numpy, safetensors or huggingface_hub at module level, and the modules ``stream_tv.cli``
pulls in at import time: what would have to become lazy for ``--help`` and ``inspect``
to run without torch.
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = sys.executable
HEAVY = ("torch", "numpy", "safetensors", "huggingface_hub", "transformers", "tqdm", "click")


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def wall(cmd: list[str], repeat: int) -> tuple[float, float, int]:
    """(median, min) wall seconds of ``cmd`` in fresh processes, and its exit status."""
    times, rc = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, env=env(), cwd=REPO)
        times.append(time.perf_counter() - t0)
        rc = rc or p.returncode
    return statistics.median(times), min(times), rc


def importtime(cmd_tail: list[str]) -> list[tuple[int, int, int, str]]:
    """``python -X importtime ...``: (self us, cumulative us, depth, module) in print order
    (a module is printed after everything it imported)."""
    p = subprocess.run(
        [PY, "-X", "importtime", *cmd_tail], capture_output=True, text=True, env=env(), cwd=REPO
    )
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        body = line.split(":", 1)[1]
        self_s, cum_s, mod = body.split("|")
        depth = (len(mod) - len(mod.lstrip(" "))) // 2
        rows.append((int(self_s), int(cum_s), depth, mod.strip()))
    return rows


def chain_to(rows: list[tuple[int, int, int, str]], target: str) -> list[str]:
    """The import chain (outermost first) through which ``target`` was first imported."""
    for i, (_, _, depth, mod) in enumerate(rows):
        if mod == target:
            chain = [mod]
            d = depth
            for _, _, d2, m2 in rows[i + 1 :]:
                if d2 < d:
                    chain.append(m2)
                    d = d2
                    if d == 0:
                        break
            return chain[::-1]
    return []


def by_package(rows: list[tuple[int, int, int, str]]) -> dict[str, float]:
    """Seconds of import time per top-level package (self times summed)."""
    out: dict[str, float] = {}
    for self_us, _, _, mod in rows:
        top = mod.split(".")[0]
        out[top] = out.get(top, 0.0) + self_us / 1e6
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def module_imports() -> dict[str, dict[str, list[str]]]:
    """Per stream_tv module: the heavy packages and the stream_tv modules it imports at
    module level (not inside functions), from its source."""
    pkg = os.path.join(REPO, "stream_tv")
    out = {}
    for root, _, files in os.walk(pkg):
        for fn in sorted(files):
            if not fn.endswith(".py"):
                continue
            path = os.path.join(root, fn)
            rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
            mod = rel.removesuffix(".__init__")
            is_pkg = fn == "__init__.py"
            tree = ast.parse(open(path).read())
            heavy, local = set(), set()
            for node in tree.body:  # module level only
                nodes = [node]
                if isinstance(node, ast.If | ast.Try):  # e.g. try: import x
                    nodes = list(ast.walk(node))
                for n in nodes:
                    if isinstance(n, ast.Import):
                        for a in n.names:
                            top = a.name.split(".")[0]
                            (local if top == "stream_tv" else heavy).add(a.name)
                    elif isinstance(n, ast.ImportFrom):
                        if n.level:
                            parts = mod.split(".")
                            base = parts if is_pkg else parts[:-1]
                            base = base[: len(base) - (n.level - 1)]
                            target = ".".join(base + ([n.module] if n.module else []))
                            if n.module is None:
                                for a in n.names:
                                    local.add(f"{target}.{a.name}")
                            else:
                                local.add(target)
                        elif n.module:
                            top = n.module.split(".")[0]
                            (local if top == "stream_tv" else heavy).add(n.module)
            out[mod] = {
                "heavy": sorted(h for h in heavy if h.split(".")[0] in HEAVY),
                "local": sorted(local),
            }
    return out


def closure(graph: dict[str, dict[str, list[str]]], start: str) -> list[str]:
    """Every stream_tv module imported (at module level) when ``start`` is imported,
    packages' __init__ included."""
    seen: list[str] = []
    todo = [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.append(m)
        parts = m.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__ and a.b/__init__
            todo.append(".".join(parts[:i]))
        todo += [
            x
            for x in graph.get(m, {}).get("local", [])
            if x in graph or x.rsplit(".", 1)[0] in graph
        ]
        todo = [x if x in graph else x.rsplit(".", 1)[0] for x in todo]
    return sorted(set(seen) & set(graph))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="", help="a local checkpoint for `inspect`")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="", help="write the Markdown here as well")
    args = ap.parse_args(argv)

    cli = [PY, "-m", "stream_tv.cli"]
    cases = [
        ("python -c pass", [PY, "-c", "pass"]),
        ("python -c 'import torch'", [PY, "-c", "import torch"]),
        ("python -c 'import stream_tv.cli'", [PY, "-c", "import stream_tv.cli"]),
        ("stream-tv --help", [*cli, "--help"]),
    ]
    trees = [
        ("import stream_tv.cli", ["-c", "import stream_tv.cli"]),
        ("stream-tv --help", ["-m", "stream_tv.cli", "--help"]),
    ]
    if args.model:
        cases.append(("stream-tv inspect MODEL", [*cli, "inspect", args.model]))
        trees.append(("stream-tv inspect MODEL", ["-m", "stream_tv.cli", "inspect", args.model]))
    lines = [
        "# stream-tv start-up",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cores, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} at start; median and min of "
        f"{args.repeat} fresh processes.",
        "",
        "| command | median s | min s | exit |",
        "|---|---:|---:|---:|",
    ]
    for name, cmd in cases:
        med, mn, rc = wall(cmd, args.repeat)
        lines.append(f"| {name} | {med:.3f} | {mn:.3f} | {rc} |")
        print(lines[-1], flush=True)
    for name, tail in trees:
        rows = importtime(tail)
        total = max((c for _, c, d, _ in rows if d == 0), default=0) / 1e6
        lines += [
            "",
            f"## `{name}`: import tree (`-X importtime`)",
            "",
            f"Largest top-level import: {total:.2f} s. Self time per package:",
            "",
        ]
        for pkgname, sec in list(by_package(rows).items())[:8]:
            lines.append(f"- {pkgname}: {sec:.3f} s")
        for heavy in ("torch", "numpy", "safetensors", "huggingface_hub"):
            ch = chain_to(rows, heavy)
            lines.append(
                f"- first import of {heavy}: " + (" -> ".join(ch) if ch else "not imported")
            )
    graph = module_imports()
    lines += [
        "",
        "## Module-level imports of heavy packages (from the source)",
        "",
        "| module | heavy imports at module level |",
        "|---|---|",
    ]
    for mod, info in sorted(graph.items()):
        if info["heavy"]:
            lines.append(f"| {mod} | {', '.join(info['heavy'])} |")
    cl = closure(graph, "stream_tv.cli")
    torchy = [m for m in cl if any(h.split(".")[0] == "torch" for h in graph[m]["heavy"])]
    lines += [
        "",
        f"`import stream_tv.cli` runs {len(cl)} stream_tv modules at import time; "
        f"{len(torchy)} of them import torch at module level: {', '.join(torchy)}.",
        "",
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
