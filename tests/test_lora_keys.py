"""Adapter key <-> base key mapping, with plain strings (no tensors)."""

from __future__ import annotations

import pytest

from stream_tv.lora.keys import (
    AdapterKey,
    base_key_candidates,
    base_key_for,
    full_tensor_module,
    input_embedding_key,
    is_output_head,
    parse_adapter_key,
    strip_peft_prefix,
    top_prefixes,
)

P = "base_model.model."


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            P + "model.layers.0.self_attn.q_proj.lora_A.weight",
            AdapterKey("model.layers.0.self_attn.q_proj", "lora_A"),
        ),
        (
            P + "model.layers.0.self_attn.q_proj.lora_B.weight",
            AdapterKey("model.layers.0.self_attn.q_proj", "lora_B"),
        ),
        (
            "model.layers.0.self_attn.q_proj.lora_A.weight",  # writers that omit the prefix
            AdapterKey("model.layers.0.self_attn.q_proj", "lora_A"),
        ),
        (
            P + "transformer.h.1.attn.c_attn.lora_B.bias",
            AdapterKey("transformer.h.1.attn.c_attn", "lora_B_bias"),
        ),
        (
            P + "model.embed_tokens.lora_embedding_A",
            AdapterKey("model.embed_tokens", "lora_embedding_A"),
        ),
        (
            P + "model.embed_tokens.lora_embedding_B",
            AdapterKey("model.embed_tokens", "lora_embedding_B"),
        ),
        # PEFT strips ".weight" from DoRA magnitudes on save; accept it anyway
        (
            P + "model.layers.0.mlp.up_proj.lora_magnitude_vector",
            AdapterKey("model.layers.0.mlp.up_proj", "lora_magnitude_vector"),
        ),
        (
            P + "model.layers.0.mlp.up_proj.lora_magnitude_vector.weight",
            AdapterKey("model.layers.0.mlp.up_proj", "lora_magnitude_vector"),
        ),
        # full tensors: saved embeddings, modules_to_save copies, trained biases
        (
            P + "model.embed_tokens.base_layer.weight",
            AdapterKey("model.embed_tokens", "full", "weight"),
        ),
        (P + "lm_head.base_layer.weight", AdapterKey("lm_head", "full", "weight")),
        (P + "lm_head.weight", AdapterKey("lm_head", "full", "weight")),
        (P + "score.modules_to_save.default.weight", AdapterKey("score", "full", "weight")),
        (
            P + "transformer.h.0.attn.c_attn.base_layer.bias",
            AdapterKey("transformer.h.0.attn.c_attn", "full", "bias"),
        ),
        (P + "transformer.h.0.ln_1.bias", AdapterKey("transformer.h.0.ln_1", "full", "bias")),
        # not understood: the adapter name left in, other PEFT methods
        (
            P + "model.q_proj.lora_A.default.weight",
            AdapterKey("model.q_proj.lora_A.default", "unknown", "weight"),
        ),
        (P + "model.layers.0.mlp.lora_E", AdapterKey("model.layers.0.mlp", "unknown", "lora_E")),
    ],
)
def test_parse_adapter_key(key, expected):
    assert parse_adapter_key(key) == expected


def test_strip_prefix_only_at_start():
    assert strip_peft_prefix("base_model.model.x.weight") == "x.weight"
    assert strip_peft_prefix("a.base_model.model.x") == "a.base_model.model.x"


def test_full_tensor_module_drops_wrappers():
    assert full_tensor_module("model.embed_tokens.base_layer") == "model.embed_tokens"
    assert full_tensor_module("lm_head.modules_to_save.my_adapter") == "lm_head"
    assert full_tensor_module("a.original_module") == "a"
    assert full_tensor_module("model.layers.3.mlp") == "model.layers.3.mlp"


def test_base_key_exact_stripped_and_added_prefix():
    llama = {
        "model.layers.0.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    }
    assert base_key_for("model.layers.0.self_attn.q_proj", "weight", llama) == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    # adapter trained on the bare model (no "model." prefix)
    assert base_key_for("layers.0.self_attn.q_proj", "weight", llama) == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    # GPT-2 base saved from GPT2Model (Hub "gpt2"): no "transformer." prefix
    gpt2_hub = {"h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias", "wte.weight"}
    assert (
        base_key_for("transformer.h.0.attn.c_attn", "weight", gpt2_hub) == "h.0.attn.c_attn.weight"
    )
    assert base_key_for("transformer.h.0.attn.c_attn", "bias", gpt2_hub) == "h.0.attn.c_attn.bias"
    assert base_key_for("transformer.h.0.attn.c_proj", "weight", gpt2_hub) is None
    # lm_head of a tied model is not on disk
    assert base_key_for("lm_head", "weight", {"model.embed_tokens.weight"}) is None


def test_base_key_candidates_order():
    assert base_key_candidates("model.x", "weight", ["lm_head", "model"]) == [
        "model.x.weight",
        "x.weight",
        "lm_head.model.x.weight",
    ]
    assert base_key_candidates("lm_head", "weight") == ["lm_head.weight"]


def test_top_prefixes():
    assert top_prefixes(["transformer.wte.weight", "lm_head.weight", "transformer.h.0.x"]) == [
        "lm_head",
        "transformer",
    ]


def test_output_head_and_input_embedding():
    assert is_output_head("lm_head") and is_output_head("model.embed_out")
    assert not is_output_head("model.layers.0.mlp.down_proj")
    assert input_embedding_key({"model.embed_tokens.weight", "model.norm.weight"}) == (
        "model.embed_tokens.weight"
    )
    assert input_embedding_key({"transformer.wte.weight", "transformer.wpe.weight"}) == (
        "transformer.wte.weight"
    )
    assert input_embedding_key({"gpt_neox.embed_in.weight"}) == "gpt_neox.embed_in.weight"
    assert input_embedding_key({"model.norm.weight"}) is None
