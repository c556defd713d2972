"""Dense mode (patch(dense=True): merge before the MLP, unmerge after) and the grid maths of core/dense.py."""

import copy

import pytest
import torch
from dense_reference import reference_dense_features
from tiny_models import make_vit

import tocom_hub
import tocom_hub.core.patch
from tocom_hub.core import dense as dense_mod
from tocom_hub.core import merge as merge_mod
from tocom_hub.core import prune as prune_mod

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
VARIANTS = ["cls_token", "registers", "gap", "map_head", "layer_scale", "qk_norm"]


def _groups(plan, b, num_tokens):
    """Output tokens as lists of input positions, read off the plan (as tests/test_merge.py does)."""
    fa, fb = plan.first_a, plan.first_b
    a_pos, b_pos = list(range(fa, num_tokens, 2)), list(range(fb, num_tokens, 2))
    groups = [[p] for p in range(plan.num_prefix)]
    groups += [[a_pos[i]] for i in plan.a_idx[b, plan.r :].tolist()]
    out_b = [[p] for p in b_pos]
    for i, j in zip(plan.a_idx[b, : plan.r].tolist(), plan.dst_idx[b].tolist()):
        out_b[j].append(a_pos[i])
    return groups + out_b


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("batch", [1, 3])
def test_unmerge_copies_every_output_row_to_its_sources(num_prefix, batch):
    g = torch.Generator().manual_seed(num_prefix + 10 * batch)
    n, r = 23, 7
    plan = merge_mod.bipartite_soft_matching(torch.randn(batch, n, 8, generator=g), r, num_prefix)
    y = torch.randn(batch, n - r, 4, generator=g)
    out = dense_mod.unmerge(plan, y)
    assert out.shape == (batch, n, 4)
    for b in range(batch):
        for row, members in enumerate(_groups(plan, b, n)):
            for p in members:
                assert torch.equal(out[b, p], y[b, row])
    # the positions agree with the source trace of the same plan
    src = merge_mod.merge_source(plan)
    assert torch.equal(dense_mod.merge_positions(plan), src.argmax(dim=1))


@pytest.mark.parametrize("fuse", [False, True])
def test_unprune_fills_kept_rows_fused_or_zero(fuse):
    g = torch.Generator().manual_seed(2)
    n, r, prefix = 17, 6, 1
    plan = prune_mod.select_attentive(torch.rand(2, n, generator=g), r, prefix, fuse=fuse)
    y = torch.randn(2, n - r, 3, generator=g)
    out = dense_mod.unprune(plan, y)
    for b in range(2):
        keep = plan.keep[b].tolist()
        for p in range(n):
            want = y[b, keep.index(p)] if p in keep else (y[b, -1] if fuse else torch.zeros(3))
            assert torch.equal(out[b, p], want)


def test_compose_index_follows_the_source_trace_over_blocks():
    model = make_vit("registers")
    tocom_hub.patch(model, trace_source=True)
    tocom_hub.set_r(model, 9)
    model(X)
    src = tocom_hub.get_source(model)
    assert torch.equal(model._tocom_state.last().grid_index, src.argmax(dim=1))


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_r0_is_bit_exact_with_timm(variant, method):
    model = make_vit(variant)
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, method=method, dense=True, dense_ratio=4)
    with torch.no_grad():
        assert torch.equal(model(X), plain(X))
        assert torch.equal(model.forward_features(X), plain.forward_features(X))
        for a, b in zip(model.forward_intermediates(X)[1], plain.forward_intermediates(X)[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "variant,method,fuse",
    [("cls_token", "tome", False), ("gap", "tome", False), ("registers", "evit", False), ("cls_token", "evit", True)],
)
def test_dense_matches_naive_reference(variant, method, fuse):
    model = make_vit(variant, fused=False)
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, method=method, dense=True, dense_ratio=3, fuse_token=fuse)
    tocom_hub.set_r(model, 4)  # k = 12 tokens per block
    with torch.no_grad():
        out = model.forward_features(X)
        ref = reference_dense_features(plain, X, 12, method, fuse)
        assert out.shape == plain.forward_features(X).shape
        assert (out - ref).abs().max() <= 1e-5
        assert (ref - reference_dense_features(plain, X, 13, method, fuse)).abs().max() > 1e-3  # k matters


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_forward_intermediates_full_grids(variant, method):
    model = make_vit(variant)
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, method=method, dense=True, dense_ratio=4)
    tocom_hub.set_r(model, 6)
    with torch.no_grad():
        assert model.forward_features(X).shape == plain.forward_features(X).shape
        for kw in (
            dict(),
            dict(output_fmt="NLC", indices=[0, 2], norm=True),
            dict(output_fmt="NCHW", indices=1, return_prefix_tokens=True, intermediates_only=True),
            dict(output_fmt="NLC", output_dict=True, return_prefix_tokens=True),
        ):
            got, ref = model.forward_intermediates(X, **kw), plain.forward_intermediates(X, **kw)
            flat_got, flat_ref = _flatten(got), _flatten(ref)
            assert [t.shape for t in flat_got] == [t.shape for t in flat_ref]
            assert all(torch.isfinite(t).all() for t in flat_got)
        assert (model(X) - plain(X)).abs().max() > 1e-4  # dense merging did change something


def _flatten(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for key in sorted(obj) for t in _flatten(obj[key])]
    return [t for item in obj for t in _flatten(item)]


def _paired_image(seed=0, unique=False):
    """64 px, 8 px patches; patch 2j+1 repeats patch 2j (horizontal neighbours) unless ``unique``."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 3, 64, 64, generator=g)
    if not unique:
        for c in range(0, 64, 16):
            img[..., c + 8 : c + 16] = img[..., c : c + 8]
    return img


def test_lossless_oracle_duplicated_patches():
    """No position embedding and patches repeating in pairs: duplicates stay equal through every block, so
    merging exactly the 32 pairs before the MLP and unmerging after returns the plain outputs."""
    model = make_vit("cls_token", pos_embed="none")
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, method="tome", dense=True, dense_ratio=8)
    tocom_hub.set_r(model, 4)  # k = 32: every A token merges into its twin
    img = _paired_image()
    with torch.no_grad():
        out, ref = model.forward_features(img), plain.forward_features(img)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        got = model.forward_intermediates(img, intermediates_only=True)
        for a, b in zip(got, plain.forward_intermediates(img, intermediates_only=True)):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
        other = _paired_image(unique=True)  # the same k on unique patches is lossy: the oracle can fail
        assert (model.forward_features(other) - plain.forward_features(other)).abs().max() > 1e-2


def test_dense_settings_validation_and_switch():
    model = make_vit("cls_token")
    tocom_hub.patch(model, dense=True, dense_ratio=4)
    assert tocom_hub.core.patch.get_settings(model)["dense"] is True
    with pytest.raises(ValueError, match=r"r must be an int in \[0, 8\] \(dense mode: k = 4·r .*at most 32.*; got 9$"):
        tocom_hub.set_r(model, 9)  # 65 tokens: at most 32 merge in one block
    tocom_hub.set_r(model, 8)
    with pytest.raises(ValueError, match="dense_ratio"):
        tocom_hub.patch(model, dense=True, dense_ratio=0)
    with pytest.raises(ValueError, match=r"r must be an int in \[0, 6\] \(dense mode: k = 5·r .*; got 8$"):
        tocom_hub.patch(model, dense=True, dense_ratio=5)  # 40 > 32, settings unchanged
    assert tocom_hub.core.patch.get_settings(model)["dense_ratio"] == 4
    tocom_hub.patch(model)  # back to the regular mode, r kept
    assert tocom_hub.core.patch.get_settings(model)["dense"] is False
    assert model.forward_features(X).shape[1] == 65 - 3 * 8
