"""A compensated state is recognisable (core/compensation/marker.py): the state_dict of a model with a merged bank says
what its weights hold; loading it where that would count the update twice is refused, and where the same bank is
merged the result is the closed form."""

from __future__ import annotations

import pytest
import torch
from bank_helpers import clone_state, state_hash
from compensate_helpers import assert_closed_form, bank_for, fresh
from safetensors import safe_open
from safetensors.torch import load_file

import tocom_hub
from tocom_hub.core.bank.module import WEIGHTS_NAME
from tocom_hub.core.compensation.marker import MARKER_KEY, read_marker


def test_state_dict_of_a_merged_model_says_what_it_holds(tmp_path):
    model = fresh()
    keys = set(model.state_dict())
    bank, _ = bank_for(model)
    tocom_hub.apply(model, 1, 5, bank=bank)
    sd = model.state_dict()
    assert set(sd) == keys | {MARKER_KEY}
    facts = read_marker(sd)
    bank.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert facts["bank_sha256"] == f.metadata()["tocom_sha256"]  # the bank file's own checksum
    assert (facts["source_r"], facts["target_r"], facts["scale"], facts["method"]) == (1, 5, bank.scale, "tome")
    tocom_hub.set_target_r(model, 2)
    assert read_marker(model.state_dict())["target_r"] == 2
    tocom_hub.set_target_r(model, 1)  # back at the source: plain weights, no entry
    assert set(model.state_dict()) == keys
    tocom_hub.set_target_r(model, 3)
    with tocom_hub.compensate.disabled(model):
        assert set(model.state_dict()) == keys
    tocom_hub.remove(model)
    assert set(model.state_dict()) == keys


def test_a_saved_compensated_state_is_not_compensated_twice(tmp_path):
    model = fresh()
    original = clone_state(model)
    bank, groups = bank_for(model)
    tocom_hub.apply(model, 0, 6, bank=bank)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    # a plain model refuses it (strict load): its weights already hold the bank's update
    with pytest.raises(RuntimeError, match=MARKER_KEY):
        fresh().load_state_dict(torch.load(tmp_path / "model.pth"))
    # a model that carries the same bank: the loaded weights are taken with the pair they hold
    other = fresh(seed=3)
    tocom_hub.apply(other, 0, 2, bank=bank)
    other.load_state_dict(torch.load(tmp_path / "model.pth"))
    assert_closed_form(other, original, groups, bank, 0, 2)  # W0 + Δ(0 → 2), not W0 + Δ(0 → 6) + Δ(0 → 2)
    assert read_marker(other.state_dict())["target_r"] == 2
    tocom_hub.remove(other)
    assert all((v - original[k]).abs().max() <= 1e-6 for k, v in other.state_dict().items())
    # a model that carries another bank: refused before anything is loaded
    third = fresh(seed=4)
    bank2, _ = bank_for(third, seed=9)
    tocom_hub.apply(third, 0, 6, bank=bank2)
    before = state_hash(third)
    with pytest.raises(ValueError, match=r"refusing to load.*hold ToCom bank .* merged at 0 -> 6"):
        third.load_state_dict(torch.load(tmp_path / "model.pth"))
    assert state_hash(third) == before


def test_loading_its_own_state_dict_back_changes_nothing():
    model = fresh()
    original = clone_state(model)
    bank, groups = bank_for(model)
    tocom_hub.apply(model, 0, 6, bank=bank)
    tocom_hub.set_target_r(model, 3)
    before = state_hash(model)
    model.load_state_dict(model.state_dict())
    assert state_hash(model) == before
    tocom_hub.set_target_r(model, 5)
    assert_closed_form(model, original, groups, bank, 0, 5)
    tocom_hub.remove(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the copy was kept: bit-exact


def test_timm_save_for_hf_carries_it(tmp_path):
    from timm.models import save_for_hf
    from tiny_models import make_timm

    model = make_timm("vit_tiny_patch16_224", depth=3)
    bank, _ = bank_for(model)
    tocom_hub.apply(model, 0, 4, bank=bank)
    save_for_hf(model, str(tmp_path), safe_serialization="both")
    assert read_marker(load_file(str(tmp_path / "model.safetensors")))["target_r"] == 4
    assert read_marker(torch.load(tmp_path / "pytorch_model.bin"))["bank_sha256"]
