"""Resolve a model reference to local files; the only module that imports huggingface_hub.

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

from .errors import ReferenceNotFoundError
from .io.index import Checkpoint, load_checkpoint

# What a Hub download fetches: weights in safetensors, configs, and tokenizer files that
# `merge` copies next to its output. Pickles (*.bin, *.pt, *.pth, *.pkl) are never fetched.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.txt"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[\w.\-]{1,96}(@[\w.\-/]+)?$")


def split_hub_id(reference: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; ``None`` if it cannot be a Hub id."""
    if reference.startswith((".", "/", "~")) or not _HUB_ID.match(reference):
        return None
    repo, _, rev = reference.partition("@")
    return repo, (rev or None)


def resolve(reference: str | os.PathLike, *, patterns: list[str] | None = None) -> Path:
    """Return a local path (directory or file) for a reference, downloading if needed."""
    text = os.fspath(reference)
    path = Path(text).expanduser()
    if path.exists():
        return path
    hub = split_hub_id(text)
    if hub is None:
        raise ReferenceNotFoundError(
            "no such file or directory",
            where=text,
            hint="pass a local directory, a .safetensors file, or a Hub id like org/name[@revision]",
        )
    return _download(text, *hub, patterns=patterns or HUB_PATTERNS)


def _download(text: str, repo_id: str, revision: str | None, *, patterns: list[str]) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ReferenceNotFoundError(
            "is not a local path, and huggingface_hub is not installed to fetch it",
            where=text,
            hint="pip install huggingface_hub",
        ) from e
    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id=repo_id, revision=revision, allow_patterns=patterns
            )
        )
    except hf_errors.GatedRepoError as e:
        raise ReferenceNotFoundError(
            "the Hub repository is gated",
            where=text,
            hint="accept its terms on the Hub and log in with `hf auth login`",
        ) from e
    except hf_errors.RepositoryNotFoundError as e:
        raise ReferenceNotFoundError(
            "not a local path, and no such Hub repository (or it is private)",
            where=text,
            hint="check the spelling, or log in with `hf auth login` for a private repository",
        ) from e
    except hf_errors.RevisionNotFoundError as e:
        raise ReferenceNotFoundError(
            f"the Hub repository has no revision {revision!r}", where=text
        ) from e
    except hf_errors.LocalEntryNotFoundError as e:
        raise ReferenceNotFoundError(
            "not a local path, and not in the Hugging Face cache"
            + (" (HF_HUB_OFFLINE is set)" if _offline() else " (and the Hub cannot be reached)"),
            where=text,
            hint="download it first with `hf download` on a machine with network access",
        ) from e
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        raise ReferenceNotFoundError(f"could not fetch from the Hub: {e}", where=text) from e


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def open_checkpoint(reference: str | os.PathLike) -> Checkpoint:
    """Resolve a model reference and index it from its headers."""
    return load_checkpoint(resolve(reference), reference=os.fspath(reference))
