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

import errno
import hashlib
import json
import math
import os
import re
import reprlib
import stat
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpointError, InputError, ReferenceNotFoundError

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
MAX_INDEX_BYTES = 64 * 1024 * 1024  # the largest Hub indexes are ~10 MB
MAX_JSON_DEPTH = 32  # real headers, indexes and configs nest 2-6 levels
MAX_DIM = 2**63 - 1  # torch sizes are signed 64-bit integers

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
class FileIdentity:
    """An input file as it was when its header was read: what says it is still the same file.

    ``digest`` is the sha256 of the first ``header_bytes`` bytes (a safetensors file's length
    prefix and JSON header; a JSON file's whole content). ``url`` is set, and device, inode and
    mtime are 0, for a file read on the Hugging Face Hub (headers only, never opened here).
    """

    path: Path
    device: int
    inode: int
    size: int
    mtime_ns: int
    header_bytes: int
    digest: str
    url: str | None = None

    def line(self) -> str:
        """``resolved path, size, mtime, header digest``: one line of :meth:`Checkpoint.identity`."""
        where = self.url or os.path.realpath(self.path)
        return f"{where}\t{self.size}\t{self.mtime_ns}\tsha256:{self.digest}"

    def differences(self, st: os.stat_result) -> list[str]:
        """What differs between this identity and ``st`` (an fstat of the file opened again)."""
        pairs = [
            ("device", self.device, st.st_dev),
            ("inode", self.inode, st.st_ino),
            ("size", self.size, st.st_size),
            ("mtime_ns", self.mtime_ns, st.st_mtime_ns),
        ]
        return [f"{name} {old} -> {new}" for name, old, new in pairs if old != new]


def identity_of(sources: Iterable[FileIdentity]) -> str:
    """A stable string naming files and their state, for a resume fingerprint.

    One :meth:`FileIdentity.line` per distinct file, sorted: the same files unchanged give the
    same string in every run; a file replaced, rewritten (size or mtime), or whose header
    changed (even with size and mtime kept) gives another.
    """
    return "\n".join(sorted({s.line() for s in sources}))


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset of the first byte in ``file``
    end: int  # absolute offset one past the last byte
    # the file as it was when this header was read; the Reader checks it again on open
    source: FileIdentity | None = field(default=None, compare=False, repr=False)

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
    def is_empty(self) -> bool:
        """No element: ``rows`` may still be huge (``[2**62, 0]``), so process it as one step."""
        return self.numel == 0

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def dtype_str(self) -> str:
        return dtype_name(self.dtype)


# ---- opening inputs: regular files only, never blocking --------------------------------

_FILE_KINDS = [
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
]


def _kind(mode: int) -> str:
    return next((text for test, text in _FILE_KINDS if test(mode)), "not a regular file")


def _not_regular(path: Path, mode: int) -> InputError:
    return InputError(
        f"is {_kind(mode)}, not a regular file",
        where=str(path),
        hint="inputs are read from regular files (or symbolic links to them); "
        "put the file itself there",
    )


def _os_error(path: Path, e: OSError, what: str = "cannot read") -> InputError:
    """One message per reason an input cannot be opened. All are bad input (exit 2)."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return InputError(
            "permission denied",
            where=str(path),
            hint="make it readable by this user (e.g. `chmod a+r`), or run as a user who can read it",
        )
    if e.errno == errno.ENOENT:
        if os.path.islink(path):
            return ReferenceNotFoundError(
                f"broken symbolic link (to {os.readlink(path)!r}, which does not exist)",
                where=str(path),
                hint="fetch the file it points to again",
            )
        return ReferenceNotFoundError("no such file or directory", where=str(path))
    if e.errno == errno.ELOOP:
        return InputError("symbolic link loop", where=str(path), hint="fix the links")
    return InputError(f"{what}: {e.strerror or e}", where=str(path))


def stat_input(path: Path) -> os.stat_result:
    """``os.stat`` (following symbolic links) with every failure as one :class:`InputError`."""
    try:
        return os.stat(path)
    except OSError as e:
        raise _os_error(path, e) from e
    except ValueError as e:  # an embedded NUL byte
        raise InputError(f"unusable file name ({e})", where=repr(str(path))) from e


def open_input(path: Path) -> tuple[int, os.stat_result]:
    """Open an input read-only; return the descriptor and its ``fstat``.

    Only regular files are opened; a symbolic link to one is normal (the Hugging Face cache is
    made of them).

    # subtle: open() on a FIFO blocks until a writer appears, and a character device such as
    # /dev/zero never ends. Both are refused from a stat before opening; the open itself uses
    # O_NONBLOCK, so one swapped in between cannot block either, and the descriptor is checked
    # again with fstat. O_NONBLOCK changes nothing for a regular file.
    """
    st = stat_input(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise _os_error(path, e, "cannot open") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _not_regular(path, st.st_mode)
    return fd, st


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
    parts = []
    while size > 0:
        part = os.pread(fd, min(size, 1 << 30), offset)
        if not part:
            break
        parts.append(part)
        size -= len(part)
        offset += len(part)
    return b"".join(parts)


# ---- JSON from untrusted files ------------------------------------------------------------

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict = 2, 6, 4
_BRIEF.maxstring, _BRIEF.maxlong, _BRIEF.maxother = 60, 40, 60


def brief(value: object) -> str:
    """``repr`` cut short (depth, length, digits): safe to put any JSON value in a message."""
    return _BRIEF.repr(value)


def parse_json(
    raw: bytes,
    *,
    where: str,
    what: str,
    error: type[InputError] = CorruptCheckpointError,
    hint: str | None = None,
) -> Any:
    """``json.loads`` whose every failure is one ``error`` naming ``where``.

    # subtle: besides JSONDecodeError, json.loads raises RecursionError on deep nesting and a
    # plain ValueError on an integer of more than ``sys.get_int_max_str_digits()`` digits
    # (4300 by default); both would otherwise surface as internal errors.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(
            f"{what} is not valid JSON (not UTF-8: byte {e.start} is {raw[e.start : e.start + 1]!r})",
            where=where,
            hint=hint,
        ) from e
    try:
        return json.loads(text)
    except RecursionError as e:
        raise error(f"{what} is not valid JSON: nested too deeply", where=where, hint=hint) from e
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON ({e})", where=where, hint=hint) from e
    except ValueError as e:  # int over the digit limit
        limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300
        raise error(
            f"{what} holds an integer of more than {limit} digits", where=where, hint=hint
        ) from e


def check_depth(
    value: Any,
    *,
    where: str,
    what: str,
    error: type[InputError] = CorruptCheckpointError,
    limit: int = MAX_JSON_DEPTH,
) -> None:
    """Refuse JSON nested deeper than ``limit`` (later code that recurses, such as
    ``json.dumps`` of metadata into an output index, would hit the recursion limit)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        if depth > limit:
            raise error(f"{what} is nested deeper than {limit} levels", where=where)
        stack.extend((c, depth + 1) for c in children)


def read_json(
    path: Path,
    *,
    what: str,
    limit: int,
    error: type[InputError] = CorruptCheckpointError,
    hint: str | None = None,
) -> tuple[Any, FileIdentity]:
    """Read and parse a JSON input file of at most ``limit`` bytes; also its identity."""
    fd, st = open_input(path)
    try:
        if st.st_size > limit:
            raise error(
                f"{what} is {st.st_size} bytes, over the {limit} a JSON file may have",
                where=str(path),
            )
        raw = pread_exact(fd, limit + 1, 0)
    except OSError as e:
        raise _os_error(path, e) from e
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise error(f"{what} is over the {limit} bytes a JSON file may have", where=str(path))
    identity = FileIdentity(
        path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, len(raw),
        hashlib.sha256(raw).hexdigest(),
    )  # fmt: skip
    return parse_json(raw, where=str(path), what=what, error=error, hint=hint), identity


# ---- safetensors headers ------------------------------------------------------------------


def _corrupt(path: Path | str, message: str, hint: str | None = None) -> CorruptCheckpointError:
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
    specs, _, _ = _parse(Path(path))
    return specs


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (``{}`` when absent)."""
    _, meta, _ = _parse(Path(path))
    return meta


def header_length(path: Path | str, prefix: bytes, size: int) -> int:
    """The JSON header length from the first 8 bytes, checked against the file size."""
    if len(prefix) < 8:
        raise _corrupt(path, f"file is {size} bytes, too short for a safetensors header")
    (hlen,) = struct.unpack("<Q", prefix[:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
        raise _corrupt(
            path,
            f"header length {hlen} runs past the end of the file ({size} bytes)"
            if 8 + hlen > size
            else f"header length {hlen} is over the {MAX_HEADER_BYTES} bytes safetensors allows",
            "the file is truncated or not safetensors; re-download it",
        )
    return hlen


def _parse(path: Path) -> tuple[dict[str, TensorSpec], dict[str, str], FileIdentity]:
    fd, st = open_input(path)
    try:
        size = st.st_size
        prefix = pread_exact(fd, 8, 0)
        hlen = header_length(path, prefix, size)
        raw = pread_exact(fd, hlen, 8)
    except OSError as e:
        raise _os_error(path, e) from e
    finally:
        os.close(fd)
    if len(raw) < hlen:
        raise _corrupt(path, "file ended inside its header (it shrank while being read)")
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
        raise _corrupt(loc, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _corrupt(loc, "__metadata__ is not a JSON object")
    for k, v in meta.items():
        if not isinstance(v, str):  # safetensors: a map of string to string
            raise _corrupt(loc, f"__metadata__ value of {brief(k)} is {brief(v)}, not a string")

    data_start = 8 + len(raw)
    data_len = size - data_start
    entries: list[tuple[int, int, str, torch.dtype, tuple[int, ...]]] = []
    for name, info in header.items():
        n = brief(name)
        if not isinstance(info, dict):
            raise _corrupt(loc, f"tensor {n}: entry is not a JSON object")
        dt = info.get("dtype")
        if not isinstance(dt, str) or dt not in DTYPES:  # a list is unhashable: check type first
            raise _corrupt(
                loc,
                f"tensor {n}: unknown dtype {brief(dt)}",
                f"supported: {', '.join(sorted(DTYPES))}",
            )
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise _corrupt(loc, f"tensor {n}: shape {brief(shape)} is not a list of sizes")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(loc, f"tensor {n}: data_offsets {brief(offsets)} are not [begin, end]")
        torch_dtype = DTYPES[dt]
        _check_shape(loc, n, shape, torch_dtype)
        expected = math.prod(shape) * torch_dtype.itemsize
        if offsets[1] - offsets[0] != expected:
            raise _corrupt(
                loc,
                f"tensor {n}: {offsets[1] - offsets[0]} bytes for {dt} {brief(shape)} "
                f"(expected {brief(expected)})",
            )
        entries.append((offsets[0], offsets[1], name, torch_dtype, tuple(shape)))

    entries.sort()
    position = 0
    for begin, end, name, _, _ in entries:
        if begin < position:
            raise _corrupt(loc, f"tensor {brief(name)}: data overlaps the previous tensor")
        if begin > position:
            raise _corrupt(loc, f"tensor {brief(name)}: hole of {begin - position} bytes before it")
        position = end
    if position > data_len:
        raise _corrupt(
            loc,
            f"truncated: tensors need {brief(position)} data bytes, the file has {data_len}",
            "the download or copy was interrupted; fetch the file again",
        )
    if position < data_len:
        raise _corrupt(loc, f"{data_len - position} unexpected bytes after the last tensor")

    specs = {
        name: TensorSpec(name, dtype, shape, path, data_start + begin, data_start + end, identity)
        for begin, end, name, dtype, shape in entries
    }
    return specs, dict(meta)


def _check_shape(loc: str, name: str, shape: list[int], dtype: torch.dtype) -> None:
    """Refuse a shape torch cannot hold, decided from the header alone.

    A tensor with data has ``numel * itemsize`` bytes inside the file, so every size and
    stride fits in 64 bits. An empty one (a 0 in its shape) has none, and its other sizes are
    unbounded by the file: ``[2**62, 0]`` is a valid empty tensor, ``[2**64, 0]`` is no
    tensor at all, and ``[0, 2**62, 2**62]`` overflows torch's stride computation. torch
    itself decides, on the meta device (no memory).
    """
    big = next((d for d in shape if d > MAX_DIM), None)
    if big is not None:
        raise _corrupt(
            loc,
            f"tensor {name}: size {brief(big)} in shape {brief(shape)} does not fit in a signed "
            "64-bit integer, so no tensor has this shape",
        )
    if 0 in shape:
        try:
            torch.empty(shape, dtype=dtype, device="meta")
        except (RuntimeError, ValueError, OverflowError, TypeError) as e:
            raise _corrupt(
                loc,
                f"tensor {name}: torch cannot represent shape {brief(shape)} "
                f"({str(e).splitlines()[0][:80]})",
            ) from e


# ---- checkpoints: a directory, an index or one file ---------------------------------------


@dataclass
class Checkpoint:
    """All tensors of one model reference, from headers only, in file/data order."""

    reference: str
    files: list[Path]
    tensors: dict[str, TensorSpec]
    root: Path | None = None  # the directory holding config/tokenizer files, if any
    metadata: dict[str, object] = field(default_factory=dict)  # index "metadata", if any
    # every file read to index it (shards and the index): for identity checks and resume
    sources: dict[Path, FileIdentity] = field(default_factory=dict, repr=False)

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

    @property
    def identity(self) -> str:
        """Resolved path, size, mtime and header sha256 of every file read, one per line.

        Stable while the files are unchanged; put it in a resume fingerprint so that a rerun
        after an input was replaced or rewritten (even keeping size and mtime) starts over.
        """
        return identity_of(self.sources.values())


def load_checkpoint(path: str | os.PathLike, *, reference: str | None = None) -> Checkpoint:
    """Index a local checkpoint: a directory, its ``*.safetensors.index.json``, or one file.

    A directory with ``model.safetensors.index.json`` (or exactly one other
    ``*.safetensors.index.json``) is read through its ``weight_map``; otherwise every
    ``*.safetensors`` in it is read (names must not repeat across files, and numbered shards
    ``*-0000i-of-0000N.safetensors`` must all be there). An unfinished stream-tv output is
    refused (see :func:`check_finished`).
    """
    p = Path(path)
    ref = reference or str(path)
    st = stat_input(p)
    if stat.S_ISDIR(st.st_mode):
        return _load_directory(p, ref)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(p, st.st_mode)
    if p.name.endswith(".index.json"):
        check_finished(p.parent)
        return _load_index(p, ref)
    if p.suffix != ".safetensors":
        raise ReferenceNotFoundError(
            "not a .safetensors file",
            where=str(p),
            hint="pass a directory, a .safetensors file or its .index.json",
        )
    specs, _, identity = _parse(p)
    return Checkpoint(ref, [p], specs, root=p.parent, sources={p: identity})


def _list_dir(p: Path) -> list[str]:
    try:
        return sorted(os.listdir(p))
    except OSError as e:
        raise _os_error(p, e, "cannot list the directory") from e


def check_finished(directory: Path, names: Iterable[str] | None = None) -> None:
    """Refuse a directory that an unfinished stream-tv run left (or is writing).

    Its marks: the journal ``.stream-tv/state.json`` (written first, removed after the index)
    or a ``.<shard>.partial`` file. Such a directory holds some of the shards, and may hold an
    index from a previous run: as an input it would be silently incomplete.
    """
    from .writer import STATE_DIR, STATE_FILE  # writer imports this module

    names = _list_dir(directory) if names is None else list(names)
    journal = directory / STATE_DIR / STATE_FILE
    partial = [n for n in names if n.startswith(".") and n.endswith(".partial")]
    has_journal = os.path.lexists(journal)
    if not (has_journal or partial):
        return
    progress = ""
    if has_journal:
        try:
            state, _ = read_json(journal, what="journal", limit=MAX_INDEX_BYTES)
            done, total = len(state["completed"]), len(state["shards"])
            progress = f", {done} of {total} shard(s) written"
        except (InputError, KeyError, TypeError):
            pass  # the journal's details are a courtesy; its presence is the fact
    mark = f"{STATE_DIR}/{STATE_FILE}" if has_journal else partial[0]
    raise CorruptCheckpointError(
        f"is an unfinished stream-tv output ({mark} is present{progress}): a run writing it "
        "was interrupted, or is still running",
        where=str(directory),
        hint="finish it by rerunning the stream-tv command that wrote it (it resumes), "
        "or wait for that run to end",
    )


_NUMBERED = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")


def _check_numbered_shards(where: str, files: list[str]) -> None:
    """Without an index, ``model-00003-of-00010.safetensors`` says there are 10 shards."""
    groups: dict[tuple[str, str], set[int]] = {}
    for name in files:
        m = _NUMBERED.match(name)
        if m:
            groups.setdefault((m["stem"], m["n"]), set()).add(int(m["i"]))
    for (stem, n), present in sorted(groups.items()):
        missing = sorted(set(range(1, int(n) + 1)) - present)
        if missing:
            names = [f"{stem}-{i:0{len(n)}d}-of-{n}.safetensors" for i in missing[:3]]
            more = " ..." if len(missing) > 3 else ""
            raise ReferenceNotFoundError(
                f"has {len(present)} of the {int(n)} shards {stem}-*-of-{n}.safetensors and no "
                f"index; missing {', '.join(names)}{more}",
                where=where,
                hint="the download or copy is incomplete: fetch the missing shards "
                "(and model.safetensors.index.json)",
            )


def pick_weights(names: Iterable[str], *, where: str) -> tuple[str | None, list[str]]:
    """Which of a directory's (or Hub repo's) top-level files hold the weights.

    Returns ``(index, [])`` for ``model.safetensors.index.json`` (or the only other
    ``*.safetensors.index.json``), else ``(None, files)``: every ``*.safetensors``, the
    numbered ``*-0000i-of-0000N`` ones complete. Hidden files are ignored. A Mistral-style repo
    with an index and ``consolidated.safetensors`` is read through its index only.

    >>> pick_weights(["consolidated.safetensors", INDEX_NAME, "model-00001-of-00001.safetensors"], where="x")
    ('model.safetensors.index.json', [])
    """
    names = sorted(n for n in names if not n.startswith("."))
    if INDEX_NAME in names:
        return INDEX_NAME, []
    others = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(others) == 1:
        return others[0], []
    if len(others) > 1:
        raise ReferenceNotFoundError(
            f"holds {len(others)} index files ({', '.join(others[:3])}) and no {INDEX_NAME}",
            where=where,
            hint="pass the index file to use",
        )
    files = [n for n in names if n.endswith(".safetensors")]
    if not files:
        pickles = [n for n in names if n.endswith((".bin", ".pt"))]
        hint = (
            f"found {', '.join(pickles[:3])}: pickled weights are not read; convert them with "
            "`model.save_pretrained(dir, safe_serialization=True)`"
            if pickles
            else "expected model.safetensors.index.json or *.safetensors"
        )
        raise ReferenceNotFoundError(
            "no safetensors files in this directory", where=where, hint=hint
        )
    _check_numbered_shards(where, files)
    return None, files


def _load_directory(p: Path, ref: str) -> Checkpoint:
    names = _list_dir(p)
    check_finished(p, names)
    index, files = pick_weights(names, where=str(p))
    if index is not None:
        return _load_index(p / index, ref)
    tensors: dict[str, TensorSpec] = {}
    sources: dict[Path, FileIdentity] = {}
    for fname in files:
        f = p / fname
        specs, _, sources[f] = _parse(f)
        for name, spec in specs.items():
            if name in tensors:
                raise CorruptCheckpointError(
                    f"tensor {brief(name)} appears in both {tensors[name].file.name} and {fname}",
                    where=str(p),
                    hint="keep one set of shards in the directory",
                )
            tensors[name] = spec
    return Checkpoint(ref, [p / f for f in files], tensors, root=p, sources=sources)


def shard_name(index: Path | str, fname: str) -> str:
    """A shard name from an index, normalised, if it names a file inside the index's directory.

    Subdirectories are allowed (``sub/x.safetensors``), as transformers allows them; an
    absolute path, a ``..`` component, an empty name or a NUL byte is refused. Symbolic links
    inside the directory are followed, as everywhere (the Hugging Face cache is made of them).

    >>> shard_name("i.json", "./sub//x.safetensors")
    'sub/x.safetensors'
    """
    parts = [q for q in fname.split("/") if q not in ("", ".")]
    if fname.startswith("/") or ".." in parts or not parts or "\0" in fname:
        raise CorruptCheckpointError(
            f"index names a file outside its directory, or no file: {brief(fname)}",
            where=str(index),
            hint="weight_map values are file names relative to the index's directory",
        )
    return "/".join(parts)


def parse_index(data: Any, *, where: str) -> tuple[dict[str, list[str]], dict[str, object]]:
    """An index's JSON -> ``{shard name: [tensor names]}`` (shard names sorted, normalised by
    :func:`shard_name`) and its ``metadata`` (``{}`` when absent or not an object)."""
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, Mapping) or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise CorruptCheckpointError("index has no weight_map of tensor name -> file", where=where)
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    check_depth(meta, where=where, what="index metadata")
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(shard_name(where, fname), []).append(name)
    return dict(sorted(by_file.items())), dict(meta)


def select_tensors(
    by_file: Mapping[str, list[str]],
    headers: Mapping[str, Mapping[str, TensorSpec]],
    *,
    where: str,
) -> dict[str, TensorSpec]:
    """The tensors an index names, shard by shard in data order (sequential reads)."""
    tensors: dict[str, TensorSpec] = {}
    for fname, names in by_file.items():
        specs = headers[fname]
        wanted = set(names)
        missing = sorted(wanted - specs.keys())
        if missing:
            raise CorruptCheckpointError(
                f"index says {len(missing)} tensor(s) are in {fname}, but its header lacks them "
                f"(e.g. {', '.join(brief(m) for m in missing[:3])})",
                where=where,
                hint="the index and the shards come from different saves",
            )
        tensors.update((name, spec) for name, spec in specs.items() if name in wanted)
    return tensors


def _load_index(index: Path, ref: str) -> Checkpoint:
    data, index_identity = read_json(index, what="index", limit=MAX_INDEX_BYTES)
    by_file, meta = parse_index(data, where=str(index))
    root = index.parent
    headers: dict[str, dict[str, TensorSpec]] = {}
    sources: dict[Path, FileIdentity] = {index: index_identity}
    for fname in by_file:
        fpath = root / fname
        try:
            os.stat(fpath)
        except FileNotFoundError:
            raise missing_shard(index, fname, meta) from None
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                raise _os_error(fpath, e) from e
            raise CorruptCheckpointError(  # e.g. a name longer than the file system allows
                f"index names an unusable file {fname[:80]!r}: {e.strerror}", where=str(index)
            ) from e
        headers[fname], _, sources[fpath] = _parse(fpath)
    tensors = select_tensors(by_file, headers, where=str(index))
    files = [root / f for f in headers]
    return Checkpoint(ref, files, tensors, root=root, metadata=meta, sources=sources)


def missing_shard(index: Path | str, fname: str, meta: Mapping[str, object]) -> InputError:
    """The refusal for an index naming a shard that is not there (ours: say how to redo it)."""
    from .writer import CHECKSUMS_KEY

    if CHECKSUMS_KEY in meta or "stream_tv_version" in meta:
        return CorruptCheckpointError(
            f"index names shard {fname!r}, which does not exist: this stream-tv output is "
            "incomplete (a shard was removed after it was written)",
            where=str(index),
            hint="write it again: rerun the stream-tv command that wrote it with --overwrite",
        )
    return ReferenceNotFoundError(
        f"index names shard {fname!r}, which does not exist",
        where=str(index),
        hint="the download is incomplete; fetch the missing shard",
    )
