"""The Qwen3 ``merge`` heads (``_merge`` classifiers, ``_enc`` encoders: timm's 2×2 patch merger) in the regular
mode: the tokens shrink through the blocks, then every patch gets the token it ended in and timm's own merger
and head run on the full grid. References: plain timm (r = 0, unpatch) and a closed form built by hand from the
source trace of the same forward (``get_source``: patch → token, pruned patches in no token) fed to the plain
model's merger; a variant that zeros the merged patches fails it."""

from __future__ import annotations

import copy

import pytest
import torch
from bank_helpers import random_groups
from test_families_qwen3 import X, assert_only_q_and_v_moved_by_the_delta, make_qwen
from test_families_vit_blocks import assert_threads_get_serial_outputs

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.core.patch import get_settings

MERGE = ("qwen3_vit_88m_merge", "qwen3_vit_88m_enc")  # classifier (encoder_pool 'merge'), encoder ('merge' pool)
OPTIONS = {"tome": dict(method="tome"), "evit": dict(method="evit"), "evit_fuse": dict(method="evit", fuse_token=True)}


def _encoder(model):
    return getattr(model, "encoder", model)


def _out_shape(name):
    return (2, 10) if name.endswith("_merge") else (2, 16, 32)  # 8×8 patches: 16 cells of 2×2, out_features 32


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("name", MERGE)
def test_r0_bit_exact_r_runs_and_unpatch_restores(name, method):
    model = make_qwen(name)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        ref = plain(X)
        tocom_hub.patch(model, method=method)
        assert not get_settings(model)["dense"]  # the regular mode: no refusal any more
        assert torch.equal(model(X), ref) and torch.equal(model.forward_features(X), plain.forward_features(X))
        tocom_hub.set_r(model, 6)
        out = model(X)
        assert out.shape == ref.shape == _out_shape(name) and torch.isfinite(out).all()
        assert (out - ref).abs().max() > 1e-4  # r acted
        if name.endswith("_merge"):  # the classifier's features are the merger's tokens, as timm's
            assert model.forward_features(X).shape == plain.forward_features(X).shape == (2, 16, 32)
        else:  # the encoder's features are the reduced tokens (64 - 2·6)
            assert model.forward_features(X).shape == (2, 52, 64)
        tocom_hub.unpatch(model)
        assert type(model) is type(plain) and torch.equal(model(X), ref)


def _by_hand(model, plain, name):
    """``model(X)`` and its closed form: the last block's tokens put on the grid through the source trace of the
    same forward (each patch: the token holding it; a pruned patch: zero, or the fused token), then the plain
    model's merger and head."""
    seen = {}
    hook = _encoder(model).blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("x", o))
    try:
        with torch.no_grad():
            out = model(X)
    finally:
        hook.remove()
    src = tocom_hub.get_source(model)  # [B, N', 64] 0/1
    assert src.shape[1] == seen["x"].shape[1] < 64 and (src.sum(dim=1) <= 1).all()
    with torch.no_grad():
        grid = (src.transpose(1, 2) @ seen["x"]).reshape(2, 8, 8, -1)
        ref = _encoder(plain).merger(grid)
        ref = plain.forward_head(ref) if name.endswith("_merge") else ref
    return out, ref, src


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("name", MERGE)
def test_merger_sees_every_patch_as_the_token_holding_it(name, option):
    model = make_qwen(name, depth=3)
    plain = copy.deepcopy(model)
    untraced = copy.deepcopy(model)
    tocom_hub.patch(model, trace_source=True, **OPTIONS[option])
    tocom_hub.patch(untraced, **OPTIONS[option])  # the index map is tracked without trace_source / track_grid
    tocom_hub.set_r(model, 6)
    tocom_hub.set_r(untraced, 6)
    out, ref, src = _by_hand(model, plain, name)
    assert (out - ref).abs().max() <= 1e-5
    with torch.no_grad():
        assert torch.equal(untraced(X), out)
    held = src.sum(dim=1)  # patches in some token: all for ToMe and fused EViT, not for plain EViT
    assert (held == 1).all() if option != "evit" else ((held == 0).any() and (held == 1).any())


def test_a_merger_fed_zeros_for_merged_patches_fails_the_reference():
    """Deliberately wrong: each token only at one patch of its group, the other patches merged into it zero.
    Fed to the plain merger, it misses the reference the patched model meets."""
    name = "qwen3_vit_88m_enc"
    model = make_qwen(name, depth=3)
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, trace_source=True)
    tocom_hub.set_r(model, 6)
    seen = {}
    hook = model.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("x", o))
    try:
        out, ref, src = _by_hand(model, plain, name)
    finally:
        hook.remove()
    assert (out - ref).abs().max() <= 1e-5
    one = torch.zeros_like(src)
    one.scatter_(2, src.argmax(dim=2, keepdim=True), 1.0)  # each token at its group's first patch only
    assert (one.sum(dim=2) == 1).all() and (src.sum(dim=2) > 1).any()  # some groups really merged
    with torch.no_grad():
        wrong = plain.merger((one.transpose(1, 2) @ seen["x"]).reshape(2, 8, 8, -1))
    assert (wrong - ref).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("name", MERGE)
def test_two_threads_get_the_serial_outputs(name, method):
    model = make_qwen(name)
    tocom_hub.patch(model, method=method)
    assert_threads_get_serial_outputs(model)


@pytest.mark.parametrize("name", MERGE)
def test_bank_changes_only_q_and_v_and_runs_in_the_regular_mode(name):
    model = make_qwen(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain_out = model(X)
    bank = ToComBank.for_model(model, r_max=4, rank=2, targets=("q", "v"))
    groups = random_groups(bank, seed=2)
    tocom_hub.apply(model, 1, 3, bank=bank)
    assert not get_settings(model)["dense"] and tocom_hub.get_r(model) == 3
    assert_only_q_and_v_moved_by_the_delta(model, before, bank, groups, 1, 3)
    with torch.no_grad():
        out = model(X)
    assert out.shape == _out_shape(name) and (out - plain_out).abs().max() > 1e-4
    tocom_hub.remove(model)  # (apply patched it, so remove unpatches it)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(X), plain_out)


def test_a_reducer_without_positions_is_refused_at_the_merger():
    class Truncate:  # keeps the first tokens: its plan is no Merge / Prune, so its positions are unknown
        info = "keys"

        def plan(self, info, r, num_prefix):
            return info.shape[0], info.shape[1] - int(r)  # (batch, tokens kept)

        def apply(self, plan, x, size):
            return x[:, : plan[1]], None

        def source(self, plan, source):
            return source

        def index(self, plan):
            return torch.arange(plan[1]).expand(plan[0], -1)

    model = make_qwen("qwen3_vit_88m_enc")
    tocom_hub.patch(model, reducer=Truncate())
    tocom_hub.set_r(model, 4)
    with pytest.raises(RuntimeError, match="patch merger needs every patch's token"), torch.no_grad():
        model(X)
