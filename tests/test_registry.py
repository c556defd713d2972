"""The bank registry (core/bank/registry.py): bank=None through register_bank / $TOCOM_HUB_REGISTRY, malformed files."""

from __future__ import annotations

import json

import pytest
import torch
from hub_helpers import R_MAX, TIMM_NAME, bank_files, expected_qkv, make_bank, state_hash, tiny_vit

import tocom_hub
from tocom_hub.hub import REGISTRY_ENV, NoBankForModelError, registered_banks


def _unregister_all() -> None:
    for name, entries in registered_banks().items():
        if any(e.source == "register_bank" for e in entries):
            tocom_hub.unregister_bank(name)


@pytest.fixture
def clean_registry(monkeypatch):
    """No in-process registrations and no $TOCOM_HUB_REGISTRY, before and after the test."""
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    _unregister_all()
    yield
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    _unregister_all()


def test_bank_none_resolves_through_registry(hub_server, tmp_path, clean_registry, monkeypatch):
    model = tiny_vit()
    bank_v1, bank_main = make_bank(model, seed=1), make_bank(model, seed=2)
    hub_server.commit("org/reg", bank_files(bank_v1, tmp_path, "b1"))
    hub_server.tag("org/reg", "v1")
    hub_server.commit("org/reg", bank_files(bank_main, tmp_path, "b2"))
    cache = tmp_path / "cache"
    assert TIMM_NAME not in registered_banks()  # the packaged registry parses (and has no such bank)

    entry = tocom_hub.register_bank(TIMM_NAME, "org/reg", revision="v1")
    assert registered_banks()[TIMM_NAME][0] == entry
    want = expected_qkv(model, bank_v1, 0, R_MAX)
    tocom_hub.apply(model, source_r=0, target_r=R_MAX, cache_dir=cache)
    for blk, w in zip(model.blocks, want):
        torch.testing.assert_close(blk.attn.qkv.weight.double(), w, rtol=1e-6, atol=1e-6)

    # a user registry file ($TOCOM_HUB_REGISTRY) keyed by the bare architecture
    tocom_hub.unregister_bank(TIMM_NAME)
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"banks": {"vit_tiny_patch16_224": {"repo_id": "org/reg", "method": "tome"}}}))
    monkeypatch.setenv(REGISTRY_ENV, str(registry))
    other = tiny_vit()
    want = expected_qkv(other, bank_main, 0, R_MAX)
    tocom_hub.apply(other, source_r=0, target_r=R_MAX, cache_dir=cache)
    for blk, w in zip(other.blocks, want):
        torch.testing.assert_close(blk.attn.qkv.weight.double(), w, rtol=1e-6, atol=1e-6)

    # no bank for this model: the error lists the known ones and shows bank=
    monkeypatch.delenv(REGISTRY_ENV)
    tocom_hub.register_bank("deit_base_patch16_224.fb_in1k", "org/deit-bank")
    fresh = tiny_vit()
    before = state_hash(fresh)
    with pytest.raises(NoBankForModelError) as info:
        tocom_hub.apply(fresh, source_r=0, target_r=R_MAX)
    msg = str(info.value)
    for part in (
        TIMM_NAME,
        "deit_base_patch16_224.fb_in1k → org/deit-bank (tome)",
        'bank="org/name"',
        "register_bank(",
    ):
        assert part in msg, part
    assert state_hash(fresh) == before and not tocom_hub.is_patched(fresh)


# ---------------------------------------------------------------------------------------------------
# malformed registry files


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (json.dumps({"banks": {TIMM_NAME: {"repo_id": "org/reg", "revision": 5}}}).encode(), r"revision 5 \(int\)"),
        (json.dumps({"banks": {TIMM_NAME: {"repo_id": "org/reg", "method": ["tome"]}}}).encode(), "method"),
        (json.dumps({"banks": {TIMM_NAME: {"repo_id": 7}}}).encode(), "repo_id"),
        (json.dumps({"banks": []}).encode(), "'banks' must map"),
    ],
)
def test_malformed_registry_file_is_named_and_does_not_hide_register_bank(
    tmp_path, clean_registry, monkeypatch, content, match
):
    from tocom_hub.hub import resolve_bank

    registry = tmp_path / "my-registry.json"
    registry.write_bytes(content)
    monkeypatch.setenv(REGISTRY_ENV, str(registry))
    model = tiny_vit()
    with pytest.raises(ValueError, match=match) as info:
        registered_banks()
    assert str(registry) in str(info.value) and REGISTRY_ENV in str(info.value)
    with pytest.raises(ValueError, match=match):
        resolve_bank(model)  # nothing registered in-process: the file is needed and is broken
    entry = tocom_hub.register_bank(TIMM_NAME, "org/mine", revision="v2")
    assert resolve_bank(model) == entry  # a valid in-process entry is not blocked by the file


def test_register_bank_validates_the_revision(clean_registry):
    for bad in (5, "", ["v1"]):
        with pytest.raises(ValueError, match="revision must be"):
            tocom_hub.register_bank(TIMM_NAME, "org/reg", revision=bad)
    assert TIMM_NAME not in registered_banks()
