"""The ``qwen3_vit`` family: timm ``Qwen3VitEncoder`` and ``Qwen3VitClassifier`` (the Qwen3-VL / Qwen3.5
vision towers). Their blocks are ``EvaBlock`` / ``AttentionRope`` with a ``RotaryEmbeddingCat`` (no prefix
tokens), so the block adapters and the rope rows are the eva family's (:mod:`.eva`); this module says where
the blocks are (the classifier wraps the encoder) and what the model does with the reduced tokens.

- Regular mode (tokens shrink): ``forward_features`` returns the ``[B, N', C]`` tokens (timm reshapes the
  full grid to ``(B, H, W, C)``, which merged tokens no longer form); average pooling weighs each token by
  its size. The ``merge`` head (``_merge`` classifiers, ``_enc`` encoders: a 2×2 patch merger that
  concatenates neighbouring patches) needs the full grid, so the regular mode is refused on it.
- Dense mode (``patch(dense=True)``: the grid stays full, only the MLPs see merged tokens) runs every head,
  the patch merger included, through timm's own forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.models.qwen3_vit import Qwen3VitClassifier, Qwen3VitEncoder

from .base import ReducedModel, size_pool
from .eva import EvaFamily

__all__ = ["Qwen3Family", "ToComQwen3Encoder", "ToComQwen3Classifier"]

_NEEDS_GRID = (
    "its 2×2 patch merger (global_pool / encoder_pool 'merge') concatenates neighbouring patches and needs the full "
    "patch grid, which merged or pruned tokens no longer form; use tocom_hub.patch(model, ..., dense=True) (the grid "
    "stays full and only the MLPs see merged tokens)"
)


def _encoder(model) -> Qwen3VitEncoder:
    return model.encoder if isinstance(model, Qwen3VitClassifier) else model


def _reduces(state) -> bool:
    return any(state.r) and not state.dense


def _reduced_features(model, enc: Qwen3VitEncoder, x: torch.Tensor) -> torch.Tensor:
    """The encoder's blocks on the patch tokens; returns ``[B, N', C]`` (the grid no longer holds them)."""
    state = model._tocom_state
    ctx = state.begin()
    if enc.grad_checkpointing and model.training:
        raise RuntimeError(
            "gradient checkpointing re-runs blocks and cannot be combined with token merging/pruning; "
            "call model.set_grad_checkpointing(False) or tocom_hub.set_r(model, 0)"
        )
    x = enc.patch_embed(x)
    ctx.grid = (x.shape[1], x.shape[2])
    x, rope = enc._pos_embed(x)
    for blk in enc.blocks:
        x = blk(x, rope=rope)
    return x


def _avg(model, x: torch.Tensor) -> torch.Tensor:
    ctx = model._tocom_state.last()
    pooled = size_pool(model, x, ctx, "avg", 0, False) if ctx is not None else None
    return x.mean(dim=1) if pooled is None else pooled


def _intermediates_need(model, kwargs) -> None:
    if _reduces(model._tocom_state) and not kwargs.get("intermediates_only", False):
        raise ValueError(
            f"{type(model).__name__}.forward_intermediates reshapes its final tokens to the patch grid; with merged "
            f"or pruned tokens pass intermediates_only=True (the intermediates come back on the full grid) or patch "
            f"with dense=True"
        )


class ToComQwen3Encoder(ReducedModel):
    """Model mixin for ``Qwen3VitEncoder``: reduced tokens as ``[B, N', C]``, size-weighted ``avg`` pooling."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not _reduces(self._tocom_state):
            return super().forward_features(x)
        return _reduced_features(self, self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _reduces(self._tocom_state):
            return super().forward(x)
        x = self.forward_features(x)  # (the merger head is refused in this mode)
        return _avg(self, x) if self.global_pool == "avg" else x

    def forward_intermediates(self, x, *args, **kwargs):
        _intermediates_need(self, kwargs)
        return super().forward_intermediates(x, *args, **kwargs)


class ToComQwen3Classifier(ReducedModel):
    """Model mixin for ``Qwen3VitClassifier``: the encoder's blocks as the model's, reduced tokens as
    ``[B, N', C]``, size-weighted average pooling before the head."""

    blocks = property(lambda self: self.encoder.blocks)
    patch_embed = property(lambda self: self.encoder.patch_embed)
    grad_checkpointing = property(lambda self: self.encoder.grad_checkpointing)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not _reduces(self._tocom_state):
            return super().forward_features(x)
        return _reduced_features(self, self.encoder, x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not _reduces(self._tocom_state) or self.global_pool != "avg":
            return super().forward_head(x, pre_logits)
        x = self.head_drop(self.norm(_avg(self, x.flatten(1, -2))))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, *args, **kwargs):
        _intermediates_need(self, kwargs)
        if not _reduces(self._tocom_state):
            return super().forward_intermediates(x, *args, **kwargs)
        from ..grid import merged_intermediates  # the encoder's own intermediates, unmerged onto the grid

        self._tocom_state.begin().track = True
        return merged_intermediates(self, self.encoder.forward_intermediates, x, *args, **kwargs)


class Qwen3Family(EvaFamily):
    name = "qwen3_vit"
    model_classes = (Qwen3VitEncoder, Qwen3VitClassifier)

    def __init__(self, model=None) -> None:
        enc = _encoder(model) if model is not None else None
        self.rope = getattr(enc, "rope", None)
        self.positional = self.rope is not None
        self.model_mixin = ToComQwen3Classifier if isinstance(model, Qwen3VitClassifier) else ToComQwen3Encoder

    @classmethod
    def model_blocks(cls, model):
        return _encoder(model).blocks

    def check(self, model, positions):
        super().check(_encoder(model), positions)

    def regular_refusal(self, model) -> Optional[str]:
        return _NEEDS_GRID if _encoder(model).merger is not None else None
