"""Tiny real models, PEFT adapters and PEFT's own merged references, for the LoRA tests.

Every builder writes to a directory and returns it. The reference for a merge is what users
would do with PEFT: ``PeftModel.from_pretrained(fresh base, adapter).merge_and_unload()`` then
``save_pretrained``. Adapters use ``init_lora_weights=False`` so that ``B`` is not zero; DoRA
magnitudes, ``modules_to_save`` copies and trained biases are perturbed so that every saved
tensor matters.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HIDDEN = 48
INTERMEDIATE = 272  # > 256 rows, not a multiple of 64: exercises the product windows
VOCAB = 300


def _quiet():
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, *, tie: bool = False, seed: int = 0):
    """A random 2-layer causal LM: ``llama``, ``gpt2`` or ``starcoder2`` (biases), in ``dtype``."""
    _quiet()
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=tie,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=HIDDEN,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            tie_word_embeddings=True,
        )
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "starcoder2":
        cfg = tf.Starcoder2Config(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            use_bias=True,
            tie_word_embeddings=tie,
        )
        model = tf.Starcoder2ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    # Random init leaves some tensors constant (norms = 1, biases = 0): make them all random.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(dtype).eval()


def save_base(model, path: Path, *, max_shard_size: str | None = None) -> Path:
    _quiet()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def load_base(path: Path):
    _quiet()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


def make_adapter(base_dir: Path, out: Path, *, seed: int = 1, perturb: bool = True, **lora) -> Path:
    """A PEFT LoRA adapter for the model in ``base_dir`` with ``LoraConfig(**lora)``."""
    _quiet()
    from peft import LoraConfig, get_peft_model

    base = load_base(base_dir)
    torch.manual_seed(seed)
    lora.setdefault("init_lora_weights", False)
    model = get_peft_model(base, LoraConfig(**lora))
    if perturb:
        _perturb(model, seed)
    model.save_pretrained(out)
    return out


def _perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
            elif "modules_to_save" in name or (name.endswith("bias") and p.requires_grad):
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
            elif ("lora_" in name) and p.dtype == torch.float32:
                # larger factors make deltas visible at bf16 resolution
                p.mul_(4.0)


def peft_merge(
    base_dir: Path,
    adapters: Sequence[Path],
    out: Path,
    *,
    weights: Sequence[float] | None = None,
) -> Path:
    """PEFT's merged model on disk: load, (scale), ``merge_and_unload()``, ``save_pretrained``."""
    _quiet()
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base = load_base(base_dir)
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(path, adapter_name=name)
    if len(names) > 1:
        model.base_model.set_adapter(names)
    if weights is not None:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name, w in zip(names, weights, strict=True):
                    module.set_scale(name, w)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    return out


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory of ``*.safetensors`` (or one file)."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def edit_adapter_config(src: Path, dst: Path, **changes) -> Path:
    """Copy an adapter directory with some ``adapter_config.json`` fields changed."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


# ---- a tiny non-transformers model for Conv2d LoRA ---------------------------------------


class TinyConvNet(torch.nn.Module):
    """Conv2d 3x3 and 1x1 layers (and a Linear), the kinds PEFT's Conv2d LoRA handles."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 1)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.head(x.mean((2, 3)))


def conv_case(root: Path, *, dtype: torch.dtype, use_dora: bool, seed: int = 0):
    """``(base_dir, adapter_dir, merged_dir)`` for TinyConvNet with LoRA on both convs."""
    _quiet()
    from peft import LoraConfig, PeftModel, get_peft_model

    def fresh():
        torch.manual_seed(seed)
        return TinyConvNet().to(dtype)

    base_dir = root / "base"
    base_dir.mkdir(parents=True)
    save_file(fresh().state_dict(), str(base_dir / "model.safetensors"))
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["conv1", "conv2"],
        init_lora_weights=False,
        use_dora=use_dora,
    )
    pm = get_peft_model(fresh(), cfg)
    _perturb(pm, seed)
    pm.save_pretrained(root / "adapter")
    merged = PeftModel.from_pretrained(fresh(), root / "adapter").merge_and_unload()
    (root / "merged").mkdir()
    save_file(
        {k: v.contiguous() for k, v in merged.state_dict().items()},
        str(root / "merged" / "model.safetensors"),
    )
    return base_dir, root / "adapter", root / "merged"


# ---- the feature x dtype cases, shared by the LoRA test modules ---------------------------

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    arch: str
    dtype: torch.dtype
    lora: dict
    tie: bool = False
    shard: str | None = None


CASES = {
    # plain Linear, base in several shards
    "llama-bf16-linear": Case(
        "llama", BF16, dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL), shard="40KB"
    ),
    "llama-fp32-linear": Case(
        "llama", FP32, dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL), shard="100KB"
    ),
    "llama-fp16-rslora-patterns": Case(
        "llama",
        FP16,
        dict(
            r=8,
            lora_alpha=16,
            use_rslora=True,
            rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 6},
            alpha_pattern={"down_proj": 3, r"layers\.0\..*v_proj": 5},
            target_modules=LLAMA_ALL,
        ),
    ),
    "llama-fp32-dora": Case(
        "llama",
        FP32,
        dict(
            r=4,
            lora_alpha=8,
            use_dora=True,
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        ),
    ),
    "llama-bf16-dora": Case(
        "llama",
        BF16,
        dict(
            r=4,
            lora_alpha=8,
            use_dora=True,
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        ),
    ),
    # Embedding LoRA (two roundings) and Embedding DoRA (norm over the vocabulary: 2 passes)
    "llama-bf16-embedding": Case(
        "llama", BF16, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    ),
    "llama-fp32-embedding": Case(
        "llama", FP32, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    ),
    "llama-fp32-embedding-dora": Case(
        "llama",
        FP32,
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "q_proj"]),
    ),
    "llama-bf16-embedding-dora": Case(
        "llama", BF16, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens"])
    ),
    # tied embeddings: a LoRA on lm_head merges into embed_tokens.weight (after its own LoRA)
    "llama-bf16-tied-head": Case(
        "llama", BF16, dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]), tie=True
    ),
    "llama-fp32-tied-embedding-and-head": Case(
        "llama", FP32, dict(r=4, lora_alpha=8, target_modules=["lm_head", "embed_tokens"]), tie=True
    ),
    "llama-fp32-ensure-weight-tying": Case(
        "llama",
        FP32,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "embed_tokens", "lm_head"],
            ensure_weight_tying=True,
        ),
        tie=True,
    ),
    # modules_to_save: a trained copy replaces the base tensor
    "llama-bf16-modules-to-save": Case(
        "llama",
        BF16,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    ),
    # GPT-2 Conv1D (fan_in_fan_out); attn.c_proj is square; tied head
    "gpt2-fp32-conv1d": Case(
        "gpt2",
        FP32,
        dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
        shard="60KB",
    ),
    "gpt2-bf16-conv1d-tied-head": Case(
        "gpt2",
        BF16,
        dict(
            r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "lm_head"]
        ),
    ),
    "gpt2-fp32-conv1d-dora": Case(
        "gpt2",
        FP32,
        dict(
            r=4,
            lora_alpha=8,
            fan_in_fan_out=True,
            use_dora=True,
            target_modules=["c_attn", "c_proj", "c_fc"],
        ),
    ),
    "gpt2-fp16-conv1d-dora": Case(
        "gpt2",
        FP16,
        dict(
            r=4,
            lora_alpha=8,
            fan_in_fan_out=True,
            use_dora=True,
            target_modules=["c_attn", "c_proj"],
        ),
    ),
    "gpt2-bf16-bias-all": Case(
        "gpt2",
        BF16,
        dict(r=4, lora_alpha=8, fan_in_fan_out=True, bias="all", target_modules=["c_attn"]),
    ),
    # lora_bias (StarCoder2 has biases; its c_fc/c_proj are nn.Linear)
    "starcoder2-fp16-lora-bias": Case(
        "starcoder2",
        FP16,
        dict(
            r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "v_proj", "c_fc", "c_proj"]
        ),
    ),
    "starcoder2-fp32-lora-bias": Case(
        "starcoder2",
        FP32,
        dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "c_fc", "c_proj"]),
        shard="100KB",
    ),
    "starcoder2-bf16-dora": Case(
        "starcoder2",
        BF16,
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "c_fc"]),
    ),
}


@dataclass
class Built:
    base: Path
    adapter: Path
    merged: Path


_BUILT: dict[str, Built] = {}


def build_case(name: str, tmp_path_factory) -> Built:
    """Base, adapter and PEFT's merged model for ``CASES[name]``, built once per session
    (shared by every test module through this module-level cache)."""
    if name not in _BUILT:
        case = CASES[name]
        root = tmp_path_factory.mktemp(name)
        model = tiny_model(case.arch, case.dtype, tie=case.tie)
        base = save_base(model, root / "base", max_shard_size=case.shard)
        adapter = make_adapter(base, root / "adapter", **case.lora)
        merged = peft_merge(base, [adapter], root / "merged")
        _BUILT[name] = Built(base, adapter, merged)
    return _BUILT[name]
