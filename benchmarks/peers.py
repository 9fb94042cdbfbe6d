"""The tools stream-tv is measured against, each run by run.py as its own child process.

    python benchmarks/peers.py safetensors extract BASE FT OUT
    python benchmarks/peers.py safetensors apply   BASE TV OUT
    python benchmarks/peers.py safetensors merge   BASE ADAPTER OUT
    python benchmarks/peers.py safetensors compare BASE FT ADAPTER OUT.json
    python benchmarks/peers.py peft        merge   BASE ADAPTER OUT
    python benchmarks/peers.py mergekit    apply   BASE FT OUT      (task_arithmetic, weight 1)

``safetensors`` is the whole-model peer: ``safetensors.torch.load_file`` of every shard into
one dict, the arithmetic in torch on whole tensors, ``save_file`` in the Hugging Face sharded
layout (5 GB shards). ``peft`` is ``transformers`` + ``PeftModel.merge_and_unload`` +
``save_pretrained``. These are what people do today; they are not meant to be clever.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

MAX_SHARD = 5 * 10**9


def shard_files(ref: str) -> list[str]:
    if os.path.isfile(ref):
        return [ref]
    index = os.path.join(ref, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        return [os.path.join(ref, s) for s in sorted(set(wm.values()))]
    return sorted(glob.glob(os.path.join(ref, "*.safetensors")))


def load_all(ref: str) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for path in shard_files(ref):
        out.update(load_file(path))
    return out


def save_sharded(tensors: dict, out: str, extra_from: str | None = None) -> None:
    """Hugging Face layout: model-0000i-of-0000N.safetensors + index (total_size)."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    shards: list[list[str]] = [[]]
    cur = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and cur + n > MAX_SHARD:
            shards.append([])
            cur = 0
        shards[-1].append(name)
        cur += n
    weight_map = {}
    total = 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in names}, os.path.join(out, fname),
                  metadata={"format": "pt"})
        for k in names:
            weight_map[k] = fname
            total += tensors[k].numel() * tensors[k].element_size()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if extra_from and os.path.isdir(extra_from):
        for fn in os.listdir(extra_from):
            if fn.endswith(".json") and not fn.endswith("index.json"):
                shutil.copy(os.path.join(extra_from, fn), os.path.join(out, fn))


def lora_modules(adapter_dir: str) -> tuple[dict, dict]:
    """{base weight name: (A, B, scaling)} from a PEFT LoRA adapter, and its config."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    files = [os.path.join(adapter_dir, "adapter_model.safetensors")]
    sd = {}
    for p in files:
        sd.update(load_file(p))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    mods = {}
    for k, a in sd.items():
        if not k.endswith(".lora_A.weight"):
            continue
        mod = k[: -len(".lora_A.weight")]
        b = sd[mod + ".lora_B.weight"]
        name = mod.removeprefix("base_model.model.") + ".weight"
        short = mod.rsplit(".", 1)[-1]
        rank = cfg.get("rank_pattern", {}).get(short, r)
        a_ = cfg.get("alpha_pattern", {}).get(short, alpha)
        scaling = a_ / rank ** 0.5 if cfg.get("use_rslora") else a_ / rank
        mods[name] = (a, b, scaling)
    return mods, cfg


# --------------------------------------------------------------------------- safetensors peer


def st_extract(base: str, ft: str, out: str) -> None:
    b, f = load_all(base), load_all(ft)
    tv = {k: f[k].float() - b[k].float() for k in b}
    del b, f
    save_sharded(tv, out)


def st_apply(base: str, tv_ref: str, out: str) -> None:
    b, tv = load_all(base), load_all(tv_ref)
    res = {k: (b[k].float() + tv[k]).to(b[k].dtype) if k in tv else b[k] for k in b}
    del tv
    save_sharded(res, out, extra_from=base)


def st_merge(base: str, adapter: str, out: str) -> None:
    b = load_all(base)
    mods, _ = lora_modules(adapter)
    for k, (a, bb, s) in mods.items():
        w = b[k]
        b[k] = (w.float() + (bb.float() @ a.float()) * s).to(w.dtype)
    save_sharded(b, out, extra_from=base)


def st_compare(base: str, ft: str, adapter: str, out_json: str) -> None:
    import torch

    b, f = load_all(base), load_all(ft)
    mods, _ = lora_modules(adapter)
    rows = []
    for k in b:
        if k in mods:
            a, bb, s = mods[k]
            lora = (bb.double() @ a.double()) * s
            tv = f[k].double() - b[k].double()
            cos = float(torch.nn.functional.cosine_similarity(lora.flatten(), tv.flatten(), dim=0))
            d = (lora - tv).abs()
            rows.append({"name": k, "kind": "lora", "cosine": cos, "max_abs_diff": float(d.max()),
                         "mean_abs_diff": float(d.mean()), "tv_norm": float(tv.norm()),
                         "lora_norm": float(lora.norm())})
        else:
            same = torch.equal(b[k], f[k])
            row = {"name": k, "kind": "unchanged" if same else "changed"}
            if not same:
                tv = f[k].double() - b[k].double()
                row["tv_norm"] = float(tv.norm())
            rows.append(row)
    with open(out_json, "w") as fh:
        json.dump({"tensors": rows}, fh)


def reference_extract(base: str, ft: str, out: str) -> None:
    """The float32 task vector tensor by tensor (not a peer: run.py's apply input and the
    reference extract outputs are checked against); holds one output shard at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def where(d: str) -> dict:
        loc = {}
        for p in shard_files(d):
            with safe_open(p, "pt") as f:
                loc.update({k: (p, f.get_slice(k).get_shape()) for k in f.keys()})
        return loc

    bl, fl = where(base), where(ft)
    index = os.path.join(base, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            order = list(json.load(f)["weight_map"])
    else:
        order = list(bl)
    plan: list[list[str]] = [[]]
    cur = 0
    for k in order:
        n = 4
        for d in bl[k][1]:
            n *= d
        if plan[-1] and cur + n > MAX_SHARD:
            plan.append([])
            cur = 0
        plan[-1].append(k)
        cur += n
    os.makedirs(out, exist_ok=True)
    weight_map, total = {}, 0
    for i, names in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for k in names:
            with safe_open(bl[k][0], "pt") as fb, safe_open(fl[k][0], "pt") as ff:
                shard[k] = ff.get_tensor(k).float() - fb.get_tensor(k).float()
            weight_map[k] = fname
            total += shard[k].numel() * 4
        save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
        del shard
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# --------------------------------------------------------------------------- PEFT peer


def peft_merge(base: str, adapter: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with open(os.path.join(base, "config.json")) as f:
        cfg = json.load(f)
    dtype = getattr(torch, cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, low_cpu_mem_usage=True)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=dtype,
                                                     low_cpu_mem_usage=True)
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.save_pretrained(out, max_shard_size="5GB")


# --------------------------------------------------------------------------- mergekit peer


def mergekit_apply(base: str, ft: str, out: str) -> None:
    """task_arithmetic with weight 1 of (finetuned - base) on base: the result of apply."""
    with open(os.path.join(base, "config.json")) as f:
        dtype = json.load(f).get("torch_dtype", "bfloat16")
    cfg = (
        "merge_method: task_arithmetic\n"
        f"base_model: {os.path.abspath(base)}\n"
        "models:\n"
        f"  - model: {os.path.abspath(ft)}\n"
        "    parameters:\n      weight: 1.0\n"
        f"dtype: {dtype}\n"
    )
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "mergekit.yml")
    with open(path, "w") as f:
        f.write(cfg)
    subprocess.run(["mergekit-yaml", path, out, "--lazy-unpickle", "--copy-tokenizer"], check=True)


def verify(out: str, ref: str) -> None:
    """Print JSON: is every tensor of ``out`` bit-equal to ``ref``'s (and of the same dtype)?"""
    import torch
    from safetensors import safe_open

    def where(d: str) -> dict:
        loc = {}
        for p in shard_files(d):
            with safe_open(p, "pt") as f:
                loc.update({k: p for k in f.keys()})
        return loc

    try:
        got, want = where(out), where(ref)
    except Exception as e:  # noqa: BLE001 - a broken output is a result, not a crash
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        return
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    unequal, max_diff, dtype_mismatch = 0, 0.0, 0
    for k in sorted(set(want) & set(got)):
        with safe_open(got[k], "pt") as fg, safe_open(want[k], "pt") as fw:
            a, b = fg.get_tensor(k), fw.get_tensor(k)
        if a.dtype != b.dtype:
            dtype_mismatch += 1
        if a.shape != b.shape:
            unequal += 1
            max_diff = float("inf")
        elif not torch.equal(a, b.to(a.dtype)):
            unequal += 1
            max_diff = max(max_diff, float((a.float() - b.float()).abs().max()))
    ok = not (missing or extra or unequal or dtype_mismatch)
    print(json.dumps({"ok": ok, "tensors": len(want), "missing": len(missing),
                      "extra": len(extra), "unequal": unequal, "max_abs_diff": max_diff,
                      "dtype_mismatch": dtype_mismatch}))


OPS = {
    ("safetensors", "extract"): st_extract,
    ("safetensors", "apply"): st_apply,
    ("safetensors", "merge"): st_merge,
    ("safetensors", "compare"): st_compare,
    ("peft", "merge"): peft_merge,
    ("mergekit", "apply"): mergekit_apply,
    ("reference", "extract"): reference_extract,
    ("verify", "check"): verify,
}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or (argv[0], argv[1]) not in OPS:
        print(__doc__, file=sys.stderr)
        return 2
    OPS[(argv[0], argv[1])](*argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
