"""The pure EViT functions of tocom_hub/core/prune.py against naive per-sample loops (no timm)."""

from __future__ import annotations

import pytest
import torch

from tocom_hub.core.prune import cls_attention, max_prune, prune_source, prune_tokens, select_attentive


def _attn_map(q, k, scale):
    """The full attention map ``[B, H, N, N]``, softmax written out."""
    logits = torch.einsum("bhnd,bhmd->bhnm", q.double(), k.double()) * scale
    e = (logits - logits.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def test_max_prune_keeps_one_free_token():
    assert [max_prune(n, p) for n, p in ((10, 1), (10, 0), (2, 1), (1, 1), (5, 5))] == [8, 9, 0, 0, 0]


@pytest.mark.parametrize("has_class_token", [True, False])
def test_cls_attention_is_the_class_row_of_the_attention_map(has_class_token):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g)
    got = cls_attention(q, k, 8**-0.5, has_class_token)
    if has_class_token:
        ref = _attn_map(q, k, 8**-0.5)[:, :, 0].mean(1)
    else:  # the mean query's row
        ref = _attn_map(q.mean(2, keepdim=True), k, 8**-0.5)[:, :, 0].mean(1)
    assert got.shape == (2, 9) and torch.allclose(got.double(), ref, atol=1e-6)


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize("fuse", [False, True])
def test_select_attentive_keeps_the_most_attended_tokens(num_prefix, fuse):
    g = torch.Generator().manual_seed(1)
    att = torch.rand(3, 12, generator=g)
    r = 4
    plan = select_attentive(att, r, num_prefix, fuse=fuse)
    num_keep = 12 - num_prefix - r - (1 if fuse else 0)
    for b in range(3):
        order = sorted(range(num_prefix, 12), key=lambda i: -att[b, i].item())
        assert plan.keep[b].tolist() == list(range(num_prefix)) + order[:num_keep]
        if fuse:
            dropped = set(order[num_keep:])
            assert plan.dropped[b].tolist() == [i in dropped for i in range(12)]
            assert torch.equal(plan.fuse_weight[b], att[b] * plan.dropped[b])
        else:
            assert plan.dropped is None and plan.fuse_weight is None


def test_select_attentive_clamps_r_and_returns_none_for_nothing():
    att = torch.rand(1, 5)
    assert select_attentive(att, 0, 1) is None
    assert select_attentive(torch.rand(1, 2), 3, 1) is None  # only one free token: nothing can go
    plan = select_attentive(att, 100, 1)  # clamped to max_prune(5, 1) = 3
    assert plan.keep.shape == (1, 2) and plan.keep[0, 0] == 0


@pytest.mark.parametrize("fuse", [False, True])
def test_prune_tokens_and_source_match_a_loop(fuse):
    g = torch.Generator().manual_seed(2)
    x, att = torch.randn(2, 10, 6, generator=g), torch.rand(2, 10, generator=g)
    plan = select_attentive(att, 3, 1, fuse=fuse)
    out, src = prune_tokens(plan, x), prune_source(plan)
    assert out.shape[1] == src.shape[1] == 10 - 3
    for b in range(2):
        keep = plan.keep[b].tolist()
        rows, srows = [x[b, i] for i in keep], [torch.eye(10)[i] for i in keep]
        if fuse:
            dropped = [i for i in range(10) if plan.dropped[b, i]]
            w = att[b, dropped] / att[b, dropped].sum()
            rows.append(sum(wi * x[b, i] for wi, i in zip(w, dropped)))
            srows.append(torch.eye(10)[dropped].amax(0))  # the fused token stands for all dropped patches
        assert torch.allclose(out[b], torch.stack(rows), atol=1e-6)
        assert torch.equal(src[b], torch.stack(srows))
    # a second step composes with the first: sources stay a partition of kept and fused patches
    plan2 = select_attentive(prune_tokens(plan, att[..., None])[..., 0], 2, 1, fuse=fuse)
    src2 = prune_source(plan2, src)
    assert src2.shape == (2, 5, 10) and set(src2.unique().tolist()) <= {0.0, 1.0}
