"""The classic family's other blocks: ``ParallelThingsBlock``, ``DiffParallelScalingBlock`` and ``Block`` with
``DiffAttention``, against independent references: plain timm, the size identity of proportional attention
(a token of size s weighs like s copies of it, in *both* differential maps), EViT as key masking on the
plain model, and the bank's closed form on the fused q/v rows."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from bank_helpers import naive_delta, random_groups
from timm.layers import Attention, DiffAttention
from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock, ParallelThingsBlock
from tiny_models import make_vit

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.core.bank.config import model_dims
from tocom_hub.core.compensation.marker import MARKER_KEY
from tocom_hub.core.families.diff import diff_attend

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
BLOCKS = {
    "things": dict(block_fn=ParallelThingsBlock),
    "diff_parallel": dict(block_fn=DiffParallelScalingBlock),
    "diff_attention": dict(attn_layer="diff"),
}
BANK = {"parallel_scaling": dict(block_fn=ParallelScalingBlock), "diff_attention": BLOCKS["diff_attention"]}


def make(kind, fused=True, **kw):
    model = make_vit("cls_token", fused=fused, **{"depth": 2, "init_values": 0.3, **BLOCKS[kind], **kw})
    for m in model.modules():  # timm inits λ near its lambda_init: give the second map real weight
        if isinstance(m, (DiffAttention, DiffParallelScalingBlock)):
            m.lambda_init = 0.5
    return model


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_r0_exact_last_block_cls_unchanged_r_runs_sizes_unpatch(kind, method, fused):
    model = make(kind, fused=fused)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        ref = plain(X)
        tocom_hub.patch(model, method=method)
        assert torch.equal(model(X), ref)
        tocom_hub.set_r(model, [0, 9])  # reduced after / inside the last block only: the class token is the same
        assert (model(X) - ref).abs().max() <= 1e-6
        tocom_hub.set_r(model, 9)
        out = model(X)
        assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4
        if method == "tome":
            assert torch.equal(tocom_hub.get_size(model).sum(dim=(1, 2)), torch.full((2,), 65.0))
            assert tocom_hub.get_size(model).shape[1] == 65 - 18
        tocom_hub.unpatch(model)
        assert torch.equal(model(X), ref) and type(model.blocks[0]).__module__.startswith("timm")


def _duplicate(x, sizes):
    """Tokens ``x`` ``[1, N, C]`` with token ``j`` repeated ``sizes[j]`` times (first copy where it was)."""
    return torch.cat([x[:, j : j + 1].expand(-1, int(s), -1) for j, s in enumerate(sizes)], dim=1)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["diff_parallel", "diff_attention", "things"])
def test_size_bias_is_the_attention_over_copies_in_both_maps(kind, fused):
    """softmax with a log-size bias over N tokens = plain softmax over the tokens repeated size times: the
    reduced attention with ``log s`` must equal timm's own block run on the copies (a bias in one map only,
    or none, fails)."""
    model = make(kind, fused=fused)
    tocom_hub.patch(model)
    blk = model.blocks[1]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 9, 64, generator=g)
    sizes = torch.tensor([1, 3, 1, 2, 4, 1, 1, 2, 5])
    ctx = type("Ctx", (), {"attn_bias": sizes.float().log().view(1, 1, 1, -1)})()
    copies = _duplicate(x, sizes)
    with torch.no_grad():
        if kind == "diff_parallel":  # the whole block (its MLP is per token, so copies stay copies)
            got, _ = blk._tocom_attention(x, ctx, None)
            plain = DiffParallelScalingBlock.forward(blk, copies)
        elif kind == "things":  # the summed attention branches
            got, _ = blk._tocom_attention(x, ctx, None)
            plain = copies + torch.stack([branch(copies) for branch in blk.attns]).sum(dim=0)
        else:
            got, plain = diff_attend(blk.attn, x, ctx.attn_bias)[0], blk.attn(copies)
        first = torch.cumsum(sizes, 0) - sizes
        assert (got - plain[:, first]).abs().max() <= 1e-5
        if kind == "diff_attention":  # the bias in the first map only is wrong
            one_map = diff_attend(blk.attn, x, None)[0]
            assert (one_map - plain[:, first]).abs().max() > 1e-4


def _evit_by_masking(model, r):
    """EViT as the plain model with the pruned tokens' keys masked out from the next block on; each block's
    attentiveness is the class row of its softmax maps (differential: ``a₁ − λ a₂``; parallel: the mean)."""
    seen = []
    attns = [m for m in model.modules() if isinstance(m, (Attention, DiffAttention))]
    for a in attns:
        a.fused_attn = False
    hooks = [a.attn_drop.register_forward_hook(lambda m, i, o, a=a: seen.append((a, i[0]))) for a in attns]
    x = model.norm_pre(model._pos_embed(model.patch_embed(X)))
    batch, n = x.shape[:2]
    alive = torch.ones(batch, n, dtype=torch.bool)
    for blk in model.blocks:
        seen.clear()
        mask = torch.zeros(batch, 1, 1, n).masked_fill(~alive[:, None, None], float("-inf"))
        x = blk(x, attn_mask=mask)
        rows = []
        for a, probs in seen:
            if isinstance(a, DiffAttention):
                pair = probs.view(batch, a.num_heads, 2, n, n)
                probs = pair[:, :, 0] - a._compute_lambda() * pair[:, :, 1]
            rows.append(probs[:, :, 0].mean(dim=1))
        score = torch.stack(rows).mean(dim=0)
        for b in range(batch):
            cand = [j for j in range(1, n) if alive[b, j]]
            for j in sorted(cand, key=lambda j: -float(score[b, j].detach()))[max(len(cand) - r, 1) :]:
                alive[b, j] = False
    for h in hooks:
        h.remove()
    return model.norm(x), alive


@pytest.mark.parametrize("kind", ["diff_attention", "things"])
def test_evit_is_key_masking_of_the_plain_model(kind):
    model = make(kind, depth=3)
    ref, alive = _evit_by_masking(copy.deepcopy(model), r=10)
    tocom_hub.patch(model, method="evit", trace_source=True)
    tocom_hub.set_r(model, 10)
    with torch.no_grad():
        out = model.forward_features(X)
    src = tocom_hub.get_source(model)
    assert torch.equal(src.sum(dim=1) > 0, alive)
    assert (out - src @ ref.detach()).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["diff_attention", "parallel_scaling"])
def test_bank_apply_changes_only_q_and_v_by_the_delta_and_remove_is_exact(kind):
    model = make_vit("cls_token", depth=2, init_values=0.3, **BANK[kind])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = ToComBank.for_model(model, r_max=4, rank=2, targets=("q", "v"))
    groups = random_groups(bank, seed=2)
    tocom_hub.apply(model, 1, 3, bank=bank)
    after = model.state_dict()
    del after[MARKER_KEY]
    d = 64
    start = model.blocks[0].in_split[0] if kind == "parallel_scaling" else 0  # in_proj: the MLP's rows first
    name = "in_proj.weight" if kind == "parallel_scaling" else "attn.qkv.weight"
    for k, v in after.items():
        if k.endswith(name):
            b = int(k.split(".")[1])
            for i, t in ((0, "q"), (2, "v")):
                rows = slice(start + i * d, start + (i + 1) * d)
                want = before[k][rows].double() + naive_delta(groups, t, b, 1, 3, bank.scale)
                assert (v[rows].double() - want).abs().max() <= 1e-5
            untouched = torch.ones(v.shape[0], dtype=torch.bool)
            untouched[start : start + d] = untouched[start + 2 * d : start + 3 * d] = False
            assert torch.equal(v[untouched], before[k][untouched])
        else:
            assert torch.equal(v, before[k]), k
    tocom_hub.remove(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_parallel_things_and_fused_out_proj_refuse_the_bank_with_the_reason():
    with pytest.raises(TypeError, match="2 attentions per block; a ToCom bank holds one q/v update"):
        model_dims(make("things"))
    with pytest.raises(TypeError, match="DiffParallelScalingBlock projects attention and MLP outputs through one"):
        model_dims(make("diff_parallel"))


def assert_threads_get_serial_outputs(model, size=64, r=8):
    """Two threads running forwards on one patched model (different batches) get the serial outputs."""
    tocom_hub.set_r(model, r)
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randn(b, 3, size, size, generator=g) for _ in range(4)] for b in (1, 3)]
    with torch.no_grad():
        serial = [[model(x) for x in xs] for xs in batches]
    results, errors = [[], []], []
    start = threading.Barrier(2)

    def run(k):
        try:
            start.wait()
            with torch.no_grad():
                results[k].extend(model(x) for x in batches[k])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [len(r) for r in results] == [4, 4]
    assert all(torch.equal(a, b) for k in range(2) for a, b in zip(results[k], serial[k]))


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_two_threads_get_the_serial_outputs(kind, method):
    model = make(kind)
    tocom_hub.patch(model, method=method)
    assert_threads_get_serial_outputs(model)
