"""The Hugging Face Hub: downloads, and headers read in place; the only module that imports
huggingface_hub.

Two ways to get at a Hub model ``org/name[@revision]``:

- :func:`download` fetches what a command needs into the Hugging Face cache: the weight files
  the repository's layout names (its index and the shards it lists, or its ``*.safetensors``;
  a Mistral-style repo holding both ``consolidated.safetensors`` and sharded files gets the
  shards only) and the side files (configs, tokenizer, chat templates). Never pickles.
  ``HF_HUB_OFFLINE=1`` uses the cache only.
- :func:`read_headers` reads only the safetensors headers, with HTTP range requests (the
  first 100 kB of each file, and the rest of a header longer than that): ``inspect`` of a
  70B model transfers a few MB, not 140 GB. The headers are checked by the same parser as
  local files.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import InputError, ReferenceNotFoundError
from .io.index import (
    INDEX_NAME,
    MAX_INDEX_BYTES,
    Checkpoint,
    FileIdentity,
    TensorSpec,
    header_length,
    load_checkpoint,
    missing_shard,
    parse_header,
    parse_index,
    pick_weights,
    read_json,
    select_tensors,
)

# Side files a download fetches with the weights: configs, and the tokenizer and chat-template
# files that `merge` copies next to its output. Pickles (*.bin, *.pt, *.pth, *.pkl) never.
SIDE_PATTERNS = ["*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
HUB_PATTERNS = ["*.safetensors", *SIDE_PATTERNS]
FIRST_READ = (
    100_000  # bytes of the first range request; most headers fit (huggingface_hub's choice)
)
_PARALLEL = 8  # header requests in flight


def _hub(text: str) -> Any:
    try:
        import huggingface_hub
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ReferenceNotFoundError(
            "is not a local path, and huggingface_hub is not installed to fetch it",
            where=text,
            hint="pip install huggingface_hub",
        ) from e
    return huggingface_hub


def offline() -> bool:
    """Whether huggingface_hub will use its cache only (``HF_HUB_OFFLINE``)."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _refusal(e: Exception, text: str, revision: str | None) -> InputError | None:
    """One message for a failure of huggingface_hub, or None if it is not one of its errors."""
    from huggingface_hub import errors as hf_errors

    if isinstance(e, hf_errors.GatedRepoError):
        return ReferenceNotFoundError(
            "the Hub repository is gated",
            where=text,
            hint="accept its terms on the Hub and log in with `hf auth login`",
        )
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return ReferenceNotFoundError(
            "not a local path, and no such Hub repository (or it is private)",
            where=text,
            hint="check the spelling, or log in with `hf auth login` for a private repository",
        )
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return ReferenceNotFoundError(
            f"the Hub repository has no revision {revision!r}", where=text
        )
    if isinstance(e, hf_errors.LocalEntryNotFoundError):
        return ReferenceNotFoundError(
            "not a local path, and not in the Hugging Face cache"
            + (" (HF_HUB_OFFLINE is set)" if offline() else " (and the Hub cannot be reached)"),
            where=text,
            hint="download it first with `hf download` on a machine with network access",
        )
    if isinstance(e, (hf_errors.HfHubHTTPError, OSError, ValueError)):
        return ReferenceNotFoundError(f"could not fetch from the Hub: {e}", where=text)
    return None


def _call(text: str, revision: str | None, fn: Callable[..., Any], /, *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)``, a huggingface_hub failure turned into one message."""
    try:
        return fn(*args, **kw)
    except InputError:
        raise
    except Exception as e:
        refusal = _refusal(e, text, revision)
        if refusal is None:
            raise
        raise refusal from e


def download(
    text: str, repo_id: str, revision: str | None, *, patterns: list[str] | None = None
) -> Path:
    """Fetch a Hub repository's files into the cache; return the snapshot directory.

    ``patterns`` (fnmatch, as ``snapshot_download``'s ``allow_patterns``) chooses the files;
    by default the weight files :func:`stream_tv.io.index.pick_weights` names, listed from
    the repository first, and :data:`SIDE_PATTERNS`.
    """
    hf = _hub(text)
    if patterns is None:
        patterns, revision = _model_patterns(hf, text, repo_id, revision)
    path = _call(
        text,
        revision,
        hf.snapshot_download,
        repo_id=repo_id,
        revision=revision,
        allow_patterns=patterns,
    )
    return Path(path)


def _model_patterns(
    hf: Any, text: str, repo_id: str, revision: str | None
) -> tuple[list[str], str | None]:
    """The files a model download needs, and the commit they were listed at.

    # subtle: ``*.safetensors`` would fetch both ``consolidated.safetensors`` and the shards
    # of a Mistral-style repository (twice the model); so the repository is listed and its
    # index read first, as load_checkpoint would choose. Offline, or when the Hub cannot be
    # reached, snapshot_download serves the cache and the patterns choose nothing more.
    """
    if offline():
        return HUB_PATTERNS, revision
    info = _repo_info(hf, text, repo_id, revision, files_metadata=False)
    if info is None:  # the Hub cannot be reached: snapshot_download falls back to the cache
        return HUB_PATTERNS, revision
    names = [s.rfilename for s in info.siblings or []]
    index, files = pick_weights([n for n in names if "/" not in n], where=f"{text} (on the Hub)")
    if index is not None:
        local = _call(text, revision, hf.hf_hub_download, repo_id, index, revision=info.sha)
        data, _ = read_json(Path(local), what="index", limit=MAX_INDEX_BYTES)
        files = [index, *parse_index(data, where=f"{text}: {index}")[0]]
    return [glob.escape(f) for f in files] + SIDE_PATTERNS, info.sha


def _repo_info(hf: Any, text: str, repo_id: str, revision: str | None, **kw: Any) -> Any:
    """``model_info``, or None when the Hub cannot be reached (no network, DNS, proxy)."""
    from huggingface_hub import errors as hf_errors

    try:
        return hf.HfApi().model_info(repo_id, revision=revision, **kw)
    except hf_errors.HfHubHTTPError as e:  # the Hub answered: not found, gated, no revision
        raise _refusal(e, text, revision) or e from e
    except Exception as e:
        if _network_error(e):
            return None
        raise


_HTTP_STACK = {"httpx", "httpx2", "requests", "urllib3", "socket", "ssl"}


def _network_error(e: BaseException) -> bool:
    """A failure to reach the Hub (no network, DNS, proxy, TLS, timeout).

    # subtle: requests' errors are OSErrors, httpx's are not; huggingface_hub has used both.
    """
    return isinstance(e, OSError) or any(
        c.__module__.split(".")[0] in _HTTP_STACK for c in type(e).__mro__
    )


def read_headers(text: str, repo_id: str, revision: str | None) -> Checkpoint:
    """Index a Hub model from its safetensors headers only: no weight byte is downloaded.

    The index (a JSON file) goes to the Hugging Face cache; each shard's header is read with
    HTTP range requests and checked by the same parser as a local file. Specs carry a
    :class:`FileIdentity` with the file's URL, and a :class:`stream_tv.io.reader.Reader`
    refuses to read them. Offline, or when the Hub cannot be reached, the cached snapshot's
    headers are read instead (refused if it is not cached).
    """
    hf = _hub(text)
    info = None if offline() else _repo_info(hf, text, repo_id, revision, files_metadata=True)
    if info is None:
        path = _call(
            text,
            revision,
            hf.snapshot_download,
            repo_id=repo_id,
            revision=revision,
            allow_patterns=HUB_PATTERNS,
            local_files_only=True,
        )
        return load_checkpoint(path, reference=text)
    sha = info.sha
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    repo = f"{repo_id}@{sha}"
    index, files = pick_weights([n for n in sizes if "/" not in n], where=f"{text} (on the Hub)")
    metadata: dict[str, object] = {}
    sources: dict[Path, FileIdentity] = {}
    by_file: dict[str, list[str]] | None = None
    if index is not None:
        local = Path(_call(text, revision, hf.hf_hub_download, repo_id, index, revision=sha))
        data, sources[Path(index)] = read_json(local, what="index", limit=MAX_INDEX_BYTES)
        by_file, metadata = parse_index(data, where=f"{repo}/{index}")
        files = list(by_file)
        for fname in files:
            if fname not in sizes:
                raise missing_shard(f"{repo}/{index}", fname, metadata)

    def one(fname: str) -> tuple[str, dict[str, TensorSpec], FileIdentity]:
        specs, identity = _remote_header(hf, text, repo_id, sha, fname, sizes[fname])
        return fname, specs, identity

    with ThreadPoolExecutor(max_workers=min(_PARALLEL, max(len(files), 1))) as pool:
        results = list(pool.map(one, files))
    headers = {fname: specs for fname, specs, _ in results}
    sources.update((Path(fname), identity) for fname, _, identity in results)
    if by_file is not None:
        tensors = select_tensors(by_file, headers, where=f"{repo}/{index}")
    else:
        tensors = {}
        for fname, specs in headers.items():
            for name, spec in specs.items():
                if name in tensors:
                    raise ReferenceNotFoundError(
                        f"tensor {name!r} appears in both {tensors[name].file} and {fname}",
                        where=repo,
                    )
                tensors[name] = spec
    return Checkpoint(
        text, [Path(f) for f in files], tensors, root=None, metadata=metadata, sources=sources
    )


def _remote_header(
    hf: Any, text: str, repo_id: str, sha: str, fname: str, size: int | None
) -> tuple[dict[str, TensorSpec], FileIdentity]:
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    where = f"{repo_id}@{sha}/{fname}"
    url = hf.hf_hub_url(repo_id, fname, revision=sha)
    session = hf.get_session()
    auth = build_hf_headers()
    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT

    def get(first: int, last: int) -> tuple[bytes, int | None]:
        try:
            response = session.get(
                url, headers={**auth, "Range": f"bytes={first}-{last}"}, timeout=timeout
            )
        except Exception as e:
            if not _network_error(e):
                raise
            raise ReferenceNotFoundError(
                f"could not read the header from the Hub ({type(e).__name__}: {e})", where=where
            ) from e
        _call(text, sha, hf_raise_for_status, response)
        content = response.content
        total = _content_range_total(response.headers.get("Content-Range"))
        return content, total

    if size is not None and size < 8:
        header_length(where, b"", size)  # refuses: too short
    head, total = get(0, FIRST_READ - 1)
    size = size if size is not None else total
    if size is None:
        raise ReferenceNotFoundError("the Hub did not say how large this file is", where=where)
    if len(head) != min(size, FIRST_READ):
        raise ReferenceNotFoundError(
            f"the Hub answered a request for the first {min(size, FIRST_READ)} bytes with "
            f"{len(head)} bytes",
            where=where,
            hint="retry later; if it persists, download the model with `hf download`",
        )
    hlen = header_length(where, head[:8], size)
    if 8 + hlen <= len(head):
        raw = head[8 : 8 + hlen]
    else:
        raw, _ = get(8, 8 + hlen - 1)
        if len(raw) != hlen:
            raise ReferenceNotFoundError(
                f"the Hub answered a request for a {hlen}-byte header with {len(raw)} bytes",
                where=where,
            )
    identity = FileIdentity(
        Path(fname), 0, 0, size, 0, 8 + hlen,
        hashlib.sha256(head[:8] + raw).hexdigest(), url=url,
    )  # fmt: skip
    specs, _ = parse_header(Path(fname), raw, size, identity, where=where)
    return specs, identity


_RANGE_TOTAL = re.compile(r"^bytes \d+-\d+/(\d+)$")


def _content_range_total(value: str | None) -> int | None:
    """``"bytes 0-99999/123456"`` -> 123456."""
    m = _RANGE_TOTAL.match(value or "")
    return int(m[1]) if m else None


__all__ = ["HUB_PATTERNS", "INDEX_NAME", "SIDE_PATTERNS", "download", "offline", "read_headers"]
