"""Tiny timm ``NaFlexVit`` models and NaFlex patch-dict batches (``patches``, ``patch_coord``, ``patch_valid``)."""

from __future__ import annotations

import timm
import torch
from timm.models.naflexvit import batch_patchify
from tiny_models import _init_nontrivial

PATCH = 8
# name -> (timm model, overrides): the registered layouts (gap + registers, map, siglip, RADIO) and rope
NAFLEX_VARIANTS = {
    "gap_registers": ("naflexvit_base_patch16_gap", {}),
    "map_cls": ("naflexvit_base_patch16_map", {}),
    "siglip_map_no_prefix": ("naflexvit_base_patch16_siglip", {}),
    "radio_token_8_prefix": ("naflexvit_base_patch16_radio_v3", dict(init_values=0.3)),  # timm: 1e-5
    "rope_axial": ("naflexvit_base_patch16_gap", dict(rope_type="axial")),
    "rope_mixed": ("naflexvit_base_patch16_gap", dict(rope_type="mixed")),
    "rope_dinov3_separate_qkv": ("naflexvit_base_patch16_gap", dict(rope_type="dinov3", qkv_fused=False)),
}


def make_naflex(variant: str = "gap_registers", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny ``NaFlexVit`` (64 px, patch 8: up to 64 patches) with random, non-degenerate weights."""
    name, extra = NAFLEX_VARIANTS[variant]
    kwargs = dict(img_size=64, patch_size=PATCH, depth=3, embed_dim=64, num_heads=4, num_classes=10)
    kwargs.update(extra)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return _init_nontrivial(timm.create_model(name, pretrained=False, **kwargs), seed).eval()


def image_patches(h: int, w: int, seed: int):
    """One image of ``h × w`` patches: ``(patches [h·w, P·P·3], patch_coord [h·w, 2] (y, x))``."""
    img = torch.randn(1, 3, h * PATCH, w * PATCH, generator=torch.Generator().manual_seed(seed))
    patches, _ = batch_patchify(img, (PATCH, PATCH))
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return patches[0], torch.stack([ys.flatten(), xs.flatten()], dim=-1)


def patch_batch(shapes, seeds=None, length=None) -> dict:
    """A padded NaFlex batch of images of ``shapes`` (``[(h, w), ...]`` in patches), padded to ``length``."""
    items = [image_patches(h, w, s) for (h, w), s in zip(shapes, seeds or range(len(shapes)))]
    length = length or max(p.shape[0] for p, _ in items)
    batch, dim = len(items), items[0][0].shape[-1]
    patches = torch.zeros(batch, length, dim)
    coord = torch.zeros(batch, length, 2, dtype=torch.long)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for i, (p, c) in enumerate(items):
        patches[i, : len(p)], coord[i, : len(p)], valid[i, : len(p)] = p, c, True
    return dict(patches=patches, patch_coord=coord, patch_valid=valid)
