"""The architecture fixtures are real references: PEFT merged something, and what it saved is
what transformers loads back (the logits integration tests compare against)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

import arch_fixtures as af  # noqa: E402

CASES = list(af.ARCH_CASES)

# Cases where merging changes what the model computes, by PEFT's own design: a LoRA on a tied
# head (or on embeddings tied to it) is merged into the one shared tensor, so the input side
# changes too (PEFT warns about it). Everywhere else merged == unmerged up to rounding.
MERGE_CHANGES_OUTPUTS = {
    "llama-tied-stored-head-equal",
    "t5-embed-tokens",
    "bert-mlm-tied-decoder",
    "mamba-tied-head",
}


@pytest.fixture(scope="session")
def arch(tmp_path_factory):
    return lambda name: af.build_arch(name, tmp_path_factory)


@pytest.mark.parametrize("name", CASES)
def test_peft_merged_and_the_adapter_matters(arch, name):
    b = arch(name)
    r = json.loads((b.base.parent / "record.json").read_text())
    assert r == b.record
    assert r["peft_error"] is None and b.merged is not None
    assert r["changed"] or r["added"], "the adapter must change the model"
    base = af.pf.read_tensors(b.base)
    merged = af.pf.read_tensors(b.merged)
    assert {k: [str(v.dtype), list(v.shape)] for k, v in merged.items()}.keys() == r[
        "merged_keys"
    ].keys()
    for k in r["changed"]:
        assert k in base and not (
            base[k].dtype == merged[k].dtype and torch.equal(base[k], merged[k])
        )


@pytest.mark.parametrize("name", CASES)
def test_transformers_loads_peft_output_with_the_recorded_logits(arch, name):
    b = arch(name)
    model = af.load_model(b.model_class, b.merged)
    got = af.run(model, b.inputs())
    assert torch.equal(got, b.logits())  # loading the same files again gives the same logits
    recorded = af._load(b.base.parent / "logits.safetensors")
    unmerged, in_memory = recorded["unmerged"], recorded["in_memory"]
    # PEFT's merged model before saving computes the same, up to the kernel's last places
    scale = max(1.0, in_memory.abs().max().item())
    assert (got - in_memory).abs().max().item() <= 1e-6 * scale
    base_out = af.run(af.load_model(b.model_class, b.base), b.inputs())
    assert not torch.equal(base_out, got), "the merge must show in the outputs"
    if name not in MERGE_CHANGES_OUTPUTS:
        tol = 1e-5 if b.case.dtype in (torch.float32, torch.float64) else 0.1
        assert (got - unmerged).abs().max().item() <= tol * max(1.0, unmerged.abs().max().item())


def test_records_say_what_peft_did_to_ties_and_dtypes(arch):
    r = arch("llama-tied-modules-to-save-lm_head").record
    assert r["config_changes"] == {"tie_word_embeddings": [True, False]}
    assert r["added"] == ["lm_head.weight"]
    r = arch("llama-tied-stored-head-equal").record
    assert r["removed"] == ["lm_head.weight"] and "model.embed_tokens.weight" in r["changed"]
    r = arch("llama-tied-stored-head-distinct").record
    assert r["config_changes"] == {"tie_word_embeddings": [True, False]}
    assert "lm_head.weight" in r["changed"] and "model.embed_tokens.weight" not in r["changed"]
    r = arch("gpt2-legacy-names").record
    assert "h.0.attn.bias" in r["removed"] and "transformer.h.0.attn.c_attn.weight" in r["added"]
    r = arch("llama-fp64").record
    assert {v[0] for v in r["merged_keys"].values()} == {"F64"}


def test_modules_to_save_on_a_tied_model_unties_it(arch):
    """The saved copy becomes its module's weight; the other side keeps the base embedding."""
    for name, trained, kept in (
        ("llama-tied-modules-to-save-lm_head", "lm_head.weight", "model.embed_tokens.weight"),
        ("llama-tied-modules-to-save-embed_tokens", "model.embed_tokens.weight", "lm_head.weight"),
    ):
        b = arch(name)
        base, merged = af.pf.read_tensors(b.base), af.pf.read_tensors(b.merged)
        saved = af.pf.read_tensors(b.adapter / "adapter_model.safetensors")
        assert torch.equal(merged[trained], saved[f"base_model.model.{trained}"])
        assert torch.equal(merged[kept], base["model.embed_tokens.weight"])
        assert not torch.equal(merged[trained], merged[kept])


def test_peft_multihead_attention_merge_adds_the_out_proj_delta_twice(arch):
    """PEFT 0.21's MultiheadAttention layer applies out_proj's LoRA twice, in forward and in
    merge (its merge adds the delta, then calls the nested out_proj LoRA's own merge): the
    merged out_proj is ``(W + d) + d``, in_proj ``W + d``. A reproduction must do the same; this
    test flags the day PEFT changes it."""
    b = arch("siglip-multihead-attention")
    base, merged = af.pf.read_tensors(b.base), af.pf.read_tensors(b.merged)
    a = af.pf.read_tensors(b.adapter / "adapter_model.safetensors")
    cfg = b.record["adapter_config"]
    s = cfg["lora_alpha"] / cfg["r"]

    def delta(module):
        p = f"base_model.model.{module}"
        return (a[f"{p}.lora_B.weight"] @ a[f"{p}.lora_A.weight"]) * s

    d_in, d_out = delta("head.attention"), delta("head.attention.base_layer.out_proj")
    w_in, w_out = "head.attention.in_proj_weight", "head.attention.out_proj.weight"
    assert torch.equal(merged[w_in], base[w_in] + d_in)
    assert torch.equal(merged[w_out], (base[w_out] + d_out) + d_out)
    assert not torch.equal(merged[w_out], base[w_out] + d_out)


@pytest.mark.parametrize("name", ["qwen3-moe-target-parameters", "mixtral-target-parameters"])
def test_peft_expert_delta_formula(arch, name):
    """``target_parameters`` on a stacked expert tensor ``(E, out, in)``: A ``(r*E, in)`` holds
    expert e's rows contiguously (``A.reshape(E, r, in)``), B ``(out, r*E)`` holds them strided
    (``B.reshape(out, r, E)``); ``D[e] = B[:, :, e] @ A[e] * scaling``, cast to the weight dtype
    and then added (two roundings in bf16, like Embedding). On disk the experts are separate
    tensors (gate and up stacked along dim 0 of ``gate_up_proj``)."""
    b = arch(name)
    base, merged = af.pf.read_tensors(b.base), af.pf.read_tensors(b.merged)
    a = af.pf.read_tensors(b.adapter / "adapter_model.safetensors")
    cfg = b.record["adapter_config"]
    s = cfg["lora_alpha"] / cfg["r"]
    experts = 3
    if name.startswith("qwen"):
        layout = {"gate_up_proj": ["gate_proj", "up_proj"], "down_proj": ["down_proj"]}
        key = "model.layers.0.mlp.experts.{e}.{n}.weight"
    else:
        layout = {"gate_up_proj": ["w1", "w3"], "down_proj": ["w2"]}
        key = "model.layers.0.block_sparse_moe.experts.{e}.{n}.weight"
    # the first target parameter's wrapper is the inner one: saved under ".base_layer"
    wrapper = {"gate_up_proj": ".base_layer", "down_proj": ""}
    for param, names in layout.items():
        p = f"base_model.model.model.layers.0.mlp.experts{wrapper[param]}"
        A, B = a[f"{p}.lora_A.weight"], a[f"{p}.lora_B.weight"]
        A3, B3 = A.reshape(experts, -1, A.shape[-1]), B.reshape(B.shape[0], -1, experts)
        D = torch.einsum("o r e, e r i -> e o i", B3, A3) * s  # PEFT's own product
        for e in range(experts):
            assert torch.allclose(D[e], (B3[:, :, e] @ A3[e]) * s, rtol=1e-5, atol=1e-6)
            w = torch.cat([base[key.format(e=e, n=n)] for n in names])
            m = torch.cat([merged[key.format(e=e, n=n)] for n in names])
            assert torch.equal(m, w + D[e].to(w.dtype)), (param, e)
            if w.dtype != torch.float32:
                assert not torch.equal(m, (w.float() + D[e]).to(w.dtype)), "two roundings show"
