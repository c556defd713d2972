"""preserved(model): the patch and bank state, weights and train/eval mode are back after the block."""

from __future__ import annotations

import pytest
import torch
from bank_helpers import clone_state, random_groups
from tiny_models import make_vit

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.core.compensation import api as compensate
from tocom_hub.core.compensation.api import get_compensation
from tocom_hub.core.patch import get_settings
from tocom_hub.core.preserve import preserved

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def make_bank(model, method="tome"):
    bank = ToComBank.for_model(model, r_max=6, rank=2, targets=("q", "v"), method=method)
    random_groups(bank, seed=1)
    return bank


def observe(model):
    """Everything preserved() promises, read through public functions and plain timm attributes."""
    comp = get_compensation(model)
    return {
        "patched": tocom_hub.is_patched(model),
        "settings": get_settings(model),
        "r": tocom_hub.get_r(model) if tocom_hub.is_patched(model) else None,
        "bank": None if comp is None else (comp.bank, comp.source_r, comp.target_r, comp.scale, comp.merge),
        "training": [m.training for m in model.modules()],
        "class": type(model).__name__,
    }


def assert_same(model, before, weights, logits):
    assert observe(model) == before
    after = model.state_dict()
    assert after.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(after[k], v), k  # bit-identical
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(X), logits)


def reference(model):
    """State, weights and eval-mode logits taken before the block (the model's mode is kept)."""
    before, weights = observe(model), clone_state(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        logits = model(X)
    for m, t in modes:
        m.training = t
    return before, weights, logits


def mess_up(model, bank):
    """Every kind of change a tool makes inside the block."""
    tocom_hub.remove(model)
    tocom_hub.patch(model, method="evit", prop_attn=False, trace_source=True, fuse_token=True)
    tocom_hub.set_r(model, 3)
    tocom_hub.apply(model, 1, 4, bank=bank, scale=0.3, merge=True)
    tocom_hub.set_target_r(model, 2)
    model.train()
    with torch.no_grad():
        model(X)


def unpatched():
    return make_vit("cls_token"), None


def patched_by_user():
    model = make_vit("cls_token")
    tocom_hub.patch(model, method="tome", prop_attn=False, trace_source=True)
    tocom_hub.set_r(model, [2, 1, 0])
    return model, None


def bank_applied_by_apply():
    model = make_vit("cls_token")
    bank = make_bank(model)
    tocom_hub.apply(model, 0, 5, bank=bank, scale=0.2)
    return model, bank


def bank_on_user_patch():
    model = make_vit("cls_token")
    tocom_hub.patch(model, method="tome", prop_attn=False)
    bank = make_bank(model)
    tocom_hub.apply(model, 2, 4, bank=bank, merge=False)
    return model, bank


STARTS = [unpatched, patched_by_user, bank_applied_by_apply, bank_on_user_patch]


@pytest.mark.parametrize("start", STARTS, ids=[s.__name__ for s in STARTS])
@pytest.mark.parametrize("fail", [False, True], ids=["normal", "exception"])
def test_preserved_restores_everything(start, fail):
    model, bank = start()
    model.train()
    model.blocks[1].eval()  # mixed modes must come back module by module
    before, weights, logits = reference(model)
    other = make_bank(model, method="evit")
    with pytest.raises(RuntimeError) if fail else _nothing():
        with preserved(model):
            mess_up(model, other)
            assert observe(model) != before
            if fail:
                raise RuntimeError("boom")
    assert_same(model, before, weights, logits)


@pytest.mark.parametrize("start", STARTS, ids=[s.__name__ for s in STARTS])
def test_preserved_when_only_r_moves(start):
    model, bank = start()
    before, weights, logits = reference(model)
    with preserved(model):
        if bank is not None:
            tocom_hub.set_target_r(model, 6)
            tocom_hub.set_target_r(model, 1)
        else:
            tocom_hub.patch(model)
            tocom_hub.set_r(model, 4)
    assert_same(model, before, weights, logits)


def _switch_around(model):
    for target in (6, 4, 1, 3, 2):  # same source: in-place difference updates, each rounding once
        tocom_hub.set_target_r(model, target)


def test_preserved_restores_the_attached_bank_in_place():
    """The compensation still attached after the block is moved back, not rebuilt: the same object, and the
    merged weights bit-identical to before although the block made inexact difference updates."""
    model, _ = bank_applied_by_apply()
    comp = get_compensation(model)
    before, weights, logits = reference(model)
    with preserved(model):
        _switch_around(model)
    assert get_compensation(model) is comp
    assert_same(model, before, weights, logits)


def test_moving_back_by_difference_updates_would_be_caught():
    """The deliberately wrong restore (back to the pair by difference updates, exact=False) leaves rounding
    in the weights, which the bit-identity check of the test above sees."""
    model, _ = bank_applied_by_apply()
    _, weights, _ = reference(model)
    _switch_around(model)
    compensate.set_pair(model, 0, 5, exact=False)
    after = model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in weights.items())
    compensate.set_pair(model, 0, 5, exact=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_remove_after_preserved_keeps_who_patched():
    """A bank that apply() patched in is still 'apply's patch' after the block: remove() unpatches."""
    model, _ = bank_applied_by_apply()
    with preserved(model):
        tocom_hub.remove(model)
    tocom_hub.remove(model)
    assert not tocom_hub.is_patched(model)

    model, _ = bank_on_user_patch()
    with preserved(model):
        tocom_hub.remove(model)
        tocom_hub.unpatch(model)
    tocom_hub.remove(model)
    assert tocom_hub.is_patched(model) and get_settings(model)["prop_attn"] is False


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
