"""The streamed randomized SVD (stream_tv.lowrank) against exact float64 references.

References: ``torch.linalg.svd`` in float64 on the whole tensor (the optimal truncated SVD,
Eckart-Young), ``||T - L_r||`` computed in float64 from the returned factors, PEFT's own
delta formulas (through ``stream_tv.lora.delta``, which is tested bit for bit against PEFT)
and PEFT itself (``PeftModel.from_pretrained`` + ``merge_and_unload``).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import save_checkpoint
from safetensors.torch import save_file

from stream_tv import engine
from stream_tv.errors import InputError, NonFiniteError
from stream_tv.io.index import load_checkpoint
from stream_tv.lora import delta as D
from stream_tv.lowrank import (
    StreamedSVD,
    default_oversample,
    lora_rank_config,
    orthonormalize_,
    peft_lora_tensors,
    tensor_seed,
)
from stream_tv.ops import round_to


def feed(T: torch.Tensor, rank: int, chunk_rows: int = 37, **kw) -> StreamedSVD:
    """Stream ``T`` through a StreamedSVD in row chunks, pass after pass."""
    svd = StreamedSVD(T.shape[0], T[0].numel(), rank=rank, **kw)
    for p in range(svd.passes):
        for a in range(0, T.shape[0], chunk_rows):
            b = min(a + chunk_rows, T.shape[0])
            svd.update(T[a:b].float(), a, b, p)
    assert svd.done
    return svd


def exact_energies(T: torch.Tensor) -> list[float]:
    t = T.double().reshape(T.shape[0], -1)
    s = torch.linalg.svdvals(t)
    return [0.0] + (torch.cumsum(s**2, 0) / t.square().sum()).tolist()


def worst_relative_gap(res, exact: list[float], upto: int) -> float:
    """max over r of (exact - ours) / exact; also checks ours never beats the optimum."""
    gaps = []
    for r in range(1, upto + 1):
        assert res.energies[r] <= exact[r] + 1e-6, (r, res.energies[r], exact[r])
        gaps.append((exact[r] - res.energies[r]) / exact[r])
    return max(gaps)


def planted(m: int, n: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    """A rank-``rank`` matrix with singular values 1 .. 1e-2 plus Gaussian noise of Frobenius
    norm ``noise`` (the signal's is ~1.3): a task vector with a spectrum and a tail."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -2, rank, dtype=torch.float64)
    e = torch.randn(m, n, generator=g, dtype=torch.float64)
    return (u * s) @ v.T + noise * e / e.norm()


# -- quality against the exact truncated SVD ------------------------------------------------


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.5, 1.0])
def test_planted_low_rank_energy_within_1e3_of_exact(noise):
    T = planted(300, 200, 12, noise)
    res = feed(T, 16, power_iters=2).result()
    gap = worst_relative_gap(res, exact_energies(T), 16)
    assert gap < 1e-3, gap
    if noise == 0.0:  # exactly rank 12: everything is captured at rank 12
        assert res.retained_energy(12) > 1 - 1e-6


def test_subspace_iteration_is_worse_than_krylov_on_a_flat_tail():
    """Why krylov is the default: same passes, measured on a noisy planted matrix."""
    T = planted(300, 200, 12, 1.0)
    exact = exact_energies(T)
    hmt = worst_relative_gap(
        feed(T, 16, power_iters=2, oversample=8, krylov=False).result(), exact, 16
    )
    kry = worst_relative_gap(feed(T, 16, power_iters=2, oversample=8).result(), exact, 16)
    assert kry < hmt / 3, (kry, hmt)


def test_energy_identity_holds_for_the_returned_factors():
    """retained_energy(r) = 1 - ||T - U_r S_r V_r^T||^2 / ||T||^2, measured in float64."""
    T = planted(150, 90, 10, 0.7, seed=3)
    for krylov in (True, False):
        res = feed(T, 12, power_iters=1, krylov=krylov).result()
        norm2 = T.square().sum().item()
        for r in (1, 5, 12):
            u, s, v = res.factors(r)
            L = (u.double() * s) @ v.double().T
            direct = 1 - (T - L).square().sum().item() / norm2
            assert abs(direct - res.retained_energy(r)) < 2e-6, (krylov, r)
            assert abs(res.relative_error(r) - (T - L).norm().item() / norm2**0.5) < 1e-5


@pytest.fixture(scope="module")
def finetuned_task_vectors():
    """Task vectors of a tiny random Llama after 5 full AdamW steps on random tokens."""
    warnings.filterwarnings("ignore")
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=192,
        intermediate_size=528,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = tf.LlamaForCausalLM(cfg)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        ids = torch.randint(0, cfg.vocab_size, (4, 32))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ft = model.state_dict()
    return {k: ft[k].double() - base[k].double() for k in base if base[k].dim() == 2}


def test_finetuned_tiny_llama_energy_within_1e3_of_exact(finetuned_task_vectors):
    gaps = {}
    for name, T in finetuned_task_vectors.items():
        res = feed(T, 8, chunk_rows=97, power_iters=2, seed=tensor_seed(0, name)).result()
        gaps[name] = worst_relative_gap(res, exact_energies(T), 8)
    assert len(gaps) == 16
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] < 1e-3, (worst, gaps[worst])


def test_result_independent_of_chunking(finetuned_task_vectors):
    T = finetuned_task_vectors["model.layers.0.mlp.up_proj.weight"]  # 528 x 192
    runs = [feed(T, 8, chunk_rows=c).result() for c in (1, 7, 64, 528)]
    ref = runs[-1]

    def low_rank(res):
        u, s, v = res.factors(8)
        return (u.double() * s) @ v.double().T

    L_ref = low_rank(ref)
    for res in runs[:-1]:
        torch.testing.assert_close(res.singular_values, ref.singular_values, rtol=1e-5, atol=0)
        L = low_rank(res)
        assert (L - L_ref).norm() / L_ref.norm() < 1e-5
        assert max(abs(a - b) for a, b in zip(res.energies, ref.energies, strict=True)) < 1e-6


def test_deterministic_for_a_seed():
    T = planted(120, 80, 6, 0.5)
    a, b = feed(T, 6, seed=5).result(), feed(T, 6, seed=5).result()
    assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    assert torch.equal(a.singular_values, b.singular_values)
    c = feed(T, 6, seed=6).result()
    assert not torch.equal(a.U, c.U)
    assert abs(a.retained_energy(6) - c.retained_energy(6)) < 1e-3


def test_exact_when_the_sketch_spans_every_column():
    T = planted(100, 20, 20, 0.0)
    svd = feed(T, 4, oversample=16)  # block of 20 = all columns
    res = svd.result()
    assert svd.passes == 2 and res.power_iters == 0
    exact = exact_energies(T)
    assert max(abs(a - b) for a, b in zip(res.energies, exact, strict=True)) < 1e-6
    # Krylov stops iterating once its basis would span every column: 3 blocks of 8 >= 20.
    svd = StreamedSVD(100, 20, rank=4, oversample=4, power_iters=5)
    assert (svd.power_iters, svd.passes, svd.basis) == (2, 6, 20)


def test_rank_is_capped_by_the_shape():
    res = feed(planted(10, 30, 5, 0.1), 64).result()
    assert res.rank == 10 and res.U.shape == (10, 10) and res.V.shape == (30, 10)
    assert res.retained_energy(10) > 1 - 1e-6
    assert res.select_rank(rank=64) == 10


def test_zero_tensor():
    res = feed(torch.zeros(40, 30), 4).result()
    assert res.total_energy == 0.0
    assert res.retained_energy(4) == 1.0 and res.relative_error(4) == 0.0
    assert res.select_rank(energy=0.9) == 0
    assert torch.isfinite(res.U).all() and torch.isfinite(res.V).all()


def test_nonfinite_chunk_is_reported_with_the_tensor_name():
    T = torch.ones(20, 10)
    T[3, 4] = float("nan")
    svd = StreamedSVD(20, 10, rank=2, name="model.x.weight")
    with pytest.raises(NonFiniteError, match="model.x.weight"):
        svd.update(T, 0, 20, 0)


def test_chunks_must_arrive_pass_by_pass_in_row_order():
    svd = StreamedSVD(20, 10, rank=2)
    T = torch.randn(20, 10)
    with pytest.raises(RuntimeError, match="expected rows from 0 of pass 0"):
        svd.update(T[5:10], 5, 10, 0)
    svd.update(T[:10], 0, 10, 0)
    with pytest.raises(RuntimeError, match="pass 1"):
        svd.update(T[10:], 10, 20, 1)
    with pytest.raises(RuntimeError, match="incomplete"):
        svd.result()
    with pytest.raises(RuntimeError, match="columns"):
        svd.update(torch.randn(10, 11), 10, 20, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rows": 0, "cols": 3, "rank": 1},
        {"rows": 3, "cols": 3, "rank": 0},
        {"rows": 3, "cols": 3, "rank": 1, "oversample": -1},
        {"rows": 3, "cols": 3, "rank": 1, "dtype": torch.bfloat16},
    ],
)
def test_bad_options_raise_input_errors(kwargs):
    with pytest.raises(InputError):
        StreamedSVD(**kwargs)


# -- rank selection -------------------------------------------------------------------------


def test_rank_selection_by_rank_and_by_energy():
    T = planted(200, 120, 5, 0.0)  # exactly rank 5, singular values 1 .. 1e-2
    res = feed(T, 10).result()
    exact = exact_energies(T)
    assert res.select_rank(rank=7) == 7
    r90 = res.select_rank(energy=0.9)
    assert exact[r90] >= 0.9 > exact[r90 - 1]
    assert res.select_rank(energy=0.99999) == 5  # s_5^2 is 9e-5 of the total
    assert res.select_rank(energy=0.99999, max_rank=3) == 3  # capped
    assert res.select_rank(energy=1.0) <= 10
    levels = res.summary(5)["rank_for_energy"]
    assert [levels[k] for k in ("0.5", "0.9", "0.99")] == [
        next(r for r, e in enumerate(exact) if e >= x) for x in (0.5, 0.9, 0.99)
    ]
    noisy = feed(planted(200, 120, 5, 3.0), 4).result()  # most energy in the tail
    assert noisy.rank_for_energy(0.99) is None
    assert noisy.summary(4)["rank_for_energy"]["0.99"] is None
    with pytest.raises(InputError):
        res.select_rank()
    with pytest.raises(InputError):
        res.select_rank(rank=3, energy=0.5)
    with pytest.raises(InputError):
        res.select_rank(rank=3, max_rank=4)
    with pytest.raises(InputError, match="larger --rank"):
        res.select_rank(rank=11)
    with pytest.raises(InputError):
        res.select_rank(energy=1.5)
    with pytest.raises(InputError):
        res.factors(11)


def test_summary_is_json_ready():
    res = feed(planted(60, 40, 4, 0.2), 4).result()
    s = json.loads(json.dumps(res.summary(3, leading=2)))
    assert s["rank"] == 3 and len(s["singular_values"]) == 2 and s["shape"] == [60, 40]
    assert abs(s["retained_energy"] + s["relative_error"] ** 2 - 1) < 1e-12


# -- the thin QR ----------------------------------------------------------------------------


def test_tsqr_is_orthonormal_and_spans_the_columns():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 7, generator=g, dtype=torch.float64)
    a[:, 3] = a[:, 0] * 1e-9 + a[:, 1]  # nearly dependent
    a[:, 5] = 0.0  # rank deficient
    q = orthonormalize_(a.clone(), block_elements=7 * 64)  # 15 row blocks + a merged tail
    torch.testing.assert_close(q.T @ q, torch.eye(7, dtype=torch.float64), atol=1e-12, rtol=0)
    ref = torch.linalg.qr(a[:, [0, 1, 2, 4, 6]]).Q
    # every column of a lies in span(q)
    assert (a - q @ (q.T @ a)).norm() < 1e-10 * a.norm()
    assert (ref - q @ (q.T @ ref)).norm() < 1e-10
    f = a.float().clone()
    q32 = orthonormalize_(f, block_elements=7 * 64)
    assert q32.dtype == torch.float32
    # the float64 basis rounded once to float32: orthonormal to a few float32 ulps, measured in
    # float64 (a float32 product of 1000-long columns adds its own ~1e-6, which CPUs differ in)
    q64 = q32.double()
    torch.testing.assert_close(q64.T @ q64, torch.eye(7, dtype=torch.float64), atol=5e-7, rtol=0)


# -- PEFT tensors ---------------------------------------------------------------------------


def _factors(rows, cols, r, seed=0):
    T = planted(rows, cols, r, 0.0, seed=seed)
    res = feed(T, r).result()
    u, s, v = res.factors(r)
    return T, u, s, v, (u.double() * s) @ v.double().T


@pytest.mark.parametrize("split", ["sqrt", "A", "B"])
def test_peft_tensors_linear_and_conv1d_give_L_in_peft_formula(split):
    rows, cols, r = 300, 80, 6
    _, u, s, v, L = _factors(rows, cols, r)
    t = peft_lora_tensors("linear", u, s, v, weight_shape=(rows, cols), split=split)
    A, B = t["lora_A.weight"], t["lora_B.weight"]
    assert A.shape == (r, cols) and B.shape == (rows, r)  # (r, in), (out, r)
    d = D.linear_delta_rows(A, B, 1.0, 0, rows)
    torch.testing.assert_close(d.double(), L, atol=1e-6 * L.abs().max().item(), rtol=0)
    # transformers' Conv1D stores (in, out): the stored rows are the inputs
    t = peft_lora_tensors("conv1d", u, s, v, weight_shape=(rows, cols), split=split)
    A, B = t["lora_A.weight"], t["lora_B.weight"]
    assert A.shape == (r, rows) and B.shape == (cols, r)
    d = D.linear_delta_rows(A, B, 1.0, 0, rows, fan_in_fan_out=True)
    torch.testing.assert_close(d.double(), L, atol=1e-6 * L.abs().max().item(), rtol=0)


def test_peft_tensors_embedding_and_conv2d():
    vocab, dim, r = 300, 40, 5
    _, u, s, v, L = _factors(vocab, dim, r)
    t = peft_lora_tensors("embedding", u, s, v, weight_shape=(vocab, dim))
    A, B = t["lora_embedding_A"], t["lora_embedding_B"]
    assert A.shape == (r, vocab) and B.shape == (dim, r)
    d = D.embedding_delta_rows(A, B, 1.0, 0, vocab)  # (B @ A).T
    torch.testing.assert_close(d.double(), L, atol=1e-6 * L.abs().max().item(), rtol=0)

    shape = (16, 4, 3, 3)
    T = planted(16, 36, 3, 0.0, seed=2).reshape(shape)
    res = feed(T, 3).result()
    u, s, v = res.factors(3)
    t = peft_lora_tensors("conv2d", u, s, v, weight_shape=shape)
    A, B = t["lora_A.weight"], t["lora_B.weight"]
    assert A.shape == (3, 4, 3, 3) and B.shape == (16, 3, 1, 1)
    d = D.conv2d_delta_rows(A, B, 1.0, 0, 16)  # PEFT's F.conv2d formula
    torch.testing.assert_close(d.double(), T, atol=1e-5 * T.abs().max().item(), rtol=0)


def test_sqrt_split_balances_the_factors_and_rounds_once():
    _, u, s, v, L = _factors(400, 120, 4)
    t = peft_lora_tensors("linear", u, s, v, weight_shape=(400, 120), dtype=torch.bfloat16)
    A, B = t["lora_A.weight"], t["lora_B.weight"]
    assert A.dtype == B.dtype == torch.bfloat16 and A.is_contiguous() and B.is_contiguous()
    # row i of A and column i of B both have norm sqrt(s_i)
    torch.testing.assert_close(A.double().norm(dim=1), s.sqrt(), rtol=1e-2, atol=0)
    torch.testing.assert_close(B.double().norm(dim=0), s.sqrt(), rtol=1e-2, atol=0)
    err = ((B.double() @ A.double()) - L).norm() / L.norm()
    assert err < 1e-2  # bf16 factors: ~2**-8 relative
    # one correct rounding of the float64 product, not float64 -> float32 -> bf16
    assert torch.equal(A, round_to(s.sqrt()[:, None] * v.double().T, torch.bfloat16))


def test_peft_tensors_refuse_mismatched_shapes():
    _, u, s, v, _ = _factors(50, 20, 3)
    with pytest.raises(InputError, match="do not factor"):
        peft_lora_tensors("linear", u, s, v, weight_shape=(20, 50))
    with pytest.raises(InputError, match="unknown layer kind"):
        peft_lora_tensors("conv3d", u, s, v, weight_shape=(50, 20))
    with pytest.raises(InputError):
        peft_lora_tensors("conv2d", u, s, v, weight_shape=(50, 20))


def test_rank_config_patterns_resolve_in_peft():
    from peft.utils.other import get_pattern_key

    ranks = {
        "model.layers.1.self_attn.q_proj": 8,
        "model.layers.11.self_attn.q_proj": 8,
        "model.layers.1.mlp.up_proj": 3,
        "model.layers.0.self_attn.q_proj": 5,
    }
    cfg = lora_rank_config(ranks)
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["rank_pattern"] == cfg["alpha_pattern"]
    for name, r in ranks.items():
        key = get_pattern_key(cfg["rank_pattern"].keys(), name)
        assert cfg["rank_pattern"].get(key, cfg["r"]) == r, name
    assert (
        get_pattern_key(cfg["rank_pattern"].keys(), "model.layers.1Xmlp.up_proj")
        not in cfg["rank_pattern"]
    )
    with pytest.raises(InputError):
        lora_rank_config({"a": 0})


def test_peft_loads_and_merges_the_extracted_adapter(tmp_path):
    """Factors -> adapter files -> PeftModel.from_pretrained -> merge_and_unload = base + L."""
    warnings.filterwarnings("ignore")
    import transformers as tf
    from peft import PeftModel

    tf.logging.set_verbosity_error()
    torch.manual_seed(1)
    cfg = tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=32,
    )
    base = tf.LlamaForCausalLM(cfg)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    targets = {  # module -> (kind, rank): different ranks exercise rank_pattern
        "model.embed_tokens": ("embedding", 6),
        "model.layers.0.self_attn.q_proj": ("linear", 4),
        "model.layers.1.self_attn.q_proj": ("linear", 4),
        "model.layers.1.mlp.down_proj": ("linear", 7),
    }
    tensors, expected, ranks = {}, {}, {}
    for i, (module, (kind, r)) in enumerate(targets.items()):
        w = base_sd[module + ".weight"]
        T = planted(w.shape[0], w.shape[1], r + 3, 0.3, seed=i) * 0.05
        res = feed(T, r).result()
        u, s, v = res.factors(r)
        for suffix, x in peft_lora_tensors(kind, u, s, v, weight_shape=w.shape).items():
            tensors[f"base_model.model.{module}.{suffix}"] = x
        expected[module + ".weight"] = w.double() + (u.double() * s) @ v.double().T
        ranks[module] = r
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(tensors, adapter / "adapter_model.safetensors", {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        # full names: by suffix, q_proj would also catch the untargeted layers' modules
        "target_modules": sorted(targets),
        "layers_to_transform": None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        **lora_rank_config(ranks),
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    model = PeftModel.from_pretrained(tf.LlamaForCausalLM.from_pretrained(base_dir), adapter)
    merged = model.merge_and_unload().state_dict()
    for name, w in base_sd.items():
        if name in expected:
            # float32 W + L, one rounding (embedding: two): within a few float32 ulps
            torch.testing.assert_close(merged[name].double(), expected[name], rtol=0, atol=1e-6)
        elif name in merged:
            assert torch.equal(merged[name], w), name


# -- the engine drives it ----------------------------------------------------------------------


def test_engine_multipass_task_streams_the_task_vector(tmp_path, finetuned_task_vectors):
    """A Task with ``passes = svd.passes`` through engine.run, chunk = finetuned - base."""
    name = "model.layers.0.mlp.gate_proj.weight"
    tv = finetuned_task_vectors[name].float()
    g = torch.Generator().manual_seed(0)
    base_w = torch.randn(tv.shape, generator=g).to(torch.bfloat16)
    ft_w = (base_w.float() + tv).to(torch.bfloat16)
    save_checkpoint(tmp_path / "b", {name: base_w})
    save_checkpoint(tmp_path / "f", {name: ft_w})
    specs = [load_checkpoint(tmp_path / d)[name] for d in ("b", "f")]
    svd = StreamedSVD(tv.shape[0], tv.shape[1], rank=8, name=name)
    seen = []

    def compute(chunk):
        b, f = chunk.inputs
        seen.append((chunk.pass_index, chunk.start, chunk.stop))
        svd.update(f.float() - b.float(), chunk.start, chunk.stop, chunk.pass_index)

    task = engine.Task(name, specs, compute, passes=svd.passes, finish=svd.result)
    stats = engine.run(
        [task], device=torch.device("cpu"), chunk_bytes=100 * 192 * 2 * 2, progress=False
    )
    res = stats.results[name]
    assert len({s for s in seen if s[0] == 0}) > 3  # really in several chunks
    T = ft_w.double() - base_w.double()
    assert worst_relative_gap(res, exact_energies(T), 8) < 1e-3


# -- CUDA: same code, the chunks' device -------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    T = planted(700, 300, 10, 0.5)
    cpu = feed(T, 8, chunk_rows=128).result()
    svd = StreamedSVD(700, 300, rank=8)
    Tc = T.float().cuda()
    for p in range(svd.passes):
        for a in range(0, 700, 128):
            svd.update(Tc[a : a + 128], a, min(a + 128, 700), p)
    gpu = svd.result()
    assert gpu.U.device.type == "cuda"
    assert max(abs(a - b) for a, b in zip(gpu.energies, cpu.energies, strict=True)) < 1e-6
    # subtle: float32 singular values carry an absolute error of a few eps * sigma_max (the
    # backward error of the factorisation), not a relative one: the tail's small values
    # (noise, ~0.016 here) differ between two float32 GEMM libraries by up to 2.5e-6 on an
    # H200 (1.6e-4 relative). So: 64 eps * sigma_max absolute, 1e-5 relative beyond that.
    eps32 = torch.finfo(torch.float32).eps
    atol = 64 * eps32 * float(cpu.singular_values[0])
    torch.testing.assert_close(gpu.singular_values.cpu(), cpu.singular_values, rtol=1e-5, atol=atol)
    L_cpu = (cpu.U.double() * cpu.singular_values[:8]) @ cpu.V.double().T
    L_gpu = (gpu.U.double().cpu() * gpu.singular_values[:8]) @ gpu.V.double().cpu().T
    assert (L_gpu - L_cpu).norm() / L_cpu.norm() < 1e-5


def test_default_oversample():
    assert (
        default_oversample(1) == 64
        and default_oversample(16) == 64
        and default_oversample(40) == 80
    )
