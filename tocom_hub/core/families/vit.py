"""The classic family: timm ``VisionTransformer`` (and subclasses: distilled, hybrid, ``vitamin``'s
``VisionTransformer``-based models) with timm's ``Block`` or ``ResPostBlock`` and ``Attention`` (fused qkv)."""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, ParallelScalingBlock, ResPostBlock, VisionTransformer

from ..attention import attend
from .base import Family, ReducedBlock, ReducedModel, size_pool, token_info
from .parallel import ToComParallelScalingBlock, parallel_qv

__all__ = ["ViTFamily", "ToComBlock", "ToComViT"]


class ToComBlock(ReducedBlock, Block):
    """timm ``Block`` that removes ``r`` tokens between attention and MLP (see :func:`tocom_hub.patch`)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        masked = attn_mask is not None or is_causal
        return self._tocom_forward(lambda: Block.forward(self, x, attn_mask=attn_mask, is_causal=is_causal), x, masked)

    def _tocom_attention(self, x, ctx, need_info):
        state = self._tocom_state
        form = state.attention
        if hasattr(form, "attend"):  # an object that replaces the whole attention (benchmarks' variants)
            out, q, k = form.attend(self.attn, self.norm1(x), ctx.attn_bias)
        else:
            out, q, k = attend(self.attn, self.norm1(x), ctx.attn_bias, form)
        x = x + self.drop_path1(self.ls1(out))
        info = token_info(need_info, q, k, self.attn.scale, state.has_class_token) if need_info else None
        return x, info

    def _tocom_mlp_branch(self, x):
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ToComResPostBlock(ReducedBlock, ResPostBlock):
    """timm ``ResPostBlock`` (norm after each branch) that removes ``r`` tokens between attention and MLP."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        masked = attn_mask is not None or is_causal
        return self._tocom_forward(
            lambda: ResPostBlock.forward(self, x, attn_mask=attn_mask, is_causal=is_causal), x, masked
        )

    def _tocom_attention(self, x, ctx, need_info):
        state = self._tocom_state
        out, q, k = attend(self.attn, x, ctx.attn_bias, state.attention)
        x = x + self.drop_path1(self.norm1(out))
        info = token_info(need_info, q, k, self.attn.scale, state.has_class_token) if need_info else None
        return x, info

    def _tocom_mlp_branch(self, x):
        return self.drop_path2(self.norm2(self.mlp(x)))


class ToComViT(ReducedModel):
    """Model mixin of the classic family: size-weighted average pooling, log-size bias in a MAP head."""

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        state = self._tocom_state
        ctx = state.last()
        if ctx is not None:
            start = 0 if self.pool_include_prefix else self.num_prefix_tokens
            pool_type = self.global_pool if pool_type is None else pool_type
            pooled = size_pool(self, x, ctx, pool_type, start, state.prop_attn)
            if pooled is not None:
                return pooled
        return super().pool(x, pool_type)


class ViTFamily(Family):
    name = "vit"
    model_classes = (VisionTransformer,)
    model_mixin = ToComViT
    blocks = {Block: ToComBlock, ResPostBlock: ToComResPostBlock, ParallelScalingBlock: ToComParallelScalingBlock}

    def check(self, model, positions):
        name = type(model).__name__
        for i, blk in enumerate(model.blocks):
            if isinstance(blk, ParallelScalingBlock):
                continue  # its attention is inline (no `attn` module)
            if type(blk.attn) is not Attention:
                raise TypeError(
                    f"{name}: block {i} uses {type(blk.attn).__name__}; the classic ViT family needs timm's "
                    f"`Attention` (fused qkv)"
                )

    def qv(self, block):
        if isinstance(block, ParallelScalingBlock):
            return parallel_qv(block)
        qkv, d = block.attn.qkv, block.attn.qkv.out_features // 3
        return {"q": (qkv, 0, d), "k": (qkv, d, 2 * d), "v": (qkv, 2 * d, 3 * d), "proj": (block.attn.proj, 0, None)}
