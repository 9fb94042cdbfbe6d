"""Write a synthetic Llama-shaped base / fine-tuned / LoRA adapter triple.

    python benchmarks/make_checkpoint.py --size 4GB --dtype bf16 --shard-size 5GB --rank 16 \\
        --out DIR [--seed 0] [--full-ft-mlp LAYER]

writes

    DIR/base/        config.json, model-0000i-of-0000N.safetensors, model.safetensors.index.json
    DIR/finetuned/   the same layout: base with the LoRA merged as PEFT merges it
                     (W' = cast(float32(W) + (B @ A) * scaling)), plus optionally a small full
                     fine-tune of one layer's MLP; every other tensor byte-identical to base
    DIR/adapter/     adapter_config.json + adapter_model.safetensors (PEFT LoRA layout)

The shape follows Llama (TinyLlama-like: head_dim 64, 8 query heads per key/value head,
intermediate = 2.75 x hidden, 32000 vocab); the layer count is chosen so the base has about
``--size`` bytes, and the hidden size is the largest of 2048/1024/512/256 that still gives at
least 4 layers (``--hidden`` overrides). Every tensor comes from its own
``torch.Generator`` seeded from ``--seed`` and the tensor name, so the output does not depend on
the shard size, and no float64 is used. Memory: one shard's worth of tensors (reused for every
shard of base and finetuned) plus one float32 tensor.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import time
import zlib

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stream_tv.io.writer import parse_size, shard_name  # noqa: E402
from stream_tv.io.writer import plan_shards as plan_shard_names  # noqa: E402
from stream_tv.synthetic import llama_config as stream_tv_llama_config  # noqa: E402
from stream_tv.synthetic import llama_shapes  # noqa: E402

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
VOCAB = 32000
HEAD_DIM = 64
GQA = 8  # query heads per key/value head
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
WEIGHT_STD = 0.02


# --------------------------------------------------------------------------- shape


def shape_for(hidden: int, layers: int) -> dict:
    heads = max(1, hidden // HEAD_DIM)
    kv_heads = max(1, heads // GQA)
    inter = max(128, int(round(hidden * 2.75 / 128)) * 128)
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": VOCAB,
        "head_dim": HEAD_DIM,
    }


def tensor_specs(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the order transformers saves a LlamaForCausalLM state dict."""
    return list(llama_shapes(shape).items())


def numel(s: tuple[int, ...]) -> int:
    n = 1
    for d in s:
        n *= d
    return n


def choose_shape(size: int, itemsize: int, hidden: int | None, layers: int | None) -> dict:
    def total(h: int, n: int) -> int:
        return sum(numel(s) for _, s in tensor_specs(shape_for(h, n))) * itemsize

    candidates = [hidden] if hidden else [2048, 1024, 512, 256]
    for h in candidates:
        fixed = total(h, 0)
        per_layer = total(h, 1) - fixed
        n = layers if layers else max(1, round((size - fixed) / per_layer))
        if hidden or layers or n >= 4 or h == candidates[-1]:
            return shape_for(h, n)
    raise AssertionError("unreachable")


def llama_config(shape: dict, dtype: torch.dtype) -> dict:
    """stream_tv.synthetic's LlamaConfig dict for ``shape`` (what transformers loads)."""
    return stream_tv_llama_config(
        hidden=shape["hidden_size"],
        intermediate=shape["intermediate_size"],
        layers=shape["num_hidden_layers"],
        heads=shape["num_attention_heads"],
        kv_heads=shape["num_key_value_heads"],
        vocab=shape["vocab_size"],
        dtype=dtype,
    )


def adapter_config(rank: int, alpha: float, base_path: str) -> dict:
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(TARGETS),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


# --------------------------------------------------------------------------- values


def generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


class Scratch:
    """One reused float32 buffer for generating and merging a tensor."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.float32)

    def get(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = numel(shape)
        if self.buf.numel() < n:
            self.buf = torch.empty(n, dtype=torch.float32)
        return self.buf[:n].view(shape)


class Arena:
    """The memory of one shard, reused for every shard of base and finetuned.

    Touching fresh memory costs ~1-2 s/GB on this kind of virtual machine (the hypervisor
    backs guest pages lazily), several times the cost of generating the numbers, so the
    tensors of a shard live in one buffer that is faulted in once. Each tensor is its own
    ``torch.frombuffer`` view, so ``save_file`` sees no shared storage.
    """

    def __init__(self, nbytes: int) -> None:
        self.mem = mmap.mmap(-1, max(nbytes, 1))

    def tensors(
        self, specs: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        out, off = {}, 0
        itemsize = torch.empty((), dtype=dtype).element_size()
        for name, shape in specs:
            n = numel(shape)
            out[name] = torch.frombuffer(self.mem, dtype=dtype, count=n, offset=off).view(shape)
            off += n * itemsize
        return out


def fill_base(out: torch.Tensor, seed: int, name: str, scratch: Scratch) -> None:
    t = scratch.get(tuple(out.shape))
    g = generator(seed, name)
    if name.endswith("norm.weight"):  # RMSNorm weights sit around 1
        t.uniform_(0.9, 1.1, generator=g)
    else:
        t.normal_(0.0, WEIGHT_STD, generator=g)
    out.copy_(t)  # the one rounding to the model dtype


def lora_pair(
    seed: int, module: str, out_f: int, in_f: int, rank: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank, in) with kaiming-like scale, B (out, rank) nonzero (a trained adapter)."""
    a = torch.empty((rank, in_f), dtype=torch.float32)
    a.normal_(0.0, in_f**-0.5, generator=generator(seed, module + ".lora_A"))
    b = torch.empty((out_f, rank), dtype=torch.float32)
    b.normal_(0.0, 0.01, generator=generator(seed, module + ".lora_B"))
    return a.to(dtype), b.to(dtype)


def peft_merge_(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, scratch: Scratch
) -> None:
    """In place, what PEFT's merge_and_unload does on CPU: adapter weights upcast to float32
    on load, delta = (B @ A) * scaling in float32, then W + delta in float32, rounded once to
    W's dtype. (float32(W) + delta == delta + float32(W) bit for bit.)"""
    delta = scratch.get(tuple(w.shape))
    torch.matmul(b.float(), a.float(), out=delta)
    delta.mul_(scaling)
    delta.add_(w)
    w.copy_(delta)


def full_ft_(w: torch.Tensor, seed: int, name: str, scratch: Scratch) -> None:
    t = scratch.get(tuple(w.shape))
    t.normal_(0.0, WEIGHT_STD * 0.05, generator=generator(seed, name + ".full_ft"))
    t.add_(w)
    w.copy_(t)


# --------------------------------------------------------------------------- layout


def plan_shards(
    specs: list[tuple[str, tuple[int, ...]]], itemsize: int, max_shard: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """stream_tv's shard planner (greedy, in order, as transformers does) over specs."""
    shapes = dict(specs)
    groups = plan_shard_names([(n, numel(s) * itemsize) for n, s in specs], max_shard)
    return [[(n, shapes[n]) for n in group] for group in groups]


def write_index(d: str, weight_map: dict[str, str], total: int) -> None:
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def dir_size(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def make(
    out: str,
    size: int,
    dtype: torch.dtype,
    shard_size: int,
    rank: int,
    seed: int = 0,
    alpha: float | None = None,
    adapter_dtype: torch.dtype = torch.float32,
    full_ft_mlp: int | None = None,
    hidden: int | None = None,
    layers: int | None = None,
    quiet: bool = False,
) -> dict:
    t0 = time.perf_counter()
    itemsize = torch.empty((), dtype=dtype).element_size()
    shape = choose_shape(size, itemsize, hidden, layers)
    specs = tensor_specs(shape)
    if full_ft_mlp is not None and not 0 <= full_ft_mlp < shape["num_hidden_layers"]:
        raise SystemExit(
            f"--full-ft-mlp {full_ft_mlp}: the model has layers 0..{shape['num_hidden_layers'] - 1}"
        )
    alpha = float(2 * rank) if alpha is None else alpha
    scaling = alpha / rank
    shards = plan_shards(specs, itemsize, shard_size)
    dims = dict(specs)

    dirs = {k: os.path.join(out, k) for k in ("base", "finetuned", "adapter")}
    for d in dirs.values():
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(d)
    cfg = llama_config(shape, dtype)
    for k in ("base", "finetuned"):
        write_json(os.path.join(dirs[k], "config.json"), cfg)
    write_json(
        os.path.join(dirs["adapter"], "adapter_config.json"),
        adapter_config(rank, alpha, os.path.abspath(dirs["base"])),
    )

    # the adapter (small): A, B per target module, rounded to the adapter dtype once
    adapter: dict[str, torch.Tensor] = {}
    for n in range(shape["num_hidden_layers"]):
        for t in TARGETS:
            module = f"model.layers.{n}.self_attn.{t}"
            out_f, in_f = dims[module + ".weight"]
            a, b = lora_pair(seed, module, out_f, in_f, rank, adapter_dtype)
            adapter[f"base_model.model.{module}.lora_A.weight"] = a
            adapter[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(
        adapter,
        os.path.join(dirs["adapter"], "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    t_adapter = time.perf_counter() - t0

    scratch = Scratch()
    arena = Arena(max(sum(numel(sh) for _, sh in shard) for shard in shards) * itemsize)
    weight_map: dict[str, str] = {}
    total = 0
    gen_s = write_s = 0.0
    n_changed = 0
    mlp_prefix = f"model.layers.{full_ft_mlp}.mlp." if full_ft_mlp is not None else None
    for i, shard in enumerate(shards):
        fname = shard_name(i, len(shards))
        t = time.perf_counter()
        tensors = arena.tensors(shard, dtype)
        for name, _ in shard:
            fill_base(tensors[name], seed, name, scratch)
        gen_s += time.perf_counter() - t
        t = time.perf_counter()
        save_file(tensors, os.path.join(dirs["base"], fname), metadata={"format": "pt"})
        write_s += time.perf_counter() - t
        t = time.perf_counter()
        for name, s in shard:  # finetuned: modify the saved base shard in place
            weight_map[name] = fname
            total += numel(s) * itemsize
            key = "base_model.model." + name[: -len(".weight")]
            if key + ".lora_A.weight" in adapter:
                peft_merge_(
                    tensors[name],
                    adapter[key + ".lora_A.weight"],
                    adapter[key + ".lora_B.weight"],
                    scaling,
                    scratch,
                )
                n_changed += 1
            elif mlp_prefix and name.startswith(mlp_prefix):
                full_ft_(tensors[name], seed, name, scratch)
                n_changed += 1
        gen_s += time.perf_counter() - t
        t = time.perf_counter()
        save_file(tensors, os.path.join(dirs["finetuned"], fname), metadata={"format": "pt"})
        write_s += time.perf_counter() - t
        del tensors
    for k in ("base", "finetuned"):
        write_index(dirs[k], weight_map, total)

    wall = time.perf_counter() - t0
    info = {
        "out": os.path.abspath(out),
        "shape": shape,
        "dtype": DTYPE_NAMES[dtype],
        "adapter_dtype": DTYPE_NAMES[adapter_dtype],
        "rank": rank,
        "lora_alpha": alpha,
        "scaling": scaling,
        "seed": seed,
        "shards": len(shards),
        "shard_size": shard_size,
        "full_ft_mlp": full_ft_mlp,
        "tensors": len(specs),
        "tensors_changed": n_changed,
        "bytes": {k: dir_size(d) for k, d in dirs.items()},
        "total_size": total,
        "seconds": {
            "wall": round(wall, 2),
            "generate": round(gen_s, 2),
            "write": round(write_s, 2),
            "adapter": round(t_adapter, 2),
        },
    }
    write_json(os.path.join(out, "make_checkpoint.json"), info)
    if not quiet:
        print(
            f"{out}: llama hidden {shape['hidden_size']}, intermediate "
            f"{shape['intermediate_size']}, {shape['num_hidden_layers']} layers, vocab "
            f"{shape['vocab_size']}, {DTYPE_NAMES[dtype]}, {len(shards)} shard(s)"
        )
        for k, b in info["bytes"].items():
            print(f"  {k:10s} {b / 1e9:8.3f} GB")
        print(
            f"  {n_changed} tensors differ between base and finetuned; LoRA r={rank}, "
            f"alpha={alpha:g}, adapter {DTYPE_NAMES[adapter_dtype]}"
        )
        print(f"  {wall:.1f} s (generate/merge {gen_s:.1f} s, save_file {write_s:.1f} s)")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1GB", help="about this many bytes of base weights")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--shard-size", default="5GB", help="max bytes per shard (as transformers)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 x rank)")
    ap.add_argument(
        "--adapter-dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="dtype of the saved LoRA weights",
    )
    ap.add_argument(
        "--full-ft-mlp",
        type=int,
        default=None,
        metavar="LAYER",
        help="also perturb this layer's MLP in finetuned (a full fine-tune)",
    )
    ap.add_argument("--hidden", type=int, default=None, help="force the hidden size")
    ap.add_argument("--layers", type=int, default=None, help="force the layer count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    make(
        args.out,
        parse_size(args.size),
        DTYPES[args.dtype],
        parse_size(args.shard_size),
        args.rank,
        seed=args.seed,
        alpha=args.alpha,
        adapter_dtype=DTYPES[args.adapter_dtype],
        full_ft_mlp=args.full_ft_mlp,
        hidden=args.hidden,
        layers=args.layers,
        quiet=args.quiet,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
