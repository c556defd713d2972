"""Parallel blocks of the classic family: timm ``ParallelScalingBlock`` (ViT-22B style: attention and MLP
side by side on the same normed input, one fused ``in_proj``). The MLP does not follow the attention, so
there is no "between": the reduction runs after the whole block, planned from the block's own keys or
class-token attention, and the next block sees the reduced tokens (with their size bias)."""

from __future__ import annotations

from typing import Optional

import torch
from timm.models.vision_transformer import ParallelScalingBlock

from ..attention import key_bias_attention
from .base import ReducedBlock, token_info

__all__ = ["ToComParallelScalingBlock", "parallel_qv"]


class ToComParallelScalingBlock(ReducedBlock, ParallelScalingBlock):
    """timm ``ParallelScalingBlock`` that removes ``r`` tokens after the block (see the module docstring)."""

    _tocom_no_dense = "its MLP runs beside the attention, so no MLP follows the attention to run on merged tokens"

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        masked = attn_mask is not None or is_causal
        return self._tocom_forward(
            lambda: ParallelScalingBlock.forward(self, x, attn_mask=attn_mask, is_causal=is_causal), x, masked
        )

    def _tocom_attention(self, x, ctx, need_info):  # the whole block: attention ∥ MLP
        state = self._tocom_state
        B, N, C = x.shape
        y = self.in_proj(self.in_norm(x))
        x_mlp, q, k, v = torch.split(y, self.in_split, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        q = self.q_norm(q.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x_attn = key_bias_attention(q, k, v, ctx.attn_bias, self.scale, dropout_p, self.fused_attn, state.attention,
                                    self.attn_drop)  # fmt: skip
        x_attn = x_attn.transpose(1, 2).reshape(B, N, C)
        x_mlp = self.mlp_drop(self.mlp_act(x_mlp))
        if self.out_proj is not None:
            y = self.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        x = x + self.drop_path(self.ls(y))
        info = token_info(need_info, q, k, self.scale, state.has_class_token) if need_info else None
        return x, info

    def _tocom_mlp(self, x):  # the MLP ran in parallel with the attention
        return x


def parallel_qv(block):
    """q / k / v rows of the fused ``in_proj`` (after the MLP's hidden rows); ``proj`` is the attention's
    part only when the out projections are separate."""
    hidden, d = block.in_split[0], block.in_split[1]
    where = {t: (block.in_proj, hidden + i * d, hidden + (i + 1) * d) for i, t in enumerate("qkv")}
    where["proj"] = (block.attn_out_proj, 0, None) if block.out_proj is None else (block.out_proj, 0, None)
    return where
