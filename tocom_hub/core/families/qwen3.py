"""The ``qwen3_vit`` family: timm ``Qwen3VitEncoder`` and ``Qwen3VitClassifier`` (the Qwen3-VL / Qwen3.5
vision towers). Their blocks are ``EvaBlock`` / ``AttentionRope`` with a ``RotaryEmbeddingCat`` (no prefix
tokens), so the block adapters and the rope rows are the eva family's (:mod:`.eva`); this module says where
the blocks are (the classifier wraps the encoder) and what the model does with the reduced tokens.

- Regular mode (tokens shrink): ``forward_features`` of the encoder returns the ``[B, N', C]`` tokens (timm
  reshapes the full grid to ``(B, H, W, C)``, which merged tokens no longer form); average pooling weighs each
  token by its size.
- The ``merge`` head (``_merge`` classifiers, ``_enc`` encoders: timm's 2×2 patch merger, which concatenates
  the four patches of each cell) runs on the full grid: the forward tracks the index map patches → tokens
  (always, on these models) and, before the merger, every patch gets the token it ended in
  (:func:`~tocom_hub.core.grid.unmerge_to_grid`); then timm's own merger (and the classifier's own head) runs.
  ToMe: a patch gets the token its group merged into (the group's size-weighted mean, carried through the
  later blocks; a cell whose four patches merged repeats it four times). EViT: a pruned patch gets EViT's
  fused token with ``fuse_token=True``, else zeros (a zero row, which the merger's LayerNorm turns into its
  bias). The classifier's ``forward_features`` returns the merger's tokens, as timm's does.
- Dense mode (``patch(dense=True)``: the grid stays full, only the MLPs see merged tokens) runs every head,
  the patch merger included, through timm's own forward.
"""

from __future__ import annotations

import torch
from timm.models.qwen3_vit import Qwen3VitClassifier, Qwen3VitEncoder

from ..grid import merged_intermediates, unmerge_to_grid
from .base import ReducedModel, size_pool
from .eva import EvaFamily

__all__ = ["Qwen3Family", "ToComQwen3Encoder", "ToComQwen3Classifier"]


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
    ctx.track = ctx.track or enc.merger is not None  # the merger reads the index map (_merged_head)
    x = enc.patch_embed(x)
    ctx.grid = (x.shape[1], x.shape[2])
    x, rope = enc._pos_embed(x)
    for blk in enc.blocks:
        x = blk(x, rope=rope)
    return x


def _merged_head(model, enc: Qwen3VitEncoder, x: torch.Tensor) -> torch.Tensor:
    """timm's patch merger on the reduced tokens ``x`` put back on the full ``(B, H, W, C)`` grid: every patch
    holds the token it ended in (a pruned patch: the fused token, or zero without one)."""
    ctx = model._tocom_state.last()
    height, width = ctx.grid
    if ctx.grid_index is not None:
        x = unmerge_to_grid(model, x, output_fmt="NLC")
    elif x.shape[1] != height * width:  # a custom reducer's plans: positions unknown, tracking ended
        raise RuntimeError(
            f"{type(model).__name__}: the 2×2 patch merger needs every patch's token, but the reducer's plans give "
            f"no positions (tocom_hub.core.dense.plan_positions); use the default ToMe / EViT reducer"
        )
    return enc.merger(x.reshape(x.shape[0], height, width, x.shape[-1]))


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
    """Model mixin for ``Qwen3VitEncoder``: reduced tokens as ``[B, N', C]``, size-weighted ``avg`` pooling, the
    ``merge`` head on the tokens put back on the full grid."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not _reduces(self._tocom_state):
            return super().forward_features(x)
        return _reduced_features(self, self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _reduces(self._tocom_state):
            return super().forward(x)
        x = self.forward_features(x)
        if self.merger is not None:
            return _merged_head(self, self, x)
        return _avg(self, x) if self.global_pool == "avg" else x

    def forward_intermediates(self, x, *args, **kwargs):
        _intermediates_need(self, kwargs)
        return super().forward_intermediates(x, *args, **kwargs)


class ToComQwen3Classifier(ReducedModel):
    """Model mixin for ``Qwen3VitClassifier``: the encoder's blocks as the model's, reduced tokens as
    ``[B, N', C]``, size-weighted average pooling before the head; with the encoder's ``merge`` head,
    ``forward_features`` is timm's merger on the tokens put back on the full grid and timm's head follows."""

    blocks = property(lambda self: self.encoder.blocks)
    patch_embed = property(lambda self: self.encoder.patch_embed)
    grad_checkpointing = property(lambda self: self.encoder.grad_checkpointing)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not _reduces(self._tocom_state):
            return super().forward_features(x)
        x = _reduced_features(self, self.encoder, x)
        return x if self.encoder.merger is None else _merged_head(self, self.encoder, x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        merged = self.encoder.merger is not None  # (its tokens are the full grid's 2×2 cells: timm's own mean)
        if not _reduces(self._tocom_state) or self.global_pool != "avg" or merged:
            return super().forward_head(x, pre_logits)
        x = self.head_drop(self.norm(_avg(self, x.flatten(1, -2))))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, *args, **kwargs):
        _intermediates_need(self, kwargs)
        if not _reduces(self._tocom_state):
            return super().forward_intermediates(x, *args, **kwargs)
        self._tocom_state.begin().track = True  # the encoder's own intermediates, unmerged onto the grid
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
