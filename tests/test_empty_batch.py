"""A batch of 0 images runs like plain timm at every r: an empty result of the right shape, no reshape errors
(merge / prune / attention use explicit sizes, never a ``-1`` that an empty tensor cannot infer)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_vit

import tocom_hub
from tocom_hub.core.merge import bipartite_soft_matching, merge_source, merge_wavg
from tocom_hub.core.prune import prune_source, prune_tokens, select_attentive

EMPTY = torch.zeros(0, 3, 64, 64)
ONE = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

CASES = [
    ("cls_token", dict(method="tome")),
    ("cls_token", dict(method="tome", trace_source=True)),
    ("cls_token", dict(method="tome", prop_attn=False)),
    ("registers", dict(method="tome", trace_source=True)),
    ("map_head", dict(method="tome")),
    ("cls_token", dict(method="evit", trace_source=True)),
    ("gap", dict(method="evit", fuse_token=True, trace_source=True)),
]


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("variant, kwargs", CASES)
def test_empty_batch_gives_an_empty_result_like_timm(variant, kwargs, fold):
    plain = make_vit(variant, depth=2)
    with torch.no_grad():
        want = plain(EMPTY)
        want_features = plain.forward_features(EMPTY)
    model = tocom_hub.patch(make_vit(variant, depth=2), attention="fold" if fold else "mask", **kwargs)
    for r in (0, 4, 16):
        tocom_hub.set_r(model, r)
        with torch.no_grad():
            single = model.forward_features(ONE)
            out = model(EMPTY)
            features = model.forward_features(EMPTY)
        assert out.shape == want.shape == (0, 10) and out.dtype == want.dtype
        assert features.shape[0] == 0 and features.shape[1:] == single.shape[1:]  # the tokens of batch 1
        if r:
            assert features.shape[1] < want_features.shape[1]  # the same reduction as any batch
        if kwargs.get("trace_source") and r:
            source = tocom_hub.get_source(model)
            assert source.shape[0] == 0 and source.shape[1] == features.shape[1]


def test_pure_functions_on_an_empty_batch():
    x, metric = torch.zeros(0, 17, 8), torch.zeros(0, 17, 4)
    plan = bipartite_soft_matching(metric, 3, num_prefix=1)
    merged, size = merge_wavg(plan, x)
    assert merged.shape == (0, 14, 8) and size.shape == (0, 14, 1)
    assert merge_source(plan).shape == (0, 14, 17)
    for fuse in (False, True):
        p = select_attentive(torch.zeros(0, 17), 5, num_prefix=1, fuse=fuse)
        assert prune_tokens(p, x).shape == (0, 12, 8) and prune_source(p).shape == (0, 12, 17)
