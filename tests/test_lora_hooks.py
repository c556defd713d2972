"""Unmerged mode (core/compensation/hooked.py): the LoRA path in the adapted Linears' forward (a swapped class), its
gradients, O(1) pair switches, and a remove() that leaves the hooks of others where they were."""

from __future__ import annotations

import copy

import pytest
import torch
from bank_helpers import clone_state
from compensate_helpers import R, X, bank_for, fresh

import tocom_hub
from tocom_hub import compensate


def test_unmerged_gradients_reach_every_bank_parameter():
    model = fresh()
    model.requires_grad_(False)  # frozen backbone, like the trainer
    original = clone_state(model)
    bank, _ = bank_for(model)
    tocom_hub.apply(model, 1, 4, bank=bank, merge=False)
    model(X).logsumexp(-1).sum().backward()
    h = bank.rank
    for t in bank.targets:
        for p in (bank.lora_B[t], bank.lora_A[t]):
            assert p.grad is not None  # DDP needs a gradient (zero or not) for every parameter
        ga, gb = bank.lora_B[t].grad, bank.lora_A[t].grad
        assert ga[:, :, 1 * h : 4 * h].abs().sum() > 0 and gb[:, 1 * h : 4 * h].abs().sum() > 0
        assert not ga[:, :, :h].any() and not ga[:, :, 4 * h :].any()  # inactive groups: zero
        assert not gb[:, :h].any() and not gb[:, 4 * h :].any()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_set_pair_is_cheap_and_matches_merged():
    """Trainer step: bank pair m → n while the model runs at another r (here the student's r = m)."""
    model = fresh()
    bank, _ = bank_for(model)
    tocom_hub.apply(model, 0, 0, bank=bank, merge=False)
    params = {k: v.data_ptr() for k, v in model.state_dict().items()}
    for m, n in [(5, 1), (2, 6), (3, 3)]:
        compensate.set_pair(model, m, n, r=m)
        assert tocom_hub.get_r(model) == m
        ref = fresh()
        tocom_hub.apply(ref, m, n, bank=bank)
        tocom_hub.set_r(ref, m)
        with torch.no_grad():
            torch.testing.assert_close(model(X), ref(X), rtol=0, atol=1e-5)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == params
    with pytest.raises(ValueError):
        compensate.set_pair(model, 0, R + 1)


def test_deepcopy_of_a_compensated_model_is_independent():
    model = fresh()
    bank, _ = bank_for(model)
    tocom_hub.apply(model, 0, 4, bank=bank, merge=False)
    twin = copy.deepcopy(model)
    tocom_hub.remove(twin)
    assert compensate.get_compensation(model) is not None and len(_hooks_of_ours(model)) == len(model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(twin(X), fresh()(X), rtol=0, atol=0)


def _hooks_of_ours(model):
    """Every Linear of ``model`` that still runs the unmerged mode's update (its class or its state)."""
    from tocom_hub.core.compensation.hooked import _ToComLinear

    return [
        (name, type(module).__name__)
        for name, module in model.named_modules()
        if isinstance(module, _ToComLinear) or "_tocom_lora" in module.__dict__
    ]


def _add_user_hooks(model, calls):
    """Hooks of another library on the very Linears the bank adapts: a pre-hook, a recording hook, a
    prepended hook with kwargs, an always-called hook, and a hook that changes the output."""
    for b, blk in enumerate(model.blocks):
        for name in ("qkv", "proj"):
            lin = getattr(blk.attn, name)
            tag = f"{b}.{name}"
            lin.register_forward_pre_hook(lambda m, args, tag=tag: calls.append(("pre", tag)))
            lin.register_forward_hook(lambda m, args, out, tag=tag: calls.append(("post", tag)))
            lin.register_forward_hook(
                lambda m, args, kwargs, out, tag=tag: calls.append(("kwargs", tag)), with_kwargs=True, prepend=True
            )
            lin.register_forward_hook(lambda m, args, out, tag=tag: calls.append(("always", tag)), always_call=True)
            lin.register_forward_hook(lambda m, args, out: out * 0.5 + 0.25)


def _hook_counts(model):
    """How many hooks of each kind every module holds."""
    return [
        (
            len(m._forward_pre_hooks),
            len(m._forward_hooks),
            len(m._forward_hooks_with_kwargs),
            len(m._forward_hooks_always_called),
        )
        for m in model.modules()
    ]


@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "proj")])
def test_remove_keeps_the_hooks_of_others_and_leaves_none_of_ours(targets):
    """The hooks are taken out through their handles: hooks someone else registered on the same
    modules (before or after apply, any kind) survive remove() and still run; none of ours is left."""
    model, ref = fresh(), fresh()
    calls, ref_calls = [], []
    _add_user_hooks(model, calls)
    _add_user_hooks(ref, ref_calls)  # the reference: the same hooks on an untouched model
    before = _hook_counts(model)
    bank, _ = bank_for(model, targets=targets)
    tocom_hub.apply(model, 0, 6, bank=bank, merge=False)
    assert len(_hooks_of_ours(model)) == len(model.blocks) * (1 + ("proj" in targets))
    late = model.blocks[1].attn.qkv.register_forward_hook(lambda m, args, out: calls.append(("late", "1.qkv")))
    with torch.no_grad():
        model(X)
    assert ("late", "1.qkv") in calls and ("always", "0.proj") in calls
    tocom_hub.remove(model)
    assert _hooks_of_ours(model) == [] and compensate.get_compensation(model) is None
    late.remove()
    assert _hook_counts(model) == before  # every hook of the user's is still registered
    calls.clear()
    with torch.no_grad():
        out, expected = model(X), ref(X)
    assert sorted(calls) == sorted(ref_calls)  # ... and still runs, each once per forward
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_applying_again_or_merging_leaves_one_hook_of_ours_at_most():
    model = fresh()
    calls = []
    _add_user_hooks(model, calls)
    before = _hook_counts(model)
    b1, _ = bank_for(model, seed=1)
    b2, _ = bank_for(model, seed=2, targets=("q", "k", "v", "proj"))
    tocom_hub.apply(model, 0, 6, bank=b1, merge=False)
    tocom_hub.apply(model, 2, 5, bank=b2, merge=False)  # replaces: the hooks of b1 go, those of b2 come
    ours = _hooks_of_ours(model)
    assert len(ours) == 2 * len(model.blocks) and len({name for name, _ in ours}) == len(ours)
    assert all(m._tocom_lora.state.bank is b2 for m in model.modules() if hasattr(m, "_tocom_lora"))
    tocom_hub.apply(model, 2, 5, bank=b2, merge=True)  # merged mode: no hook at all
    assert _hooks_of_ours(model) == [] and _hook_counts(model) == before
    tocom_hub.remove(model)
    assert _hook_counts(model) == before


def test_a_pickled_model_removes_its_own_hooks():
    """``torch.save`` / ``pickle`` of a model in unmerged mode: the copy's handles point at the copy's
    hooks, so remove() on one leaves the other compensated."""
    import pickle

    model = fresh()
    bank, _ = bank_for(model)
    tocom_hub.apply(model, 0, 4, bank=bank, merge=False)
    with torch.no_grad():
        compensated = model(X)
    twin = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        torch.testing.assert_close(twin(X), compensated, rtol=0, atol=0)
    tocom_hub.remove(twin)
    assert _hooks_of_ours(twin) == [] and len(_hooks_of_ours(model)) == len(model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(twin(X), fresh()(X), rtol=0, atol=0)
        torch.testing.assert_close(model(X), compensated, rtol=0, atol=0)
