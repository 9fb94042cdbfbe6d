"""mergekit-extract-lora as a benchmark peer, and the retained energy of any PEFT adapter.

    python benchmarks/extract_lora/mergekit_peer.py run    BASE FT OUT --rank 16 [--json R.json]
    python benchmarks/extract_lora/mergekit_peer.py cmd    BASE FT OUT --rank 16
    python benchmarks/extract_lora/mergekit_peer.py energy BASE FT ADAPTER [--json R.json]

``run``: runs ``mergekit-extract-lora`` on local BASE / FT directories (each with
``config.json``: mergekit builds the model on the meta device from it), then reports, as
one JSON object on stdout: wall time and peak RSS of the mergekit process (``os.wait4``,
forked before torch is imported here, so the RSS is mergekit's own) and the retained energy
of the adapter it wrote. ``cmd``: prints the mergekit command line as JSON, for a harness
that times commands itself (benchmarks/run.py). ``energy``: the retained energy only, for
any PEFT LoRA adapter (stream-tv's too, so both are measured the same way).

Energy, per LoRA module of the adapter: ``1 - ||T - L||_F^2 / ||T||_F^2`` with
``T = FT - BASE`` and ``L = scaling * delta`` in PEFT's formula for the layer (Linear
``B @ A``; ``(B @ A).T`` for an Embedding's ``lora_embedding_*`` and for fan_in_fan_out),
from the factors *as stored* (bf16 for mergekit), all in float64, streamed in row blocks so
memory stays bounded. ``mean_retained_energy`` averages over modules (every tensor counts
the same); ``pooled_retained_energy`` is ``1 - sum ||T - L||^2 / sum ||T||^2``.

The mergekit executable: ``--mergekit-bin``, else ``$MERGEKIT_EXTRACT_LORA``, else
``mergekit-extract-lora`` on PATH, else /work/venvs/mergekit/bin/mergekit-extract-lora.
Options after ``--`` go to mergekit unchanged (e.g. ``-- --embed-lora --device cuda``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

DEFAULT_VENV_BIN = "/work/venvs/mergekit/bin/mergekit-extract-lora"
ROW_BLOCK_ELEMENTS = 1 << 24  # 128 MiB of float64 per operand at most


def mergekit_bin(explicit: str | None) -> str:
    for cand in (explicit, os.environ.get("MERGEKIT_EXTRACT_LORA")):
        if cand:
            return cand
    found = shutil.which("mergekit-extract-lora")
    if found:
        return found
    if os.path.exists(DEFAULT_VENV_BIN):
        return DEFAULT_VENV_BIN
    sys.exit(
        "mergekit-extract-lora not found: pass --mergekit-bin or set MERGEKIT_EXTRACT_LORA "
        "(python3 -m venv V; V/bin/pip install torch==2.13.0 mergekit==0.1.5)"
    )


def mergekit_cmd(base: str, ft: str, out: str, rank: int, exe: str, extra: list[str]) -> list[str]:
    """The command line: no Hub access (local paths), rank ``rank`` for every module."""
    return [
        exe,
        "--model",
        ft,
        "--base-model",
        base,
        "--out-path",
        out,
        "--max-rank",
        str(rank),
        *extra,
    ]


def run_measured(cmd: list[str]) -> dict:
    """Fork, exec ``cmd``, wait: wall time and the child's peak RSS (before torch is loaded)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvpe(cmd[0], cmd, env)
        finally:
            os._exit(127)
    _, status, ru = os.wait4(pid, 0)
    return {
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": ru.ru_maxrss / 1024,
        "rc": os.waitstatus_to_exitcode(status),
    }


# -- retained energy of an adapter -----------------------------------------------------------


def _locator(ref: str):
    """name -> safetensors file, for a checkpoint directory or file."""
    import glob

    if os.path.isfile(ref):
        files = [ref]
    elif os.path.exists(os.path.join(ref, "model.safetensors.index.json")):
        with open(os.path.join(ref, "model.safetensors.index.json")) as f:
            wm = json.load(f)["weight_map"]
        return {k: os.path.join(ref, v) for k, v in wm.items()}
    else:
        files = sorted(glob.glob(os.path.join(ref, "*.safetensors")))
    from safetensors import safe_open

    where = {}
    for p in files:
        with safe_open(p, "pt") as g:
            where.update(dict.fromkeys(g.keys(), p))
    return where


def _scaling(cfg: dict, module: str) -> float:
    import math
    import re

    def pick(patterns: dict, default):
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    r = pick(cfg.get("rank_pattern"), cfg["r"])
    alpha = pick(cfg.get("alpha_pattern"), cfg.get("lora_alpha", r))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def adapter_energy(base: str, ft: str, adapter: str) -> dict:
    """Per LoRA module: ``1 - ||T - L||^2 / ||T||^2``, streamed in row blocks, float64."""
    from safetensors import safe_open

    with open(os.path.join(adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    ad_path = os.path.join(adapter, "adapter_model.safetensors")
    with safe_open(ad_path, "pt") as g:
        lora = {k: g.get_tensor(k) for k in g.keys() if ".lora_" in k}
    b_where, f_where = _locator(base), _locator(ft)
    modules = {}
    for k in lora:
        mod, _, suffix = k.partition(".lora_")
        modules.setdefault(mod, {})[suffix] = lora[k]
    per: dict[str, dict] = {}
    for mod, parts in sorted(modules.items()):
        name = mod.removeprefix("base_model.model.") + ".weight"
        if name not in b_where:  # e.g. a checkpoint without the model's top prefix
            continue
        if "embedding_A" in parts:
            A, B, transposed = parts["embedding_A"], parts["embedding_B"], True
        elif "A.weight" in parts:
            A, B, transposed = parts["A.weight"], parts["B.weight"], fan_in_fan_out
        else:
            continue
        A, B = A.double(), B.double()
        s = _scaling(cfg, mod.removeprefix("base_model.model."))
        with safe_open(b_where[name], "pt") as gb, safe_open(f_where[name], "pt") as gf:
            sb, sf = gb.get_slice(name), gf.get_slice(name)
            rows, *rest = sb.get_shape()
            cols = 1
            for c in rest:
                cols *= c
            step = max(1, ROW_BLOCK_ELEMENTS // max(cols, 1))
            err2 = tot2 = 0.0
            for a in range(0, rows, step):
                z = min(a + step, rows)
                t = sf[a:z].double().reshape(z - a, -1) - sb[a:z].double().reshape(z - a, -1)
                if transposed:
                    d = (B @ A[:, a:z]).T * s
                else:
                    d = (B[a:z] @ A.reshape(A.shape[0], -1)) * s
                tot2 += float(t.square().sum())
                err2 += float((t - d).square().sum())
        per[name] = {
            "rank": int(A.shape[0]),
            "tv_norm2": tot2,
            "residual_norm2": err2,
            "retained_energy": 1 - err2 / tot2 if tot2 > 0 else 1.0,
        }
    energies = [v["retained_energy"] for v in per.values()]
    pooled_t = sum(v["tv_norm2"] for v in per.values())
    pooled_e = sum(v["residual_norm2"] for v in per.values())
    bias_keys = [k for k in lora if k.endswith("lora_B.bias")]
    return {
        "modules": len(per),
        "mean_retained_energy": sum(energies) / len(energies) if energies else None,
        "pooled_retained_energy": 1 - pooled_e / pooled_t if pooled_t > 0 else None,
        "modules_to_save": cfg.get("modules_to_save") or [],
        # PEFT loads lora_B.bias only with lora_bias=true: otherwise they are silently dropped
        "bias_tensors_ignored_by_peft": [] if cfg.get("lora_bias") else sorted(bias_keys),
        "tensors": per,
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["run", "cmd", "energy"])
    ap.add_argument("base")
    ap.add_argument("finetuned")
    ap.add_argument("out", help="adapter directory (written by run, read by energy)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mergekit-bin")
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--per-tensor", action="store_true", help="include every tensor's figures")
    a = ap.parse_args(argv)
    report: dict = {}
    if a.mode in ("run", "cmd"):
        cmd = mergekit_cmd(a.base, a.finetuned, a.out, a.rank, mergekit_bin(a.mergekit_bin), extra)
        if a.mode == "cmd":
            print(json.dumps({"cmd": cmd}))
            return
        if os.path.exists(a.out):
            shutil.rmtree(a.out)
        report = {"tool": "mergekit-extract-lora", "cmd": cmd, "rank": a.rank, **run_measured(cmd)}
        if report["rc"] != 0:
            print(json.dumps(report))
            sys.exit(report["rc"])
    energy = adapter_energy(a.base, a.finetuned, a.out)
    if not a.per_tensor:
        energy.pop("tensors")
    report.update(energy)
    text = json.dumps(report, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
