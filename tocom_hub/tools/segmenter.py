"""A Segmenter-style semantic-segmentation model on a timm ViT (Strudel et al., ICCV 2021).

:class:`Segmenter` runs the backbone's ``forward_features``, keeps the patch tokens on the patch grid
and decodes them with a :class:`LinearDecoder` (one linear layer per patch) or a :class:`MaskTransformer`
(learned class embeddings joined to the patch tokens, a few transformer blocks, masks = scalar products
of the L2-normalised patch and class embeddings); the ``[B, classes, gh, gw]`` patch logits are
upsampled bilinearly to the image. On a model patched with ``dense=True`` (the ToCom paper's appendix,
docs/dense.md) every patch keeps its token; on a model patched in the regular (shrinking) mode the
merged tokens are copied back to their patches (``tocom_hub.unmerge_to_grid``). Example::

    backbone = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=0)
    model = Segmenter(backbone, num_classes=5, decoder="mask")
    tocom_hub.patch(model.backbone, method="tome", dense=True, dense_ratio=2)
    tocom_hub.set_r(model.backbone, 8)
    logits = model(x)                       # [B, 5, H, W]
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.grid import track_grid, unmerge_to_grid
from ..core.jsonio import write_json

__all__ = ["DECODERS", "LinearDecoder", "MaskTransformer", "Segmenter", "patch_tokens", "save_segmenter",
           "load_segmenter", "is_segmenter_dir", "SEGMENTER_CONFIG"]  # fmt: skip

SEGMENTER_CONFIG = "segmenter.json"

DECODERS = ("linear", "mask")


def patch_tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, gh·gw, D]``: the backbone's final features of every patch (prefix tokens dropped).

    A model patched in the regular mode is run under :func:`tocom_hub.track_grid` and its merged tokens are
    copied back to their patches; an unpatched or dense model already keeps one token per patch.
    """
    prefix = int(backbone.num_prefix_tokens)
    if backbone.__dict__.get("_tocom_state") is None:
        return backbone.forward_features(x)[:, prefix:]
    with track_grid(backbone):
        tokens = backbone.forward_features(x)
    return unmerge_to_grid(backbone, tokens, output_fmt="NLC")


class LinearDecoder(nn.Module):
    """One linear layer from every patch token to the class logits (Segmenter's "linear" decoder)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` patch tokens → ``[B, L, classes]`` logits."""
        return self.head(tokens)


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer: ``num_classes`` learned class embeddings are appended to the
    (projected) patch tokens, ``depth`` transformer blocks run on both, and the logit of class ``c`` at a
    patch is the scalar product of the L2-normalised patch and class-``c`` embeddings, through a
    LayerNorm over the classes (the mask norm of the original)."""

    def __init__(self, dim: int, num_classes: int, *, width: int = 0, depth: int = 1, num_heads: int = 0) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        width = width or dim
        num_heads = num_heads or max(1, width // 32)
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_classes = num_classes
        self.proj_in = nn.Linear(dim, width)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.proj_patch = nn.Linear(width, width, bias=False)
        self.proj_classes = nn.Linear(width, width, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` patch tokens → ``[B, L, classes]`` logits."""
        x = self.proj_in(tokens)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        patches, classes = x[:, : -self.num_classes], x[:, -self.num_classes :]
        patches = F.normalize(self.proj_patch(patches), dim=-1)
        classes = F.normalize(self.proj_classes(classes), dim=-1)
        return self.mask_norm(patches @ classes.transpose(1, 2))


class Segmenter(nn.Module):
    """A timm ViT ``backbone`` plus a decoder on its patch grid; ``forward(x)`` gives ``[B, classes, H, W]``.

    Args:
        backbone: a timm ViT-like model with ``patch_embed.grid_size`` and ``num_prefix_tokens`` (its
            classifier head is not used); it may be patched by ``tocom_hub.patch`` before or after.
        num_classes: segmentation classes.
        decoder: ``"linear"`` (:class:`LinearDecoder`) or ``"mask"`` (:class:`MaskTransformer`).
        decoder_kwargs: passed to :class:`MaskTransformer` (``width``, ``depth``, ``num_heads``).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, decoder: str = "linear", **decoder_kwargs: Any) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}; got {decoder!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
        grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
        dim = getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim", None)
        if grid is None or dim is None or not hasattr(backbone, "num_prefix_tokens"):
            raise TypeError(f"{type(backbone).__name__} is not a ViT with a patch grid (patch_embed.grid_size)")
        if decoder == "linear" and decoder_kwargs:
            raise ValueError(f"the linear decoder takes no options; got {sorted(decoder_kwargs)}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.decoder_name = decoder
        self.decoder_kwargs: Dict[str, Any] = dict(decoder_kwargs)
        self.decoder = (
            LinearDecoder(dim, num_classes)
            if decoder == "linear"
            else MaskTransformer(dim, num_classes, **decoder_kwargs)
        )

    def patch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, classes, gh, gw]``: one logit vector per patch, before upsampling."""
        tokens = patch_tokens(self.backbone, x)
        ph, pw = self.backbone.patch_embed.patch_size
        gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
        if tokens.shape[1] != gh * gw:
            raise ValueError(f"the backbone gave {tokens.shape[1]} patch tokens for a {gh}x{gw} patch grid")
        logits = self.decoder(tokens)
        return logits.transpose(1, 2).reshape(x.shape[0], self.num_classes, gh, gw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, classes, H, W]`` logits for images ``x`` (``[B, 3, H, W]``), bilinear upsampling."""
        return F.interpolate(self.patch_logits(x), size=x.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W]`` int64: the class with the largest logit at every pixel."""
        return self(x).argmax(1)

    def config(self) -> Dict[str, Any]:
        """What rebuilds the decoder: ``num_classes``, ``decoder``, ``decoder_kwargs``."""
        return {"num_classes": self.num_classes, "decoder": self.decoder_name, "decoder_kwargs": self.decoder_kwargs}


def is_segmenter_dir(path: Any) -> bool:
    """Whether ``path`` is a directory written by :func:`save_segmenter`."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, SEGMENTER_CONFIG))


def save_segmenter(model: Segmenter, path: str, backbone_info: Dict[str, Any], extra: Optional[Dict[str, Any]] = None):
    """Write ``backbone.safetensors`` (the timm state_dict), ``decoder.safetensors`` and ``segmenter.json``
    (``backbone_info``: ``model`` and ``model_kwargs`` that rebuild the backbone with timm; ``extra``: anything
    else to record) to directory ``path``; returns the JSON dict. Save an unpatched model."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    for name, module in (("backbone", model.backbone), ("decoder", model.decoder)):
        tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, os.path.join(path, f"{name}.safetensors"))
    out = {**model.config(), "backbone": dict(backbone_info), **(extra or {})}
    write_json(os.path.join(path, SEGMENTER_CONFIG), out, default=None)
    return out


def load_segmenter(path: str) -> Segmenter:
    """The :class:`Segmenter` saved by :func:`save_segmenter` in directory ``path`` (unpatched, eval mode)."""
    from safetensors.torch import load_file

    from .models import load_model

    if not is_segmenter_dir(path):
        raise FileNotFoundError(
            f"{path}: no {SEGMENTER_CONFIG} (not a directory saved by finetune.py --task segmentation)"
        )
    with open(os.path.join(path, SEGMENTER_CONFIG), encoding="utf-8") as f:
        cfg = json.load(f)
    backbone = load_model(
        cfg["backbone"]["model"],
        model_kwargs=dict(cfg["backbone"]["model_kwargs"], num_classes=0),
        checkpoint=os.path.join(path, "backbone.safetensors"),
    ).model
    model = Segmenter(backbone, cfg["num_classes"], cfg["decoder"], **cfg["decoder_kwargs"])
    model.decoder.load_state_dict(load_file(os.path.join(path, "decoder.safetensors")))
    return model.eval()
