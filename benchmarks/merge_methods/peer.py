"""benchmarks/run.py's hook for ``--ops ties``: ``stream-tv apply --method ties`` of three
fine-tuned models into their base, against mergekit 0.1.5's ``ties`` on the same inputs.

    python benchmarks/merge_methods/peer.py prepare CKPT_DIR WORK_DIR
    python benchmarks/merge_methods/peer.py check OURS THEIRS --base B --inputs F1 F2 F3 \\
        --density 0.5 [--density ...]

``prepare`` takes ``CKPT_DIR/base`` and ``CKPT_DIR/finetuned`` (make_checkpoint.py: the base
with a LoRA merged into it) and writes two more fine-tunes of the base into
``WORK_DIR/ties-inputs-<name>/`` (every tensor ``base + N(0, (0.05 std(base))^2)``, rounded to
the base's dtype, one tensor in memory at a time; reused when already there), then prints the
row set (run.py's HOOKS contract): our command, mergekit's (``mergekit_peer.py``, which runs
``mergekit-yaml --lazy-unpickle --no-copy-tokenizer`` with ``dtype: float32`` and the base's
dtype out, and reports its own RSS) and the check.

``check`` compares the two outputs tensor by tensor: every element within 4 ulps of the
output dtype (at the scale of the base and the result) except where a magnitude equals an
input's threshold (mergekit's unstable ``argsort`` keeps an arbitrary subset of those, we keep
the lowest indices) or where the TIES sign election's sum is within float32 rounding of 0.
It prints one JSON line with ``ok`` and the counts. Memory: one tensor of every input.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
WEIGHTS = [1.0, 0.5, 0.7]
DENSITY = 0.5


def _index(model: Path) -> tuple[dict[str, str], dict]:
    idx = model / "model.safetensors.index.json"
    if idx.is_file():
        data = json.loads(idx.read_text())
        return data["weight_map"], data.get("metadata", {})
    files = sorted(p.name for p in model.glob("*.safetensors"))
    from safetensors import safe_open

    wm = {}
    for f in files:
        with safe_open(str(model / f), "pt") as g:
            wm.update(dict.fromkeys(g.keys(), f))
    return wm, {}


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def write_finetune(base: Path, out: Path, seed: int) -> None:
    """``base`` + noise, shard by shard with the base's layout, one tensor in memory."""
    import torch
    from safetensors import safe_open

    weight_map, meta = _index(base)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for fname in sorted(set(weight_map.values())):
        header = {k: v for k, v in _header(base / fname).items() if k != "__metadata__"}
        names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
        new = {"__metadata__": {"format": "pt"}, **{k: header[k] for k in names}}
        blob = json.dumps(new, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with safe_open(str(base / fname), "pt") as src, open(tmp / fname, "wb") as dst:
            dst.write(struct.pack("<Q", len(blob)) + blob)
            for k in names:
                t = src.get_tensor(k)
                if t.is_floating_point() and t.numel():
                    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(k.encode()))
                    x = t.float()
                    x += torch.randn(x.shape, generator=g) * (0.05 * float(x.std()) if x.numel() > 1 else 0.01)  # fmt: skip
                    t = x.to(t.dtype)
                dst.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    index = {"metadata": {"total_size": meta.get("total_size")}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp / "config.json").write_text((base / "config.json").read_text())
    tmp.rename(out)


def prepare(ckpt: Path, work: Path) -> list[dict]:
    base, ft1 = ckpt / "base", ckpt / "finetuned"
    inputs_dir = work / f"ties-inputs-{ckpt.name}"
    fts = [ft1]
    for i in (2, 3):
        d = inputs_dir / f"ft{i}"
        if not (d / "model.safetensors.index.json").is_file():
            write_finetune(base, d, seed=i)
        fts.append(d)
    dtype = json.loads((base / "config.json").read_text()).get("torch_dtype", "bfloat16")
    out_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    scales = [x for w in WEIGHTS for x in ("--scale", str(w))]
    ours = ["apply", str(base), *map(str, fts), "--kind", "finetuned", "--method", "ties"]
    ours += ["--density", str(DENSITY), *scales, "-o", "{out}", "--overwrite", "--device", "{device}"]  # fmt: skip
    theirs = ["{python}", str(HERE / "mergekit_peer.py"), str(base), *map(str, fts), "-o", "{out}"]
    theirs += ["--method", "ties", "--weight", *map(str, WEIGHTS), "--density", str(DENSITY)]
    theirs += ["--dtype", "float32", "--out-dtype", dtype, "--mergekit-venv", "{mergekit_venv}"]
    theirs += ["--no-version"]
    check = ["{python}", str(HERE / "peer.py"), "check", "{ours}", "{theirs}", "--base", str(base)]
    check += ["--inputs", *map(str, fts), "--density", str(DENSITY), "--weight", *map(str, WEIGHTS)]
    return [
        {
            "label": "3 inputs",
            "inputs": [str(base), *map(str, fts)],
            "out_bytes": out_bytes,
            "out_dtype": dtype,
            "stream_tv": ours,
            "peers": {"mergekit": theirs},
            "check": check,
        }
    ]


def _tensor_files(model: Path) -> dict[str, Path]:
    weight_map, _ = _index(model)
    return {k: model / f for k, f in weight_map.items()}


def check(ours: Path, theirs: Path, base: Path, inputs: list[Path], densities, weights) -> dict:
    import torch
    from safetensors import safe_open

    def get(files: dict[str, Path], k: str):
        with safe_open(str(files[k]), "pt") as f:
            return f.get_tensor(k)

    fo, ft, fb = _tensor_files(ours), _tensor_files(theirs), _tensor_files(base)
    fi = [_tensor_files(p) for p in inputs]
    counts = {"elements": 0, "identical": 0, "within_4_ulps": 0, "tied_threshold": 0}
    counts.update(near_zero_election=0, unexplained=0, max_ulps_elsewhere=0.0)
    missing = sorted(set(fo) ^ set(ft))
    for k in fo:
        if k not in ft:
            continue
        a, b, w0 = get(fo, k), get(ft, k), get(fb, k)
        if a.dtype != b.dtype or a.shape != b.shape:
            missing.append(k)
            continue
        if not a.is_floating_point():
            counts["unexplained"] += int((a != b).sum())
            continue
        x, y, base = a.double().reshape(-1), b.double().reshape(-1), w0.double().reshape(-1)
        scale = torch.maximum(torch.maximum(x.abs(), y.abs()), base.abs()).clamp_min(1e-30)
        ulp = torch.finfo(a.dtype).eps * torch.exp2(torch.floor(torch.log2(scale)))
        u = torch.where(x == y, 0.0, (x - y).abs() / ulp)
        excuse = torch.zeros_like(u, dtype=torch.bool)
        total = torch.zeros_like(x)
        mags = torch.zeros_like(x)
        for files, d, w in zip(fi, densities, weights, strict=True):
            tau = (get(files, k).float() - w0.float()).double().reshape(-1)
            n = tau.numel()
            kth = 0.0
            if d < 1:
                kth = torch.kthvalue(tau.abs(), n - max(1, int(d * n)) + 1).values
                excuse |= tau.abs() == kth
            kept = tau * (tau.abs() >= kth) * w
            total += kept
            mags += kept.abs()
        near0 = total.abs() <= 8 * torch.finfo(torch.float32).eps * mags
        counts["elements"] += u.numel()
        counts["identical"] += int((u == 0).sum())
        counts["within_4_ulps"] += int((u <= 4).sum())
        counts["tied_threshold"] += int((excuse & (u > 4)).sum())
        counts["near_zero_election"] += int((near0 & ~excuse & (u > 4)).sum())
        rest = u[~(excuse | near0)]
        counts["unexplained"] += int((rest > 4).sum())
        if rest.numel():
            counts["max_ulps_elsewhere"] = max(counts["max_ulps_elsewhere"], float(rest.max()))
    return {"ok": not missing and counts["unexplained"] == 0, "missing_or_mismatched": missing[:5], **counts}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("ckpt")
    p.add_argument("work")
    c = sub.add_parser("check")
    c.add_argument("ours")
    c.add_argument("theirs")
    c.add_argument("--base", required=True)
    c.add_argument("--inputs", nargs="+", required=True)
    c.add_argument("--density", type=float, nargs="+", default=[DENSITY])
    c.add_argument("--weight", type=float, nargs="+", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        print(json.dumps(prepare(Path(args.ckpt), Path(args.work))))
        return 0
    n = len(args.inputs)
    dens = args.density * n if len(args.density) == 1 else args.density
    weights = args.weight or [1.0] * n
    res = check(Path(args.ours), Path(args.theirs), Path(args.base), [Path(i) for i in args.inputs], dens, weights)  # fmt: skip
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
