"""The merged bank follows the weights (core/compensation/merged.py): after training steps, ``load_state_dict`` or an
edit through ``.data``, ``remove()`` and every switch change the adapted rows by exactly the bank's signed
delta relative to the *current* weights — checked against the closed form in float64 — and what cannot be
followed is refused without changing anything."""

from __future__ import annotations

import pytest
import torch
from bank_helpers import clone_state, naive_delta, rel_err, weight_rows
from compensate_helpers import X, bank_for, fresh

import tocom_hub
from tocom_hub.core.compensation.api import RESYNC_EVERY

SRC, TGT = 0, 6


def _rows(state, b, t):
    full = state[f"blocks.{b}.attn.qkv.weight"]
    d = full.shape[0] // 3
    i = {"q": 0, "k": 1, "v": 2}[t]
    return full[i * d : (i + 1) * d].double()


def _train(model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for i in range(steps):
        opt.zero_grad()
        model(X[:, :, :, :] * (1 + i)).logsumexp(-1).sum().backward()
        opt.step()
    return clone_state(model)


def _check(model, base, groups, bank, m, n, tol=1e-6):
    for b in range(bank.depth):
        for t in bank.targets:
            ref = _rows(base, b, t) + naive_delta(groups, t, b, m, n, bank.scale)
            err = rel_err(weight_rows(model, b, t), ref)
            assert err <= tol, f"block {b} {t}: {m}->{n} rel err {err:.2e}"


def test_remove_after_training_takes_out_exactly_the_delta():
    model = fresh()
    bank, groups = bank_for(model)
    tocom_hub.apply(model, SRC, TGT, bank=bank)
    before = clone_state(model)
    trained = _train(model)
    moved = max((_rows(trained, b, "q") - _rows(before, b, "q")).abs().max().item() for b in range(3))
    assert moved > 1e-3  # the steps did move the q rows
    tocom_hub.remove(model)
    after = model.state_dict()
    for k, v in trained.items():
        if not k.endswith("attn.qkv.weight") and k != "tocom_compensation":
            assert torch.equal(after[k], v), k  # the rest keeps its training
    for b in range(3):
        assert torch.equal(_rows(after, b, "k"), _rows(trained, b, "k"))
        for t in ("q", "v"):
            ref = _rows(trained, b, t) - naive_delta(groups, t, b, SRC, TGT, bank.scale)
            assert rel_err(weight_rows(model, b, t), ref) <= 1e-6


def test_switches_after_training_stay_on_the_trained_weights():
    model = fresh()
    bank, groups = bank_for(model)
    tocom_hub.apply(model, SRC, TGT, bank=bank)
    trained = _train(model)
    base = {k: v.clone() for k, v in trained.items()}  # trained weights without the update, float64 below
    for b in range(3):
        for t in ("q", "v"):
            d = base[f"blocks.{b}.attn.qkv.weight"].shape[0] // 3
            i = {"q": 0, "v": 2}[t]
            rows = _rows(trained, b, t) - naive_delta(groups, t, b, SRC, TGT, bank.scale)
            base[f"blocks.{b}.attn.qkv.weight"] = base[f"blocks.{b}.attn.qkv.weight"].double()
            base[f"blocks.{b}.attn.qkv.weight"][i * d : (i + 1) * d] = rows
    targets = [5, 4, 3, 2, 1, 2, 3, 4, 5, 1, 2]
    assert len(targets) > RESYNC_EVERY  # across the periodic exact re-derivation
    for n in targets:
        tocom_hub.set_target_r(model, n)
        _check(model, base, groups, bank, SRC, n)


def test_load_state_dict_under_a_merged_bank_then_remove():
    model = fresh()
    bank, groups = bank_for(model)
    tocom_hub.apply(model, SRC, TGT, bank=bank)
    old = clone_state(model)
    new = clone_state(fresh(seed=7))  # another checkpoint
    model.load_state_dict(new)
    tocom_hub.set_target_r(model, 2)
    _check(model, _minus(new, groups, bank, SRC, TGT), groups, bank, SRC, 2)
    tocom_hub.remove(model)
    _check(model, _minus(new, groups, bank, SRC, TGT), groups, bank, SRC, SRC)
    for b in range(3):
        assert (weight_rows(model, b, "q").double() - _rows(old, b, "q")).abs().max() > 1e-2  # not the old rows


def _minus(state, groups, bank, m, n):
    """``state`` with Δ(m → n) taken out of the adapted rows (float64)."""
    out = {k: v.double() for k, v in state.items() if v.dtype.is_floating_point}
    for b in range(bank.depth):
        w = out[f"blocks.{b}.attn.qkv.weight"]
        d = w.shape[0] // 3
        for t, i in (("q", 0), ("v", 2)):
            w[i * d : (i + 1) * d] -= naive_delta(groups, t, b, m, n, bank.scale)
    return out


def test_an_edit_through_data_is_followed_and_untouched_weights_stay_bit_exact():
    model = fresh()
    original = clone_state(model)
    bank, groups = bank_for(model)
    tocom_hub.apply(model, SRC, TGT, bank=bank)
    for r in (3, 6, 1):
        tocom_hub.set_target_r(model, r)
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.data[5] += 0.25  # .data: no version counter bump
    tocom_hub.remove(model)
    edited = {k: v.clone() for k, v in original.items()}
    edited["blocks.1.attn.qkv.weight"][5] += 0.25
    _check(model, edited, groups, bank, SRC, SRC, tol=1e-6)
    for b in (0, 2):  # the blocks nobody touched: bit for bit
        assert torch.equal(model.blocks[b].attn.qkv.weight, original[f"blocks.{b}.attn.qkv.weight"])


def test_what_cannot_be_followed_is_refused():
    model = fresh()
    bank, _ = bank_for(model)
    tocom_hub.apply(model, SRC, TGT, bank=bank)
    model.to("meta")
    with pytest.raises(RuntimeError, match="meta.*nothing was changed"):
        tocom_hub.set_target_r(model, 2)
    with pytest.raises(RuntimeError, match="meta"):
        tocom_hub.remove(model)
    assert tocom_hub.compensate.get_compensation(model).target_r == TGT and tocom_hub.get_r(model) == TGT
