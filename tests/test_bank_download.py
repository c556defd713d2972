"""Fetching a bank from the Hub (core/bank_download.py): cache, revisions, offline mode, missing and corrupt files.

Online calls run in-process with a per-test ``cache_dir``; offline mode runs in a subprocess (``hub_client``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hub_helpers import R_MAX, assert_same_bank, bank_files, commit_bank_repo, make_bank, state_hash, tiny_vit
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.hub import BankHubError, BankNotFoundError, download_bank


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
    assert_same_bank(ToComBank.from_pretrained("org/bank", cache_dir=cache), bank)


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
        assert_same_bank(ToComBank.from_pretrained("org/bank", revision=rev, cache_dir=cache), bank1)


def test_config_file_is_optional(hub_server, tmp_path):
    bank = make_bank(tiny_vit())
    files = bank_files(bank, tmp_path)
    hub_server.commit("org/weights-only", {"tocom.safetensors": files["tocom.safetensors"]})
    folder = download_bank("org/weights-only", cache_dir=tmp_path / "cache")
    assert sorted(os.listdir(folder)) == ["tocom.safetensors"]
    assert_same_bank(ToComBank.from_pretrained(folder), bank)  # config embedded in the weights


def test_offline_mode_subprocess(hub_server, hub_client, bank_repo):
    bank, _, sha = bank_repo
    download_bank("org/bank", cache_dir=hub_client.cache_dir)  # fill the subprocess's cache
    hub_server.clear_requests()
    code = f"""
import tocom_hub
from tocom_hub.hub import BankNotFoundError
bank = tocom_hub.ToComBank.from_pretrained("org/bank")
pinned = tocom_hub.ToComBank.from_pretrained("org/bank", revision="{sha}")
result = {{"sums": [float(sum(p.double().sum() for p in b.parameters())) for b in (bank, pinned)]}}
try:
    tocom_hub.ToComBank.from_pretrained("org/never-downloaded")
except BankNotFoundError as e:
    result["error"], result["cause"] = str(e), type(e.__cause__).__name__
"""
    out = hub_client.run(code, offline=True).unwrap()
    expected = float(sum(p.detach().double().sum() for p in bank.parameters()))
    assert out["sums"] == pytest.approx([expected, expected], rel=1e-12)
    assert out["cause"] == "LocalEntryNotFoundError"
    for part in ("org/never-downloaded", "tocom.safetensors", "'main'", "HF_HUB_OFFLINE=1", "tocom-hub download"):
        assert part in out["error"]
    assert hub_server.requests == []  # offline: not a single request


def test_missing_repo_file_revision_and_empty_cache(hub_server, bank_repo, tmp_path):
    hub_server.tag("org/bank", "v1")
    hub_server.commit("org/not-a-bank", {"README.md": "hello"})
    cache = tmp_path / "cache"
    cases = [
        (dict(repo_id="org/missing"), RepositoryNotFoundError, ["'org/missing'", "not found", "token="]),
        (
            dict(repo_id="org/not-a-bank"),
            RemoteEntryNotFoundError,
            ["'org/not-a-bank'", "no tocom.safetensors", "'main'", "push_to_hub"],
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

    # the same errors reach ToComBank.from_pretrained and tocom_hub.apply (model untouched)
    with pytest.raises(BankNotFoundError, match="org/missing"):
        ToComBank.from_pretrained("org/missing", cache_dir=cache)
    model = tiny_vit()
    before = state_hash(model)
    with pytest.raises(BankNotFoundError, match="'v9'"):
        tocom_hub.apply(model, source_r=0, target_r=R_MAX, bank="org/bank", revision="v9", cache_dir=cache)
    assert state_hash(model) == before and not tocom_hub.is_patched(model)


def test_invalid_bank_file_on_hub_names_the_repo(hub_server, tmp_path):
    hub_server.commit("org/garbage", {"tocom.safetensors": os.urandom(256)})  # intact download, not a bank
    model = tiny_vit()
    before = state_hash(model)
    with pytest.raises(ValueError, match="'org/garbage'.*not a readable safetensors file"):
        tocom_hub.apply(model, source_r=0, target_r=R_MAX, bank="org/garbage", cache_dir=tmp_path / "cache")
    assert state_hash(model) == before and not tocom_hub.is_patched(model)


@pytest.mark.parametrize("kind", ["truncated", "tampered"])
def test_corrupt_download_is_a_clear_error_and_model_untouched(hub_server, bank_repo, tmp_path, kind):
    bank, files, _ = bank_repo
    weights = files["tocom.safetensors"]
    if kind == "truncated":
        served, expected = weights[:-64], "incomplete or corrupted"
    else:  # same length, flipped bytes in the tensor data: only a content hash can tell
        bad = bytearray(weights)
        bad[-8:] = bytes(b ^ 0xFF for b in bad[-8:])
        served, expected = bytes(bad), "is corrupted: its SHA-256"
    hub_server.corrupt("org/bank", "tocom.safetensors", served)
    cache = tmp_path / "cache"
    with pytest.raises(BankHubError, match=expected) as info:
        download_bank("org/bank", cache_dir=cache)
    assert "'org/bank'" in str(info.value) and "tocom.safetensors" in str(info.value)

    model = tiny_vit()
    before = state_hash(model)
    with pytest.raises(BankHubError, match=expected):
        tocom_hub.apply(model, source_r=0, target_r=R_MAX, bank="org/bank", cache_dir=cache)
    assert state_hash(model) == before and not tocom_hub.is_patched(model)

    hub_server.clear_corruption()  # nothing bad stayed in the cache: the next call gets the real file
    assert_same_bank(ToComBank.from_pretrained("org/bank", cache_dir=cache), bank)
