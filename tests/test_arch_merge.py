"""Issue 10 end to end: every architecture case of ``arch_fixtures`` through the real CLI.

``merge`` must write what PEFT's ``merge_and_unload()`` + ``save_pretrained`` wrote: the same
key set, ``torch.equal`` (and the same dtype) on every tensor, the same ``config.json`` values,
at several chunk sizes (down to the engine's 2-row minimum); ``transformers`` loads the output
with PEFT's merged logits; ``verify --base --adapter`` recomputes it with the same binding;
``lora-delta --base`` and ``compare --adapter`` bind the same way. Without the model definition
(transformers not importable) the cases the name rules cannot settle are refused, saying why.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("peft")
pytest.importorskip("transformers")

import arch_fixtures as af  # noqa: E402

from stream_tv.cli import cli  # noqa: E402

CPU = ("--device", "cpu", "-q")
TINY = ("--chunk-size", "64B")  # smaller than any row: the engine's 2-row minimum
CASES = list(af.ARCH_CASES)
# cases whose base and merged model have the same tensor names (compare pairs them by name)
SAME_NAMES = [
    n
    for n in CASES
    if n
    not in (
        "llama-lora-then-dora",  # two adapters
        "gpt2-legacy-names",
        "llama-tied-modules-to-save-lm_head",
        "llama-tied-modules-to-save-embed_tokens",
        "llama-tied-stored-head-equal",
    )
]


@pytest.fixture(scope="session")
def arch(tmp_path_factory):
    return lambda name: af.build_arch(name, tmp_path_factory)


@pytest.fixture(scope="session")
def merged(arch, tmp_path_factory):
    """Our merge of each case at the default chunk size, once per session."""
    cache: dict = {}

    def get(name):
        if name not in cache:
            b = arch(name)
            out = tmp_path_factory.mktemp(f"ours-{name}") / "out"
            r = ok("merge", b.base, *adapter_args(b), "-o", out, *CPU)
            cache[name] = (out, r.stdout)
        return cache[name]

    return get


def run(*args: object):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r


def ok(*args: object):
    r = run(*args)
    assert r.exit_code == 0, r.output
    return r


def refused(*args: object) -> str:
    r = run(*args)
    assert r.exit_code == 2 and r.stdout == "", r.output
    return r.stderr


def adapter_args(b) -> list:
    return [x for a in b.adapters for x in ("--adapter", a)]


def assert_like_peft(b, out, label: str) -> None:
    """Same key set, dtypes and bits as PEFT's saved merge, and the same config.json."""
    ref, got = af.pf.read_tensors(b.merged), af.pf.read_tensors(out)
    assert set(got) == set(ref), (
        f"{label}: extra {set(got) - set(ref)}, missing {set(ref) - set(got)}"
    )
    bad = [k for k in ref if got[k].dtype != ref[k].dtype or not torch.equal(got[k], ref[k])]
    assert not bad, f"{label}: {len(bad)} tensor(s) differ from PEFT's, e.g. {bad[:3]}"
    ours = json.loads((out / "config.json").read_text())
    peft = json.loads((b.merged / "config.json").read_text())
    assert af._config_changes(ours, peft) == {}, label
    if not b.record["config_changes"]:
        assert (out / "config.json").read_bytes() == (b.base / "config.json").read_bytes()


# ---- merge: bit-exact with PEFT, through the CLI ---------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_merge_is_pefts_at_the_default_chunk_size(arch, merged, name):
    b = arch(name)
    out, stdout = merged(name)
    assert_like_peft(b, out, name)
    assert f"from the model definition ({b.record['architecture']}" in stdout
    for key, value in (b.record["config_changes"] or {}).items():
        assert f"config.json: {key} set to {json.dumps(value[1])}" in stdout


@pytest.mark.parametrize("name", CASES)
def test_merge_is_pefts_in_two_row_chunks_and_small_shards(arch, tmp_path, name):
    b = arch(name)
    out = tmp_path / "out"
    ok("merge", b.base, *adapter_args(b), "-o", out, *CPU, *TINY, "--max-shard-size", "20KB")
    assert_like_peft(b, out, f"{name}, 2-row chunks")


@pytest.mark.parametrize(
    "name",
    [
        "qwen3-moe-target-parameters",
        "videomae-conv3d",
        "llama-tied-trainable-tokens",
        "t5-fp16-keep-fp32-wo",
    ],
)
def test_merge_is_pefts_in_mid_sized_chunks(arch, tmp_path, name):
    b = arch(name)
    out = tmp_path / "out"
    ok("merge", b.base, *adapter_args(b), "-o", out, *CPU, "--chunk-size", "3KB")
    assert_like_peft(b, out, f"{name}, 3KB chunks")


@pytest.mark.parametrize("name", CASES)
def test_transformers_loads_the_merge_with_pefts_logits(arch, merged, name):
    b = arch(name)
    out, _ = merged(name)
    model = af.load_model(b.model_class, out)
    assert torch.equal(af.run(model, b.inputs()), b.logits())


@pytest.mark.parametrize("name", CASES)
def test_verify_recomputes_the_merge(arch, merged, name):
    b = arch(name)
    out, _ = merged(name)
    r = ok("verify", out, "--base", b.base, *adapter_args(b), *CPU)
    assert "identical to a recomputation" in r.stdout, r.stdout


def test_verify_checks_the_config_updates(arch, merged, tmp_path):
    import shutil

    b = arch("llama-tied-modules-to-save-lm_head")
    out = tmp_path / "out"
    shutil.copytree(merged(b.name)[0], out)
    shutil.copy(b.base / "config.json", out / "config.json")  # tie_word_embeddings: true again
    r = run("verify", out, "--base", b.base, "--adapter", b.adapter, *CPU)
    assert r.exit_code != 0 and "config.json differs" in r.output
    assert "tie_word_embeddings" in r.output


def test_what_the_merge_says_it_did(arch, merged):
    _, stdout = merged("gpt2-legacy-names")
    assert "h.0.attn.bias: GPT2LMHeadModel drops it on load" in stdout
    _, stdout = merged("llama-tied-stored-head-equal")
    assert "lm_head.weight: equal to 'model.embed_tokens.weight'" in stdout
    t5 = arch("t5-fp16-keep-fp32-wo")
    out = merged("t5-fp16-keep-fp32-wo")[0].parent / "json"
    result = json.loads(ok("merge", t5.base, t5.adapter, "-o", out, "--json", *CPU).stdout)
    assert result["basis"].startswith("the model definition (T5ForConditionalGeneration")
    assert result["dropped"] == {} and result["config_updates"] == {}


# ---- lora-delta and compare bind the same way --------------------------------------------------


@pytest.mark.parametrize("name", [n for n in CASES if n != "llama-lora-then-dora"])
def test_lora_delta_with_base_is_the_merge_change(arch, tmp_path, name):
    """The delta, in float64, under the base's names: base + delta is PEFT's merge up to the
    merge's own roundings; verify recomputes it."""
    b = arch(name)
    out = tmp_path / "tv"
    ok("lora-delta", b.adapter, "--base", b.base, "--dtype", "fp64", "-o", out, *CPU, *TINY)
    tv, base = af.pf.read_tensors(out), af.pf.read_tensors(b.base)
    ref = af.pf.read_tensors(b.merged)
    assert tv and set(tv) <= set(base) | set(ref)
    for key, d in tv.items():
        want = ref[key] if key in ref else None
        if want is None:  # a legacy name: PEFT writes it with the class's prefix
            want = next(v for k, v in ref.items() if k.endswith("." + key))
        have = base.get(key, base.get("model.embed_tokens.weight"))
        tol = 1e-12 if want.dtype == torch.float64 else 2e-2 if want.itemsize == 2 else 1e-5
        scale = max(1.0, want.abs().max().item())
        assert (have.double() + d - want.double()).abs().max().item() <= tol * scale, key
    r = ok("verify", out, "--base", b.base, "--adapter", b.adapter, *CPU)
    assert "identical to a recomputation" in r.stdout


@pytest.mark.parametrize("name", SAME_NAMES)
def test_compare_explains_the_whole_task_vector(arch, tmp_path, name):
    b = arch(name)
    report = tmp_path / "r.json"
    ok(
        "compare",
        "--base",
        b.base,
        "--finetuned",
        b.merged,
        "--adapter",
        b.adapter,
        "--json",
        report,
        *CPU,
    )
    r = json.loads(report.read_text())
    assert r["coverage"]["changed_not_lora"] == 0, [
        t["name"] for t in r["tensors"] if t["category"] == "changed_not_lora"
    ]
    assert r["coverage"]["lora_and_changed"] >= 1
    assert r["summary"]["min_cosine"] > 0.999, r["summary"]


@pytest.mark.parametrize("name", ["vision-encoder-decoder-gpt2", "mixtral-target-parameters"])
def test_compare_against_a_task_vector_binds_with_its_config(arch, tmp_path, name):
    """A task vector (extract keeps the base's config as base_config.json, never as
    config.json) stands in for the base: the same binding, tensors it leaves out
    (--skip-unchanged) are no refusal."""
    b = arch(name)
    tv, report = tmp_path / "tv", tmp_path / "r.json"
    ok("extract", b.base, b.merged, "-o", tv, "--skip-unchanged", *CPU)
    assert (tv / "base_config.json").is_file() and not (tv / "config.json").exists()
    ok("compare", "--task-vector", tv, "--adapter", b.adapter, "--json", report, *CPU)
    r = json.loads(report.read_text())
    assert r["coverage"]["changed_not_lora"] == 0 and r["coverage"]["lora_and_changed"] >= 2
    assert r["summary"]["min_cosine"] > 0.999, r["summary"]


# ---- what each case needed: spot checks of the plans ---------------------------------------------


def test_plans_use_the_model_definition(arch):
    from stream_tv.io.index import load_checkpoint
    from stream_tv.lora import Adapter

    def plan(name):
        b = arch(name)
        return Adapter.load(b.adapter).bind(load_checkpoint(b.base))

    p = plan("vision-encoder-decoder-gpt2")
    kinds = {m.name: m.kind for m in p.modules}
    assert kinds["decoder.transformer.h.0.attn.c_proj"] == "conv1d"  # square, deep
    assert kinds["decoder.transformer.h.0.crossattention.c_proj"] == "conv1d"
    p = plan("mixtral-target-parameters")
    experts = [m for m in p.modules if m.kind == "expert"]
    assert {m.param.rpartition(".")[2] for m in experts} == {"gate_up_proj", "down_proj"}
    w3 = p.merges["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    (step,) = w3.steps
    assert (step.part.expert, step.part.dim, step.part.start, step.part.stop) == (2, 0, 24, 48)
    assert step.rounds_twice
    p = plan("siglip-multihead-attention")
    out_proj = p.merges["head.attention.out_proj.weight"]
    assert [s.rounds_twice for s in out_proj.steps] == [True, False]  # PEFT adds it twice
    p = plan("t5-embed-tokens")
    shared = p.merges["shared.weight"]
    assert [s.module.name for s in shared.steps] == ["encoder.embed_tokens", "decoder.embed_tokens"]
    p = plan("t5-fp16-keep-fp32-wo")
    wo = p.merges["decoder.block.0.layer.2.DenseReluDense.wo.weight"]
    assert wo.spec.dtype == torch.float16 and wo.dtype == wo.work_dtype == torch.float32
    p = plan("llama-fp64")
    assert {t.work_dtype for t in p} == {torch.float64}
    p = plan("mamba-tied-head")
    assert p.targets()["lm_head"] == "backbone.embeddings.weight"
    p = plan("gpt2-legacy-names")
    assert p.merges["transformer.h.0.attn.c_proj.weight"].spec.name == "h.0.attn.c_proj.weight"
    assert "h.0.attn.bias" in p.dropped


# ---- without the model definition: what the rules cannot settle is refused --------------------


@pytest.fixture
def no_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError


@pytest.mark.parametrize(
    "name, says",
    [
        ("vision-encoder-decoder-gpt2", "'decoder.transformer.h.0.attn.c_proj'"),
        ("encoder-decoder-bert-gpt2", "'decoder.transformer.h.0.attn.c_proj'"),
        ("llama-tied-modules-to-save-lm_head", "PEFT unties them"),
        ("llama-tied-modules-to-save-embed_tokens", "PEFT unties them"),
        ("llama-tied-stored-head-equal", "ties them only if the two are equal"),
        ("mixtral-target-parameters", "target_parameters"),
        ("siglip-multihead-attention", "MultiheadAttention's out_proj"),
        ("mamba-tied-head", "the name rules' guess of a tied head"),
    ],
)
def test_without_the_model_definition_refused(arch, tmp_path, no_transformers, name, says):
    b = arch(name)
    err = refused("merge", b.base, *adapter_args(b), "-o", tmp_path / "o", *CPU)
    assert says in err and "transformers is not installed" in err, err
    assert "stream-tv[transformers]" in err
    assert not (tmp_path / "o").exists()


def test_without_the_model_definition_a_pattern_settles_square_conv1d(
    arch, tmp_path, no_transformers
):
    b = arch("encoder-decoder-bert-gpt2")
    err = refused("merge", b.base, b.adapter, "-o", tmp_path / "o", *CPU)
    assert "square base weights" in err and "--fan-in-fan-out" in err
    assert "model types ['bert', 'encoder-decoder', 'gpt2']" in err
    out = tmp_path / "out"
    r = ok("merge", b.base, b.adapter, "-o", out, *CPU, "--fan-in-fan-out", r"decoder\..*c_proj")
    assert "name rules (transformers is not installed)" in r.stdout
    assert_like_peft(b, out, "with --fan-in-fan-out")
    r = ok("verify", out, "--base", b.base, "--adapter", b.adapter, *CPU)
    assert "identical to a recomputation" in r.stdout


def test_a_pattern_that_contradicts_the_model_is_refused(arch, tmp_path):
    b = arch("encoder-decoder-bert-gpt2")
    err = refused(
        "merge", b.base, b.adapter, "-o", tmp_path / "o", *CPU, "--no-fan-in-fan-out", "c_proj"
    )
    assert "--no-fan-in-fan-out says 'decoder.transformer.h.0.attn.c_proj' is a Linear" in err
    assert "defines it as Conv1D" in err


def test_float64_dora(tmp_path):
    """float64 weights: PEFT keeps the factors in float64; a Linear DoRA layer is reproduced
    bit for bit, an Embedding one (its norm runs over the vocabulary in an order torch does
    not fix for float64) is refused in exact-peft."""
    from stream_tv.errors import AdapterError
    from stream_tv.io.index import load_checkpoint
    from stream_tv.lora import Adapter

    pf = af.pf
    base = pf.save_base(pf.tiny_model("llama", torch.float64), tmp_path / "base")
    a = pf.make_adapter(
        base,
        tmp_path / "a",
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["embed_tokens", "q_proj"],
    )
    ref = pf.read_tensors(pf.peft_merge(base, [a], tmp_path / "merged"))
    plan = Adapter.load(a).bind(load_checkpoint(base))
    with pytest.raises(AdapterError, match="float64 Embedding/Conv1D"):
        plan.check("exact-peft")
    out = tmp_path / "out"
    ok("merge", base, a, "-o", out, "--precision", "fp32", *CPU, *TINY)
    got = pf.read_tensors(out)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert got[q].dtype == torch.float64 and torch.equal(got[q], ref[q])
    e = "model.embed_tokens.weight"
    assert torch.allclose(got[e], ref[e], rtol=1e-14, atol=0)


def test_the_conv1d_rules_match_transformers_source():
    """Without the model definition a square weight is a Conv1D only under these names and
    model types: the lists must hold every Conv1D transformers defines."""
    import re
    from pathlib import Path

    import transformers

    from stream_tv.lora.bind_rules import CONV1D_MODEL_TYPES, CONV1D_MODULE_NAMES

    models = Path(transformers.__file__).parent / "models"
    names, types = set(), set()
    for path in models.glob("*/modeling_*.py"):
        found = re.findall(r"self\.(\w+) = Conv1D\(", path.read_text())
        if found:
            names |= set(found)
            config = path.parent / f"configuration_{path.parent.name}.py"
            types |= set(re.findall(r'model_type = "([\w-]+)"', config.read_text()))
    assert names and names <= CONV1D_MODULE_NAMES, names
    assert types and types <= CONV1D_MODEL_TYPES, types
