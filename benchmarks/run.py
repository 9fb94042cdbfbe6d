"""Time stream-tv against the I/O floor and the tools people use today, in one run.

    python benchmarks/run.py --sizes 1GB,4GB --work /work/bench-work \\
        --ops extract,apply,merge,compare --out benchmarks/RESULTS.md --json benchmarks/results.json

For every size it makes (or reuses) a synthetic checkpoint triple with make_checkpoint.py and a
float32 task vector of it, warms the page cache, and then runs every measured command as its
own child process: wall seconds from spawn to exit, and the peak RSS of that child and its
descendants from ``os.wait4``. Before each measurement the previous output is deleted, dirty
pages are flushed (``sync``) and the machine idles ``--settle`` seconds, so every tool starts
from the same state. Rows:

- ``floor``: plain ``cat`` of every input the op reads, writing an output of the op's output
  size on the same filesystem (extract: base+finetuned -> file of 2x the bf16 size, the size of
  a float32 task vector; apply: task vector -> /dev/null, base -> file; merge: adapter ->
  /dev/null, base -> file; compare: everything -> /dev/null);
- ``safetensors``: the whole-model peer (benchmarks/peers.py: load_file every shard, torch,
  save_file);
- ``peft`` (merge): transformers + PeftModel.merge_and_unload + save_pretrained;
- ``mergekit`` (apply, as task_arithmetic with weight 1 of finetuned - base), when installed;
- ``stream-tv``: the CLI, ``stream-tv OP ... --overwrite --quiet`` (plus ``--chunk-size``);
  rows say "not available" while the CLI cannot run.

Outputs are checked against the expected tensors (``--no-verify`` skips it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from sizes import parse_size  # noqa: E402

PY = sys.executable
LIMITED = "stream-tv @ memory limit"  # the stream-tv row run inside the cgroup
OPS = ("extract", "apply", "merge", "compare")


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def files_of(ref: str) -> list[str]:
    """Every file an op reads from a model/adapter directory (weights + json)."""
    if os.path.isfile(ref):
        return [ref]
    return sorted(
        os.path.join(ref, f) for f in os.listdir(ref)
        if f.endswith((".safetensors", ".json")) and f != "make_checkpoint.json"
    )


def nbytes(paths: list[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def weights_bytes(ref: str) -> int:
    return nbytes([p for p in files_of(ref) if p.endswith(".safetensors")])


def rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


# Linux quirk: a child's ru_maxrss includes the RSS of the process it was forked from, up to
# exec. Children are therefore forked from this tiny intermediary (not from the harness), which
# times fork -> exit and reports the os.wait4 rusage.
SPAWN = r"""
import json, os, sys, time
res, cg, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
if cg:  # join the memory cgroup; the child inherits it
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
rc = os.waitstatus_to_exitcode(status)
with open(res, "w") as f:
    json.dump({"wall": wall, "rss_kb": ru.ru_maxrss, "user": ru.ru_utime, "sys": ru.ru_stime,
               "rc": rc}, f)
"""


def run_measured(cmd: list[str] | str, shell: bool = False, log_path: str | None = None,
                 cgroup: str = "") -> dict:
    """Run ``cmd`` in a fresh child: wall seconds, peak RSS (KiB, child and descendants), rc;
    inside the memory cgroup ``cgroup`` when given (see MemCgroup)."""
    argv = ["/bin/sh", "-c", cmd] if shell else list(cmd)
    res = (log_path or os.path.join("/tmp", f"stream-tv-bench-{os.getpid()}")) + ".res"
    rm(res)
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    try:
        p = subprocess.run([PY, "-c", SPAWN, res, cgroup, *argv], stdout=out, stderr=out,
                           stdin=subprocess.DEVNULL)
    finally:
        if log_path:
            out.close()
    try:
        with open(res) as f:
            r = json.load(f)
        os.unlink(res)
    except (OSError, ValueError):
        r = {"wall": float("nan"), "rss_kb": 0, "user": 0.0, "sys": 0.0, "rc": p.returncode or -1}
    return r


class MemCgroup:
    """A cgroup-v1 memory limit (RSS + page cache of the processes in it), for the run on a
    checkpoint larger than the memory the process is allowed. Needs root and
    /sys/fs/cgroup/memory; OOM kills show as rc -9."""

    ROOT = "/sys/fs/cgroup/memory"

    def __init__(self, limit: int) -> None:
        self.path = os.path.join(self.ROOT, f"stream-tv-bench-{os.getpid()}")
        os.makedirs(self.path, exist_ok=True)
        self._write("memory.limit_in_bytes", str(limit))
        self.limit = limit

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def _read(self, name: str) -> int:
        with open(os.path.join(self.path, name)) as f:
            return int(f.read().split()[0])

    def reset(self) -> None:
        self._write("memory.max_usage_in_bytes", "0")
        self._write("memory.failcnt", "0")

    def stats(self) -> dict:
        return {"limit": self.limit, "max_usage": self._read("memory.max_usage_in_bytes"),
                "failcnt": self._read("memory.failcnt")}

    def close(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def tail(path: str, n: int = 1200) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def settle(seconds: float) -> None:
    os.sync()
    if seconds:
        time.sleep(seconds)


def machine(work: str) -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    df = subprocess.run(["df", "-hT", work], capture_output=True, text=True).stdout.strip()
    versions = {"python": platform.python_version()}
    for dist in ("torch", "safetensors", "transformers", "peft", "numpy", "mergekit",
                 "stream-tv"):
        try:
            versions[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist.replace("-", "_")] = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**30, 1),
        "kernel": platform.release(), "disk": df.splitlines()[-1] if df else "",
        "versions": versions, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_avg_at_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------- checkpoints


def ckpt_key(size: str, args: argparse.Namespace) -> str:
    return f"ckpt-{size}-{args.dtype}-r{args.rank}-seed{args.seed}-shard{args.shard_size}"


def ensure_checkpoint(work: str, size: str, args: argparse.Namespace) -> tuple[str, dict]:
    key = ckpt_key(size, args)
    d = os.path.join(work, key)
    meta = os.path.join(d, "make_checkpoint.json")
    if os.path.exists(meta) and all(os.path.isdir(os.path.join(d, k))
                                    for k in ("base", "finetuned", "adapter")):
        with open(meta) as f:
            info = json.load(f)
        log(f"reusing {d}")
        return d, info
    rm(d)
    cmd = [PY, os.path.join(HERE, "make_checkpoint.py"), "--size", size, "--dtype", args.dtype,
           "--shard-size", args.shard_size, "--rank", str(args.rank), "--seed", str(args.seed),
           "--out", d]
    log("making " + " ".join(cmd[1:]))
    r = run_measured(cmd, log_path=os.path.join(work, key + ".log"))
    if r["rc"] != 0:
        raise SystemExit(f"make_checkpoint failed:\n{tail(os.path.join(work, key + '.log'))}")
    with open(meta) as f:
        info = json.load(f)
    info["make_wall"] = r["wall"]
    info["make_rss_mb"] = r["rss_kb"] / 1024
    with open(meta, "w") as f:
        json.dump(info, f, indent=2)
    log(f"made in {r['wall']:.1f} s, peak RSS {r['rss_kb'] / 1024:.0f} MB")
    return d, info


def ensure_task_vector(ckpt: str) -> str:
    """finetuned.float() - base.float(), tensor by tensor, HF sharded, float32: apply's input."""
    tv = os.path.join(ckpt, "tv")
    if os.path.exists(os.path.join(tv, "model.safetensors.index.json")):
        return tv
    log(f"making the float32 task vector {tv}")
    rm(tv + ".tmp")
    r = run_measured([PY, os.path.join(HERE, "peers.py"), "reference", "extract",
                      os.path.join(ckpt, "base"), os.path.join(ckpt, "finetuned"), tv + ".tmp"],
                     log_path=tv + ".log")
    if r["rc"] != 0:
        raise SystemExit(f"task vector failed:\n{tail(tv + '.log')}")
    os.rename(tv + ".tmp", tv)
    log(f"task vector made in {r['wall']:.1f} s")
    return tv


# --------------------------------------------------------------------------- verification


def verify(out: str, ref: str) -> dict:
    """Every tensor of ``out`` equal (bits) to ``ref``'s? Checked in a child (peers.py verify)
    so the harness never imports torch and stays small."""
    r = subprocess.run([PY, os.path.join(HERE, "peers.py"), "verify", "check", out, ref],
                       capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}


# --------------------------------------------------------------------------- the ops


def stream_tv_available(ops: list[str]) -> dict[str, tuple[bool, str]]:
    """Per op: can ``stream-tv OP --help`` run? (The CLI is being written alongside.)"""
    exe = shutil.which("stream-tv")
    if not exe:
        return {op: (False, "stream-tv not on PATH") for op in ops}
    res = {}
    for op in ops:
        r = subprocess.run([exe, op, "--help"], capture_output=True, text=True)
        if r.returncode == 0:
            res[op] = (True, exe)
        else:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            res[op] = (False, f"`stream-tv {op} --help` fails: {last[:100]}")
    return res


def op_plan(op: str, ck: str, tv: str, out: str, args: argparse.Namespace,
            have_mergekit: bool, size: str = "") -> dict:
    base, ft, ad = (os.path.join(ck, k) for k in ("base", "finetuned", "adapter"))
    inputs = {"extract": [base, ft], "apply": [base, tv], "merge": [base, ad],
              "compare": [base, ft, ad]}[op]
    in_files = [p for d in inputs for p in files_of(d)]
    wb = weights_bytes(base)
    # the floor: read every input once, write a file of the op's output size. Two ways:
    # GNU cat (file to file: copy_file_range, the kernel picks the piece size) and dd with
    # 256 KB read/write pieces; big pieces are several times slower to write on some VMs
    # (benchmarks/io_probe.py), so x floor is taken against the faster of the two.
    q = shlex.quote

    def dd(paths: list[str]) -> str:
        return "; ".join(f"dd if={q(p)} bs=256K status=none" for p in paths)

    if op == "extract":
        floors = {"floor: cat": f"cat {' '.join(q(p) for p in in_files)} > {q(out)}",
                  "floor: dd 256K": f"{{ {dd(in_files)}; }} > {q(out)}"}
        out_bytes = nbytes(in_files)  # = 2 x bf16 size = the float32 task vector
    elif op in ("apply", "merge"):
        other = files_of(tv if op == "apply" else ad)
        bfiles = files_of(base)
        discard = f"cat {' '.join(q(p) for p in other)} > /dev/null"
        floors = {"floor: cat": f"{discard} && cat {' '.join(q(p) for p in bfiles)} > {q(out)}",
                  "floor: dd 256K": f"{discard} && {{ {dd(bfiles)}; }} > {q(out)}"}
        out_bytes = nbytes(bfiles)
    else:
        floors = {"floor: cat": f"cat {' '.join(q(p) for p in in_files)} > /dev/null",
                  "floor: dd 256K": f"{{ {dd(in_files)}; }} > /dev/null"}
        out_bytes = 0
    peers_py = os.path.join(HERE, "peers.py")
    stv = ["stream-tv", op]
    out_json = out + ".json"
    if op == "compare":
        stv += ["--base", base, "--finetuned", ft, "--adapter", ad, "--json", out_json]
    else:
        stv += [*inputs, "-o", out, "--overwrite"]
    stv += ["--quiet"]
    if args.chunk_size:
        stv += ["--chunk-size", args.chunk_size]
    stv += shlex.split(args.stream_tv_args)
    tools = {name: {"cmd": cmd, "shell": True} for name, cmd in floors.items()}
    st_args = [*inputs, out_json if op == "compare" else out]
    tools["safetensors"] = {"cmd": [PY, peers_py, "safetensors", op, *st_args]}
    if op == "merge":
        tools["peft"] = {"cmd": [PY, peers_py, "peft", "merge", base, ad, out]}
    if op == "apply":
        tools["mergekit"] = ({"cmd": [PY, peers_py, "mergekit", "apply", base, ft, out]}
                             if have_mergekit else {"skip": "mergekit not installed"})
    tools["stream-tv"] = {"cmd": stv}
    if args.mem_limit and (not args.mem_limit_sizes or size in args.mem_limit_sizes):
        # the same command again, inside the cgroup: the larger-than-allowed-memory row
        tools[LIMITED] = {"cmd": stv}
    ref = {"extract": tv, "apply": ft, "merge": ft, "compare": None}[op]
    return {"inputs": inputs, "in_bytes": nbytes(in_files), "out_bytes": out_bytes,
            "weights_bytes": wb, "tools": tools, "ref": ref, "out": out, "out_json": out_json}


def measure_op(op: str, size: str, plan: dict, args: argparse.Namespace,
               stv: dict[str, tuple[bool, str]], logs: str,
               cgroup: MemCgroup | None = None) -> list[dict]:
    rows = []
    peers_here = not args.peer_sizes or size in args.peer_sizes
    wanted = [t for t in plan["tools"]
              if (t in args.tools and (peers_here or t == "stream-tv"))
              or (t.startswith("floor") and "floor" in args.tools)
              or (t == LIMITED and "stream-tv" in args.tools)]
    runs: dict[str, list[dict]] = {t: [] for t in wanted}
    skip: dict[str, str] = {}
    for t in wanted:
        spec = plan["tools"][t]
        if "skip" in spec:
            skip[t] = spec["skip"]
        elif t.startswith("stream-tv") and not stv[op][0]:
            skip[t] = "not available: " + stv[op][1]
    for rep in range(args.repeat):
        for t in wanted:
            if t in skip:
                continue
            spec = plan["tools"][t]
            rm(plan["out"])
            rm(plan["out_json"])
            settle(args.settle)
            load = os.getloadavg()[0]
            slug = t.replace(": ", "-").replace(" ", "_")
            lp = os.path.join(logs, f"{op}-{size}-{slug}-{rep}.log")
            log(f"{op} {size} {t} (run {rep + 1}/{args.repeat})")
            cg = cgroup if (cgroup and t in args.mem_limit_tools) else None
            if cg:
                cg.reset()
            r = run_measured(spec["cmd"], shell=spec.get("shell", False), log_path=lp,
                             cgroup=cg.path if cg else "")
            if cg:
                r["cgroup"] = cg.stats()
            r["load1_before"] = load
            r["log"] = lp
            cmd = spec["cmd"]
            r["cmd"] = cmd if isinstance(cmd, str) else shlex.join(cmd)
            if r["rc"] != 0:
                r["error"] = tail(lp)
                log(f"  failed rc={r['rc']}: {r['error'][-300:]}")
            else:
                log(f"  {r['wall']:.2f} s, peak RSS {r['rss_kb'] / 1024:.0f} MB")
                if args.verify and plan["ref"] and not t.startswith("floor") and rep == 0:
                    r["verify"] = verify(plan["out"], plan["ref"])
                    log(f"  verify: {r['verify']}")
                elif not t.startswith("floor") and op == "compare":
                    r["verify"] = {"ok": os.path.exists(plan["out_json"])}
            runs[t].append(r)
    rm(plan["out"])
    rm(plan["out_json"])
    gb = plan["in_bytes"] / 1e9
    for t in wanted:
        row = {"op": op, "size": size, "tool": t, "in_bytes": plan["in_bytes"],
               "out_bytes": plan["out_bytes"], "weights_bytes": plan["weights_bytes"]}
        if t in skip:
            row["status"] = skip[t]
        else:
            ok = [r for r in runs[t] if r["rc"] == 0]
            row["runs"] = runs[t]
            if not ok:
                err = (runs[t][-1].get("error") or "").strip().splitlines() or [""]
                row["status"] = f"failed (rc {runs[t][-1]['rc']}): {err[-1][:120]}"
            else:
                row["status"] = "ok"
                row["wall"] = statistics.median(r["wall"] for r in ok)
                row["rss_mb"] = max(r["rss_kb"] for r in ok) / 1024
                row["gbps"] = gb / row["wall"]
                row["load1"] = statistics.median(r["load1_before"] for r in ok)
                cgs = [r["cgroup"] for r in ok if "cgroup" in r]
                if cgs:
                    row["mem_limit"] = cgs[0]["limit"]
                    row["cgroup_max_usage"] = max(c["max_usage"] for c in cgs)
                v = [r["verify"] for r in ok if "verify" in r]
                if v:
                    row["verify"] = v[0]
        rows.append(row)
    walls = {r["tool"]: r["wall"] for r in rows if "wall" in r}
    floor = min((w for t, w in walls.items() if t.startswith("floor")), default=None)
    for r in rows:
        if "wall" not in r:
            continue
        if floor:
            r["x_floor"] = r["wall"] / floor
        for peer in ("safetensors", "peft"):
            if peer in walls and not r["tool"].startswith("floor") and r["tool"] != peer:
                r[f"x_{peer}"] = r["wall"] / walls[peer]
    return rows


def startup_rows(args: argparse.Namespace, logs: str) -> list[dict]:
    rows = []
    for i, (name, cmd) in enumerate((("true (harness floor: spawn, RSS)", ["true"]),
                      ("python -c 'import torch'", [PY, "-c", "import torch"]),
                      ("python -c 'import torch, safetensors'",
                       [PY, "-c", "import torch, safetensors"]))):
        rs = []
        for rep in range(max(args.repeat, 3)):
            rs.append(run_measured(cmd, log_path=os.path.join(logs, f"startup{i}-{rep}.log")))
        ok = [r for r in rs if r["rc"] == 0]
        if ok:
            rows.append({"op": "startup", "size": "-", "tool": name, "status": "ok",
                         "wall": statistics.median(r["wall"] for r in ok),
                         "rss_mb": max(r["rss_kb"] for r in ok) / 1024, "runs": rs})
    return rows


# --------------------------------------------------------------------------- report


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(mach: dict, settings: dict, rows: list[dict], ckpts: dict) -> str:
    v = mach["versions"]
    lines = [
        "# stream-tv benchmark results",
        "",
        f"Run on {mach['date']} with `{settings['command']}`.",
        "",
        "## Machine",
        "",
        f"- CPU: {mach['cpu']}, {mach['cores']} cores; RAM {mach['ram_gib']} GiB; "
        f"kernel {mach['kernel']}",
        f"- Disk (work dir): `{mach['disk']}`",
        f"- Python {v['python']}, torch {v['torch']}, safetensors {v['safetensors']}, "
        f"transformers {v['transformers']}, peft {v['peft']}, numpy {v['numpy']}, "
        f"mergekit {v['mergekit'] or 'not installed'}, stream_tv {v['stream_tv']}",
        f"- Load average at start: {', '.join(f'{x:.2f}' for x in mach['load_avg_at_start'])}",
        "",
        "## Settings",
        "",
        f"- dtype {settings['dtype']}, shard size {settings['shard_size']}, LoRA rank "
        f"{settings['rank']}, seed {settings['seed']}, chunk size "
        f"{settings['chunk_size'] or 'stream-tv default'}, repeats {settings['repeat']} "
        f"(median wall, max RSS), settle {settings['settle']} s before each run, page cache warm",
    ]
    for size, info in ckpts.items():
        s = info["shape"]
        lines.append(
            f"- {size}: llama hidden {s['hidden_size']}, intermediate {s['intermediate_size']}, "
            f"{s['num_hidden_layers']} layers, vocab {s['vocab_size']}; base "
            f"{info['bytes']['base'] / 1e9:.2f} GB in {info['shards']} shard(s), adapter "
            f"{info['bytes']['adapter'] / 1e6:.1f} MB; make_checkpoint.py "
            f"{fmt(info.get('make_wall'), '.1f')} s, peak RSS "
            f"{fmt(info.get('make_rss_mb'), '.0f')} MB")
    lines += [
        "",
        "## Results",
        "",
        "GB/s is input bytes read / wall. x floor: wall / the I/O floor's wall for the same op; "
        "x safetensors / x PEFT: wall / that peer's wall (below 1 is faster). Peak RSS: "
        "ru_maxrss of the child and its descendants (os.wait4). load: the 1-minute load "
        "average just before the run (other work on the machine shows here).",
        "",
        "| op | size | tool | wall s | GB/s | peak RSS MB | x floor | x safetensors | x PEFT "
        "| check | load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['op']} | {r['size']} | {r['tool']} | {r.get('status')} "
                         "| | | | | | | |")
            continue
        ver = r.get("verify")
        check = "" if ver is None else ("exact" if ver.get("ok") else
                                        f"MISMATCH {json.dumps(ver)}")
        if r["op"] == "compare" and ver is not None:
            check = "json written" if ver.get("ok") else "no json"
        if "mem_limit" in r:
            check += (f"; cgroup limit {r['mem_limit'] / 1e9:.1f} GB, max usage "
                      f"{r['cgroup_max_usage'] / 1e9:.2f} GB")
        lines.append(
            f"| {r['op']} | {r['size']} | {r['tool']} | {r['wall']:.2f} | "
            f"{fmt(r.get('gbps'), '.2f')} | {r['rss_mb']:.0f} | {fmt(r.get('x_floor'), '.2f')} | "
            f"{fmt(r.get('x_safetensors'), '.2f')} | {fmt(r.get('x_peft'), '.2f')} | {check} | "
            f"{fmt(r.get('load1'), '.1f')} |")
    lines += [
        "",
        "Floors: extract `cat base finetuned > out` (writes 2x the bf16 size = the float32 task "
        "vector); apply `cat tv > /dev/null; cat base > out`; merge `cat adapter > /dev/null; "
        "cat base > out`; compare `cat base finetuned adapter > /dev/null`. The same with "
        "`dd bs=256K` in place of the writing `cat` (GNU cat copies file to file with "
        "copy_file_range, whose large pieces are slow to write on this VM). x floor is "
        "relative to the faster floor.",
        "Peers: `benchmarks/peers.py` (whole-model safetensors: load_file every shard, torch, "
        "save_file; PEFT: transformers + PeftModel.merge_and_unload + save_pretrained; "
        "mergekit task_arithmetic weight 1 when installed).",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1GB", help="comma list, e.g. 1GB,4GB")
    ap.add_argument("--work", default="/work/bench-work", help="checkpoints and outputs here")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--tools", default="floor,safetensors,peft,mergekit,stream-tv",
                    help="which rows to measure")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--shard-size", default="5GB")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", default="", help="passed to stream-tv as --chunk-size")
    ap.add_argument("--stream-tv-args", default="", help="more stream-tv options, one string")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (median)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds idle after sync before each measurement")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    ap.add_argument("--mem-limit", default="",
                    help="run --mem-limit-tools under a cgroup memory limit (RSS + page cache), "
                         "e.g. 4GB: the larger-than-allowed-memory run")
    ap.add_argument("--mem-limit-tools", default=LIMITED)
    ap.add_argument("--peer-sizes", default="",
                    help="comma list of sizes that get the peer rows (default: all); the "
                    "whole-model peer needs ~4x the model size in memory")
    ap.add_argument("--mem-limit-sizes", default="",
                    help="comma list of sizes that get the cgroup-limited row (default: all)")
    ap.add_argument("--out", default="", help="Markdown results (e.g. benchmarks/RESULTS.md)")
    ap.add_argument("--json", default="", help="JSON results")
    ap.add_argument("--clean", action="store_true",
                    help="delete each size's checkpoints after measuring it")
    args = ap.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    args.mem_limit_tools = [t.strip() for t in args.mem_limit_tools.split(",") if t.strip()]
    args.mem_limit_sizes = [t.strip() for t in args.mem_limit_sizes.split(",") if t.strip()]
    args.peer_sizes = [t.strip() for t in args.peer_sizes.split(",") if t.strip()]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for o in ops:
        if o not in OPS:
            raise SystemExit(f"unknown op {o!r}; choose from {', '.join(OPS)}")

    os.makedirs(args.work, exist_ok=True)
    logs = os.path.join(args.work, "logs")
    os.makedirs(logs, exist_ok=True)
    mach = machine(args.work)
    log(f"{mach['cpu']}, {mach['cores']} cores, {mach['ram_gib']} GiB, {mach['disk']}")
    stv = stream_tv_available(ops)
    for op, (ok, why) in stv.items():
        log(f"stream-tv {op}: {'available' if ok else why}")
    have_mergekit = (importlib.util.find_spec("mergekit") is not None
                     and shutil.which("mergekit-yaml") is not None)

    cgroup = MemCgroup(parse_size(args.mem_limit)) if args.mem_limit else None
    rows = startup_rows(args, logs)
    ckpts = {}
    try:
        for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            n = parse_size(size)
            ck = os.path.join(args.work, ckpt_key(size, args))
            tv_needed = "apply" in ops or "extract" in ops
            # base + finetuned, the float32 task vector, the largest output (a float32 tv)
            need = (0 if os.path.isdir(ck) else 2 * n) + 2 * n * tv_needed + 2 * n
            if os.path.isdir(os.path.join(ck, "tv")):
                need -= 2 * n
            free = shutil.disk_usage(args.work).free
            if free < need:
                log(f"skipping {size}: needs ~{need / 1e9:.0f} GB more in {args.work}, "
                    f"has {free / 1e9:.0f} GB free")
                continue
            ck, info = ensure_checkpoint(args.work, size, args)
            ckpts[size] = info
            tv = ensure_task_vector(ck) if tv_needed else ""
            log("warming the page cache")
            subprocess.run(f"cat {shlex.quote(ck)}/*/* > /dev/null", shell=True, check=False)
            for op in ops:
                plan = op_plan(op, ck, tv, os.path.join(args.work, f"out-{op}-{size}"), args,
                               have_mergekit, size)
                rows += measure_op(op, size, plan, args, stv, logs, cgroup)
            if args.clean:
                rm(ck)
    finally:
        if cgroup:
            cgroup.close()

    settings = {"command": "python benchmarks/run.py " + shlex.join(
        sys.argv[1:] if argv is None else argv), "dtype": args.dtype,
        "shard_size": args.shard_size, "rank": args.rank, "seed": args.seed,
        "chunk_size": args.chunk_size, "repeat": args.repeat, "settle": args.settle,
        "mem_limit": args.mem_limit, "mem_limit_tools": args.mem_limit_tools}
    md = markdown(mach, settings, rows, ckpts)
    print("\n" + md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": mach, "settings": settings, "checkpoints": ckpts,
                       "stream_tv": {op: {"available": ok, "detail": why}
                                     for op, (ok, why) in stv.items()},
                       "rows": rows}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
