"""Parsing safetensors headers into tensor specs: no tensor byte is read here.

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

import hashlib
import math
import os
import struct
from pathlib import Path

from ..errors import CorruptCheckpointError
from .inputs import (
    FileIdentity,
    brief,
    open_input,
    os_error,
    parse_json,
    pread_exact,
)
from .specs import DTYPE_SIZES, DTYPES, MAX_DIM, TensorSpec

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces


def corrupt(path: Path | str, message: str, hint: str | None = None) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        message,
        where=str(path),
        hint=hint or "the file is not a valid safetensors file; re-download or re-save it",
    )


def read_header(path: str | os.PathLike) -> dict[str, TensorSpec]:
    """Parse and validate one safetensors header; return specs in data order.

    Checks: a regular file, header length within the file, JSON object, known dtypes, integer
    shapes that torch can represent, byte ranges that match ``dtype x shape``, lie inside the
    file, and neither overlap nor leave holes (the rules safetensors itself applies). Each spec
    carries the file's :class:`FileIdentity`. Metadata is available through
    :func:`read_metadata`.
    """
    specs, _, _ = parse_file(Path(path))
    return specs


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (``{}`` when absent)."""
    _, meta, _ = parse_file(Path(path))
    return meta


def header_length(path: Path | str, prefix: bytes, size: int) -> int:
    """The JSON header length from the first 8 bytes, checked against the file size."""
    if len(prefix) < 8:
        raise corrupt(path, f"file is {size} bytes, too short for a safetensors header")
    (hlen,) = struct.unpack("<Q", prefix[:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
        raise corrupt(
            path,
            f"header length {hlen} runs past the end of the file ({size} bytes)"
            if 8 + hlen > size
            else f"header length {hlen} is over the {MAX_HEADER_BYTES} bytes safetensors allows",
            "the file is truncated or not safetensors; re-download it",
        )
    return hlen


def parse_file(path: Path) -> tuple[dict[str, TensorSpec], dict[str, str], FileIdentity]:
    """Specs, metadata and identity of one safetensors file, from its header."""
    fd, st = open_input(path)
    try:
        size = st.st_size
        prefix = pread_exact(fd, 8, 0)
        hlen = header_length(path, prefix, size)
        raw = pread_exact(fd, hlen, 8)
    except OSError as e:
        raise os_error(path, e) from e
    finally:
        os.close(fd)
    if len(raw) < hlen:
        raise corrupt(path, "file ended inside its header (it shrank while being read)")
    identity = FileIdentity(
        path, st.st_dev, st.st_ino, size, st.st_mtime_ns, 8 + hlen,
        hashlib.sha256(prefix + raw).hexdigest(),
    )  # fmt: skip
    specs, meta = parse_header(path, raw, size, identity)
    return specs, meta, identity


def parse_header(
    path: Path,
    raw: bytes,
    size: int,
    identity: FileIdentity | None = None,
    *,
    where: str | None = None,
) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Specs and metadata from a header's JSON bytes ``raw`` of a file of ``size`` bytes.

    Pure (no file is read), so that a header fetched from the Hub is checked exactly as a
    local one. ``path`` is the specs' file; ``where`` (default: ``path``) names it in messages.
    """
    loc = where or str(path)
    header = parse_json(
        raw,
        where=loc,
        what="header",
        hint="the file is not a valid safetensors file; re-download or re-save it",
    )
    if not isinstance(header, dict):
        raise corrupt(loc, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise corrupt(loc, "__metadata__ is not a JSON object")
    for k, v in meta.items():
        if not isinstance(v, str):  # safetensors: a map of string to string
            raise corrupt(loc, f"__metadata__ value of {brief(k)} is {brief(v)}, not a string")

    data_start = 8 + len(raw)
    entries = sorted(_entry(loc, name, info) for name, info in header.items())
    _check_layout(loc, entries, size - data_start)
    specs = {
        name: TensorSpec(name, dtype, shape, path, data_start + begin, data_start + end, identity)
        for begin, end, name, dtype, shape in entries
    }
    return specs, dict(meta)


def _entry(loc: str, name: str, info: object) -> tuple[int, int, str, str, tuple[int, ...]]:
    """One header entry, checked: ``(begin, end, name, dtype, shape)``."""
    n = brief(name)
    if not isinstance(info, dict):
        raise corrupt(loc, f"tensor {n}: entry is not a JSON object")
    dt = info.get("dtype")
    if not isinstance(dt, str) or dt not in DTYPE_SIZES:  # unhashable lists: type first
        raise corrupt(
            loc,
            f"tensor {n}: unknown dtype {brief(dt)}",
            f"supported: {', '.join(sorted(DTYPE_SIZES))}",
        )
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise corrupt(loc, f"tensor {n}: shape {brief(shape)} is not a list of sizes")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise corrupt(loc, f"tensor {n}: data_offsets {brief(offsets)} are not [begin, end]")
    _check_shape(loc, n, shape, dt)
    expected = math.prod(shape) * DTYPE_SIZES[dt]
    if offsets[1] - offsets[0] != expected:
        raise corrupt(
            loc,
            f"tensor {n}: {offsets[1] - offsets[0]} bytes for {dt} {brief(shape)} "
            f"(expected {brief(expected)})",
        )
    return offsets[0], offsets[1], name, dt, tuple(shape)


def _check_layout(loc: str, entries: list, data_len: int) -> None:
    """The byte ranges (sorted) tile the data exactly: no overlap, no hole, no excess."""
    position = 0
    for begin, end, name, _, _ in entries:
        if begin < position:
            raise corrupt(loc, f"tensor {brief(name)}: data overlaps the previous tensor")
        if begin > position:
            raise corrupt(loc, f"tensor {brief(name)}: hole of {begin - position} bytes before it")
        position = end
    if position > data_len:
        raise corrupt(
            loc,
            f"truncated: tensors need {brief(position)} data bytes, the file has {data_len}",
            "the download or copy was interrupted; fetch the file again",
        )
    if position < data_len:
        raise corrupt(loc, f"{data_len - position} unexpected bytes after the last tensor")


def _check_shape(loc: str, name: str, shape: list[int], dtype: str) -> None:
    """Refuse a shape torch cannot hold, decided from the header alone.

    A tensor with data has ``numel * itemsize`` bytes inside the file, so every size and
    stride fits in 64 bits. An empty one (a 0 in its shape) has none, and its other sizes are
    unbounded by the file: ``[2**62, 0]`` is a valid empty tensor, ``[2**64, 0]`` is no
    tensor at all, and ``[0, 2**62, 2**62]`` overflows torch's stride computation. Strides
    are products of sizes (a 0 counted as 1), so only when the non-zero sizes multiply past
    2**63 can torch refuse; then torch itself decides, on the meta device (no memory, and the
    only case where reading a header imports torch).
    """
    big = next((d for d in shape if d > MAX_DIM), None)
    if big is not None:
        raise corrupt(
            loc,
            f"tensor {name}: size {brief(big)} in shape {brief(shape)} does not fit in a signed "
            "64-bit integer, so no tensor has this shape",
        )
    if 0 in shape and math.prod(d for d in shape if d) > MAX_DIM:
        import torch

        try:
            torch.empty(shape, dtype=DTYPES[dtype], device="meta")
        except (RuntimeError, ValueError, OverflowError, TypeError) as e:
            raise corrupt(
                loc,
                f"tensor {name}: torch cannot represent shape {brief(shape)} "
                f"({str(e).splitlines()[0][:80]})",
            ) from e


# ---- checkpoints: a directory, an index or one file ---------------------------------------
