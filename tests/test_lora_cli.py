"""``stream-tv merge`` and ``stream-tv lora-delta`` end to end, through click's CliRunner and
the real engine: every feature bit for bit like PEFT's saved merged model, the base in
several shards, chunks down to 2 rows, and transformers loading the output with PEFT's
logits."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("peft")
pytest.importorskip("transformers")

import peft_fixtures as pf  # noqa: E402

from stream_tv.cli import cli  # noqa: E402
from stream_tv.lora import delta as D  # noqa: E402

CPU = ("--device", "cpu", "-q")
TWO_ROWS = ("--chunk-size", "64B")  # smaller than any row: the engine's 2-row minimum


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    return lambda name: pf.build_case(name, tmp_path_factory)


def run(*args: object):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r


def ok(*args: object):
    r = run(*args)
    assert r.exit_code == 0, r.output
    return r


def bad(*args: object, match: str):
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    assert match in r.stderr, r.stderr
    return r.stderr


def index(out) -> dict:
    return json.loads((out / "model.safetensors.index.json").read_text())


def assert_same(reference: dict, got: dict, label: str = ""):
    assert set(got) == set(reference), label
    bad_keys = [k for k in reference if not torch.equal(reference[k], got[k])]
    assert not bad_keys, f"{label}: {len(bad_keys)} tensors differ from PEFT, e.g. {bad_keys[:3]}"


# ---- merge: every feature, bit for bit -----------------------------------------------------


@pytest.mark.parametrize("name", list(pf.CASES))
def test_merge_cli_bit_exact_like_peft(build, tmp_path, name):
    b = build(name)
    out = tmp_path / "out"
    r = ok("merge", b.base, b.adapter, "-o", out, *CPU, *TWO_ROWS, "--max-shard-size", "30KB")
    assert "merged model" in r.stdout and "precision exact-peft" in r.stdout
    assert_same(pf.read_tensors(b.merged), pf.read_tensors(out), name)
    meta = index(out)["metadata"]
    assert meta["operation"] == "merge" and meta["precision"] == "exact-peft"
    assert len(list(out.glob("model-*.safetensors"))) > 1
    for side in ("config.json", "generation_config.json"):
        assert (out / side).read_bytes() == (b.base / side).read_bytes()


@pytest.mark.parametrize(
    "name", ["llama-bf16-dora", "gpt2-fp16-conv1d-dora", "llama-bf16-embedding-dora"]
)
def test_merge_cli_default_chunks_and_json(build, tmp_path, name):
    b = build(name)
    out = tmp_path / "out"
    r = ok("merge", b.base, "--adapter", b.adapter, "-o", out, "--json", *CPU)
    result = json.loads(r.stdout)
    assert result["precision"] == "exact-peft" and result["merged"]
    assert_same(pf.read_tensors(b.merged), pf.read_tensors(out), name)


@pytest.mark.parametrize(
    "name",
    [
        "llama-bf16-tied-head",
        "gpt2-bf16-conv1d-tied-head",
        "starcoder2-fp16-lora-bias",
        "llama-bf16-modules-to-save",
    ],
)
def test_transformers_loads_the_output_with_peft_logits(build, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    b = build(name)
    out = tmp_path / "out"
    ok("merge", b.base, b.adapter, "-o", out, *CPU, *TWO_ROWS)
    ours = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    peft = PeftModel.from_pretrained(pf.load_base(b.base), b.adapter).merge_and_unload().eval()
    ids = torch.randint(0, pf.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, p = ours(ids).logits, peft(ids).logits
    assert a.dtype == p.dtype == pf.CASES[name].dtype
    assert torch.equal(a, p)
    base = pf.load_base(b.base)
    with torch.no_grad():
        assert not torch.equal(base(ids).logits, p)  # the adapter does change the model


# ---- several adapters, weights, precision -----------------------------------------------------


@pytest.fixture(scope="session")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-multi")
    base = pf.save_base(pf.tiny_model("gpt2", pf.BF16), root / "base", max_shard_size="40KB")
    a1 = pf.make_adapter(
        base,
        root / "a1",
        seed=3,
        r=4,
        lora_alpha=8,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj"],
    )
    a2 = pf.make_adapter(
        base,
        root / "a2",
        seed=4,
        r=2,
        lora_alpha=2,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_fc", "lm_head"],
    )
    return root, base, a1, a2


def test_merge_cli_several_adapters_with_weights(two, tmp_path):
    root, base, a1, a2 = two
    reference = pf.read_tensors(
        pf.peft_merge(base, [a1, a2], tmp_path / "peft", weights=[0.7, 0.3])
    )
    out = tmp_path / "out"
    r = ok(
        "merge",
        base,
        "--adapter",
        a1,
        "--adapter",
        a2,
        "--weight",
        "0.7",
        "--weight",
        "0.3",
        "-o",
        out,
        *CPU,
        *TWO_ROWS,
    )
    assert "(weights 0.7, 0.3)" in r.stdout
    assert_same(reference, pf.read_tensors(out))
    assert index(out)["metadata"]["weights"] == [0.7, 0.3]
    fp32 = tmp_path / "fp32"
    ok(
        "merge",
        base,
        a1,
        a2,
        "--weight",
        "0.7",
        "--weight",
        "0.3",
        "-o",
        fp32,
        "--precision",
        "fp32",
        *CPU,
    )
    got = pf.read_tensors(fp32)
    assert any(not torch.equal(got[k], reference[k]) for k in reference)  # one rounding, not two


def test_merge_cli_precision_fp32_embedding(build, tmp_path):
    b = build("llama-bf16-embedding")
    out = tmp_path / "out"
    ok("merge", b.base, b.adapter, "-o", out, "--precision", "fp32", *CPU, *TWO_ROWS)
    got, ref, base = pf.read_tensors(out), pf.read_tensors(b.merged), pf.read_tensors(b.base)
    key = "model.embed_tokens.weight"
    assert not torch.equal(got[key], ref[key])
    others = [k for k in ref if k != key]
    assert all(torch.equal(got[k], ref[k]) for k in others)  # Linear: fp32 is PEFT's merge
    assert not torch.equal(got[key], base[key])


def test_merge_cli_bad_inputs(two, tmp_path, build):
    root, base, a1, a2 = two
    out = tmp_path / "o"
    bad(
        "merge", base, a1, "--adapter", a2, "-o", out, match="either as arguments or with --adapter"
    )
    bad("merge", base, "-o", out, match="no adapter given")
    bad(
        "merge",
        base,
        a1,
        a2,
        "--weight",
        "1",
        "--weight",
        "2",
        "--weight",
        "3",
        "-o",
        out,
        match="3 weights for 2 adapters",
    )
    bad("merge", base, tmp_path / "nope", "-o", out, match="no such file")
    llama = build("llama-bf16-linear")
    msg = bad("merge", base, llama.adapter, "-o", out, match="error: ")
    assert "trained on LlamaForCausalLM" in msg and "belongs to this base" in msg
    dora = build("llama-fp32-dora")  # DoRA after DoRA on one module: PEFT's unmerge divides
    bad("merge", dora.base, dora.adapter, dora.adapter, "-o", out, *CPU, match="--precision fp32")
    assert not out.exists()


# ---- lora-delta -------------------------------------------------------------------------------


def test_lora_delta_without_base_is_pefts_delta(build, tmp_path):
    b = build("gpt2-fp32-conv1d")
    out = tmp_path / "tv"
    r = ok("lora-delta", b.adapter, "-o", out, *CPU, *TWO_ROWS)
    assert "LoRA delta (F32)" in r.stdout
    tv, base, ref = pf.read_tensors(out), pf.read_tensors(b.base), pf.read_tensors(b.merged)
    assert set(tv) == {k for k in ref if not torch.equal(ref[k], base[k])}
    for k, d in tv.items():
        assert d.dtype == torch.float32 and d.shape == base[k].shape
        assert torch.equal(D.add_rounding_once(base[k], d, torch.empty_like(base[k])), ref[k]), k
    meta = index(out)["metadata"]
    assert meta["operation"] == "lora-delta" and meta["base"] == ""


@pytest.mark.parametrize(
    "name", ["llama-bf16-linear", "llama-fp32-linear", "llama-fp16-rslora-patterns"]
)
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_lora_delta_in_cache_blocks_has_the_whole_products_bits(
    build, tmp_path, monkeypatch, name, dtype
):
    """CPU lora-delta computes a plain LoRA's chunk in blocks of whole product windows (256
    rows here, where gate/up_proj have 272): the same bits as one product per tensor, for
    every chunking, and (work dtype) what PEFT merges. (A mutation that computes a block's
    rows from the chunk's start fails it.)"""
    b = build(name)
    flags = ("--dtype", dtype) if dtype else ()
    whole = tmp_path / "whole"
    monkeypatch.setattr(D, "BLOCK_BYTES", 1 << 40)  # one block per chunk: the product whole
    ok("lora-delta", b.adapter, "--base", b.base, "-o", whole, *CPU, *flags)
    reference = pf.read_tensors(whole)
    assert D.row_blocks(0, 300, 192) == [(0, 300)]
    monkeypatch.setattr(D, "BLOCK_BYTES", 1)  # the smallest blocks: WINDOW_MIN_ROWS rows
    assert D.row_blocks(0, 300, 192) == [(0, 256), (256, 300)]
    assert max(t.shape[0] for t in reference.values()) > D.WINDOW_MIN_ROWS
    for chunking in ((), TWO_ROWS, ("--chunk-size", "20KB")):
        out = tmp_path / f"blocks{len(chunking)}{chunking[-1:]}".replace("/", "")
        ok("lora-delta", b.adapter, "--base", b.base, "-o", out, *CPU, *flags, *chunking)
        assert_same(reference, pf.read_tensors(out), f"{name} {chunking}")
    if dtype is None:  # the work dtype: PEFT's own delta, added once, is its merged weight
        base, merged = pf.read_tensors(b.base), pf.read_tensors(b.merged)
        for k, d in reference.items():
            if k in merged:
                w = base[k]
                assert torch.equal(D.add_rounding_once(w, d, torch.empty_like(w)), merged[k]), k


def test_lora_delta_float64_reference(build, tmp_path):
    b = build("llama-fp16-rslora-patterns")
    out = tmp_path / "tv64"
    ok("lora-delta", b.adapter, "--base", b.base, "--dtype", "fp64", "-o", out, *CPU)
    from stream_tv.lora import Adapter

    adapter = Adapter.load(b.adapter)
    factors = pf.read_tensors(b.adapter)
    tv = pf.read_tensors(out)
    for m in adapter.modules:
        ref = (factors[m.keys["B"]].double() @ factors[m.keys["A"]].double()) * m.scaling
        got = tv[f"{m.name}.weight"]
        assert got.dtype == torch.float64
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15), m.name


def test_lora_delta_then_apply_equals_merge(build, tmp_path):
    """A plain LoRA's float32 delta holds PEFT's bits, and apply rounds base + delta once: the
    same as PEFT's merge."""
    b = build("llama-bf16-linear")
    tv, out = tmp_path / "tv", tmp_path / "applied"
    ok("lora-delta", b.adapter, "--base", b.base, "-o", tv, *CPU, *TWO_ROWS)
    ok("apply", b.base, tv, "-o", out, *CPU)
    assert_same(pf.read_tensors(b.merged), pf.read_tensors(out))


def test_lora_delta_dora_needs_base(build, tmp_path):
    b = build("gpt2-fp32-conv1d-dora")
    bad("lora-delta", b.adapter, "-o", tmp_path / "x", *CPU, match="depends on the base")
    out = tmp_path / "tv"
    ok("lora-delta", b.adapter, "--base", b.base, "-o", out, *CPU, *TWO_ROWS)
    tv, base, ref = pf.read_tensors(out), pf.read_tensors(b.base), pf.read_tensors(b.merged)
    for k, d in tv.items():
        assert torch.allclose(base[k] + d, ref[k], atol=1e-5), k


def test_lora_delta_of_saved_tensors(build, tmp_path):
    b = build("llama-bf16-modules-to-save")
    bad("lora-delta", b.adapter, "-o", tmp_path / "x", *CPU, match="full tensors")
    out = tmp_path / "tv"
    r = ok("lora-delta", b.adapter, "--base", b.base, "-o", out, *CPU)
    assert "saved in the adapter" in r.stdout
    tv, base, ref = pf.read_tensors(out), pf.read_tensors(b.base), pf.read_tensors(b.merged)
    d = tv["lm_head.weight"]
    assert torch.equal(d, ref["lm_head.weight"].float() - base["lm_head.weight"].float())


# ---- verify recomputes merge and lora-delta outputs --------------------------------------------


def test_verify_recomputes_merge_and_lora_delta(build, tmp_path):
    b = build("llama-fp32-embedding-dora")
    out = tmp_path / "out"
    ok("merge", b.base, b.adapter, "-o", out, *CPU)
    r = ok("verify", out, "--base", b.base, "--adapter", b.adapter, "--device", "cpu", "-q")
    assert "identical to a recomputation" in r.stdout
    other = build("llama-fp32-linear")
    r = run("verify", out, "--base", b.base, "--adapter", other.adapter, "--device", "cpu", "-q")
    assert r.exit_code != 0
    tv = tmp_path / "tv"
    ok("lora-delta", b.adapter, "--base", b.base, "-o", tv, *CPU)
    r = ok("verify", tv, "--base", b.base, "--adapter", b.adapter, "--device", "cpu", "-q")
    assert "identical to a recomputation" in r.stdout
    r = run("verify", tv, "--adapter", b.adapter, "--device", "cpu", "-q")
    assert r.exit_code == 2 and "--base BASE" in r.stderr
