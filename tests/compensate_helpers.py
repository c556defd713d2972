"""Shared by the compensation tests (test_compensate, test_lora_merged, test_lora_hooks, test_locks): tiny
models, a bank with known per-group factors, and the closed-form check against the naive reference."""

from __future__ import annotations

import torch
from bank_helpers import closed_form, random_groups, rel_err, weight_rows
from tiny_models import make_vit

from tocom_hub import ToComBank

R = 6
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def fresh(depth: int = 3, **kw):
    return make_vit("cls_token", depth=depth, **kw)


def bank_for(model, r_max=R, targets=("q", "v"), method="tome", seed=1, **kw):
    bank = ToComBank.for_model(model, r_max=r_max, rank=2, targets=targets, method=method, **kw)
    return bank, random_groups(bank, seed=seed)


def assert_closed_form(model, original, groups, bank, m, n, s=None, tol=1e-6):
    s = bank.scale if s is None else s
    for b in range(bank.depth):
        for t in bank.targets:
            err = rel_err(weight_rows(model, b, t), closed_form(original, groups, t, b, m, n, s))
            assert err <= tol, f"block {b} {t}: {m}->{n} rel err {err:.2e}"
