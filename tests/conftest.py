"""Shared fixtures: tiny real checkpoints written with safetensors, and reading them back.

Generic on purpose, for every test module:

- ``save_checkpoint(dir, tensors, shards=N)``: a Hugging Face sharded checkpoint
  (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``), tensors split
  in order over ``N`` shards (or an explicit list of name groups);
- ``load_tensors(path)``: every tensor of a checkpoint (index, directory or file) as a dict;
- ``tiny_state(seed)``: a base / fine-tuned pair of state dicts with the shapes and dtypes
  that break streaming code (0-D, 1-D, 3-D, ``(1, n)``, empty, a tensor many chunks long
  with an odd last chunk, bf16/fp16/fp32/fp64, an int64 buffer) and the numerics that break
  task-vector code (identical tensors, exponents more than 16 apart, fp16 subnormals);
- the ``tiny_pair`` fixture: that pair saved once per session in several shards.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"

# CI runs the same examples every time (a red build must be reproducible); locally,
# hypothesis keeps exploring new ones. `.ci/run` sets HYPOTHESIS_PROFILE=ci.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# The model-facts memo (stream_tv/lora/facts_cache.py) of this run, for every test and the CLI
# subprocesses they start: never the user's own cache. Each key is read fresh once per run.
_CACHE = tempfile.mkdtemp(prefix="stream-tv-test-cache-")
os.environ["STREAM_TV_CACHE_DIR"] = _CACHE
os.environ.pop("STREAM_TV_FACTS_CACHE", None)
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def save_checkpoint(
    directory: str | Path,
    tensors: dict[str, torch.Tensor],
    *,
    shards: int | Sequence[Sequence[str]] = 1,
    index: bool = True,
) -> Path:
    """Write ``tensors`` as a sharded safetensors checkpoint in ``directory``; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if isinstance(shards, int):
        per = -(-len(names) // shards)
        groups = [names[i : i + per] for i in range(0, len(names), per)]
    else:
        groups = [list(g) for g in shards]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, directory / fname, {"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
    if index:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (directory / INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
    return directory


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (through its index if any) or file."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, "pt") as g:
            for k in g.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = g.get_tensor(k)
    return out


def _bf16(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(torch.bfloat16)


def tiny_state(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A (base, fine-tuned) pair of small state dicts; see the module docstring.

    The fine-tuned values stay within a factor of 2 of their base values (or are equal), plus
    hand-picked edge pairs, so ``apply(base, extract(base, ft)) == ft`` holds for every element.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    def tune(t: torch.Tensor, eps: float = 0.02) -> torch.Tensor:
        factor = 1 + eps * torch.randn(t.shape, generator=g, dtype=torch.float64).clamp(-3, 3)
        return (t.double() * factor).to(t.dtype)

    base = {
        "model.embed_tokens.weight": randn(37, 24, dtype=torch.bfloat16),  # many chunks, odd last
        "model.layers.0.self_attn.q_proj.weight": randn(16, 24, dtype=torch.bfloat16),
        "model.layers.0.input_layernorm.weight": 1 + randn(24, dtype=torch.bfloat16) / 10,  # 1-D
        "model.layers.0.mlp.up_proj.weight": randn(20, 24, dtype=torch.float16),
        "model.layers.0.mlp.up_proj.bias": randn(19, dtype=torch.float16),  # 1-D, odd
        "model.layers.0.conv.weight": randn(5, 3, 4),  # 3-D fp32
        "model.layers.0.scale": torch.tensor(0.731, dtype=torch.float32),  # 0-D
        "model.layers.0.row": randn(1, 33),  # one row
        "model.layers.0.empty": torch.zeros(0, 8),  # no elements
        "model.layers.0.bias64": randn(7, dtype=torch.float64),
        "model.layers.1.frozen.weight": randn(8, 8, dtype=torch.bfloat16),  # identical in ft
        "model.layers.1.frozen16.weight": randn(3, 5, dtype=torch.float16),  # identical in ft
        "model.position_ids": torch.arange(20).reshape(1, 20),  # integer buffer
        # exponents > 16 apart (inexact in float32), sign flips, zeros
        "model.edge_bf16": _bf16([2.8e-7, 1.0, -3.5, 0.0, 1e-30, 5.0, 0.25, -(2.0**-20)]),
        # fp16 subnormal edge: 2^-24 (smallest), 2^-14 (smallest normal), max, and a pair whose
        # difference needs 25 bits (double rounding trap for --dtype bf16)
        "model.edge_fp16": torch.tensor(
            [2.0**-24, 2.0**-14, 0.0, -(2.0**-24), 65504.0, 1.0, 3 * 2.0**-24, -1.0],
            dtype=torch.float16,
        ),
        "lm_head.weight": randn(13, 24, dtype=torch.bfloat16),
    }
    ft = {k: tune(v) if v.is_floating_point() else v.clone() for k, v in base.items()}
    ft["model.layers.1.frozen.weight"] = base["model.layers.1.frozen.weight"].clone()
    ft["model.layers.1.frozen16.weight"] = base["model.layers.1.frozen16.weight"].clone()
    ft["model.layers.0.scale"] = torch.tensor(0.75, dtype=torch.float32)
    ft["model.edge_bf16"] = _bf16([0.0786, 1.0, 3.5, 2.0**-30, 1e-30, 5.0078125, -0.25, 2.0**-20])
    ft["model.edge_fp16"] = torch.tensor(
        [2.0**-23, 2.0**-15, 2.0**-24, 1.00390625, -65504.0, 1.0, 2.0**-14, -1.0009765625],
        dtype=torch.float16,
    )
    return base, ft


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[dict, dict, Path, Path]:
    """``(base, ft, base_dir, ft_dir)``: :func:`tiny_state` saved in 3 and 2 shards.

    Session-scoped and shared: never write into these directories.
    """
    base, ft = tiny_state()
    root = tmp_path_factory.mktemp("tiny_pair")
    return (
        base,
        ft,
        save_checkpoint(root / "base", base, shards=3),
        save_checkpoint(root / "ft", ft, shards=2),
    )
