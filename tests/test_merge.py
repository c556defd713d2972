"""The merge step (tocom_hub/core/merge.py): the fast paths against closed forms and naive groups."""

import pytest
import torch
from tiny_models import make_vit

import tocom_hub
from tocom_hub.core import merge as merge_mod

attention_mod = __import__("tocom_hub.core.attention", fromlist=["attend"])
X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


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


@pytest.mark.parametrize("num_prefix", [0, 1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_merge_equals_each_sample_merged_alone(num_prefix, dtype):
    """The batched path (one gather of the output rows, B tokens weighted in place) and the batch-1 path
    (slices, one A-row selection, a concatenation) are different code: sample by sample they must agree,
    bit for bit in float32 (features, sizes, sources, gradients); in bfloat16 the CPU's index_add_ rounds
    a B token that receives several merged rows differently along dim 0 and dim 1, by one unit at most."""
    g = torch.Generator().manual_seed(num_prefix)
    batch, n, r = 4, 23, 7
    metric = torch.randn(batch, n, 8, generator=g)
    x = torch.randn(batch, n, 6, generator=g).to(dtype).requires_grad_()
    size = torch.randint(1, 9, (batch, n, 1), generator=g).float()
    plan = merge_mod.bipartite_soft_matching(metric, r, num_prefix)
    out, new_size = merge_mod.merge_wavg(plan, x, size)
    source = merge_mod.merge_source(plan)
    (grad,) = torch.autograd.grad(out.float().square().sum(), x)
    for b in range(batch):
        one = merge_mod.bipartite_soft_matching(metric[b : b + 1], r, num_prefix)
        xb = x[b : b + 1].detach().requires_grad_()
        out_b, size_b = merge_mod.merge_wavg(one, xb, size[b : b + 1])
        (grad_b,) = torch.autograd.grad(out_b.float().square().sum(), xb)
        assert torch.equal(new_size[b], size_b[0]) and torch.equal(source[b], merge_mod.merge_source(one)[0])
        if dtype == torch.float32:
            assert torch.equal(out[b], out_b[0]) and torch.equal(grad[b], grad_b[0])
        else:  # one bfloat16 unit (8 bits of mantissa)
            torch.testing.assert_close(out[b], out_b[0], rtol=2**-7, atol=2**-9)
            torch.testing.assert_close(grad[b], grad_b[0], rtol=2**-6, atol=2**-9)
