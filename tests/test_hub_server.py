"""The test Hub server (tests/hub_server.py) driven by the real huggingface_hub client over HTTP.

Online calls run in-process (conftest.py points HF_ENDPOINT at the server before huggingface_hub is
imported); anything depending on HF_HUB_OFFLINE runs in a subprocess via the ``hub_client`` fixture.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hub_server import HubClient, HubServer, git_blob_sha1
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "tocom/vit-tiny"
CONFIG = b'{"architecture": "vit_tiny_patch16_224", "num_classes": 10}'
WEIGHTS = os.urandom(64 * 1024)


@pytest.fixture
def repo(hub_server: HubServer) -> str:
    """REPO with a regular file and an LFS-served weights file; returns the commit sha."""
    return hub_server.commit(REPO, {"config.json": CONFIG, "model.safetensors": WEIGHTS, "sub/notes.txt": "hi"})


def test_client_targets_test_server(hub_server: HubServer) -> None:
    assert constants.ENDPOINT == hub_server.url


def test_first_download_then_cache_with_server_down(hub_server: HubServer, repo: str, tmp_path: Path) -> None:
    hub_server.clear_requests()
    cfg = hf_hub_download(REPO, "config.json", cache_dir=tmp_path)
    weights = hf_hub_download(REPO, "model.safetensors", cache_dir=tmp_path)
    assert Path(cfg).read_bytes() == CONFIG and Path(weights).read_bytes() == WEIGHTS
    assert f"/snapshots/{repo}/" in cfg
    # cache layout: regular blob named by git sha1, LFS blob by sha256
    assert os.path.realpath(cfg).endswith(git_blob_sha1(CONFIG))
    assert os.path.realpath(weights).endswith(hashlib.sha256(WEIGHTS).hexdigest())
    methods = [m for m, _ in hub_server.requests]
    assert methods == ["HEAD", "GET", "HEAD", "GET"]
    assert hub_server.requests[3][1].startswith("/__lfs_cdn__/")  # LFS file came from the "CDN" redirect

    hub_server.stop()
    assert hf_hub_download(REPO, "config.json", cache_dir=tmp_path) == cfg  # connection refused -> cache
    assert hf_hub_download(REPO, "model.safetensors", cache_dir=tmp_path, local_files_only=True) == weights
    hub_server.start()  # restartable, same port, same state
    hub_server.clear_requests()
    assert hf_hub_download(REPO, "config.json", cache_dir=tmp_path, local_files_only=True) == cfg
    assert hub_server.requests == []
    assert hf_hub_download(REPO, "config.json", cache_dir=tmp_path) == cfg
    assert hub_server.requests == [("HEAD", f"/{REPO}/resolve/main/config.json")]  # etag check, no GET
    hub_server.fail_requests(503)  # Hub answering 5xx: also falls back to the cache
    assert hf_hub_download(REPO, "config.json", cache_dir=tmp_path) == cfg
    hub_server.fail_requests(None)


def test_offline_mode_served_from_cache(hub_server: HubServer, hub_client: HubClient, repo: str) -> None:
    code = (
        "from huggingface_hub import hf_hub_download, snapshot_download\n"
        f"result = [hf_hub_download('{REPO}', 'model.safetensors'), snapshot_download('{REPO}')]\n"
    )
    weights, snapshot = hub_client.run(code).unwrap()
    assert Path(weights).read_bytes() == WEIGHTS and weights.startswith(str(hub_client.cache_dir))

    hub_server.stop()
    assert hub_client.run(code, offline=True).unwrap() == [weights, snapshot]  # HF_HUB_OFFLINE=1, server down
    local_only = (
        "from huggingface_hub import hf_hub_download\n"
        f"result = hf_hub_download('{REPO}', 'config.json', local_files_only=True)\n"
    )
    assert Path(hub_client.run(local_only).unwrap()).read_bytes() == CONFIG
    hub_server.start()
    hub_server.clear_requests()
    assert hub_client.run(code, offline=True).unwrap() == [weights, snapshot]
    assert hub_client.run(local_only).result.endswith("config.json")
    assert hub_server.requests == []  # neither offline mode nor local_files_only hit the server


def test_offline_with_empty_cache_fails_clearly(hub_server: HubServer, hub_client: HubClient, repo: str) -> None:
    download = f"from huggingface_hub import hf_hub_download\nhf_hub_download('{REPO}', 'config.json')\n"
    snapshot = f"from huggingface_hub import snapshot_download\nsnapshot_download('{REPO}')\n"
    for code in (download, snapshot):
        out = hub_client.run(code, offline=True)
        assert out.raised("LocalEntryNotFoundError"), out
    out = hub_client.run(download.replace("'config.json'", "'config.json', local_files_only=True"))
    assert out.raised("LocalEntryNotFoundError")
    assert hub_server.requests == []
    # (Online + Hub unreachable + empty cache also ends in LocalEntryNotFoundError, but only after the
    # client's ~23 s of retry backoff, so it is not exercised here.)


def test_revision_pinning(hub_server: HubServer, tmp_path: Path) -> None:
    old = hub_server.commit(REPO, {"config.json": b"v1"})
    hub_server.tag(REPO, "v1.0")
    new = hub_server.commit(REPO, {"config.json": b"v2", "extra.txt": b"x"})
    hub_server.commit(REPO, {"config.json": b"dev"}, branch="dev")
    assert old != new and hub_server.resolve(REPO) == new

    def read(revision: str | None) -> bytes:
        return Path(hf_hub_download(REPO, "config.json", revision=revision, cache_dir=tmp_path)).read_bytes()

    assert read(None) == b"v2"
    assert read(old) == b"v1"
    assert read(old[:10]) == b"v1"  # short sha
    assert read("v1.0") == b"v1"
    assert read("dev") == b"dev"
    assert (tmp_path / "models--tocom--vit-tiny" / "refs" / "v1.0").read_text() == old
    assert sorted(os.listdir(snapshot_download(REPO, revision=old, cache_dir=tmp_path))) == ["config.json"]
    info = HfApi().repo_info(REPO, revision="v1.0")
    assert info.sha == old and [s.rfilename for s in info.siblings] == ["config.json"]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "extra.txt", revision=old, cache_dir=tmp_path)


def test_snapshot_download(hub_server: HubServer, repo: str, tmp_path: Path) -> None:
    folder = Path(snapshot_download(REPO, cache_dir=tmp_path))
    assert folder.name == repo
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["config.json", "model.safetensors", "sub/notes.txt"]
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    assert (folder / "sub" / "notes.txt").read_text() == "hi"
    paths = ("GET", f"/api/models/{REPO}/revision/main"), ("GET", f"/api/models/{REPO}/tree/{repo}")
    assert all(p in hub_server.requests for p in paths)
    only_json = Path(snapshot_download(REPO, cache_dir=tmp_path / "c2", allow_patterns=["*.json"]))
    assert sorted(os.listdir(only_json)) == ["config.json"]
    tree = HfApi().list_repo_tree(REPO, recursive=True)
    assert {(e.path, type(e).__name__) for e in tree} >= {("sub", "RepoFolder"), ("sub/notes.txt", "RepoFile")}
    lfs = [e for e in HfApi().list_repo_tree(REPO) if e.path == "model.safetensors"][0]
    assert lfs.lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest() and lfs.size == len(WEIGHTS)


def test_error_mapping(hub_server: HubServer, repo: str, tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tocom/missing", "config.json", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("tocom/missing", cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):  # RemoteEntryNotFoundError
        hf_hub_download(REPO, "nope.bin", cache_dir=tmp_path)
    assert (tmp_path / "models--tocom--vit-tiny" / ".no_exist" / repo / "nope.bin").exists()
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch", cache_dir=tmp_path)
    # private repo: invisible without the server's token
    hub_server.add_repo("tocom/private", private=True)
    hub_server.commit("tocom/private", {"a.txt": b"secret"})
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tocom/private", "a.txt", cache_dir=tmp_path)
    path = hf_hub_download("tocom/private", "a.txt", cache_dir=tmp_path, token=hub_server.token)
    assert Path(path).read_bytes() == b"secret"


def test_push_round_trip(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    url = api.create_repo("pushed-vit")  # no namespace -> server's user
    assert url.repo_id == f"{hub_server.username}/pushed-vit" and hub_server.has_repo(url.repo_id)
    assert api.create_repo(url.repo_id, exist_ok=True).repo_id == url.repo_id
    with pytest.raises(Exception, match="409"):
        api.create_repo(url.repo_id)

    big = os.urandom(6 * 1024 * 1024)  # > the 5 MB "regular" size the client expects: still works
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_bytes(CONFIG)
    (src / "model.safetensors").write_bytes(big)
    (src / "sub" / "notes.txt").write_text("hi")
    (src / "README.md").write_text("---\nlibrary_name: timm\n---\n# card\n")
    info = api.upload_folder(repo_id=url.repo_id, folder_path=src, commit_message="push")
    assert info.oid == hub_server.resolve(url.repo_id)
    assert hub_server.files(url.repo_id)["model.safetensors"] == big
    assert sorted(hub_server.files(url.repo_id)) == ["README.md", "config.json", "model.safetensors", "sub/notes.txt"]
    assert not any("lfs" in p or "xet" in p for _, p in hub_server.requests)

    nb_commits = len(hub_server.commits(url.repo_id))
    assert api.upload_folder(repo_id=url.repo_id, folder_path=src).oid == info.oid  # unchanged -> no commit
    assert len(hub_server.commits(url.repo_id)) == nb_commits

    api.upload_file(path_or_fileobj=b"# new card\n", path_in_repo="README.md", repo_id=url.repo_id)
    api.delete_file("sub/notes.txt", repo_id=url.repo_id)
    assert api.file_exists(url.repo_id, "README.md") and not api.file_exists(url.repo_id, "sub/notes.txt")
    assert api.file_exists(url.repo_id, "sub/notes.txt", revision=info.oid)

    folder = Path(snapshot_download(url.repo_id, cache_dir=tmp_path / "cache"))
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == big
    assert (folder / "README.md").read_bytes() == b"# new card\n"


def test_corrupted_and_truncated_downloads(hub_server: HubServer, repo: str, tmp_path: Path) -> None:
    hub_server.corrupt(REPO, "model.safetensors", WEIGHTS[:100])
    with pytest.raises(OSError, match="Consistency check failed"):
        hf_hub_download(REPO, "model.safetensors", cache_dir=tmp_path)
    flipped = bytes([CONFIG[0] ^ 0xFF]) + CONFIG[1:]
    hub_server.corrupt(REPO, "config.json", flipped)  # same size: only a hash check can notice
    assert Path(hf_hub_download(REPO, "config.json", cache_dir=tmp_path)).read_bytes() == flipped
    hub_server.clear_corruption()
    path = hf_hub_download(REPO, "model.safetensors", cache_dir=tmp_path)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == hashlib.sha256(WEIGHTS).hexdigest()


def test_api_extras(hub_server: HubServer, repo: str) -> None:
    api = HfApi()
    pr = api.create_commit(REPO, [CommitOperationAdd("a.txt", b"a")], commit_message="pr", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and hub_server.files(REPO, "refs/pr/1")["a.txt"] == b"a"
    assert "a.txt" not in hub_server.files(REPO)
    api.create_tag(REPO, tag="v1")
    api.create_branch(REPO, branch="exp", revision=repo)
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "exp"} and [t.name for t in refs.tags] == ["v1"]
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    assert api.whoami(token=hub_server.token)["name"] == hub_server.username
    assert sorted(api.list_repo_files(REPO)) == ["config.json", "model.safetensors", "sub/notes.txt"]
    ds = api.create_repo("tocom/data", repo_type="dataset").repo_id
    api.upload_file(path_or_fileobj=b"1,2\n", path_in_repo="d.csv", repo_id=ds, repo_type="dataset")
    assert Path(hf_hub_download(ds, "d.csv", repo_type="dataset")).read_bytes() == b"1,2\n"
    api.delete_repo(REPO)
    assert not api.repo_exists(REPO) and api.repo_exists(ds, repo_type="dataset")
