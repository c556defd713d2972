"""Differential attention in the classic family (timm ``DiffAttention`` in a ``Block``, and the parallel
``DiffParallelScalingBlock``): ``softmax(q₁k₁ᵀ·s + b) v − λ·softmax(q₂k₂ᵀ·s + b) v`` over head pairs, then
the sub-norm. ToMe's proportional-attention bias ``b = log(size)`` is a per-key bias, so it enters *both*
softmax maps (each is an attention over the same merged keys). For EViT the class-token attentiveness is
the differential map's class row, ``mean_h(a₁ − λ a₂)``; ToMe matches on the keys of both maps.

q, k and v live where timm's ``Attention`` has them (fused ``qkv``: ``[q | k | v]`` rows; ``in_proj``'s
rows after the MLP's for the parallel block), so the bank needs nothing new."""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers import DiffAttention
from timm.models.vision_transformer import DiffParallelScalingBlock

from ..attention import attend, key_bias_attention
from ..prune import cls_attention
from .base import MaskableBlock, token_info

__all__ = ["diff_attention", "diff_info", "diff_attend", "classic_attend", "ToComDiffParallelScalingBlock"]


def diff_attention(q, k, v, lam, bias, scale, dropout_p, fused, form="auto", attn_drop=None) -> torch.Tensor:
    """``a₁ v − λ a₂ v`` for ``q``, ``k``: ``[B, 2H, N, d]`` (head ``2h`` and ``2h+1`` form pair ``h``), ``v``:
    ``[B, H, N, 2d]``; ``bias`` (``[B, 1, 1, N]`` or ``None``) is added to both maps' logits."""
    B, heads2, N, d = q.shape
    q, k = q.reshape(B, heads2 // 2, 2, N, d), k.reshape(B, heads2 // 2, 2, N, d)
    one = key_bias_attention(q[:, :, 0], k[:, :, 0], v, bias, scale, dropout_p, fused, form, attn_drop)
    two = key_bias_attention(q[:, :, 1], k[:, :, 1], v, bias, scale, dropout_p, fused, form, attn_drop)
    return one - lam * two


def diff_info(kind: str, q: torch.Tensor, k: torch.Tensor, lam: torch.Tensor, scale: float, has_class_token: bool):
    """What a reducer plans from: the keys of both maps (``"keys"``), or the class row of the differential
    map averaged over the head pairs (``"cls_attention"``)."""
    if kind == "keys":
        return k.sum(dim=1)
    B, heads2, N, d = q.shape
    with torch.no_grad():
        q, k = q.reshape(B, heads2 // 2, 2, N, d), k.reshape(B, heads2 // 2, 2, N, d)
        one = cls_attention(q[:, :, 0], k[:, :, 0], scale, has_class_token)
        two = cls_attention(q[:, :, 1], k[:, :, 1], scale, has_class_token)
        return one - lam.float() * two


def _split_heads(q, k, v, num_heads, head_dim):
    B, N = q.shape[:2]
    q = q.reshape(B, N, 2 * num_heads, head_dim).transpose(1, 2)
    k = k.reshape(B, N, 2 * num_heads, head_dim).transpose(1, 2)
    v = v.reshape(B, N, num_heads, 2 * head_dim).transpose(1, 2)
    return q, k, v


def diff_attend(attn: DiffAttention, x: torch.Tensor, bias: Optional[torch.Tensor], form="auto"):
    """timm ``DiffAttention.forward`` with a per-key bias in both maps; returns ``(out, q, k, λ)``."""
    B, N, C = x.shape
    q, k, v = _split_heads(*attn.qkv(x).chunk(3, dim=2), attn.num_heads, attn.head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    lam = attn._compute_lambda().type_as(q)
    dropout_p = attn.attn_drop_p if attn.training else 0.0
    out = diff_attention(q, k, v, lam, bias, attn.scale, dropout_p, attn.fused_attn, form, attn.attn_drop)
    out = (attn.sub_norm(out) * (1 - attn.lambda_init)).transpose(1, 2).reshape(B, N, C)
    return attn.proj_drop(attn.proj(attn.norm(out))), q, k, lam


def classic_attend(attn, x, bias, form, need_info, has_class_token):
    """The classic family's attention module (timm ``Attention`` or ``DiffAttention``) on ``x`` with a per-key
    bias: ``(out, info)``, ``info`` for the reducer as :func:`~.base.token_info` / :func:`diff_info`."""
    if isinstance(attn, DiffAttention):
        out, q, k, lam = diff_attend(attn, x, bias, form)
        return out, (diff_info(need_info, q, k, lam, attn.scale, has_class_token) if need_info else None)
    if hasattr(form, "attend"):  # an object that replaces the whole attention (benchmarks' variants)
        out, q, k = form.attend(attn, x, bias)
    else:
        out, q, k = attend(attn, x, bias, form)
    return out, (token_info(need_info, q, k, attn.scale, has_class_token) if need_info else None)


class ToComDiffParallelScalingBlock(MaskableBlock, DiffParallelScalingBlock):
    """timm ``DiffParallelScalingBlock`` that removes ``r`` tokens after the block (its MLP runs beside the
    attention, as in :class:`~.parallel.ToComParallelScalingBlock`)."""

    _tocom_no_dense = "its MLP runs beside the attention, so no MLP follows the attention to run on merged tokens"
    _tocom_plain = DiffParallelScalingBlock

    def _tocom_attention(self, x, ctx, need_info):  # the whole block: differential attention ∥ MLP
        state = self._tocom_state
        B, N, C = x.shape
        x_mlp, q, k, v = torch.split(self.in_proj(self.in_norm(x)), self.in_split, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        q, k, v = _split_heads(q, k, v, self.num_heads, self.head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        lam = self._compute_lambda().type_as(q)
        dropout_p = self.attn_drop_p if self.training else 0.0
        x_attn = diff_attention(q, k, v, lam, ctx.attn_bias, self.scale, dropout_p, self.fused_attn, state.attention,
                                self.attn_drop)  # fmt: skip
        x_attn = (self.sub_norm(x_attn) * (1 - self.lambda_init)).transpose(1, 2).reshape(B, N, C)
        y = self.out_proj(torch.cat((x_attn, self.mlp_drop(self.mlp_act(x_mlp))), dim=-1))
        x = x + self.drop_path(self.ls(y))
        info = diff_info(need_info, q, k, lam, self.scale, state.has_class_token) if need_info else None
        return x, info

    def _tocom_mlp(self, x):  # the MLP ran in parallel with the attention
        return x
