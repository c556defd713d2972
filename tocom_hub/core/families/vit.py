"""The classic family: timm ``VisionTransformer`` (and subclasses: distilled, hybrid, ``vitamin``'s
``VisionTransformer``-based models) with timm's ``Block`` or ``ResPostBlock`` and ``Attention`` (fused qkv)
or ``DiffAttention`` (differential attention, :mod:`.diff`), and the parallel blocks (:mod:`.parallel`)."""

from __future__ import annotations

from timm.layers import Attention, DiffAttention
from timm.models.vision_transformer import (
    Block,
    DiffParallelScalingBlock,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)

from .base import Family, MaskableBlock, PostNormBranches, PreNormBranches, SizePoolModel, fused_qkv_rows
from .diff import ToComDiffParallelScalingBlock, classic_attend
from .parallel import ToComParallelScalingBlock, ToComParallelThingsBlock, parallel_qv, things_qv

_ATTENTIONS = (Attention, DiffAttention)

__all__ = ["ViTFamily", "ToComBlock", "ToComViT"]


class _ClassicReduced(MaskableBlock):
    def _tocom_branch(self, x, ctx, need_info):
        state = self._tocom_state
        return classic_attend(self.attn, x, ctx.attn_bias, state.attention, need_info, state.has_class_token)


class ToComBlock(PreNormBranches, _ClassicReduced, Block):
    """timm ``Block`` that removes ``r`` tokens between attention and MLP (see :func:`tocom_hub.patch`)."""

    _tocom_plain = Block


class ToComResPostBlock(PostNormBranches, _ClassicReduced, ResPostBlock):
    """timm ``ResPostBlock`` (norm after each branch) that removes ``r`` tokens between attention and MLP."""

    _tocom_plain = ResPostBlock


class ToComViT(SizePoolModel):
    """Model mixin of the classic family: size-weighted average pooling, log-size bias in a MAP head."""

    def _tocom_pool_start(self):
        return 0 if self.pool_include_prefix else self.num_prefix_tokens


class ViTFamily(Family):
    name = "vit"
    model_classes = (VisionTransformer,)
    model_mixin = ToComViT
    blocks = {
        Block: ToComBlock,
        ResPostBlock: ToComResPostBlock,
        ParallelScalingBlock: ToComParallelScalingBlock,
        DiffParallelScalingBlock: ToComDiffParallelScalingBlock,
        ParallelThingsBlock: ToComParallelThingsBlock,
    }

    def check(self, model, positions):
        name = type(model).__name__
        for i, blk in enumerate(model.blocks):
            if isinstance(blk, (ParallelScalingBlock, DiffParallelScalingBlock)):
                continue  # its attention is inline (no `attn` module)
            attns = [a.attn for a in blk.attns] if isinstance(blk, ParallelThingsBlock) else [blk.attn]
            for attn in attns:
                if type(attn) not in _ATTENTIONS:
                    raise TypeError(
                        f"{name}: block {i} uses {type(attn).__name__}; the classic ViT family needs timm's "
                        f"`Attention` (fused qkv) or `DiffAttention`"
                    )

    def qv(self, block):
        if isinstance(block, (ParallelScalingBlock, DiffParallelScalingBlock)):
            return parallel_qv(block)
        if isinstance(block, ParallelThingsBlock):
            return things_qv(block)
        return fused_qkv_rows(block.attn.qkv, block.attn.proj)
