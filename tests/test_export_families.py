"""``tools.export`` on every family ``tocom_hub.patch`` supports beyond ``tests/test_export.py``'s ViT variants and two
Eva models: BEiT, relpos (``RelPosBlock`` with a class token, ``ResPostRelPosBlock`` with average pooling), CaiT,
NaFlexViT (images, and a padded patch dict), the Qwen3 classifier (average pool; the 2×2 patch merger), Gemma-4, the
classic family's other blocks (``ParallelScalingBlock``, ``ParallelThingsBlock``, ``DiffParallelScalingBlock``,
``ResPostBlock`` with ``DiffAttention``) and Eva (DINOv3 rope with registers; ``RotaryEmbeddingMixed`` in
``EvaBlockPostNorm`` blocks, average pooling). onnxruntime and the loaded ``torch.export`` program must equal eager
to 1e-4 (fp32) at r = 0 (bank merged 8 → 0) and r = 8 (0 → 8); ``ParallelThingsBlock`` and
``DiffParallelScalingBlock`` refuse a bank (one q/v update per block cannot serve several attentions / a fused
output projection), so they are exported at plain ToMe / EViT r.

Time is bounded by exporting each family in 2 of the 8 (method, r, exporter) cases (:func:`plan`): r = 0 and r = 8,
one with ToMe and one with EViT, one through each exporter, so every family is exported at both r, with both methods
and through both exporters; which method and exporter goes with which r alternates over the families, so every one
of the 8 cases is exported on some family.

Every tiny model has at least 36 patches at depth 2, enough for r = 8 in both blocks.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import pytest
import torch
from bank_helpers import random_groups, state_hash
from naflex_helpers import make_naflex, patch_batch
from test_families_gemma4 import make_gemma
from test_families_qwen3 import make_qwen
from test_families_vit_blocks import make as make_block
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock
from tiny_models import make_eva, make_vit
from tiny_relfam import make_rel

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.core.merge import max_merge, padded_merge_limit
from tocom_hub.tools.export import export_model, read_recipe, run_exported
from tocom_hub.tools.images import model_img_size

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py: one torch thread for the module

R_MAX = 8
TOL = 1e-4
# the padded NaFlex batches: the traced example and another layout of the same shape for the check
PADDED = [(8, 8), (5, 7)]
PADDED_CHECK = [(3, 4), (7, 9)]


class Family(NamedTuple):
    make: Callable[[], torch.nn.Module]
    bank: bool = True  # False: the family refuses a bank (exported at plain ToMe / EViT r)
    size: Optional[int] = None  # input side when the model does not say (Gemma-4: any size)
    padded: bool = False  # NaFlex patch dict with padding instead of images


FAMILIES = {
    "beit": Family(lambda: make_rel("beit_token")),  # per-block bias table, class token
    "relpos_cls": Family(lambda: make_rel("relpos_cls_token")),  # RelPosBlock, RelPosMlp
    "relpos_respost_avg": Family(lambda: make_rel("relpos_rpn_avg")),  # ResPostRelPosBlock, no class token
    "cait": Family(lambda: make_rel("cait_token")),  # talking heads, then class attention
    "naflexvit": Family(lambda: make_naflex("gap_registers", depth=2, init_values=0.3)),  # images: no padding
    # a patch dict needs timm's grid_sample position embedding (the default sizes it per image on the host)
    "naflexvit_padded": Family(
        lambda: make_naflex("gap_registers", depth=2, init_values=0.3, pos_embed_use_grid_sample=True), padded=True
    ),
    "qwen3_avg": Family(lambda: make_qwen()),
    "qwen3_merge": Family(lambda: make_qwen("qwen3_vit_88m_merge")),  # 2×2 patch merger on the full grid
    "gemma4": Family(lambda: make_gemma(), size=48),  # 6 × 6 patches
    "vit_parallel_scaling": Family(
        lambda: make_vit("cls_token", depth=2, init_values=0.3, block_fn=ParallelScalingBlock)
    ),
    "vit_parallel_things": Family(lambda: make_block("things"), bank=False),
    "vit_diff_parallel_scaling": Family(lambda: make_block("diff_parallel"), bank=False),
    "vit_respost_diff_attention": Family(lambda: make_block("diff_attention", block_fn=ResPostBlock)),
    "eva_dinov3_registers": Family(lambda: make_eva("rope_dinov3_registers")),
    "eva_mixed_postnorm_avg": Family(lambda: make_eva("rope_mixed_avg", use_post_norm=True, init_values=None)),
}


def plan(i: int):
    """Family ``i``'s two cases ``(method, target r, exporter)``: r = 0 and r = 8, one with each method and one
    with each exporter; which method and which exporter goes with r = 0 alternates over the families."""
    methods, exporters = ("tome", "evit")[:: 1 - 2 * (i % 2)], ("onnx", "torch")[:: 1 - 2 * ((i // 2) % 2)]
    return [(methods[0], 0, exporters[0]), (methods[1], R_MAX, exporters[1])]


CASES = [(name, *case) for i, name in enumerate(sorted(FAMILIES)) for case in plan(i)]


def _inputs(family: Family, model):
    """``(example traced, batch checked)``: two different batches of the file's static shape."""
    if family.padded:
        return patch_batch(PADDED, length=64), patch_batch(PADDED_CHECK, seeds=[5, 6], length=64)
    size = (family.size,) * 2 if family.size else model_img_size(model)
    gen = torch.Generator().manual_seed(1)
    return None, torch.randn(2, 3, *size, generator=gen)


def _eager(model, bank, source_r, target_r, method, x):
    if bank is not None:
        tocom_hub.apply(model, source_r, target_r, bank=bank)
    else:
        tocom_hub.patch(model, method=method)
        tocom_hub.set_r(model, target_r)
    with torch.inference_mode():
        out = model(x)
    tocom_hub.remove(model) if bank is not None else tocom_hub.unpatch(model)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name, method, target_r, fmt", CASES)
def test_exported_family_matches_eager(name, method, target_r, fmt, tmp_path):
    family = FAMILIES[name]
    model = family.make()
    if family.bank:
        bank = ToComBank.for_model(model, r_max=R_MAX, rank=2, method=method, scale=0.5)
        random_groups(bank, seed=3)  # every group's factors non-zero: the merged update changes the weights
    else:
        with pytest.raises(TypeError, match="ToCom bank"):
            ToComBank.for_model(model, r_max=R_MAX, rank=2, method=method)
        bank = None
    before = state_hash(model)
    example, x = _inputs(family, model)
    size = None if family.size is None else (family.size,) * 2
    source_r = (R_MAX - target_r) if bank is not None else 0
    ref = _eager(model, bank, source_r, target_r, method, x)
    with torch.inference_mode():
        plain = model(x)
    if bank is not None or target_r:
        assert (ref - plain).abs().max() > 1e-3  # the bank and / or the reduction change the output
    (written,) = export_model(
        model, tmp_path / f"{fmt}-r{target_r}", source_r, target_r, bank=bank, format=fmt, method=method,
        batch_size=2, input_size=size, example=example, verify=example is not None,
    )  # fmt: skip
    if example is not None:  # checked on the traced layout too
        assert written.max_abs_diff is not None and written.max_abs_diff <= TOL
    err = float((run_exported(written.path, x) - ref).abs().max())
    assert err <= TOL, f"{name} {method} {fmt} r={target_r}: max |exported - eager| = {err:.2e}"
    recipe = read_recipe(written.path)
    assert recipe["method"] == method and recipe["target_r"] == target_r
    assert recipe["source_r"] == (source_r if bank is not None else None)
    shape = {k: list(v.shape) for k, v in x.items()} if family.padded else list(x.shape)
    assert recipe["input_shape"] == shape
    assert state_hash(model) == before and not tocom_hub.is_patched(model)


def test_every_family_gets_both_exporters_methods_and_r():
    combos = set()
    for i in range(len(FAMILIES)):
        (m0, r0, e0), (m8, r8, e8) = plan(i)
        assert (r0, r8) == (0, R_MAX) and {m0, m8} == {"tome", "evit"} and {e0, e8} == {"onnx", "torch"}
        combos |= {(m0, r0, e0), (m8, r8, e8)}
    assert len(combos) == 8  # over the families, every (method, r, exporter) is exported


def test_padded_merge_limit_never_binds_below_max_merge():
    """Why a padded ToMe step needs no host sync below ``max_merge`` (one static graph for every layout):
    every split of N tokens (prefix p) into real tokens followed by padding allows ``max_merge - 1`` merges."""
    for num in range(1, 20):
        for prefix in range(min(num, 3) + 1):
            for real in range(num - prefix + 1):
                valid = torch.zeros(1, num, dtype=torch.bool)
                valid[0, : prefix + real] = True
                assert padded_merge_limit(valid, prefix) >= max_merge(num, prefix) - 1, (num, prefix, real)
    valid = torch.tensor([[True, False, False, False]])  # one real token (an A) has no partner: the bound is met
    assert padded_merge_limit(valid) == max_merge(4) - 1 == 1


def test_naflex_patch_dict_with_host_sized_position_embedding_is_refused_before_writing(tmp_path):
    model = make_naflex("gap_registers", depth=2)  # timm's default: per-image grid sizes through .item()
    before = state_hash(model)
    with pytest.raises(ValueError, match="pos_embed_use_grid_sample=True"):
        export_model(model, tmp_path / "m.pt2", target_r=8, format="torch", batch_size=2,
                     example=patch_batch(PADDED, length=64))  # fmt: skip
    with pytest.raises(ValueError, match="batch_size"):
        export_model(model, tmp_path / "m.pt2", format="torch", example=torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="not both"):
        export_model(model, tmp_path / "m.pt2", format="torch", example=torch.randn(1, 3, 64, 64), input_size=(64, 64))
    assert not list(tmp_path.iterdir()) and state_hash(model) == before and not tocom_hub.is_patched(model)


def test_image_size_of_a_classifier_is_its_encoders():
    """Qwen3 / Gemma-4 classifiers hold the tower (and its patch embedding) in ``model.encoder``."""
    assert model_img_size(make_qwen()) == (64, 64)
    assert model_img_size(make_qwen(img_size=96)) == (96, 96)
