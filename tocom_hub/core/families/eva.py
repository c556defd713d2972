"""The ``eva`` family: timm ``Eva`` (EVA-02, EVA, DINOv3, Perception Encoder, RoPE-ViT, …) with
``EvaBlock`` / ``EvaBlockPostNorm`` and ``EvaAttention`` / ``AttentionRope``: fused ``qkv`` (with EVA's
q/v bias) or separate ``q_proj``/``k_proj``/``v_proj`` (grouped k/v heads too), RoPE ``RotaryEmbeddingCat``,
``RotaryEmbeddingDinoV3``, ``RotaryEmbeddingMixed`` or none, any number of prefix tokens, pool avg / token / map.

Tokens carry their rope rows: after a reduction each token's rows are gathered from the block's rope by
the input token it sits at (pruning, and merging with ``positions="keep"``), or recomputed at its
size-weighted centroid (``positions="centroid"``; the rope angles are affine in the patch coordinate).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope
from timm.layers.pos_embed_sincos import (
    RotaryEmbeddingCat,
    RotaryEmbeddingDinoV3,
    RotaryEmbeddingMixed,
    _build_grid,
    _rope_layout,
    apply_rot_embed_cat,
    get_mixed_freqs,
    get_mixed_grid,
)
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm

from ..attention import attention_heads
from .base import (
    Family,
    GammaPreNormBranches,
    PostNormBranches,
    ReducedBlock,
    SizePoolModel,
    fused_qkv_rows,
    token_info,
)

__all__ = ["EvaFamily", "ToComEvaBlock", "ToComEvaBlockPostNorm", "ToComEva", "eva_attend"]


# -- rope: per-token coordinates and the rotation at them, one small table per rope class -------------


def _cat_grid(rope, shape):
    g = _build_grid(list(shape), grid_type=rope.grid_type, ref_feat_shape=rope.ref_feat_shape,
                    grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing,
                    normalize_coords=rope.normalize_coords, device=rope.bands.device)  # fmt: skip
    return g.reshape(-1, 2)


def _cat_embed(rope, coords, block):  # coords [B, N, 2] → [B, 1, N, 2·dim]
    pos = (coords.float().unsqueeze(-1) * rope.bands.float()).flatten(-2)
    half = rope.rotate_half
    return torch.cat([_rope_layout(pos.sin(), half), _rope_layout(pos.cos(), half)], dim=-1).unsqueeze(1)


def _dino_grid(rope, shape):
    g = _build_grid(list(shape), grid_type="centered", grid_offset=rope.grid_offset,
                    grid_indexing=rope.grid_indexing, normalize_coords=rope.normalize_coords, ndim=2)  # fmt: skip
    return g.reshape(-1, 2).to(rope.periods.device)


def _dino_embed(rope, coords, block):
    batch, num = coords.shape[:2]
    sin, cos = rope._get_pos_embed_from_coords(coords.reshape(batch * num, 2))
    return torch.cat([sin, cos], dim=-1).view(batch, 1, num, -1)


def _mixed_grid(rope, shape):
    t_x, t_y = get_mixed_grid(list(shape), grid_indexing=rope.grid_indexing, device=rope.freqs.device)
    return torch.stack([t_x, t_y], dim=-1)


def _mixed_embed(rope, coords, block):  # → [B, H, N, 2·head_dim], this block's learned frequencies
    batch, num = coords.shape[:2]
    flat = coords.reshape(batch * num, 2)
    emb = get_mixed_freqs(rope.freqs[:, block], flat[:, 0], flat[:, 1])  # [H, B·N, 2·hd]
    return emb.view(emb.shape[0], batch, num, -1).transpose(0, 1)


ROPES = {
    RotaryEmbeddingCat: (_cat_grid, _cat_embed),
    RotaryEmbeddingDinoV3: (_dino_grid, _dino_embed),
    RotaryEmbeddingMixed: (_mixed_grid, _mixed_embed),
}


def _gather_rows(rope: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rope rows of the tokens at ``rows`` (``[B, N]``, ``-1``: no position, the identity rotation).
    ``rope``: ``[N_in, C]`` → ``[B, 1, N, C]``; ``[H, N_in, C]`` (mixed) → ``[B, H, N, C]``; per sample
    ``[B, H or 1, N_in, C]`` (NaFlexViT, patch dropout) → ``[B, H or 1, N, C]``."""
    if rope.ndim == 2:
        out = rope[rows.clamp_min(0)].unsqueeze(1)
    elif rope.ndim == 3:
        out = rope[:, rows.clamp_min(0)].transpose(0, 1)
    else:
        heads, channels = rope.shape[1], rope.shape[-1]
        where = rows.clamp_min(0)[:, None, :, None].expand(rope.shape[0], heads, rows.shape[1], channels)
        out = rope.gather(2, where)
    half = out.shape[-1] // 2
    ident = torch.cat([torch.zeros_like(out[..., :half]), torch.ones_like(out[..., half:])], -1)  # sin 0, cos 1
    return torch.where(rows.view(rows.shape[0], 1, -1, 1) >= 0, out, ident)


# -- attention -----------------------------------------------------------------------------------------


def eva_attend(attn, x: torch.Tensor, rope: Optional[torch.Tensor], bias: Optional[torch.Tensor], form="auto"):
    """``EvaAttention`` / ``AttentionRope`` forward with a per-key bias; returns ``(out, q, k)`` with the
    rotated keys as the attention used them (grouped k/v expanded to every query head)."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    if attn.qkv is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        q = attn.q_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = attn.norm(attention_heads(attn, q, k, v, bias, form))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), q, k


class _EvaReduced(ReducedBlock):
    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        plain = self._tocom_plain.forward
        masked = attn_mask is not None or is_causal
        return self._tocom_forward(
            lambda: plain(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal), x, masked, rope=rope
        )

    def _tocom_rope(self, ctx, rope):
        if rope is None:
            return None
        state = self._tocom_state
        if ctx.coords is not None:
            return state.family.rope_embed(ctx.coords[:, state.num_prefix :], self._tocom_index).to(rope.dtype)
        if ctx.index is None:
            return rope
        return _gather_rows(rope, ctx.index[:, state.num_prefix :] - state.num_prefix)

    def _tocom_branch(self, x, ctx, need_info, rope=None):
        state = self._tocom_state
        out, q, k = eva_attend(self.attn, x, self._tocom_rope(ctx, rope), ctx.attn_bias, state.attention)
        info = token_info(need_info, q, k, self.attn.scale, state.has_class_token) if need_info else None
        return out, info


class ToComEvaBlock(GammaPreNormBranches, _EvaReduced, EvaBlock):
    """timm ``EvaBlock`` that removes ``r`` tokens between attention and MLP."""

    _tocom_plain = EvaBlock


class ToComEvaBlockPostNorm(PostNormBranches, _EvaReduced, EvaBlockPostNorm):
    """timm ``EvaBlockPostNorm`` (norm after each branch) that removes ``r`` tokens between them."""

    _tocom_plain = EvaBlockPostNorm


class ToComEva(SizePoolModel):
    """Model mixin of the eva family: records the patch grid of the forward, size-aware pooling."""

    def _pos_embed(self, x):
        ctx = self._tocom_state.context()
        ctx.grid = (x.shape[1], x.shape[2]) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        return super()._pos_embed(x)

    def _tocom_pool_start(self):
        return 0 if self.attn_pool is not None else self.num_prefix_tokens


class RopeFamily(Family):
    """A family whose model may carry one timm rope module (``model.rope``, a class of :data:`ROPES`)."""

    def __init__(self, model=None) -> None:
        self.rope = getattr(model, "rope", None)
        self.positional = self.rope is not None

    def check_rope(self, model) -> None:
        """``TypeError`` if the model's rope is not one of :data:`ROPES`."""
        rope = getattr(model, "rope", None)
        if rope is not None and type(rope) not in ROPES:
            raise TypeError(f"{type(model).__name__}: rope {type(rope).__name__} is not supported (supported: "
                            f"{', '.join(c.__name__ for c in ROPES)})")  # fmt: skip


class EvaFamily(RopeFamily):
    name = "eva"
    model_classes = (Eva,)
    model_mixin = ToComEva
    blocks = {EvaBlock: ToComEvaBlock, EvaBlockPostNorm: ToComEvaBlockPostNorm}

    def check(self, model, positions):
        self.check_attentions(model, (EvaAttention, AttentionRope))
        self.check_rope(model)

    def initial_coords(self, ctx, x):
        grid_fn = ROPES[type(self.rope)][0]
        coords = grid_fn(self.rope, ctx.grid).to(device=x.device, dtype=torch.float32)
        prefix = x.shape[1] - coords.shape[0]
        coords = torch.cat([coords.new_zeros(prefix, 2), coords], dim=0)
        return coords.unsqueeze(0).expand(x.shape[0], -1, -1)

    def rope_embed(self, coords, block):
        return ROPES[type(self.rope)][1](self.rope, coords, block)

    def unmerged_overrides(self, block):
        attn = block.attn  # fused qkv + q/v bias: F.linear on attn.qkv.weight would bypass the bank's Linear
        if attn.qkv is not None and getattr(attn, "q_bias", None) is not None and not attn.qkv_bias_separate:
            return [(attn, "qkv_bias_separate", True)]  # qkv(x) + bias: the same sum, through the Linear
        return []

    def qv(self, block):
        attn = block.attn
        if attn.qkv is not None:
            return fused_qkv_rows(attn.qkv, attn.proj)
        return {"q": (attn.q_proj, 0, None), "k": (attn.k_proj, 0, None), "v": (attn.v_proj, 0, None),
                "proj": (attn.proj, 0, None)}  # fmt: skip
