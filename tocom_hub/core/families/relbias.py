"""Relative-position bias on reduced tokens, shared by the ``beit`` and ``relpos`` families.

A relative-position bias is one logit per (query, key) pair and head, built by timm for the full token
sequence (prefix + patch grid): ``[1, H, N_in, N_in]`` (or ``[H, N_in, N_in]``). After a reduction every
token sits at one input token (``ForwardContext.index``: its own place when pruned, the destination's place
when merged under the ``"keep"`` rule), so its bias row and column are *gathered* from the full table:
pruning is exact (the kept pairs see exactly timm's bias). EViT's fused token stands for many places and
gets no position: a zero bias row and column. EViT ranks by the class token's attention as computed, its bias
row included. The ``"centroid"`` rule is refused for a bias *table* (BEiT, ``RelPosBias``): it is learned at
integer offsets, so a fractional centroid has no bias; ``RelPosMlp`` is evaluated there (:mod:`.relpos`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import ReducedModel, token_info

__all__ = ["gather_pair_bias", "pair_bias", "pair_token_info", "fused_qkv", "PairBiasModel", "CENTROID_REFUSAL"]

CENTROID_REFUSAL = (
    "positions='centroid' is not supported with a relative-position bias table: it is learned at integer patch "
    "offsets, so a merged token's fractional centroid has none; use positions='keep' (the destination keeps its "
    "own bias row and column)"
)


def gather_pair_bias(bias: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """The pair bias of the current tokens: ``bias`` (``[1 | B, H, N_in, N_in]`` or ``[H, N_in, N_in]``) at
    rows and columns ``index`` (``[B, N]``, input token of each token; ``-1``: no position, zero bias)
    → ``[B, H, N, N]``; ``index=None`` (nothing reduced yet) gives ``bias`` as it is."""
    if bias.ndim == 3:
        bias = bias.unsqueeze(0)
    if index is None:
        return bias
    batch, num = index.shape
    heads, n_in = bias.shape[1], bias.shape[-1]
    bias = bias.expand(batch, heads, n_in, n_in)
    idx = index.clamp_min(0)
    rows = bias.gather(2, idx.view(batch, 1, num, 1).expand(batch, heads, num, n_in))
    out = rows.gather(3, idx.view(batch, 1, 1, num).expand(batch, heads, num, num))
    placed = index >= 0  # (no data-dependent branch: torch.compile traces this without a break)
    both = placed.view(batch, 1, num, 1) & placed.view(batch, 1, 1, num)
    return out.masked_fill(~both, 0.0)


def pair_bias(bias: Optional[torch.Tensor], ctx, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The attention mask of a reduced block: the gathered pair bias plus ToMe's per-key ``log(size)``."""
    key = ctx.attn_bias
    if bias is None:
        return key
    out = gather_pair_bias(bias, ctx.index).to(dtype)
    return out if key is None else out + key.to(dtype)


def pair_token_info(kind: str, q, k, scale: float, has_class_token: bool, mask: Optional[torch.Tensor]):
    """:func:`~.base.token_info` with the bias: EViT's attentiveness is the class token's attention as the block
    computed it, its relative-position bias row included (without a class token: the mean query's
    ``softmax(q·k)``, which has no position, as in every family). In timm's BEiT and relpos models the class
    token's row holds one value for every patch key, so the ranking is q·k's up to rounding."""
    if kind != "cls_attention" or not has_class_token or mask is None:
        return token_info(kind, q, k, scale, has_class_token)
    with torch.no_grad():
        logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1) + mask[:, :, :1]  # [B, H, 1, N]
        return logits.float().softmax(dim=-1).mean(dim=1)[:, 0]


def fused_qkv(attn, x: torch.Tensor) -> torch.Tensor:
    """``attn.qkv`` on ``x`` with BEiT's separate q / v bias (k has none), as timm computes it."""
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is None:
        return attn.qkv(x)
    qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if attn.qkv_bias_separate:
        return attn.qkv(x) + qkv_bias
    return F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)


class PairBiasModel(ReducedModel):
    """Model mixin of BEiT and the relative-position ViTs: their ``forward_head`` averages the patch tokens
    inline; after merging, the average is weighted by token size."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        ctx = self._tocom_state.last()
        size = None if ctx is None else ctx.size
        if self.global_pool != "avg" or size is None:
            return super().forward_head(x, pre_logits=pre_logits)
        start = self.num_prefix_tokens
        weight = size[:, start:] / size[:, start:].sum(dim=1, keepdim=True)
        x = (x[:, start:] * weight.to(x.dtype)).sum(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)
