"""The gemma4_vit family (timm ``Gemma4VitClassifier`` / ``Gemma4VitEncoder``: sandwich-norm blocks, separate
clippable q/k/v, 2-D rope on (x, y) coordinates, attention scale 1, soft-token pool) against plain timm, the
source trace (the size-aware soft pool is timm's pool of the unmerged grid), EViT as key masking on the plain
model, and the bank's closed form on the separate q/v Linears."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from bank_helpers import naive_delta, random_groups
from test_families_vit_blocks import assert_threads_get_serial_outputs
from timm.models.gemma4_vit import apply_multidimensional_rope
from tiny_models import _init_nontrivial

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.core.compensation.marker import MARKER_KEY

X = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(6))  # patch 8: a 6×6 grid, 36 patches
VARIANTS = {
    "classifier": ("gemma4_vit_167m", {}),
    "enc_soft": ("gemma4_vit_570m_enc", {}),  # (with the 31B's standardisation after the pool)
    "enc_avg": ("gemma4_vit_167m_enc", dict(global_pool="avg")),
}


def make_gemma(variant="classifier", seed=0, **kw):
    name, extra = VARIANTS[variant]
    args = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2, head_dim=32, intermediate_size=128,
                pooling_kernel_size=2, position_embedding_size=16, **extra)  # fmt: skip
    args.update(kw)
    if "_enc" not in name:
        args["num_classes"] = 10
    torch.manual_seed(seed)
    model = _init_nontrivial(timm.create_model(name, pretrained=False, **args), seed).eval()
    enc = getattr(model, "encoder", model)
    if enc.std_bias is not None:
        enc.std_bias.normal_(0, 0.1)
        enc.std_scale.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("positions", ["keep", "centroid"])
@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_r0_bit_exact_r_runs_sizes_and_unpatch(variant, method, positions):
    model = make_gemma(variant)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        ref = plain(X)
        tocom_hub.patch(model, method=method, positions=positions)
        assert torch.equal(model(X), ref)
        tocom_hub.set_r(model, 5)
        out = model(X)
        assert out.shape == ref.shape and torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4
        if method == "tome":
            size = tocom_hub.get_size(model)
            assert size.shape[1] == 36 - 10 and torch.equal(size.sum(dim=(1, 2)), torch.full((2,), 36.0))
        tocom_hub.unpatch(model)
        assert type(model) is type(plain) and torch.equal(model(X), ref)


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_soft_pool_is_timms_pool_of_the_patches_each_token_stands_for(method):
    """From the source trace, independently of the index map: every patch takes its token's value, and a cell
    averages the patches still represented (all of them for ToMe)."""
    model = make_gemma("enc_soft")
    enc = model
    tocom_hub.patch(model, method=method, trace_source=True)
    tocom_hub.set_r(model, 5)
    with torch.no_grad():
        pooled = model(X)
        tokens = model.forward_features(X)
        src = tocom_hub.get_source(model)  # [B, N_out, 36]
        patches = src.transpose(1, 2) @ tokens  # [B, 36, D]
        position_ids = enc.patch_embed(X)[1]
        total, _ = enc.pooler._avg_pool_by_positions(patches, position_ids)
        share, _ = enc.pooler._avg_pool_by_positions(src.sum(dim=1)[..., None], position_ids)
        ref = total / share * enc.pooler.root_hidden_size
        ref = (ref - enc.std_bias) * enc.std_scale
    assert (pooled - ref).abs().max() <= 1e-4 * ref.abs().max()
    if method == "tome":
        assert torch.equal(share, torch.ones_like(share))


def _evit_by_masking(model, r):
    """EViT as the plain model with the pruned tokens' keys masked out from the next block on; attentiveness:
    the attention of the alive tokens' mean query (no class token), rotated by timm's own rope."""
    enc = getattr(model, "encoder", model)
    got = {}
    for blk in enc.blocks:
        blk.attn.q_norm.register_forward_hook(lambda m, i, o: got.__setitem__("q", o))
        blk.attn.k_norm.register_forward_hook(lambda m, i, o: got.__setitem__("k", o))
    x, position_ids, _ = enc.patch_embed(X)
    cos, sin = enc.rotary_emb(x, position_ids)
    batch, n = x.shape[:2]
    alive = torch.ones(batch, n, dtype=torch.bool)
    for blk in enc.blocks:
        mask = torch.zeros(batch, 1, 1, n).masked_fill(~alive[:, None, None], float("-inf"))
        x = blk(x, cos, sin, attn_mask=mask)
        q = apply_multidimensional_rope(got["q"], cos, sin, ndim=2, unsqueeze_dim=2).transpose(1, 2)
        k = apply_multidimensional_rope(got["k"], cos, sin, ndim=2, unsqueeze_dim=2).transpose(1, 2)
        w = alive[:, None, :, None].float()
        mean_q = (q * w).sum(dim=2, keepdim=True) / w.sum(dim=2, keepdim=True)
        score = (mean_q @ k.transpose(-2, -1) + mask).softmax(dim=-1).mean(dim=1)[:, 0]
        for b in range(batch):
            cand = [j for j in range(n) if alive[b, j]]
            for j in sorted(cand, key=lambda j: -float(score[b, j]))[max(len(cand) - r, 1) :]:
                alive[b, j] = False
    return x, alive


def test_evit_with_rope_is_key_masking_of_the_plain_model():
    model = make_gemma("classifier", depth=3)
    with torch.no_grad():
        ref, alive = _evit_by_masking(copy.deepcopy(model), r=6)
        tocom_hub.patch(model, method="evit", trace_source=True)
        tocom_hub.set_r(model, 6)
        out = model.forward_features(X)
    src = tocom_hub.get_source(model)
    assert torch.equal(src.sum(dim=1) > 0, alive)
    assert (out - src @ ref).abs().max() <= 1e-5


def test_centroid_rope_at_the_grid_is_the_models_rope_and_differs_from_keep():
    model = make_gemma("classifier")
    tocom_hub.patch(model, positions="centroid")
    enc = model.encoder
    x, position_ids, _ = enc.patch_embed(X)
    cos, sin = model._tocom_state.family.rope_embed(position_ids.float())
    ref_cos, ref_sin = enc.rotary_emb(x, position_ids)
    assert (cos - ref_cos).abs().max() <= 1e-6 and (sin - ref_sin).abs().max() <= 1e-6
    tocom_hub.set_r(model, 6)
    with torch.no_grad():
        centroid = model(X)
        tocom_hub.patch(model, positions="keep")
        assert (centroid - model(X)).abs().max() > 1e-5


@pytest.mark.parametrize("variant", ["classifier", "enc_soft"])
def test_dense_mode_keeps_full_grids_and_regular_intermediates_refuse(variant):
    model = make_gemma(variant)
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, dense=True, dense_ratio=2)
    with torch.no_grad():
        tocom_hub.set_r(model, 4)
        out, ref = model(X), plain(X)
        assert out.shape == ref.shape and (out - ref).abs().max() > 1e-4
        assert [g.shape for g in model.forward_intermediates(X, intermediates_only=True)] == [(2, 64, 6, 6)] * 2
        tocom_hub.patch(model)
        with pytest.raises(ValueError, match="patch with dense=True"):
            model.forward_intermediates(X)


def test_bank_apply_changes_only_q_and_v_by_the_delta_and_remove_is_exact():
    model = make_gemma("classifier")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = ToComBank.for_model(model, r_max=4, rank=2, targets=("q", "v"))
    groups = random_groups(bank, seed=2)
    tocom_hub.apply(model, 1, 3, bank=bank)
    after = model.state_dict()
    del after[MARKER_KEY]
    for k, v in after.items():
        if k.endswith(("attn.q_proj.linear.weight", "attn.v_proj.linear.weight")):
            b = int(k.split("blocks.")[1].split(".")[0])
            want = before[k].double() + naive_delta(groups, k.split(".")[-3][0], b, 1, 3, bank.scale)
            assert (v.double() - want).abs().max() <= 1e-5
        else:
            assert torch.equal(v, before[k]), k
    tocom_hub.remove(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_two_threads_get_the_serial_outputs(method):
    model = make_gemma("enc_soft")
    tocom_hub.patch(model, method=method)
    assert_threads_get_serial_outputs(model, size=48, r=5)


def test_bank_unmerged_equals_merged_through_the_clippable_linears():
    model = make_gemma("classifier")
    plain = copy.deepcopy(model)
    bank = ToComBank.for_model(model, r_max=4, rank=2)
    random_groups(bank, seed=3, std=1.0)
    merged = copy.deepcopy(model)
    tocom_hub.apply(merged, 0, 2, bank=bank)
    tocom_hub.apply(model, 0, 2, bank=bank, merge=False)
    with torch.no_grad():
        assert (model(X) - merged(X)).abs().max() <= 1e-5
        with tocom_hub.compensate.disabled(model):
            assert (model(X) - merged(X)).abs().max() > 1e-3  # the bank does something
        tocom_hub.remove(model)
        assert torch.equal(model(X), plain(X))
