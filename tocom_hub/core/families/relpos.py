"""The ``relpos`` family: timm ``VisionTransformerRelPos`` (``vision_transformer_relpos``) with ``RelPosBlock``
or ``ResPostRelPosBlock`` and ``RelPosAttention`` (fused ``qkv``, optional q/k norm): a relative-position
bias per block (``RelPosMlp`` in its ``cr`` / ``swin`` / ``rw`` modes, or ``RelPosBias``) or one shared by
every block, no class token (pool avg, size-weighted after merging) or a class token (pool token / avg).

Each token's bias row and column follow it (:mod:`.relbias`): gathered at the input token it sits at
(pruning: exact; merging: the destination keeps its own, ``positions="keep"``). ``RelPosMlp`` (every
registered model) is a function of the log-scaled patch offset, so ``positions="centroid"`` falls out: the
MLP is evaluated at the offsets between the merged tokens' size-weighted centroids (at the patch grid this is
timm's bias). ``RelPosBias`` is a table at integer offsets: the centroid rule is refused there.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers.pos_embed_rel import RelPosMlp
from timm.models.vision_transformer_relpos import (
    RelPosAttention,
    RelPosBlock,
    ResPostRelPosBlock,
    VisionTransformerRelPos,
)

from ..attention import attention_heads
from .base import Family, PostNormBranches, PreNormBranches, ReducedBlock, fused_qkv_rows
from .relbias import CENTROID_REFUSAL, PairBiasModel, pair_bias, pair_token_info

__all__ = ["RelPosFamily", "ToComRelPosBlock", "ToComResPostRelPosBlock", "relpos_attend"]


def mlp_bias_at(rel_pos: RelPosMlp, coords: torch.Tensor) -> torch.Tensor:
    """``RelPosMlp``'s bias between tokens at ``coords`` (``[B, N, 2]`` patch (row, col), prefix rows first)
    → ``[B, H, N, N]``: timm's log scaling of the offsets and its MLP; the prefix rows and columns are 0."""
    npt = rel_pos.prefix_tokens
    c = coords[:, npt:].float()
    d = c[:, :, None, :] - c[:, None, :, :]  # query − key, as timm's relative index
    if rel_pos.mode == "swin":
        win = rel_pos.pretrained_window_size if rel_pos.pretrained_window_size[0] > 0 else rel_pos.window_size
        d = d / (torch.tensor(win, dtype=d.dtype, device=d.device) - 1) * 8
        d = torch.sign(d) * torch.log2(1.0 + d.abs()) / math.log2(8)
    else:
        d = torch.sign(d) * torch.log(1.0 + d.abs())
    bias = rel_pos.bias_act(rel_pos.mlp(d.to(rel_pos.rel_coords_log.dtype)).permute(0, 3, 1, 2))
    if rel_pos.bias_gain is not None:
        bias = rel_pos.bias_gain * bias
    return F.pad(bias, [npt, 0, npt, 0]) if npt else bias


def relpos_attend(attn: RelPosAttention, x: torch.Tensor, shared: Optional[torch.Tensor], ctx, shared_module=None):
    """``RelPosAttention.forward`` on the current tokens with their gathered bias (the block's own, else the
    shared one, as timm chooses; recomputed at the centroids under ``positions="centroid"``) and ToMe's
    per-key ``log(size)``; returns ``(out, q, k, mask)``."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if ctx.coords is not None and (attn.rel_pos is not None or shared is not None):
        bias = mlp_bias_at(attn.rel_pos if attn.rel_pos is not None else shared_module, ctx.coords)
    else:
        bias = attn.rel_pos.get_bias() if attn.rel_pos is not None else shared
    mask = pair_bias(bias, ctx, q.dtype)
    out = attention_heads(attn, q, k, v, mask, "mask")  # a pairwise bias cannot be folded into q and k
    return attn.proj_drop(attn.proj(out)), q, k, mask


class _RelPosReduced(ReducedBlock):
    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        plain = self._tocom_plain.forward
        return self._tocom_forward(
            lambda: plain(self, x, shared_rel_pos=shared_rel_pos), x, False, shared_rel_pos=shared_rel_pos
        )

    def _tocom_branch(self, x, ctx, need_info, shared_rel_pos=None):
        state = self._tocom_state
        out, q, k, mask = relpos_attend(self.attn, x, shared_rel_pos, ctx, state.family.shared)
        info = pair_token_info(need_info, q, k, self.attn.scale, state.has_class_token, mask) if need_info else None
        return out, info


class ToComRelPosBlock(PreNormBranches, _RelPosReduced, RelPosBlock):
    """timm ``RelPosBlock`` that removes ``r`` tokens between attention and MLP."""

    _tocom_plain = RelPosBlock


class ToComResPostRelPosBlock(PostNormBranches, _RelPosReduced, ResPostRelPosBlock):
    """timm ``ResPostRelPosBlock`` (norm after each branch) that removes ``r`` tokens between them."""

    _tocom_plain = ResPostRelPosBlock


class RelPosFamily(Family):
    name = "relpos"
    model_classes = (VisionTransformerRelPos,)
    model_mixin = PairBiasModel
    blocks = {RelPosBlock: ToComRelPosBlock, ResPostRelPosBlock: ToComResPostRelPosBlock}

    def __init__(self, model=None) -> None:
        self.shared = getattr(model, "shared_rel_pos", None)
        own = [] if model is None else [b.attn.rel_pos for b in model.blocks if b.attn.rel_pos is not None]
        self.biases = own + ([self.shared] if self.shared is not None else [])
        self.positional = bool(self.biases)
        self.window = None if not self.biases else tuple(self.biases[0].window_size)

    def check(self, model, positions):
        name = type(model).__name__
        self.check_attentions(model, (RelPosAttention,))
        if positions == "centroid" and any(not isinstance(b, RelPosMlp) for b in self.biases):
            raise ValueError(f"{name}: {CENTROID_REFUSAL} (RelPosBias is a table; RelPosMlp takes the centroid)")

    def initial_coords(self, ctx, x):
        h, w = self.window
        grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1).reshape(-1, 2)
        grid = grid.to(device=x.device, dtype=torch.float32)
        coords = torch.cat([grid.new_zeros(x.shape[1] - grid.shape[0], 2), grid], dim=0)
        return coords.unsqueeze(0).expand(x.shape[0], -1, -1)

    def qv(self, block):
        attn = block.attn
        return fused_qkv_rows(attn.qkv, attn.proj)
