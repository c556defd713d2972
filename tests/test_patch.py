"""The patcher against plain timm (r=0) and against the naive loop reference (r>0)."""

import copy
import pickle

import pytest
import torch
from reference import reference_forward
from timm.models.vision_transformer import Block, VisionTransformer
from tiny_models import SUPPORTED, make_timm, make_vit, num_tokens

import tocom_hub

X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _state_dict_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("variant", sorted(SUPPORTED))
@pytest.mark.parametrize("method", ["tome", "evit"])
def test_r0_equals_plain_timm_eval(variant, fused, method):
    plain = make_vit(variant, fused=fused)
    patched = tocom_hub.patch(copy.deepcopy(plain), method=method)
    tocom_hub.set_r(patched, 0)
    with torch.no_grad():
        assert (patched(X) - plain(X)).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["cls_token", "registers", "gap", "layer_scale"])
def test_r0_equals_plain_timm_train_mode(variant):
    plain = make_vit(variant, drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1).train()
    patched = tocom_hub.patch(copy.deepcopy(plain))
    torch.manual_seed(123)
    ref = plain(X)
    torch.manual_seed(123)
    out = patched(X)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "name",
    [
        "deit_tiny_patch16_224",
        "deit_tiny_distilled_patch16_224",
        "deit3_small_patch16_224",
        "vit_small_patch14_reg4_dinov2",
    ],
)
def test_r0_equals_plain_registered_models(name):
    plain = make_timm(name)
    patched = tocom_hub.patch(copy.deepcopy(plain))
    with torch.no_grad():
        assert (patched(X) - plain(X)).abs().max() <= 1e-5


def _expected_counts(n, prefix, r, depth, method):
    counts = []
    for _ in range(depth):
        limit = (n - prefix) // 2 if method == "tome" else n - prefix - 1
        n -= min(r, limit)
        counts.append(n)
    return counts


def _block_counts(model, x):
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in model.blocks]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


@pytest.mark.parametrize("variant", sorted(SUPPORTED))
@pytest.mark.parametrize("r", [1, 5, 16, 32])
def test_tome_matches_reference_and_counts(variant, r):
    model = make_vit(variant)
    patched = tocom_hub.patch(copy.deepcopy(model), trace_source=True)
    tocom_hub.set_r(patched, r)
    out, counts = _block_counts(patched, X)
    n, prefix = num_tokens(model), model.num_prefix_tokens
    assert counts == _expected_counts(n, prefix, r, len(model.blocks), "tome")
    with torch.no_grad():
        ref, ref_sources, ref_counts = reference_forward(model, X, r, "tome")
    assert ref_counts[0] == counts
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-4
    source = tocom_hub.get_source(patched)
    for b in range(X.shape[0]):
        assert torch.equal(source[b], ref_sources[b])
    # prefix tokens: never merged, still first, in order
    assert torch.equal(source[:, :prefix], torch.eye(n)[:prefix].expand(X.shape[0], -1, -1))
    assert source[:, prefix:, :prefix].sum() == 0
    # every input token lands in exactly one output token
    assert torch.equal(source.sum(1), torch.ones(X.shape[0], n))


@pytest.mark.parametrize("variant", ["cls_token", "registers", "gap", "qk_norm", "layer_scale"])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("r", [3, 20])
def test_evit_matches_reference_and_counts(variant, fuse, r):
    model = make_vit(variant)
    patched = tocom_hub.patch(copy.deepcopy(model), method="evit", fuse_token=fuse, trace_source=True)
    tocom_hub.set_r(patched, r)
    out, counts = _block_counts(patched, X)
    n, prefix = num_tokens(model), model.num_prefix_tokens
    assert counts == _expected_counts(n, prefix, r, len(model.blocks), "evit")
    with torch.no_grad():
        ref, ref_sources, ref_counts = reference_forward(model, X, r, "evit", fuse=fuse)
    assert ref_counts[0] == counts
    assert (out - ref).abs().max() <= 1e-4
    source = tocom_hub.get_source(patched)
    assert torch.equal(source[:, :prefix], torch.eye(n)[:prefix].expand(X.shape[0], -1, -1))
    for b in range(X.shape[0]):
        # same token set (kept order may differ on exact attentiveness ties only)
        assert sorted(map(tuple, source[b].tolist())) == sorted(map(tuple, ref_sources[b].tolist()))


@pytest.mark.parametrize("variant", ["cls_token", "gap", "registers"])
@pytest.mark.parametrize("r", [5, 16])
def test_tome_batch_of_one_matches_batched_run_and_reference(variant, r):
    # batch size 1 takes its own (cheaper) path through the matching
    model = make_vit(variant)
    patched = tocom_hub.patch(copy.deepcopy(model), trace_source=True)
    tocom_hub.set_r(patched, r)
    with torch.no_grad():
        batched = patched(X)
        batched_source = tocom_hub.get_source(patched)
        for b in range(X.shape[0]):
            single = patched(X[b : b + 1])
            assert (single - batched[b : b + 1]).abs().max() <= 1e-5
            assert torch.equal(tocom_hub.get_source(patched)[0], batched_source[b])
        ref, ref_sources, _ = reference_forward(model, X[:1], r, "tome")
        assert (patched(X[:1]) - ref).abs().max() <= 1e-4
        assert torch.equal(tocom_hub.get_source(patched)[0], ref_sources[0])


def test_proportional_attention_off_matches_reference():
    model = make_vit("cls_token")
    patched = tocom_hub.patch(copy.deepcopy(model), prop_attn=False)
    tocom_hub.set_r(patched, 8)
    with torch.no_grad():
        ref, _, _ = reference_forward(model, X, 8, "tome", prop_attn=False)
        assert (patched(X) - ref).abs().max() <= 1e-4


def test_distilled_model_keeps_both_prefix_tokens():
    model = make_timm("deit_tiny_distilled_patch16_224", patch_size=8)
    patched = tocom_hub.patch(copy.deepcopy(model), trace_source=True)
    tocom_hub.set_r(patched, 10)
    with torch.no_grad():
        out = patched(X)
        ref, ref_sources, _ = reference_forward(model, X, 10, "tome")
    assert (out - ref).abs().max() <= 1e-4
    src = tocom_hub.get_source(patched)
    assert src[:, 0, 0].all() and src[:, 1, 1].all()
    assert src[:, 2:, :2].sum() == 0


@pytest.mark.parametrize("fused", [True, False])
def test_dynamic_img_size_other_resolution(fused):
    model = make_vit("dynamic_img_size", fused=fused)
    patched = tocom_hub.patch(copy.deepcopy(model))
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        assert (patched(x) - model(x)).abs().max() <= 1e-5
        tocom_hub.set_r(patched, 6)
        out, counts = _block_counts(patched, x)
        ref, _, ref_counts = reference_forward(model, x, 6, "tome")
    assert counts == ref_counts[0] == _expected_counts(60 + 1, 1, 6, 3, "tome")
    assert (out - ref).abs().max() <= 1e-4


def test_per_block_r_list():
    model = make_vit("cls_token")
    patched = tocom_hub.patch(copy.deepcopy(model))
    tocom_hub.set_r(patched, [10, 0, 4])
    assert tocom_hub.get_r(patched) == [10, 0, 4]
    _, counts = _block_counts(patched, X)
    assert counts == [55, 55, 51]


def test_training_mode_gradients_flow():
    model = make_vit("layer_scale", drop_path_rate=0.1).train()
    tocom_hub.patch(model)
    tocom_hub.set_r(model, 8)
    model(X).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for n, g in grads.items() if n.startswith("blocks.")), "every block gets gradients"
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)


def test_drop_path_respected_in_train_mode():
    model = make_vit("cls_token", drop_path_rate=0.5).train()
    tocom_hub.patch(model)
    tocom_hub.set_r(model, 8)
    outs = [model(X) for _ in range(2)]
    assert not torch.allclose(outs[0], outs[1])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(X), model(X))


def test_patch_is_idempotent_and_switches_method():
    model = make_vit("cls_token")
    plain = copy.deepcopy(model)
    tocom_hub.patch(model)
    tocom_hub.set_r(model, 4)
    cls = type(model)
    tocom_hub.patch(model)
    assert type(model) is cls and tocom_hub.get_r(model) == 4
    tocom_hub.patch(model, method="evit")
    assert tocom_hub.get_method(model) == "evit" and tocom_hub.get_r(model) == 4
    _, counts = _block_counts(model, X)
    assert counts == [61, 57, 53]
    tocom_hub.unpatch(model)
    assert type(model) is VisionTransformer and all(type(b) is Block for b in model.blocks)
    assert not tocom_hub.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(X), plain(X))
    assert not any(hasattr(b, "_tocom_state") for b in model.blocks)


def test_method_switch_revalidates_r():
    model = tocom_hub.patch(make_vit("cls_token"), method="evit")
    tocom_hub.set_r(model, 50)  # fine for pruning (64 patches), impossible for bipartite merging
    with pytest.raises(ValueError, match="at most 32"):
        tocom_hub.patch(model, method="tome")
    assert tocom_hub.get_method(model) == "evit" and tocom_hub.get_r(model) == 50


@pytest.mark.parametrize("bad_r", [-1, 33, 1000, [1, 2], [1, 2, 3, 4], 2.5, True, "4", [1, -1, 2]])
def test_impossible_r_raises_and_changes_nothing(bad_r):
    model = tocom_hub.patch(make_vit("cls_token"))
    tocom_hub.set_r(model, 3)
    with torch.no_grad():
        before_out = model(X)
    before = _state_dict_copy(model)
    with pytest.raises(ValueError):
        tocom_hub.set_r(model, bad_r)
    assert tocom_hub.get_r(model) == 3
    _assert_same_state(model, before)
    with torch.no_grad():
        assert torch.equal(model(X), before_out)


def test_set_r_on_unpatched_model_raises():
    with pytest.raises(ValueError, match="not patched"):
        tocom_hub.set_r(make_vit("cls_token"), 4)


def _unsupported_models():
    from timm.models.vision_transformer_sam import VisionTransformerSAM
    from timm.models.xcit import Xcit

    small = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return {
        "Xcit": lambda: Xcit(**small),
        "VisionTransformerSAM": lambda: VisionTransformerSAM(window_size=2, **small),  # windowed attention
        "Sequential": lambda: torch.nn.Sequential(torch.nn.Linear(3, 3)),
    }


@pytest.mark.parametrize("kind", sorted(_unsupported_models()))
def test_unsupported_models_raise_clear_type_error(kind):
    model = _unsupported_models()[kind]().eval()
    cls = type(model)
    before = _state_dict_copy(model)
    x = torch.randn(1, 3, 32, 32) if kind != "Sequential" else torch.randn(1, 3)
    with torch.no_grad():
        out = model(x)
    with pytest.raises(TypeError) as err:
        tocom_hub.patch(model)
    msg = str(err.value)
    assert cls.__name__ in msg or kind in msg
    assert type(model) is cls and not tocom_hub.is_patched(model)
    _assert_same_state(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_patched_model_pickles_and_deepcopies():
    model = tocom_hub.patch(make_vit("registers"))
    tocom_hub.set_r(model, 5)
    with torch.no_grad():
        ref = model(X)
        clone = pickle.loads(pickle.dumps(model))
        assert torch.equal(clone(X), ref)
        assert tocom_hub.get_r(clone) == 5
        other = copy.deepcopy(model)
        tocom_hub.set_r(other, 0)
        assert tocom_hub.get_r(model) == 5
        assert torch.equal(model(X), ref)


def test_grad_checkpointing_is_refused_with_r():
    model = tocom_hub.patch(make_vit("cls_token")).train()
    model.set_grad_checkpointing(True)
    tocom_hub.set_r(model, 4)
    with pytest.raises(RuntimeError, match="checkpointing"):
        model(X)
    tocom_hub.set_r(model, 0)
    model(X)  # r=0 is fine


def test_forward_features_then_head_uses_sizes():
    model = make_vit("gap")
    patched = tocom_hub.patch(copy.deepcopy(model))
    tocom_hub.set_r(patched, 12)
    with torch.no_grad():
        full = patched(X)
        feats = patched.forward_features(X)
        split = patched.forward_head(feats)
        size = tocom_hub.get_size(patched)
    assert torch.equal(full, split)
    assert size.sum(1).squeeze(-1).tolist() == [64.0] * X.shape[0]
