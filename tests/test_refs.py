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


# ---- headers only from the Hub (inspect), and downloads that fetch each weight once --------
# The Hub is replaced by a local "repository": model_info lists its files, hf_hub_download
# returns a JSON file's path, and get_session answers HTTP range requests from the files
# (recording every byte range asked for). Nothing can reach the network here.

import re  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from safetensors.torch import save_file  # noqa: E402

from stream_tv import hub  # noqa: E402
from stream_tv.errors import InputError  # noqa: E402
from stream_tv.io.index import INDEX_NAME, load_checkpoint  # noqa: E402
from stream_tv.io.reader import Reader  # noqa: E402

SHA = "c" * 40


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """model_info as when the Hub cannot be reached, unless a test installs a fake Hub."""

    def unreachable(self, *a, **kw):  # what huggingface_hub raises offline (a ConnectionError)
        raise hf_errors.OfflineModeIsEnabled("the network is not used in tests")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)


class FakeHub:
    def __init__(self, repo: Path):
        self.repo = repo
        self.ranges: list[tuple[str, int, int]] = []  # (file, first, last) per range request
        self.downloads: list[str] = []  # hf_hub_download
        self.snapshots: list[dict] = []  # snapshot_download kwargs

    def model_info(self, repo_id, *, revision=None, **kw):
        assert repo_id == "org/name"
        files = sorted(p for p in self.repo.rglob("*") if p.is_file())
        siblings = [
            huggingface_hub.hf_api.RepoSibling(
                rfilename=p.relative_to(self.repo).as_posix(), size=p.stat().st_size
            )
            for p in files
        ]
        return SimpleNamespace(sha=SHA, siblings=siblings)

    def hf_hub_download(self, repo_id, filename, *, revision=None, **kw):
        assert revision == SHA
        self.downloads.append(filename)
        return str(self.repo / filename)

    def snapshot_download(self, **kw):
        self.snapshots.append(kw)
        return str(self.repo)

    def get_session(self):
        hub_ = self

        class Session:
            def get(self, url, *, headers, timeout):
                name = url.split(f"/resolve/{SHA}/", 1)[1]
                first, last = map(
                    int, re.fullmatch(r"bytes=(\d+)-(\d+)", headers["Range"]).groups()
                )
                hub_.ranges.append((name, first, last))
                data = (hub_.repo / name).read_bytes()
                body = data[first : last + 1]
                return httpx2.Response(
                    206,
                    content=body,
                    headers={"Content-Range": f"bytes {first}-{first + len(body) - 1}/{len(data)}"},
                    request=httpx2.Request("GET", url),
                )

        return Session()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    """A Mistral-style repository: an index and two shards (one with a header over 100 kB),
    consolidated.safetensors with the same tensors, side files and a pickle."""
    repo = tmp_path / "repo"
    g = torch.Generator().manual_seed(0)
    big = {"embed.weight": torch.randn(300, 200, generator=g)}  # 240 kB of data
    many = {f"layers.{i}.a_rather_long_parameter_name.weight": torch.ones(2) for i in range(1500)}
    save_checkpoint(repo, {**big, **many}, shards=[list(big), list(many)])
    save_file({**big, **many}, str(repo / "consolidated.safetensors"))
    (repo / "config.json").write_text("{}")
    (repo / "chat_template.jinja").write_text("{{ messages }}")
    (repo / "pytorch_model.bin").write_bytes(b"pickle")
    fake = FakeHub(repo)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake.model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_session", fake.get_session)
    monkeypatch.chdir(tmp_path)
    return fake


def test_open_headers_reads_only_headers_from_the_hub(fake_hub):
    ckpt = refs.open_headers("org/name")
    local = load_checkpoint(fake_hub.repo)
    assert list(ckpt.tensors) == list(local.tensors) and len(ckpt) == 1501
    for name, spec in ckpt.tensors.items():
        want = local[name]
        assert (spec.dtype, spec.shape, spec.start, spec.end, spec.file.name) == (
            want.dtype, want.shape, want.start, want.end, want.file.name,
        )  # fmt: skip
    assert [f.as_posix() for f in ckpt.files] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    ]  # fmt: skip
    assert ckpt.metadata == local.metadata and ckpt.root is None
    # headers only: every range ends inside its file's header; no weights, no consolidated file
    headers = {f.name: min(s.start for s in local if s.file == f) for f in local.files}
    assert fake_hub.downloads == [INDEX_NAME] and fake_hub.snapshots == []
    assert {name for name, _, _ in fake_hub.ranges} == set(headers)
    for name, _, last in fake_hub.ranges:
        assert last < max(headers[name], hub.FIRST_READ), (name, last)
    assert sum(last - first + 1 for _, first, last in fake_hub.ranges) < 400_000
    second = [r for r in fake_hub.ranges if r[0] == "model-00002-of-00002.safetensors"]
    assert len(second) == 2 and headers["model-00002-of-00002.safetensors"] > hub.FIRST_READ
    # the specs are descriptions: reading their data is refused, not attempted locally
    with Reader() as r, pytest.raises(InputError, match="indexed from the Hub's headers only"):
        r.read(ckpt["embed.weight"])
    assert SHA in ckpt.identity


def test_hub_header_is_checked_like_a_local_one(fake_hub):
    shard = fake_hub.repo / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated on the Hub
    with pytest.raises(InputError, match="truncated") as e:
        refs.open_headers("org/name@main")
    assert str(e.value).startswith(f"org/name@{SHA}/model-00001-of-00002.safetensors: ")


def test_download_fetches_the_shards_once_not_consolidated(fake_hub):
    """A repo with an index, its shards and consolidated.safetensors: the shards only."""
    assert refs.resolve("org/name") == fake_hub.repo
    [call] = fake_hub.snapshots
    assert call["revision"] == SHA and fake_hub.downloads == [INDEX_NAME]
    patterns = call["allow_patterns"]
    wanted = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX_NAME,
              "config.json", "chat_template.jinja", "tokenizer.json"]  # fmt: skip
    for name in wanted:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
    for name in ["consolidated.safetensors", "pytorch_model.bin", "other.safetensors"]:
        assert not any(fnmatch.fnmatch(name, p) for p in patterns), name


def test_download_when_the_hub_cannot_be_listed_falls_back_to_patterns(tmp_path, monkeypatch):
    local = save_checkpoint(tmp_path / "snap", {"w": torch.ones(2)})
    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw) or str(local)
    )
    monkeypatch.chdir(tmp_path)
    assert refs.resolve("org/name@dev") == local  # model_info: unreachable (autouse fixture)
    assert calls[0]["allow_patterns"] == hub.HUB_PATTERNS and calls[0]["revision"] == "dev"


def test_open_headers_offline_reads_the_cache(hub_cache):
    ckpt = refs.open_headers("org/name")
    assert sorted(ckpt.tensors) == ["b", "w"] and len(ckpt.files) == 2
    with Reader() as r:  # cached files are local: readable
        assert torch.equal(r.read(ckpt["w"]), torch.ones(3))


def test_open_headers_of_a_local_path_is_load_checkpoint(tmp_path):
    d = save_checkpoint(tmp_path / "m", {"w": torch.ones(2)})
    assert list(refs.open_headers(d).tensors) == ["w"]


def test_cli_inspect_of_a_hub_id_downloads_no_weights(fake_hub):
    r = CliRunner().invoke(cli, ["inspect", "org/name", "--json"])
    assert r.exit_code == 0, r.output
    params = 300 * 200 + 1500 * 2  # the fake repo's embed.weight and 1500 tensors of 2
    assert fake_hub.snapshots == [] and f'"total_params": {params}' in r.stdout
