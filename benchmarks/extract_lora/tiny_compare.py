"""Reproduce NOTES.md's tiny comparison: stream_tv.lowrank vs mergekit-extract-lora, rank R.

    python benchmarks/extract_lora/tiny_compare.py BASE FT OUT_DIR --rank 16

Writes OUT_DIR/stream_tv (an adapter of the same modules mergekit factorises: every 2-D
Linear weight, no embeddings/lm_head, bf16 factors, sqrt split, scaling 1) from
:class:`stream_tv.lowrank.StreamedSVD` fed 64-row chunks of ``FT - BASE``, then prints, per
tensor, our identity-based energy (float32 factors), the energy of our bf16 adapter and of
mergekit's adapter in OUT_DIR/mergekit (run ``mergekit_peer.py run`` first), the latter two
measured the same way (``mergekit_peer.adapter_energy``). Until the extract-lora command
lands this stands in for it; it loads one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mergekit_peer import _locator, adapter_energy  # noqa: E402

from stream_tv.lowrank import StreamedSVD, lora_rank_config, peft_lora_tensors, tensor_seed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("finetuned")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--power-iters", type=int, default=2)
    a = ap.parse_args()
    bw, fw = _locator(a.base), _locator(a.finetuned)
    tensors, ranks, ours = {}, {}, {}
    for name in sorted(bw):
        if not name.endswith("_proj.weight"):
            continue
        with safe_open(bw[name], "pt") as gb, safe_open(fw[name], "pt") as gf:
            b, f = gb.get_tensor(name), gf.get_tensor(name)
        svd = StreamedSVD(
            b.shape[0],
            b.shape[1],
            rank=a.rank,
            power_iters=a.power_iters,
            seed=tensor_seed(0, name),
            name=name,
        )
        for p in range(svd.passes):
            for s in range(0, b.shape[0], 64):
                e = min(s + 64, b.shape[0])
                svd.update(f[s:e].float() - b[s:e].float(), s, e, p)
        res = svd.result()
        r = res.select_rank(rank=a.rank)
        u, sv, v = res.factors(r)
        module = name.removesuffix(".weight")
        for suffix, x in peft_lora_tensors(
            "linear", u, sv, v, weight_shape=b.shape, dtype=torch.bfloat16
        ).items():
            tensors[f"base_model.model.{module}.{suffix}"] = x
        ranks[module] = r
        ours[name] = res.retained_energy(r)
    out = os.path.join(a.out, "stream_tv")
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), {"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": a.base,
        "target_modules": sorted(ranks),
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "inference_mode": True,
        **lora_rank_config(ranks),
    }
    with open(os.path.join(out, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
    mine = adapter_energy(a.base, a.finetuned, out)
    mk_dir = os.path.join(a.out, "mergekit")
    theirs = adapter_energy(a.base, a.finetuned, mk_dir) if os.path.isdir(mk_dir) else None
    print(f"{'tensor':45s} {'ours(id)':>9s} {'ours bf16':>9s} {'mergekit':>9s}")
    for name in ours:
        mk = theirs["tensors"].get(name, {}).get("retained_energy") if theirs else None
        print(
            f"{name:45s} {ours[name]:9.5f} {mine['tensors'][name]['retained_energy']:9.5f} "
            f"{'' if mk is None else f'{mk:9.5f}'}"
        )
    print(
        "mean",
        f"{sum(ours.values()) / len(ours):.5f}",
        f"{mine['mean_retained_energy']:.5f}",
        f"{theirs['mean_retained_energy']:.5f}" if theirs else "",
    )


if __name__ == "__main__":
    main()
