"""Proportional attention (tocom_hub/core/attention.py): the folded and the masked SDPA paths against an
explicit softmax, and a whole patched model with the fold forced on against the naive reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import reference_forward
from tiny_models import make_vit

import tocom_hub
from tocom_hub.core import attention as attention_mod

X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _explicit_attention(q, k, v, bias, scale):
    return ((q @ k.transpose(-1, -2)) * scale + bias).softmax(dim=-1) @ v


@pytest.mark.parametrize("dim", [64, 60, 32, 8, 7])
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("scale_factor", [1.0, 0.3])  # timm's head_dim ** -0.5, and any other scale
def test_sdpa_key_bias_equals_explicit_softmax(dim, fold, scale_factor):
    g = torch.Generator().manual_seed(dim)
    q, k, v = (torch.randn(2, 3, 17, dim, generator=g) for _ in range(3))
    bias = torch.rand(2, 1, 1, 17, generator=g).mul(40).add(1).log()  # log of token sizes 1..41
    scale = dim**-0.5 * scale_factor
    out = attention_mod.sdpa_key_bias(q, k, v, bias, scale, fold=fold)
    assert out.shape == v.shape
    assert (out - _explicit_attention(q, k, v, bias, scale)).abs().max() <= 1e-5


def test_sdpa_key_bias_fold_gradients_match_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.rand(2, 1, 1, 9, generator=g).add(1).log()
    grads = []
    for fold in (True, False):
        out = attention_mod.sdpa_key_bias(q, k, v, bias, 16**-0.5, fold=fold)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["cls_token", "gap", "registers", "map_head"])
def test_folded_proportional_attention_matches_reference(variant, monkeypatch):
    # "auto" picks the folded path on GPUs; patch(attention="fold") forces it on the CPU
    model = make_vit(variant)
    patched = tocom_hub.patch(copy.deepcopy(model), attention="fold")
    tocom_hub.set_r(patched, 7)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        out = patched(X)
        ref, _, _ = reference_forward(model, X, 7, "tome")
    assert (out - ref).abs().max() <= 1e-4
    depth = len(model.blocks)  # (an attention-pool head makes one more call, timm's own, with its mask)
    assert len(calls) >= depth and all(mask is None for mask in calls[:depth])  # no block passed a mask
