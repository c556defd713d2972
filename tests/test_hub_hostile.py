"""A hostile loopback Hub (tests/hub_server.py's ``hostile`` modes) against tocom_hub.hub.download_bank: a GET that
stalls, a body that trickles one byte every 2 s, a truncated body without any size, an ETag that is not a hash, an
ETag that names a path. Each failure is one line, within the deadline (``timeout``) plus generous slack; nothing
unverified is left in the cache, nothing is written outside it, and the next good call succeeds.

In-process (``HF_ENDPOINT`` is set by conftest.py before huggingface_hub is imported); the workers abandoned at a
deadline are joined by the fixture, after the server let go of them, so no thread outlives its test.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_helpers import assert_same_bank, bank_files, commit_bank_repo, make_bank, tiny_vit

import tocom_hub
from tocom_hub import cli
from tocom_hub.hub import BankHubError, DownloadTimeoutError, download_bank
from tocom_hub.hub.fetch import abandoned_downloads

SLACK = 30.0  # seconds on top of a deadline: a loaded 2-core machine, not a timing claim


@pytest.fixture
def hostile(hub_server, tmp_path):
    """``(server, bank)`` with ``org/bank`` committed; at the end, hostile modes off and abandoned workers joined."""
    bank, _, _ = commit_bank_repo(hub_server, tmp_path)
    yield hub_server, bank
    hub_server.clear_hostile()
    for thread in abandoned_downloads():
        thread.join(timeout=60)
    assert not abandoned_downloads(), "a download worker outlived its test"


def _files(root: Path) -> set:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()} if root.exists() else set()


def _check_cache(cache: Path) -> None:
    """Nothing unverified in the cache: no partial file, every blob named by the hash of its content."""
    for path in _files(cache):
        assert not path.name.endswith(".incomplete"), path
        if path.parent.name == "blobs":
            data = path.read_bytes()
            git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            assert path.name in (git, hashlib.sha256(data).hexdigest()), path


def _good_call_works(server, bank, cache: Path) -> None:
    server.clear_hostile()
    folder = download_bank("org/bank", cache_dir=cache, timeout=60)
    assert_same_bank(tocom_hub.ToComBank.from_pretrained(folder), bank)
    _check_cache(cache)


@pytest.mark.parametrize("mode,timeout", [("stall", 1.0), ("trickle", 3.0)])
def test_a_stalled_or_trickling_download_ends_at_its_deadline(hostile, tmp_path, mode, timeout):
    server, bank = hostile
    server.hostile("tocom.safetensors", body=mode)
    cache = tmp_path / "cache"
    start = time.monotonic()
    with pytest.raises(DownloadTimeoutError) as info:
        download_bank("org/bank", cache_dir=cache, timeout=timeout)
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "\n" not in text and "tocom.safetensors" in text and f"{timeout:g} s deadline" in text, text
    assert timeout <= elapsed < timeout + SLACK, elapsed
    assert isinstance(info.value, TimeoutError)
    _check_cache(cache)
    assert not [p for p in _files(cache) if "snapshots" in p.parts]  # no bank file published
    _good_call_works(server, bank, cache)


@pytest.mark.slow  # a fresh interpreter (~10 s) and a 4 s deadline
def test_the_cli_reports_a_stall_in_one_line_without_retry_chatter(hostile, hub_client):
    """``tocom-hub download`` as users run it, with huggingface_hub's read timeout at 1 s so that its resume
    retries ("Trying to resume download...") happen before the 4 s deadline: stderr is still the one line."""
    server, _ = hostile
    server.hostile("tocom.safetensors", body="stall")
    argv = [sys.executable, "-m", "tocom_hub", "download", "org/bank", "--timeout", "4"]
    env = hub_client.env(HF_HUB_DOWNLOAD_TIMEOUT="1")
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 4 + SLACK
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("tocom-hub download: error: tocom.safetensors of ToCom bank 'org/bank'")
    assert "4 s deadline" in proc.stderr
    _check_cache(hub_client.cache_dir)


@pytest.mark.parametrize("filename", ["tocom.safetensors", "tocom_config.json"])
@pytest.mark.parametrize("etag", ["not-a-hash", "../../../escape", "../../../" + "0" * 40])
def test_an_etag_that_is_not_a_hash_is_refused_before_writing(hostile, tmp_path, filename, etag):
    server, bank = hostile
    server.hostile(filename, body="truncate", etag=etag)  # the case that used to exit 0 and poison the cache
    cache = tmp_path / "cache"
    outside_before = _files(tmp_path) - _files(cache)
    with pytest.raises(BankHubError) as info:
        download_bank("org/bank", cache_dir=cache)
    text = str(info.value)
    assert "\n" not in text and "neither a git nor a SHA-256 hash" in text and filename in text, text
    assert _files(tmp_path) - _files(cache) == outside_before  # nothing written outside the cache
    assert not (tmp_path / "escape").exists()
    _check_cache(cache)
    assert not [p for p in _files(cache) if p.name == filename]
    _good_call_works(server, bank, cache)


@pytest.mark.parametrize("filename", ["tocom.safetensors", "tocom_config.json"])
def test_a_truncated_body_without_size_never_enters_the_cache(hostile, tmp_path, filename):
    server, bank = hostile
    server.hostile(filename, body="truncate")  # real ETag, half the body, no size anywhere
    cache = tmp_path / "cache"
    with pytest.raises(BankHubError, match=f"download of {filename} .* incomplete or corrupted") as info:
        download_bank("org/bank", cache_dir=cache)
    assert "\n" not in str(info.value)
    _check_cache(cache)
    assert not [p for p in _files(cache) if p.name == filename]
    assert cli.main(["download", "org/bank", "--cache-dir", str(cache)]) == 1  # the CLI no longer exits 0
    _good_call_works(server, bank, cache)


def test_a_bank_failing_its_own_checksum_is_evicted(hostile, tmp_path):
    """Transport intact (the ETag is the hash of what is served), but the bank's ``tocom_sha256`` does not match
    its tensors: the bank's own check catches it after download and evicts it; fixed on the Hub, it loads."""
    server, bank = hostile
    files = bank_files(make_bank(tiny_vit(), seed=3), tmp_path, "other")
    weights = bytearray(files["tocom.safetensors"])
    weights[-4:] = bytes(b ^ 0xFF for b in weights[-4:])  # tensor bytes changed after the checksum was written
    server.commit("org/bank", {"tocom.safetensors": bytes(weights)})
    cache = tmp_path / "cache"
    with pytest.raises(BankHubError, match="failed its own checks.*checksum mismatch.*removed from the cache") as info:
        download_bank("org/bank", cache_dir=cache)
    assert "\n" not in str(info.value)
    assert not [p for p in _files(cache) if p.parent.name == "blobs" and p.stat().st_size == len(weights)]
    with pytest.raises(BankHubError):
        tocom_hub.load_bank("org/bank", cache_dir=cache)
    server.commit("org/bank", bank_files(bank, tmp_path, "again"))
    _good_call_works(server, bank, cache)


def test_a_cached_blob_altered_on_disk_is_evicted_and_fetched_again(hostile, tmp_path):
    server, bank = hostile
    cache = tmp_path / "cache"
    folder = Path(download_bank("org/bank", cache_dir=cache))
    blob = Path(os.path.realpath(folder / "tocom.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(BankHubError, match="is corrupted.*removed from the cache"):
        download_bank("org/bank", cache_dir=cache)
    assert not blob.exists()
    _good_call_works(server, bank, cache)


def test_timeout_is_validated_and_the_cli_default_is_the_library_default():
    from tocom_hub.cli.options import HUB_TIMEOUT
    from tocom_hub.hub import DEFAULT_TIMEOUT

    assert HUB_TIMEOUT == DEFAULT_TIMEOUT
    for bad in (0, -1, float("inf"), float("nan"), "10", True):
        with pytest.raises(ValueError, match="timeout must be"):
            download_bank("org/bank", timeout=bad)
