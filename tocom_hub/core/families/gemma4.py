"""The ``gemma4_vit`` family: timm ``Gemma4VitEncoder`` / ``Gemma4VitClassifier`` (the Gemma-4 vision towers):
``Gemma4Block`` (sandwich norms, gated MLP) / ``Gemma4Attention`` (separate q/k/v projections in a
``Gemma4ClippableLinear``, RMS-normed q/k/v, 2-D rope on the ``(x, y)`` patch coordinates, attention scale 1,
grouped k/v heads), no prefix tokens.

- Positions: each token carries its rope ``cos``/``sin`` rows: gathered by the input token it sits at (pruning,
  merging with ``positions="keep"``), or recomputed at its size-weighted centroid (``"centroid"``; the angles
  are ``coordinate · inv_freq``, affine in the coordinate, so this is the rotation of the mean patch).
- Pooling: ``avg`` weighs every token by its size. The soft-token pool (``global_pool="soft"``, the encoders'
  default: the mean of each ``k×k`` cell of patches, times ``√D``) is size-aware through the index map: a
  merged token counts in every cell as often as it has patches there (exactly timm's pool of the unmerged
  grid), and a cell averages the patches still represented (EViT drops the pruned ones).
- The bank: q/v are the ``nn.Linear`` inside the clippable linears (the clamps stay around them).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.gemma4_vit import Gemma4Attention, Gemma4Block, Gemma4VitClassifier, Gemma4VitEncoder
from timm.models.gemma4_vit import apply_multidimensional_rope as rope_2d

from ..attention import key_bias_attention
from ..dense import tokens_to_grid
from .base import Family, ReducedBlock, ReducedModel, size_pool, token_info

__all__ = ["Gemma4Family", "ToComGemma4Block", "gemma4_attend", "soft_pool"]


def gemma4_attend(attn: Gemma4Attention, x, cos, sin, bias: Optional[torch.Tensor], form="auto"):
    """``Gemma4Attention.forward`` with a per-key bias; returns ``(out, q, k)`` (rotated, k/v heads expanded)."""
    B, N, _ = x.shape
    q = attn.q_norm(attn.q_proj(x).view(B, N, attn.num_heads, attn.head_dim))
    k = attn.k_norm(attn.k_proj(x).view(B, N, attn.num_kv_heads, attn.head_dim))
    v = attn.v_norm(attn.v_proj(x).view(B, N, attn.num_kv_heads, attn.head_dim))
    q = rope_2d(q, cos, sin, ndim=2, unsqueeze_dim=2).transpose(1, 2)
    k = rope_2d(k, cos, sin, ndim=2, unsqueeze_dim=2).transpose(1, 2)
    v = v.transpose(1, 2)
    if attn.num_kv_groups > 1:
        k, v = k.repeat_interleave(attn.num_kv_groups, dim=1), v.repeat_interleave(attn.num_kv_groups, dim=1)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if bias is None and attn.fused_attn:  # timm's call (scale 1: q and k are normed)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=1.0)
    else:
        out = key_bias_attention(q, k, v, bias, 1.0, dropout_p, attn.fused_attn, form, attn.attn_drop)
    out = attn.proj_drop(attn.o_proj(out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)))
    return out, q, k


def _gather(rows: torch.Tensor, index: torch.Tensor, identity: float) -> torch.Tensor:
    """``rows[b, index[b, n]]`` (``[B, N_in, D]`` → ``[B, N, D]``); ``-1`` (EViT's fused token) → ``identity``."""
    out = rows.gather(1, index.clamp_min(0)[..., None].expand(-1, -1, rows.shape[-1]))
    return torch.where(index[..., None] >= 0, out, torch.full_like(out, identity))


class ToComGemma4Block(ReducedBlock, Gemma4Block):
    """timm ``Gemma4Block`` that removes ``r`` tokens between attention and MLP."""

    def forward(self, x, rope_cos, rope_sin, attn_mask=None):
        plain = lambda: Gemma4Block.forward(self, x, rope_cos, rope_sin, attn_mask=attn_mask)  # noqa: E731
        return self._tocom_forward(plain, x, attn_mask is not None, rope=(rope_cos, rope_sin))

    def _tocom_rope(self, ctx, rope):
        cos, sin = rope
        if ctx.coords is not None:
            cos2, sin2 = self._tocom_state.family.rope_embed(ctx.coords)
            return cos2.to(cos.dtype), sin2.to(sin.dtype)
        if ctx.index is None:
            return cos, sin
        return _gather(cos, ctx.index, 1.0), _gather(sin, ctx.index, 0.0)  # no position: the identity rotation

    def _tocom_attention(self, x, ctx, need_info, rope):
        state = self._tocom_state
        cos, sin = self._tocom_rope(ctx, rope)
        out, q, k = gemma4_attend(self.attn, self.norm1(x), cos, sin, ctx.attn_bias, state.attention)
        info = token_info(need_info, q, k, 1.0, state.has_class_token) if need_info else None
        return x + self.drop_path(self.norm2(out)), info

    def _tocom_mlp_branch(self, x):
        return self.drop_path(self.norm4(self.mlp(self.norm3(x))))


def soft_pool(enc: Gemma4VitEncoder, x: torch.Tensor, position_ids: torch.Tensor, ctx) -> torch.Tensor:
    """The encoder's soft-token pool of reduced tokens ``x`` (``[B, N, D]``), size-aware (module docstring)."""
    full, alive = x, None
    if x.shape[1] != position_ids.shape[1]:
        if ctx is None or ctx.grid_index is None:
            raise RuntimeError("the soft-token pool of reduced tokens needs the forward's index map (tracking)")
        full = tokens_to_grid(x, ctx.grid_index)  # every patch holds its token (pruned: zero)
        alive = (ctx.grid_index >= 0).to(x.dtype)[..., None]
    pooled, _ = enc.pooler._avg_pool_by_positions(full, position_ids)
    if alive is not None:  # the mean of the patches still represented in each cell
        share, _ = enc.pooler._avg_pool_by_positions(alive, position_ids)
        pooled = pooled / share.clamp_min(1e-6)
    pooled = pooled * enc.pooler.root_hidden_size
    if enc.std_bias is not None:
        pooled = (pooled - enc.std_bias) * enc.std_scale
    return pooled


def _encoder(model) -> Gemma4VitEncoder:
    return model.encoder if isinstance(model, Gemma4VitClassifier) else model


def _reduces(model) -> bool:
    state = model._tocom_state
    return any(state.r) and not state.dense


def _encode(model, x, patch_coord, patch_valid, soft: bool):
    """Begin the forward's context and run the encoder: ``(tokens, position_ids, ctx)``."""
    state, enc = model._tocom_state, _encoder(model)
    ctx = state.begin()
    if enc.grad_checkpointing and model.training:
        raise RuntimeError(
            "gradient checkpointing re-runs blocks and cannot be combined with token merging/pruning; "
            "call model.set_grad_checkpointing(False) or tocom_hub.set_r(model, 0)"
        )
    ctx.track = ctx.track or soft  # the soft pool reads the index map
    enc._assert_raw_img_conformant(x if not isinstance(x, dict) else x["patches"])
    x, position_ids, padding = enc.patch_embed(x, patch_coord, patch_valid)
    ctx.grid = position_ids  # this family's grid: the (x, y) coordinates of every patch
    return enc._encode(x, position_ids, padding), position_ids, ctx


def _no_intermediates(model):
    if _reduces(model):
        raise ValueError(
            f"{type(model).__name__}.forward_intermediates reshapes the tokens to the patch grid; with merged or "
            f"pruned tokens patch with dense=True (the grid stays full) or call tocom_hub.set_r(model, 0)"
        )


class ToComGemma4Encoder(ReducedModel):
    """Model mixin for ``Gemma4VitEncoder``: size-aware ``soft`` and ``avg`` pooling of the reduced tokens."""

    def forward(self, x, patch_coord=None, patch_valid=None):
        if not _reduces(self):
            self._tocom_state.begin()
            return super().forward(x, patch_coord, patch_valid)
        x, position_ids, ctx = _encode(self, x, patch_coord, patch_valid, self.global_pool == "soft")
        if self.global_pool == "soft":
            return soft_pool(self, x, position_ids, ctx)
        if self.global_pool == "avg":
            pooled = size_pool(self, x, ctx, "avg", 0, False)
            return x.mean(dim=1) if pooled is None else pooled
        return x

    def forward_features(self, x, patch_coord=None, patch_valid=None):
        if not _reduces(self):
            return super().forward_features(x, patch_coord, patch_valid)
        return _encode(self, x, patch_coord, patch_valid, False)[0]

    def forward_intermediates(self, *args, **kwargs):
        _no_intermediates(self)
        return super().forward_intermediates(*args, **kwargs)


class ToComGemma4Classifier(ReducedModel):
    """Model mixin for ``Gemma4VitClassifier``: the encoder's blocks as the model's, size-weighted average
    pooling of the reduced tokens (or the size-aware soft pool with ``encoder_pool="soft"``)."""

    blocks = property(lambda self: self.encoder.blocks)
    patch_embed = property(lambda self: self.encoder.patch_embed)
    grad_checkpointing = property(lambda self: self.encoder.grad_checkpointing)
    num_prefix_tokens = 0

    def forward_features(self, x, patch_coord=None, patch_valid=None):
        if not _reduces(self):
            return super().forward_features(x, patch_coord, patch_valid)
        soft = self.encoder_pool == "soft"
        x, position_ids, ctx = _encode(self, x, patch_coord, patch_valid, soft)
        return soft_pool(self.encoder, x, position_ids, ctx) if soft else x

    def forward_head(self, x, patch_valid=None, pre_logits=False):
        if not _reduces(self) or self.global_pool != "avg" or self.encoder_pool == "soft":
            return super().forward_head(x, patch_valid=patch_valid, pre_logits=pre_logits)
        ctx = self._tocom_state.last()
        pooled = size_pool(self, x, ctx, "avg", 0, False) if ctx is not None else None
        x = self.head_drop(self.norm(x.mean(dim=1) if pooled is None else pooled))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, *args, **kwargs):
        _no_intermediates(self)
        return super().forward_intermediates(*args, **kwargs)


class Gemma4Family(Family):
    name = "gemma4_vit"
    model_classes = (Gemma4VitEncoder, Gemma4VitClassifier)
    blocks = {Gemma4Block: ToComGemma4Block}
    positional = True

    def __init__(self, model=None) -> None:
        self.rotary = _encoder(model).rotary_emb if model is not None else None
        self.model_mixin = ToComGemma4Classifier if isinstance(model, Gemma4VitClassifier) else ToComGemma4Encoder

    @classmethod
    def model_blocks(cls, model):
        return _encoder(model).blocks

    def check(self, model, positions):
        self.check_attentions(model, (Gemma4Attention,))

    def num_prefix(self, model) -> int:
        return 0

    def initial_coords(self, ctx, x):
        return ctx.grid.to(device=x.device, dtype=torch.float32)  # [B, N, 2] (x, y) patch coordinates

    def rope_embed(self, coords):
        return self.rotary(coords, coords)  # cos, sin at (fractional) coordinates: [B, N, head_dim]

    def qv(self, block):
        attn = block.attn
        return {"q": (attn.q_proj.linear, 0, None), "k": (attn.k_proj.linear, 0, None),
                "v": (attn.v_proj.linear, 0, None), "proj": (attn.o_proj.linear, 0, None)}  # fmt: skip
