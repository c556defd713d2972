"""A bank from the Hub through ``tocom_hub.load_bank("org/name")`` (hub/load.py over hub/fetch.py), the way
``tocom_hub.apply(model, bank="org/name")`` and ``bank=None`` get theirs; ``ToComBank.from_pretrained`` (the
core) reads local paths only and says where a repo id goes, without a request.
"""

from __future__ import annotations

import os

import pytest
from hub_helpers import R_MAX, assert_same_bank, bank_files, commit_bank_repo, make_bank, state_hash, tiny_vit

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.hub import BankHubError, BankNotFoundError, download_bank


@pytest.fixture
def bank_repo(hub_server, tmp_path):
    return commit_bank_repo(hub_server, tmp_path)


def test_from_pretrained_is_local_and_names_load_bank(hub_server, bank_repo):
    hub_server.clear_requests()
    for spec in ("org/bank", "missing/dir/bank"):
        with pytest.raises(FileNotFoundError, match=r"does not exist.*tocom_hub\.load_bank"):
            ToComBank.from_pretrained(spec)
    with pytest.raises(TypeError):
        ToComBank.from_pretrained("org/bank", revision="main")  # no Hub options in the core
    model = tiny_vit()  # the core's apply: local banks only; tocom_hub.apply resolves the rest
    with pytest.raises(FileNotFoundError, match="load_bank"):
        tocom_hub.compensate.apply(model, 0, R_MAX, "org/bank")
    with pytest.raises(TypeError, match="tocom_hub.apply"):
        tocom_hub.compensate.apply(model, 0, R_MAX, None)
    assert not tocom_hub.is_patched(model)
    assert hub_server.requests == []


def test_from_hub_then_from_cache_with_server_down_and_no_extra_requests(hub_server, bank_repo, tmp_path):
    bank, files, sha = bank_repo
    model = tiny_vit()
    bank2 = make_bank(model, seed=2)
    hub_server.tag("org/bank", "v1")
    sha2 = hub_server.commit("org/bank", bank_files(bank2, tmp_path, "b2"))
    cache = tmp_path / "cache"
    hub_server.clear_requests()
    assert_same_bank(tocom_hub.load_bank("org/bank", cache_dir=cache), bank2)
    for rev in ("v1", sha):
        assert_same_bank(tocom_hub.load_bank("org/bank", revision=rev, cache_dir=cache), bank)
    # the files' own requests only: no API call (listing refs belongs to tocom_hub.hub)
    assert hub_server.requests and not [p for _, p in hub_server.requests if p.startswith("/api/")]
    snapshots = sorted(p.name for p in (cache / "models--org--bank" / "snapshots").iterdir())
    assert snapshots == sorted([sha, sha2])
    assert sorted(os.listdir(cache / "models--org--bank" / "snapshots" / sha)) == sorted(files)

    hub_server.stop()
    assert_same_bank(tocom_hub.load_bank("org/bank", cache_dir=cache), bank2)
    assert_same_bank(tocom_hub.load_bank("org/bank", revision=sha, cache_dir=cache), bank)


def test_config_file_is_optional(hub_server, tmp_path):
    bank = make_bank(tiny_vit())
    hub_server.commit("org/weights-only", {"tocom.safetensors": bank_files(bank, tmp_path)["tocom.safetensors"]})
    assert_same_bank(tocom_hub.load_bank("org/weights-only", cache_dir=tmp_path / "cache"), bank)


def test_offline_mode_subprocess(hub_server, hub_client, bank_repo):
    bank, _, sha = bank_repo
    download_bank("org/bank", cache_dir=hub_client.cache_dir)  # fill the subprocess's cache
    hub_server.clear_requests()
    code = f"""
import tocom_hub
from tocom_hub.hub import BankNotFoundError
bank = tocom_hub.load_bank("org/bank")
pinned = tocom_hub.load_bank("org/bank", revision="{sha}")
result = {{"sums": [float(sum(p.double().sum() for p in b.parameters())) for b in (bank, pinned)]}}
try:
    tocom_hub.load_bank("org/never-downloaded")
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


def test_invalid_bank_file_on_hub_names_the_repo(hub_server, tmp_path):
    hub_server.commit("org/garbage", {"tocom.safetensors": os.urandom(256)})  # intact download, not a bank
    model = tiny_vit()
    before = state_hash(model)
    cache = tmp_path / "cache"
    with pytest.raises(BankHubError, match="'org/garbage'.*failed its own checks.*not a readable safetensors file"):
        tocom_hub.apply(model, source_r=0, target_r=R_MAX, bank="org/garbage", cache_dir=cache)
    assert state_hash(model) == before and not tocom_hub.is_patched(model)
    assert not list((cache / "models--org--garbage" / "blobs").iterdir())  # evicted: the next call downloads again


@pytest.mark.parametrize("kind", ["truncated", "tampered"])
def test_corrupt_download_is_a_clear_error_and_model_untouched(hub_server, bank_repo, tmp_path, kind):
    bank, files, _ = bank_repo
    weights = files["tocom.safetensors"]
    if kind == "truncated":
        served, expected = weights[:-64], "incomplete or corrupted"
    else:  # same length, flipped bytes in the tensor data: only a content hash can tell
        bad = bytearray(weights)
        bad[-8:] = bytes(b ^ 0xFF for b in bad[-8:])
        served, expected = bytes(bad), "incomplete or corrupted: its SHA-256"
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
    assert_same_bank(tocom_hub.load_bank("org/bank", cache_dir=cache), bank)


def test_apply_with_a_bad_revision_leaves_the_model_untouched(hub_server, bank_repo, tmp_path):
    hub_server.tag("org/bank", "v1")
    model = tiny_vit()
    before = state_hash(model)
    with pytest.raises(BankNotFoundError, match="'v9'.*branches: main; tags: v1"):
        tocom_hub.apply(model, source_r=0, target_r=R_MAX, bank="org/bank", revision="v9", cache_dir=tmp_path / "c")
    assert state_hash(model) == before and not tocom_hub.is_patched(model)


def test_unreachable_hub_is_one_clear_error(hub_server, tmp_path):
    """Hub down, bank not cached: one request without retries tells it at once (not ~25 s of huggingface_hub's
    retries with back-off), with the same one-line error as download_bank's and no chained traceback."""
    hub_server.stop()
    cache = tmp_path / "cache"
    with pytest.raises(BankNotFoundError) as rich:
        download_bank("org/never-cached", cache_dir=cache)
    with pytest.raises(BankNotFoundError) as plain:
        tocom_hub.load_bank("org/never-cached", cache_dir=cache)
    assert "\n" not in str(plain.value)
    assert str(plain.value) == str(rich.value)
    assert "could not be reached" in str(plain.value) and "HF_HUB_OFFLINE=1" in str(plain.value)
    assert plain.value.__cause__ is None and rich.value.__cause__ is None
