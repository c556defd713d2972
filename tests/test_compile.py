"""torch.compile on patched models: one graph per r (fullgraph), no recompiles when cycling among
warmed-up r values, eager outputs, and in-place weight changes (a merged ToCom bank) seen by the graph."""

import copy

import pytest
import torch
from bank_helpers import random_groups
from tiny_models import SUPPORTED, make_vit
from torch._dynamo.testing import CompileCounter

import tocom_hub
from tocom_hub import ToComBank

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))

CASES = {
    "tome_cls_prop_trace": ("cls_token", {"method": "tome", "trace_source": True}),
    "tome_cls_noprop": ("cls_token", {"method": "tome", "prop_attn": False}),
    "tome_gap_map_head": ("map_head", {"method": "tome"}),
    "tome_registers_unfused": ("registers", {"method": "tome", "trace_source": True}),
    "evit_cls_trace": ("cls_token", {"method": "evit", "trace_source": True}),
    "evit_gap_fuse": ("gap", {"method": "evit", "fuse_token": True}),
    "evit_registers_fuse": ("registers", {"method": "evit", "fuse_token": True, "trace_source": True}),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", sorted(CASES))
def test_fullgraph_one_graph_per_r_and_no_recompile_when_cycling(case):
    variant, kwargs = CASES[case]
    model = make_vit(variant, fused=not case.endswith("unfused"), depth=2)
    eager = copy.deepcopy(model)
    tocom_hub.patch(model, **kwargs)
    tocom_hub.patch(eager, **kwargs)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    rs = (0, 4, 9)
    with torch.no_grad():
        for r in rs:  # warm-up: one graph per r
            tocom_hub.set_r(model, r)
            compiled(X)
        assert counter.frame_count == len(rs)
        for r in (9, 0, 4, 4, 9, 0):
            tocom_hub.set_r(model, r)
            tocom_hub.set_r(eager, r)
            out = compiled(X)
            ref = eager(X)
            assert (out - ref).abs().max() <= 1e-5
            if kwargs.get("trace_source") and r:
                assert torch.equal(tocom_hub.get_source(model), tocom_hub.get_source(eager))
    assert counter.frame_count == len(rs)  # cycling compiled nothing new


@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("variant", sorted(SUPPORTED))
def test_every_supported_variant_compiles_fullgraph(variant, method):
    """Every ViT variant the patcher supports (class / register / no-class tokens, pooling heads, layer
    scale, qk-norm, dynamic image size, …): one graph per r, the eager outputs, no recompile on return."""
    model = make_vit(variant, depth=2)
    tocom_hub.patch(model, method=method)
    eager = copy.deepcopy(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for r in (0, 5, 0, 5):
            tocom_hub.set_r(model, r)
            tocom_hub.set_r(eager, r)
            assert (compiled(X) - eager(X)).abs().max() <= 1e-5
    assert counter.frame_count == 2


@pytest.mark.parametrize("fold", [False, True])
def test_inductor_matches_eager_with_proportional_attention_paths(fold):
    """Both forms of proportional attention compile with inductor: the SDPA mask (CPU default) and log(size)
    folded into padded q/k (the CUDA default, chosen here with patch(attention="fold")), each giving the eager
    outputs."""
    model = tocom_hub.patch(make_vit("cls_token", depth=2), method="tome", attention="fold" if fold else "mask")
    tocom_hub.set_r(model, 6)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        ref = model(X)
        out = compiled(X)
        tocom_hub.patch(model, method="tome", attention="mask" if fold else "fold")
        other = model(X)  # the other form, eager: the same logits
    assert (out - ref).abs().max() <= 1e-4
    assert (other - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_inductor_matches_eager(method):
    model = tocom_hub.patch(make_vit("cls_token", depth=2), method=method, trace_source=True)
    tocom_hub.set_r(model, 6)
    compiled = torch.compile(model, fullgraph=True)  # default backend: inductor
    with torch.no_grad():
        ref = model(X)
        ref_source = tocom_hub.get_source(model)
        out = compiled(X)
    assert (out - ref).abs().max() <= 1e-4
    assert torch.equal(tocom_hub.get_source(model), ref_source)


def test_set_target_r_on_compiled_model_with_merged_bank():
    model = make_vit("cls_token", depth=2)
    bank = ToComBank.for_model(model, r_max=6, rank=2, targets=("q", "v"), method="tome")
    random_groups(bank, seed=1)
    tocom_hub.apply(model, 0, 6, bank=bank)  # merged: the qkv weights are changed in place
    eager = copy.deepcopy(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    seen = []
    with torch.no_grad():
        for r in (6, 2, 6, 0, 2):
            tocom_hub.set_target_r(model, r)
            tocom_hub.set_target_r(eager, r)
            out = compiled(X)
            assert (out - eager(X)).abs().max() <= 1e-5
            seen.append(out)
    assert counter.frame_count == 3  # one graph per r; weight updates need no recompile
    assert (seen[0] - seen[2]).abs().max() <= 1e-5  # back at r=6: the same weights again
    assert (seen[1] - seen[4]).abs().max() <= 1e-5
