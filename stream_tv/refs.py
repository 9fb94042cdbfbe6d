"""Resolve a model reference to local files, or to its headers; Hub access lives in hub.py.

A reference is, in this order of precedence:

- an existing local path: a directory (``model.safetensors.index.json`` or ``*.safetensors``)
  or a single ``.safetensors`` file;
- a Hugging Face Hub id ``org/name`` with an optional ``@revision``, fetched through
  ``huggingface_hub`` into its cache (``HF_HUB_OFFLINE=1`` is honoured: only the cache is
  used). Only safetensors, JSON and plain-text tokenizer files are fetched, never pickles.

>>> split_hub_id("meta-llama/Llama-3.1-8B@main")
('meta-llama/Llama-3.1-8B', 'main')
>>> split_hub_id("./local/dir") is None
True
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import hub
from .errors import ReferenceNotFoundError
from .hub import HUB_PATTERNS
from .io.index import Checkpoint, load_checkpoint

__all__ = ["HUB_PATTERNS", "open_checkpoint", "open_headers", "resolve", "split_hub_id"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[\w.\-]{1,96}(@[\w.\-/]+)?$")


def split_hub_id(reference: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; ``None`` if it cannot be a Hub id."""
    if reference.startswith((".", "/", "~")) or not _HUB_ID.match(reference):
        return None
    repo, _, rev = reference.partition("@")
    return repo, (rev or None)


def _local(reference: str | os.PathLike) -> tuple[str, Path | None, tuple[str, str | None] | None]:
    """``(text, local path or None, Hub id or None)``; refuses what is neither."""
    text = os.fspath(reference)
    path = Path(text).expanduser()
    if os.path.lexists(path):  # a broken symbolic link is a local path, refused by the loader
        return text, path, None
    hub_id = split_hub_id(text)
    if hub_id is None:
        raise ReferenceNotFoundError(
            "no such file or directory",
            where=text,
            hint="pass a local directory, a .safetensors file, or a Hub id like org/name[@revision]",
        )
    return text, None, hub_id


def resolve(reference: str | os.PathLike, *, patterns: list[str] | None = None) -> Path:
    """Return a local path (directory or file) for a reference, downloading if needed.

    ``patterns`` chooses the files of a Hub download (``snapshot_download``'s
    ``allow_patterns``); by default the model's weight files and its side files.
    """
    text, path, hub_id = _local(reference)
    if path is not None:
        return path
    return hub.download(text, *hub_id, patterns=patterns)


def open_checkpoint(reference: str | os.PathLike) -> Checkpoint:
    """Resolve a model reference (downloading a Hub model) and index it from its headers."""
    return load_checkpoint(resolve(reference), reference=os.fspath(reference))


def open_headers(reference: str | os.PathLike) -> Checkpoint:
    """Index a model reference from its headers only, downloading no weights.

    A local path is indexed as :func:`open_checkpoint` does. A Hub id is read in place: its
    index and each shard's header through HTTP range requests (see
    :func:`stream_tv.hub.read_headers`); the specs describe the files but cannot be read with
    a Reader. For ``inspect``; commands that read tensors use :func:`open_checkpoint`.
    """
    text, path, hub_id = _local(reference)
    if path is not None:
        return load_checkpoint(path, reference=text)
    return hub.read_headers(text, *hub_id)
