"""Fetching a bank from the Hub with full diagnostics (hub/fetch.py: download_bank; hub/load.py: load_bank): cache,
revisions, missing and corrupt files, the branches and tags of a repo for a bad revision. A hostile Hub (stalls,
trickles, bad ETags) is test_hub_hostile.py's. Calls run in-process with a per-test ``cache_dir``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hub_helpers import assert_same_bank, bank_files, commit_bank_repo, make_bank, tiny_vit
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tocom_hub import ToComBank
from tocom_hub.hub import BankNotFoundError, download_bank, load_bank


@pytest.fixture
def bank_repo(hub_server, tmp_path):
    return commit_bank_repo(hub_server, tmp_path)


def test_first_download_then_cache_with_server_stopped(hub_server, bank_repo, tmp_path):
    bank, files, sha = bank_repo
    cache = tmp_path / "cache"
    folder = download_bank("org/bank", cache_dir=cache)
    assert Path(folder).name == sha
    assert {f: (Path(folder) / f).read_bytes() for f in files} == files
    assert_same_bank(ToComBank.from_pretrained(folder), bank)

    hub_server.clear_requests()  # unchanged etag: HEAD only, nothing downloaded again
    assert download_bank("org/bank", cache_dir=cache) == folder
    assert all(method == "HEAD" for method, _ in hub_server.requests)

    hub_server.stop()
    assert download_bank("org/bank", cache_dir=cache) == folder
    assert_same_bank(load_bank("org/bank", cache_dir=cache), bank)


def test_revision_pinning_and_etag_refresh(hub_server, tmp_path):
    model = tiny_vit()
    bank1, bank2 = make_bank(model, seed=1), make_bank(model, seed=2)
    sha1 = hub_server.commit("org/bank", bank_files(bank1, tmp_path, "b1"))
    hub_server.tag("org/bank", "v1")
    cache = tmp_path / "cache"
    assert Path(download_bank("org/bank", cache_dir=cache)).name == sha1

    sha2 = hub_server.commit("org/bank", bank_files(bank2, tmp_path, "b2"))
    main = download_bank("org/bank", cache_dir=cache)  # main moved: the new commit is fetched
    assert Path(main).name == sha2
    assert_same_bank(ToComBank.from_pretrained(main), bank2)
    for rev in ("v1", sha1):
        pinned = download_bank("org/bank", revision=rev, cache_dir=cache)
        assert Path(pinned).name == sha1
        assert_same_bank(load_bank("org/bank", revision=rev, cache_dir=cache), bank1)


def test_config_file_is_optional(hub_server, tmp_path):
    bank = make_bank(tiny_vit())
    files = bank_files(bank, tmp_path)
    hub_server.commit("org/weights-only", {"tocom.safetensors": files["tocom.safetensors"]})
    folder = download_bank("org/weights-only", cache_dir=tmp_path / "cache")
    assert sorted(os.listdir(folder)) == ["tocom.safetensors"]
    assert_same_bank(ToComBank.from_pretrained(folder), bank)  # config embedded in the weights


def test_missing_repo_file_revision_and_empty_cache(hub_server, bank_repo, tmp_path):
    hub_server.tag("org/bank", "v1")
    hub_server.commit("org/not-a-bank", {"README.md": "hello"})
    cache = tmp_path / "cache"
    cases = [
        (dict(repo_id="org/missing"), RepositoryNotFoundError, ["'org/missing'", "not found", "token="]),
        (
            dict(repo_id="org/not-a-bank"),
            RemoteEntryNotFoundError,
            ["'org/not-a-bank'", "no tocom.safetensors", "'main'", "push_bank"],
        ),
        (
            dict(repo_id="org/bank", revision="v9"),
            RevisionNotFoundError,
            ["'v9'", "'org/bank'", "branches: main", "tags: v1"],
        ),
        (
            dict(repo_id="org/bank", local_files_only=True),
            LocalEntryNotFoundError,
            ["'org/bank'", "tocom.safetensors", "not in the cache", "local_files_only=True"],
        ),
    ]
    for kwargs, cause, parts in cases:
        with pytest.raises(BankNotFoundError) as info:
            download_bank(cache_dir=cache, **kwargs)
        err = info.value
        assert isinstance(err, FileNotFoundError) and isinstance(err.__cause__, cause), kwargs
        assert err.repo_id == kwargs["repo_id"]
        for part in parts:
            assert part in str(err), (part, str(err))
    # a private repo needs a token; the message says so
    hub_server.add_repo("org/private", private=True)
    hub_server.commit(
        "org/private",
        {"tocom.safetensors": (Path(download_bank("org/bank", cache_dir=cache)) / "tocom.safetensors").read_bytes()},
    )
    with pytest.raises(BankNotFoundError, match="private and no valid token"):
        download_bank("org/private", cache_dir=cache)
    assert Path(download_bank("org/private", cache_dir=cache, token=hub_server.token), "tocom.safetensors").is_file()

    # load_bank goes through download_bank: the same diagnostics, then the bank
    with pytest.raises(BankNotFoundError, match="'v9'.*branches: main; tags: v1"):
        load_bank("org/bank", revision="v9", cache_dir=cache)
    assert_same_bank(load_bank("org/bank", revision="v1", cache_dir=cache), bank_repo[0])
