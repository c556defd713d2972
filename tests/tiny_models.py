"""Tiny timm models (pretrained=False) covering the ViT variants tocom_hub supports or rejects."""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

TINY = dict(img_size=64, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=10)

# name -> kwargs for VisionTransformer (64 px, patch 8 → 64 patches)
SUPPORTED = {
    "cls_token": dict(),
    "cls_token_qkv_bias_off": dict(qkv_bias=False),
    "registers": dict(reg_tokens=4),
    "registers_no_embed_class": dict(reg_tokens=3, no_embed_class=True),
    "gap": dict(class_token=False, global_pool="avg"),
    "gap_registers": dict(class_token=False, reg_tokens=2, global_pool="avg", no_embed_class=True),
    "avgmax": dict(class_token=False, global_pool="avgmax"),
    "avg_with_cls": dict(global_pool="avg"),
    "avg_include_prefix": dict(global_pool="avg", pool_include_prefix=True),
    "map_head": dict(class_token=False, global_pool="map"),
    "layer_scale": dict(init_values=0.5),
    "qk_norm": dict(qk_norm=True),
    "scale_norm": dict(scale_attn_norm=True),
    "dynamic_img_size": dict(dynamic_img_size=True),
    "pre_norm": dict(pre_norm=True, class_token=False, global_pool="avg", fc_norm=False),
}


def _init_nontrivial(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random, non-degenerate weights everywhere (timm zero-inits heads, biases and some tokens)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("gamma")):
                continue  # keep LayerNorm weights/biases and layer scale as built
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.02))
            if p.ndim == 3 or "token" in name or "pos_embed" in name or "latent" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def make_vit(variant: str = "cls_token", fused: bool = True, seed: int = 0, **overrides) -> VisionTransformer:
    kwargs = dict(TINY)
    kwargs.update(SUPPORTED[variant])
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = VisionTransformer(**kwargs)
    _init_nontrivial(model, seed)
    for blk in model.blocks:
        (blk.attn if hasattr(blk, "attn") else blk).fused_attn = fused
    return model.eval()


def make_timm(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A registered timm model at tiny size, e.g. ``deit_tiny_distilled_patch16_224``."""
    kwargs = dict(img_size=64, depth=3, embed_dim=64, num_heads=2, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return _init_nontrivial(timm.create_model(name, pretrained=False, **kwargs), seed).eval()


def num_tokens(model) -> int:
    return model.patch_embed.num_patches + model.num_prefix_tokens


# name -> kwargs for timm Eva (64 px, patch 8 → 64 patches); every rope / attention / prefix / pool kind
EVA_TINY = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, init_values=0.2)
EVA_VARIANTS = {
    "rope_cat_cls": dict(use_rot_pos_emb=True, rope_type="cat"),
    "rope_cat_separate_qkv": dict(use_rot_pos_emb=True, rope_type="cat", qkv_fused=False),
    "rope_dinov3_registers": dict(use_rot_pos_emb=True, rope_type="dinov3", num_reg_tokens=4, attn_type="rope"),
    "rope_mixed_avg": dict(
        use_rot_pos_emb=True, rope_type="mixed", class_token=False, global_pool="avg", attn_type="rope"
    ),
    "rope_cat_gqa": dict(
        use_rot_pos_emb=True, rope_type="cat", attn_type="rope", qkv_fused=False, num_kv_heads=1, num_heads=4
    ),  # fmt: skip
    "rope_dinov3_map": dict(
        use_rot_pos_emb=True,
        rope_type="dinov3",
        class_token=False,
        global_pool="map",
        attn_type="rope",
        num_reg_tokens=1,
    ),  # fmt: skip
    "norope_token": dict(use_rot_pos_emb=False, global_pool="token"),
    "postnorm_norope": dict(use_rot_pos_emb=False, use_post_norm=True, init_values=None),
}


def make_eva(variant: str = "rope_cat_cls", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny timm ``Eva`` with random weights everywhere (layer scale 0.2 and random q/v biases)."""
    from timm.models.eva import Eva

    kwargs = dict(EVA_TINY)
    kwargs.update(EVA_VARIANTS[variant])
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = Eva(**kwargs)
    _init_nontrivial(model, seed)
    return model.eval()
