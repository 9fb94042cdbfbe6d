"""Time stream-tv against the I/O floor and the tools people use today, in one run.

    python benchmarks/run.py --sizes 1GB,4GB --work /work/bench-work \\
        --ops extract,apply,merge,lora-delta,compare --out-dtypes bf16,fp16,fp32 \\
        --cache warm,cold --out benchmarks/RESULTS.md --json benchmarks/results.json

For every size and model dtype (``--dtype``) it makes (or reuses) a synthetic checkpoint triple
with make_checkpoint.py and a float32 task vector of it, and then runs every measured command
as its own child process: wall seconds from spawn to exit, and the peak RSS of that child and
its descendants from ``os.wait4``. Before each measurement the previous output is deleted,
dirty pages are flushed (``sync``), the inputs are put in the cache state of the row (below)
and the machine idles ``--settle`` seconds, so every tool starts from the same state.

Rows, per (op, size, model dtype, output dtype, cache state):

- ``floor: dd``: ``dd bs=8M`` of every input the op reads to /dev/null, then ``dd bs=256K``
  of as many bytes as the op writes, from /dev/zero, to a new file on the same filesystem;
- ``floor: read+write``: benchmarks/floor.py, the same bytes with preadv into one reused
  8 MiB buffer, then posix_fallocate + 256 KB pwrites (the writer's pattern); its read time
  alone gives the host-read floor of the CUDA rows;
- ``floor: O_DIRECT read+write`` (cold rows): the same reading through O_DIRECT;
- ``floor: read+write, dropped behind`` (cold rows): floor.py buffered, dropping each piece
  read and each 64 MiB written from the page cache (what ``--page-cache drop`` does);
- ``safetensors``: the whole-model peer (peers.py: load_file every shard, torch, save_file);
- ``peft`` (merge): transformers + PeftModel.merge_and_unload + save_pretrained;
- ``mergekit`` (apply): mergekit-yaml task_arithmetic, weight 1 of finetuned - base, computed
  in float32 (from the environment benchmarks/setup_peers.sh makes; ``--mergekit-venv``);
- ``stream-tv``: ``python -m stream_tv.cli OP ... --overwrite --quiet`` from this checkout
  (``--stream-tv`` replaces the command). With ``--device cuda`` the row is
  ``stream-tv (cuda)`` and, at ``--cpu-check-sizes``, a ``stream-tv (cpu)`` row runs too and
  the two outputs are compared: extract, apply, lora-delta bit for bit; merge within one ulp
  of the output dtype (the documented last-place difference of GPU products); compare's
  figures within 1e-9;
- ``stream-tv (first run)`` (merge, lora-delta, compare): the stream-tv command with its
  model-facts memo emptied first (``STREAM_TV_CACHE_DIR``, stream_tv/lora/facts_cache.py): what
  the first run on a model costs, transformers imported and the model class built on the meta
  device. The ``stream-tv`` row runs after it, with the memo it left (every later run). A
  ``stream-tv (cuda)`` and ``stream-tv (cpu)`` rows (``--device cuda``) find the memo
  primed, untimed (``prime_memo``, once per model), so they too time every later run;
- ``stream-tv --page-cache drop`` (cold rows): the stream-tv command dropping from the page
  cache what it read from the disk (stream_tv/io/pagecache.py), where the default (``auto``)
  keeps it when the inputs and output fit in the memory available;
- ``stream-tv @ memory limit``: the stream-tv command again inside a cgroup-v1 memory limit
  (RSS + page cache, ``--mem-limit``), for a model larger than the memory it may use;
- ``ties``, ``extract-lora``: ops whose rows come from hook scripts
  (benchmarks/merge_methods/peer.py, benchmarks/extract_lora/peer.py; contract in HOOKS).

Output dtypes (``--out-dtypes``): extract, apply and lora-delta run once per listed dtype
(``--dtype X`` on stream-tv and the peers; ``default``: the op's own default); merge always
writes the base's dtype, so it has one row set per model dtype.

Cache states (``--cache``): ``warm``: every input is read into the page cache before the run
(checked with mincore: the row's ``cached`` column); ``cold``: the page cache is dropped
before the run (``echo 3 > /proc/sys/vm/drop_caches``; the interpreter, torch and the tool's
own files are then read back in by an untimed import, so only the data is cold) or, where that
is not permitted, the inputs alone are evicted with posix_fadvise(DONTNEED); the report says
which, and mincore says what was left cached.

Every output is checked (``--no-verify`` skips it): extract against a float32
``finetuned - base`` made tensor by tensor (cast to the output dtype), merge against the
fine-tuned model (PEFT's merge bits), apply against ``base + tv`` in float64 rounded once to
the output dtype (the fine-tuned model's bits, except the elements where the float32 task
vector was itself rounded: counted as ``round_trip_inexact``), lora-delta against ``scaling * B @ A`` of whole tensors, compare's figures against the whole-tensor
float64 peer or its tensor-by-tensor twin, each within 1e-9. Exit status 1 when any row
failed or any check did not pass, 2 when nothing failed but the time budget (``--budget-s``)
cut rows; the summary at the end lists them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
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
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import floor  # noqa: E402  (benchmarks/floor.py: no torch)

from stream_tv.io.writer import parse_size  # noqa: E402
from stream_tv.synthetic import llama_shapes  # noqa: E402

PY = sys.executable
LIMITED = "stream-tv @ memory limit"
DROP_ROW = "stream-tv --page-cache drop"
OPS = ("extract", "apply", "merge", "lora-delta", "compare")
# Ops whose rows come from another engineer's peer script (see HOOKS below).
HOOKS = {"ties": ("merge_methods", "issue 14"), "extract-lora": ("extract_lora", "issue 13")}
DTYPES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
TORCH_NAME = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# the output dtype of each op when no --dtype is given (None: the base's dtype)
DEFAULT_OUT = {
    "extract": "fp32",
    "apply": None,
    "merge": None,
    "lora-delta": "fp32",
    "compare": None,
}
WARM_IMPORTS = {  # what a tool's process reads from disk before the data: re-read after a drop
    # every module a command imports (compare: numba, llvmlite and scipy with the kernels)
    "stream-tv": "import torch, safetensors, click, tqdm, numpy, stream_tv.cli, "
    "stream_tv.commands.compare, stream_tv.commands.merge, stream_tv.commands.extract, "
    "stream_tv.commands.apply, stream_tv.workers, stream_tv.stats.fused as f; f._load()",
    "safetensors": "import torch, safetensors.torch",
    "peft": "import torch, transformers, peft, transformers.models.llama.modeling_llama",
}

HOOKS_DOC = """
Hook contract (for benchmarks/merge_methods/peer.py and benchmarks/extract_lora/peer.py):

    python benchmarks/<dir>/peer.py prepare CKPT_DIR WORK_DIR
        prints one JSON line, a list of row sets (e.g. one per rank):
        [{"label": "r16",
          "inputs": [paths the op reads],      # the floor reads these; GB/s counts them
          "out_bytes": N,                      # bytes it writes (the floor writes as many)
          "stream_tv": ["extract-lora", BASE, FT, "-o", "{out}", "--rank", "16"],
          "peers": {"mergekit": ["{mergekit_venv}/bin/mergekit-extract-lora", ..., "{out}"]},
                                               # (a peer named mergekit gets the x mergekit column)
          "check": ["{python}", "benchmarks/<dir>/peer.py", "check", "{ours}", "{theirs}"]}]
    check prints one JSON line {"ok": bool, ...}: a peer's output against ours.
Placeholders: {out} {python} {mergekit_venv} {device} {ours} {theirs}.
"""


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def files_of(ref: str) -> list[str]:
    """Every file an op reads from a model/adapter directory (weights + json)."""
    if os.path.isfile(ref):
        return [ref]
    return sorted(
        os.path.join(ref, f)
        for f in os.listdir(ref)
        if f.endswith((".safetensors", ".json")) and f != "make_checkpoint.json"
    )


def nbytes(paths: list[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def weights_bytes(ref: str) -> int:
    return nbytes([p for p in files_of(ref) if p.endswith(".safetensors")])


def rm(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


# Linux quirk: a child's ru_maxrss includes the RSS of the process it was forked from, up to
# exec. Children are therefore forked from this tiny intermediary (not from the harness), which
# times fork -> exit, reports the os.wait4 rusage, and kills the child's process group after
# the timeout (rc -9, "timeout": true) or when it is itself terminated.
SPAWN = r"""
import json, os, signal, sys, time
res, cg, timeout, cmd = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
if cg:  # join the memory cgroup; the child inherits it
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
timed_out = []
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.setpgid(0, 0)
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
def kill(*_):
    timed_out.append(True)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
def term(*_):  # the harness is being stopped: take the child's process group along
    kill()
    os._exit(143)
signal.signal(signal.SIGTERM, term)
signal.signal(signal.SIGINT, term)
if timeout > 0:
    signal.signal(signal.SIGALRM, kill)
    signal.setitimer(signal.ITIMER_REAL, timeout)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
signal.setitimer(signal.ITIMER_REAL, 0)
rc = os.waitstatus_to_exitcode(status)
with open(res, "w") as f:
    json.dump({"wall": wall, "rss_kb": ru.ru_maxrss, "user": ru.ru_utime, "sys": ru.ru_stime,
               "rc": rc, "timeout": bool(timed_out)}, f)
"""


def run_measured(
    cmd: list[str] | str,
    shell: bool = False,
    log_path: str | None = None,
    cgroup: str = "",
    timeout: float = 0.0,
    env: dict | None = None,
) -> dict:
    """Run ``cmd`` in a fresh child: wall seconds, peak RSS (KiB, child and descendants), rc;
    inside the memory cgroup ``cgroup`` when given (see MemCgroup); killed after ``timeout``
    seconds when > 0."""
    argv = ["/bin/sh", "-c", cmd] if shell else list(cmd)
    res = (log_path or os.path.join("/tmp", f"stream-tv-bench-{os.getpid()}")) + ".res"
    rm(res)
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    try:
        p = subprocess.run(
            [PY, "-c", SPAWN, res, cgroup, str(timeout), *argv],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            env=env or child_env(),
        )
    finally:
        if log_path:
            out.close()
    try:
        with open(res) as f:
            r = json.load(f)
        os.unlink(res)
    except (OSError, ValueError):
        r = {
            "wall": float("nan"),
            "rss_kb": 0,
            "user": 0.0,
            "sys": 0.0,
            "rc": p.returncode or -1,
            "timeout": False,
        }
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
        return {
            "limit": self.limit,
            "max_usage": self._read("memory.max_usage_in_bytes"),
            "failcnt": self._read("memory.failcnt"),
        }

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


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


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
    for dist in ("torch", "safetensors", "transformers", "peft", "numpy", "stream-tv"):
        try:
            versions[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist.replace("-", "_")] = None
    gpu = None
    try:
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        gpu = q.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "disk": df.splitlines()[-1] if df else "",
        "gpu": gpu,
        "versions": versions,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_avg_at_start": os.getloadavg(),
    }


def mergekit_version(venv: str) -> str | None:
    if not venv:
        return None
    r = subprocess.run(
        [
            os.path.join(venv, "bin", "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'))",
        ],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() or None


class Budget:
    """A wall-clock deadline for the whole run: nothing new starts after it, and no child
    runs past it (its timeout is cut to what is left)."""

    def __init__(self, seconds: float, run_timeout: float) -> None:
        self.deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
        self.run_timeout = run_timeout

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def spent(self, margin: float = 0.0) -> bool:
        return self.left() <= margin

    def timeout(self) -> float:
        left = self.left()
        if left == float("inf"):
            return self.run_timeout
        return max(1.0, min(self.run_timeout or left, left))


# --------------------------------------------------------------------------- cache state


class Cache:
    """Puts the inputs of the next run in the page cache (warm) or out of it (cold)."""

    def __init__(self, method: str, needed: bool = True) -> None:
        # the check drops the page cache once (writing is the only test): only when needed
        self.why_not_drop = floor.can_drop_caches() if needed else "not tried (no cold rows)"
        if method == "auto":
            method = "drop" if not self.why_not_drop else "fadvise"
        elif method == "drop" and self.why_not_drop:
            log(
                f"dropping the page cache is not permitted: {self.why_not_drop}; "
                "cold rows evict the inputs with posix_fadvise(DONTNEED) instead"
            )
            method = "fadvise"
        self.method = method

    def describe(self) -> str:
        if self.method == "drop":
            return (
                "cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before each run (permitted "
                "here), then the tool's own files re-read by an untimed import"
            )
        why = (
            f" (dropping the page cache is not permitted here: {self.why_not_drop})"
            if self.why_not_drop
            else ""
        )
        return f"cold: the inputs evicted with posix_fadvise(DONTNEED) before each run{why}"

    def prepare(self, state: str, inputs: list[str], tool: str, env: dict) -> float:
        """Bring ``inputs`` into ``state``; return the fraction of them cached afterwards."""
        os.sync()
        if state == "warm":
            if floor.resident_fraction(inputs) < 0.999:
                floor.read_files(inputs)
        else:
            if self.method == "drop":
                floor.drop_caches()
                warm = WARM_IMPORTS.get(tool.split(" ")[0])
                if tool == "mergekit" and env.get("MERGEKIT_VENV"):
                    subprocess.run(
                        [
                            os.path.join(env["MERGEKIT_VENV"], "bin", "python"),
                            "-c",
                            "import torch, transformers, mergekit.merge",
                        ],
                        capture_output=True,
                        check=True,
                    )
                elif warm:
                    r = subprocess.run([PY, "-c", warm], env=env, capture_output=True, text=True)
                    if r.returncode != 0:  # a cold row would time the tool's own imports too
                        raise SystemExit(f"run.py: re-reading {tool}'s imports failed: {r.stderr}")
            floor.evict(inputs)  # also after a drop: nothing the import touched stays
        return floor.resident_fraction(inputs)


# --------------------------------------------------------------------------- checkpoints


def ckpt_key(size: str, dtype: str, args: argparse.Namespace) -> str:
    return f"ckpt-{size}-{dtype}-r{args.rank}-seed{args.seed}-shard{args.shard_size}"


def ensure_checkpoint(
    work: str, size: str, dtype: str, args: argparse.Namespace, budget: Budget
) -> tuple[str, dict]:
    key = ckpt_key(size, dtype, args)
    d = os.path.join(work, key)
    meta = os.path.join(d, "make_checkpoint.json")
    if os.path.exists(meta) and all(
        os.path.isdir(os.path.join(d, k)) for k in ("base", "finetuned", "adapter")
    ):
        with open(meta) as f:
            info = json.load(f)
        log(f"reusing {d}")
        return d, info
    rm(d)
    cmd = [
        PY,
        os.path.join(HERE, "make_checkpoint.py"),
        "--size",
        size,
        "--dtype",
        dtype,
        "--shard-size",
        args.shard_size,
        "--rank",
        str(args.rank),
        "--seed",
        str(args.seed),
        "--out",
        d,
    ]
    log("making " + " ".join(cmd[1:]))
    r = run_measured(cmd, log_path=os.path.join(work, key + ".log"), timeout=budget.timeout())
    if r["rc"] != 0:
        raise RuntimeError(
            f"make_checkpoint failed (rc {r['rc']}):\n{tail(os.path.join(work, key + '.log'))}"
        )
    with open(meta) as f:
        info = json.load(f)
    info["make_wall"] = r["wall"]
    info["make_rss_mb"] = r["rss_kb"] / 1024
    with open(meta, "w") as f:
        json.dump(info, f, indent=2)
    log(f"made in {r['wall']:.1f} s, peak RSS {r['rss_kb'] / 1024:.0f} MB")
    return d, info


def ensure_reference(ckpt: str, what: str, budget: Budget) -> str:
    """The float32 task vector (``tv``: apply's input, extract's reference) or the float64
    compare figures (``compare-ref.json``), made once per checkpoint, tensor by tensor."""
    base, ft, ad = (os.path.join(ckpt, k) for k in ("base", "finetuned", "adapter"))
    if what == "tv":
        dst = os.path.join(ckpt, "tv")
        done = os.path.exists(os.path.join(dst, "model.safetensors.index.json"))
        cmd = [PY, os.path.join(HERE, "peers.py"), "reference", "extract", base, ft, dst + ".tmp"]
    else:
        dst = os.path.join(ckpt, "compare-ref.json")
        done = os.path.exists(dst)
        cmd = [
            PY,
            os.path.join(HERE, "peers.py"),
            "reference",
            "compare",
            base,
            ft,
            ad,
            dst + ".tmp",
        ]
    if done:
        return dst
    log(f"making the reference {dst}")
    rm(dst + ".tmp")
    r = run_measured(cmd, log_path=dst + ".log", timeout=budget.timeout())
    if r["rc"] != 0:
        raise RuntimeError(f"reference {what} failed (rc {r['rc']}):\n{tail(dst + '.log')}")
    os.rename(dst + ".tmp", dst)
    log(f"reference {what} made in {r['wall']:.1f} s")
    return dst


def lora_delta_params(ckpt: str) -> int:
    """Elements of the tensors a LoRA delta covers (from the base config and the adapter's
    target modules)."""
    with open(os.path.join(ckpt, "base", "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(ckpt, "adapter", "adapter_config.json")) as f:
        targets = set(json.load(f)["target_modules"])
    n = 0
    for name, shape in llama_shapes(cfg).items():
        if name.removesuffix(".weight").rsplit(".", 1)[-1] in targets:
            n += shape[0] * shape[1]
    return n


# --------------------------------------------------------------------------- the ops


def stream_tv_cmd(args: argparse.Namespace) -> list[str]:
    return shlex.split(args.stream_tv) if args.stream_tv else [PY, "-m", "stream_tv.cli"]


def stream_tv_available(args: argparse.Namespace, ops: list[str]) -> dict[str, tuple[bool, str]]:
    """Per op: does ``stream-tv --help`` list the command (and ``apply --help`` list
    ``--method``, for ties)? One or two start-ups of the CLI, not one per op."""
    base = stream_tv_cmd(args)
    r = subprocess.run([*base, "--help"], capture_output=True, text=True, env=child_env())
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return {op: (False, f"`stream-tv --help` fails: {last[:100]}") for op in ops}
    text = r.stdout.split("Commands:", 1)[-1]
    commands = {
        line.split()[0] for line in text.splitlines() if line.startswith("  ") and line.split()
    }
    res = {}
    for op in ops:
        if op in HOOKS:  # the hook's own command line is checked (hook_plans)
            res[op] = (True, shlex.join(base))
        elif op not in commands:
            res[op] = (False, f"`stream-tv {op}` is not a command here")
        else:
            res[op] = (True, shlex.join(base))
    return res


FLOORS = {
    "dd": "floor: dd",
    "rw": "floor: read+write",
    "direct": "floor: O_DIRECT read+write",
    "drop": "floor: read+write, dropped behind",
}


def floor_tools(in_files: list[str], out: str, out_bytes: int, cache: str) -> dict:
    q = shlex.quote
    reads = "; ".join(f"dd if={q(p)} of=/dev/null bs=8M status=none" for p in in_files)
    write = (
        f"; dd if=/dev/zero of={q(out)} bs=256K count={out_bytes} iflag=count_bytes status=none"
        if out_bytes
        else ""
    )
    fl = [PY, os.path.join(HERE, "floor.py"), "io", "--read", *in_files]
    if out_bytes:
        fl += ["--write", out, "--write-bytes", str(out_bytes)]
    tools = {
        "floor: dd": {"cmd": reads + write, "shell": True},
        "floor: read+write": {"cmd": fl, "floor_json": True},
    }
    if cache == "cold":
        tools["floor: O_DIRECT read+write"] = {"cmd": [*fl, "--direct"], "floor_json": True}
        tools[FLOORS["drop"]] = {"cmd": [*fl, "--drop"], "floor_json": True}
    return tools


def op_plan(
    op: str,
    ck: str,
    tv: str,
    out: str,
    model_dtype: str,
    out_dtype: str | None,
    device: str,
    args: argparse.Namespace,
    size: str,
) -> dict:
    """What to run for one (op, size, model dtype, output dtype): floors, peers, stream-tv,
    the bytes in and out, and how to check each output."""
    base, ft, ad = (os.path.join(ck, k) for k in ("base", "finetuned", "adapter"))
    inputs = {
        "extract": [base, ft],
        "apply": [base, tv],
        "merge": [base, ad],
        "lora-delta": [ad],
        "compare": [base, ft, ad],
    }[op]
    in_files = [p for d in inputs for p in files_of(d)]
    eff_out = out_dtype or DEFAULT_OUT[op] or model_dtype  # what the output holds
    params = weights_bytes(base) // ITEMSIZE[model_dtype]
    out_bytes = {
        "extract": params * ITEMSIZE[eff_out],
        "apply": params * ITEMSIZE[eff_out],
        "merge": weights_bytes(base),
        "lora-delta": lora_delta_params(ck) * ITEMSIZE[eff_out],
        "compare": 0,
    }[op]
    out_json = out + ".json"
    peers_py = os.path.join(HERE, "peers.py")
    dflag = [out_dtype] if out_dtype else []

    stv = [*stream_tv_cmd(args), op]
    if op == "compare":
        stv += ["--base", base, "--finetuned", ft, "--adapter", ad, "--json", out_json]
    elif op == "lora-delta":
        stv += [ad, "--base", base, "-o", out, "--overwrite"]
    else:
        stv += [*inputs, "-o", out, "--overwrite"]
    if out_dtype and op in ("extract", "apply", "lora-delta"):
        stv += ["--dtype", out_dtype]
    stv += ["--quiet"]
    if args.chunk_size:
        stv += ["--chunk-size", args.chunk_size]
    stv += shlex.split(args.stream_tv_args)

    tools = floor_tools(in_files, out, out_bytes, "")  # cold floors are added per cache state
    peers_here = not args.peer_sizes or size in args.peer_sizes
    if peers_here:
        st_args = (
            [ad, out] if op == "lora-delta" else [*inputs, out_json if op == "compare" else out]
        )
        st_dt = dflag if op in ("extract", "apply", "lora-delta") else []
        tools["safetensors"] = {"cmd": [PY, peers_py, "safetensors", op, *st_args, *st_dt]}
        if op == "merge":
            tools["peft"] = {"cmd": [PY, peers_py, "peft", "merge", base, ad, out]}
        if op == "apply":
            if args.mergekit_venv:
                tools["mergekit"] = {
                    "cmd": [PY, peers_py, "mergekit", "apply", base, ft, out, *dflag],
                    "env": {"MERGEKIT_VENV": args.mergekit_venv},
                }
            else:
                tools["mergekit"] = {
                    "skip": "mergekit not installed (bash "
                    "benchmarks/setup_peers.sh; --mergekit-venv)"
                }
    cpu_here = device == "cuda" and (
        op == "compare" or not args.cpu_check_sizes or size in args.cpu_check_sizes
    )
    # one model-facts memo for the run, primed by a row's first stream-tv command
    memo = {"STREAM_TV_CACHE_DIR": os.path.join(args.work, "facts-memo")}
    if device == "cuda":
        if cpu_here:
            tools["stream-tv (cpu)"] = {
                "cmd": [*stv, "--device", "cpu"],
                "keep_as": "cpu",
                "env": memo,
            }
        dev = args.cuda_as or args.device
        tools["stream-tv (cuda)"] = {
            "env": memo,
            "cmd": [*stv, "--device", dev],
            "note": f"ran with --device {dev}" if args.cuda_as else "",
        }
        if op in ("merge", "lora-delta", "compare"):
            # The model-facts memo is primed, untimed, before the first of these rows on a
            # model, so that both time every later run (not transformers' import and the meta
            # build, which the cpu mode's "first run" row times).
            for t in ("stream-tv (cpu)", "stream-tv (cuda)"):
                if t in tools:
                    tools[t]["prime_memo"] = (base, ad)
    else:
        if op in ("merge", "lora-delta", "compare"):  # the ops that read the model facts
            tools["stream-tv (first run)"] = {
                "cmd": [*stv, "--device", device],
                "env": memo,
                "fresh_memo": memo["STREAM_TV_CACHE_DIR"],
            }
        tools["stream-tv"] = {"cmd": [*stv, "--device", device], "env": memo}
    if args.mem_limit and (not args.mem_limit_sizes or size in args.mem_limit_sizes):
        tools[LIMITED] = {
            "cmd": [*stv, "--device", "cpu" if device == "cpu" else (args.cuda_as or device)],
            "env": memo,
        }

    # how each output is checked: (peers.py verify argv, or None for compare/none)
    if op == "extract":
        check = ["check", "{out}", tv, eff_out]
    elif op == "apply":
        check = ["apply", "{out}", ft, base, tv, eff_out]
    elif op == "merge":
        check = ["check", "{out}", ft]
    elif op == "lora-delta":
        check = ["lora-delta", "{out}", ad, eff_out]
    else:
        check = ["compare", "{out}", "{compare_ref}", "1e-9"]
    return {
        "op": op,
        "inputs": inputs,
        "in_files": in_files,
        "in_bytes": nbytes(in_files),
        "out_bytes": out_bytes,
        "weights_bytes": weights_bytes(base),
        "tools": tools,
        "check": check,
        "out": out,
        "out_json": out_json,
        "out_dtype": "-" if op == "compare" else eff_out,
        "out_dtype_flag": out_dtype,
        "model_dtype": model_dtype,
        "ckpt": ck,
    }


PRIME = (
    "import sys; from stream_tv.io.index import load_checkpoint; "
    "from stream_tv.lora.adapter import Adapter; from stream_tv.lora.bind import facts_for; "
    "f = facts_for(Adapter.load(sys.argv[2]), load_checkpoint(sys.argv[1])); "
    "sys.exit(0 if f else 3)"
)


PRIMED: set[tuple[str, str, str]] = set()


def prime_memo(base: str, adapter: str, env: dict) -> None:
    """Read ``base``'s model facts for ``adapter`` into the memo of ``env`` (untimed), as
    the first stream-tv run on the model would, once per model and memo; says so when that
    fails."""
    key = (base, adapter, env.get("STREAM_TV_CACHE_DIR", ""))
    if key in PRIMED:
        return
    PRIMED.add(key)
    t0 = time.perf_counter()
    r = subprocess.run([PY, "-c", PRIME, base, adapter], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        log(f"  model-facts memo NOT primed (rc {r.returncode}): {r.stderr.strip()[-300:]}")
    else:
        log(f"  model-facts memo primed, untimed ({time.perf_counter() - t0:.1f} s)")


def hook_plans(
    op: str, ck: str, work: str, size: str, model_dtype: str, args: argparse.Namespace
) -> list[dict] | str:
    """Row sets from an op's hook script, or a string saying why there are none."""
    folder, issue = HOOKS[op]
    script = os.path.join(HERE, folder, "peer.py")
    if not os.path.exists(script):
        return f"hook not present yet: benchmarks/{folder}/peer.py ({issue})"
    r = subprocess.run(
        [PY, script, "prepare", ck, work], capture_output=True, text=True, env=child_env()
    )
    try:
        sets = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    except (ValueError, IndexError):
        sets = None
    if not isinstance(sets, list):
        return f"hook benchmarks/{folder}/peer.py prepare failed: {r.stderr.strip()[-200:]}"
    plans = []
    for s in sets:
        out = os.path.join(work, f"out-{op}-{s.get('label', '')}-{size}")
        subst = {
            "{out}": out,
            "{python}": PY,
            "{mergekit_venv}": args.mergekit_venv or "",
            "{device}": args.device,
        }

        def fill(argv: list[str], subst: dict = subst) -> list[str]:
            out = []
            for a in argv:  # a placeholder may be part of an argument: {mergekit_venv}/bin/...
                for k, v in subst.items():
                    a = a.replace(k, v)
                out.append(a)
            return out

        in_files = [p for d in s["inputs"] for p in files_of(d)]
        avail = hook_command_available(args, s["stream_tv"], HOOKS[op][1])
        tools = floor_tools(in_files, out, int(s.get("out_bytes", 0)), "")
        tools["stream-tv"] = {
            "cmd": [*stream_tv_cmd(args), *fill(s["stream_tv"]), "--quiet"],
            "keep_as": "ours",
            **({"skip": "not available: " + avail} if avail else {}),
        }
        for name, argv in s.get("peers", {}).items():
            if "{mergekit_venv}" in argv[0] and not args.mergekit_venv:
                tools[name] = {"skip": "mergekit not installed"}
            else:
                tools[name] = {"cmd": fill(argv), "env": {"MERGEKIT_VENV": args.mergekit_venv}}
        plans.append(
            {
                "op": f"{op} {s.get('label', '')}".strip(),
                "inputs": s["inputs"],
                "in_files": in_files,
                "in_bytes": nbytes(in_files),
                "out_bytes": int(s.get("out_bytes", 0)),
                "weights_bytes": 0,
                "tools": tools,
                "hook_check": s.get("check"),
                "out": out,
                "out_json": out + ".json",
                "out_dtype": s.get("out_dtype", "-"),
                "out_dtype_flag": None,
                "model_dtype": model_dtype,
                "ckpt": ck,
                "check": None,
            }
        )
    return plans


def hook_command_available(args: argparse.Namespace, argv: list[str], issue: str) -> str:
    """'' when ``stream-tv ARGV[0] --help`` runs and lists every --option of ``argv``, else
    why not (the command or an option is not written yet)."""
    h = subprocess.run(
        [*stream_tv_cmd(args), argv[0], "--help"], capture_output=True, text=True, env=child_env()
    )
    if h.returncode != 0:
        return f"`stream-tv {argv[0]}` is not a command here ({issue})"
    missing = [a for a in argv[1:] if a.startswith("--") and a.split("=")[0] not in h.stdout]
    if missing:
        return f"`stream-tv {argv[0]}` has no {', '.join(missing)} yet ({issue})"
    return ""


def run_check(
    plan: dict, tool: str, out: str, args: argparse.Namespace, device_row: bool, budget: Budget
) -> dict:
    """Check one output against its reference; a dict with ``ok`` and what was found."""
    check = plan["check"]
    if check is None:
        return {"ok": None}
    if plan["op"] == "compare":
        refs = []
        peer_json = plan["out_json"] + ".peer"
        if os.path.exists(peer_json):
            refs.append(("whole-model peer", peer_json))
        if not refs and not args.compare_reference:
            return {"ok": None, "note": "no reference at this size (--no-compare-reference)"}
        if not refs:
            refs.append(("reference", ensure_reference(plan["ckpt"], "compare", budget)))
        results = {}
        for label, ref in refs:
            argv = [a.replace("{out}", out).replace("{compare_ref}", ref) for a in check]
            results[label] = peers_verify(argv, budget)
        ok = all(r.get("ok") for r in results.values())
        first = next(iter(results.values()))
        return {**first, "ok": ok, "against": ", ".join(results)}
    argv = [a.replace("{out}", out) for a in check]
    r = peers_verify(argv, budget)
    # merge on a GPU: the products' last bits may differ; PEFT's CPU bits are the reference
    if (
        not r.get("ok")
        and device_row
        and plan["op"] == "merge"
        and not r.get("missing")
        and not r.get("extra")
        and not r.get("dtype_mismatch")
        and r.get("max_ulp", 99) <= 1
    ):
        r["ok"] = True
        r["within_ulp"] = 1
    return r


def peers_verify(argv: list[str], budget: Budget | None = None) -> dict:
    left = budget.left() if budget else float("inf")
    if left <= 1:
        return {"ok": None, "note": "not checked: time budget spent"}
    try:
        r = subprocess.run(
            [PY, os.path.join(HERE, "peers.py"), "verify", *argv],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=None if left == float("inf") else left,
        )
    except subprocess.TimeoutExpired:
        return {"ok": None, "note": "not checked: time budget spent during the check"}
    got = last_json(r.stdout)
    if got is None:
        return {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return got


def cpu_equal(
    plan: dict,
    cuda_out: str,
    cpu_out: str,
    budget: Budget,
    cuda_check: dict,
    cpu_check: dict | None,
) -> dict:
    """The CUDA output against the CPU output of the same command. Two outputs that both
    equal the reference bit for bit equal each other: then no second read is needed."""
    op = plan["op"]
    if op == "compare":
        return peers_verify(["compare", cuda_out, cpu_out, "1e-9"], budget)

    def exact(c: dict | None) -> bool:
        return bool(c and c.get("ok") and not c.get("within_ulp") and "max_ulp" in c)

    if exact(cuda_check) and exact(cpu_check):
        return {"ok": True, "via": "both equal the reference bit for bit"}
    r = peers_verify(["check", cuda_out, cpu_out], budget)
    if (
        op == "merge"
        and not r.get("ok")
        and r.get("max_ulp", 99) <= 1
        and not r.get("missing")
        and not r.get("extra")
        and not r.get("dtype_mismatch")
    ):
        r["ok"] = True
        r["within_ulp"] = 1
    return r


def _with_drop_row(tools: dict) -> dict:
    """``tools`` with a ``stream-tv --page-cache drop`` row after the ``stream-tv`` row."""
    out = {}
    for name, spec in tools.items():
        out[name] = spec
        if name == "stream-tv":
            out[DROP_ROW] = {**spec, "cmd": [*spec["cmd"], "--page-cache", "drop"]}
    return out


def measure_plan(
    plan: dict,
    size: str,
    cache_state: str,
    args: argparse.Namespace,
    stv: dict[str, tuple[bool, str]],
    logs: str,
    cache: Cache,
    budget: Budget,
    cgroup: MemCgroup | None = None,
) -> list[dict]:
    op = plan["op"]
    tools_all = dict(plan["tools"])
    if cache_state == "cold":  # the O_DIRECT floor too, among the floors
        cold = floor_tools(plan["in_files"], plan["out"], plan["out_bytes"], "cold")
        tools_all = {**cold, **{t: s for t, s in tools_all.items() if t not in cold}}
        if "stream-tv" in tools_all:  # and the same command dropping behind what it reads
            tools_all = _with_drop_row(tools_all)
    base_op = op.split(" ")[0]
    floors = {FLOORS[f] for f in args.floors}
    wanted = [
        t
        for t in tools_all
        if (t in floors and "floor" in args.tools)
        or (t.startswith("stream-tv") and "stream-tv" in args.tools)
        or (not t.startswith(("floor", "stream-tv")) and t in args.tools)
        or (
            plan.get("hook_check")
            and not t.startswith(("floor", "stream-tv"))
            and "peers" in args.tools
        )
    ]
    if cgroup is None:
        wanted = [t for t in wanted if t != LIMITED]
    runs: dict[str, list[dict]] = {t: [] for t in wanted}
    skip: dict[str, str] = {}
    for t in wanted:
        spec = tools_all[t]
        if "skip" in spec:
            skip[t] = spec["skip"]
        elif t.startswith("stream-tv") and not stv.get(base_op, (True, ""))[0]:
            skip[t] = "not available: " + stv[base_op][1]
    kept: dict[str, str] = {}  # "cpu" / "ours" -> a kept output
    kept_checks: dict[str, dict] = {}  # and its check
    checks: dict[str, dict] = {}
    for rep in range(args.repeat):
        for t in wanted:
            if t in skip:
                continue
            if budget.spent(args.margin):
                skip[t] = skip.get(t) or "skipped: time budget spent"
                continue
            spec = tools_all[t]
            out = plan["out"]
            rm(out)
            rm(plan["out_json"])
            env = child_env(spec.get("env"))
            if spec.get("fresh_memo"):
                shutil.rmtree(spec["fresh_memo"], ignore_errors=True)
            if spec.get("prime_memo"):
                prime_memo(*spec["prime_memo"], env)
            cached = cache.prepare(cache_state, plan["in_files"], t, env)
            if budget.spent(args.margin):  # warming the inputs from a slow disk took the rest
                skip[t] = "skipped: time budget spent while warming the inputs"
                continue
            time.sleep(args.settle)
            load = os.getloadavg()[0]
            slug = "".join(c if c.isalnum() or c in "-." else "_" for c in t)
            lp = os.path.join(
                logs,
                f"{op.replace(' ', '_')}-{size}-{plan['model_dtype']}-"
                f"{plan['out_dtype']}-{cache_state}-{slug}-{rep}.log",
            )
            log(
                f"{op} {size} {plan['model_dtype']}->{plan['out_dtype']} {cache_state} {t} "
                f"(run {rep + 1}/{args.repeat}, {cached:.0%} of inputs cached)"
            )
            cg = cgroup if (cgroup and t == LIMITED) else None
            if cg:
                cg.reset()
            cmd = spec["cmd"]
            r = run_measured(
                cmd,
                shell=spec.get("shell", False),
                log_path=lp,
                cgroup=cg.path if cg else "",
                timeout=budget.timeout(),
                env=env,
            )
            if cg:
                r["cgroup"] = cg.stats()
            r.update(
                load1_before=load,
                log=lp,
                cached_before=cached,
                cmd=cmd if isinstance(cmd, str) else shlex.join(cmd),
            )
            if spec.get("floor_json") and r["rc"] == 0:
                fj = last_json(tail(lp, 4000)) or {}
                r["io"] = fj
                if "wall_s" in fj:  # the I/O alone, without the interpreter's start-up
                    r["wall_process"] = r["wall"]
                    r["wall"] = fj["wall_s"]
            if r["rc"] != 0:
                why = f"timeout after {r['wall']:.0f} s; " if r.get("timeout") else ""
                if cg and r["rc"] == -9 and r["cgroup"]["failcnt"]:
                    why += (
                        f"killed at the cgroup memory limit ({cg.limit / 1e6:.0f} MB, "
                        f"failcnt {r['cgroup']['failcnt']}); "
                    )
                r["error"] = why + tail(lp)
                log(f"  FAILED rc={r['rc']}: {r['error'][-300:]}")
            else:
                log(f"  {r['wall']:.2f} s, peak RSS {r['rss_kb'] / 1024:.0f} MB")
                if rep == 0 and not t.startswith("floor"):
                    if op == "compare" and t == "safetensors":
                        shutil.copy(plan["out_json"], plan["out_json"] + ".peer")
                    checks[t] = check_row(plan, t, spec, args, budget, kept, kept_checks)
                    log(f"  check: {json.dumps(checks[t])[:300]}")
            runs[t].append(r)
    for k in kept.values():
        rm(k)
    rm(plan["out"])
    rm(plan["out_json"])
    rm(plan["out_json"] + ".peer")
    return summarize(plan, size, cache_state, wanted, runs, skip, checks)


def check_row(
    plan: dict,
    t: str,
    spec: dict,
    args: argparse.Namespace,
    budget: Budget,
    kept: dict[str, str],
    kept_checks: dict[str, dict],
) -> dict:
    """Check the output ``t`` just wrote; keep it aside when a later row is compared to it."""
    op = plan["op"]
    out = plan["out_json"] if op == "compare" else plan["out"]
    res: dict = {}
    if plan.get("hook_check"):
        if spec.get("keep_as") == "ours":
            dst = out + ".ours"
            rm(dst)
            os.rename(out, dst)
            kept["ours"] = dst
            return {"ok": None, "note": "ours: the peers are checked against it"}
        if "ours" not in kept:
            return {"ok": None, "note": "not checked: no stream-tv output to check against"}
        argv = [
            a.replace("{ours}", kept["ours"]).replace("{theirs}", out)
            for a in [PY if a == "{python}" else a for a in plan["hook_check"]]
        ]
        r = subprocess.run(argv, capture_output=True, text=True, env=child_env())
        return last_json(r.stdout) or {"ok": False, "error": r.stderr.strip()[-200:]}
    if args.verify:
        res = run_check(
            plan,
            t,
            out,
            args,
            t.endswith("(cuda)") or args.device == "cuda" and t == LIMITED,
            budget,
        )
    if t == "stream-tv (cuda)" and "cpu" in kept:
        res["cpu_equal"] = cpu_equal(plan, out, kept["cpu"], budget, res, kept_checks.get("cpu"))
    if spec.get("keep_as") == "cpu":
        dst = out + ".cpu"
        rm(dst)
        os.rename(out, dst)
        kept["cpu"] = dst
        kept_checks["cpu"] = res
    return res


def summarize(
    plan: dict, size: str, cache_state: str, wanted: list[str], runs: dict, skip: dict, checks: dict
) -> list[dict]:
    gb = plan["in_bytes"] / 1e9
    rows = []
    for t in wanted:
        row = {
            "op": plan["op"],
            "size": size,
            "model_dtype": plan["model_dtype"],
            "out_dtype": plan["out_dtype"],
            "cache": cache_state,
            "tool": t,
            "in_bytes": plan["in_bytes"],
            "out_bytes": plan["out_bytes"],
            "weights_bytes": plan["weights_bytes"],
        }
        ok = [r for r in runs.get(t, []) if r["rc"] == 0]
        if t in skip and not runs.get(t):
            row["status"] = skip[t]
        elif not ok:
            last = runs[t][-1]
            err = (last.get("error") or "").strip().splitlines() or [""]
            row["status"] = f"FAILED (rc {last['rc']}): {err[-1][:160]}"
            row["runs"] = runs[t]
        else:
            row.update(
                status="ok",
                runs=runs[t],
                wall=statistics.median(r["wall"] for r in ok),
                rss_mb=max(r["rss_kb"] for r in ok) / 1024,
                load1=statistics.median(r["load1_before"] for r in ok),
                cached=max(r["cached_before"] for r in ok),
            )
            row["gbps"] = gb / row["wall"] if row["wall"] > 0 else None
            io = [r["io"] for r in ok if r.get("io")]
            if io:
                row["read_s"] = statistics.median(x["read_s"] for x in io)
            cgs = [r["cgroup"] for r in ok if "cgroup" in r]
            if cgs:
                row["mem_limit"] = cgs[0]["limit"]
                row["cgroup_max_usage"] = max(c["max_usage"] for c in cgs)
            if t in checks:
                row["check"] = checks[t]
        rows.append(row)
    return rows


def add_ratios(rows: list[dict], startup_s: float | None, h2d_gbps: float | None) -> None:
    """x floor, x (floor + start-up), x host-read, x peer: within each group of rows that
    share (op, size, model dtype, output dtype, cache)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["op"] != "startup":
            groups.setdefault(
                (r["op"], r["size"], r["model_dtype"], r["out_dtype"], r["cache"]), []
            ).append(r)
    for g in groups.values():
        walls = {r["tool"]: r["wall"] for r in g if "wall" in r}
        floors = [w for t, w in walls.items() if t.startswith("floor")]
        fl = min(floors) if floors else None
        reads = [r["read_s"] for r in g if "read_s" in r]
        for r in g:
            if "wall" not in r:
                continue
            if fl:
                r["floor_s"] = fl
                r["x_floor"] = r["wall"] / fl
                if startup_s is not None and not r["tool"].startswith("floor"):
                    r["x_floor_start"] = r["wall"] / (fl + startup_s)
            if h2d_gbps and reads and r["tool"].startswith("stream-tv"):
                # the host-read floor: every input byte read from the page cache / disk (as
                # fast as floor.py read it in this cache state) or copied host-to-device,
                # whichever is slower
                read_gbps = r["in_bytes"] / min(reads) / 1e9
                r["host_read_gbps"] = min(read_gbps, h2d_gbps)
                r["x_host_read"] = r["wall"] / (r["in_bytes"] / 1e9 / r["host_read_gbps"])
            for peer in ("safetensors", "peft", "mergekit"):
                if peer in walls and not r["tool"].startswith("floor") and r["tool"] != peer:
                    r[f"x_{peer}"] = r["wall"] / walls[peer]


def startup_rows(args: argparse.Namespace, logs: str, base: str | None) -> list[dict]:
    stv = stream_tv_cmd(args)
    cases = [
        ("true (harness floor: spawn, RSS)", ["true"]),
        ("python -c pass", [PY, "-c", "pass"]),
        ("python -c 'import torch'", [PY, "-c", "import torch"]),
        ("python -c 'import stream_tv.cli'", [PY, "-c", "import stream_tv.cli"]),
        ("stream-tv --help", [*stv, "--help"]),
    ]
    if base:
        cases.append(("stream-tv inspect BASE", [*stv, "inspect", base]))
    if args.startup == "torch":  # only what x (floor+start) needs
        cases = [c for c in cases if "import torch" in c[0]]
    rows = []
    for i, (name, cmd) in enumerate(cases):
        rs = [
            run_measured(cmd, log_path=os.path.join(logs, f"startup{i}-{rep}.log"), timeout=120)
            for rep in range(max(args.repeat, args.startup_repeat))
        ]
        ok = [r for r in rs if r["rc"] == 0]
        row = {
            "op": "startup",
            "size": "-",
            "model_dtype": "-",
            "out_dtype": "-",
            "cache": "warm",
            "tool": name,
            "runs": rs,
        }
        if ok:
            row.update(
                status="ok",
                wall=statistics.median(r["wall"] for r in ok),
                rss_mb=max(r["rss_kb"] for r in ok) / 1024,
            )
        else:
            row["status"] = f"FAILED (rc {rs[-1]['rc']}): {tail(rs[-1].get('log', ''))[-100:]}"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def check_text(r: dict) -> str:
    c = r.get("check")
    if not c:
        return ""
    parts = []
    if c.get("ok") is True:
        if r["op"].startswith("compare"):
            parts.append(
                f"figures within 1e-9 of the {c.get('against', 'reference')} "
                f"(max rel {c.get('max_rel_err', 0):.1e})"
            )
        elif "within_4_ulps" in c:  # a merge-method hook: against mergekit, element-wise
            parts.append(
                f"{c['identical']} of {c['elements']} elements identical, "
                f"{c['within_4_ulps']} within 4 ulps, {c.get('tied_threshold', 0)} at a "
                f"magnitude tie, {c.get('unexplained', 0)} unexplained"
            )
        elif c.get("relative_gap") is not None:  # the extract-lora hook, against mergekit
            # relative_gap = (mergekit's - ours) / mergekit's mean retained energy
            ours = -c["relative_gap"]
            parts.append(f"retained energy {ours:+.1e} relative to mergekit's (+: ours higher)")
        elif c.get("round_trip_inexact"):
            parts.append(
                f"exact (base + tv rounded once; {c['round_trip_inexact']} elements where the "
                "task vector was rounded differ from the fine-tuned bits)"
            )
        elif c.get("within_ulp"):
            parts.append(
                f"within 1 ulp ({c.get('unequal_elements', 0)} of "
                f"{c.get('elements', 0)} elements differ)"
            )
        else:
            parts.append("exact")
    elif c.get("ok") is False:
        parts.append(
            "**MISMATCH** "
            + json.dumps({k: v for k, v in c.items() if k not in ("ok", "cpu_equal")})[:200]
        )
    elif c.get("note"):
        parts.append(c["note"])
    ce = c.get("cpu_equal")
    if ce is not None:
        if ce.get("ok"):
            what = (
                "figures within 1e-9"
                if r["op"] == "compare"
                else f"within 1 ulp ({ce.get('unequal_elements', 0)} elements)"
                if ce.get("within_ulp")
                else "bit for bit"
            )
            if ce.get("via"):
                what += " (both equal the reference)"
            parts.append(f"= cpu: {what}")
        else:
            parts.append(
                "**≠ cpu** " + json.dumps({k: v for k, v in ce.items() if k != "ok"})[:200]
            )
    return "; ".join(parts)


def markdown(mach: dict, settings: dict, rows: list[dict], ckpts: dict, extra: dict) -> str:
    v = mach["versions"]
    lines = [
        "# stream-tv benchmark results",
        "",
        f"Run on {mach['date']} with `{settings['command']}`.",
        "",
        "## Machine",
        "",
        f"- CPU: {mach['cpu']}, {mach['cores']} cores; RAM {mach['ram_gib']} GiB; "
        f"kernel {mach['kernel']}" + (f"; GPU {mach['gpu']}" if mach.get("gpu") else ""),
        f"- Disk (work dir): `{mach['disk']}`",
        f"- Python {v['python']}, torch {v['torch']}, safetensors {v['safetensors']}, "
        f"transformers {v['transformers']}, peft {v['peft']}, numpy {v['numpy']}, "
        f"mergekit {settings.get('mergekit') or 'not installed'}, stream_tv {v['stream_tv']}",
        f"- Load average at start: {', '.join(f'{x:.2f}' for x in mach['load_avg_at_start'])}",
        "",
        "## Settings",
        "",
        f"- model dtype(s) {', '.join(settings['dtypes'])}, output dtypes "
        f"{', '.join(settings['out_dtypes'])} (merge writes the base's dtype), shard size "
        f"{settings['shard_size']}, LoRA rank {settings['rank']}, seed {settings['seed']}, "
        f"chunk size {settings['chunk_size'] or 'stream-tv default'}, device "
        f"{settings['device']}, repeats {settings['repeat']} (median wall, max RSS), settle "
        f"{settings['settle']} s before each run",
        f"- cache: warm: inputs read into the page cache first; {extra['cache']}",
    ]
    if extra.get("h2d"):
        h = extra["h2d"]
        lines.append(
            f"- host-to-device copy ({h.get('device', '?')}): pinned "
            f"{fmt(h.get('pinned_gbps'), '.1f')} GB/s, pageable {fmt(h.get('pageable_gbps'), '.1f')}"
            f" GB/s, device-to-host pinned {fmt(h.get('d2h_pinned_gbps'), '.1f')} GB/s"
            if h.get("available")
            else f"- host-to-device copy: not measured ({h.get('why')})"
        )
    if settings.get("cuda_as"):
        lines.append(
            f"- **dry run**: the `stream-tv (cuda)` rows ran with `--device "
            f"{settings['cuda_as']}`; their figures say nothing about a GPU"
        )
    for key, info in ckpts.items():
        s = info["shape"]
        lines.append(
            f"- {key}: llama hidden {s['hidden_size']}, intermediate {s['intermediate_size']}, "
            f"{s['num_hidden_layers']} layers, vocab {s['vocab_size']}; base "
            f"{info['bytes']['base'] / 1e9:.2f} GB in {info['shards']} shard(s), adapter "
            f"{info['bytes']['adapter'] / 1e6:.1f} MB; make_checkpoint.py "
            f"{fmt(info.get('make_wall'), '.1f')} s, peak RSS "
            f"{fmt(info.get('make_rss_mb'), '.0f')} MB"
        )
    startup = [r for r in rows if r["op"] == "startup"]
    if startup:
        lines += ["", "## Start-up", "", "| command | wall s | peak RSS MB |", "|---|---:|---:|"]
        for r in startup:
            lines.append(
                f"| {r['tool']} | {fmt(r.get('wall'), '.3f')} | {fmt(r.get('rss_mb'), '.0f')} |"
                if r["status"] == "ok"
                else f"| {r['tool']} | {r['status']} | |"
            )
    lines += [
        "",
        "## Results",
        "",
        "GB/s: input bytes read / wall. x floor: wall / the fastest floor of the same row set; "
        "x (floor+start): wall / (that floor + `python -c 'import torch'`); x host-read "
        "(CUDA rows): wall / (input bytes at the lower of the page-cache/disk read rate of "
        "this row set and the pinned host-to-device rate); x safetensors / x PEFT / x "
        "mergekit: wall / that peer's wall (below 1 is faster). Peak RSS: ru_maxrss of the "
        "child and its descendants. cached: fraction of the input bytes in the page cache "
        "when the run started (mincore). load: 1-minute load average before the run.",
    ]
    sections: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["op"] != "startup":
            sections.setdefault((r["model_dtype"], r["cache"]), []).append(r)
    for (mdt, cache), rs in sections.items():
        lines += [
            "",
            f"### {mdt} model, {cache} cache",
            "",
            "| op | size | out | tool | wall s | GB/s | peak RSS MB | x floor "
            "| x (floor+start) | x host-read | x safetensors | x PEFT | x mergekit "
            "| check | cached | load |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in rs:
            head = f"| {r['op']} | {r['size']} | {r['out_dtype']} | {r['tool']} "
            if r.get("status") != "ok":
                lines.append(head + f"| {r.get('status')} | | | | | | | | | | | |")
                continue
            check = check_text(r)
            if "mem_limit" in r:
                check += (
                    f"; cgroup limit {r['mem_limit'] / 1e9:.2f} GB, max usage "
                    f"{r['cgroup_max_usage'] / 1e9:.2f} GB"
                )
            lines.append(
                head + f"| {r['wall']:.2f} | {fmt(r.get('gbps'), '.2f')} | {r['rss_mb']:.0f} | "
                f"{fmt(r.get('x_floor'), '.2f')} | {fmt(r.get('x_floor_start'), '.2f')} | "
                f"{fmt(r.get('x_host_read'), '.2f')} | {fmt(r.get('x_safetensors'), '.2f')} | "
                f"{fmt(r.get('x_peft'), '.2f')} | {fmt(r.get('x_mergekit'), '.2f')} | {check} | "
                f"{r.get('cached', 0):.0%} | {fmt(r.get('load1'), '.1f')} |"
            )
    lines += [
        "",
        "Floors: `floor: dd` reads every input with `dd bs=8M` to /dev/null, then writes the "
        "op's output bytes with `dd bs=256K` from /dev/zero; `floor: read+write` is "
        "benchmarks/floor.py (preadv into one reused 8 MiB buffer, then posix_fallocate + "
        "256 KB pwrites), timed around the I/O alone; `O_DIRECT` reads bypass the page cache. "
        "Peers: benchmarks/peers.py (whole-model safetensors; PEFT merge_and_unload + "
        "save_pretrained; mergekit task_arithmetic in float32).",
        "",
    ]
    return "\n".join(lines)


def summary_lines(rows: list[dict]) -> tuple[list[str], bool]:
    bad, skipped, unchecked, ok = [], [], [], 0
    for r in rows:
        what = (
            f"{r['op']} {r['size']} {r['model_dtype']}->{r['out_dtype']} {r['cache']} {r['tool']}"
        )
        st = r.get("status", "")
        if st.startswith("FAILED"):
            bad.append(f"FAILED   {what}: {st}")
        elif st != "ok":
            skipped.append(f"skipped  {what}: {st}")
        else:
            c = r.get("check") or {}
            if c.get("ok") is False:
                bad.append(f"MISMATCH {what}: {json.dumps(c)[:240]}")
            elif (c.get("cpu_equal") or {}).get("ok") is False:
                bad.append(f"≠ CPU    {what}: {json.dumps(c['cpu_equal'])[:240]}")
            else:
                ok += 1
                if c.get("note", "").startswith("not checked") or (c.get("cpu_equal") or {}).get(
                    "note", ""
                ).startswith("not checked"):
                    unchecked.append(f"unchecked {what}: time budget spent")
    lines = [
        f"summary: {ok} row(s) ok, {len(bad)} failed or mismatched, "
        f"{len(skipped)} skipped, {len(unchecked)} not checked",
        *bad,
        *unchecked,
        *skipped,
    ]
    return lines, not bad


# --------------------------------------------------------------------------- main


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__ + HOOKS_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1GB", help="comma list, e.g. 1GB,4GB")
    ap.add_argument("--work", default="/work/bench-work", help="checkpoints and outputs here")
    ap.add_argument(
        "--ops",
        default=",".join(OPS),
        help=f"comma list of {', '.join(OPS)} and the hook ops {', '.join(HOOKS)}",
    )
    ap.add_argument(
        "--tools",
        default="floor,safetensors,peft,mergekit,stream-tv,peers",
        help="which rows to measure (peers: the rows of hook scripts)",
    )
    ap.add_argument(
        "--floors",
        default="dd,rw,direct,drop",
        help="which floors: dd, rw (floor.py read+write), direct (O_DIRECT reads, cold rows "
        "only), drop (read+write dropping behind, cold rows only)",
    )
    ap.add_argument("--dtype", default="bf16", help="model dtype(s), comma list of bf16,fp16,fp32")
    ap.add_argument(
        "--out-dtypes",
        default="default",
        help="output dtypes of extract/apply/lora-delta: comma list of "
        "default,bf16,fp16,fp32 (default: each op's own)",
    )
    ap.add_argument("--cache", default="warm", help="comma list of warm,cold")
    ap.add_argument(
        "--cold-method",
        default="auto",
        choices=["auto", "drop", "fadvise"],
        help="cold rows: drop the whole page cache (root) or evict the inputs",
    )
    ap.add_argument("--device", default="cpu", help="stream-tv --device: cpu or cuda[:N]")
    ap.add_argument(
        "--cuda-as", default="", help="dry run: run the cuda rows with this --device (e.g. cpu)"
    )
    ap.add_argument(
        "--cpu-check-sizes",
        default="",
        help="with --device cuda: sizes that also get a stream-tv (cpu) row to "
        "compare with (default all; compare always gets one)",
    )
    ap.add_argument(
        "--h2d",
        default="auto",
        choices=["auto", "yes", "no"],
        help="measure the host-to-device copy rate (auto: with --device cuda)",
    )
    ap.add_argument("--shard-size", default="5GB")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", default="", help="passed to stream-tv as --chunk-size")
    ap.add_argument(
        "--stream-tv",
        default="",
        help="the stream-tv command (default: this python -m stream_tv.cli)",
    )
    ap.add_argument("--stream-tv-args", default="", help="more stream-tv options, one string")
    ap.add_argument(
        "--mergekit-venv",
        default=None,
        help="venv with mergekit (default /work/venvs/bench-mergekit if present)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (median)")
    ap.add_argument("--startup-repeat", type=int, default=3)
    ap.add_argument(
        "--settle", type=float, default=2.0, help="seconds idle after sync before each measurement"
    )
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    ap.add_argument(
        "--mem-limit",
        default="",
        help="run stream-tv again under a cgroup memory limit (RSS + page cache), "
        "e.g. 2GB: the larger-than-allowed-memory row",
    )
    ap.add_argument(
        "--peer-sizes",
        default="",
        help="sizes that get the peer rows (default: all); the whole-model peer "
        "needs ~4x the model size in memory",
    )
    ap.add_argument(
        "--mem-limit-sizes", default="", help="sizes that get the cgroup-limited row (default: all)"
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="stop starting measurements after this many seconds (0: no limit)",
    )
    ap.add_argument(
        "--margin",
        type=float,
        default=5.0,
        help="seconds of budget a new measurement needs to start",
    )
    ap.add_argument("--run-timeout", type=float, default=1800, help="seconds per child")
    ap.add_argument(
        "--no-compare-reference",
        dest="compare_reference",
        action="store_false",
        help="check compare only against the whole-model peer (where it ran) and, "
        "on cuda, the cpu row; do not make the tensor-by-tensor reference",
    )
    ap.add_argument(
        "--startup",
        default="full",
        choices=["full", "torch", "none"],
        help="start-up rows: all (python, import torch, import stream_tv.cli, --help, inspect), "
        "only import torch (what x (floor+start) needs), or none",
    )
    ap.add_argument("--out", default="", help="Markdown results (e.g. benchmarks/RESULTS.md)")
    ap.add_argument("--json", default="", help="JSON results")
    ap.add_argument(
        "--clean", action="store_true", help="delete each size's checkpoints after measuring it"
    )
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    budget = Budget(args.budget_s, args.run_timeout)
    args.tools = csv(args.tools)
    args.floors = csv(args.floors)
    if any(f not in FLOORS for f in args.floors):
        raise SystemExit(f"--floors takes {', '.join(FLOORS)}")
    args.mem_limit_sizes = csv(args.mem_limit_sizes)
    args.peer_sizes = csv(args.peer_sizes)
    args.cpu_check_sizes = csv(args.cpu_check_sizes)
    ops = csv(args.ops)
    for o in ops:
        if o not in OPS and o not in HOOKS:
            raise SystemExit(f"unknown op {o!r}; choose from {', '.join((*OPS, *HOOKS))}")
    dtypes = [DTYPES.get(d, d) for d in csv(args.dtype)]
    out_dtypes = [None if d == "default" else DTYPES.get(d, d) for d in csv(args.out_dtypes)]
    for d in [*dtypes, *[x for x in out_dtypes if x]]:
        if d not in ITEMSIZE:
            raise SystemExit(f"unknown dtype {d!r}; use bf16, fp16 or fp32")
    caches = csv(args.cache)
    if any(c not in ("warm", "cold") for c in caches):
        raise SystemExit("--cache takes warm and/or cold")
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    if args.mergekit_venv is None:
        dflt = "/work/venvs/bench-mergekit"
        args.mergekit_venv = (
            dflt if os.path.exists(os.path.join(dflt, "bin", "mergekit-yaml")) else ""
        )
    elif args.mergekit_venv and not os.path.exists(
        os.path.join(args.mergekit_venv, "bin", "mergekit-yaml")
    ):
        log(f"no mergekit-yaml in {args.mergekit_venv}: mergekit rows skipped")
        args.mergekit_venv = ""

    os.makedirs(args.work, exist_ok=True)
    logs = os.path.join(args.work, "logs")
    os.makedirs(logs, exist_ok=True)
    mach = machine(args.work)
    log(
        f"{mach['cpu']}, {mach['cores']} cores, {mach['ram_gib']} GiB, {mach['disk']}"
        + (f", GPU {mach['gpu']}" if mach["gpu"] else "")
    )
    stv = stream_tv_available(args, ops)
    for op, (ok, why) in stv.items():
        log(f"stream-tv {op}: {'available' if ok else why}")
    cache = Cache(args.cold_method, needed="cold" in caches)
    if "cold" in caches:
        log(cache.describe())
    extra: dict = {"cache": cache.describe() if "cold" in caches else "no cold rows"}
    if args.h2d == "yes" or (args.h2d == "auto" and device == "cuda"):
        r = subprocess.run(
            [PY, os.path.join(HERE, "floor.py"), "h2d"], capture_output=True, text=True, timeout=300
        )
        extra["h2d"] = last_json(r.stdout) or {"available": False, "why": r.stderr[-200:]}
        log(f"host-to-device: {json.dumps(extra['h2d'])[:300]}")
    h2d_gbps = (extra.get("h2d") or {}).get("pinned_gbps")

    cgroup = None
    if args.mem_limit:
        try:
            cgroup = MemCgroup(parse_size(args.mem_limit))
        except OSError as e:
            log(f"no cgroup memory limit here ({e}): the '{LIMITED}' rows are skipped")
    rows: list[dict] = []
    ckpts = {}
    startup_done = False
    fatal: list[str] = []
    try:
        for size in csv(args.sizes):
            n = parse_size(size)
            for mdt in dtypes:
                if budget.spent(args.margin):
                    fatal.append(f"{size} {mdt}: skipped, time budget spent")
                    log(fatal[-1])
                    continue
                ck = os.path.join(args.work, ckpt_key(size, mdt, args))
                tv_needed = "apply" in ops or "extract" in ops
                big = n * 4 // ITEMSIZE[mdt]  # a float32 copy of the model
                need = (0 if os.path.isdir(ck) else 2 * n) + big * tv_needed + big
                if os.path.isdir(os.path.join(ck, "tv")):
                    need -= big
                free = shutil.disk_usage(args.work).free
                if free < need:
                    fatal.append(
                        f"{size} {mdt}: skipped, needs ~{need / 1e9:.0f} GB more in "
                        f"{args.work}, has {free / 1e9:.0f} GB free"
                    )
                    log(fatal[-1])
                    continue
                try:
                    ck, info = ensure_checkpoint(args.work, size, mdt, args, budget)
                    tv = ensure_reference(ck, "tv", budget) if tv_needed else ""
                except RuntimeError as e:
                    fatal.append(f"{size} {mdt}: {e}")
                    log(f"FAILED {fatal[-1]}")
                    continue
                ckpts[f"{size} {mdt}"] = info
                if args.startup != "none" and not startup_done:
                    rows += startup_rows(args, logs, os.path.join(ck, "base"))
                    startup_done = True
                plans: list[dict] = []
                for op in ops:
                    if op in HOOKS:
                        got = hook_plans(op, ck, args.work, size, mdt, args)
                        if isinstance(got, str):
                            rows.append(
                                {
                                    "op": op,
                                    "size": size,
                                    "model_dtype": mdt,
                                    "out_dtype": "-",
                                    "cache": caches[0],
                                    "tool": "peers",
                                    "status": got,
                                }
                            )
                        else:
                            plans += got
                        continue
                    wanted, seen = [], set()
                    for odt in [None] if op in ("merge", "compare") else out_dtypes:
                        eff = odt or DEFAULT_OUT[op] or mdt
                        if eff not in seen:  # e.g. "default,bf16" for apply on bf16: once
                            seen.add(eff)
                            wanted.append(odt)
                    for odt in wanted:
                        out = os.path.join(args.work, f"out-{op}-{size}")
                        plans.append(op_plan(op, ck, tv, out, mdt, odt, device, args, size))
                for cache_state in caches:
                    for plan in plans:
                        rows += measure_plan(
                            plan, size, cache_state, args, stv, logs, cache, budget, cgroup
                        )
                if args.clean:
                    rm(ck)
    finally:
        if cgroup:
            cgroup.close()
    if args.startup != "none" and not startup_done:
        rows += startup_rows(args, logs, None)
    startup_s = next(
        (
            r["wall"]
            for r in rows
            if r["op"] == "startup" and "wall" in r and r["tool"] == "python -c 'import torch'"
        ),
        None,
    )
    add_ratios(rows, startup_s, h2d_gbps)

    settings = {
        "command": "python benchmarks/run.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "dtypes": dtypes,
        "out_dtypes": [d or "default" for d in out_dtypes],
        "device": args.device,
        "cuda_as": args.cuda_as,
        "shard_size": args.shard_size,
        "rank": args.rank,
        "seed": args.seed,
        "chunk_size": args.chunk_size,
        "repeat": args.repeat,
        "settle": args.settle,
        "mem_limit": args.mem_limit,
        "caches": caches,
        "cold_method": cache.method,
        "drop_caches_permitted": not cache.why_not_drop,
        "drop_caches_why_not": cache.why_not_drop,
        "mergekit": mergekit_version(args.mergekit_venv),
        "mergekit_venv": args.mergekit_venv,
        "budget_s": args.budget_s,
        "elapsed_s": round(time.monotonic() - t_start, 1),
    }
    md = markdown(mach, settings, rows, ckpts, extra)
    summ, all_ok = summary_lines(rows)
    summ += [f"not run: {f}" for f in fatal]
    all_ok = all_ok and not any("time budget" not in f for f in fatal)
    md += "\n## Summary\n\n" + "\n".join(f"- {s}" for s in summ) + "\n"
    print("\n" + md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": mach,
                    "settings": settings,
                    "checkpoints": ckpts,
                    "extra": extra,
                    "stream_tv": {
                        op: {"available": ok, "detail": why} for op, (ok, why) in stv.items()
                    },
                    "rows": rows,
                    "summary": summ,
                },
                f,
                indent=2,
                default=str,
            )
    print("\n".join(summ))
    log(f"done in {time.monotonic() - t_start:.0f} s")
    if not all_ok:
        return 1
    budget_cut = any("time budget" in r.get("status", "") for r in rows) or any(
        "time budget" in f for f in fatal
    )
    return 2 if budget_cut else 0  # 2: nothing failed, but the budget cut rows short


if __name__ == "__main__":
    sys.exit(main())
