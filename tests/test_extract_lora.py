"""``stream-tv extract-lora`` end to end, on tiny real models built here.

References: the exact truncated SVD (``torch.linalg.svdvals`` in float64 of the whole task
vector, the optimum by Eckart-Young), the retained energy measured from the adapter's stored
factors in float64, PEFT itself (``PeftModel.from_pretrained`` + ``merge_and_unload``), and
``stream-tv merge`` / ``compare`` on the adapter written.

Models: a Llama whose fine-tune is a planted low-rank change plus noise on every Linear
(one MLP left unchanged, the norms moved), a Llama after a few real AdamW steps, a Qwen2 with
tied embeddings and q/k/v biases, and a GPT-2 (Conv1D layers, LayerNorms with biases, a tied
head), the last two also fine-tuned by AdamW.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from click.testing import CliRunner
from conftest import load_tensors

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import stream_tv  # noqa: E402
from stream_tv import RunOptions  # noqa: E402
from stream_tv.cli import cli  # noqa: E402
from stream_tv.errors import InputError, MismatchError, OutputError  # noqa: E402
from stream_tv.lora import Adapter  # noqa: E402

CPU = RunOptions(device="cpu", progress=False)
warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()


# ---- models ---------------------------------------------------------------------------------


def _llama(hidden=64, layers=2, vocab=256, tie=False):
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg)


def _adamw(model, steps: int, vocab: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, 32), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _planted(m: int, n: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    """Rank ``rank`` with singular values 1 .. 1e-2 plus Gaussian noise of norm ``noise``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -2, rank, dtype=torch.float64)
    e = torch.randn(m, n, generator=g, dtype=torch.float64)
    return ((u * s) @ v.T + noise * e / e.norm()) * 0.05


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Base Llama; fine-tune = base + planted rank-6 + noise on every Linear and Embedding
    weight but layer 1's MLP, norms moved."""
    root = tmp_path_factory.mktemp("planted")
    torch.manual_seed(0)
    model = _llama()
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "layers.1.mlp" in name:
                continue
            if p.dim() == 2:
                p += _planted(*p.shape, 6, 0.3, seed=i).float()
            else:
                p += 0.01
    model.save_pretrained(root / "ft")
    return root


@pytest.fixture(scope="module")
def adamw(tmp_path_factory):
    """A Llama after 20 real AdamW steps (a flat spectrum: the hard case), large enough that
    the sketch spans far fewer columns than the tensors have at ranks up to 32."""
    root = tmp_path_factory.mktemp("adamw")
    torch.manual_seed(1)
    model = _llama(hidden=512, vocab=2048)
    model.save_pretrained(root / "base")
    _adamw(model, 20, 2048)
    model.save_pretrained(root / "ft")
    return root


@pytest.fixture(scope="module")
def qwen_tied(tmp_path_factory):
    """A Qwen2 with tied embeddings and q/k/v biases, after 3 AdamW steps."""
    root = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(2)
    cfg = transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    model = transformers.Qwen2ForCausalLM(cfg)
    model.save_pretrained(root / "base")
    _adamw(model, 3, 128)
    model.save_pretrained(root / "ft")
    return root


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(root / "base")
    _adamw(model, 3, 128)
    model.save_pretrained(root / "ft")
    return root


# ---- references ----------------------------------------------------------------------------------


def task_vectors(root) -> dict[str, torch.Tensor]:
    b, f = load_tensors(root / "base"), load_tensors(root / "ft")
    return {k: f[k].double() - b[k].double() for k in b}


def exact_energies(t: torch.Tensor) -> list[float]:
    s = torch.linalg.svdvals(t.double())
    return [0.0] + (torch.cumsum(s**2, 0) / t.double().square().sum()).tolist()


def stored_delta(adapter, module: str) -> torch.Tensor:
    """``B @ A`` from the adapter's file, float64, in the stored weight's layout (PEFT's
    formulas: Embedding and Conv1D deltas are transposed)."""
    t = load_tensors(adapter / "adapter_model.safetensors")
    p = f"base_model.model.{module}."
    if p + "lora_embedding_A" in t:
        return (t[p + "lora_embedding_B"].double() @ t[p + "lora_embedding_A"].double()).T
    d = t[p + "lora_B.weight"].double() @ t[p + "lora_A.weight"].double()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    return d.T if cfg["fan_in_fan_out"] else d


def peft_merged(cls, root, adapter) -> dict[str, torch.Tensor]:
    base = cls.from_pretrained(root / "base")
    model = peft.PeftModel.from_pretrained(base, adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def run(*args: object):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r


def ok(*args: object):
    r = run(*args)
    assert r.exit_code == 0, r.output
    return r


# ---- quality against the exact truncated SVD ---------------------------------------------------


def _check_energies(root, adapter, report: dict, upto: int) -> float:
    """Every tensor's energy at every rank 1..upto within 1e-3 (relative) of the optimum, never
    above it, and the energy at the chosen rank equal to what the stored factors keep."""
    tvs = task_vectors(root)
    worst = 0.0
    for t in report["tensors"]:
        T = tvs[t["name"]]
        exact = exact_energies(T)
        ours = t["energy_by_rank"]
        for r in range(1, min(upto, len(ours) - 1) + 1):
            assert ours[r] <= exact[r] + 1e-6, (t["name"], r)
            worst = max(worst, (exact[r] - ours[r]) / exact[r])
        if adapter is not None and t["rank"]:
            L = stored_delta(adapter, t["module"])
            kept = 1 - (T - L).square().sum().item() / T.square().sum().item()
            assert abs(kept - t["retained_energy"]) < 1e-5, t["name"]
    assert worst < 1e-3, worst
    return worst


def test_planted_low_rank_energy_within_1e3_of_exact(planted, tmp_path):
    out, rep = tmp_path / "ad", tmp_path / "r.json"
    stream_tv.extract_lora(planted / "base", planted / "ft", out, rank=8, report=rep, options=CPU)
    report = json.loads(rep.read_text())
    names = {t["name"] for t in report["tensors"]}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert not any("layers.1.mlp" in n for n in names)  # unchanged: skipped
    assert sum("layers.1.mlp" in n for n in report["unchanged"]) == 3
    _check_energies(planted, out, report, 8)
    for t in report["tensors"]:  # rank 6 + noise 0.3 of 1.3: rank 6 keeps ~95%
        assert t["retained_energy"] > 0.9 and t["rank_for_energy"]["0.5"] <= 6


@pytest.mark.parametrize("rank", [1, 8, 32])
def test_adamw_finetune_energy_within_1e3_of_exact(adamw, tmp_path, rank):
    """--power-iters 2 (the default) and the default oversample: every rank 1..r within 1e-3
    of the optimum (the reason oversample defaults to max(64, 2r): see default_oversample)."""
    rep = tmp_path / "r.json"
    stream_tv.extract_lora(
        adamw / "base", adamw / "ft", None, rank=rank, dry_run=True, report=rep, options=CPU
    )
    report = json.loads(rep.read_text())
    assert len(report["tensors"]) == 16  # 14 projections, embedding, head
    q = next(t for t in report["tensors"] if t["name"].endswith("0.self_attn.q_proj.weight"))
    assert q["basis"] < q["shape"][1] and q["power_iters"] == 2  # not the exact SVD in disguise
    _check_energies(adamw, None, report, rank)


def test_energy_mode_picks_ranks_per_tensor_and_peft_loads_them(adamw, tmp_path):
    out, cap = tmp_path / "ad", 40
    r = stream_tv.extract_lora(
        adamw / "base", adamw / "ft", out, energy=0.2, max_rank=cap, options=CPU
    )
    ranks = {t.module: t.rank for t in r.report.tensors}
    assert len(set(ranks.values())) > 2 and r.config["rank_pattern"]
    tvs = task_vectors(adamw)
    below = [t for t in r.report.tensors if t.rank < cap]
    assert len(below) > 8
    for t in below:  # the smallest rank reaching 0.2 of the energy; by the optimum, within 1
        exact = exact_energies(tvs[t.name])
        assert t.retained_energy >= 0.2 > t.energy_by_rank[t.rank - 1]
        assert abs(next(i for i, e in enumerate(exact) if e >= 0.2) - t.rank) <= 1
    for t in r.report.tensors:  # the cap, and what it keeps, said
        assert t.rank < cap or t.retained_energy < 0.2 or t.energy_by_rank[cap - 1] < 0.2
    model = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(adamw / "base"), out
    )
    loaded = {
        n.removeprefix("base_model.model."): m.r["default"]
        for n, m in model.named_modules()
        if isinstance(getattr(m, "r", None), dict) and "default" in m.r
    }
    assert loaded == ranks


# ---- PEFT loads and merges it: exactly base + L as stream-tv merge writes it ------------------------


CASES = {  # fixture, class, extract options
    "llama-planted": ("planted", "LlamaForCausalLM", {}),
    "qwen-tied-lora": ("qwen_tied", "Qwen2ForCausalLM", {}),
    "qwen-tied-full": ("qwen_tied", "Qwen2ForCausalLM", {"embeddings": "full"}),
    "gpt2": ("gpt2", "GPT2LMHeadModel", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_merge_equals_stream_tv_merge(case, request, tmp_path):
    fixture, cls_name, kw = CASES[case]
    root = request.getfixturevalue(fixture)
    cls = getattr(transformers, cls_name)
    out, merged = tmp_path / "ad", tmp_path / "merged"
    r = stream_tv.extract_lora(root / "base", root / "ft", out, rank=4, options=CPU, **kw)
    stream_tv.merge_lora(root / "base", out, merged, options=CPU)
    ours, theirs = load_tensors(merged), peft_merged(cls, root, out)
    assert set(ours) <= set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), case
    ft = load_tensors(root / "ft")
    whole = {s["name"] for s in r.report.saved}
    for k in whole:  # saved whole: exactly the fine-tuned tensor
        assert torch.equal(ours[k], ft[k]), k
    if fixture != "planted":  # AdamW moves every bias and norm: none is dropped
        assert not r.report.left_out and whole
    if case == "qwen-tied-lora":
        assert r.config["bias"] == "lora_only"
        assert "model.embed_tokens" in r.config["target_modules"]
    if case == "qwen-tied-full":  # both tied modules saved: the merged head is the fine-tune's
        assert {"model.embed_tokens", "lm_head"} <= set(r.config["modules_to_save"])
        assert torch.equal(ours["lm_head.weight"], ft["model.embed_tokens.weight"])
    if case == "gpt2":
        assert r.config["fan_in_fan_out"] is True
        assert {t.kind for t in r.report.tensors} == {"conv1d", "embedding"}


def test_cli_merge_and_compare_run_on_the_adapter(planted, tmp_path):
    b, f, ad = planted / "base", planted / "ft", tmp_path / "ad"
    r = ok(
        "extract-lora",
        b,
        f,
        "-o",
        ad,
        "--rank",
        6,
        "--report",
        tmp_path / "r.json",
        "--device",
        "cpu",
        "-q",
    )
    assert "model.layers.*.self_attn.q_proj" in r.output and "-> " in r.output
    ok("merge", b, ad, "-o", tmp_path / "m", "--device", "cpu", "-q")
    ok(
        "compare",
        "--base",
        b,
        "--finetuned",
        f,
        "--adapter",
        ad,
        "--json",
        tmp_path / "c.json",
        "--device",
        "cpu",
        "-q",
    )
    ours = {t["name"]: t for t in json.loads((tmp_path / "r.json").read_text())["tensors"]}
    theirs = {t["name"]: t for t in json.loads((tmp_path / "c.json").read_text())["tensors"]}
    for name, t in ours.items():  # compare measures ||L - T|| / ||T|| from the stored factors
        assert abs(theirs[name]["relative_error"] - t["relative_error"]) < 1e-5, name
    assert Adapter.load(ad).config.r == 6


# ---- streaming ---------------------------------------------------------------------------------------


def test_result_does_not_depend_on_the_chunk_size(planted, tmp_path):
    runs = []
    for i, chunk in enumerate(["1KB", None]):
        opts = RunOptions(device="cpu", progress=False, chunk_size=chunk)
        out = tmp_path / f"ad{i}"
        r = stream_tv.extract_lora(planted / "base", planted / "ft", out, rank=8, options=opts)
        runs.append((r, load_tensors(out / "adapter_model.safetensors")))
    (r1, t1), (r2, t2) = runs
    assert r1.config == r2.config and set(t1) == set(t2)
    for a, b in zip(r1.report.tensors, r2.report.tensors, strict=True):
        assert (
            max(abs(x - y) for x, y in zip(a.energy_by_rank, b.energy_by_rank, strict=True)) < 1e-6
        )
        torch.testing.assert_close(a.singular_values, b.singular_values, rtol=1e-5, atol=0)
    for module in {t.module for t in r1.report.tensors}:
        d1, d2 = stored_delta(tmp_path / "ad0", module), stored_delta(tmp_path / "ad1", module)
        # subtle: the last directions lie in the noise, where singular values crowd and float
        # rounding turns the subspace; the leading ones, well separated, agree to rounding
        assert (d1 - d2).norm() / d2.norm() < 1e-3, module
        assert (top(d1, 3) - top(d2, 3)).norm() / top(d2, 3).norm() < 1e-5, module


def top(d: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def test_dry_run_writes_only_the_report(planted, tmp_path):
    out, rep = tmp_path / "never", tmp_path / "r.json"
    r = ok(
        "extract-lora",
        planted / "base",
        planted / "ft",
        "--dry-run",
        "--report",
        rep,
        "--energy",
        0.9,
        "--device",
        "cpu",
        "-q",
    )
    assert not out.exists() and "dry run: no adapter written" in r.output
    report = json.loads(rep.read_text())
    assert report["adapter"] is None and report["tensors"]
    assert set(report["by_module"]) >= {"model.layers.*.self_attn.q_proj", "model.embed_tokens"}
    assert set(report["by_layer"]) >= {"model.layers.0", "model.layers.1"}
    t = report["tensors"][0]
    assert set(t) >= {
        "rank",
        "retained_energy",
        "relative_error",
        "singular_values",
        "rank_for_energy",
        "energy_by_rank",
        "parameters",
    }
    assert math.isclose(t["relative_error"], math.sqrt(1 - t["retained_energy"]), abs_tol=1e-9)


def test_options_choose_what_is_held_and_list_what_is_not(planted, tmp_path):
    r = stream_tv.extract_lora(
        planted / "base",
        planted / "ft",
        tmp_path / "ad",
        rank=2,
        target_modules=[r"self_attn\.q_proj"],
        embeddings="skip",
        other="skip",
        options=CPU,
    )
    assert {t.group for t in r.report.tensors} == {"model.layers.*.self_attn.q_proj"}
    left = r.report.left_out
    assert left["model.layers.0.mlp.up_proj.weight"] == "not matched by --target-modules"
    assert left["model.embed_tokens.weight"] == "--embeddings skip"
    assert left["model.norm.weight"] == "--other skip"
    assert "model.layers.1.mlp.up_proj.weight" not in left  # unchanged, not "left out"
    assert r.config["modules_to_save"] is None
    assert r.config["target_modules"] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]


# ---- bad input: one message each ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "rank must be an integer of at least 1, got 0"),
        (["--energy", "0"], "energy must be in (0, 1], got 0.0"),
        (["--energy", "1.5"], "energy must be in (0, 1], got 1.5"),
        (["--rank", "4", "--energy", "0.5"], "give a rank or an energy, not both"),
        (["--rank", "4", "--max-rank", "8"], "max_rank caps an energy selection"),
        (["--target-modules", "q_proj("], "--target-modules 'q_proj(' is not a regular expression"),
    ],
)
def test_bad_options_give_one_message(planted, tmp_path, args, message):
    r = run(
        "extract-lora",
        planted / "base",
        planted / "ft",
        "-o",
        tmp_path / "ad",
        *args,
        "--device",
        "cpu",
        "-q",
    )
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "ad").exists()


def test_an_unrelated_model_gives_one_message(planted, tmp_path):
    other = tmp_path / "other"
    _llama(hidden=32).save_pretrained(other)
    r = run("extract-lora", planted / "base", other, "-o", tmp_path / "ad", "--device", "cpu")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "shape mismatch" in r.stderr and "not the same architecture" in r.stderr
    gpt = tmp_path / "gpt"
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2)
    ).save_pretrained(gpt)
    r = run("extract-lora", planted / "base", gpt, "-o", tmp_path / "ad", "--device", "cpu")
    assert r.exit_code == 2 and "do not have the same tensors" in r.stderr
    assert not (tmp_path / "ad").exists()


def test_a_task_vector_given_as_a_model_is_refused_before_any_read(planted, tmp_path):
    tv = tmp_path / "tv"
    stream_tv.extract_task_vector(planted / "base", planted / "ft", tv, options=CPU)
    for name in ("config.json",):  # a task vector keeps it as base_config.json
        (tv / name).write_bytes((planted / "base" / name).read_bytes())
    r = run("extract-lora", planted / "base", tv, "-o", tmp_path / "ad", "--device", "cpu")
    assert r.exit_code == 2 and "FINETUNED is a task vector" in r.stderr, r.stderr
    assert "--force" in r.stderr and not (tmp_path / "ad").exists()


def test_no_model_definition_is_refused_not_guessed(planted, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for p in (planted / "base").glob("*.safetensors"):
        (base / p.name).write_bytes(p.read_bytes())
    with pytest.raises(InputError, match="needs the base's model definition"):
        stream_tv.extract_lora(base, planted / "ft", tmp_path / "ad", options=CPU)


# ---- the output directory's rules ---------------------------------------------------------------


def test_output_rules(planted, tmp_path):
    b, f, out = planted / "base", planted / "ft", tmp_path / "ad"
    with pytest.raises(OutputError, match="overlaps the input"):
        stream_tv.extract_lora(b, f, b / "adapter", options=CPU)
    stream_tv.extract_lora(b, f, out, rank=2, options=CPU)
    first = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="already holds an adapter"):
        stream_tv.extract_lora(b, f, out, rank=3, options=CPU)
    r = stream_tv.extract_lora(
        b, f, out, rank=3, options=RunOptions(device="cpu", progress=False, overwrite=True)
    )
    assert r.config["r"] == 3 and (out / "adapter_model.safetensors").read_bytes() != first
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    link = tmp_path / "linked"
    link.mkdir()
    (link / "adapter_config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(OutputError, match="symbolic link"):
        stream_tv.extract_lora(b, f, link, options=CPU)
    assert not (tmp_path / "elsewhere.json").exists()


def test_an_interrupted_run_leaves_no_adapter_and_a_rerun_starts_over(
    planted, tmp_path, monkeypatch
):
    import stream_tv.commands.extract_lora as ex

    b, f, out = planted / "base", planted / "ft", tmp_path / "ad"
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = ex.peft_lora_tensors
    monkeypatch.setattr(ex, "peft_lora_tensors", boom)
    with pytest.raises(stream_tv.errors.Interrupted, match="rerun the same command"):
        stream_tv.extract_lora(b, f, out, rank=2, options=CPU)
    assert not (out / "adapter_config.json").exists()
    assert not (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / ".stream-tv").iterdir()) == ["lock", "state.json"]
    with pytest.raises(stream_tv.errors.StreamTVError, match="unfinished stream-tv output"):
        Adapter.load(out)
    monkeypatch.setattr(ex, "peft_lora_tensors", real)
    stream_tv.extract_lora(b, f, out, rank=2, options=CPU)  # no --overwrite needed
    assert Adapter.load(out).config.r == 2 and not (out / ".stream-tv").exists()


def test_nothing_to_factorise_is_refused(planted, tmp_path):
    with pytest.raises(MismatchError, match="nothing for a LoRA to hold"):
        stream_tv.extract_lora(planted / "base", planted / "base", tmp_path / "ad", options=CPU)
    assert not (tmp_path / "ad").exists()


# ---- CUDA: the same passes on the device ------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(adamw, tmp_path):
    runs = []
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        opts = RunOptions(device=device, progress=False)
        runs.append(stream_tv.extract_lora(adamw / "base", adamw / "ft", out, rank=8, options=opts))
    cpu, gpu = runs
    for a, b in zip(cpu.report.tensors, gpu.report.tensors, strict=True):
        assert (
            max(abs(x - y) for x, y in zip(a.energy_by_rank, b.energy_by_rank, strict=True)) < 1e-5
        )
    for t in cpu.report.tensors:
        d1, d2 = stored_delta(tmp_path / "cpu", t.module), stored_delta(tmp_path / "cuda", t.module)
        assert (d1 - d2).norm() / d1.norm() < 1e-4, t.name
