"""Merge step and proportional attention: the fast paths against closed forms and the naive reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import reference_forward
from tiny_models import make_vit

import tocom_hub
from tocom_hub.core import merge as merge_mod

patch_mod = __import__("tocom_hub.patch", fromlist=["patch"])
attention_mod = __import__("tocom_hub.core.attention", fromlist=["attend"])
X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _explicit_attention(q, k, v, bias, scale):
    return ((q @ k.transpose(-1, -2)) * scale + bias).softmax(dim=-1) @ v


@pytest.mark.parametrize("dim", [64, 60, 32, 8, 7])
@pytest.mark.parametrize("fold", [True, False])
def test_sdpa_key_bias_equals_explicit_softmax(dim, fold):
    g = torch.Generator().manual_seed(dim)
    q, k, v = (torch.randn(2, 3, 17, dim, generator=g) for _ in range(3))
    bias = torch.rand(2, 1, 1, 17, generator=g).mul(40).add(1).log()  # log of token sizes 1..41
    scale = dim**-0.5
    out = patch_mod.sdpa_key_bias(q, k, v, bias, scale, fold=fold)
    assert out.shape == v.shape
    assert (out - _explicit_attention(q, k, v, bias, scale)).abs().max() <= 1e-5


def test_sdpa_key_bias_fold_gradients_match_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.rand(2, 1, 1, 9, generator=g).add(1).log()
    grads = []
    for fold in (True, False):
        out = patch_mod.sdpa_key_bias(q, k, v, bias, 16**-0.5, fold=fold)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["cls_token", "gap", "registers", "map_head"])
def test_folded_proportional_attention_matches_reference(variant, monkeypatch):
    # the device-type switch picks the folded path on GPUs; force it on the CPU
    monkeypatch.setattr(attention_mod, "FOLD_BIAS_DEVICES", ("cpu",))
    model = make_vit(variant)
    patched = tocom_hub.patch(copy.deepcopy(model))
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


def _naive_wavg(x, size, groups):
    rows = [(x[g] * size[g, None]).sum(0) / size[g].sum() for g in groups]
    return torch.stack(rows), torch.stack([size[g].sum() for g in groups])


def _groups(plan, b, num_tokens):
    """Output tokens as lists of input positions, read off the plan (independently of the merge code)."""
    prefix, fa, fb = plan.num_prefix, plan.first_a, plan.first_b
    a_pos, b_pos = list(range(fa, num_tokens, 2)), list(range(fb, num_tokens, 2))
    groups = [[p] for p in range(prefix)]
    groups += [[a_pos[i]] for i in plan.a_idx[b, plan.r :].tolist()]
    out_b = [[p] for p in b_pos]
    for i, j in zip(plan.a_idx[b, : plan.r].tolist(), plan.dst_idx[b].tolist()):
        out_b[j].append(a_pos[i])
    return groups + out_b


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("batch", [1, 3])
def test_merge_wavg_and_source_match_naive_groups(num_prefix, batch):
    g = torch.Generator().manual_seed(num_prefix)
    n, r = 21, 6
    metric = torch.randn(batch, n, 8, generator=g)
    x = torch.randn(batch, n, 5, generator=g)
    size = torch.randint(1, 9, (batch, n, 1), generator=g).float()
    plan = merge_mod.bipartite_soft_matching(metric, r, num_prefix)
    out, new_size = merge_mod.merge_wavg(plan, x, size)
    source = merge_mod.merge_source(plan)
    assert out.shape == (batch, n - r, 5) and new_size.dtype == torch.float32
    for b in range(batch):
        groups = _groups(plan, b, n)
        assert sorted(i for g in groups for i in g) == list(range(n))
        ref_x, ref_size = _naive_wavg(x[b], size[b, :, 0], groups)
        assert (out[b] - ref_x).abs().max() <= 1e-5
        assert torch.equal(new_size[b, :, 0], ref_size)
        for row, members in enumerate(groups):
            assert source[b, row].nonzero().flatten().tolist() == sorted(members)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_wavg_low_precision_stays_finite_and_close(dtype):
    # values near the fp16 limit times sizes up to 200 would overflow a sum-then-divide in fp16
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 41, 8, generator=g)
    x = (torch.randn(2, 41, 16, generator=g) * 3e4).clamp(-6e4, 6e4)
    size = torch.randint(1, 200, (2, 41, 1), generator=g).float()
    plan = merge_mod.bipartite_soft_matching(metric, 12, 1)
    ref, ref_size = merge_mod.merge_wavg(plan, x, size)
    out, out_size = merge_mod.merge_wavg(plan, x.to(dtype), size)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out_size, ref_size)
    # a few units of rounding of the inputs' scale
    assert (out.float() - ref).abs().max() <= 4 * torch.finfo(dtype).eps * x.abs().max()


def test_low_precision_model_runs_with_float32_sizes():
    model = make_vit("gap").to(torch.bfloat16)
    patched = tocom_hub.patch(model)
    tocom_hub.set_r(patched, 8)
    with torch.no_grad():
        out = patched(X.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert tocom_hub.get_size(patched).dtype == torch.float32
