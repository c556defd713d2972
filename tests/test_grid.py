"""Regular-mode tokens back on the patch grid (core/grid.py): forward_intermediates of a merged / pruned
model and tocom_hub.unmerge_to_grid, against the source trace of the same forward."""

import copy

import pytest
import torch
from tiny_models import make_vit

import tocom_hub

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def _expected_grid(tokens, source, num_prefix):
    """Spatial patch p gets the token whose source row holds it (zero when no row does: pruned)."""
    b, _, c = tokens.shape
    n_in = source.shape[-1]
    out = torch.zeros(b, n_in - num_prefix, c)
    for i in range(b):
        for p in range(num_prefix, n_in):
            rows = source[i, :, p].nonzero().flatten().tolist()
            assert len(rows) <= 1
            if rows:
                out[i, p - num_prefix] = tokens[i, rows[0]]
    return out


def _per_block(model, x):
    """Block outputs and the source trace after every block (trace_source=True), by hooks."""
    st = model._tocom_state
    got = []
    hooks = [b.register_forward_hook(lambda m, i, o: got.append((o, st.context().source))) for b in model.blocks]
    model.forward_features(x)
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize(
    "variant,kwargs",
    [
        ("cls_token", dict(method="tome")),
        ("registers", dict(method="tome", prop_attn=False)),
        ("gap", dict(method="evit")),
        ("cls_token", dict(method="evit", fuse_token=True)),
    ],
)
def test_forward_intermediates_of_a_merged_model_are_full_grids(variant, kwargs):
    model = make_vit(variant)
    tocom_hub.patch(model, trace_source=True, **kwargs)
    tocom_hub.set_r(model, [7, 0, 9])
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        blocks = _per_block(model, X)
        want = [
            _expected_grid(o, s, prefix) if s is not None else o[:, prefix:] for o, s in blocks
        ]  # block 0 merges; block 1 (r = 0) keeps block 0's map
        final, inter = model.forward_intermediates(X, output_fmt="NLC")
        assert torch.equal(final, model.forward_features(X))  # the final features stay merged
        for a, b in zip(inter, want):
            assert a.shape == (2, 64, 64) and torch.equal(a, b)
        nchw = model.forward_intermediates(X, indices=[1], intermediates_only=True)
        assert torch.equal(nchw[0], want[1].reshape(2, 8, 8, 64).permute(0, 3, 1, 2))
        d = model.forward_intermediates(X, output_dict=True, return_prefix_tokens=True, norm=True, indices=1)
        assert d["image_intermediates"][0].shape == (2, 64, 8, 8)
        assert ("image_intermediates_prefix" in d) == bool(prefix) and "image_features" in d
        pairs = model.forward_intermediates(X, return_prefix_tokens=True, intermediates_only=True, indices=2)
        if prefix:
            assert pairs[0][1].shape == (2, prefix, 64)
    assert not model._tocom_state.set_tracking(False)  # forward_intermediates left this thread's flag off


def test_unmerge_to_grid_needs_a_tracked_forward():
    model = make_vit("registers")
    plain = copy.deepcopy(model)
    tocom_hub.patch(model)
    tocom_hub.set_r(model, 8)
    tokens = model.forward_features(X)
    with pytest.raises(ValueError, match="track_grid"):
        tocom_hub.unmerge_to_grid(model, tokens)
    with tocom_hub.track_grid(model):
        tokens = model.forward_features(X)
    ref = copy.deepcopy(model)
    tocom_hub.patch(ref, trace_source=True)
    src_tokens = ref.forward_features(X)
    want = _expected_grid(src_tokens, tocom_hub.get_source(ref), model.num_prefix_tokens)
    assert torch.equal(tocom_hub.unmerge_to_grid(model, tokens), want)
    assert tocom_hub.unmerge_to_grid(model, tokens, "NCHW").shape == (2, 64, 8, 8)
    with pytest.raises(ValueError, match="output_fmt"):
        tocom_hub.unmerge_to_grid(model, tokens, "NHWC")
    tocom_hub.set_r(model, 0)  # nothing reduced: the plain spatial tokens
    assert torch.equal(tocom_hub.unmerge_to_grid(model, model.forward_features(X)), plain.forward_features(X)[:, 5:])
