"""Bad adapters: one test per refusal, each checking that the message names the field or key
and says what to do. Adapters are written by hand (PEFT's key layout) so that each test
breaks exactly one thing; bases are tiny safetensors checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stream_tv.errors import AdapterError, ReferenceNotFoundError
from stream_tv.io.index import load_checkpoint
from stream_tv.lora import Adapter

P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def write_adapter(path: Path, tensors: dict, config: dict | None = None, **changes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors")
    )
    (path / "adapter_config.json").write_text(json.dumps({**(config or CONFIG), **changes}))
    return path


def lora(module: str = Q, r: int = 2, out: int = 8, inp: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        f"{P}{module}.lora_A.weight": torch.randn(r, inp, generator=g),
        f"{P}{module}.lora_B.weight": torch.randn(out, r, generator=g),
    }


@pytest.fixture
def base(tmp_path) -> Path:
    d = tmp_path / "base"
    d.mkdir()
    save_file(
        {
            f"{Q}.weight": torch.randn(8, 6),
            "model.layers.0.mlp.up_proj.weight": torch.randn(10, 6),
            "model.embed_tokens.weight": torch.randn(20, 6),
            "model.norm.weight": torch.ones(6),
            "model.quant.weight": torch.zeros(8, 6, dtype=torch.int8),
        },
        str(d / "model.safetensors"),
    )
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    return d


def refused(path, base_dir=None, match=""):
    with pytest.raises(AdapterError, match=match) as e:
        adapter = Adapter.load(path)
        if base_dir is not None:
            adapter.bind(load_checkpoint(base_dir))
    return str(e.value)


def test_good_adapter_binds(tmp_path, base):
    plan = Adapter.load(write_adapter(tmp_path / "a", lora())).bind(load_checkpoint(base))
    assert list(plan.merges) == [f"{Q}.weight"]
    assert len(plan.untouched) == 4


# ---- files -------------------------------------------------------------------------------


def test_pickled_adapter_bin_explains_conversion(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(CONFIG))
    torch.save(lora(), d / "adapter_model.bin")
    msg = refused(d, match="adapter_model.bin is a pickle")
    assert "safe_serialization=True" in msg and "weights_only=True" in msg and "save_file" in msg


def test_no_weights_file(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(CONFIG))
    assert "save_pretrained" in refused(d, match="no adapter_model.safetensors")


def test_missing_config(tmp_path):
    d = write_adapter(tmp_path / "a", lora())
    (d / "adapter_config.json").unlink()
    refused(d, match="no adapter_config.json")


def test_not_a_directory_or_hub_id(tmp_path):
    with pytest.raises(ReferenceNotFoundError):
        Adapter.load(tmp_path / "nope")


def test_corrupt_weights_file(tmp_path):
    d = write_adapter(tmp_path / "a", lora())
    (d / "adapter_model.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    refused(d, match="not valid JSON")


def test_file_path_is_accepted_as_its_directory(tmp_path, base):
    d = write_adapter(tmp_path / "a", lora())
    assert Adapter.load(d / "adapter_model.safetensors").path == d


def test_config_refusal_goes_through_load(tmp_path):
    d = write_adapter(tmp_path / "a", lora(), init_lora_weights="pissa")
    assert "path_initial_model_for_weight_conversion" in refused(d, match="'init_lora_weights'")


# ---- tensors in the adapter file --------------------------------------------------------------


def test_adapter_name_left_in_keys(tmp_path):
    t = {k.replace("lora_A.weight", "lora_A.default.weight"): v for k, v in lora().items()}
    msg = refused(write_adapter(tmp_path / "a", t), match="lora_A.default.weight")
    assert "adapter name" in msg


def test_other_peft_method_tensor(tmp_path):
    t = {**lora(), f"{P}{Q}.lora_E": torch.ones(2, 1)}
    refused(
        write_adapter(tmp_path / "a", t),
        match="'base_model.model.model.layers.0.self_attn.q_proj.lora_E'",
    )


def test_missing_b(tmp_path):
    t = {k: v for k, v in lora().items() if "lora_A" in k}
    refused(write_adapter(tmp_path / "a", t), match=f"'{Q}' has no lora_B")


def test_a_b_not_a_rank_r_product(tmp_path):
    t = lora()
    t[f"{P}{Q}.lora_B.weight"] = torch.ones(8, 3)
    refused(write_adapter(tmp_path / "a", t), match="do not form a rank-r product")


def test_rank_disagrees_with_config(tmp_path):
    msg = refused(write_adapter(tmp_path / "a", lora(r=3)), match="rank 3 in the weights")
    assert "'r' or 'rank_pattern'" in msg


def test_integer_tensor(tmp_path):
    t = {**lora(), f"{P}lm_head.weight": torch.zeros(20, 6, dtype=torch.int8)}
    refused(write_adapter(tmp_path / "a", t), match="dtype I8")


def test_dora_flag_and_magnitude_disagree(tmp_path):
    t = {**lora(), f"{P}{Q}.lora_magnitude_vector": torch.ones(8)}
    refused(write_adapter(tmp_path / "a", t), match="lora_magnitude_vector but use_dora is false")
    refused(
        write_adapter(tmp_path / "b", lora(), use_dora=True),
        match="no lora_magnitude_vector but use_dora",
    )


def test_lora_bias_flag_and_tensor_disagree(tmp_path):
    t = {**lora(), f"{P}{Q}.lora_B.bias": torch.ones(8)}
    refused(write_adapter(tmp_path / "a", t), match="lora_B.bias but lora_bias is false")
    refused(write_adapter(tmp_path / "b", lora(), lora_bias=True), match="lora_bias is true")


def test_factors_of_no_layer_kind_refused(tmp_path):
    t = {
        f"{P}conv.lora_A.weight": torch.ones(2, 3, 3, 1, 1, 1),
        f"{P}conv.lora_B.weight": torch.ones(4, 2, 1, 1, 1, 1),
    }
    msg = refused(write_adapter(tmp_path / "a", t, target_modules=["conv"]), match="has shape")
    assert "Conv1d/Conv2d/Conv3d" in msg


def test_empty_adapter(tmp_path):
    refused(write_adapter(tmp_path / "a", {}), match="holds no tensors")


# ---- binding to a base -------------------------------------------------------------------------


def test_key_matches_no_base_tensor(tmp_path, base):
    t = lora("model.layers.0.self_attn.k_proj")
    msg = refused(write_adapter(tmp_path / "a", t), base, match="'model.layers.0.self_attn.k_proj'")
    assert "no tensor model.layers.0.self_attn.k_proj.weight" in msg
    assert "belongs to this base" in msg


def test_shape_disagrees_with_base(tmp_path, base):
    msg = refused(write_adapter(tmp_path / "a", lora(out=8, inp=5)), base, match=f"'{Q}'")
    assert "[8, 5]" in msg and "[8, 6]" in msg


def test_quantised_base_refused(tmp_path, base):
    t = lora("model.quant")
    refused(write_adapter(tmp_path / "a", t, target_modules=["quant"]), base, match="dtype I8")


def test_lora_bias_without_base_bias(tmp_path, base):
    t = {**lora(), f"{P}{Q}.lora_B.bias": torch.ones(8)}
    msg = refused(write_adapter(tmp_path / "a", t, lora_bias=True), base, match="no .*q_proj.bias")
    assert "lora_bias" in msg


def test_embedding_shape(tmp_path, base):
    t = {
        f"{P}model.embed_tokens.lora_embedding_A": torch.ones(2, 21),
        f"{P}model.embed_tokens.lora_embedding_B": torch.ones(6, 2),
    }
    msg = refused(write_adapter(tmp_path / "a", t), base, match="LoRA module 'model.embed_tokens'")
    assert "vocab=21" in msg and "resized vocabulary" in msg


def test_dora_magnitude_shape(tmp_path, base):
    t = {**lora(), f"{P}{Q}.lora_magnitude_vector": torch.ones(6)}
    refused(
        write_adapter(tmp_path / "a", t, use_dora=True),
        base,
        match="lora_magnitude_vector is \\[6\\]",
    )


def test_head_on_a_tied_base_merges_into_the_embedding(tmp_path, base):
    plan = Adapter.load(write_adapter(tmp_path / "a", lora("lm_head", out=20))).bind(
        load_checkpoint(base)
    )
    assert list(plan.merges) == ["model.embed_tokens.weight"]


def test_head_missing_and_untied(tmp_path, base):
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    msg = refused(
        write_adapter(tmp_path / "a", lora("lm_head", out=20)),
        base,
        match="tie_word_embeddings=false",
    )
    assert "'lm_head'" in msg


def test_saved_tensor_of_another_shape(tmp_path, base):
    t = {**lora(), f"{P}model.embed_tokens.base_layer.weight": torch.ones(24, 6)}
    msg = refused(write_adapter(tmp_path / "a", t), base, match="resized vocabulary")
    assert "model.embed_tokens.base_layer.weight" in msg


def test_saved_tensor_of_unknown_module(tmp_path, base):
    t = {**lora(), f"{P}classifier.weight": torch.ones(3, 6)}
    refused(
        write_adapter(tmp_path / "a", t),
        base,
        match="saved tensor 'base_model.model.classifier.weight'",
    )


def test_precision_name_checked(tmp_path, base):
    plan = Adapter.load(write_adapter(tmp_path / "a", lora())).bind(load_checkpoint(base))
    with pytest.raises(ValueError, match="precision"):
        plan.check("bf16")
    tm = next(iter(plan))
    w = torch.randn(8, 6)
    with tm.open("cpu") as rt, pytest.raises(ValueError, match="precision"):
        rt.merge_rows(w, 0, 8, torch.empty_like(w), precision="fast")
