"""The naflexvit family (timm ``NaFlexVit``): both input paths (fixed-size images, NaFlex patch dicts with
padding), padding never merged / kept over real tokens nor pooled, each image of a padded batch reduced
exactly as alone, threads, the bank on the fused qkv, dense mode, true refusals."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from bank_helpers import naive_delta, random_groups
from naflex_helpers import NAFLEX_VARIANTS, image_patches, make_naflex, patch_batch

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.core.compensation.marker import MARKER_KEY
from tocom_hub.core.merge import bipartite_soft_matching
from tocom_hub.core.prune import select_attentive
from tocom_hub.core.reducers import EViT, ToMe

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
SHAPES = [(8, 8), (5, 7), (6, 4)]  # 64, 35 and 24 real patches, padded to 64
VARIANTS = sorted(NAFLEX_VARIANTS)
METHODS = ["tome", "evit"]


def _alone(model, shape, seed):
    p, c = image_patches(*shape, seed)
    return model(dict(patches=p[None], patch_coord=c[None], patch_valid=torch.ones(1, len(p), dtype=torch.bool)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_r0_bit_exact_on_both_paths_r_acts_and_unpatch_restores(variant, method):
    model = make_naflex(variant)
    plain = copy.deepcopy(model)
    batch = patch_batch(SHAPES)
    with torch.no_grad():
        ref_img, ref_dict = plain(X), plain(batch)
        tocom_hub.patch(model, method=method)
        assert torch.equal(model(X), ref_img) and torch.equal(model(batch), ref_dict)
        tocom_hub.set_r(model, 8)
        assert (model(X) - ref_img).abs().max() > 1e-6 and (model(batch) - ref_dict).abs().max() > 1e-6
        feats = model.forward_features(**batch)  # what is left of each image comes back with the features
        assert feats["patch_valid"].shape[1] == feats["patches"].shape[1] - model.num_prefix_tokens
        tocom_hub.unpatch(model)
        assert torch.equal(model(X), ref_img) and torch.equal(model(batch), ref_dict)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_image_of_a_padded_batch_is_reduced_exactly_as_alone(variant, method):
    """The strongest check on padding: per-image outputs of a padded batch equal the image run alone with no
    padding (so padding never merged with, was never kept over, and never pooled with real tokens)."""
    model = make_naflex(variant)
    tocom_hub.patch(model, method=method, trace_source=True)
    tocom_hub.set_r(model, 5)
    batch = patch_batch(SHAPES)
    with torch.no_grad():
        out = model(batch)
        ctx, src = model._tocom_state.last(), tocom_hub.get_source(model)  # src: [B, N, N_in]
        sizes = tocom_hub.get_size(model)
        for i, shape in enumerate(SHAPES):
            assert (out[i] - _alone(model, shape, i)[0]).abs().max() <= 1e-5, (variant, method, i)
    prefix = model.num_prefix_tokens
    valid_in = torch.cat([torch.ones(len(SHAPES), prefix, dtype=torch.bool), batch["patch_valid"]], dim=1)
    real = ctx.valid
    assert (src * (real[:, :, None] != valid_in[:, None, :])).sum() == 0  # real holds real patches only
    assert torch.equal(real[:, prefix:].sum(1), batch["patch_valid"].sum(1) - 15)  # 3 blocks × r = 5, real
    assert not (real[:, 1:] & ~real[:, :-1]).any()  # padding sorts behind the real tokens
    if method == "tome":  # sizes over the real tokens sum to each image's valid patches
        assert torch.equal((sizes[..., 0] * real)[:, prefix:].sum(1), batch["patch_valid"].sum(1).float())


@pytest.mark.parametrize("kwargs", [dict(method="tome"), dict(method="evit"), dict(method="evit", fuse_token=True)])
def test_short_images_in_a_batch_are_reduced_as_alone_too(kwargs):
    """Images shorter than r: each still reduces as alone (its r clamped), the batch pads with padding."""
    model = make_naflex("siglip_map_no_prefix")
    tocom_hub.patch(model, trace_source=True, **kwargs)
    tocom_hub.set_r(model, 5)
    shapes = [(8, 8), (2, 3), (1, 1), (3, 3), (5, 7)]  # (3, 3): 5 A tokens, merges 4 alone
    batch = patch_batch(shapes)
    with torch.no_grad():
        out = model(batch)
        ctx, src = model._tocom_state.last(), tocom_hub.get_source(model)
        for i, shape in enumerate(shapes):
            assert (out[i] - _alone(model, shape, i)[0]).abs().max() <= 1e-5, i
    assert out.shape[0] == 5 and ctx.valid.shape[1] == 64 - 15
    assert (src * (ctx.valid[:, :, None] != batch["patch_valid"][:, None, :])).sum() == 0


class _BlindToMe(ToMe):  # deliberately wrong: matches across padding
    def plan(self, info, r, num_prefix, valid=None):
        return bipartite_soft_matching(info, r, num_prefix)


class _BlindEViT(EViT):  # deliberately wrong: ranks padding like real tokens
    def plan(self, info, r, num_prefix, valid=None):
        return select_attentive(info, r, num_prefix)


@pytest.mark.parametrize("reducer", [_BlindToMe(), _BlindEViT()], ids=["tome", "evit"])
def test_a_padding_blind_reducer_fails_the_alone_check(reducer):
    model = make_naflex("map_cls")
    tocom_hub.patch(model, method="tome" if isinstance(reducer, ToMe) else "evit", reducer=reducer)
    tocom_hub.set_r(model, 5)
    with torch.no_grad():
        out = model(patch_batch(SHAPES))
        assert (out[2] - _alone(model, SHAPES[2], 2)[0]).abs().max() > 1e-3


def test_reduction_in_the_last_block_leaves_class_token_logits():
    model = make_naflex("radio_token_8_prefix")
    ref = copy.deepcopy(model)(X)
    tocom_hub.patch(model, method="tome")
    tocom_hub.set_r(model, [0, 0, 9])
    with torch.no_grad():
        assert (model(X) - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_forward_intermediates_on_the_full_grid_for_both_paths(method):
    model = make_naflex("rope_axial")
    plain = copy.deepcopy(model)
    tocom_hub.patch(model, method=method)
    batch = patch_batch(SHAPES)
    with torch.no_grad():
        tocom_hub.set_r(model, [0, 0, 6])  # reduced after the last intermediate taken: they equal timm's
        for x, fmt in ((X, "NCHW"), (batch, "NLC")):
            ref = plain.forward_intermediates(x, indices=[0, 1], output_fmt=fmt, intermediates_only=True)
            got = model.forward_intermediates(x, indices=[0, 1], output_fmt=fmt, intermediates_only=True)
            assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
        tocom_hub.set_r(model, 6)
        inter = model.forward_intermediates(X, indices=2, intermediates_only=True)
        assert [t.shape for t in inter] == [(2, 64, 8, 8)] * 2
        out = model.forward_intermediates(batch, indices=2, output_fmt="NLC", output_dict=True)
        assert [t.shape for t in out["image_intermediates"]] == [(3, 64, 64)] * 2
        assert torch.equal(out["patch_valid"], batch["patch_valid"])
        with pytest.raises(ValueError, match="not supported for NaFlex"):
            model.forward_intermediates(batch, indices=2)


@pytest.mark.parametrize("method", METHODS)
def test_two_threads_get_the_serial_outputs(method):
    model = make_naflex("rope_axial")
    tocom_hub.patch(model, method=method)
    tocom_hub.set_r(model, 6)
    batches = [[patch_batch(SHAPES, seeds=[k, k + 1, k + 2]) for k in range(4)], [X[:1], X, X[1:], X]]
    with torch.no_grad():
        serial = [[model(b) for b in bs] for bs in batches]
    results, errors, start = [[], []], [], threading.Barrier(2)

    def run(k):
        try:
            start.wait()
            with torch.no_grad():
                results[k].extend(model(b) for b in batches[k])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(a, b) for k in range(2) for a, b in zip(results[k], serial[k], strict=True))


@pytest.mark.parametrize("variant", ["gap_registers", "rope_dinov3_separate_qkv"])
def test_bank_applies_on_q_and_v_only_by_the_delta_and_removes_bit_exact(variant):
    """timm ``Attention``'s fused qkv (q and v rows) and ``EvaBlock``'s separate ``q_proj`` / ``v_proj``."""
    model = make_naflex(variant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = ToComBank.for_model(model, r_max=4, rank=2, targets=("q", "v"))
    groups = random_groups(bank, seed=2)
    tocom_hub.apply(model, 1, 3, bank=bank)
    after = model.state_dict()
    del after[MARKER_KEY]
    d, changed = 64, 0
    for k, v in after.items():
        b = int(k.split(".")[1]) if k.startswith("blocks.") else None
        if k.endswith("attn.qkv.weight"):
            for i, t in ((0, "q"), (2, "v")):
                want = before[k][i * d : (i + 1) * d].double() + naive_delta(groups, t, b, 1, 3, bank.scale)
                assert (v[i * d : (i + 1) * d].double() - want).abs().max() <= 1e-5
            assert torch.equal(v[d : 2 * d], before[k][d : 2 * d])
            changed += 2
        elif k.endswith(("attn.q_proj.weight", "attn.v_proj.weight")):
            want = before[k].double() + naive_delta(groups, k.split(".")[-2][0], b, 1, 3, bank.scale)
            assert (v.double() - want).abs().max() <= 1e-5
            changed += 1
        else:
            assert torch.equal(v, before[k]), k
    assert changed == 2 * len(model.blocks)
    tocom_hub.remove(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", METHODS)
def test_dense_mode_on_both_paths_and_each_padded_image_as_alone(method):
    model = make_naflex("rope_axial")
    plain = copy.deepcopy(model)
    batch = patch_batch(SHAPES)
    tocom_hub.patch(model, method=method, dense=True, dense_ratio=2)
    with torch.no_grad():
        assert torch.equal(model(X), plain(X)) and torch.equal(model(batch), plain(batch))
        tocom_hub.set_r(model, 4)
        out = model(X)
        assert out.shape == plain(X).shape and (out - plain(X)).abs().max() > 1e-4
        out = model(batch)
        assert model.forward_features(**batch)["patches"].shape[1] == 64 + model.num_prefix_tokens  # grid full
        for i, shape in enumerate(SHAPES):
            assert (out[i] - _alone(model, shape, i)[0]).abs().max() <= 1e-5, i


def test_true_refusals():
    model = make_naflex("rope_axial")
    with pytest.raises(TypeError, match="positions='centroid' is not supported for NaFlexViT rope"):
        tocom_hub.patch(model, positions="centroid")
    assert not tocom_hub.is_patched(model)
    tocom_hub.patch(model, method="tome")
    tocom_hub.set_r(model, 4)
    batch = patch_batch(SHAPES)
    n = batch["patches"].shape[1] + model.num_prefix_tokens
    batch["attn_mask"] = torch.zeros(len(SHAPES), 1, n, n)  # a caller's own mask cannot follow the tokens
    with torch.no_grad(), pytest.raises(ValueError, match="cannot be combined with attn_mask"):
        model(batch)


@pytest.mark.parametrize("variant", ["gap_registers", "rope_dinov3_separate_qkv"])
def test_bank_unmerged_equals_merged_on_both_paths(variant):
    model = make_naflex(variant)
    plain = copy.deepcopy(model)
    bank = ToComBank.for_model(model, r_max=4, rank=2)
    random_groups(bank, seed=3, std=1.0)
    merged = copy.deepcopy(model)
    tocom_hub.apply(merged, 0, 2, bank=bank)
    tocom_hub.apply(model, 0, 2, bank=bank, merge=False)
    batch = patch_batch(SHAPES)
    with torch.no_grad():
        assert (merged(X) - plain(X)).abs().max() > 1e-5  # the bank acts
        assert (model(X) - merged(X)).abs().max() <= 1e-5 and (model(batch) - merged(batch)).abs().max() <= 1e-5
        tocom_hub.remove(model)
        assert torch.equal(model(X), plain(X)) and torch.equal(model(batch), plain(batch))
