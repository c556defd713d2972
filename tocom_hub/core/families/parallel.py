"""Parallel blocks of the classic family: timm ``ParallelScalingBlock`` (ViT-22B style: attention and MLP
side by side on the same normed input, one fused ``in_proj``). The MLP does not follow the attention, so
there is no "between": the reduction runs after the whole block, planned from the block's own keys or
class-token attention, and the next block sees the reduced tokens (with their size bias).

``ParallelThingsBlock`` ("three things", several attentions summed, then several MLPs summed) does have a
between: the reduction runs after the summed attentions, planned from all of them (ToMe: their keys side by
side; EViT: the mean of their class-token attentions), and the MLPs run on the reduced tokens."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock

from ..attention import attention_heads
from .base import MaskableBlock, token_info
from .diff import classic_attend

__all__ = ["ToComParallelScalingBlock", "ToComParallelThingsBlock", "parallel_qv", "things_qv"]


class ToComParallelScalingBlock(MaskableBlock, ParallelScalingBlock):
    """timm ``ParallelScalingBlock`` that removes ``r`` tokens after the block (see the module docstring)."""

    _tocom_no_dense = "its MLP runs beside the attention, so no MLP follows the attention to run on merged tokens"
    _tocom_plain = ParallelScalingBlock

    def _tocom_attention(self, x, ctx, need_info):  # the whole block: attention ∥ MLP
        state = self._tocom_state
        B, N, _ = x.shape
        y = self.in_proj(self.in_norm(x))
        x_mlp, q, k, v = torch.split(y, self.in_split, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        q = self.q_norm(q.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        x_attn = attention_heads(self, q, k, v, ctx.attn_bias, state.attention)
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


class ToComParallelThingsBlock(MaskableBlock, ParallelThingsBlock):
    """timm ``ParallelThingsBlock`` that removes ``r`` tokens between its summed attentions and summed MLPs."""

    _tocom_plain = ParallelThingsBlock

    def _tocom_attention(self, x, ctx, need_info):
        state = self._tocom_state
        outs, infos = [], []
        for branch in self.attns:
            out, info = classic_attend(branch.attn, branch.norm(x), ctx.attn_bias, state.attention, need_info,
                                       state.has_class_token)  # fmt: skip
            outs.append(branch.drop_path(branch.ls(out)))
            infos.append(info)
        x = x + torch.stack(outs).sum(dim=0)
        if not need_info:
            return x, None
        if need_info == "keys":  # every attention's keys side by side: tokens merge when alike in all of them
            return x, torch.cat(infos, dim=-1)
        return x, torch.stack(infos).mean(dim=0)

    def _tocom_mlp_branch(self, x):
        return torch.stack([ffn(x) for ffn in self.ffns]).sum(dim=0)


def things_qv(block):
    """A ToCom bank holds one q / v update per block; a ``ParallelThingsBlock`` has several attentions."""
    raise TypeError(
        f"ParallelThingsBlock has {block.num_parallel} attentions per block; a ToCom bank holds one q/v update "
        f"per block (token merging and pruning work, the bank does not)"
    )


def parallel_qv(block):
    """q / k / v rows of the fused ``in_proj`` (after the MLP's hidden rows) and the attention's ``proj``; a
    fused out projection (attention and MLP outputs into one Linear: ``DiffParallelScalingBlock``,
    ``fuse_out_proj=True``) has no separate attention ``proj``, and the bank refuses it."""
    if block.out_proj is not None:
        raise TypeError(
            f"{type(block).__name__} projects attention and MLP outputs through one fused `out_proj`; a ToCom bank "
            f"needs the attention's own proj (token merging and pruning work, the bank does not)"
        )
    hidden, d = block.in_split[0], block.in_split[1]
    where = {t: (block.in_proj, hidden + i * d, hidden + (i + 1) * d) for i, t in enumerate("qkv")}
    where["proj"] = (block.attn_out_proj, 0, None)
    return where
