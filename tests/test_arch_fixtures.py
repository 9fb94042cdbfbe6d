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
    assert torch.equal(got, b.logits())
    unmerged = af._load(b.base.parent / "logits.safetensors")["unmerged"]
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
