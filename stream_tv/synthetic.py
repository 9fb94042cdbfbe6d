"""Synthetic Llama-shaped checkpoints and LoRA adapters, for the demo and the benchmarks.

Deterministic (one seeded generator per tensor), written one shard at a time so a checkpoint
larger than memory can be made. The layout is exactly what ``transformers`` and ``peft``
save: a real ``config.json``, HF shard names and index, PEFT adapter keys and config.

>>> cfg = llama_config(hidden=64, layers=2, vocab=128)
>>> shapes = llama_shapes(cfg)
>>> shapes["model.layers.0.self_attn.q_proj.weight"], shapes["lm_head.weight"]
((64, 64), (128, 64))
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .io.writer import plan_shards, shard_name

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def llama_config(
    *,
    hidden: int = 2048,
    intermediate: int | None = None,
    layers: int = 2,
    heads: int | None = None,
    kv_heads: int | None = None,
    vocab: int = 32000,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """A ``LlamaConfig``-compatible dict (``transformers`` loads models built from it)."""
    heads = heads or max(1, hidden // 64)
    kv_heads = kv_heads or heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate or (hidden * 11 // 4 // 64 * 64 or 4 * hidden),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in the order ``transformers`` saves a Llama model."""
    h, i = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.mlp.gate_proj.weight": (i, h),
            f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
        }
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    return shapes


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Deterministic weights: norms near 1, matrices ~ N(0, 0.02) like an initialised model."""
    g = _generator(seed, name)
    if len(shape) == 1:
        return (1.0 + 0.05 * torch.randn(shape, generator=g)).to(dtype)
    return (0.02 * torch.randn(shape, generator=g)).to(dtype)


def write_checkpoint_dir(
    out: Path,
    config: dict,
    tensors: Iterator[tuple[str, Callable[[], torch.Tensor], int]],
    *,
    max_shard_size: int,
) -> None:
    """Write ``(name, make_tensor, nbytes)`` lazily, one shard in memory at a time."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    items = list(tensors)
    groups = plan_shards([(n, b) for n, _, b in items], max_shard_size)
    makers = {n: m for n, m, _ in items}
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = shard_name(i, len(groups))
        shard = {n: makers[n]() for n in group}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in group}
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))


def write_base(out: Path, config: dict, *, seed: int = 0, max_shard_size: int = 5 * 10**9) -> None:
    dtype = getattr(torch, config["torch_dtype"])
    shapes = llama_shapes(config)
    write_checkpoint_dir(
        out,
        config,
        (
            (n, (lambda n=n, s=s: random_tensor(n, s, dtype, seed)), math.prod(s) * dtype.itemsize)
            for n, s in shapes.items()
        ),
        max_shard_size=max_shard_size,
    )


def write_adapter(
    out: Path,
    config: dict,
    *,
    rank: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = LORA_TARGETS,
    seed: int = 1,
    base_name: str = "base",
) -> None:
    """A PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) with
    nonzero A and B on ``targets`` of every layer, float32 as PEFT trains it."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, shape in llama_shapes(config).items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        fan_out, fan_in = shape
        key = f"base_model.model.{module}"
        g = _generator(seed, module)
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / math.sqrt(fan_in)
        tensors[f"{key}.lora_B.weight"] = 0.01 * torch.randn(fan_out, rank, generator=g)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
