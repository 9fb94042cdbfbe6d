"""Fuzzing with hypothesis, bounded to run in seconds.

- random bytes, random JSON headers and random index files against the header/index readers
  (and ``verify``): nothing but our own :class:`StreamTVError` may escape;
- random adapter_config.json dicts against the adapter parser (once ``stream_tv.lora`` has one);
- random tensor shapes (0-D, 1-D, empty), dtypes, chunk and shard sizes against the float64
  reference for ``extract`` and ``apply``, and against each other (chunking never changes a
  byte).
"""

from __future__ import annotations

import importlib
import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from stream_tv import RunOptions, apply_task_vectors, extract_task_vector, verify_output
from stream_tv.errors import StreamTVError
from stream_tv.io.index import DTYPES, load_checkpoint, read_header

FAST = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SLOW = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
dtype_names = st.sampled_from(sorted(DTYPES)) | st.sampled_from(["F33", "f32", "", "BF16 "])
small_ints = st.integers(-2, 40) | st.sampled_from([2**63, 2**64 + 1, -(2**63)])
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": dtype_names | json_values,
        "shape": st.lists(small_ints | st.booleans() | st.floats(0, 3), max_size=4) | json_values,
        "data_offsets": st.lists(small_ints, min_size=0, max_size=3) | json_values,
    },
)


def only_our_errors(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except StreamTVError:
        return None


# ---- headers and indexes ------------------------------------------------------------------


@FAST
@given(data=st.binary(max_size=200))
def test_random_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(data)
        only_our_errors(read_header, path)
        only_our_errors(load_checkpoint, path)


@FAST
@given(
    header=st.dictionaries(st.text(max_size=6), entries | json_values, max_size=5),
    metadata=st.none() | json_values,
    extra=st.integers(0, 64),
    length=st.none() | st.integers(0, 2**64 - 1),
    raw_text=st.none() | st.binary(max_size=40),
)
def test_random_headers(header, metadata, extra, length, raw_text):
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = raw_text if raw_text is not None else json.dumps(header).encode()
    size = len(raw) if length is None else length
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(struct.pack("<Q", size) + raw + bytes(extra))
        specs = only_our_errors(read_header, path)
        if specs is not None:  # what is accepted is consistent
            for s in specs.values():
                assert 0 <= s.start <= s.end <= path.stat().st_size
                assert s.nbytes == math.prod(s.shape) * s.itemsize


file_names = st.sampled_from(
    [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "missing.safetensors",
        "../outside.safetensors",
        "/abs.safetensors",
        "",
        ".",
        "sub/dir.safetensors",
        "nul\0byte",
        "x" * 300,
    ]
)


@FAST
@given(
    weight_map=st.dictionaries(
        st.sampled_from(["a", "b", "c", "d"]), file_names | json_values, max_size=4
    ),
    metadata=json_values,
    top=st.sampled_from(["ok", "list", "garbage", "no-map"]),
)
def test_random_index_files(weight_map, metadata, top):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        save_file(
            {"a": torch.ones(2, 2), "b": torch.zeros(3)}, root / "model-00001-of-00002.safetensors"
        )
        save_file({"c": torch.ones(1)}, root / "model-00002-of-00002.safetensors")
        index = root / "model.safetensors.index.json"
        if top == "ok":
            index.write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}))
        elif top == "list":
            index.write_text(json.dumps([weight_map]))
        elif top == "no-map":
            index.write_text(json.dumps({"metadata": metadata}))
        else:
            index.write_bytes(b"\xff{" + json.dumps(weight_map).encode()[:10])
        only_our_errors(load_checkpoint, root)
        only_our_errors(load_checkpoint, index)
        result = only_our_errors(
            verify_output, root, options=RunOptions(device="cpu", progress=False)
        )
        if result is not None and top != "ok":
            assert not result.ok


# ---- adapter configs ----------------------------------------------------------------------


def _adapter_loader():
    """The adapter parser of ``stream_tv.lora``, called on a directory; skip if none yet."""
    try:
        lora = importlib.import_module("stream_tv.lora")
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"stream_tv.lora is not importable yet: {e}")
    adapter = getattr(lora, "Adapter", None)
    if adapter is not None and hasattr(adapter, "load"):
        return adapter.load
    try:
        config = importlib.import_module("stream_tv.lora.config")
    except ImportError:
        config = None
    for name in ("load_adapter_config", "load_config", "read_adapter_config"):
        fn = getattr(config, name, None) or getattr(lora, name, None)
        if fn is not None:
            return fn
    pytest.skip("stream_tv.lora has no adapter parser yet (Adapter.load or config loader)")


adapter_configs = (
    st.fixed_dictionaries(
        {  # mostly plausible, so the parser gets past its first checks
            "peft_type": st.sampled_from(["LORA", "LORA", "lora", "IA3", ""]) | json_values,
            "r": st.integers(-2, 64) | json_values,
            "lora_alpha": st.integers(-2, 64) | st.floats(allow_nan=True) | json_values,
            "target_modules": st.lists(
                st.sampled_from(["q_proj", "v_proj", "lm_head", ""]), max_size=3
            )
            | st.sampled_from(["all-linear", ".*proj", "(["])
            | json_values,
        },
        optional={
            "use_dora": st.booleans() | json_values,
            "use_rslora": st.booleans() | json_values,
            "fan_in_fan_out": st.booleans() | json_values,
            "rank_pattern": st.dictionaries(
                st.text(max_size=5), st.integers(-1, 8) | json_values, max_size=2
            ),
            "alpha_pattern": st.dictionaries(
                st.text(max_size=5), st.integers(-1, 8) | json_values, max_size=2
            ),
            "modules_to_save": st.none() | st.lists(st.text(max_size=5), max_size=2) | json_values,
            "bias": st.sampled_from(["none", "all", "lora_only", "?"]) | json_values,
            "layers_to_transform": st.none()
            | st.lists(st.integers(-1, 4), max_size=3)
            | json_values,
            "base_model_name_or_path": st.text(max_size=10) | json_values,
        },
    )
    | json_values
)


@FAST
@given(config=adapter_configs)
def test_random_adapter_configs(config):
    load = _adapter_loader()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "adapter_config.json").write_text(json.dumps(config))
        save_file(
            {
                "base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(2, 4),
                "base_model.model.layers.0.q_proj.lora_B.weight": torch.ones(4, 2),
            },
            root / "adapter_model.safetensors",
        )
        only_our_errors(load, root)


# ---- numerics against float64 -------------------------------------------------------------

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@st.composite
def model_pairs(draw):
    """(base, ft) with 1-4 tensors: 0-D, 1-D, empty, 2-D, 3-D; values 0 or +-[2^-10, 2^10]
    so float64 arithmetic on them is exact and the reference is the correctly rounded one."""
    n = draw(st.integers(1, 4))
    base, ft = {}, {}
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        dtype = DT[draw(st.sampled_from(sorted(DT)))]

        def values(shape: tuple[int, ...] = shape, dtype: torch.dtype = dtype) -> torch.Tensor:
            mag = torch.exp2(torch.empty(shape, dtype=torch.float64).uniform_(-10, 10, generator=g))
            sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
            zero = torch.rand(shape, generator=g) < 0.1
            return torch.where(zero, 0.0, mag * sign).to(dtype)

        base[f"t{i}"] = values()
        ft[f"t{i}"] = values()
    return base, ft


def _load(out: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(out)
    from stream_tv.io.reader import Reader

    with Reader() as r:
        return {n: r.read(s).clone() for n, s in ckpt.tensors.items()}


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    return fi.eps * x.abs().clamp_min(fi.tiny)


@SLOW
@given(
    pair=model_pairs(),
    chunk=st.integers(1, 200),
    chunk2=st.integers(1, 5000),
    shard=st.integers(1, 300),
    scales=st.lists(st.sampled_from([1.0, -1.0, 0.5, 0.3, -2.0, 0.0]), min_size=1, max_size=2),
)
def test_extract_and_apply_match_float64(pair, chunk, chunk2, shard, scales):
    base, ft = pair
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "in").mkdir()
        save_file(base, root / "in" / "base.safetensors")
        save_file(ft, root / "in" / "ft.safetensors")

        def opts(c: int, nonfinite: str) -> RunOptions:
            return RunOptions(
                device="cpu",
                chunk_size=c,
                max_shard_size=shard,
                progress=False,
                on_nonfinite=nonfinite,
            )

        extract_task_vector(
            root / "in" / "base.safetensors",
            root / "in" / "ft.safetensors",
            root / "tv",
            options=opts(chunk, "warn"),
        )
        tv = _load(root / "tv")
        assert tv.keys() == base.keys()
        for n in base:
            want = (ft[n].double() - base[n].double()).float()
            assert tv[n].dtype == torch.float32 and tv[n].shape == base[n].shape
            assert torch.equal(tv[n], want), n
        # chunking never changes a byte
        extract_task_vector(
            root / "in" / "base.safetensors",
            root / "in" / "ft.safetensors",
            root / "tv2",
            options=opts(chunk2, "warn"),
        )
        assert _files(root / "tv") == _files(root / "tv2")

        tvs = [root / "tv"] * len(scales)
        apply_task_vectors(
            root / "in" / "base.safetensors",
            tvs,
            root / "out",
            scales=scales,
            options=opts(chunk, "error"),
        )
        got = _load(root / "out")
        for n in base:
            terms = [s * tv[n].double() for s in scales]
            ref = base[n].double() + sum(terms)
            size = base[n].double().abs() + sum(t.abs() for t in terms)
            bound = _ulp(ref, base[n].dtype) + (len(scales) + 1) * 2.0**-22 * size
            assert got[n].dtype == base[n].dtype and got[n].shape == base[n].shape
            assert torch.all((got[n].double() - ref).abs() <= bound), n
        assert verify_output(
            root / "out",
            base=root / "in" / "base.safetensors",
            task_vectors=tvs,
            options=RunOptions(device="cpu", progress=False),
        ).ok
