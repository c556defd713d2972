"""Dense mode through the family layer: Eva (every rope / prefix / pool kind) and the refusals."""

import copy
import threading

import pytest
import torch
from test_dense import _flatten
from test_families import _vit_and_eva
from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock, ParallelThingsBlock
from tiny_models import EVA_VARIANTS, make_eva, make_vit
from tiny_relfam import REL_VARIANTS, make_rel

import tocom_hub
from tocom_hub.core.patch import get_settings

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("variant", sorted(EVA_VARIANTS))
def test_eva_dense_r0_bit_exact_and_full_grids(variant, method):
    model = make_eva(variant)
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, method=method, dense=True, dense_ratio=4)
    with torch.no_grad():
        assert torch.equal(model(X), plain(X))
        for a, b in zip(model.forward_intermediates(X)[1], plain.forward_intermediates(X)[1]):
            assert torch.equal(a, b)
        tocom_hub.set_r(model, 6)  # k = 24 tokens per block
        assert model.forward_features(X).shape == plain.forward_features(X).shape
        prefix = bool(model.num_prefix_tokens)  # timm's Eva fails on return_prefix_tokens without prefix tokens
        for kw in (dict(), dict(output_fmt="NLC", indices=[0, 1], norm=True, return_prefix_tokens=prefix)):
            got, ref = _flatten(model.forward_intermediates(X, **kw)), _flatten(plain.forward_intermediates(X, **kw))
            assert [t.shape for t in got] == [t.shape for t in ref] and all(torch.isfinite(t).all() for t in got)
        assert (model.forward_features(X) - plain.forward_features(X)).abs().max() > 1e-3  # dense merging acted
        assert tocom_hub.get_size(model) is None  # the grid never shrank


@pytest.mark.parametrize("kwargs", [{"method": "tome"}, {"method": "evit"}, {"method": "evit", "fuse_token": True}])
def test_eva_without_rope_runs_the_same_dense_step_as_vit(kwargs):
    """The classic ViT's dense mode is checked against a naive loop (test_dense.py); an Eva holding the same
    weights must give the same features in dense mode, and a different k must not."""
    vit, eva = _vit_and_eva(global_pool="token")
    for m in (vit, eva):
        tocom_hub.patch(m, dense=True, dense_ratio=3, **kwargs)
        tocom_hub.set_r(m, 4)
    with torch.no_grad():
        a, b = vit.forward_features(X), eva.forward_features(X)
        assert (a - b).abs().max() <= 1e-5
        tocom_hub.set_r(eva, 3)
        assert (a - eva.forward_features(X)).abs().max() > 1e-4


def test_dense_refuses_parallel_blocks_and_custom_reducers_without_patching():
    model = make_vit("cls_token", depth=2, block_fn=ParallelScalingBlock, init_values=0.3)
    with pytest.raises(TypeError, match="dense mode cannot run block 0 .*beside the attention"):
        tocom_hub.patch(model, dense=True)
    assert not tocom_hub.is_patched(model)
    tocom_hub.patch(model)  # the regular mode still works on it
    with pytest.raises(TypeError, match="dense mode"):
        tocom_hub.patch(model, dense=True)
    assert get_settings(model)["dense"] is False
    vit = make_vit("cls_token")
    with pytest.raises(ValueError, match="reducer=None with dense=True"):
        tocom_hub.patch(vit, dense=True, reducer=tocom_hub.core.reducers.ToMe())
    assert not tocom_hub.is_patched(vit)


def test_grid_tracking_is_per_thread():
    model = make_vit("cls_token")
    tocom_hub.patch(model)
    tocom_hub.set_r(model, 4)
    seen = {}

    def other():
        model.forward_features(X)
        seen["other"] = model._tocom_state.last().grid_index

    with torch.no_grad(), tocom_hub.track_grid(model):
        tokens = model.forward_features(X)
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["other"] is None  # the other thread's forward did not track
    grid = tocom_hub.unmerge_to_grid(model, tokens, output_fmt="NCHW")
    assert grid.shape == (2, 64, 8, 8)


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_eva_regular_mode_forward_intermediates_are_full_grids(method):
    """Regular (shrinking) mode: Eva's intermediates come back on the grid, equal to the classic ViT's with
    the same weights (whose grids tests/test_grid.py checks against the source trace)."""
    vit, eva = _vit_and_eva(global_pool="token")
    for m in (vit, eva):
        tocom_hub.patch(m, method=method)
        tocom_hub.set_r(m, 8)
    with torch.no_grad():
        (fa, ga), (fb, gb) = vit.forward_intermediates(X), eva.forward_intermediates(X)
        assert fb.shape == (2, 65 - 2 * 8, 64) and (fa - fb).abs().max() <= 1e-5
        for a, b in zip(ga, gb):
            assert b.shape == (2, 64, 8, 8) and (a - b).abs().max() <= 1e-5
    rope = make_eva("rope_cat_cls")
    tocom_hub.patch(rope, method=method)
    tocom_hub.set_r(rope, 8)
    with torch.no_grad():
        assert [t.shape for t in rope.forward_intermediates(X, intermediates_only=True)] == [(2, 64, 8, 8)] * 2


def _intermediate_kwargs(model):
    if type(model).__name__.endswith("Cait"):  # timm's Cait returns no prefix tokens
        return dict(output_fmt="NLC", indices=[0, 1], norm=True)
    return dict(output_fmt="NLC", indices=[0, 1], norm=True, return_prefix_tokens=bool(model.num_prefix_tokens))


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("variant", sorted(REL_VARIANTS))
def test_relative_position_and_cait_dense_r0_bit_exact_and_full_grids(variant, method):
    """BEiT, the relative-position ViTs and CaiT in dense mode: timm's outputs at r = 0, full grids at r > 0."""
    model = make_rel(variant)
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, method=method, dense=True, dense_ratio=4)
    with torch.no_grad():
        assert torch.equal(model(X), plain(X))
        for a, b in zip(model.forward_intermediates(X)[1], plain.forward_intermediates(X)[1]):
            assert torch.equal(a, b)
        tocom_hub.set_r(model, 6)  # k = 24 tokens per block
        assert model.forward_features(X).shape == plain.forward_features(X).shape
        for kw in (dict(), _intermediate_kwargs(model)):
            got, ref = _flatten(model.forward_intermediates(X, **kw)), _flatten(plain.forward_intermediates(X, **kw))
            assert [t.shape for t in got] == [t.shape for t in ref] and all(torch.isfinite(t).all() for t in got)
        assert (model.forward_features(X) - plain.forward_features(X)).abs().max() > 1e-3  # dense merging acted
        assert tocom_hub.get_size(model) is None  # the grid never shrank


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("variant", ["beit_avg", "relpos_cls_token", "cait_token"])
def test_relative_position_and_cait_regular_mode_intermediates_are_full_grids(variant, method):
    """Regular (shrinking) mode: each intermediate comes back on the grid (CaiT's blocks hold no prefix token);
    an intermediate before any reduction equals the plain model's."""
    model = make_rel(variant)
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, method=method)
    tocom_hub.set_r(model, [0, 8])
    with torch.no_grad():
        _, grids = model.forward_intermediates(X)
        _, ref = plain.forward_intermediates(X)
        assert [g.shape for g in grids] == [(2, 64, 8, 8)] * 2
        assert torch.equal(grids[0], ref[0])  # block 0 did not reduce
        assert (grids[1] - ref[1]).abs().max() > 1e-4
        kw = dict(_intermediate_kwargs(model), intermediates_only=True)  # NLC, normed, prefix tokens apart
        got, want = _flatten(model.forward_intermediates(X, **kw)), _flatten(plain.forward_intermediates(X, **kw))
        assert [t.shape for t in got] == [t.shape for t in want] and torch.equal(got[0], want[0])


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("kw", [dict(block_fn=ParallelThingsBlock), dict(attn_layer="diff")], ids=["things", "diff"])
def test_parallel_things_and_diff_attention_dense_full_grids(kw, method):
    model = make_vit("cls_token", depth=2, init_values=0.3, **kw)
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, method=method, dense=True, dense_ratio=4)
    with torch.no_grad():
        assert torch.equal(model(X), plain(X))
        tocom_hub.set_r(model, 6)
        feats, ref = model.forward_features(X), plain.forward_features(X)
        assert feats.shape == ref.shape and (feats - ref).abs().max() > 1e-3
        grids = model.forward_intermediates(X, intermediates_only=True)
        assert [g.shape for g in grids] == [(2, 64, 8, 8)] * 2


def test_dense_refuses_diff_parallel_blocks():
    model = make_vit("cls_token", depth=2, block_fn=DiffParallelScalingBlock, init_values=0.3)
    with pytest.raises(TypeError, match="dense mode cannot run block 0 .*beside the attention"):
        tocom_hub.patch(model, dense=True)
    assert not tocom_hub.is_patched(model)
