"""io/index.py: specs from headers only, and one named error for every kind of corrupt input."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from conftest import save_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from stream_tv.errors import CorruptCheckpointError, ReferenceNotFoundError
from stream_tv.io.index import (
    DTYPES,
    INDEX_NAME,
    load_checkpoint,
    parse_dtype,
    read_header,
    read_metadata,
)
from stream_tv.io.reader import Reader


def raw_file(path: Path, header: object, data: bytes = b"", *, hlen: int | None = None) -> Path:
    """A safetensors-shaped file with any header (even an invalid one)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if hlen is None else hlen
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def f32(shape, begin):
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}


# ---- valid files -------------------------------------------------------------------------


def test_header_matches_safetensors(tmp_path):
    tensors = {
        "z.scalar": torch.tensor(1.5),
        "a.matrix": torch.randn(3, 5).to(torch.bfloat16),
        "m.cube": torch.randn(2, 3, 4, dtype=torch.float64),
        "b.vec": torch.randn(7).half(),
        "e.empty": torch.zeros(0, 3),
        "i.ids": torch.arange(6, dtype=torch.int32),
        "k.mask": torch.tensor([True, False]),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, {"format": "pt", "note": "x"})
    specs = read_header(path)
    assert read_metadata(path) == {"format": "pt", "note": "x"}
    assert set(specs) == set(tensors)
    starts = [s.start for s in specs.values()]
    assert starts == sorted(starts)  # data order
    with Reader() as r, safe_open(path, "pt") as f:
        for name, spec in specs.items():
            t = tensors[name]
            assert spec.dtype == t.dtype and spec.shape == tuple(t.shape)
            assert spec.nbytes == t.numel() * t.element_size() and spec.numel == t.numel()
            got = r.read(spec)
            assert torch.equal(got, f.get_tensor(name)) and got.shape == t.shape
    assert specs["z.scalar"].rows == 1 and specs["z.scalar"].row_shape == ()
    assert specs["b.vec"].rows == 7 and specs["b.vec"].row_numel == 1
    assert specs["m.cube"].rows == 2 and specs["m.cube"].row_shape == (3, 4)
    assert specs["e.empty"].rows == 0
    assert specs["a.matrix"].is_float and not specs["i.ids"].is_float


def test_reader_row_ranges(tmp_path):
    t = torch.randn(9, 4, 3)
    save_file({"t": t, "v": t.flatten().clone()}, tmp_path / "m.safetensors")
    specs = read_header(tmp_path / "m.safetensors")
    with Reader() as r:
        for a, b in [(0, 9), (0, 2), (3, 5), (7, 9), (4, 4)]:
            assert torch.equal(r.read_rows(specs["t"], a, b), t[a:b])
            assert torch.equal(r.read_rows(specs["v"], a * 5, b * 5), t.flatten()[a * 5 : b * 5])


def test_parse_dtype():
    assert parse_dtype("bf16") == parse_dtype("BFloat16") == torch.bfloat16
    assert parse_dtype("torch.float32") == parse_dtype("fp32") == torch.float32
    assert parse_dtype(" half ") == torch.float16 and parse_dtype("double") == torch.float64
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        parse_dtype("int8")
    assert {"F32", "BF16", "F16", "F64", "I64", "BOOL"} <= DTYPES.keys()


def test_load_directory_with_index_keeps_file_and_data_order(tmp_path):
    tensors = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(7)}
    d = save_checkpoint(tmp_path / "m", tensors, shards=3)
    ckpt = load_checkpoint(d)
    assert list(ckpt.tensors) == list(tensors)
    assert [f.name for f in ckpt.files] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert ckpt.root == d and ckpt.metadata == {"total_size": ckpt.total_bytes}
    assert ckpt.total_params == 28 and len(ckpt) == 7 and "t3" in ckpt
    assert ckpt["t6"].file.name == "model-00003-of-00003.safetensors"
    # the index file itself, and the same shards without an index
    assert list(load_checkpoint(d / INDEX_NAME).tensors) == list(tensors)
    (d / INDEX_NAME).unlink()
    assert list(load_checkpoint(d).tensors) == list(tensors)


def test_load_single_file_and_other_index_name(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "adapter.safetensors")
    ckpt = load_checkpoint(tmp_path / "adapter.safetensors")
    assert list(ckpt.tensors) == ["w"] and ckpt.root == tmp_path
    d = save_checkpoint(tmp_path / "m", {"a": torch.ones(1), "b": torch.ones(2)}, shards=2)
    (d / INDEX_NAME).rename(d / "pytorch_model.safetensors.index.json")
    (d / ".hidden.safetensors").write_bytes(b"junk")  # hidden files are ignored
    assert list(load_checkpoint(d).tensors) == ["a", "b"]


def test_index_may_list_a_subset_of_a_shard(tmp_path):
    d = save_checkpoint(tmp_path / "m", {"a": torch.ones(1), "b": torch.ones(2)})
    (d / INDEX_NAME).write_text(
        json.dumps({"weight_map": {"b": "model-00001-of-00001.safetensors"}})
    )
    assert list(load_checkpoint(d).tensors) == ["b"]


# ---- corrupt inputs: one error each, naming the file --------------------------------------


def corrupt(tmp_path, name, header, data=b"", **kw):
    return raw_file(tmp_path / f"{name}.safetensors", header, data, **kw)


CASES = {
    "too_short": lambda p: (p.write_bytes(b"\x01\x02\x03"), p)[1],
    "header_past_end": lambda p: raw_file(p, {"w": f32([2], 0)}, bytes(8), hlen=10**6),
    "header_huge": lambda p: raw_file(p, b"{}", hlen=2**62),
    "garbage_json": lambda p: raw_file(p, b"{not json at all"),
    "not_utf8": lambda p: raw_file(p, b'{"\xff": 1}'),
    "not_object": lambda p: raw_file(p, [1, 2, 3]),
    "entry_not_object": lambda p: raw_file(p, {"w": 3}),
    "metadata_not_object": lambda p: raw_file(p, {"__metadata__": [1]}),
    "unknown_dtype": lambda p: raw_file(
        p, {"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)
    ),
    "bad_shape": lambda p: raw_file(
        p, {"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}, bytes(8)
    ),
    "bad_offsets": lambda p: raw_file(
        p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)
    ),
    "wrong_byte_count": lambda p: raw_file(
        p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(12)
    ),
    "overlap": lambda p: raw_file(p, {"a": f32([4], 0), "b": f32([4], 8)}, bytes(24)),
    "hole": lambda p: raw_file(p, {"a": f32([4], 0), "b": f32([4], 20)}, bytes(36)),
    "past_end": lambda p: raw_file(p, {"a": f32([4], 0), "b": f32([4], 16)}, bytes(20)),
    "trailing_bytes": lambda p: raw_file(p, {"a": f32([4], 0)}, bytes(20)),
}
MESSAGES = {
    "too_short": "too short",
    "header_past_end": "runs past the end",
    "header_huge": "runs past the end",
    "garbage_json": "not valid JSON",
    "not_utf8": "not valid JSON",
    "not_object": "not a JSON object",
    "entry_not_object": "'w': entry is not a JSON object",
    "metadata_not_object": "__metadata__",
    "unknown_dtype": "unknown dtype 'F7'",
    "bad_shape": "shape",
    "bad_offsets": "data_offsets",
    "wrong_byte_count": "12 bytes for F32 [4] (expected 16)",
    "overlap": "'b': data overlaps",
    "hole": "'b': hole of 4 bytes",
    "past_end": "truncated",
    "trailing_bytes": "4 unexpected bytes",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_file_is_named(tmp_path, case):
    path = CASES[case](tmp_path / f"{case}.safetensors")
    with pytest.raises(CorruptCheckpointError) as e:
        read_header(path)
    assert str(e.value).startswith(f"{path}: ")
    assert MESSAGES[case] in str(e.value)
    # ... and through a directory, as a command sees it
    with pytest.raises(CorruptCheckpointError, match=re.escape(MESSAGES[case])):
        load_checkpoint(tmp_path)


def test_truncated_shard_in_a_checkpoint(tmp_path):
    d = save_checkpoint(tmp_path / "m", {"a": torch.ones(64), "b": torch.ones(64)}, shards=2)
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(d)
    assert str(shard) in str(e.value) and "truncated" in str(e.value)
    assert "fetch the file again" in str(e.value)


def test_index_naming_a_missing_shard(tmp_path):
    d = save_checkpoint(tmp_path / "m", {"a": torch.ones(2), "b": torch.ones(2)}, shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ReferenceNotFoundError) as e:
        load_checkpoint(d)
    msg = str(e.value)
    assert str(d / INDEX_NAME) in msg and "model-00002-of-00002.safetensors" in msg
    assert "does not exist" in msg


def test_index_pointing_at_the_wrong_file(tmp_path):
    d = save_checkpoint(tmp_path / "m", {"a": torch.ones(2), "b": torch.ones(2)}, shards=2)
    index = json.loads((d / INDEX_NAME).read_text())
    index["weight_map"]["b"] = "model-00001-of-00002.safetensors"
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(d)
    assert "model-00001-of-00002.safetensors" in str(e.value) and "b" in str(e.value)
    assert str(d / INDEX_NAME) in str(e.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{oops", "not valid JSON"),
        ('{"metadata": {}}', "no weight_map"),
        ('{"weight_map": {"a": 3}}', "no weight_map"),
        ('{"weight_map": {"a": "../x.safetensors"}}', "outside its directory"),
    ],
)
def test_bad_index(tmp_path, content, message):
    (tmp_path / INDEX_NAME).write_text(content)
    with pytest.raises(CorruptCheckpointError, match=message) as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path / INDEX_NAME) in str(e.value)


def test_duplicate_tensor_across_unindexed_shards(tmp_path):
    save_file({"w": torch.ones(2), "x": torch.ones(1)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(tmp_path)
    assert "'w'" in str(e.value) and "a.safetensors" in str(e.value)
    assert "b.safetensors" in str(e.value)


def test_not_found_and_not_safetensors(tmp_path):
    with pytest.raises(ReferenceNotFoundError, match="no such file") as e:
        load_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(ReferenceNotFoundError, match="no safetensors files") as e:
        load_checkpoint(tmp_path)
    assert "model.safetensors.index.json" in str(e.value)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ReferenceNotFoundError) as e:
        load_checkpoint(tmp_path)
    assert "pytorch_model.bin" in str(e.value) and "safe_serialization" in str(e.value)
    with pytest.raises(ReferenceNotFoundError, match="not a .safetensors file"):
        load_checkpoint(tmp_path / "pytorch_model.bin")
