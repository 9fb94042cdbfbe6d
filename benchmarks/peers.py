"""The tools stream-tv is measured against, each run by run.py as its own child process.

    python benchmarks/peers.py safetensors extract    BASE FT OUT [DTYPE]
    python benchmarks/peers.py safetensors apply      BASE TV OUT [DTYPE]
    python benchmarks/peers.py safetensors merge      BASE ADAPTER OUT
    python benchmarks/peers.py safetensors lora-delta ADAPTER OUT [DTYPE]
    python benchmarks/peers.py safetensors compare    BASE FT ADAPTER OUT.json
    python benchmarks/peers.py peft        merge      BASE ADAPTER OUT
    python benchmarks/peers.py mergekit    apply      BASE FT OUT [DTYPE] (task_arithmetic, weight 1)

and the references and checks run.py verifies outputs with (tensor by tensor, bounded memory):

    python benchmarks/peers.py reference extract BASE FT OUT        float32 finetuned - base
    python benchmarks/peers.py reference compare BASE FT ADAPTER OUT.json   float64 figures
    python benchmarks/peers.py verify check OUT REF [DTYPE]   bits equal to REF (cast to DTYPE)?
    python benchmarks/peers.py verify lora-delta OUT ADAPTER [DTYPE]   = scaling * B @ A?
    python benchmarks/peers.py verify compare OURS.json REF.json [TOL]  figures within TOL?
    python benchmarks/peers.py selftest DIR    the checks above fail on planted differences

``mergekit`` runs ``mergekit-yaml`` from the environment named by ``$MERGEKIT_VENV``
(benchmarks/setup_peers.sh makes it), else from PATH.

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
        save_file(
            {k: tensors[k] for k in names}, os.path.join(out, fname), metadata={"format": "pt"}
        )
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
        scaling = a_ / rank**0.5 if cfg.get("use_rslora") else a_ / rank
        mods[name] = (a, b, scaling)
    return mods, cfg


# --------------------------------------------------------------------------- safetensors peer


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def torch_dtype(name: str | None):
    import torch

    if not name:
        return None
    return getattr(torch, DTYPES.get(name, name))


def st_extract(base: str, ft: str, out: str, dtype: str = "") -> None:
    dt = torch_dtype(dtype)
    b, f = load_all(base), load_all(ft)
    tv = {}
    for k in b:
        d = f[k].float() - b[k].float()
        tv[k] = d.to(dt) if dt is not None else d
    del b, f
    save_sharded(tv, out)


def st_apply(base: str, tv_ref: str, out: str, dtype: str = "") -> None:
    dt = torch_dtype(dtype)
    b, tv = load_all(base), load_all(tv_ref)
    res = {
        k: (b[k].float() + tv[k]).to(dt or b[k].dtype) if k in tv else b[k].to(dt or b[k].dtype)
        for k in b
    }
    del tv
    save_sharded(res, out, extra_from=base)


def st_merge(base: str, adapter: str, out: str) -> None:
    b = load_all(base)
    mods, _ = lora_modules(adapter)
    for k, (a, bb, s) in mods.items():
        w = b[k]
        b[k] = (w.float() + (bb.float() @ a.float()) * s).to(w.dtype)
    save_sharded(b, out, extra_from=base)


def st_lora_delta(adapter: str, out: str, dtype: str = "") -> None:
    """Every LoRA delta scaling * B @ A (float32, PEFT's bits), cast to ``dtype``."""
    dt = torch_dtype(dtype)
    mods, _ = lora_modules(adapter)
    res = {}
    for k, (a, bb, s) in mods.items():
        d = (bb.float() @ a.float()) * s
        res[k] = d.to(dt) if dt is not None else d
    save_sharded(res, out)


def compare_tensor(name: str, b, f, lora_factors) -> dict:
    """The figures compare reports for one tensor, all in float64 on whole tensors."""
    import torch

    if lora_factors is not None:
        a, bb, s = lora_factors
        lora = (bb.double() @ a.double()) * s
        tv = f.double() - b.double()
        ln, tn = float(lora.norm()), float(tv.norm())
        cos = float((lora.flatten() @ tv.flatten()) / (ln * tn)) if ln and tn else None
        d = (lora - tv).abs()
        return {
            "name": name,
            "kind": "lora",
            "cosine": cos,
            "max_abs_diff": float(d.max()),
            "mean_abs_diff": float(d.mean()),
            "tv_norm": tn,
            "lora_norm": ln,
            "relative_error": float((lora - tv).norm()) / tn if tn else None,
        }
    same = torch.equal(b, f)
    row = {"name": name, "kind": "unchanged" if same else "changed"}
    if not same:
        row["tv_norm"] = float((f.double() - b.double()).norm())
    return row


def st_compare(base: str, ft: str, adapter: str, out_json: str) -> None:
    b, f = load_all(base), load_all(ft)
    mods, _ = lora_modules(adapter)
    rows = [compare_tensor(k, b[k], f[k], mods.get(k)) for k in b]
    with open(out_json, "w") as fh:
        json.dump({"tensors": rows}, fh)


def reference_compare(base: str, ft: str, adapter: str, out_json: str) -> None:
    """st_compare's figures, one tensor in memory at a time (run.py's compare reference)."""
    from safetensors import safe_open

    bl, fl = _where(base), _where(ft)
    mods, _ = lora_modules(adapter)
    rows = []
    for k in bl:
        with safe_open(bl[k][0], "pt") as fb, safe_open(fl[k][0], "pt") as ff:
            rows.append(compare_tensor(k, fb.get_tensor(k), ff.get_tensor(k), mods.get(k)))
    with open(out_json, "w") as fh:
        json.dump({"tensors": rows}, fh)


def _where(d: str) -> dict:
    """{tensor name: (shard file, shape)} of a checkpoint, from headers."""
    from safetensors import safe_open

    loc = {}
    for p in shard_files(d):
        with safe_open(p, "pt") as f:
            loc.update({k: (p, f.get_slice(k).get_shape()) for k in f.keys()})
    return loc


def reference_extract(base: str, ft: str, out: str) -> None:
    """The float32 task vector tensor by tensor (not a peer: run.py's apply input and the
    reference extract outputs are checked against); holds one output shard at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    bl, fl = _where(base), _where(ft)
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
        model = AutoModelForCausalLM.from_pretrained(
            base, torch_dtype=dtype, low_cpu_mem_usage=True
        )
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.save_pretrained(out, max_shard_size="5GB")


# --------------------------------------------------------------------------- mergekit peer


def mergekit_exe(name: str = "mergekit-yaml") -> str:
    venv = os.environ.get("MERGEKIT_VENV", "")
    if venv:
        return os.path.join(venv, "bin", name)
    return shutil.which(name) or name


def mergekit_apply(base: str, ft: str, out: str, dtype: str = "") -> None:
    """task_arithmetic with weight 1 of (finetuned - base) on base: the result of apply.

    Computed in float32 (``dtype: float32``) and written in the base's dtype or ``dtype``
    (``out_dtype``), as ``stream-tv apply`` computes and rounds: mergekit's default, the
    arithmetic in the model's bf16, would round the task vector and the sum."""
    with open(os.path.join(base, "config.json")) as f:
        cfg_json = json.load(f)
    model_dtype = cfg_json.get("torch_dtype") or cfg_json.get("dtype") or "bfloat16"
    out_dtype = DTYPES.get(dtype, dtype) if dtype else model_dtype
    cfg = (
        "merge_method: task_arithmetic\n"
        f"base_model: {os.path.abspath(base)}\n"
        "models:\n"
        f"  - model: {os.path.abspath(ft)}\n"
        "    parameters:\n      weight: 1.0\n"
        "dtype: float32\n"
        f"out_dtype: {out_dtype}\n"
    )
    path = out.rstrip("/") + ".mergekit.yml"
    with open(path, "w") as f:
        f.write(cfg)
    try:
        subprocess.run(
            [
                mergekit_exe(),
                path,
                out,
                "--lazy-unpickle",
                "--no-copy-tokenizer",
                "--no-write-model-card",
                "--quiet",
            ],
            check=True,
        )
    finally:
        os.unlink(path)


# --------------------------------------------------------------------------- checks


def ulp_distance(a, b):
    """Per element: how many representable values of ``a.dtype`` lie between a and b
    (0 = the same bits; +0 and -0 count as equal). a and b have the same float dtype."""
    import torch

    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    lo = torch.iinfo(ints).min

    def ordered(x):
        i = x.contiguous().view(ints).to(torch.int64)
        return torch.where(i < 0, lo - i, i)

    return (ordered(a) - ordered(b)).abs()


def _print(obj: dict) -> dict:
    print(json.dumps(obj))
    return obj


def verify(out: str, ref: str, dtype: str = "") -> dict:
    """Print JSON: is every tensor of ``out`` bit-equal to ``ref``'s (cast to ``dtype`` when
    given, else of the same dtype)? When not: how many elements differ, by how many ulps."""
    import torch
    from safetensors import safe_open

    want_dtype = torch_dtype(dtype)
    try:
        got, want = _where(out), _where(ref)
    except Exception as e:  # noqa: BLE001 - a broken output is a result, not a crash
        return _print({"ok": False, "error": f"{type(e).__name__}: {e}"})
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    unequal, max_diff, dtype_mismatch, elems, bad_elems, max_ulp = 0, 0.0, 0, 0, 0, 0
    for k in sorted(set(want) & set(got)):
        with safe_open(got[k][0], "pt") as fg, safe_open(want[k][0], "pt") as fw:
            a, b = fg.get_tensor(k), fw.get_tensor(k)
        if want_dtype is not None and b.is_floating_point():
            b = b.to(want_dtype)
        elems += a.numel()
        if a.dtype != b.dtype:
            dtype_mismatch += 1
            b = b.to(a.dtype)
        if a.shape != b.shape:
            unequal += 1
            max_diff = float("inf")
        elif not torch.equal(a, b):
            unequal += 1
            max_diff = max(max_diff, float((a.double() - b.double()).abs().max()))
            if a.is_floating_point():
                u = ulp_distance(a, b)
                bad_elems += int((u != 0).sum())
                max_ulp = max(max_ulp, int(u.max()))
    ok = not (missing or extra or unequal or dtype_mismatch)
    return _print(
        {
            "ok": ok,
            "tensors": len(want),
            "missing": len(missing),
            "extra": len(extra),
            "unequal": unequal,
            "max_abs_diff": max_diff,
            "dtype_mismatch": dtype_mismatch,
            "elements": elems,
            "unequal_elements": bad_elems,
            "max_ulp": max_ulp,
            "reference_cast_to": dtype or None,
        }
    )


def round_once(x, dtype):
    """float64 ``x`` correctly rounded to ``dtype`` (for 16-bit types through float32 rounded
    to odd, since torch's float64 -> bf16/fp16 cast rounds twice)."""
    import torch

    if dtype in (torch.float64, torch.float32):
        return x.to(dtype)
    r = x.to(torch.float32)
    back = r.to(torch.float64)
    inexact = back != x
    bits = r.view(torch.int32)
    bits = torch.where(inexact & (back.abs() > x.abs()), bits - 1, bits)  # toward zero
    return torch.where(inexact, bits | 1, bits).view(torch.float32).to(dtype)


def verify_apply(out: str, ft: str, base: str, tv: str, dtype: str = "") -> dict:
    """Print JSON: is ``out`` what ``base + tv`` is, each element rounded once to the output
    dtype (float64 reference)? That is the fine-tuned model's bits except where the float32
    task vector itself was rounded (``ft - base`` not exact in float32: a base element tiny
    against the fine-tuned one), where no tool can give them back; those are counted as
    ``round_trip_inexact``, checked against the reference, not against ``ft``."""
    import torch
    from safetensors import safe_open

    want_dtype = torch_dtype(dtype)
    try:
        got, want, b_at, t_at = _where(out), _where(ft), _where(base), _where(tv)
    except Exception as e:  # noqa: BLE001 - a broken output is a result, not a crash
        return _print({"ok": False, "error": f"{type(e).__name__}: {e}"})
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    unequal, elems, bad_elems, inexact = 0, 0, 0, 0
    for k in sorted(set(want) & set(got)):
        with safe_open(got[k][0], "pt") as fg, safe_open(want[k][0], "pt") as fw:
            a, f = fg.get_tensor(k), fw.get_tensor(k)
        dt = want_dtype or f.dtype
        elems += a.numel()
        if a.dtype != dt or a.shape != f.shape:
            unequal += 1
            continue
        if torch.equal(a, f.to(dt)):
            continue
        with safe_open(b_at[k][0], "pt") as fb:
            ref = fb.get_tensor(k).double()
        if k in t_at:
            with safe_open(t_at[k][0], "pt") as ftv:
                ref += ftv.get_tensor(k).double()
        ref = round_once(ref, dt)
        inexact += int((ref != f.to(dt)).sum())
        if not torch.equal(a, ref):
            unequal += 1
            bad_elems += int((a != ref).sum())
    ok = not (missing or extra or unequal)
    return _print(
        {
            "ok": ok,
            "tensors": len(want),
            "missing": len(missing),
            "extra": len(extra),
            "unequal": unequal,
            "elements": elems,
            "unequal_elements": bad_elems,
            "round_trip_inexact": inexact,
            "reference": "base + tv in float64, rounded once" + (f" to {dtype}" if dtype else ""),
        }
    )


def verify_lora_delta(out: str, adapter: str, dtype: str = "") -> dict:
    """Print JSON: does ``out`` hold exactly scaling * B @ A (float32 products of whole
    tensors, as PEFT computes them) cast to ``dtype``, for every LoRA module, and nothing
    else? One tensor in memory at a time."""
    import torch
    from safetensors import safe_open

    dt = torch_dtype(dtype)
    mods, _ = lora_modules(adapter)
    try:
        got = _where(out)
    except Exception as e:  # noqa: BLE001
        return _print({"ok": False, "error": f"{type(e).__name__}: {e}"})
    missing, extra = sorted(set(mods) - set(got)), sorted(set(got) - set(mods))
    unequal, dtype_mismatch, elems, bad_elems, max_ulp, max_diff = 0, 0, 0, 0, 0, 0.0
    for k in sorted(set(mods) & set(got)):
        a_, b_, scale = mods[k]
        want = (b_.float() @ a_.float()) * scale
        if dt is not None:
            want = want.to(dt)
        with safe_open(got[k][0], "pt") as f:
            t = f.get_tensor(k)
        elems += t.numel()
        if t.dtype != want.dtype:
            dtype_mismatch += 1
            want = want.to(t.dtype)
        if t.shape != want.shape:
            unequal += 1
            max_diff = float("inf")
        elif not torch.equal(t, want):
            unequal += 1
            max_diff = max(max_diff, float((t.double() - want.double()).abs().max()))
            u = ulp_distance(t, want)
            bad_elems += int((u != 0).sum())
            max_ulp = max(max_ulp, int(u.max()))
    ok = not (missing or extra or unequal or dtype_mismatch)
    return _print(
        {
            "ok": ok,
            "tensors": len(mods),
            "missing": len(missing),
            "extra": len(extra),
            "unequal": unequal,
            "max_abs_diff": max_diff,
            "dtype_mismatch": dtype_mismatch,
            "elements": elems,
            "unequal_elements": bad_elems,
            "max_ulp": max_ulp,
            "reference_cast_to": dtype or None,
        }
    )


_FIGURES = ("cosine", "max_abs_diff", "mean_abs_diff", "tv_norm", "lora_norm", "relative_error")


def _figures(path: str) -> dict[str, dict]:
    """{tensor: {figure: value}} of our compare JSON or a peers.py compare JSON."""
    with open(path) as f:
        data = json.load(f)
    out = {}
    for t in data["tensors"]:
        kind = t.get("category") or t.get("kind")
        lora = kind in ("lora", "lora_and_changed", "lora_unchanged")
        keys = _FIGURES if lora else ("tv_norm",)
        out[t["name"]] = {k: t.get(k) for k in keys}
    return out


def verify_compare(ours: str, ref: str, tol: str = "1e-9") -> dict:
    """Print JSON: every figure of ``ours`` within ``tol`` (relative to max(1, |ref|)) of
    ``ref``'s, tensor by tensor? A figure null in one and not the other is a mismatch, except
    tv_norm 0 against null (an unchanged tensor)."""
    t = float(tol)
    try:
        a, b = _figures(ours), _figures(ref)
    except Exception as e:  # noqa: BLE001
        return _print({"ok": False, "error": f"{type(e).__name__}: {e}"})
    bad, worst, compared = [], 0.0, 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            bad.append(f"{name}: only in {'ours' if name in a else 'reference'}")
            continue
        for k, vb in b[name].items():
            va = a[name].get(k)
            if va is None and vb is None:
                continue
            if va is None or vb is None:
                if k == "tv_norm" and (va or 0.0) == 0.0 and (vb or 0.0) == 0.0:
                    continue
                bad.append(f"{name}.{k}: {va} vs {vb}")
                continue
            compared += 1
            err = abs(va - vb) / max(1.0, abs(vb))
            worst = max(worst, err)
            if err > t:
                bad.append(f"{name}.{k}: {va!r} vs {vb!r}")
    return _print(
        {
            "ok": not bad,
            "tensors": len(b),
            "figures": compared,
            "max_rel_err": worst,
            "tolerance": t,
            "mismatches": len(bad),
            "first": bad[:3],
        }
    )


def selftest(work: str) -> int:
    """Plant a one-ulp difference, a cast, a missing tensor and a wrong figure; every check
    must fail on them and pass on the unchanged copies. Exit status 1 if any check is wrong."""
    import torch

    os.makedirs(work, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    t = {
        "w": torch.randn(64, 32, generator=g).bfloat16(),
        "v": torch.randn(32, generator=g).bfloat16(),
    }
    save_sharded(t, os.path.join(work, "a"))
    save_sharded(dict(t), os.path.join(work, "same"))
    bumped = dict(t)
    w = t["w"].clone()
    w.view(torch.int16)[3, 5] += 1  # one ulp
    bumped["w"] = w
    save_sharded(bumped, os.path.join(work, "ulp"))
    save_sharded({"w": t["w"]}, os.path.join(work, "missing"))
    save_sharded({k: v.float() for k, v in t.items()}, os.path.join(work, "fp32"))
    results = {
        "equal copy passes": verify(os.path.join(work, "same"), os.path.join(work, "a"))["ok"],
        "one ulp fails": not verify(os.path.join(work, "ulp"), os.path.join(work, "a"))["ok"],
        "one ulp is counted": verify(os.path.join(work, "ulp"), os.path.join(work, "a"))["max_ulp"]
        == 1,
        "missing tensor fails": not verify(os.path.join(work, "missing"), os.path.join(work, "a"))[
            "ok"
        ],
        "other dtype fails": not verify(os.path.join(work, "fp32"), os.path.join(work, "a"))["ok"],
        "cast reference passes": verify(
            os.path.join(work, "a"), os.path.join(work, "fp32"), "bf16"
        )["ok"],
    }
    # compare figures
    rows = [
        {
            "name": "w",
            "kind": "lora",
            "cosine": 0.5,
            "max_abs_diff": 1e-3,
            "mean_abs_diff": 1e-4,
            "tv_norm": 2.0,
            "lora_norm": 2.0,
            "relative_error": 0.1,
        }
    ]
    ja, jb = os.path.join(work, "a.json"), os.path.join(work, "b.json")
    with open(ja, "w") as f:
        json.dump({"tensors": rows}, f)
    rows2 = [dict(rows[0], cosine=0.5 + 1e-8)]
    with open(jb, "w") as f:
        json.dump({"tensors": rows2}, f)
    results["same figures pass"] = verify_compare(ja, ja)["ok"]
    results["figure off by 1e-8 fails at 1e-9"] = not verify_compare(jb, ja)["ok"]
    # ulp distance across zero and signs
    x = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=torch.bfloat16)
    y = torch.tensor([-0.0, 0.0, 1.0, -1.0], dtype=torch.bfloat16)
    results["+0 == -0 in ulps"] = int(ulp_distance(x, y).max()) == 0
    tiny = torch.tensor([2**-133], dtype=torch.bfloat16)  # the smallest subnormal
    results["-tiny to +tiny is 2 ulps"] = int(ulp_distance(tiny, -tiny)[0]) == 2
    shutil.rmtree(work)
    bad = [k for k, v in results.items() if not v]
    print(json.dumps({"ok": not bad, "checks": len(results), "failed": bad}))
    return 1 if bad else 0


OPS = {
    ("safetensors", "extract"): st_extract,
    ("safetensors", "apply"): st_apply,
    ("safetensors", "merge"): st_merge,
    ("safetensors", "lora-delta"): st_lora_delta,
    ("safetensors", "compare"): st_compare,
    ("peft", "merge"): peft_merge,
    ("mergekit", "apply"): mergekit_apply,
    ("reference", "extract"): reference_extract,
    ("reference", "compare"): reference_compare,
    ("verify", "check"): verify,
    ("verify", "apply"): verify_apply,
    ("verify", "lora-delta"): verify_lora_delta,
    ("verify", "compare"): verify_compare,
}


def main(argv: list[str]) -> int:
    if argv[:1] == ["selftest"] and len(argv) == 2:
        return selftest(argv[1])
    if len(argv) < 2 or (argv[0], argv[1]) not in OPS:
        print(__doc__, file=sys.stderr)
        return 2
    res = OPS[(argv[0], argv[1])](*argv[2:])
    if argv[0] == "verify" and isinstance(res, dict) and not res.get("ok"):
        return 3  # the JSON line says why
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
