"""torch.compile(fullgraph=True) on every supported family, regular and dense mode: one graph per r (a graph
break raises), the eager outputs, and after warm-up no recompile when cycling r (``error_on_recompile``
makes one raise). Backend "eager": dynamo's graph capture and guards are what is checked here; inductor's
numbers are checked in test_compile.py / test_compile_bank.py."""

from __future__ import annotations

import copy

import pytest
import torch
from naflex_helpers import make_naflex
from test_families_gemma4 import make_gemma
from test_families_qwen3 import make_qwen
from timm.models.vision_transformer import (
    DiffParallelScalingBlock,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
)
from tiny_models import make_eva, make_vit
from tiny_relfam import make_rel
from torch._dynamo.testing import CompileCounter

import tocom_hub

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
X48 = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(11))  # gemma4: a 6×6 grid of 2×2 cells
TINY = dict(img_size=32, depth=2)  # 16 patches: r = 3 leaves 17 → 14 → 11 tokens

FAMILIES = {
    "vit_block": lambda: make_vit("cls_token", **TINY),
    "vit_respost": lambda: make_vit("cls_token", block_fn=ResPostBlock, **TINY),
    "vit_parallel_scaling": lambda: make_vit("cls_token", block_fn=ParallelScalingBlock, init_values=0.3, **TINY),
    "vit_parallel_things": lambda: make_vit("cls_token", block_fn=ParallelThingsBlock, init_values=0.3, **TINY),
    "vit_diff_parallel": lambda: make_vit("cls_token", block_fn=DiffParallelScalingBlock, init_values=0.3, **TINY),
    "vit_diff_attention": lambda: make_vit("cls_token", attn_layer="diff", init_values=0.3, **TINY),
    "qwen3_classifier": lambda: make_qwen(**TINY),
    "qwen3_merge": lambda: make_qwen("qwen3_vit_88m_merge", **TINY),  # 2×2 patch merger on the unmerged grid
    "qwen3_enc_merge": lambda: make_qwen("qwen3_vit_88m_enc", **TINY),
    "gemma4_classifier": lambda: make_gemma("classifier"),  # 48 px: 36 patches
    "gemma4_enc_soft": lambda: make_gemma("enc_soft"),
    "eva_rope_cat": lambda: make_eva("rope_cat_cls", **TINY),
    "eva_rope_dinov3_registers": lambda: make_eva("rope_dinov3_registers", **TINY),
    "eva_rope_mixed_avg": lambda: make_eva("rope_mixed_avg", **TINY),
    "eva_no_rope": lambda: make_eva("norope_token", **TINY),
    "eva_separate_qkv": lambda: make_eva("rope_cat_separate_qkv", **TINY),
    "eva_grouped_kv": lambda: make_eva("rope_cat_gqa", **TINY),
    "eva_post_norm": lambda: make_eva("postnorm_norope", **TINY),
    "beit_rel_bias": lambda: make_rel("beit_avg", img_size=32),
    "beit_shared_bias": lambda: make_rel("beit_shared", img_size=32),
    "relpos_mlp_cls": lambda: make_rel("relpos_cls_token", img_size=32),
    "relpos_respost": lambda: make_rel("relpos_rpn_avg", img_size=32),
    "cait_talking_heads": lambda: make_rel("cait_token", img_size=32),
    "naflex_map_cls": lambda: make_naflex("map_cls", **TINY),  # the fixed-size image path
    "naflex_rope_axial": lambda: make_naflex("rope_axial", **TINY),
}
NO_DENSE = {"vit_parallel_scaling", "vit_diff_parallel"}  # dense mode refuses it (no MLP after the attention)
EVIT = {"vit_block", "vit_parallel_scaling", "eva_rope_dinov3_registers", "eva_separate_qkv", "beit_rel_bias"}
EVIT |= {"relpos_mlp_cls", "cait_talking_heads", "naflex_rope_axial"}
EVIT |= {"vit_parallel_things", "vit_diff_parallel", "vit_diff_attention"}
EVIT |= {"qwen3_classifier", "qwen3_merge", "gemma4_enc_soft"}
CASES = [(f, "tome", False) for f in FAMILIES] + [(f, "evit", False) for f in sorted(EVIT)]
CASES += [(f, "tome", True) for f in FAMILIES if f not in NO_DENSE] + [("eva_rope_cat", "evit", True)]
CASES += [("beit_rel_bias", "evit", True)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family,method,dense", CASES, ids=[f"{f}-{m}{'-dense' if d else ''}" for f, m, d in CASES])
def test_fullgraph_one_graph_per_r_and_no_recompile_when_cycling(family, method, dense):
    model = FAMILIES[family]()
    x = X48 if family.startswith("gemma4") else X
    tocom_hub.patch(model, method=method, **(dict(dense=True, dense_ratio=2) if dense else {}))
    eager = copy.deepcopy(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # a graph break raises
    rs = (0, 3)  # r = 0 is timm's own forward; r = 3 runs the family's reduced attention
    with torch.no_grad():
        for r in rs:  # warm-up: one graph per r
            tocom_hub.set_r(model, r)
            compiled(x)
        assert counter.frame_count == len(rs)
        with torch._dynamo.config.patch(error_on_recompile=True):  # from here on a recompile raises
            outs = {}
            for r in (3, 0, 3, 0):
                tocom_hub.set_r(model, r)
                tocom_hub.set_r(eager, r)
                outs[r] = compiled(x)
                assert (outs[r] - eager(x)).abs().max() <= 1e-5, r
    assert counter.frame_count == len(rs)
    if not dense:  # (dense mode changes the logits of a class-token model little: it keeps every token)
        assert (outs[3] - outs[0]).abs().max() > 1e-4  # r really acted
