"""refs.py: model references, Hub ids resolved offline through a cache laid out as
huggingface_hub lays it out, and the download call replaced where a network would be needed."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from click.testing import CliRunner
from conftest import save_checkpoint
from huggingface_hub import constants
from huggingface_hub import errors as hf_errors

from stream_tv import refs
from stream_tv.cli import cli
from stream_tv.errors import ReferenceNotFoundError

MAIN = "a" * 40
V1 = "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline Hugging Face cache holding ``org/name`` at ``main`` and tag ``v1``.

    # subtle: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into ``constants`` at
    # import; setting the environment alone is too late, so the constants are patched too.
    """
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--org--name"
    save_checkpoint(repo / "snapshots" / MAIN, {"w": torch.ones(3), "b": torch.zeros(2)}, shards=2)
    save_checkpoint(repo / "snapshots" / V1, {"w": torch.full((4,), 2.0)})
    (repo / "snapshots" / MAIN / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local directory called org/name
    return cache


def test_hub_id_resolves_from_the_offline_cache(hub_cache):
    snap = hub_cache / "models--org--name" / "snapshots"
    assert refs.resolve("org/name").resolve() == (snap / MAIN).resolve()
    assert refs.resolve("org/name@v1").resolve() == (snap / V1).resolve()
    assert refs.resolve(f"org/name@{V1}").resolve() == (snap / V1).resolve()
    ckpt = refs.open_checkpoint("org/name")
    assert ckpt.reference == "org/name" and sorted(ckpt.tensors) == ["b", "w"]
    assert len(ckpt.files) == 2 and ckpt.root.resolve() == (snap / MAIN).resolve()
    assert list(refs.open_checkpoint("org/name@v1").tensors) == ["w"]


def test_offline_and_not_cached(hub_cache):
    for ref in ["org/other", "org/name@no-such-tag", "someone/else@" + "c" * 40]:
        with pytest.raises(ReferenceNotFoundError) as e:
            refs.resolve(ref)
        msg = str(e.value)
        assert msg.startswith(f"{ref}: ") and "not in the Hugging Face cache" in msg
        assert "HF_HUB_OFFLINE is set" in msg and "hf download" in msg


def test_cli_with_hub_ids(hub_cache, tmp_path):
    r = CliRunner().invoke(cli, ["inspect", "org/name@v1", "--json"])
    assert r.exit_code == 0 and '"total_params": 4' in r.stdout
    r = CliRunner().invoke(cli, ["extract", "org/name", "org/name@v1", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "only in the base (e.g. b)" in r.stderr
    r = CliRunner().invoke(cli, ["inspect", "org/missing"])
    assert r.exit_code == 2 and "org/missing" in r.stderr and "Traceback" not in r.output


def test_local_path_wins_over_hub_id(hub_cache, tmp_path):
    save_checkpoint(tmp_path / "org" / "name", {"local": torch.ones(1)})
    assert list(refs.open_checkpoint("org/name").tensors) == ["local"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("org/name", ("org/name", None)),
        ("meta-llama/Llama-3.1-8B@main", ("meta-llama/Llama-3.1-8B", "main")),
        ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
        (f"o.r-g_1/n.a-m_e@{MAIN}", ("o.r-g_1/n.a-m_e", MAIN)),
        ("./org/name", None),
        ("/abs/name", None),
        ("~/models", None),
        ("../org/name", None),
        ("a/b/c", None),
        ("name", None),
        ("org/", None),
        ("", None),
        ("org/name@", None),
        ("org name/x", None),
        ("C:\\models\\x", None),
    ],
)
def test_split_hub_id(text, expected):
    assert refs.split_hub_id(text) == expected


def test_path_like_reference_that_does_not_exist(tmp_path):
    for ref in [tmp_path / "missing", "./missing/x", "a/b/c"]:
        with pytest.raises(ReferenceNotFoundError, match="no such file or directory") as e:
            refs.resolve(ref)
        assert "Hub id" in str(e.value)


def test_download_fetches_no_pickles(tmp_path, monkeypatch):
    """With the download replaced: what is asked for, and what comes back."""
    local = save_checkpoint(tmp_path / "snap", {"w": torch.ones(2)})
    calls = []

    def fake_snapshot_download(*, repo_id, revision, allow_patterns, **kw):
        calls.append((repo_id, revision, list(allow_patterns)))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert refs.resolve("org/name@dev") == local
    ckpt = refs.open_checkpoint("org/name")
    assert ckpt.reference == "org/name" and list(ckpt.tensors) == ["w"]
    assert [c[:2] for c in calls] == [("org/name", "dev"), ("org/name", None)]
    patterns = calls[0][2]
    wanted = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
              "tokenizer.json", "tokenizer.model"]  # fmt: skip
    pickles = ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt", "x.pth",
               "x.pkl", "x.ckpt", "training_args.bin", "optimizer.pt"]  # fmt: skip
    for name in wanted:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
    for name in pickles:
        assert not any(fnmatch.fnmatch(name, p) for p in patterns), name


def _http_error(cls, status):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x"))
    return cls("refused", response=response)


@pytest.mark.parametrize(
    "error, message",
    [
        (lambda: _http_error(hf_errors.RepositoryNotFoundError, 404), "no such Hub repository"),
        (lambda: _http_error(hf_errors.GatedRepoError, 403), "gated"),
        (lambda: _http_error(hf_errors.RevisionNotFoundError, 404), "no revision 'dev'"),
        (lambda: _http_error(hf_errors.HfHubHTTPError, 500), "could not fetch"),
        (lambda: hf_errors.LocalEntryNotFoundError("not cached"), "not in the Hugging Face cache"),
        (lambda: OSError("disk"), "could not fetch"),
    ],
)
def test_download_errors_become_one_message(tmp_path, monkeypatch, error, message):
    def fail(**kw):
        raise error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ReferenceNotFoundError, match=message) as e:
        refs.resolve("org/name@dev")
    assert str(e.value).startswith("org/name@dev: ")
