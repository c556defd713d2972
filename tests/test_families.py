"""The eva family (timm ``Eva``: RoPE cat / DINOv3 / mixed / none, fused and separate q/k/v, grouped k/v,
registers, pool avg / token / map, post-norm blocks) against independent references: plain timm, a
``VisionTransformer`` with the same weights, and EViT written as key masking on the plain model."""

from __future__ import annotations

import copy

import pytest
import torch
from bank_helpers import naive_delta, random_groups
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock
from tiny_models import EVA_VARIANTS, make_eva, make_vit

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.core.compensation.marker import MARKER_KEY, read_marker
from tocom_hub.core.families.eva import ROPES

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
CLASS_TOKEN = ["rope_cat_cls", "rope_cat_separate_qkv", "rope_dinov3_registers", "rope_cat_gqa", "norope_token"]


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("variant", sorted(EVA_VARIANTS))
def test_eva_r0_bit_exact_r_runs_sizes_and_unpatch(variant, method):
    model = make_eva(variant)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        ref = plain(X)
        tocom_hub.patch(model, method=method)
        assert torch.equal(model(X), ref)
        tocom_hub.set_r(model, 6)
        out = model(X)
        assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.allclose(out, ref)
        if method == "tome":
            size = tocom_hub.get_size(model)
            n_in = model.patch_embed.num_patches + model.num_prefix_tokens
            assert size.shape[1] == n_in - 2 * 6 and torch.equal(size.sum(dim=(1, 2)), torch.full((2,), float(n_in)))
        tocom_hub.unpatch(model)
        assert type(model) is type(plain) and torch.equal(model(X), ref)


@pytest.mark.parametrize("positions", ["keep", "centroid"])
@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("variant", CLASS_TOKEN)
def test_reduction_in_the_last_block_leaves_class_token_logits(variant, method, positions):
    model = make_eva(variant, global_pool="token")
    ref = copy.deepcopy(model)(X)
    tocom_hub.patch(model, method=method, positions=positions)
    tocom_hub.set_r(model, [0, 9])
    with torch.no_grad():
        assert (model(X) - ref).abs().max() <= 1e-6


def _vit_and_eva(seed=0, **common):
    """A timm ``VisionTransformer`` and an ``Eva`` without RoPE holding the same weights (k bias 0)."""
    from timm.models.eva import Eva

    cfg = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, **common)
    vit = make_vit("cls_token", depth=2, init_values=0.3, seed=seed, **{k: v for k, v in common.items()})
    eva = Eva(use_rot_pos_emb=False, init_values=0.3, **cfg).eval()
    sd = vit.state_dict()
    out = {}
    for k, v in sd.items():
        k2 = k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        if k.endswith("attn.qkv.bias"):
            d = v.shape[0] // 3
            v[d : 2 * d] = 0  # Eva has no k bias
            out[k2.replace("qkv.bias", "q_bias")], out[k2.replace("qkv.bias", "v_bias")] = v[:d], v[2 * d :]
            continue
        out[k2] = v
    vit.load_state_dict(sd)
    eva.load_state_dict(out, strict=True)
    return vit, eva


@pytest.mark.parametrize("kwargs", [{"method": "tome"}, {"method": "evit"}, {"method": "tome", "prop_attn": False}])
def test_one_algorithm_eva_without_rope_equals_vit(kwargs):
    vit, eva = _vit_and_eva(global_pool="token")
    with torch.no_grad():
        assert (vit(X) - eva(X)).abs().max() <= 1e-5  # the two are the same network
        for m in (vit, eva):
            tocom_hub.patch(m, **kwargs)
            tocom_hub.set_r(m, 7)
        assert (vit(X) - eva(X)).abs().max() <= 1e-5


def _evit_by_masking(model, r):
    """EViT as the *plain* model with the pruned tokens' keys masked out from the next block on: no token is
    removed; each block's class-token attention (read from the softmax itself) picks the survivors."""
    for blk in model.blocks:
        blk.attn.fused_attn = False
    seen = []
    hooks = [blk.attn.attn_drop.register_forward_hook(lambda m, a, o: seen.append(a[0])) for blk in model.blocks]
    prefix = model.num_prefix_tokens
    x = model.patch_embed(X)
    x, rope = model._pos_embed(x)
    x = model.norm_pre(x)
    batch, n = x.shape[:2]
    alive = torch.ones(batch, n, dtype=torch.bool)
    for blk in model.blocks:
        mask = torch.zeros(batch, 1, 1, n).masked_fill(~alive[:, None, None], float("-inf"))
        x = blk(x, rope=rope, attn_mask=mask)
        score = seen[-1][:, :, 0].mean(dim=1)  # [B, N] class-token attention, 0 on masked keys
        for b in range(batch):
            cand = [j for j in range(prefix, n) if alive[b, j]]
            keep = max(len(cand) - r, 1)
            ranked = sorted(cand, key=lambda j: -float(score[b, j].detach()))
            for j in ranked[keep:]:
                alive[b, j] = False
    for h in hooks:
        h.remove()
    return model.norm(x), alive


@pytest.mark.parametrize("variant", ["rope_cat_cls", "rope_dinov3_registers", "rope_cat_separate_qkv"])
def test_evit_with_rope_is_key_masking_of_the_plain_model(variant):
    model = make_eva(variant)
    ref, alive = _evit_by_masking(copy.deepcopy(model), r=10)
    tocom_hub.patch(model, method="evit", trace_source=True)
    tocom_hub.set_r(model, 10)
    with torch.no_grad():
        out = model.forward_features(X)
    src = tocom_hub.get_source(model)  # [B, N_out, N_in] one-hot: where each kept token came from
    assert torch.equal(src.sum(dim=1) > 0, alive)
    assert (out - src @ ref).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["rope_cat_cls", "rope_dinov3_registers", "rope_mixed_avg"])
def test_centroid_rope_at_the_grid_is_the_models_rope(variant):
    """The coordinates the centroid rule tracks give back timm's own rope rows at every patch."""
    model = make_eva(variant)
    tocom_hub.patch(model, positions="centroid")
    family, rope = model._tocom_state.family, model.rope
    grid_fn, embed_fn = ROPES[type(rope)]
    coords = grid_fn(rope, model.patch_embed.grid_size)[None]
    for block in range(len(model.blocks)):
        ref = rope.get_embed()
        ref = ref[block] if ref.ndim == 4 else ref
        got = family.rope_embed(coords, block)[0]
        assert (got - ref).abs().max() <= 1e-5, block


def test_centroid_and_keep_differ_and_centroid_is_the_mean_patch():
    model = make_eva("rope_cat_cls")
    outs = {}
    for rule in ("keep", "centroid"):
        tocom_hub.patch(model, positions=rule)
        tocom_hub.set_r(model, 8)
        with torch.no_grad():
            outs[rule] = model(X)
    assert not torch.allclose(outs["keep"], outs["centroid"])
    # after one merge block, every token's coordinates are the mean of its patches' (trace the sources)
    tocom_hub.patch(model, positions="centroid", trace_source=True)
    tocom_hub.set_r(model, [8, 0])
    with torch.no_grad():
        model(X)
    ctx = model._tocom_state.last()
    src = tocom_hub.get_source(model)
    grid = ROPES[type(model.rope)][0](model.rope, model.patch_embed.grid_size)
    full = torch.cat([torch.zeros(1, 2), grid])
    mean = (src @ full) / src.sum(-1, keepdim=True)
    assert (ctx.coords[:, 1:] - mean[:, 1:]).abs().max() <= 1e-5


def test_bad_position_rule_and_unsupported_models_raise_true_reasons():
    model = make_eva("rope_cat_cls")
    with pytest.raises(ValueError, match="positions must be one of"):
        tocom_hub.patch(model, positions="middle")
    assert not tocom_hub.is_patched(model)


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("block", [ResPostBlock, ParallelScalingBlock])
def test_res_post_and_parallel_block_vits(block, method):
    model = make_vit("cls_token", depth=2, block_fn=block, init_values=0.3)
    ref = copy.deepcopy(model)(X)
    tocom_hub.patch(model, method=method)
    with torch.no_grad():
        assert torch.equal(model(X), ref)
        tocom_hub.set_r(model, [0, 9])  # reduced in the last block only: the class token is unchanged
        assert (model(X) - ref).abs().max() <= 1e-6
        tocom_hub.set_r(model, 9)
        assert not torch.allclose(model(X), ref)
        tocom_hub.unpatch(model)
        assert type(model.blocks[0]) is block and torch.equal(model(X), ref)


@pytest.mark.parametrize("variant", ["rope_cat_cls", "rope_cat_separate_qkv"])
def test_bank_apply_changes_only_q_and_v_by_the_delta_and_remove_is_exact(variant):
    model = make_eva(variant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = ToComBank.for_model(model, r_max=4, rank=2, targets=("q", "v"))
    groups = random_groups(bank, seed=2)
    tocom_hub.apply(model, 1, 3, bank=bank)
    after = model.state_dict()
    assert read_marker(after)["source_r"] == 1  # the merged state says what it carries
    del after[MARKER_KEY]
    d = 64
    for k, v in after.items():
        b = int(k.split(".")[1]) if k.startswith("blocks.") else None
        if k.endswith("attn.qkv.weight"):
            for i, t in ((0, "q"), (2, "v")):
                want = before[k][i * d : (i + 1) * d].double() + naive_delta(groups, t, b, 1, 3, bank.scale)
                assert (v[i * d : (i + 1) * d].double() - want).abs().max() <= 1e-5
            assert torch.equal(v[d : 2 * d], before[k][d : 2 * d])
        elif k.endswith(("attn.q_proj.weight", "attn.v_proj.weight")):
            want = before[k].double() + naive_delta(groups, k.split(".")[-2][0], b, 1, 3, bank.scale)
            assert (v.double() - want).abs().max() <= 1e-5
        else:
            assert torch.equal(v, before[k]), k
    tocom_hub.remove(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("variant", ["rope_cat_separate_qkv", "rope_cat_cls", "rope_dinov3_registers"])
def test_bank_unmerged_equals_merged_on_separate_and_fused_qv_bias_projections(variant):
    """Unmerged mode on separate q/k/v and on EVA's fused qkv with q/v bias (timm's F.linear on the weight is
    routed through the Linear while the bank is applied); remove() gives the plain model back, bit-exact."""
    model = make_eva(variant)
    plain = copy.deepcopy(model)
    bank = ToComBank.for_model(model, r_max=4, rank=2)
    random_groups(bank, seed=3, std=1.0)
    merged = copy.deepcopy(model)
    tocom_hub.apply(merged, 0, 2, bank=bank)
    tocom_hub.apply(model, 0, 2, bank=bank, merge=False)
    with torch.no_grad():
        assert (model(X) - merged(X)).abs().max() <= 1e-5
        with tocom_hub.compensate.disabled(model):
            assert (model(X) - merged(X)).abs().max() > 1e-2  # the bank does something
        tocom_hub.set_target_r(model, 0)  # r = 0: timm's own attention forward, with the bank's update
        tocom_hub.set_target_r(merged, 0)
        assert (model(X) - merged(X)).abs().max() <= 1e-5
        tocom_hub.remove(model)
        assert torch.equal(model(X), plain(X))
    linears = [m for b in model.blocks for m in b.attn.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)  # the ToCom Linear class is gone
    assert [vars(b.attn).get("qkv_bias_separate") for b in model.blocks] == [
        vars(p.attn).get("qkv_bias_separate") for p in plain.blocks
    ]
