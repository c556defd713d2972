"""Tiny timm models of the relative-position families (``beit``, ``vision_transformer_relpos``) and ``cait``:
registered timm models at 64 px, patch 8 (64 patches), depth 2, width 64, random weights everywhere
(relative-position tables and MLPs too) and layer scale 0.2, so that every block matters."""

from __future__ import annotations

import timm
import torch
from tiny_models import _init_nontrivial

REL_TINY = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)

# name -> (timm model, kwargs); every block / bias / prefix / pool kind of the three families
REL_VARIANTS = {
    "beit_avg": ("beit_base_patch16_224", dict(init_values=0.2)),  # per-block bias table, q/v bias, pool avg
    "beit_token": ("beitv2_base_patch16_224", dict(init_values=0.2, global_pool="token")),
    "beit_shared": ("beit_base_patch16_224",
                    dict(init_values=0.2, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, global_pool="token")),
    "relpos_cls_token": ("vit_relpos_medium_patch16_cls_224", dict(init_values=0.2)),  # RelPosMlp, class token
    "relpos_rpn_avg": ("vit_relpos_base_patch16_rpn_224", dict(init_values=0.2)),  # ResPost (norm γ), no cls
    "relpos_shared_avg": ("vit_srelpos_small_patch16_224", dict(init_values=0.2)),  # one bias for every block
    "relpos_bias_table_cls": ("vit_relpos_medium_patch16_cls_224",
                              dict(init_values=0.2, rel_pos_type="bias")),  # RelPosBias table
    "cait_token": ("cait_xxs24_224", dict(init_values=0.2, depth_token_only=2)),
    "cait_avg": ("cait_xxs24_224", dict(init_values=0.2, depth_token_only=1, global_pool="avg")),
}  # fmt: skip
CLASS_TOKEN = ["beit_token", "beit_shared", "relpos_cls_token", "relpos_bias_table_cls"]


def make_rel(variant: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model of ``variant`` (``REL_VARIANTS``) in eval mode."""
    name, kwargs = REL_VARIANTS[variant]
    kwargs = {**REL_TINY, **kwargs, **overrides}
    torch.manual_seed(seed)
    return _init_nontrivial(timm.create_model(name, pretrained=False, **kwargs), seed).eval()
