"""Merged mode (core/compensation/merged.py): switches never drift from the closed form, fp16/bf16 accumulate in fp32,
the bank follows a model converted after apply, and remove() restores the weights bit-exact."""

from __future__ import annotations

import random

import pytest
import torch
from bank_helpers import clone_state, closed_form, rel_err, weight_rows
from compensate_helpers import bank_for, fresh

import tocom_hub


@pytest.mark.usefixtures("one_thread")
def test_set_target_r_many_switches_drift():
    """10,000 random switches stay within 1e-6 (relative) of the closed form."""
    model = fresh(depth=2)
    original = clone_state(model)
    bank, groups = bank_for(model, r_max=8)
    source = 3
    tocom_hub.apply(model, source, 0, bank=bank)
    refs = {
        n: {(b, t): closed_form(original, groups, t, b, source, n, bank.scale) for b in range(2) for t in ("q", "v")}
        for n in range(9)
    }
    rng = random.Random(0)
    worst = 0.0
    for i in range(10_000):
        n = rng.randint(0, 8) if i % 20 == 0 else rng.choice([0, 1, 2, 4, 5, 6, 7, 8])  # mostly not the source
        tocom_hub.set_target_r(model, n)
        if i % 97 == 0 or i == 9_999:
            for (b, t), ref in refs[n].items():
                worst = max(worst, rel_err(weight_rows(model, b, t), ref))
    assert tocom_hub.get_r(model) == n
    assert worst <= 1e-6, worst
    tocom_hub.remove(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_fp16_model_accumulates_in_fp32():
    model = fresh().half()
    original = clone_state(model)
    bank, groups = bank_for(model)
    assert bank.lora_B["q"].dtype == torch.float32  # banks are fp32 whatever the model's dtype
    tocom_hub.apply(model, 0, 6, bank=bank)
    for b in range(3):
        for t in ("q", "v"):
            w = weight_rows(model, b, t)
            assert w.dtype == torch.float16
            ref = closed_form(original, groups, t, b, 0, 6, bank.scale).half()
            assert (w.float() - ref.float()).abs().max() <= 2**-10 * ref.float().abs().max()
    for r in (2, 6, 0, 4):
        tocom_hub.set_target_r(model, r)
    tocom_hub.remove(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_model_converted_after_apply():
    model = fresh()
    bank, groups = bank_for(model)
    original = clone_state(model)
    tocom_hub.apply(model, 0, 6, bank=bank)
    model.half()  # replaces the weight tensors: the bank follows
    tocom_hub.set_target_r(model, 3)
    for b in range(3):
        ref = closed_form(original, groups, "q", b, 0, 3, bank.scale).half().float()
        assert (weight_rows(model, b, "q").float() - ref).abs().max() <= 2**-10 * ref.abs().max()
    tocom_hub.remove(model)
    w0_half = fresh().half().state_dict()
    assert all(torch.equal(v, w0_half[k]) for k, v in model.state_dict().items())
