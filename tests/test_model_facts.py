"""The facts ``model_facts`` reads from a model's definition are the ones the model really has.

Every case of ``arch_fixtures`` is checked against two independent references: the real model
``from_pretrained`` loads (parameter names, shapes, dtypes, which tensors share storage, what
each checkpoint tensor became) and what PEFT itself did with it (which layer class it wrapped
each module with, ``fan_in_fan_out``, which names and dtypes its merged ``save_pretrained``
wrote).
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("peft")
pytest.importorskip("transformers")

import arch_fixtures as af  # noqa: E402

from stream_tv.errors import AdapterError, InputError  # noqa: E402
from stream_tv.io.index import load_checkpoint, read_header  # noqa: E402
from stream_tv.lora import model_facts as mf  # noqa: E402
from stream_tv.lora.model_facts import (  # noqa: E402
    KINDS,
    ModelDefinitionError,
    NoFacts,
    ambiguous_layout_error,
    ambiguous_layouts,
    read_model_facts,
)

CASES = list(af.ARCH_CASES)

# PEFT layer class -> the kinds a module it wraps may have (peft/tuners/lora/layer.py)
PEFT_LAYER_KINDS = {
    "Linear": {"linear", "conv1d"},
    "Embedding": {"embedding"},
    "Conv1d": {"nn_conv1d"},
    "Conv2d": {"conv2d"},
    "Conv3d": {"conv3d"},
    "MultiheadAttention": {"multihead_attention"},
}


@pytest.fixture(scope="session")
def arch(tmp_path_factory):
    return lambda name: af.build_arch(name, tmp_path_factory)


@pytest.fixture(scope="session")
def facts_of(arch):
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = read_model_facts(load_checkpoint(arch(name).base))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def real_model(arch):
    cache: dict = {}

    def get(name):
        if name not in cache:
            b = arch(name)
            cache[name] = af.load_model(b.model_class, b.base)
        return cache[name]

    return get


def read(path, key) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def peft_layers(record) -> dict:
    layers = record["peft_layers"]
    if isinstance(layers, list):  # several adapters: the union (same modules, same classes)
        out = {}
        for one in layers:
            out.update(one)
        return out
    return layers


# ---- against PEFT's own choices ----------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_kinds_agree_with_the_layers_peft_chose(arch, facts_of, name):
    facts = facts_of(name)
    layers = peft_layers(arch(name).record)
    assert layers, "PEFT wrapped nothing: the case proves nothing"
    checked = 0
    for path, layer in layers.items():
        cls = layer["layer"]
        if cls in ("ModulesToSaveWrapper", "TrainableTokensWrapper"):
            assert facts.module(path).kind in KINDS
            continue
        if cls == "ParamWrapper":
            # nested wrappers: the innermost module path is the one owning the parameter
            owner = path
            while owner.endswith(".base_layer"):
                owner = owner.removesuffix(".base_layer")
            param = f"{owner}.{layer['parameter_name']}"
            assert param in facts.target_parameters, (param, facts.target_parameters)
            n = layer["num_experts"]
            assert (len(facts.params[param].shape) == 3) == (n > 1)
            checked += 1
            continue
        if ".base_layer." in path:  # MultiheadAttention's out_proj inside its wrapper
            path = path.replace(".base_layer.", ".")
        fact = facts.module(path)
        assert fact.kind in PEFT_LAYER_KINDS[cls], (path, fact.kind, cls)
        assert fact.cls == layer["base_layer"], (path, fact.cls, layer["base_layer"])
        assert fact.fan_in_fan_out == layer["fan_in_fan_out"], path
        checked += 1
    assert checked


def test_square_conv1d_below_the_top_level_is_conv1d(arch, facts_of):
    """Issue 10 (1): the square decoder Conv1Ds of encoder-decoder models, which shapes and the
    top-level model_type cannot tell."""
    for name in ("vision-encoder-decoder-gpt2", "encoder-decoder-bert-gpt2"):
        b, facts = arch(name), facts_of(name)
        assert facts.model_type in ("vision-encoder-decoder", "encoder-decoder")
        squares = [
            p
            for p in (
                "decoder.transformer.h.0.attn.c_proj",
                "decoder.transformer.h.0.crossattention.c_proj",
            )
            if facts.modules[p].weight_shape == (32, 32)
        ]
        assert len(squares) == 2
        for p in squares:
            assert facts.kind_of(p) == "conv1d"
            assert peft_layers(b.record)[p]["fan_in_fan_out"] is True
    bert = facts_of("encoder-decoder-bert-gpt2").module(
        "encoder.encoder.layer.0.attention.self.query"
    )
    assert bert.kind == "linear" and bert.weight_shape == (32, 32)


def test_peft_saves_the_last_fan_in_fan_out_it_forced(arch):
    """PEFT's dispatcher rewrites ``config.fan_in_fan_out`` per layer and saves whatever the
    last layer left: in a BERT + GPT-2 model the saved flag describes only some modules, so a
    binding must take the layout from the model, never from adapter_config.json."""
    r = arch("encoder-decoder-bert-gpt2").record
    flags = {v["fan_in_fan_out"] for v in r["peft_layers"].values()}
    assert flags == {True, False}
    assert r["adapter_config"]["fan_in_fan_out"] in flags


# ---- against the real model from_pretrained loads --------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_params_match_the_loaded_model(facts_of, real_model, name):
    facts, model = facts_of(name), real_model(name)
    real = dict(model.named_parameters(remove_duplicate=False))
    real.update(dict(model.named_buffers(remove_duplicate=False)))
    state = set(model.state_dict())
    ours = {n for n in facts.params if n in state}
    assert ours == state
    for n in ours:
        p, t = facts.params[n], real[n]
        assert p.shape == tuple(t.shape), n
        assert p.dtype == t.dtype, (n, p.dtype, t.dtype)


@pytest.mark.parametrize("name", CASES)
def test_ties_match_shared_storage(arch, facts_of, real_model, name):
    facts, model = facts_of(name), real_model(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    shared = {(a, b) for a, pa in params.items() for b, pb in params.items() if a < b and pa is pb}
    base = load_checkpoint(arch(name).base)
    groups: dict[str, set[str]] = {}
    for pair in facts.ties:
        if pair.status == "both":
            # transformers ties them only when the two stored tensors are equal
            kt, ks = facts.keys_of_param[pair.target][0], facts.keys_of_param[pair.source][0]
            if not torch.equal(read(base[kt].file, kt), read(base[ks].file, ks)):
                continue
        groups.setdefault(pair.source, {pair.source}).add(pair.target)
    expected = {(a, b) for g in groups.values() for a in g for b in g if a < b}
    assert shared == expected


def test_tie_status_both_depends_on_the_values(facts_of, real_model):
    for name, tied in (
        ("llama-tied-stored-head-equal", True),
        ("llama-tied-stored-head-distinct", False),
    ):
        facts, model = facts_of(name), real_model(name)
        (pair,) = facts.ties
        assert (pair.target, pair.source, pair.status) == (
            "lm_head.weight",
            "model.embed_tokens.weight",
            "both",
        )
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("name", CASES)
def test_checkpoint_keys_land_where_facts_say(arch, facts_of, real_model, name):
    b, facts, model = arch(name), facts_of(name), real_model(name)
    base = load_checkpoint(b.base)
    state = model.state_dict()
    assert set(facts.param_of_key) | set(facts.unexpected_keys) == set(base.tensors)
    assert not facts.missing_params
    for key, ks in facts.param_of_key.items():
        assert ks.exact, ks
        want = state[ks.param]
        if ks.expert is not None:
            want = want[ks.expert]
        if ks.dim is not None:
            want = want.narrow(ks.dim, ks.start, ks.stop - ks.start)
        got = read(base[key].file, key).to(want.dtype)
        assert torch.equal(got, want), (key, ks)
    for key in facts.unexpected_keys:
        assert key not in state


def test_renames_the_issue_names(facts_of):
    """Issue 10 (6) and the Llava refusal: keys the class renames on load."""
    g = facts_of("gpt2-legacy-names")
    assert g.param_of_key["h.0.attn.c_proj.weight"].param == "transformer.h.0.attn.c_proj.weight"
    assert g.unexpected_keys == ("h.0.attn.bias",)
    assert g.saved_as["transformer.h.0.attn.c_proj.weight"] == (
        "transformer.h.0.attn.c_proj.weight",
    )
    v = facts_of("llava-legacy-keys")
    ks = v.param_of_key["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert ks.param == "model.language_model.layers.0.self_attn.q_proj.weight"
    assert v.param_of_key["language_model.lm_head.weight"].param == "lm_head.weight"
    # saved back in the layout it was loaded from (transformers reverts the renames it used)
    assert v.saved_as["lm_head.weight"] == ("language_model.lm_head.weight",)
    m = facts_of("mixtral-target-parameters")
    w3 = m.param_of_key["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    assert (w3.param, w3.expert, w3.dim, w3.start, w3.stop) == (
        "model.layers.0.mlp.experts.gate_up_proj",
        2,
        0,
        24,
        48,
    )
    assert m.params[w3.param].shape == (3, 48, 32) and m.params[w3.param].bare


# ---- against what PEFT's merged save_pretrained wrote ------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_saved_names_and_dtypes_match_peft_output(arch, facts_of, name):
    b, facts = arch(name), facts_of(name)
    assert b.merged is not None, b.record["peft_error"]
    merged = b.record["merged_keys"]
    names_of = {p: facts.saved_as[p] for p in facts.saved_as}
    assert all(v is not None for v in names_of.values())
    everything = {k for v in names_of.values() for k in v}
    # PEFT writes a subset: tie targets that are still tied are dropped (the source is kept)
    assert set(merged) <= everything
    dropped = everything - set(merged)
    tie_targets = {k for t in facts.tied for k in names_of[t]}
    assert dropped <= tie_targets, dropped
    # each written tensor has the dtype the model loads its parameter in
    dtype_of = {k: facts.params[p].dtype for p, ks in names_of.items() for k in ks}
    for key, (dtype, _) in merged.items():
        assert dtype == mf.dtype_name(dtype_of[key]), (key, dtype, dtype_of[key])


@pytest.mark.parametrize("name", CASES)
def test_merged_output_maps_back_onto_the_same_parameters(arch, facts_of, name):
    """Facts read on PEFT's merged output: every written key lands on the parameter whose
    saved names include it, at the place the base's key of that name had (so a writer can
    name and slice its output from the base's facts)."""
    b, facts = arch(name), facts_of(name)
    out = read_model_facts(load_checkpoint(b.merged))
    assert not out.unexpected_keys and not out.missing_params
    for key, ks in out.param_of_key.items():
        assert key in facts.saved_as[ks.param], (key, ks.param)
        if key in facts.param_of_key:
            assert facts.param_of_key[key] == ks


def test_keep_in_fp32_is_read_for_float16_only(facts_of, arch):
    """Issue 10 (4): T5's wo loads in float32 from a float16 base, and PEFT saves it so; a
    bfloat16 base keeps bfloat16 (``_keep_in_fp32_modules`` applies to float16 loads)."""
    key = "decoder.block.0.layer.2.DenseReluDense.wo.weight"
    f16 = facts_of("t5-fp16-keep-fp32-wo")
    assert f16.keep_in_fp32 == {"wo"} and f16.dtype == torch.float16
    assert f16.params[key].dtype == torch.float32
    assert f16.params["decoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.float16
    assert arch("t5-fp16-keep-fp32-wo").record["merged_keys"][key][0] == "F32"
    assert arch("t5-fp16-keep-fp32-wo").record["base_keys"][key][0] == "F16"
    b16 = facts_of("t5-bf16-wo")
    assert b16.params[key].dtype == torch.bfloat16
    assert arch("t5-bf16-wo").record["merged_keys"][key][0] == "BF16"


def test_untied_outputs_are_saved_under_their_own_name(arch, facts_of):
    """Issue 10 (2): PEFT unties and writes the head as its own tensor under saved_as."""
    for name in ("llama-tied-modules-to-save-lm_head", "llama-tied-modules-to-save-embed_tokens"):
        r, facts = arch(name).record, facts_of(name)
        assert r["config_changes"] == {"tie_word_embeddings": [True, False]}
        assert r["added"] == list(facts.saved_as["lm_head.weight"])
        assert facts.tied == {"lm_head.weight": "model.embed_tokens.weight"}


def test_stored_as_follows_ties(facts_of):
    t5 = facts_of("t5-embed-tokens")
    assert t5.stored_as("encoder.embed_tokens.weight") == ("shared.weight",)
    assert t5.stored_as("lm_head.weight") == ("shared.weight",)
    assert t5.tie_group("decoder.embed_tokens.weight") == (
        "shared.weight",
        "decoder.embed_tokens.weight",
        "encoder.embed_tokens.weight",
        "lm_head.weight",
    )
    bert = facts_of("bert-mlm-tied-decoder")
    assert bert.stored_as("cls.predictions.decoder.weight") == (
        "bert.embeddings.word_embeddings.weight",
    )
    mamba = facts_of("mamba-tied-head")
    assert mamba.tied_source("lm_head.weight") == "backbone.embeddings.weight"
    assert mamba.modules_of_kind("nn_conv1d") == ["backbone.layers.0.mixer.conv1d"]


def test_multihead_attention_and_convs(facts_of):
    s = facts_of("siglip-multihead-attention").module("head.attention")
    assert s.kind == "multihead_attention" and s.weight_shape is None
    assert "head.attention.in_proj_weight" in s.params
    assert not facts_of("siglip-multihead-attention").params["head.attention.in_proj_weight"].bare
    v = facts_of("videomae-conv3d").module("videomae.embeddings.patch_embeddings.projection")
    assert v.kind == "conv3d" and v.weight_shape == (32, 3, 2, 8, 8)
    w = facts_of("wav2vec2-nn-conv1d").module("wav2vec2.feature_extractor.conv_layers.0.conv")
    assert w.kind == "nn_conv1d" and w.weight_shape == (16, 1, 10)


def test_float64_base(facts_of):
    f = facts_of("llama-fp64")
    assert f.dtype == torch.float64 and f.dtype_source.startswith("config.json")
    assert {p.dtype for p in f.params.values()} == {torch.float64}


# ---- dtype resolution, configs without checkpoints, refusals ------------------------------------


def test_dtype_auto_without_config_dtype_reads_the_first_tensor(arch, tmp_path):
    b = arch("t5-bf16-wo")
    cfg = json.loads((b.base / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    d = tmp_path / "base"
    shutil.copytree(b.base, d)
    (d / "config.json").write_text(json.dumps(cfg))
    f = read_model_facts(d)
    assert f.dtype == torch.bfloat16 and "first floating tensor" in f.dtype_source
    f16 = read_model_facts(d, dtype=torch.float16)  # loaded as float16: wo is kept in fp32
    assert f16.params["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32
    assert read_model_facts(d, dtype="float32").dtype == torch.float32


def test_facts_from_a_config_alone(arch):
    cfg = json.loads((arch("gpt2-legacy-names").base / "config.json").read_text())
    f = read_model_facts(config=cfg)
    assert f.kind_of("transformer.h.0.attn.c_proj") == "conv1d"
    assert not f.param_of_key and not f.ties and f.tied


def test_a_70b_config_builds_on_meta():
    """Nothing is allocated: a 70B model's parameters exist only as shapes."""
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "dtype": "bfloat16",
    }
    f = read_model_facts(config=cfg)
    total = sum(torch.Size(p.shape).numel() for p in f.params.values())
    assert 69e9 < total < 72e9
    assert f.modules["model.layers.79.mlp.down_proj"].weight_shape == (8192, 28672)
    assert f.params["lm_head.weight"].dtype == torch.bfloat16


def test_no_facts_without_config(arch, tmp_path):
    d = tmp_path / "noconfig"
    d.mkdir()
    for p in arch("llama-fp64").base.glob("*.safetensors"):
        shutil.copy(p, d / p.name)
    f = read_model_facts(d)
    assert isinstance(f, NoFacts) and not f
    assert "no config.json" in f.reason


def test_no_facts_without_transformers(arch, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    f = read_model_facts(arch("llama-fp64").base)
    assert not f and f.reason == "transformers is not installed"
    assert "stream-tv[transformers]" in f.hint


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="no-such-model"), "does not know model_type"),
        (lambda c: c.pop("architectures"), "names no architectures"),
        (lambda c: c.update(architectures=["NoSuchForCausalLM"]), "has no model class"),
        (lambda c: c.update(architectures=["GPT2LMHeadModel"]), "takes a GPT2Config"),
        (lambda c: c.update(architectures=["A", "B"]), "several architectures"),
        (lambda c: c.update(hidden_act="no-such-activation"), "cannot be built"),
        (lambda c: c.update(num_attention_heads=0), "does not build a LlamaConfig"),
    ],
)
def test_a_config_that_cannot_be_built_is_refused(arch, edit, message):
    cfg = json.loads((arch("llama-fp64").base / "config.json").read_text())
    edit(cfg)
    with pytest.raises(ModelDefinitionError, match=message) as e:
        read_model_facts(config=cfg)
    assert isinstance(e.value, InputError) and e.value.where


# ---- without facts: the square layouts shapes cannot settle -------------------------------------


def test_ambiguous_layouts_are_exactly_the_square_conv1ds(arch, facts_of):
    name = "vision-encoder-decoder-gpt2"
    b, facts = arch(name), facts_of(name)
    adapter = read_header(b.adapter / "adapter_model.safetensors")
    base = load_checkpoint(b.base)
    modules, shapes = {}, {}
    for key, spec in adapter.items():
        if key.endswith(".lora_A.weight"):
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out_f = adapter[key.replace("lora_A", "lora_B")].shape[0]
            modules[path] = (out_f, spec.shape[1])
            shapes[path] = base[f"{path}.weight"].shape
    got = ambiguous_layouts(modules, shapes)
    square = sorted(p for p in modules if facts.modules[p].weight_shape in ((32, 32),))
    assert got == square and len(got) == 3  # attn.c_proj, crossattention.c_proj and q_attn
    assert all(facts.kind_of(p) == "conv1d" for p in got)
    err = ambiguous_layout_error(got, where=str(b.adapter))
    assert isinstance(err, AdapterError)
    assert "--fan-in-fan-out" in str(err) and "stream-tv[transformers]" in str(err)
    assert got[0] in str(err)
