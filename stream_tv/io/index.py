"""A checkpoint from its headers: a directory (with an index, or its ``*.safetensors``), an
index file, or one ``.safetensors`` file; every tensor's spec, no tensor data read.

This module is also the package's one place to import the reading side from: it re-exports
the specs (:mod:`.specs`), the header parser (:mod:`.header`) and the input rules
(:mod:`.inputs`).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError, InputError, ReferenceNotFoundError
from .header import (
    MAX_HEADER_BYTES,
    header_length,
    parse_file,
    parse_header,
    read_header,
    read_metadata,
)
from .inputs import (
    MAX_JSON_DEPTH,
    FileIdentity,
    brief,
    check_depth,
    identity_of,
    not_regular,
    os_error,
    parse_json,
    read_json,
    stat_input,
)
from .specs import DTYPE_SIZES, DTYPES, FLOAT_NAMES, MAX_DIM, TensorSpec, dtype_name, parse_dtype

INDEX_NAME = "model.safetensors.index.json"
#: The base's config as a task vector keeps it: under another name, so that no loader takes
#: the task vector for a model, while binding an adapter to it still has the model's facts.
BASE_CONFIG_NAME = "base_config.json"
MAX_INDEX_BYTES = 64 * 1024 * 1024  # the largest Hub indexes are ~10 MB

__all__ = [
    "DTYPES",
    "DTYPE_SIZES",
    "FLOAT_NAMES",
    "INDEX_NAME",
    "BASE_CONFIG_NAME",
    "MAX_DIM",
    "MAX_HEADER_BYTES",
    "MAX_INDEX_BYTES",
    "MAX_JSON_DEPTH",
    "Checkpoint",
    "FileIdentity",
    "TensorSpec",
    "brief",
    "check_depth",
    "check_finished",
    "dtype_name",
    "identity_of",
    "load_checkpoint",
    "parse_dtype",
    "parse_header",
    "parse_json",
    "read_header",
    "read_json",
    "read_metadata",
    "header_length",
]


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
        raise not_regular(p, st.st_mode)
    if p.name.endswith(".index.json"):
        check_finished(p.parent)
        return _load_index(p, ref)
    if p.suffix != ".safetensors":
        raise ReferenceNotFoundError(
            "not a .safetensors file",
            where=str(p),
            hint="pass a directory, a .safetensors file or its .index.json",
        )
    specs, _, identity = parse_file(p)
    return Checkpoint(ref, [p], specs, root=p.parent, sources={p: identity})


def _list_dir(p: Path) -> list[str]:
    try:
        return sorted(os.listdir(p))
    except OSError as e:
        raise os_error(p, e, "cannot list the directory") from e


def check_finished(directory: Path, names: Iterable[str] | None = None) -> None:
    """Refuse a directory that an unfinished stream-tv run left (or is writing).

    Its marks: the journal ``.stream-tv/state.json`` (written first, removed after the index)
    or a ``.<shard>.partial`` file. Such a directory holds some of the shards, and may hold an
    index from a previous run: as an input it would be silently incomplete.
    """
    from .outdir import STATE_DIR, STATE_FILE  # outdir imports this module

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
        specs, _, sources[f] = parse_file(f)
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
                raise os_error(fpath, e) from e
            raise CorruptCheckpointError(  # e.g. a name longer than the file system allows
                f"index names an unusable file {fname[:80]!r}: {e.strerror}", where=str(index)
            ) from e
        headers[fname], _, sources[fpath] = parse_file(fpath)
    tensors = select_tensors(by_file, headers, where=str(index))
    files = [root / f for f in headers]
    return Checkpoint(ref, files, tensors, root=root, metadata=meta, sources=sources)


def missing_shard(index: Path | str, fname: str, meta: Mapping[str, object]) -> InputError:
    """The refusal for an index naming a shard that is not there (ours: say how to redo it)."""
    from .outdir import CHECKSUMS_KEY

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
