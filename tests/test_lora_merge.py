"""LoRA merges bit for bit like PEFT's ``merge_and_unload()``, chunk by chunk.

Each case builds a tiny real model with ``transformers``, an adapter with ``peft``
(``init_lora_weights=False``), and PEFT's merged model on disk. The test then streams every
base tensor through its :class:`TensorMerge` in row chunks of 1, 2, 3, 7 rows and whole, with
plain torch (what the engine does), and compares with ``torch.equal``.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("peft")
pytest.importorskip("transformers")

import peft_fixtures as pf  # noqa: E402

from stream_tv.errors import AdapterError  # noqa: E402
from stream_tv.io.index import load_checkpoint  # noqa: E402
from stream_tv.lora import Adapter, MergePlan, TensorMerge  # noqa: E402
from stream_tv.lora import delta as D  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CASES = pf.CASES
CHUNKS = (1, 2, 3, 7, None)  # None: the whole tensor in one chunk


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    return lambda name: pf.build_case(name, tmp_path_factory)


def read(spec) -> torch.Tensor:
    with safe_open(str(spec.file), framework="pt") as f:
        return f.get_tensor(spec.name)


def stream(plan: MergePlan, chunk: int | None, precision: str = "exact-peft") -> dict:
    """What the engine does: every base tensor, in row chunks, through its TensorMerge."""
    plan.check(precision)
    out = {}
    for o in plan.outputs:
        tm = plan.merges.get(o.key)
        if tm is None:
            out[o.key] = read(o.spec).to(o.dtype)
            continue
        out[o.key] = merge_tensor(tm, read(tm.merge_inputs[0]), chunk, precision)
    return out


def ranges(rows: int, chunk: int | None):
    size = chunk or rows
    return [(s, min(s + size, rows)) for s in range(0, rows, size)]


def merge_tensor(tm: TensorMerge, src: torch.Tensor, chunk, precision="exact-peft") -> torch.Tensor:
    rng = ranges(tm.rows, chunk)
    res = torch.empty(tm.shape, dtype=tm.dtype)
    with tm.open("cpu") as rt:
        if tm.passes == 2:
            for s, e in rng:
                rt.prepass(src[s:e], s, e, precision=precision)
        for s, e in rng:
            got = rt.merge_rows(src[s:e], s, e, res[s:e], precision=precision)
            assert got.data_ptr() == res[s:e].data_ptr()
    return res


def assert_same(reference: dict, got: dict, label: str = ""):
    assert set(got) == set(reference), label
    bad = [k for k in reference if not torch.equal(reference[k], got[k])]
    assert not bad, f"{label}: {len(bad)} tensors differ from PEFT, e.g. {bad[:3]}"


# ---- bit-exact, every feature x dtype x chunk size -----------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_merge_is_bit_exact_like_peft(build, name):
    b = build(name)
    plan = Adapter.load(b.adapter).bind(load_checkpoint(b.base))
    reference = pf.read_tensors(b.merged)
    base = pf.read_tensors(b.base)
    changed = [k for k in reference if not torch.equal(reference[k], base[k])]
    assert changed, "the adapter must change the model, or the test proves nothing"
    assert set(plan.merges) >= set(changed)
    for chunk in CHUNKS:
        assert_same(reference, stream(plan, chunk), f"{name} chunk={chunk}")


def test_features_are_really_exercised(build):
    """The cases cover what they claim: kinds, passes, replacements, ties, biases."""

    def plan(name):
        b = build(name)
        return Adapter.load(b.adapter).bind(load_checkpoint(b.base))

    p = plan("gpt2-fp32-conv1d")
    layouts = {m.name: (m.kind, m.layout) for m in p.modules}
    assert layouts["transformer.h.0.attn.c_proj"] == ("conv1d", "model definition")  # square
    assert p.basis.startswith("the model definition (GPT2LMHeadModel")
    assert layouts["transformer.h.0.attn.c_attn"] == ("conv1d", "model definition")
    p = plan("gpt2-fp32-conv1d-dora")
    assert {t.passes for t in p} == {2}
    p = plan("llama-fp32-embedding-dora")
    assert p.merges["model.embed_tokens.weight"].passes == 2
    assert p.merges["model.layers.0.self_attn.q_proj.weight"].passes == 1
    p = plan("llama-fp32-tied-embedding-and-head")
    tm = p.merges["model.embed_tokens.weight"]
    assert [s.module.name for s in tm.steps] == ["model.embed_tokens", "lm_head"]
    assert p.targets()["lm_head"] == "model.embed_tokens.weight"
    p = plan("llama-bf16-modules-to-save")
    assert p.merges["lm_head.weight"].replacement is not None
    assert not p.merges["lm_head.weight"].steps
    p = plan("starcoder2-fp16-lora-bias")
    bias = p.merges["model.layers.0.self_attn.q_proj.bias"]
    assert [s.target for s in bias.steps] == ["bias"]
    p = plan("gpt2-bf16-bias-all")
    assert p.merges["transformer.h.0.ln_1.bias"].replacement is not None
    p = plan("llama-bf16-embedding")
    assert p.merges["model.embed_tokens.weight"].rounds_more_than_once


def test_module_records_match_peft_layers(build):
    """rank, alpha and scaling per module, as PEFT's loaded layers have them."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    b = build("llama-fp16-rslora-patterns")
    adapter = Adapter.load(b.adapter)
    model = PeftModel.from_pretrained(pf.load_base(b.base), b.adapter)
    layers = {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }
    assert set(layers) == set(adapter.module_names)
    ranks = set()
    for m in adapter.modules:
        layer = layers[m.name]
        assert (m.rank, m.alpha, m.scaling) == (
            layer.r["default"],
            layer.lora_alpha["default"],
            layer.scaling["default"],
        ), m.name
        ranks.add(m.rank)
    assert ranks == {2, 6, 8}


# ---- the effective delta --------------------------------------------------------------------


def test_delta_rows_float32_is_peft_delta_and_float64_is_reference(build):
    b = build("gpt2-fp32-conv1d")
    plan = Adapter.load(b.adapter).bind(load_checkpoint(b.base))
    reference = pf.read_tensors(b.merged)
    factors = pf.read_tensors(b.adapter)
    for key, tm in plan.merges.items():
        (step,) = tm.steps
        m = step.module
        A = factors[m.keys["A"]].double()
        B = factors[m.keys["B"]].double()
        d64 = (B @ A) * m.scaling
        if m.fan_in_fan_out:
            d64 = d64.T
        with tm.open("cpu") as rt:
            got64 = torch.cat(
                [rt.delta_rows(s, e, dtype=torch.float64) for s, e in ranges(tm.rows, 3)]
            )
            got32 = torch.cat([rt.delta_rows(s, e) for s, e in ranges(tm.rows, 2)])
        assert got64.dtype == torch.float64
        assert torch.allclose(got64, d64, rtol=1e-12, atol=1e-15), key
        w = read(tm.spec)
        assert torch.equal(D.add_rounding_once(w, got32, torch.empty_like(w)), reference[key]), key


@pytest.mark.parametrize(
    "name", ["llama-fp32-dora", "gpt2-fp32-conv1d-dora", "llama-fp32-embedding-dora"]
)
def test_dora_delta_rows_against_float64_formula(build, name):
    b = build(name)
    plan = Adapter.load(b.adapter).bind(load_checkpoint(b.base))
    factors = pf.read_tensors(b.adapter)
    reference = pf.read_tensors(b.merged)
    for key, tm in plan.merges.items():
        (step,) = tm.steps
        m = step.module
        assert tm.needs_base
        w = read(tm.spec)
        rng = ranges(tm.rows, 7)
        with tm.open("cpu") as rt:
            if tm.passes == 2:
                with pytest.raises(RuntimeError, match="prepass"):
                    rt.delta_rows(0, 2, w_rows=w[0:2])
                for s, e in rng:
                    rt.prepass(w[s:e], s, e)
            got = torch.cat(
                [rt.delta_rows(s, e, w_rows=w[s:e], dtype=torch.float64) for s, e in rng]
            )
            got32 = torch.cat([rt.delta_rows(s, e, w_rows=w[s:e]) for s, e in rng])
        A = factors[m.keys["A"]].double()
        B = factors[m.keys["B"]].double()
        mag = factors[m.keys["magnitude"]].double()
        W = w.double()
        if m.kind == "linear":
            V = W + (B @ A) * m.scaling
            ref = (mag / torch.linalg.vector_norm(V, dim=1))[:, None] * V - W
        else:  # conv1d / embedding: stored (in, out) / (vocab, dim)
            V = W + ((B @ A) * m.scaling).T
            ref = (mag / torch.linalg.vector_norm(V, dim=0))[None, :] * V - W
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12), key
        # float32 delta: base + delta lands on PEFT's merge up to float32 rounding
        assert torch.allclose((w.double() + got32.double()), reference[key].double(), atol=1e-5)


def test_delta_without_base_plan(build):
    b = build("gpt2-fp32-conv1d")
    plan = Adapter.load(b.adapter).bind(None)
    assert plan.base is None and plan.untouched == []
    tm = plan.merges["transformer.h.0.attn.c_attn.weight"]
    assert tm.shape == (48, 144) and tm.dtype == torch.float32  # Conv1D layout from fan_in_fan_out
    assert tm.merge_inputs == [] and not tm.needs_base
    with_base = Adapter.load(b.adapter).bind(load_checkpoint(b.base))
    tb = with_base.merges["transformer.h.0.attn.c_attn.weight"]
    with tm.open("cpu") as rt, tb.open("cpu") as rb:
        assert torch.equal(rt.delta_rows(0, 48), rb.delta_rows(0, 48))
    dora = build("llama-fp32-dora")
    with pytest.raises(AdapterError, match="DoRA.*depends on the base"):
        Adapter.load(dora.adapter).bind(None)
    mts = build("llama-bf16-modules-to-save")
    with pytest.raises(AdapterError, match="full tensors"):
        Adapter.load(mts.adapter).bind(None)


# ---- precision -----------------------------------------------------------------------------


def test_fp32_precision_equals_exact_for_linear(build):
    b = build("llama-bf16-linear")
    plan = Adapter.load(b.adapter).bind(load_checkpoint(b.base))
    assert_same(stream(plan, 5), stream(plan, 5, precision="fp32"))


@pytest.mark.parametrize("name", ["llama-bf16-embedding", "llama-bf16-embedding-dora"])
def test_fp32_precision_rounds_once(build, name):
    """PEFT rounds an Embedding delta to bf16 before adding it; fp32 rounds the sum once, which
    is never further from the float64 truth."""
    b = build(name)
    plan = Adapter.load(b.adapter).bind(load_checkpoint(b.base))
    tm = plan.merges["model.embed_tokens.weight"]
    w = read(tm.spec)
    exact = merge_tensor(tm, w, 7)
    once = merge_tensor(tm, w, 7, precision="fp32")
    assert torch.equal(exact, pf.read_tensors(b.merged)["model.embed_tokens.weight"])
    with tm.open("cpu") as rt:
        if tm.passes == 2:
            for s, e in ranges(tm.rows, 50):
                rt.prepass(w[s:e], s, e)
        d32 = rt.delta_rows(0, tm.rows, w_rows=w)
    if not tm.steps[0].dora:
        assert torch.equal(once, (w.float() + d32).to(w.dtype))
        assert not torch.equal(once, exact)
    truth = w.double() + d32.double()
    assert (once.double() - truth).abs().max() <= (exact.double() - truth).abs().max()


# ---- several adapters -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def two_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    base = pf.save_base(pf.tiny_model("llama", BF16, tie=True), root / "base")
    a1 = pf.make_adapter(
        base,
        root / "a1",
        seed=1,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "lm_head", "embed_tokens"],
    )
    a2 = pf.make_adapter(
        base,
        root / "a2",
        seed=2,
        r=2,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "up_proj", "lm_head"],
    )
    return root, base, a1, a2


@pytest.mark.parametrize("weights", [None, (0.7, 0.3), (1.0, -0.45)])
def test_combined_adapters_like_peft_sequential_merge(two_adapters, weights):
    root, base, a1, a2 = two_adapters
    name = "m" + "_".join(map(str, weights or ("none",)))
    reference = pf.read_tensors(pf.peft_merge(base, [a1, a2], root / name, weights=weights))
    ck = load_checkpoint(base)
    w1, w2 = weights or (1.0, 1.0)
    plan = MergePlan.combine([(Adapter.load(a1).bind(ck), w1), (Adapter.load(a2).bind(ck), w2)])
    q = plan.merges["model.layers.0.self_attn.q_proj.weight"]
    assert [s.adapter_index for s in q.steps] == [0, 1]
    emb = plan.merges["model.embed_tokens.weight"]
    assert [(s.module.name, s.adapter_index) for s in emb.steps] == [
        ("model.embed_tokens", 0),
        ("lm_head", 0),
        ("lm_head", 1),
    ]
    for chunk in (2, 7, None):
        assert_same(reference, stream(plan, chunk), f"weights={weights} chunk={chunk}")
    # fp32: one rounding instead of one per adapter; differs from PEFT somewhere in bf16
    fp32 = stream(plan, 7, precision="fp32")
    assert any(not torch.equal(fp32[k], reference[k]) for k in reference)


def test_dora_after_another_adapter_on_the_same_module(build, tmp_path):
    """PEFT unmerges a module's earlier adapters to find the base of a later DoRA layer's
    norm, and merges them back: reproduced bit for bit for plain LoRA before row-wise DoRA."""
    b = build("llama-fp32-dora")
    ck = load_checkpoint(b.base)
    plain = build("llama-fp32-linear")
    p1 = Adapter.load(plain.adapter).bind(ck)
    p2 = Adapter.load(b.adapter).bind(ck)
    combined = MergePlan.combine([(p1, 1.0), (p2, 1.0)])
    combined.check("exact-peft")
    reference = pf.read_tensors(pf.peft_merge(b.base, [plain.adapter, b.adapter], tmp_path / "m"))
    for chunk in (3, None):
        assert_same(reference, stream(combined, chunk), f"chunk={chunk}")
    MergePlan.combine([(p2, 1.0), (p1, 1.0)]).check("exact-peft")  # DoRA first is fine
    twice = MergePlan.combine([(p2, 1.0), (p2, 0.5)])
    with pytest.raises(AdapterError, match="DoRA layer .* follows another adapter"):
        twice.check("exact-peft")
    twice.check("fp32")


def test_two_row_normalising_dora_layers_refused(build):
    b = build("llama-bf16-embedding-dora")
    ck = load_checkpoint(b.base)
    p = Adapter.load(b.adapter).bind(ck)
    with pytest.raises(AdapterError, match="more than two passes"):
        MergePlan.combine([(p, 1.0), (Adapter.load(b.adapter).bind(ck), 0.5)])


def test_combine_refuses_other_bases_and_two_modules_to_save(build):
    a = build("llama-bf16-modules-to-save")
    g = build("gpt2-fp32-conv1d")
    pa = Adapter.load(a.adapter).bind(load_checkpoint(a.base))
    pg = Adapter.load(g.adapter).bind(load_checkpoint(g.base))
    with pytest.raises(AdapterError, match="different bases"):
        MergePlan.combine([(pa, 1.0), (pg, 1.0)])
    with pytest.raises(AdapterError, match="replaced by saved tensors of several adapters"):
        MergePlan.combine([(pa, 1.0), (Adapter.load(a.adapter).bind(load_checkpoint(a.base)), 1.0)])


# ---- other PEFT paths -------------------------------------------------------------------------


def test_eva_initialised_adapter_merges_like_plain(build, tmp_path):
    """init_lora_weights="eva" only initialises A and B; PEFT loads the saved factors over it
    and leaves the base alone, so the merge is the standard one."""
    b = build("llama-bf16-linear")
    eva = pf.edit_adapter_config(b.adapter, tmp_path / "eva", init_lora_weights="eva")
    reference = pf.read_tensors(pf.peft_merge(b.base, [eva], tmp_path / "merged"))
    assert_same(pf.read_tensors(b.merged), reference)
    plan = Adapter.load(eva).bind(load_checkpoint(b.base))
    assert_same(reference, stream(plan, 3))


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("dora", [False, True])
def test_conv2d_like_peft(tmp_path, dtype, dora):
    base, adapter, merged = pf.conv_case(tmp_path, dtype=dtype, use_dora=dora)
    plan = Adapter.load(adapter).bind(load_checkpoint(base))
    kinds = {m.name: m.kind for m in plan.modules}
    assert kinds == {"conv1": "conv2d", "conv2": "conv2d"}
    reference = pf.read_tensors(merged)
    for chunk in (1, 3, None):
        assert_same(reference, stream(plan, chunk), f"chunk={chunk}")


def test_square_layout_without_the_model_definition(build, monkeypatch):
    """Without facts (transformers not installed), a square GPT-2 c_proj is refused unless
    config.json's model_type or a --fan-in-fan-out pattern settles it; the adapter's
    fan_in_fan_out flag and the other modules' layouts are never used."""
    b = build("gpt2-fp32-conv1d")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    ck = load_checkpoint(b.base)
    adapter = Adapter.load(b.adapter)
    with pytest.raises(AdapterError, match="square base weights") as e:
        adapter.bind(ck, config={})
    assert "'transformer.h.0.attn.c_proj'" in str(e.value) and "no config.json" in str(e.value)
    assert "--fan-in-fan-out" in str(e.value) and "stream-tv[transformers]" in str(e.value)
    for config, layouts, how in (
        ({"model_type": "gpt2"}, None, "model_type=gpt2"),
        ({}, {r"attn\.c_proj": True}, "--fan-in-fan-out"),
    ):
        plan = adapter.bind(ck, config=config, layouts=layouts)
        m = {x.name: x for x in plan.modules}["transformer.h.0.attn.c_proj"]
        assert (m.kind, m.layout) == ("conv1d", how)
        assert plan.basis == "name rules (transformers is not installed)"
        assert_same(pf.read_tensors(b.merged), stream(plan, 4))
    nested = {"model_type": "encoder-decoder", "decoder": {"model_type": "gpt2"}}
    with pytest.raises(AdapterError, match="model types \\['encoder-decoder', 'gpt2'\\]"):
        adapter.bind(ck, config=nested)
    plan = adapter.bind(ck, config={}, layouts={"c_proj": False})  # wrong, but said
    assert {x.name: x.kind for x in plan.modules}["transformer.h.0.attn.c_proj"] == "linear"


def test_bind_reads_only_headers_and_load_is_lazy(build, monkeypatch):
    b = build("llama-bf16-linear")
    import safetensors

    opened = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: opened.append(a) or real(*a, **k))
    plan = Adapter.load(b.adapter).bind(load_checkpoint(b.base))
    assert opened == []
    tm = next(iter(plan))
    with tm.open("cpu") as rt:
        assert len(opened) == 1
        assert all(f["A"].dtype == torch.float32 for f in rt.factors)
    assert rt.factors == []


def test_adapter_summary_fields(build):
    b = build("starcoder2-fp16-lora-bias")
    a = Adapter.load(b.adapter)
    assert a.config.lora_bias and a.config.r == 4
    m = a.module("model.layers.0.mlp.c_fc")
    assert (m.kind, m.rank, m.alpha, m.scaling, m.lora_bias) == ("linear", 4, 8, 2.0, True)
    assert m.out_features == pf.INTERMEDIATE and m.in_features == pf.HIDDEN
    assert "adapter" in repr(a).lower() and math.isfinite(m.scaling)
