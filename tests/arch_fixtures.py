"""Tiny real models of every architecture case issue 10 lists, with PEFT's own merge as reference.

Each :class:`ArchCase` builds, locally and in seconds, a tiny random ``transformers`` model,
saves it with ``save_pretrained`` (safetensors), creates a real PEFT adapter on it
(``init_lora_weights=False``, then perturbed so that every saved tensor matters), saves the
adapter, and saves what users get from PEFT: ``PeftModel.from_pretrained(fresh base,
adapter).merge_and_unload()`` then ``save_pretrained``, with its logits on fixed inputs.

:func:`build_arch` returns a :class:`BuiltArch` and writes ``record.json`` next to it: what
PEFT did and wrote, so that integration tests compare mechanically:

- ``peft_layers``: per module path the PEFT layer class PEFT wrapped it with, the base layer's
  class, ``fan_in_fan_out`` and (``target_parameters``) the parameter name;
- ``adapter_keys`` / ``base_keys`` / ``merged_keys``: name -> ``[dtype, shape]``;
- ``changed`` / ``added`` / ``removed``: merged tensors that differ from the base tensor of the
  same name, exist only in the merged model, or only in the base;
- ``config_changes``: ``config.json`` values PEFT's merge + save changed (e.g.
  ``tie_word_embeddings``), as ``{path: [base value, merged value]}``;
- ``adapter_config``, ``warnings`` (PEFT's and transformers' warnings during the merge) and
  ``peft_error`` (the exception text when PEFT itself cannot merge: then no ``merged``).

A case whose base must look like an older or hand-made checkpoint (legacy GPT-2 names, a tied
model whose file also stores ``lm_head.weight``, a Llava saved with transformers 4 names)
rewrites the saved safetensors file after ``save_pretrained`` (``edit_base``).

Build once per test session: ``build_arch(name, tmp_path_factory)`` caches at module level.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft_fixtures as pf
import torch
from safetensors import safe_open
from safetensors.torch import save_file

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
VOCAB = 120


_QUIET = []


def _tf():
    if not _QUIET:  # once: a later call would reset the filters of warnings.catch_warnings
        pf._quiet()
        _QUIET.append(True)
    import transformers

    return transformers


def _randomize(model, seed: int):
    """Random init leaves norms = 1 and biases = 0: perturb every float parameter."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return model


def _ids(n: int = 6, seed: int = 3, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 2, (1, n), generator=g)


def _pixels(*shape: int, seed: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


# ---- model builders: () -> (model, inputs) ---------------------------------------------------


def _llama(tie=False, layers=1, **kw):
    tf = _tf()
    cfg = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        **kw,
    )
    return tf.LlamaForCausalLM(cfg), {"input_ids": _ids()}


def _gpt2_config(**kw):
    tf = _tf()
    return tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=32, **kw)


def _vision_encoder_decoder():
    tf = _tf()
    enc = tf.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
    )
    dec = _gpt2_config(add_cross_attention=True, is_decoder=True)
    cfg = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = 1
    cfg.pad_token_id = 0
    model = tf.VisionEncoderDecoderModel(config=cfg)
    return model, {"pixel_values": _pixels(1, 3, 16, 16), "decoder_input_ids": _ids(5)}


def _bert_config(**kw):
    tf = _tf()
    return tf.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        **kw,
    )


def _encoder_decoder():
    tf = _tf()
    dec = _gpt2_config(add_cross_attention=True, is_decoder=True)
    cfg = tf.EncoderDecoderConfig.from_encoder_decoder_configs(_bert_config(), dec)
    cfg.decoder_start_token_id = 1
    cfg.pad_token_id = 0
    model = tf.EncoderDecoderModel(config=cfg)
    return model, {"input_ids": _ids(6), "decoder_input_ids": _ids(5, seed=5)}


def _t5():
    tf = _tf()
    cfg = tf.T5Config(
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
        relative_attention_num_buckets=8,
    )
    model = tf.T5ForConditionalGeneration(cfg)
    return model, {"input_ids": _ids(6), "decoder_input_ids": _ids(4, seed=5)}


def _gpt2():
    tf = _tf()
    model = tf.GPT2LMHeadModel(_gpt2_config(tie_word_embeddings=True))
    return model, {"input_ids": _ids()}


def _mixtral():
    tf = _tf()
    cfg = tf.MixtralConfig(
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        num_local_experts=3,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return tf.MixtralForCausalLM(cfg), {"input_ids": _ids()}


def _qwen3_moe():
    tf = _tf()
    cfg = tf.Qwen3MoeConfig(
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        num_experts=3,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=64,
    )
    return tf.Qwen3MoeForCausalLM(cfg), {"input_ids": _ids()}


def _wav2vec2():
    tf = _tf()
    cfg = tf.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=32,
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
    )
    return tf.Wav2Vec2ForCTC(cfg), {"input_values": _pixels(1, 400)}


def _videomae():
    tf = _tf()
    cfg = tf.VideoMAEConfig(
        image_size=16,
        patch_size=8,
        num_channels=3,
        num_frames=2,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    return tf.VideoMAEForVideoClassification(cfg), {"pixel_values": _pixels(1, 2, 3, 16, 16)}


def _siglip_vision():
    tf = _tf()
    cfg = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        vision_use_head=True,
    )
    return tf.SiglipVisionModel(cfg), {"pixel_values": _pixels(1, 3, 16, 16)}


def _bert_mlm():
    tf = _tf()
    return tf.BertForMaskedLM(_bert_config()), {"input_ids": _ids()}


def _mamba():
    tf = _tf()
    cfg = tf.MambaConfig(
        hidden_size=32,
        state_size=4,
        num_hidden_layers=1,
        vocab_size=VOCAB,
        expand=2,
        conv_kernel=4,
        tie_word_embeddings=True,
    )
    return tf.MambaForCausalLM(cfg), {"input_ids": _ids()}


def _llava():
    tf = _tf()
    vision = tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        projection_dim=32,
    )
    text = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    cfg = tf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=VOCAB - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = tf.LlavaForConditionalGeneration(cfg)
    ids = torch.cat([_ids(2), torch.full((1, 4), VOCAB - 1), _ids(3, seed=8)], dim=1)
    return model, {"input_ids": ids, "pixel_values": _pixels(1, 3, 16, 16)}


# ---- base edits: make the saved base look like another checkpoint -------------------------------


def _rewrite(base: Path, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]):
    files = sorted(base.glob("*.safetensors"))
    assert len(files) == 1 and not (base / "model.safetensors.index.json").exists()
    with safe_open(str(files[0]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = fn(tensors)
    save_file({k: v.contiguous() for k, v in out.items()}, str(files[0]), {"format": "pt"})


def _legacy_gpt2(base: Path):
    """An original-style GPT-2 file: no ``transformer.`` prefix and the old ``attn.bias``
    causal-mask buffers (which transformers 5 drops on load)."""

    def fn(t):
        out = {k.removeprefix("transformer."): v for k, v in t.items()}
        n = 32
        for i in range(1):
            out[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        return out

    _rewrite(base, fn)


def _store_head(equal: bool):
    def edit(base: Path):
        def fn(t):
            emb = t["model.embed_tokens.weight"]
            if equal:
                t["lm_head.weight"] = emb.clone()
            else:
                g = torch.Generator().manual_seed(11)
                t["lm_head.weight"] = (torch.randn(emb.shape, generator=g) * 0.02).to(emb.dtype)
            return t

        _rewrite(base, fn)

    return edit


def _legacy_llava(base: Path):
    """Llava as transformers 4 saved it: ``language_model.model.*``, ``language_model.lm_head``,
    top-level ``vision_tower`` / ``multi_modal_projector``."""

    def rename(k: str) -> str:
        for new, old in (
            ("model.language_model.", "language_model.model."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("lm_head.", "language_model.lm_head."),
        ):
            if k.startswith(new):
                return old + k[len(new) :]
        return k

    _rewrite(base, lambda t: {rename(k): v for k, v in t.items()})


# ---- the cases --------------------------------------------------------------------------------


@dataclass
class ArchCase:
    """One architecture case: how to build the model, the adapter(s), and the base on disk."""

    build: Callable[[], tuple[Any, dict[str, torch.Tensor]]]
    lora: dict | list[dict]  # LoraConfig kwargs; a list: several adapters merged in order
    dtype: torch.dtype = FP32
    edit_base: Callable[[Path], None] | None = None
    issue: str = ""  # what issue 10 says about it


LLAMA_QV = ["q_proj", "v_proj"]

ARCH_CASES: dict[str, ArchCase] = {
    # (1) square GPT-2 Conv1D not at the top level
    "vision-encoder-decoder-gpt2": ArchCase(
        _vision_encoder_decoder,
        dict(r=4, lora_alpha=8, target_modules=["c_proj", "q_attn", "c_attn"]),
        issue="silent: decoder c_proj / crossattention.c_proj (square Conv1D) untransposed",
    ),
    "encoder-decoder-bert-gpt2": ArchCase(
        _encoder_decoder,
        dict(r=4, lora_alpha=8, target_modules=["query", "value", "c_proj", "c_attn"]),
        issue="silent: square Conv1D in the decoder; Linear (BERT) and Conv1D in one adapter",
    ),
    # (2) tied embeddings with modules_to_save
    "llama-tied-modules-to-save-lm_head": ArchCase(
        lambda: _llama(tie=True),
        dict(r=4, lora_alpha=8, target_modules=LLAMA_QV, modules_to_save=["lm_head"]),
        issue="silent: PEFT unties, writes both tensors, tie_word_embeddings=false",
    ),
    "llama-tied-modules-to-save-embed_tokens": ArchCase(
        lambda: _llama(tie=True),
        dict(r=4, lora_alpha=8, target_modules=LLAMA_QV, modules_to_save=["embed_tokens"]),
        issue="silent: PEFT unties, writes both tensors, tie_word_embeddings=false",
    ),
    # (3) config tied, but the file also stores lm_head.weight
    "llama-tied-stored-head-equal": ArchCase(
        lambda: _llama(tie=True),
        dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]),
        edit_base=_store_head(equal=True),
        issue="silent: PEFT merges into the shared embedding",
    ),
    "llama-tied-stored-head-distinct": ArchCase(
        lambda: _llama(tie=True),
        dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]),
        edit_base=_store_head(equal=False),
        issue="(control) a stored head that differs: transformers does not tie on load",
    ),
    # (4) _keep_in_fp32_modules
    "t5-fp16-keep-fp32-wo": ArchCase(
        _t5,
        dict(r=4, lora_alpha=8, target_modules=["q", "v", "wo"]),
        dtype=FP16,
        issue="silent: wo loads (and is merged and saved) in float32",
    ),
    "t5-bf16-wo": ArchCase(
        _t5,
        dict(r=4, lora_alpha=8, target_modules=["q", "v", "wo"]),
        dtype=BF16,
        issue="(control) _keep_in_fp32_modules applies to float16 loads only",
    ),
    # (5) float64
    "llama-fp64": ArchCase(
        lambda: _llama(layers=1),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        dtype=FP64,
        issue="silent: PEFT computes the delta in float64",
    ),
    # (6) legacy GPT-2 names
    "gpt2-legacy-names": ArchCase(
        _gpt2,
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
        edit_base=_legacy_gpt2,
        issue="silent: PEFT writes transformer.-prefixed names (and drops attn.bias)",
    ),
    # refused today
    "mixtral-target-parameters": ArchCase(
        _mixtral,
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
        issue="refused: LoRA on nn.Parameters (MoE experts)",
    ),
    "mixtral-target-parameters-router": ArchCase(
        _mixtral,
        dict(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.gate.weight"]),
        issue="refused: LoRA on nn.Parameters (router)",
    ),
    "qwen3-moe-target-parameters": ArchCase(
        _qwen3_moe,
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
        dtype=BF16,
        issue="refused: LoRA on nn.Parameters (MoE experts)",
    ),
    "llama-trainable-tokens": ArchCase(
        lambda: _llama(),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=LLAMA_QV,
            trainable_token_indices={"embed_tokens": [1, 5, 7]},
        ),
        issue="refused: trainable_token_indices",
    ),
    "llama-tied-trainable-tokens": ArchCase(
        lambda: _llama(tie=True),
        dict(r=4, lora_alpha=8, target_modules=LLAMA_QV, trainable_token_indices=[2, 9]),
        issue="refused: trainable_token_indices (tied: PEFT also updates the head)",
    ),
    "wav2vec2-nn-conv1d": ArchCase(
        _wav2vec2,
        dict(
            r=2,
            lora_alpha=4,
            # a string is a regex PEFT full-matches; a list matches name suffixes
            target_modules=r".*feature_extractor\.conv_layers\.\d+\.conv|.*q_proj",
        ),
        issue="refused: nn.Conv1d",
    ),
    "videomae-conv3d": ArchCase(
        _videomae,
        dict(r=2, lora_alpha=4, target_modules=["projection", "query"]),
        issue="refused: nn.Conv3d",
    ),
    "siglip-multihead-attention": ArchCase(
        _siglip_vision,
        dict(r=2, lora_alpha=4, target_modules=r".*head\.attention|.*q_proj"),
        issue="refused: nn.MultiheadAttention",
    ),
    "llama-lora-then-dora": ArchCase(
        lambda: _llama(),
        [
            dict(r=4, lora_alpha=8, target_modules=LLAMA_QV),
            dict(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True),
        ],
        issue="refused: LoRA followed by DoRA on one module",
    ),
    "t5-embed-tokens": ArchCase(
        _t5,
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q"]),
        issue="refused: LoRA on T5's embed_tokens (tied to shared and lm_head)",
    ),
    "bert-mlm-tied-decoder": ArchCase(
        _bert_mlm,
        dict(r=4, lora_alpha=8, target_modules=["decoder", "query"]),
        issue="refused: BERT-MLM's tied cls.predictions.decoder",
    ),
    "mamba-tied-head": ArchCase(
        _mamba,
        dict(r=4, lora_alpha=8, target_modules=["lm_head", "in_proj", "x_proj"]),
        issue="refused (blaming the adapter): Mamba's tied head",
    ),
    "llava-legacy-keys": ArchCase(
        _llava,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "linear_1"]),
        edit_base=_legacy_llava,
        issue="refused: a VLM whose class renames checkpoint keys on load",
    ),
}


# ---- building ---------------------------------------------------------------------------------


@dataclass
class BuiltArch:
    name: str
    case: ArchCase
    base: Path
    adapters: list[Path]
    merged: Path | None  # None when PEFT itself cannot merge (record["peft_error"])
    record: dict = field(repr=False)

    @property
    def adapter(self) -> Path:
        return self.adapters[0]

    @property
    def model_class(self):
        return getattr(_tf(), self.record["architecture"])

    def inputs(self) -> dict[str, torch.Tensor]:
        return _load(self.base.parent / "inputs.safetensors")

    def logits(self) -> torch.Tensor:
        """The output on :meth:`inputs` of PEFT's saved merge, loaded by transformers."""
        return _load(self.base.parent / "logits.safetensors")["merged"]


def _load(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def output_of(out) -> torch.Tensor:
    """The tensor a model returns that depends on every weight: logits where there are any."""
    for name in ("logits", "pooler_output", "last_hidden_state"):
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            return t
    raise TypeError(f"no logits in {type(out).__name__}")


def load_model(cls, path: Path):
    _tf()
    return cls.from_pretrained(path, dtype="auto").eval()


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model(**inputs)).float()


def _perturb(model, seed: int) -> None:
    """Non-zero everything PEFT saves: LoRA factors x4, DoRA magnitudes, modules_to_save copies,
    trainable-token deltas."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * noise)
            elif "modules_to_save" in name or "trainable_tokens_delta" in name:
                p.add_(0.05 * noise)
            elif "lora_" in name:
                p.mul_(4.0)


def _specs(path: Path) -> dict[str, list]:
    out = {}
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                out[k] = [s.get_dtype(), list(s.get_shape())]
    return out


def _config_changes(a: dict, b: dict, prefix: str = "") -> dict[str, list]:
    ignore = {"transformers_version", "_name_or_path", "dtype", "torch_dtype"}
    out: dict[str, list] = {}
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update(_config_changes(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out[f"{prefix}{k}"] = [va, vb]
    return out


def peft_layers(peft_model) -> dict[str, dict]:
    """Per module path (relative to the wrapped model): the PEFT layer class and its facts."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    out = {}
    inner = peft_model.base_model.model
    for path, mod in inner.named_modules():
        if isinstance(mod, LoraLayer):
            base = mod.get_base_layer()
            entry = {
                "layer": type(mod).__name__,
                "base_layer": f"{type(base).__module__}.{type(base).__qualname__}",
                "fan_in_fan_out": bool(getattr(mod, "fan_in_fan_out", False)),
            }
            if hasattr(mod, "parameter_name"):
                entry["parameter_name"] = mod.parameter_name
                entry["num_experts"] = getattr(mod, "num_experts", None)
            out[path] = entry
        elif isinstance(mod, AuxiliaryTrainingWrapper):
            out[path] = {"layer": type(mod).__name__}
    return out


def _peft_model(base_dir: Path, cls, lora: dict, seed: int):
    from peft import LoraConfig, get_peft_model

    model = load_model(cls, base_dir)
    torch.manual_seed(seed)
    lora = dict(lora)
    lora.setdefault("init_lora_weights", False)
    pm = get_peft_model(model, LoraConfig(**lora))
    _perturb(pm, seed)
    return pm


def build_arch(name: str, tmp_path_factory) -> BuiltArch:
    """Base, adapter(s), PEFT's merged model, logits and ``record.json`` for ``ARCH_CASES[name]``,
    built once per session."""
    if name not in _BUILT:
        _BUILT[name] = _build(name, ARCH_CASES[name], tmp_path_factory.mktemp(name))
    return _BUILT[name]


_BUILT: dict[str, BuiltArch] = {}


def _build(name: str, case: ArchCase, root: Path) -> BuiltArch:
    tf = _tf()
    from peft import PeftModel

    torch.manual_seed(0)
    model, inputs = case.build()
    model = _randomize(model, 0).to(case.dtype).eval()
    cls = type(model)
    base = root / "base"
    model.save_pretrained(base)
    if case.edit_base is not None:
        case.edit_base(base)
    save_file(inputs, str(root / "inputs.safetensors"))

    loras = case.lora if isinstance(case.lora, list) else [case.lora]
    adapters, layers, adapter_configs, adapter_keys = [], [], [], []
    for i, lora in enumerate(loras):
        pm = _peft_model(base, cls, lora, seed=1 + i)
        path = root / f"adapter{i}" if len(loras) > 1 else root / "adapter"
        pm.save_pretrained(path)
        adapters.append(path)
        layers.append(peft_layers(pm))
        adapter_configs.append(json.loads((path / "adapter_config.json").read_text()))
        adapter_keys.append(_specs(path / "adapter_model.safetensors"))
        del pm

    record: dict[str, Any] = {
        "case": name,
        "issue": case.issue,
        "architecture": cls.__name__,
        "transformers": tf.__version__,
        "peft": __import__("peft").__version__,
        "dtype": str(case.dtype).removeprefix("torch."),
        "peft_layers": layers[0] if len(layers) == 1 else layers,
        "adapter_config": adapter_configs[0] if len(loras) == 1 else adapter_configs,
        "adapter_keys": adapter_keys[0] if len(loras) == 1 else adapter_keys,
        "base_keys": _specs(base),
        "peft_error": None,
        "warnings": [],
    }
    merged_dir: Path | None = root / "merged"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fresh = load_model(cls, base)
            names = [f"a{i}" for i in range(len(adapters))]
            pmodel = PeftModel.from_pretrained(fresh, adapters[0], adapter_name=names[0])
            for n, p in zip(names[1:], adapters[1:], strict=True):
                pmodel.load_adapter(p, adapter_name=n)
            if len(names) > 1:
                pmodel.base_model.set_adapter(names)
            unmerged = run(pmodel, inputs)
            merged = pmodel.merge_and_unload()
            merged_out = run(merged, inputs)
            merged.save_pretrained(merged_dir)
        except Exception as e:  # noqa: BLE001 - recorded: PEFT itself cannot merge this
            record["peft_error"] = f"{type(e).__name__}: {e}"
            merged_dir = None
    record["warnings"] = sorted({str(w.message).splitlines()[0] for w in caught})
    if merged_dir is not None:
        base_cfg = json.loads((base / "config.json").read_text())
        merged_cfg = json.loads((merged_dir / "config.json").read_text())
        record["config_changes"] = _config_changes(base_cfg, merged_cfg)
        record["merged_keys"] = _specs(merged_dir)
        bt, mt = pf.read_tensors(base), pf.read_tensors(merged_dir)
        record["changed"] = sorted(
            k
            for k in mt
            if k in bt and (bt[k].dtype != mt[k].dtype or not torch.equal(bt[k], mt[k]))
        )
        record["added"] = sorted(set(mt) - set(bt))
        record["removed"] = sorted(set(bt) - set(mt))
        # subtle: the reference is PEFT's saved merge as transformers loads it, the path a
        # stream-tv output takes. PEFT's in-memory merged model can differ from it in the last
        # places on some CPUs (Mamba's tied head here: 7.6e-6 on an AMD EPYC, 0 on a Xeon), with
        # bit-identical weights: another kernel for the same numbers, not another model.
        saved_out = run(load_model(cls, merged_dir), inputs)
        save_file(
            {
                "merged": saved_out.contiguous(),
                "in_memory": merged_out.contiguous(),
                "unmerged": unmerged.contiguous(),
            },
            str(root / "logits.safetensors"),
        )
    (root / "record.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    return BuiltArch(name, case, base, adapters, merged_dir, record)
