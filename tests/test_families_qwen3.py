"""The qwen3_vit family (timm ``Qwen3VitClassifier`` / ``Qwen3VitEncoder``: EvaBlock + AttentionRope with a 2-D
``RotaryEmbeddingCat``, no prefix tokens) against plain timm, EViT as key masking on the plain model, the bank's
closed form; the ``merge`` heads (2×2 patch merger) in dense mode, and switching between the modes
(their regular mode: tests/test_qwen3_merger.py)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from bank_helpers import naive_delta, random_groups
from test_families_vit_blocks import assert_threads_get_serial_outputs
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from tiny_models import _init_nontrivial

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.core.compensation.marker import MARKER_KEY
from tocom_hub.core.families.eva import ROPES
from tocom_hub.core.patch import get_settings

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
NAMES = ("qwen3_vit_88m", "qwen3_vit_88m_enc", "qwen3_vit_88m_merge")


def make_qwen(name="qwen3_vit_88m", seed=0, **kw):
    """A tiny Qwen3 vision model: 64 px, patch 8 (64 patches), 2 blocks of width 64."""
    args = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, out_features=32)
    if not name.endswith("_enc"):
        args["num_classes"] = 10
    args.update(kw)
    torch.manual_seed(seed)
    return _init_nontrivial(timm.create_model(name, pretrained=False, **args), seed).eval()


def _encoder(model):
    return getattr(model, "encoder", model)


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("kw", [dict(), dict(name="qwen3_vit_88m_enc", global_pool="avg")], ids=["classifier", "enc"])
def test_r0_bit_exact_r_runs_sizes_and_unpatch(kw, method):
    model = make_qwen(**kw)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        ref = plain(X)
        tocom_hub.patch(model, method=method)
        assert torch.equal(model(X), ref) and torch.equal(model.forward_features(X), plain.forward_features(X))
        tocom_hub.set_r(model, 6)
        out = model(X)
        assert out.shape == ref.shape and torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4
        assert model.forward_features(X).shape == (2, 64 - 12, 64)  # the tokens, no longer a grid
        if method == "tome":
            size = tocom_hub.get_size(model)
            assert size.shape[1] == 64 - 12 and torch.equal(size.sum(dim=(1, 2)), torch.full((2,), 64.0))
        tocom_hub.unpatch(model)
        assert type(model) is type(plain) and torch.equal(model(X), ref)


def test_tome_average_pool_weighs_tokens_by_size():
    model = make_qwen(name="qwen3_vit_88m_enc", global_pool="avg")
    tocom_hub.patch(model)
    tocom_hub.set_r(model, 8)
    with torch.no_grad():
        tokens, pooled = model.forward_features(X), model(X)
    size = tocom_hub.get_size(model)
    assert (pooled - (tokens * size).sum(dim=1) / 64).abs().max() <= 1e-5
    assert (pooled - tokens.mean(dim=1)).abs().max() > 1e-4


def _evit_by_masking(model, r):
    """EViT as the plain encoder with the pruned tokens' keys masked out from the next block on; each block's
    attentiveness is the attention of the mean query of the alive tokens (no class token), rotated by timm."""
    enc = _encoder(model)
    got = {}
    for blk in enc.blocks:
        blk.attn.q_norm.register_forward_hook(lambda m, i, o: got.__setitem__("q", o))
        blk.attn.k_norm.register_forward_hook(lambda m, i, o: got.__setitem__("k", o))
    x = enc.patch_embed(X)
    x, rope = enc._pos_embed(x)
    batch, n = x.shape[:2]
    alive = torch.ones(batch, n, dtype=torch.bool)
    for blk in enc.blocks:
        mask = torch.zeros(batch, 1, 1, n).masked_fill(~alive[:, None, None], float("-inf"))
        x = blk(x, rope=rope, attn_mask=mask)
        q = apply_rot_embed_cat(got["q"], rope, half=True)
        k = apply_rot_embed_cat(got["k"], rope, half=True)
        w = alive[:, None, :, None].float()
        mean_q = (q * w).sum(dim=2, keepdim=True) / w.sum(dim=2, keepdim=True)
        logits = (mean_q * blk.attn.scale) @ k.transpose(-2, -1) + mask
        score = logits.softmax(dim=-1).mean(dim=1)[:, 0]
        for b in range(batch):
            cand = [j for j in range(n) if alive[b, j]]
            for j in sorted(cand, key=lambda j: -float(score[b, j]))[max(len(cand) - r, 1) :]:
                alive[b, j] = False
    return x, alive


def test_evit_with_rope_is_key_masking_of_the_plain_model():
    model = make_qwen(depth=3)
    with torch.no_grad():
        ref, alive = _evit_by_masking(copy.deepcopy(model), r=10)
        tocom_hub.patch(model, method="evit", trace_source=True)
        tocom_hub.set_r(model, 10)
        out = model.forward_features(X)
    src = tocom_hub.get_source(model)
    assert torch.equal(src.sum(dim=1) > 0, alive)
    assert (out - src @ ref).abs().max() <= 1e-5


def test_centroid_rope_at_the_grid_is_the_models_rope_and_centroid_runs():
    model = make_qwen()
    tocom_hub.patch(model, positions="centroid")
    rope = model.encoder.rope
    coords = ROPES[type(rope)][0](rope, (8, 8))[None]
    ref = rope.get_embed(shape=(8, 8))
    assert (model._tocom_state.family.rope_embed(coords, 0)[0, 0] - ref).abs().max() <= 1e-5
    tocom_hub.set_r(model, 8)
    with torch.no_grad():
        centroid = model(X)
        tocom_hub.patch(model, positions="keep")
        assert (centroid - model(X)).abs().max() > 1e-5


@pytest.mark.parametrize("name", ["qwen3_vit_88m_merge", "qwen3_vit_88m_enc"])
def test_merge_heads_run_dense_and_switch_to_the_regular_mode(name):
    model = make_qwen(name)
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, dense=True, dense_ratio=4)
    with torch.no_grad():
        ref = plain(X)
        assert torch.equal(model(X), ref)
        tocom_hub.set_r(model, 4)
        dense = model(X)
        assert dense.shape == ref.shape and (dense - ref).abs().max() > 1e-4
        tocom_hub.patch(model)  # the regular mode: the merger runs on the tokens put back on the grid
        assert get_settings(model)["dense"] is False
        tocom_hub.set_r(model, 4)
        regular = model(X)
        assert regular.shape == ref.shape and (regular - dense).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_dense_mode_keeps_full_grids(method):
    model = make_qwen()
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, method=method, dense=True, dense_ratio=4)
    with torch.no_grad():
        tocom_hub.set_r(model, 6)
        feats, ref = model.forward_features(X), plain.forward_features(X)
        assert feats.shape == ref.shape == (2, 8, 8, 64) and (feats - ref).abs().max() > 1e-3
        grids = model.forward_intermediates(X, intermediates_only=True)
        assert [g.shape for g in grids] == [(2, 64, 8, 8)] * 2


def test_regular_mode_intermediates_come_back_on_the_grid():
    model = make_qwen()
    tocom_hub.patch(model)
    tocom_hub.set_r(model, 6)
    with torch.no_grad():
        grids = model.forward_intermediates(X, intermediates_only=True)
        assert [g.shape for g in grids] == [(2, 64, 8, 8)] * 2
        with pytest.raises(ValueError, match="intermediates_only=True"):
            model.forward_intermediates(X)


def assert_only_q_and_v_moved_by_the_delta(model, before, bank, groups, source_r, target_r, d=64):
    """Every weight as ``before`` except the q and v rows of each fused ``attn.qkv``, which moved by the naive
    delta of the bank's ``source_r → target_r`` update."""
    after = model.state_dict()
    del after[MARKER_KEY]
    for k, v in after.items():
        if k.endswith("attn.qkv.weight"):
            b = int(k.split("blocks.")[1].split(".")[0])
            for i, t in ((0, "q"), (2, "v")):
                delta = naive_delta(groups, t, b, source_r, target_r, bank.scale)
                want = before[k][i * d : (i + 1) * d].double() + delta
                assert (v[i * d : (i + 1) * d].double() - want).abs().max() <= 1e-5
            assert torch.equal(v[d : 2 * d], before[k][d : 2 * d])
        else:
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ["qwen3_vit_88m", "qwen3_vit_88m_enc"])
def test_bank_apply_changes_only_q_and_v_by_the_delta_and_remove_is_exact(name):
    model = make_qwen(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = ToComBank.for_model(model, r_max=4, rank=2, targets=("q", "v"))
    groups = random_groups(bank, seed=2)
    tocom_hub.apply(model, 1, 3, bank=bank)
    assert_only_q_and_v_moved_by_the_delta(model, before, bank, groups, 1, 3)
    tocom_hub.remove(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_two_threads_get_the_serial_outputs(method):
    model = make_qwen()
    tocom_hub.patch(model, method=method)
    assert_threads_get_serial_outputs(model)
