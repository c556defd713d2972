"""The ``beit`` family: timm ``Beit`` (BEiT, BEiT-v2) with its own ``Block`` / ``Attention``: fused ``qkv``
with separate q / v bias, a relative-position bias per block and / or one shared by every block
(``RelativePositionBias``), class token, pool avg (size-weighted after merging) or token.

Each token's bias row and column follow it (:mod:`.relbias`): gathered at the input token it sits at
(pruning: exact; merging: the destination keeps its own, ``positions="keep"``).
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.models.beit import Attention, Beit, Block

from ..attention import attention_heads
from .base import Family, GammaPreNormBranches, fused_qkv_rows
from .relbias import CENTROID_REFUSAL, PairBiasModel, fused_qkv, pair_bias, pair_token_info

__all__ = ["BeitFamily", "ToComBeitBlock", "beit_attend"]


def beit_attend(attn: Attention, x: torch.Tensor, shared: Optional[torch.Tensor], ctx, form="mask"):
    """BEiT ``Attention.forward`` on the current tokens with their gathered relative-position bias and ToMe's
    per-key ``log(size)``; returns ``(out, q, k, mask)``."""
    B, N, _ = x.shape
    q, k, v = fused_qkv(attn, x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
    if shared is not None:
        bias = shared if bias is None else bias + shared
    mask = pair_bias(bias, ctx, q.dtype)
    out = attention_heads(attn, q, k, v, mask, "mask")  # a pairwise bias cannot be folded into q and k
    return attn.proj_drop(attn.proj(out)), q, k, mask


class ToComBeitBlock(GammaPreNormBranches, Block):
    """timm BEiT ``Block`` that removes ``r`` tokens between attention and MLP."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        shared = shared_rel_pos_bias
        return self._tocom_forward(
            lambda: Block.forward(self, x, shared_rel_pos_bias=shared), x, False, shared_rel_pos_bias=shared
        )

    def _tocom_branch(self, x, ctx, need_info, shared_rel_pos_bias=None):
        state = self._tocom_state
        out, q, k, mask = beit_attend(self.attn, x, shared_rel_pos_bias, ctx)
        info = pair_token_info(need_info, q, k, self.attn.scale, state.has_class_token, mask) if need_info else None
        return out, info


class BeitFamily(Family):
    name = "beit"
    model_classes = (Beit,)
    model_mixin = PairBiasModel
    blocks = {Block: ToComBeitBlock}

    def __init__(self, model=None) -> None:
        shared = getattr(model, "rel_pos_bias", None) is not None
        own = model is not None and any(b.attn.relative_position_bias_table is not None for b in model.blocks)
        self.positional = shared or own

    def check(self, model, positions):
        self.check_attentions(model, (Attention,), needs="BEiT's Attention")
        if positions == "centroid" and self.positional:
            raise ValueError(f"{type(model).__name__}: {CENTROID_REFUSAL}")

    def unmerged_overrides(self, block):
        attn = block.attn  # F.linear on attn.qkv.weight would bypass the bank's Linear: qkv(x) + bias instead
        if getattr(attn, "q_bias", None) is not None and not attn.qkv_bias_separate:
            return [(attn, "qkv_bias_separate", True)]
        return []

    def qv(self, block):
        attn = block.attn
        return fused_qkv_rows(attn.qkv, attn.proj)
