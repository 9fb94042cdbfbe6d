"""A disk memo of :class:`~.model_facts.ModelFacts`: read a model's definition once per model.

Reading the facts costs seconds that have nothing to do with the model's size: importing
transformers and its modeling module (2.5x ``import torch``, measured in
``benchmarks/RESULTS.md``). The facts are a pure function of what they are read from, so they
are kept, keyed by all of it, and read back instead of rebuilt:

- the parsed ``config.json`` (canonical JSON), the load dtype asked for and the class named;
- the checkpoint as its headers describe it: every tensor's name, file name, dtype and shape in
  file order, the file order and the index metadata (no path, no data);
- the transformers that would read them: its version and where it is installed, and torch's
  version;
- the code that reads them: the sha256 of this module, ``model_facts.py`` and
  ``model_reading.py`` (a change to either is a new key, no format number to forget).

A key that cannot name the code is not cached: an editable (``pip install -e``) transformers,
or a ``transformers`` imported from elsewhere than its installed distribution. The memo never
decides anything itself: a miss, an unreadable, corrupt or foreign entry, or a directory that
cannot be written means the facts are read from the definition, as without it.

Where: ``$STREAM_TV_CACHE_DIR`` or ``$XDG_CACHE_HOME/stream-tv`` or ``~/.cache/stream-tv``,
under ``model-facts/``. ``STREAM_TV_FACTS_CACHE=0`` turns it off; deleting the folder is safe.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from ..io.index import Checkpoint

FORMAT = "stream-tv model facts 1"
_READERS = ("facts_cache.py", "model_facts.py", "model_reading.py")


@dataclass(frozen=True)
class TransformersInstall:
    """The transformers this process would import, found without importing it."""

    version: str
    origin: str  # its ``__init__.py``
    cacheable: bool  # a released install whose version names its code


def installed_transformers() -> TransformersInstall | None:
    """The installed transformers, or ``None`` when ``import transformers`` would fail."""
    if "transformers" in sys.modules:  # already imported: that one
        mod = sys.modules["transformers"]
        if mod is None:  # its import is blocked
            return None
        origin, version = str(getattr(mod, "__file__", "") or ""), getattr(mod, "__version__", None)
    else:
        try:
            spec = importlib.util.find_spec("transformers")
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.origin:
            return None
        origin, version = spec.origin, None
    try:
        dist = importlib.metadata.distribution("transformers")
    except importlib.metadata.PackageNotFoundError:
        return TransformersInstall(str(version or "0"), origin, False)
    installed = str(dist.locate_file("transformers/__init__.py"))
    same_file = os.path.realpath(installed) == os.path.realpath(origin)
    ours = same_file and version in (None, dist.version)
    return TransformersInstall(dist.version, origin, ours and not _editable(dist))


def _editable(dist: importlib.metadata.Distribution) -> bool:
    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except (OSError, ValueError):
        return True
    return bool((info.get("dir_info") or {}).get("editable"))


# ---- the key --------------------------------------------------------------------------------


def cache_key(
    install: TransformersInstall,
    config: Mapping[str, Any],
    dtype: torch.dtype | str,
    architecture: str | None,
    checkpoint: Checkpoint | None,
) -> str | None:
    """The sha256 naming these facts, or ``None`` when they must not be memoized."""
    if not install.cacheable or _directory() is None:
        return None
    h = hashlib.sha256()

    def put(*parts: object) -> None:
        for p in parts:
            h.update(str(p).encode())
            h.update(b"\0")

    put(FORMAT, install.version, os.path.realpath(install.origin), torch.__version__)
    put(_code_digest())
    put(json.dumps(config, sort_keys=True, default=str))
    put(_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype), architecture)
    if checkpoint is None:
        put("no checkpoint")
    else:
        put(*(f.name for f in checkpoint.files))
        put(json.dumps(checkpoint.metadata, sort_keys=True, default=str))
        for s in checkpoint.tensors.values():
            put(s.name, s.file.name, s.dtype_str, s.shape)
    return h.hexdigest()


@cache
def _code_digest() -> str:
    """The sha256 of the modules that read the facts (read once per process)."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in _READERS:
        h.update(name.encode() + b"\0" + hashlib.sha256((here / name).read_bytes()).digest())
    return h.hexdigest()


def _directory() -> Path | None:
    if os.environ.get("STREAM_TV_FACTS_CACHE", "1").strip().lower() in ("0", "off", "no", "false"):
        return None
    root = os.environ.get("STREAM_TV_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "stream-tv")
    return Path(root) / "model-facts"


# ---- reading and writing an entry -----------------------------------------------------------


def load(key: str | None):
    """The facts stored under ``key``, or ``None`` (a miss, or an entry that is not whole)."""
    directory = _directory()
    if key is None or directory is None:
        return None
    try:
        entry = json.loads((directory / f"{key}.json").read_bytes())
        body = entry["facts"]
        if entry.get("format") != FORMAT or entry.get("key") != key:
            return None
        if entry.get("sha256") != _digest(body):
            return None
        return decode(body)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def store(key: str | None, facts) -> bool:
    """Keep ``facts`` under ``key`` (atomically: a rename); ``False`` when it could not."""
    directory = _directory()
    if key is None or directory is None:
        return False
    body = encode(facts)
    data = json.dumps({"format": FORMAT, "key": key, "sha256": _digest(body), "facts": body})
    tmp = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key[:16]}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(tmp, directory / f"{key}.json")
        return True
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


def _digest(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ---- the facts as JSON (pure) ---------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"not a dtype: {name}")
    return value


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(v) -> tuple[int, ...] | None:
    return None if v is None else tuple(int(x) for x in v)


def encode(facts) -> dict[str, Any]:
    """``facts`` (a :class:`~.model_facts.ModelFacts`) as plain JSON values, order kept."""
    d = {
        f: getattr(facts, f)
        for f in (
            "architecture model_type transformers_version dtype_source base_model_prefix "
            "input_embeddings output_embeddings"
        ).split()
    }
    d["dtype"] = _name(facts.dtype)
    d["modules"] = [
        [m.path, m.kind, m.cls, m.weight_shape, m.bias_shape, m.params, m.aliases, m.transposed]
        for m in facts.modules.values()
    ]
    d["params"] = [
        [p.name, p.shape, _name(p.dtype), p.module, p.attr, p.bare, p.buffer, p.tied_to]
        for p in facts.params.values()
    ]
    for f in ("tied", "tie_word_embeddings", "keys_of_param", "saved_as"):
        d[f] = [[k, v] for k, v in getattr(facts, f).items()]
    for f in ("keep_in_fp32", "keep_in_fp32_strict"):
        d[f] = sorted(getattr(facts, f))
    for f in ("conversions", "unexpected_keys", "missing_params", "conversions_used"):
        d[f] = list(getattr(facts, f))
    d["ties"] = [[t.target, t.source, t.status] for t in facts.ties]
    d["param_of_key"] = [
        [k, s.param, s.expert, s.dim, s.start, s.stop, s.ops, s.exact]
        for k, s in facts.param_of_key.items()
    ]
    return json.loads(json.dumps(d))  # tuples as lists: what reading it back sees


def decode(d: Mapping[str, Any]):
    """The :class:`~.model_facts.ModelFacts` :func:`encode` wrote."""
    from .model_facts import KeySlice, ModelFacts, ModuleFact, ParamFact, TiePair

    modules = {
        m[0]: ModuleFact(
            m[0], m[1], m[2], _shape(m[3]), _shape(m[4]), tuple(m[5]), tuple(m[6]), m[7]
        )
        for m in d["modules"]
    }
    params = {
        p[0]: ParamFact(p[0], _shape(p[1]), _dtype(p[2]), p[3], p[4], p[5], p[6], p[7])
        for p in d["params"]
    }
    slices = {
        k[0]: KeySlice(k[1], k[2], k[3], k[4], k[5], tuple(k[6]), k[7]) for k in d["param_of_key"]
    }
    return ModelFacts(
        **{f: d[f] for f in ("architecture", "model_type", "transformers_version")},
        dtype=_dtype(d["dtype"]),
        dtype_source=d["dtype_source"],
        base_model_prefix=d["base_model_prefix"],
        modules=MappingProxyType(modules),
        params=MappingProxyType(params),
        tied=MappingProxyType(dict(d["tied"])),
        tie_word_embeddings=MappingProxyType(dict(d["tie_word_embeddings"])),
        keep_in_fp32=frozenset(d["keep_in_fp32"]),
        keep_in_fp32_strict=frozenset(d["keep_in_fp32_strict"]),
        input_embeddings=d["input_embeddings"],
        output_embeddings=d["output_embeddings"],
        conversions=tuple(d["conversions"]),
        ties=tuple(TiePair(*t) for t in d["ties"]),
        param_of_key=MappingProxyType(slices),
        keys_of_param=MappingProxyType({k: tuple(v) for k, v in d["keys_of_param"]}),
        unexpected_keys=tuple(d["unexpected_keys"]),
        missing_params=tuple(d["missing_params"]),
        saved_as=MappingProxyType({k: None if v is None else tuple(v) for k, v in d["saved_as"]}),
        conversions_used=tuple(d["conversions_used"]),
    )
