"""tune_scale: picks the s an independent evaluation prefers and leaves the model at it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bank_helpers import random_groups, state_hash
from tiny_models import make_vit

import tocom_hub
from tocom_hub import ToComBank, compensate

g = torch.Generator().manual_seed(0)
LOADER = [(torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
CANDIDATES = (0.02, 0.1, 0.5, 1.0)


def make_bank(model):
    bank = ToComBank.for_model(model, r_max=4, rank=2)
    random_groups(bank, seed=4)
    return bank


def reference_loss(bank, s):
    model = tocom_hub.apply(make_vit("cls_token"), 0, 4, bank=bank, scale=s)
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in LOADER) / 8


def test_picks_the_best_and_leaves_it_applied():
    model = make_vit("cls_token").train()
    bank = make_bank(model)
    best, scores = tocom_hub.tune_scale(model, bank, LOADER, 0, 4, candidates=CANDIDATES, metric="loss")
    refs = {s: reference_loss(bank, s) for s in CANDIDATES}
    assert scores.keys() == refs.keys()
    for s in CANDIDATES:
        assert scores[s] == pytest.approx(refs[s], rel=1e-5)
    assert best == min(refs, key=refs.get)
    st = compensate.get_compensation(model)
    assert st.scale == best and (st.source_r, st.target_r, st.merge) == (0, 4, True)
    assert model.training  # mode restored
    expected = tocom_hub.apply(make_vit("cls_token"), 0, 4, bank=bank, scale=best)
    assert state_hash(model.eval()) == state_hash(expected)


def test_accuracy_callable_and_ties():
    model = make_vit("cls_token")
    noop = ToComBank.for_model(model, r_max=4)  # fresh bank: A = 0, every s gives the same output
    best, scores = tocom_hub.tune_scale(model, noop, LOADER, 0, 4)
    assert len(set(scores.values())) == 1 and best == noop.scale  # tie → the bank's own scale
    agree = lambda logits, y: (logits.argmax(-1) == y).float().mean().item()  # noqa: E731
    best2, scores2 = tocom_hub.tune_scale(model, make_bank(model), LOADER, 0, 4, candidates=CANDIDATES, metric=agree)
    assert best2 == max(CANDIDATES, key=lambda s: (scores2[s], -abs(s - 0.1)))
    with pytest.raises(ValueError, match="metric"):
        tocom_hub.tune_scale(model, noop, LOADER, 0, 4, metric="f1")
