"""The CUDA path: run with `pytest -m cuda` on a machine with a GPU (skipped elsewhere).

Element-wise commands (extract, apply) must give the same bytes on CUDA as on CPU; merge
and compare use GPU matrix products, whose last bits may differ from CPU (documented).
"""

import pytest
import torch
from safetensors.torch import load_file

from stream_tv import RunOptions, apply_task_vectors, compare, extract_task_vector, merge_lora
from stream_tv.synthetic import llama_config, write_adapter, write_base

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("model-*.safetensors"))}


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    cfg = llama_config(hidden=256, intermediate=512, layers=2, vocab=1024, dtype=torch.bfloat16)
    write_base(root / "base", cfg, seed=0, max_shard_size=2_000_000)
    write_base(root / "ft", cfg, seed=1, max_shard_size=2_000_000)
    write_adapter(root / "adapter", cfg, rank=8)
    return root


@pytest.mark.parametrize("chunk", ["64KB", "4MB"])
def test_extract_and_apply_bytes_equal_cpu(triple, tmp_path, chunk):
    for device in ("cpu", "cuda"):
        opts = RunOptions(device=device, chunk_size=chunk, progress=False)
        extract_task_vector(triple / "base", triple / "ft", tmp_path / f"tv-{device}", options=opts)
        apply_task_vectors(
            triple / "base", [tmp_path / f"tv-{device}"], tmp_path / f"rt-{device}", options=opts
        )
    assert _files(tmp_path / "tv-cpu") == _files(tmp_path / "tv-cuda")
    assert _files(tmp_path / "rt-cpu") == _files(tmp_path / "rt-cuda")


def test_merge_and_compare_on_cuda(triple, tmp_path):
    cpu = RunOptions(device="cpu", chunk_size="256KB", progress=False)
    gpu = RunOptions(device="cuda", chunk_size="256KB", progress=False)
    merge_lora(triple / "base", triple / "adapter", tmp_path / "m-cpu", options=cpu)
    merge_lora(triple / "base", triple / "adapter", tmp_path / "m-cuda", options=gpu)
    a, b = (
        load_file(next((tmp_path / "m-cpu").glob("model-*"))),
        load_file(next((tmp_path / "m-cuda").glob("model-*"))),
    )
    for name in a:
        # at most one bf16 ulp apart: the float32 products differ in their last bits
        diff = (a[name].float() - b[name].float()).abs()
        assert bool((diff <= a[name].float().abs() * 2**-7 + 1e-30).all()), name
    r_cpu = compare(
        base=triple / "base", finetuned=tmp_path / "m-cpu", adapter=triple / "adapter", options=cpu
    )
    r_gpu = compare(
        base=triple / "base", finetuned=tmp_path / "m-cpu", adapter=triple / "adapter", options=gpu
    )
    for x, y in zip(r_cpu.tensors, r_gpu.tensors, strict=True):
        assert x.category == y.category
        if x.cosine is not None:
            assert abs(x.cosine - y.cosine) < 1e-9
            assert abs(x.relative_error - y.relative_error) <= 1e-9 * max(1.0, x.relative_error)
