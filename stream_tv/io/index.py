"""Tensor specs from safetensors headers only: no tensor byte is read here.

A safetensors file is ``u64 little-endian header length`` + ``JSON header`` + data. The header
maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``, offsets
relative to the end of the header. Everything that can be checked from the header is checked
here, so a command fails before it reads (or writes) a byte of tensor data.

>>> import json, struct, tempfile, os
>>> header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
>>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
>>> _ = open(path, "wb").write(struct.pack("<Q", len(header)) + header + bytes(24))
>>> spec = read_header(path)["w"]
>>> spec.shape, spec.nbytes, spec.start == 8 + len(header)
((2, 3), 24, True)
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError, ReferenceNotFoundError

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype: ``dtype_name(torch.bfloat16) == "BF16"``."""
    return DTYPE_NAMES[dtype]


def parse_dtype(text: str) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"``, ``"BF16"``, ``"torch.float32"``, ``"fp32"`` -> torch dtype."""
    key = text.strip().lower().removeprefix("torch.")
    aliases = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "f16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "f32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
        "fp64": torch.float64,
        "f64": torch.float64,
        "float64": torch.float64,
        "double": torch.float64,
    }
    if key not in aliases:
        raise ValueError(f"unknown dtype {text!r}; use one of bf16, fp16, fp32, fp64")
    return aliases[key]


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset of the first byte in ``file``
    end: int  # absolute offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def rows(self) -> int:
        """Length of the chunked dimension: ``shape[0]``, or ``numel`` for 0-D/1-D tensors."""
        return self.shape[0] if len(self.shape) >= 2 else max(self.numel, 0) if self.shape else 1

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if len(self.shape) >= 2 else ()

    @property
    def row_numel(self) -> int:
        return math.prod(self.row_shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def dtype_str(self) -> str:
        return dtype_name(self.dtype)


def _corrupt(path: Path, message: str, hint: str | None = None) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        message,
        where=str(path),
        hint=hint or "the file is not a valid safetensors file; re-download or re-save it",
    )


def read_header(path: str | os.PathLike) -> dict[str, TensorSpec]:
    """Parse and validate one safetensors header; return specs in data order.

    Checks: header length within the file, JSON object, known dtypes, integer shapes,
    byte ranges that match ``dtype x shape``, lie inside the file, and neither overlap nor
    leave holes (the rules safetensors itself applies). Metadata is available through
    :func:`read_metadata`.
    """
    specs, _ = _parse(Path(path))
    return specs


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (``{}`` when absent)."""
    _, meta = _parse(Path(path))
    return meta


def _parse(path: Path) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"file is {size} bytes, too short for a safetensors header")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise _corrupt(
                    path,
                    f"header length {hlen} runs past the end of the file ({size} bytes)",
                    "the file is truncated or not safetensors; re-download it",
                )
            raw = f.read(hlen)
    except OSError as e:
        raise ReferenceNotFoundError(f"cannot read: {e.strerror or e}", where=str(path)) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _corrupt(path, "__metadata__ is not a JSON object")

    data_start = 8 + hlen
    data_len = size - data_start
    entries: list[tuple[int, int, str, torch.dtype, tuple[int, ...]]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _corrupt(path, f"tensor {name!r}: entry is not a JSON object")
        dt = info.get("dtype")
        if not isinstance(dt, str) or dt not in DTYPES:  # a list is unhashable: check type first
            raise _corrupt(
                path,
                f"tensor {name!r}: unknown dtype {dt!r}",
                f"supported: {', '.join(sorted(DTYPES))}",
            )
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise _corrupt(path, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(path, f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
        torch_dtype = DTYPES[dt]
        expected = math.prod(shape) * torch_dtype.itemsize
        if offsets[1] - offsets[0] != expected:
            raise _corrupt(
                path,
                f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for {dt} {shape} "
                f"(expected {expected})",
            )
        entries.append((offsets[0], offsets[1], name, torch_dtype, tuple(shape)))

    entries.sort()
    position = 0
    for begin, end, name, _, _ in entries:
        if begin < position:
            raise _corrupt(path, f"tensor {name!r}: data overlaps the previous tensor")
        if begin > position:
            raise _corrupt(path, f"tensor {name!r}: hole of {begin - position} bytes before it")
        position = end
    if position > data_len:
        raise _corrupt(
            path,
            f"truncated: tensors need {position} data bytes, the file has {data_len}",
            "the download or copy was interrupted; fetch the file again",
        )
    if position < data_len:
        raise _corrupt(path, f"{data_len - position} unexpected bytes after the last tensor")

    specs = {
        name: TensorSpec(name, dtype, shape, path, data_start + begin, data_start + end)
        for begin, end, name, dtype, shape in entries
    }
    return specs, {str(k): str(v) for k, v in meta.items()}


@dataclass
class Checkpoint:
    """All tensors of one model reference, from headers only, in file/data order."""

    reference: str
    files: list[Path]
    tensors: dict[str, TensorSpec]
    root: Path | None = None  # the directory holding config/tokenizer files, if any
    metadata: dict[str, object] = field(default_factory=dict)  # index "metadata", if any

    def __getitem__(self, name: str) -> TensorSpec:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.tensors.values())

    @property
    def total_params(self) -> int:
        return sum(s.numel for s in self.tensors.values())


def load_checkpoint(
    path: str | os.PathLike, *, reference: str | None = None
) -> Checkpoint:
    """Index a local checkpoint: a directory or a single ``.safetensors`` file.

    A directory with ``model.safetensors.index.json`` (or exactly one other
    ``*.safetensors.index.json``) is read through its ``weight_map``; otherwise every
    ``*.safetensors`` in it is read (names must not repeat across files).
    """
    p = Path(path)
    ref = reference or str(path)
    if not p.exists():
        raise ReferenceNotFoundError(
            "no such file or directory", where=str(p), hint="check the path or Hub id"
        )
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _load_index(p, ref)
        if p.suffix != ".safetensors":
            raise ReferenceNotFoundError(
                "not a .safetensors file",
                where=str(p),
                hint="pass a directory, a .safetensors file or its .index.json",
            )
        return Checkpoint(ref, [p], read_header(p), root=p.parent)

    index = p / INDEX_NAME
    if not index.is_file():
        others = sorted(q for q in p.glob("*.safetensors.index.json") if not q.name.startswith("."))
        if len(others) == 1:
            index = others[0]
    if index.is_file():
        return _load_index(index, ref)

    files = sorted(q for q in p.glob("*.safetensors") if not q.name.startswith("."))
    if not files:
        pickles = sorted(q.name for q in p.glob("*.bin")) + sorted(q.name for q in p.glob("*.pt"))
        hint = (
            f"found {', '.join(pickles[:3])}: pickled weights are not read; convert them with "
            "`model.save_pretrained(dir, safe_serialization=True)`"
            if pickles
            else "expected model.safetensors.index.json or *.safetensors"
        )
        raise ReferenceNotFoundError("no safetensors files in this directory", where=str(p), hint=hint)
    tensors: dict[str, TensorSpec] = {}
    for f in files:
        for name, spec in read_header(f).items():
            if name in tensors:
                raise CorruptCheckpointError(
                    f"tensor {name!r} appears in both {tensors[name].file.name} and {f.name}",
                    where=str(p),
                    hint="keep one set of shards in the directory",
                )
            tensors[name] = spec
    return Checkpoint(ref, files, tensors, root=p)


def _load_index(index: Path, ref: str) -> Checkpoint:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"index is not valid JSON ({e})", where=str(index)) from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, Mapping) or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise CorruptCheckpointError(
            "index has no weight_map of tensor name -> file", where=str(index)
        )
    root = index.parent
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    headers: dict[str, dict[str, TensorSpec]] = {}
    for fname in by_file:
        fpath = root / fname
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise CorruptCheckpointError(
                f"index names a file outside its directory: {fname!r}", where=str(index)
            )
        try:
            exists = fpath.is_file()
        except OSError as e:  # e.g. a name longer than the file system allows
            raise CorruptCheckpointError(
                f"index names an unusable file {fname[:80]!r}: {e.strerror}", where=str(index)
            ) from e
        if not exists:
            raise ReferenceNotFoundError(
                f"index names shard {fname!r}, which does not exist",
                where=str(index),
                hint="the download is incomplete; fetch the missing shard",
            )
        headers[fname] = read_header(fpath)
    tensors: dict[str, TensorSpec] = {}
    files: list[Path] = []
    for fname, specs in headers.items():
        files.append(root / fname)
        wanted = set(by_file[fname])
        missing = sorted(wanted - specs.keys())
        if missing:
            raise CorruptCheckpointError(
                f"index says {len(missing)} tensor(s) are in {fname}, but its header lacks them "
                f"(e.g. {', '.join(missing[:3])})",
                where=str(index),
                hint="the index and the shards come from different saves",
            )
    # Keep data order within files, files in shard-name order: sequential reads.
    files.sort(key=lambda f: f.name)
    for f in files:
        wanted = set(by_file[f.name])
        for name, spec in headers[f.name].items():
            if name in wanted:
                tensors[name] = spec
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return Checkpoint(ref, files, tensors, root=root, metadata=dict(meta))
