"""torch.compile with the bank's unmerged mode (``apply(..., merge=False)``, core/compensation/hooked.py): the compiled
forward equals the eager one with the bank applied before or after compiling, on a second instance, after a
pair switch, under ``disabled`` and after ``remove``; gradients reach the bank through the compiled graph; a
user's forward hooks on the adapted Linears survive. (A forward hook would be invisible to a compiled graph:
dynamo does not guard on hooks; the bank swaps the Linear's class, which it does guard on.)"""

from __future__ import annotations

import copy

import pytest
import torch
from bank_helpers import random_groups
from tiny_models import make_eva, make_vit
from torch._dynamo.testing import CompileCounter

import tocom_hub
from tocom_hub import ToComBank, compensate

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
TINY = dict(img_size=32, depth=2)  # 16 patches

MODELS = {
    "vit_fused_qkv": lambda: make_vit("cls_token", **TINY),
    "eva_fused_qv_bias": lambda: make_eva("rope_cat_cls", **TINY),
    "eva_separate_qkv": lambda: make_eva("rope_cat_separate_qkv", **TINY),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _bank(model, seed, targets=("q", "v")):
    bank = ToComBank.for_model(model, r_max=4, rank=2, targets=targets, method="tome")
    random_groups(bank, seed=seed, std=1.0)
    return bank


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bank_applied_after_compiling_then_switched_disabled_and_removed(name):
    model = MODELS[name]()
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, method="tome")
    tocom_hub.set_r(model, 3)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    targets = ("q", "k", "v", "proj") if name == "vit_fused_qkv" else ("q", "v")
    frames = []
    with torch.no_grad():
        without = compiled(X)  # compiled before any bank
        assert _close(without, model(X))
        tocom_hub.apply(model, 0, 3, bank=_bank(model, 1, targets), merge=False)
        out = compiled(X)
        assert _close(out, model(X)) and not _close(out, without, 1e-2)  # the bank is in the compiled graph
        frames.append(counter.frame_count)
        for m, n in ((0, 1), (2, 4), (4, 0), (0, 3)):  # pair switches at a fixed r: the same graph
            compensate.set_pair(model, m, n, r=3)
            assert _close(compiled(X), model(X))
        assert _close(compiled(X), out)
        frames.append(counter.frame_count)
        tocom_hub.set_target_r(model, 1)  # another r: one graph more
        assert _close(compiled(X), model(X))
        tocom_hub.set_target_r(model, 3)
        assert _close(compiled(X), out)
        frames.append(counter.frame_count)
        with compensate.disabled(model):
            assert _close(compiled(X), without)
        frames.append(counter.frame_count)
        tocom_hub.remove(model)  # apply() did not patch: the model stays patched at r = 3, without the bank
        assert _close(compiled(X), without, 0)
        frames.append(counter.frame_count)
        tocom_hub.unpatch(model)
        assert _close(compiled(X), plain(X))
    assert frames == [2, 2, 3, 4, 4]  # remove() is the first graph again


@pytest.mark.parametrize("name", ["vit_fused_qkv", "eva_fused_qv_bias"])
def test_second_instance_and_two_banks_each_get_their_own_update(name):
    """Two instances compiled from the same code: one with a bank, one plain, then the plain one with another
    bank; each compiled output is its own eager output."""
    first, second = MODELS[name](), MODELS[name]()
    plain = copy.deepcopy(second)
    c1 = torch.compile(first, backend="eager", fullgraph=True)
    c2 = torch.compile(second, backend="eager", fullgraph=True)
    tocom_hub.apply(first, 0, 2, bank=_bank(first, 1), merge=False)
    with torch.no_grad():
        assert _close(c1(X), first(X))
        tocom_hub.patch(second, method="tome")
        tocom_hub.set_r(second, 2)
        eager_second = second(X)
        assert _close(c2(X), eager_second)  # no bank on the second: not the first's graph
        tocom_hub.apply(second, 0, 2, bank=_bank(second, 2), merge=False)
        assert _close(c2(X), second(X)) and not _close(c2(X), eager_second, 1e-3)
        assert _close(c1(X), first(X))
        tocom_hub.remove(first)
        assert _close(c1(X), plain(X))  # same weights as `second` had: seed 0


def test_gradients_through_the_compiled_graph_reach_the_bank():
    """Training under compile (aot_eager: the autograd graph): the same loss and bank gradients as eager."""
    grads = []
    for compile_it in (False, True):
        torch._dynamo.reset()
        model = make_eva("rope_cat_cls", **TINY)
        model.requires_grad_(False)
        bank = _bank(model, 1)
        tocom_hub.apply(model, 0, 0, bank=bank, merge=False)
        compensate.set_pair(model, 1, 3)
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compile_it else model
        loss = run(X).logsumexp(-1).sum()
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in bank.parameters()])
    assert all(_close(a, b) for a, b in zip(*grads))
    assert all(g.abs().sum() > 0 for g in grads[1][1:])


def test_user_hooks_on_the_adapted_linear_run_and_survive_remove():
    model = make_vit("cls_token", **TINY)
    ref = copy.deepcopy(model)
    calls = []
    for m in (model, ref):
        qkv = m.blocks[0].attn.qkv
        qkv.register_forward_hook(lambda mod, args, out: out * 0.5)
        qkv.register_forward_pre_hook(lambda mod, args: calls.append(1) if not torch.compiler.is_compiling() else None)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    tocom_hub.apply(model, 0, 2, bank=_bank(model, 1), merge=False)
    with torch.no_grad():
        assert _close(compiled(X), model(X))
        tocom_hub.remove(model)
        assert _close(compiled(X), ref(X))
        calls.clear()
        model(X)
    assert calls == [1]  # the user's pre-hook is still registered, and runs once
    qkv = model.blocks[0].attn.qkv
    assert type(qkv) is torch.nn.Linear and len(qkv._forward_hooks) == 1 and len(qkv._forward_pre_hooks) == 1


@pytest.mark.slow  # inductor's C++ build: ~30 s on 2 busy cores
def test_inductor_matches_eager_with_the_unmerged_bank():
    model = make_eva("rope_cat_cls", **TINY)
    tocom_hub.apply(model, 0, 3, bank=_bank(model, 4), merge=False)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert _close(compiled(X), model(X), 1e-4)
