"""``stream-tv apply --method``: task vectors, fine-tuned models and LoRA adapters as inputs,
through the real CLI, against references.

- every kind of input gives the bytes of its task vector as ``extract`` / ``lora-delta``
  write it, for every method, at any chunk size and on a rerun;
- a TIES merge of three LoRA adapters in one command, bit for bit a float64 reference;
- an input's kind is read (adapter_config.json, our index, --kind) and refused where the
  values contradict it; bad parameters and inputs of another base are one message each,
  before any tensor data is read;
- ``verify`` re-plans what the index records;
- against mergekit 0.1.5 itself (``mergekit-yaml``'s own code path, on tiny Llama
  checkpoints): task_arithmetic, ties and breadcrumbs within 4 ulps of the output dtype,
  and where not, why (magnitude ties at a threshold; float32 sign elections of a sum that
  rounds to 0); dare_* statistically: kept fraction, rescaling and mean.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_tensors, save_checkpoint
from safetensors.torch import load_file
from test_merging import (
    MERGEKIT_TENSORS,
    mergekit_python,
    needs_mergekit,
    reference_deltas,
    reference_merge,
    same_bytes,
    ulps,
)

from stream_tv import merging as M
from stream_tv import synthetic
from stream_tv.cli import cli
from stream_tv.cli.apply import KIND_NAMES, METHOD_NAMES
from stream_tv.commands.apply_inputs import KINDS
from stream_tv.errors import EXIT_BAD_INPUT

Q = ["-q", "--device", "cpu"]
WEIGHTS = [1.0, 0.5, 0.7]
SPECS = {  # CLI options and the same merge as merge_spec keyword arguments
    "task_arithmetic": (["--lambda", "0.8"], {"lam": 0.8}),
    "ties": (["--density", "0.5", "--density", "0.3", "--density", "0.9"], {"density": [0.5, 0.3, 0.9]}),
    "dare_ties": (["--density", "0.4", "--seed", "3"], {"density": 0.4, "seed": 3}),
    "dare_linear": (["--density", "0.4", "--rescale", "density"], {"density": 0.4, "rescale": "density"}),
    "breadcrumbs": (["--density", "0.5", "--gamma", "0.05"], {"density": 0.5, "gamma": 0.05}),
    "breadcrumbs_ties": (["--density", "0.6", "--gamma", "0.1"], {"density": 0.6, "gamma": 0.1}),
    "della": (["--density", "0.5", "--epsilon", "0.2"], {"density": 0.5, "epsilon": 0.2}),
    "della_linear": (["--density", "0.3", "--epsilon", "0.1", "--lambda", "2"], {"density": 0.3, "epsilon": 0.1, "lam": 2.0}),
}  # fmt: skip


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args):
    r = run(*args)
    assert r.exit_code == 0, r.output
    return r


def scales(weights=WEIGHTS) -> list[str]:
    return [x for w in weights for x in ("--scale", str(w))]


def finetune(base: dict, seed: int, spread: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v.double() + spread * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(
            v.dtype
        )
        for k, v in base.items()
    }


def write_llamas(root: Path, dtype: torch.dtype, spread: float) -> dict:
    """A tiny Llama base, three fine-tunes of it, three LoRA adapters for it."""
    cfg = synthetic.llama_config(hidden=64, layers=2, vocab=256, dtype=dtype)
    synthetic.write_base(root / "base", cfg, seed=0)
    base = load_tensors(root / "base")
    made = {"root": root, "base": root / "base", "tensors": base, "fts": [], "adapters": []}
    for i in range(3):
        d = root / f"ft{i}"
        save_checkpoint(d, finetune(base, 10 + i, spread))
        (d / "config.json").write_text((root / "base" / "config.json").read_text())
        made["fts"].append(d)
        synthetic.write_adapter(root / f"lora{i}", cfg, rank=4, alpha=8, seed=i + 1)
        made["adapters"].append(root / f"lora{i}")
    return made


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict:
    """bf16 models, and each input's task vector as extract / lora-delta write it."""
    made = write_llamas(tmp_path_factory.mktemp("llamas"), torch.bfloat16, 2e-3)
    root = made["root"]
    made["tvs"], made["deltas"] = [], []
    for i in range(3):
        ok("extract", made["base"], made["fts"][i], "-o", root / f"tv{i}", *Q)
        ok("lora-delta", made["adapters"][i], "--base", made["base"], "-o", root / f"ld{i}", *Q)
        made["tvs"].append(root / f"tv{i}")
        made["deltas"].append(root / f"ld{i}")
    return made


def test_cli_methods_and_kinds_are_the_librarys():
    assert list(METHOD_NAMES) == list(M.METHODS)
    assert list(KIND_NAMES) == list(KINDS)


# ---- every kind of input: the bytes of its task vector ---------------------------------------


@pytest.mark.parametrize("method", list(SPECS))
def test_models_and_adapters_give_the_bytes_of_their_task_vectors(llamas, tmp_path, method):
    """A fine-tuned model (its task vector on the fly) and an adapter (its delta on the fly)
    merge exactly as their extract / lora-delta outputs do, at any chunk size, on a rerun."""
    opts = SPECS[method][0]
    b = llamas["base"]
    mixed = [llamas["fts"][0], llamas["adapters"][1], llamas["tvs"][2]]
    kinds = ["--kind", "finetuned", "--kind", "auto", "--kind", "auto"]
    tvs = [llamas["tvs"][0], llamas["deltas"][1], llamas["tvs"][2]]
    r = ok(
        "apply",
        b,
        *mixed,
        *kinds,
        "--method",
        method,
        *opts,
        *scales(),
        "-o",
        tmp_path / "a",
        *Q,
        "--json",
    )
    assert json.loads(r.stdout)["kinds"] == ["finetuned", "adapter", "tv"]
    ok(
        "apply",
        b,
        *tvs,
        "--method",
        method,
        *opts,
        *scales(),
        "-o",
        tmp_path / "b",
        *Q,
        "--chunk-size",
        "3KB",
    )
    ok(
        "apply",
        b,
        *mixed,
        *kinds,
        "--method",
        method,
        *opts,
        *scales(),
        "-o",
        tmp_path / "c",
        *Q,
        "--chunk-size",
        "2KB",
    )
    ok("apply", b, *mixed, *kinds, "--method", method, *opts, *scales(), "-o", tmp_path / "a", *Q, "--overwrite")  # fmt: skip
    a, *others = (load_tensors(tmp_path / x) for x in "abc")
    for other in others:
        assert a.keys() == other.keys() == llamas["tensors"].keys()
        assert all(same_bytes(a[k], other[k]) for k in a), method
    want = M.merge_spec(method, 3, weights=WEIGHTS, **SPECS[method][1])
    taus = [load_tensors(t) for t in tvs]
    for k, base in llamas["tensors"].items():  # the float64 reference of test_merging
        if method == "task_arithmetic":
            continue  # float32 arithmetic, as today's apply (test_extract_apply)
        ref = reference_merge(want, k, base, [t.get(k) for t in taus], base.dtype)
        assert same_bytes(a[k], ref), (method, k)


def test_task_arithmetic_is_todays_apply(llamas, tmp_path):
    """The default writes what apply always wrote: base + sum(scale_i * tv_i) in float32,
    rounded once; a model or an adapter as an input is its task vector; lambda and normalize
    fold into the scales."""
    b, tvs = llamas["base"], llamas["tvs"]
    ok("apply", b, *tvs, *scales(), "-o", tmp_path / "tv", *Q)
    got = load_tensors(tmp_path / "tv")
    taus = [load_tensors(t) for t in tvs]
    for k, base in llamas["tensors"].items():
        want = base.float() + sum(w * t[k] for w, t in zip(WEIGHTS, taus, strict=True))
        assert torch.equal(got[k].float(), want.to(base.dtype).float()) or (
            ulps(got[k], want.to(base.dtype)).max() <= 1  # the order of float32 additions
        )
    ok("apply", b, *llamas["fts"], "--kind", "finetuned", *scales(), "-o", tmp_path / "ft", *Q)
    ft = load_tensors(tmp_path / "ft")
    assert all(same_bytes(ft[k], got[k]) for k in got)
    ok("apply", b, *tvs, "--scale", "1", "--scale", "3", "--scale", "0", "--normalize",
       "--lambda", "0.5", "-o", tmp_path / "norm", *Q)  # fmt: skip
    ok("apply", b, *tvs, "--scale", "0.125", "--scale", "0.375", "--scale", "0", "-o", tmp_path / "folded", *Q)  # fmt: skip
    norm, folded = load_tensors(tmp_path / "norm"), load_tensors(tmp_path / "folded")
    assert all(same_bytes(norm[k], folded[k]) for k in norm)


def test_ties_of_three_lora_adapters_in_one_command(llamas, tmp_path):
    """TIES of three adapters into the base, streamed in one command: bit for bit the float64
    reference on their lora-delta task vectors; tensors no adapter touches are the base's."""
    b = llamas["base"]
    r = ok("apply", b, *llamas["adapters"], "--method", "ties", "--density", "0.4", *scales(),
           "-o", tmp_path / "ties", *Q, "--chunk-size", "5KB")  # fmt: skip
    assert "inputs: adapter, adapter, adapter" in r.stdout
    got = load_tensors(tmp_path / "ties")
    spec = M.merge_spec("ties", 3, weights=WEIGHTS, density=0.4)
    deltas = [load_tensors(d) for d in llamas["deltas"]]
    changed = 0
    for k, base in llamas["tensors"].items():
        taus = [d.get(k) for d in deltas]
        if all(t is None for t in taus):
            assert same_bytes(got[k], base), k
            continue
        assert same_bytes(got[k], reference_merge(spec, k, base, taus, base.dtype)), k
        changed += 1
    assert changed == 8  # q_proj and v_proj of both layers, from every adapter
    r = run("verify", tmp_path / "ties", "--base", b, *(x for a in llamas["adapters"] for x in ("--task-vector", a)))  # fmt: skip
    assert r.exit_code == 0 and "identical to a recomputation from ties of" in r.stdout, r.output


def test_a_dora_adapter_with_a_prepass(tmp_path):
    """A DoRA adapter on an Embedding normalises over all rows (a prepass before the merge's
    own passes): merged on the fly, the same bytes as its lora-delta task vector."""
    from peft_fixtures import make_adapter, save_base, tiny_model

    base = save_base(tiny_model("llama", torch.bfloat16), tmp_path / "base")
    dora = make_adapter(base, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True,
                        target_modules=["embed_tokens", "q_proj"])  # fmt: skip
    lora = make_adapter(base, tmp_path / "lora", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])  # fmt: skip
    ok("lora-delta", dora, "--base", base, "-o", tmp_path / "d0", *Q)
    ok("lora-delta", lora, "--base", base, "-o", tmp_path / "d1", *Q)
    for method in ("ties", "dare_linear"):
        opts = ["--method", method, "--density", "0.5"]
        ok("apply", base, dora, lora, *opts, "-o", tmp_path / f"{method}-a", *Q, "--chunk-size", "20KB")  # fmt: skip
        ok("apply", base, tmp_path / "d0", tmp_path / "d1", *opts, "-o", tmp_path / f"{method}-b", *Q)  # fmt: skip
        a, b = load_tensors(tmp_path / f"{method}-a"), load_tensors(tmp_path / f"{method}-b")
        assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a), method


# ---- what an input is ----------------------------------------------------------------------------


def test_the_kind_is_read_not_guessed(llamas, tmp_path):
    b, ft, tv, lora = llamas["base"], llamas["fts"][0], llamas["tvs"][0], llamas["adapters"][0]
    r = run("apply", b, ft, "-o", tmp_path / "x", *Q)  # no file says what it is: a task vector
    assert r.exit_code == EXIT_BAD_INPUT
    assert "INPUT 1 looks like a fine-tuned model of the base, not a task vector" in r.stderr
    assert "--kind finetuned" in r.stderr and not (tmp_path / "x").exists()
    r = run("apply", b, tv, "--kind", "finetuned", "-o", tmp_path / "x", *Q)  # its index says
    assert r.exit_code == EXIT_BAD_INPUT and "INPUT 1 is a task vector (written by stream-tv extract" in r.stderr  # fmt: skip
    small = save_checkpoint(tmp_path / "small", load_tensors(tv))  # no index metadata
    r = run("apply", b, small, "--kind", "finetuned", "-o", tmp_path / "x", *Q)
    assert r.exit_code == EXIT_BAD_INPUT and "INPUT 1 looks like a task vector" in r.stderr
    r = run("apply", b, lora, "--kind", "tv", "-o", tmp_path / "x", *Q)
    assert r.exit_code == EXIT_BAD_INPUT and "INPUT 1 is a PEFT LoRA adapter" in r.stderr
    assert not (tmp_path / "x").exists()
    merged = tmp_path / "merged"
    ok("merge", b, lora, "-o", merged, *Q)
    r = ok("apply", b, tv, small, lora, merged, "-o", tmp_path / "y", *Q, "--json")
    assert json.loads(r.stdout)["kinds"] == ["tv", "tv", "adapter", "finetuned"]
    assert json.loads(r.stdout)["warnings"] == []
    # values neither close to the base nor small: used as the default says, with a warning
    noise = save_checkpoint(tmp_path / "noise", {k: torch.randn(v.shape) * v.float().abs().mean() for k, v in llamas["tensors"].items()})  # fmt: skip
    r = ok("apply", b, noise, "-o", tmp_path / "z", *Q)
    assert "warning: INPUT 1" in r.stderr and "--kind tv" in r.stderr
    assert "warning" not in ok("apply", b, noise, "--kind", "tv", "-o", tmp_path / "z2", *Q).stderr
    ok("apply", b, ft, "-o", tmp_path / "forced", *Q, "--force")  # as given: ft added as a tv


BAD = [
    (["--method", "ties", "--density", "0"], "ties: density 0.0 of input 1 is outside (0, 1]"),
    (["--method", "dare_ties", "--density", "1.5"], "density 1.5 of input 1 is outside (0, 1]"),
    (
        ["--method", "ties", "--density", "0.5", "--density", "0.4"],
        "ties: 2 densities for 3 inputs",
    ),  # fmt: skip
    (["--scale", "1", "--scale", "2"], "2 scales for 3 inputs"),
    (["--kind", "tv", "--kind", "tv"], "2 kinds for 3 inputs"),
    (["--method", "ties", "--gamma", "0.1"], "ties has no gamma parameter"),
    (["--method", "ties", "--seed", "1"], "ties has no seed parameter (it draws no random mask)"),
    (["--method", "dare_linear", "--epsilon", "0.1"], "dare_linear has no epsilon parameter"),
    (["--density", "0.5"], "task_arithmetic has no density parameter"),
    (["--rescale", "l1"], "task_arithmetic has no rescale parameter"),
    (["--method", "della", "--density", "0.9"], "epsilon 0.15 with density 0.9 (input 1)"),
    (["--method", "breadcrumbs", "--gamma", "1"], "gamma 1.0 of input 1 is outside [0, 1)"),
]


@pytest.mark.parametrize("opts, message", BAD, ids=[m for _, m in BAD])
def test_bad_parameters_are_one_message_before_any_data_is_read(llamas, tmp_path, monkeypatch, opts, message):  # fmt: skip
    from stream_tv.io.reader import Reader

    def no_reading(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(Reader, "read_into", no_reading)
    r = run("apply", llamas["base"], *llamas["tvs"], *opts, "-o", tmp_path / "x", *Q)
    assert r.exit_code == EXIT_BAD_INPUT, r.output
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "x").exists()


def test_inputs_of_another_base_are_refused_before_any_data_is_read(llamas, tmp_path, monkeypatch):  # fmt: skip
    from stream_tv.io.reader import Reader

    cfg = synthetic.llama_config(hidden=32, layers=2, vocab=256, dtype=torch.bfloat16)
    synthetic.write_base(tmp_path / "b2", cfg, seed=0)
    synthetic.write_adapter(tmp_path / "l2", cfg, rank=4, alpha=8)

    def no_reading(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(Reader, "read_into", no_reading)
    b = llamas["base"]
    cases = [
        (["--kind", "finetuned"], tmp_path / "b2", "shape mismatch"),
        ([], tmp_path / "l2", "belongs to this base model"),  # an adapter of another base
        (
            ["--kind", "finetuned"],
            save_checkpoint(tmp_path / "part", dict(list(llamas["tensors"].items())[1:])),
            "INPUT 2 (a fine-tuned model) and the base do not have the same float tensors",
        ),
        (
            [],
            save_checkpoint(tmp_path / "extra", {"not.in.base": torch.zeros(3)}),
            "not in the base",
        ),  # fmt: skip
    ]
    for opts, bad, message in cases:
        r = run("apply", b, llamas["tvs"][0], bad, *opts, "--method", "ties", "-o", tmp_path / "x", *Q)  # fmt: skip
        assert r.exit_code == EXIT_BAD_INPUT, r.output
        assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / "x").exists()


def test_verify_replans_the_recorded_method_and_kinds(llamas, tmp_path):
    b = llamas["base"]
    inputs = [llamas["fts"][0], llamas["adapters"][1], llamas["tvs"][2]]
    flags = [x for i in inputs for x in ("--task-vector", i)]
    for method in ("ties", "dare_ties", "della_linear"):
        out = tmp_path / method
        ok("apply", b, *inputs, "--kind", "finetuned", "--kind", "auto", "--kind", "auto",
           "--method", method, *SPECS[method][0], *scales(), "-o", out, *Q)  # fmt: skip
        meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
        assert meta["method"] == method and meta["kinds"] == ["finetuned", "adapter", "tv"]
        r = run("verify", out, "--base", b, *flags)
        assert r.exit_code == 0 and f"recomputation from {method} of" in r.stdout, r.output
    swapped = [x for i in (inputs[2], inputs[1], inputs[0]) for x in ("--task-vector", i)]
    r = run("verify", tmp_path / "ties", "--base", b, *swapped)
    assert r.exit_code != 0


# ---- against mergekit 0.1.5 ----------------------------------------------------------------------


def yaml_config(method: str, base: Path, models: list[Path], params: list[dict], top: dict, dtype: str, out_dtype: str | None) -> str:  # fmt: skip
    """A mergekit YAML config (JSON is YAML)."""
    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": p} for m, p in zip(models, params, strict=True)],
        "parameters": top,
        "dtype": dtype,
    }
    if out_dtype:
        cfg["out_dtype"] = out_dtype
    return json.dumps(cfg)


def run_mergekit_yaml(root: Path, runs: list[dict]) -> None:
    """Every run through mergekit-yaml's own code path, in one process."""
    for i, r in enumerate(runs):
        (root / f"mk{i}.yml").write_text(r.pop("yaml"))
        r["config"] = str(root / f"mk{i}.yml")
    (root / "runs.json").write_text(json.dumps(runs))
    p = subprocess.run(
        [mergekit_python(), str(MERGEKIT_TENSORS), "yaml", str(root / "runs.json")],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-3000:]


DETERMINISTIC = {  # mergekit's per-model and top parameters, our options, merge_spec's
    "task_arithmetic": (
        [{"weight": w} for w in WEIGHTS],
        {"lambda": 0.8},
        ["--lambda", "0.8"],
        {"lam": 0.8},
    ),
    "ties": (
        [{"weight": w, "density": d} for w, d in zip(WEIGHTS, [0.5, 0.3, 0.9], strict=True)],
        {},
        ["--density", "0.5", "--density", "0.3", "--density", "0.9"],
        {"density": [0.5, 0.3, 0.9]},
    ),
    "breadcrumbs": (
        [{"weight": w, "density": 0.5, "gamma": 0.05} for w in WEIGHTS],
        {},
        ["--density", "0.5", "--gamma", "0.05"],
        {"density": 0.5, "gamma": 0.05},
    ),
}


@needs_mergekit
@pytest.mark.slow
def test_deterministic_methods_through_the_cli_against_mergekit_yaml(llamas, tmp_path):
    """``stream-tv apply BASE FT1 FT2 FT3 --method M`` against mergekit on the same bf16
    models (``dtype: float32``, bf16 out): with mergekit's sorts made stable (equal
    magnitudes ranked by index, as ours), within 4 bf16 ulps (at the scale of the base and
    the result: :func:`_ulps_at_scale`) everywhere but where float32
    rounds the TIES sign election's sum to 0 (it elects +, float64 may not); with plain
    mergekit also but where a magnitude equals an input's threshold (its argsort keeps an
    arbitrary subset of those)."""
    b, fts = llamas["base"], llamas["fts"]
    runs = []
    for method, (params, top, _, _) in DETERMINISTIC.items():
        for stable in (True, False):
            out = tmp_path / f"mk-{method}-{stable}"
            y = yaml_config(method, b, fts, params, top, "float32", "bfloat16")
            runs.append({"yaml": y, "out": str(out), "stable_ties": stable})
    run_mergekit_yaml(tmp_path, runs)
    taus = [{k: f[k].float() - v.float() for k, v in llamas["tensors"].items()} for f in map(load_tensors, fts)]  # fmt: skip
    report = {}
    for method, (_, _, opts, kwargs) in DETERMINISTIC.items():
        out = tmp_path / f"ours-{method}"
        ok("apply", b, *fts, "--kind", "finetuned", "--method", method, *opts, *scales(), "-o", out, *Q, "--chunk-size", "4KB")  # fmt: skip
        ours = load_tensors(out)
        spec = M.merge_spec(method, 3, weights=WEIGHTS, **kwargs)
        for stable in (True, False):
            theirs = load_file(tmp_path / f"mk-{method}-{stable}" / "model.safetensors")
            far = elections = tied = total = 0
            worst = 0.0
            for k, base in llamas["tensors"].items():
                u = _ulps_at_scale(ours[k], theirs[k], base)
                total += u.numel()
                excuse = torch.zeros(u.numel(), dtype=torch.bool)
                if spec.method.consensus:
                    wd = reference_deltas(spec, k, base, [t[k] for t in taus])
                    near0 = wd.sum(0).abs() <= 8 * torch.finfo(torch.float32).eps * wd.abs().sum(0)
                    elections += int((near0 & (u > 4)).sum())
                    excuse |= near0
                if not stable and spec.method.sparsification is not None:
                    at = _at_threshold(spec, [t[k] for t in taus])
                    tied += int((at & ~excuse & (u > 4)).sum())
                    excuse |= at
                far += int((u[~excuse] > 4).sum())
                worst = max(worst, float(u[~excuse].max())) if bool((~excuse).any()) else worst
            report[(method, stable)] = (total, elections, tied, round(worst, 2))
            assert far == 0, (method, stable, far)
            if stable:
                assert elections <= total // 10_000 + 2, (method, elections)
    print("(method, stable sorts): elements, >4 ulps at a ~0 sign election, at a tied threshold, max ulps elsewhere:", report)  # fmt: skip
    assert report[("ties", False)][2] > 0  # bf16 task vectors do tie at the threshold


def _ulps_at_scale(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|a - b|`` in units of the output dtype's ulp at ``max(|base|, |a|, |b|)``: where the
    merged delta cancels the base, the result is near 0 and a float32 rounding of the sum is
    many of its own ulps (measured: ours -2.2e-19, mergekit's float32 exactly 0, 8320 bf16
    ulps of the result, 0 at the base's scale)."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    scale = torch.maximum(torch.maximum(x.abs(), y.abs()), base.double().abs().reshape(-1))
    ulp = torch.finfo(a.dtype).eps * torch.exp2(torch.floor(torch.log2(scale.clamp_min(1e-30))))
    return torch.where(x == y, 0.0, (x - y).abs() / ulp)


def _at_threshold(spec: M.MergeSpec, taus: list[torch.Tensor]) -> torch.Tensor:
    """Elements whose magnitude equals an input's magnitude at one of its cuts (where
    mergekit's unstable sort may keep others than ours)."""
    n = taus[0].numel()
    at = torch.zeros(n, dtype=torch.bool)
    for i, t in enumerate(taus):
        mag = t.double().abs().reshape(-1)
        desc = torch.sort(mag, descending=True).values
        d = spec.densities[i]
        if d >= 1:
            continue
        if spec.method.sparsification == M.MAGNITUDE:
            cuts = [max(1, int(d * n))]
        else:
            kept, top = int(d * n), int(spec.gammas[i] * n)
            bot = max(0, n - kept - top)
            cuts = [n - bot - kept, n - bot]
        for c in cuts:
            if 0 < c <= n:
                at |= mag == desc[c - 1]
            if 0 <= c < n:
                at |= mag == desc[c]
    return at


@pytest.fixture(scope="module")
def fp32_llamas(tmp_path_factory) -> dict:
    return write_llamas(tmp_path_factory.mktemp("llamas32"), torch.float32, 2e-3)


def _dare_stats(out: dict, base: dict, taus: list[dict], weights: list[float]) -> dict:
    """Kept fraction, mean and l1 ratio of the merged delta, and each tensor's rescale
    factor (merged delta over the weighted task vector, on kept elements; single input)."""
    delta = {k: out[k].double() - base[k].double() for k in base}
    flat = torch.cat([d.reshape(-1) for d in delta.values()])
    plain = torch.cat([sum(w * t[k].double() for w, t in zip(weights, taus, strict=True)).reshape(-1) for k in base])  # fmt: skip
    factors = []
    if len(taus) == 1:
        for k, d in delta.items():
            t = taus[0][k].double() * weights[0]
            kept = (d != 0) & (t != 0)
            if int(kept.sum()) >= 1000:
                dk, tk = d[kept], t[kept]
                f = float((dk * tk).sum() / (tk * tk).sum())
                # one factor per tensor: what is left is the float32 rounding of the output
                room = 4 * torch.finfo(torch.float32).eps * (out[k].double().abs() + base[k].double().abs())[kept]  # fmt: skip
                assert bool(((dk - f * tk).abs() <= room + 1e-30).all()), k
                factors.append(f)
    return {
        "kept": (flat != 0).double().mean().item(),
        "mean": flat.mean().item(),
        "l1": (flat.abs().sum() / plain.abs().sum()).item(),
        "factors": factors,
    }


DARE = {
    "dare_linear": (0.3, WEIGHTS),
    "dare_ties": (0.5, WEIGHTS),
    "dare_linear-1": (0.3, [1.0]),  # one input: the rescale alone
}


@needs_mergekit
@pytest.mark.slow
def test_dare_through_the_cli_agrees_statistically_with_mergekit_yaml(fp32_llamas, tmp_path):
    """dare_linear and dare_ties of fp32 models (mergekit: torch's generator, 3 seeds; ours:
    counter-based masks, 6 seeds): kept fraction, l1 ratio and mean of the merged delta
    agree within 6 standard errors; one input at density d keeps d of it (5 sigma) and
    rescales each tensor's kept elements by one factor, ||tau||_1 / ||kept||_1 (mergekit's
    l1 rescale, 1/d on average), in both tools. Ours is the same bytes on a rerun and at
    another chunk size."""
    m, b = fp32_llamas, fp32_llamas["base"]
    base = m["tensors"]
    taus = [{k: f[k] - v for k, v in base.items()} for f in map(load_tensors, m["fts"])]
    runs = []
    for name, (d, w) in DARE.items():
        method = name.split("-")[0]
        fts = m["fts"][: len(w)]
        y = yaml_config(method, b, fts, [{"weight": x, "density": d} for x in w], {}, "float32", None)  # fmt: skip
        for s in range(3):
            runs.append({"yaml": y, "out": str(tmp_path / f"mk-{name}-{s}"), "seed": s})
    run_mergekit_yaml(tmp_path, runs)
    for name, (d, w) in DARE.items():
        method = name.split("-")[0]
        fts = m["fts"][: len(w)]
        ours, theirs = [], []
        for s in range(6):
            out = tmp_path / f"ours-{name}-{s}"
            ok("apply", b, *fts, "--kind", "finetuned", "--method", method, "--density", d, "--seed", s, *scales(w), "-o", out, *Q)  # fmt: skip
            ours.append(_dare_stats(load_tensors(out), base, taus[: len(w)], w))
        for s in range(3):
            got = load_file(tmp_path / f"mk-{name}-{s}" / "model.safetensors")
            theirs.append(_dare_stats(got, base, taus[: len(w)], w))
        for key in ("kept", "mean", "l1"):
            a = torch.tensor([x[key] for x in ours], dtype=torch.float64)
            c = torch.tensor([x[key] for x in theirs], dtype=torch.float64)
            se = math.sqrt(a.var().item() / len(a) + c.var().item() / len(c))
            slack = 1e-5 * abs(c.mean().item()) + 1e-12
            assert abs(a.mean().item() - c.mean().item()) <= 6 * se + slack, (name, key, a, c)
        if len(w) == 1:
            n = sum(v.numel() for v in base.values())
            kept = sum(x["kept"] for x in ours) / len(ours)
            assert abs(kept - d) < 5 * math.sqrt(d * (1 - d) / (n * len(ours))), kept
            for stats in (ours, theirs):
                assert all(abs(x["l1"] - 1) < 1e-4 for x in stats)  # the l1 norm is kept
                f = torch.tensor([f for x in stats for f in x["factors"]])
                assert abs(f.mean().item() * d - 1) < 0.02, f  # 1/d on average
    out = tmp_path / "ours-dare_ties-0"
    again = tmp_path / "again"
    ok("apply", b, *m["fts"], "--kind", "finetuned", "--method", "dare_ties", "--density", 0.5, "--seed", 0, *scales(), "-o", again, *Q, "--chunk-size", "3KB")  # fmt: skip
    x, y = load_tensors(out), load_tensors(again)
    assert all(same_bytes(x[k], y[k]) for k in x)
