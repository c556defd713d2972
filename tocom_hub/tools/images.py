"""The image size and evaluation transform of a timm model (used by every tool that feeds it images)."""

from __future__ import annotations

from typing import Optional, Tuple

from torch import nn


def model_img_size(model: nn.Module) -> Tuple[int, int]:
    """``(H, W)`` the model's patch embedding was built for (the model's own, or its ``encoder``'s: the
    Qwen3 / Gemma-4 classifiers hold the tower there); else the pretrained config's input size."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        embed = getattr(getattr(model, "encoder", None), "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def eval_transform(model: nn.Module, *, crop_pct: Optional[float] = None):
    """timm's evaluation transform for ``model`` (``resolve_data_config`` + ``create_transform``) at the
    size the model was built for (``model_kwargs`` may have changed it from the pretrained config)."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = (cfg["input_size"][0], *model_img_size(model))
    if crop_pct is not None:
        cfg["crop_pct"] = crop_pct
    return create_transform(**cfg, is_training=False), cfg
