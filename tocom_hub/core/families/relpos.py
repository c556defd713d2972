"""The ``relpos`` family: timm ``VisionTransformerRelPos`` (``vision_transformer_relpos``) with ``RelPosBlock``
or ``ResPostRelPosBlock`` and ``RelPosAttention`` (fused ``qkv``, optional q/k norm): a relative-position
bias per block (``RelPosMlp`` in its ``cr`` / ``swin`` / ``rw`` modes, or ``RelPosBias``) or one shared by
every block, no class token (pool avg, size-weighted after merging) or a class token (pool token / avg).

Each token's bias row and column follow it (:mod:`.relbias`): gathered at the input token it sits at
(pruning: exact; merging: the destination keeps its own, ``positions="keep"``).
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.models.vision_transformer_relpos import (
    RelPosAttention,
    RelPosBlock,
    ResPostRelPosBlock,
    VisionTransformerRelPos,
)

from ..attention import key_bias_attention
from .base import Family, ReducedBlock
from .relbias import CENTROID_REFUSAL, PairBiasModel, pair_bias, pair_token_info

__all__ = ["RelPosFamily", "ToComRelPosBlock", "ToComResPostRelPosBlock", "relpos_attend"]


def relpos_attend(attn: RelPosAttention, x: torch.Tensor, shared: Optional[torch.Tensor], ctx):
    """``RelPosAttention.forward`` on the current tokens with their gathered bias (the block's own, else the
    shared one, as timm chooses) and ToMe's per-key ``log(size)``; returns ``(out, q, k, mask)``."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = attn.rel_pos.get_bias() if attn.rel_pos is not None else shared
    mask = pair_bias(bias, ctx, q.dtype)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    # a pairwise bias cannot be folded into q and k: it always goes to SDPA as a mask
    out = key_bias_attention(q, k, v, mask, attn.scale, dropout_p, attn.fused_attn, "mask", attn.attn_drop)
    out = out.transpose(1, 2).reshape(B, N, C)
    return attn.proj_drop(attn.proj(out)), q, k, mask


class _RelPosReduced(ReducedBlock):
    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        plain = self._tocom_plain.forward
        return self._tocom_forward(
            lambda: plain(self, x, shared_rel_pos=shared_rel_pos), x, False, shared_rel_pos=shared_rel_pos
        )

    def _tocom_branch(self, x, ctx, need_info, shared):
        state = self._tocom_state
        out, q, k, mask = relpos_attend(self.attn, x, shared, ctx)
        info = pair_token_info(need_info, q, k, self.attn.scale, state.has_class_token, mask) if need_info else None
        return out, info


class ToComRelPosBlock(_RelPosReduced, RelPosBlock):
    """timm ``RelPosBlock`` that removes ``r`` tokens between attention and MLP."""

    _tocom_plain = RelPosBlock

    def _tocom_attention(self, x, ctx, need_info, shared_rel_pos=None):
        out, info = self._tocom_branch(self.norm1(x), ctx, need_info, shared_rel_pos)
        return x + self.drop_path1(self.ls1(out)), info

    def _tocom_mlp_branch(self, x):
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ToComResPostRelPosBlock(_RelPosReduced, ResPostRelPosBlock):
    """timm ``ResPostRelPosBlock`` (norm after each branch) that removes ``r`` tokens between them."""

    _tocom_plain = ResPostRelPosBlock

    def _tocom_attention(self, x, ctx, need_info, shared_rel_pos=None):
        out, info = self._tocom_branch(x, ctx, need_info, shared_rel_pos)
        return x + self.drop_path1(self.norm1(out)), info

    def _tocom_mlp_branch(self, x):
        return self.drop_path2(self.norm2(self.mlp(x)))


class RelPosFamily(Family):
    name = "relpos"
    model_classes = (VisionTransformerRelPos,)
    model_mixin = PairBiasModel
    blocks = {RelPosBlock: ToComRelPosBlock, ResPostRelPosBlock: ToComResPostRelPosBlock}

    def __init__(self, model=None) -> None:
        shared = getattr(model, "shared_rel_pos", None) is not None
        own = model is not None and any(b.attn.rel_pos is not None for b in model.blocks)
        self.positional = shared or own

    def check(self, model, positions):
        name = type(model).__name__
        for i, blk in enumerate(model.blocks):
            if type(blk.attn) is not RelPosAttention:
                raise TypeError(f"{name}: block {i} uses {type(blk.attn).__name__}; the relpos family needs "
                                f"RelPosAttention")  # fmt: skip
        if positions == "centroid" and self.positional:
            raise ValueError(f"{name}: {CENTROID_REFUSAL}")

    def qv(self, block):
        attn = block.attn
        qkv, d = attn.qkv, attn.qkv.out_features // 3
        return {"q": (qkv, 0, d), "k": (qkv, d, 2 * d), "v": (qkv, 2 * d, 3 * d), "proj": (attn.proj, 0, None)}
