"""The model-facts memo gives back exactly what reading the definition gives, or nothing.

``stream_tv/lora/facts_cache.py`` keeps :class:`ModelFacts` on disk keyed by everything they
are read from. Checked here: for every architecture fixture the memo's facts equal freshly
read ones (field by field and in order); a hit imports no transformers; each input of the key
changes it; an entry that is not whole, a directory that cannot be written and a transformers
whose code its version does not name all fall back to reading the definition.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from collections.abc import Mapping

import pytest
import torch

pytest.importorskip("transformers")

import arch_fixtures as af  # noqa: E402

from stream_tv.io.index import load_checkpoint  # noqa: E402
from stream_tv.lora import facts_cache  # noqa: E402
from stream_tv.lora.model_facts import ModelFacts, read_model_facts  # noqa: E402

CASES = list(af.ARCH_CASES)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty memo of this test's own."""
    monkeypatch.setenv("STREAM_TV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("STREAM_TV_FACTS_CACHE", raising=False)
    return tmp_path / "cache" / "model-facts"


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    return lambda name: af.build_arch(name, tmp_path_factory)


def fresh(base, monkeypatch, **kw):
    with monkeypatch.context() as m:
        m.setenv("STREAM_TV_FACTS_CACHE", "0")
        return read_model_facts(base, **kw)


def assert_same(a: ModelFacts, b: ModelFacts) -> None:
    assert type(a) is type(b) is ModelFacts
    for f in dataclasses.fields(ModelFacts):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x == y, f.name
        assert type(x) is type(y), f.name
        if isinstance(x, Mapping):  # modules and params are in named_modules() order
            assert list(x) == list(y), f.name
            for k in x:
                assert type(x[k]) is type(y[k]), (f.name, k)


def entries(cache) -> list:
    return sorted(cache.glob("*.json")) if cache.is_dir() else []


@pytest.mark.parametrize("name", CASES)
def test_the_memo_gives_back_what_the_definition_says(arch, cache, monkeypatch, name):
    ckpt = load_checkpoint(arch(name).base)
    first = read_model_facts(ckpt)  # a miss: read from the definition, then kept
    assert len(entries(cache)) == 1
    second = read_model_facts(ckpt)  # a hit
    assert_same(second, fresh(ckpt, monkeypatch))
    assert_same(first, second)
    # the entry decodes to the same facts without the process that wrote it
    body = json.loads(entries(cache)[0].read_text())["facts"]
    assert_same(facts_cache.decode(body), first)


def test_a_hit_imports_no_transformers(arch, cache):
    base = arch("llama-tied-stored-head-equal").base
    code = (
        "import sys; from stream_tv.lora.model_facts import read_model_facts; "
        f"f = read_model_facts({str(base)!r}); print(bool(f), 'transformers' in sys.modules)"
    )
    env = {**os.environ, "STREAM_TV_CACHE_DIR": str(cache.parent)}

    def once() -> str:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
        )
        return out.stdout.strip()

    assert once() == "True True"  # read from the definition
    assert once() == "True False"  # from the memo


def test_every_input_is_in_the_key(arch, cache, monkeypatch, tmp_path):
    ckpt = load_checkpoint(arch("gpt2-legacy-names").base)
    config = json.loads((arch("gpt2-legacy-names").base / "config.json").read_text())
    install = facts_cache.installed_transformers()
    assert install is not None and install.cacheable

    def key(**kw):
        args = dict(install=install, config=config, dtype="auto", architecture=None)
        args["checkpoint"] = ckpt
        args.update(kw)
        return facts_cache.cache_key(**args)

    base = key()
    assert key() == base
    others = [
        key(config={**config, "n_layer": config["n_layer"] + 1}),
        key(dtype=torch.float16),
        key(dtype="bfloat16"),
        key(architecture="GPT2Model"),
        key(checkpoint=None),
        key(install=dataclasses.replace(install, version=install.version + ".post1")),
    ]
    # the checkpoint as its headers say: a tensor renamed, or of another dtype
    spec = next(iter(ckpt.tensors.values()))
    for changed in (
        dataclasses.replace(spec, name=spec.name + "_x"),
        dataclasses.replace(spec, dtype_str="F32" if spec.dtype_str != "F32" else "F16"),
        dataclasses.replace(spec, shape=(*spec.shape, 1)),
    ):
        tensors = {
            changed.name: changed,
            **{k: v for k, v in ckpt.tensors.items() if k != spec.name},
        }
        others.append(key(checkpoint=dataclasses.replace(ckpt, tensors=tensors)))
    # the code that reads the facts
    monkeypatch.setattr(facts_cache, "FORMAT", facts_cache.FORMAT + "x")
    others.append(key())
    assert len({base, *others}) == len(others) + 1


def test_an_entry_that_is_not_whole_is_read_again(arch, cache, monkeypatch):
    ckpt = load_checkpoint(arch("gpt2-legacy-names").base)
    want = fresh(ckpt, monkeypatch)
    read_model_facts(ckpt)
    (entry,) = entries(cache)
    good = entry.read_text()
    data = json.loads(good)
    data["facts"]["tied"] = []  # a body that no longer matches its checksum
    for bad in (good[: len(good) // 2], "", "[]", json.dumps(data)):
        entry.write_text(bad)
        assert_same(read_model_facts(ckpt), want)
        assert entry.read_text() == good  # rewritten whole


def test_the_memo_never_fails_a_run(arch, tmp_path, monkeypatch):
    ckpt = load_checkpoint(arch("gpt2-legacy-names").base)
    want = fresh(ckpt, monkeypatch)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("STREAM_TV_CACHE_DIR", str(blocker))  # cannot be created
    assert_same(read_model_facts(ckpt), want)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_off_switch(arch, cache, monkeypatch):
    monkeypatch.setenv("STREAM_TV_FACTS_CACHE", "0")
    assert read_model_facts(load_checkpoint(arch("gpt2-legacy-names").base))
    assert entries(cache) == []


def test_a_transformers_its_version_does_not_name_is_not_memoized(arch, cache, monkeypatch):
    install = facts_cache.installed_transformers()
    assert install is not None and install.cacheable  # the released wheel of this venv
    unnamed = dataclasses.replace(install, cacheable=False)  # editable, or not its dist's
    monkeypatch.setattr(facts_cache, "installed_transformers", lambda: unnamed)
    assert read_model_facts(load_checkpoint(arch("gpt2-legacy-names").base))
    assert entries(cache) == []


def test_a_transformers_imported_from_elsewhere_is_not_its_distribution(monkeypatch, tmp_path):
    real = sys.modules["transformers"]
    fake = types.ModuleType("transformers")
    fake.__file__ = str(tmp_path / "transformers" / "__init__.py")  # a source tree on sys.path
    fake.__version__ = real.__version__
    monkeypatch.setitem(sys.modules, "transformers", fake)
    assert not facts_cache.installed_transformers().cacheable
    fake.__file__, fake.__version__ = real.__file__, real.__version__ + ".dev0"
    assert not facts_cache.installed_transformers().cacheable
    fake.__version__ = real.__version__
    assert facts_cache.installed_transformers().cacheable
    monkeypatch.setitem(sys.modules, "transformers", None)  # its import is blocked
    assert facts_cache.installed_transformers() is None


class _Dist:
    def __init__(self, direct_url):
        self.direct_url = direct_url

    def read_text(self, name):
        assert name == "direct_url.json"
        return self.direct_url


def test_editable_installs_are_recognised():
    editable = json.dumps({"url": "file:///src/transformers", "dir_info": {"editable": True}})
    assert facts_cache._editable(_Dist(editable))
    assert not facts_cache._editable(_Dist(None))  # a wheel from an index
    assert not facts_cache._editable(_Dist(json.dumps({"url": "file:///w.whl", "dir_info": {}})))
    assert facts_cache._editable(_Dist("{not json"))  # unknown: not memoized
