"""The ``naflexvit`` family: timm ``NaFlexVit`` (SigLIP2-NaFlex, RADIO v3/v4, the NaFlex ViTs) with timm's
``Block`` / ``Attention`` (fused qkv) or, with rope or EVA features, ``EvaBlock`` / ``EvaAttention`` /
``AttentionRope``. Both input paths: a fixed-size image batch, and NaFlex's patch dict (``patches``,
``patch_coord``, ``patch_valid``) with per-image padding.

Padding follows the tokens: the model's validity mask (``patch_valid`` with the prefix in front) lives in the
forward's context (``ctx.valid``) and is gathered and reordered with every reduction
(:func:`~tocom_hub.core.reducers.reduce_tokens`): a padding token never merges with a real one, never takes a
real token's kept place, sorts behind the real tokens, is masked as a key in every reduced attention and
never counts in pooling. Each image of a padded batch is therefore reduced exactly as it would be alone.
Optional rope rows travel as in the eva family (``positions="keep"``; ``"centroid"`` is refused: the
patch-dict path has a grid per image).
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers import Attention, AttentionRope
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import Block

from ..attention import attend
from .base import ReducedModel, token_info
from .eva import EvaFamily, RopeFamily, ToComEvaBlock, eva_attend
from .vit import ToComBlock, ViTFamily

__all__ = ["NaFlexFamily", "ToComNaFlexBlock", "ToComNaFlexEvaBlock", "ToComNaFlexVit", "padding_bias", "PAD_BIAS"]

# Attention logit bias of a padding key: exp(-1e4) is exactly 0 in float32 next to any real logit, and
# -1e4 stays finite in fp16 (the "fold" attention form puts the bias into a key channel).
PAD_BIAS = -1.0e4


def padding_bias(valid: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, 1, 1, N]`` float32 per-key bias: ``bias`` (or 0) at real tokens, :data:`PAD_BIAS` at padding."""
    base = torch.zeros((), device=valid.device) if bias is None else bias.float()
    return torch.where(valid.view(valid.shape[0], 1, 1, -1), base, PAD_BIAS)


def _key_bias(ctx) -> Optional[torch.Tensor]:
    return ctx.attn_bias if ctx.valid is None else padding_bias(ctx.valid, ctx.attn_bias)


def _info(kind, q, k, scale, has_class_token, ctx):
    """:func:`~.base.token_info`; in a padded batch EViT's attentiveness masks padding keys and (no class
    token) takes the mean query over the real tokens, so each image ranks its tokens as it would alone."""
    if kind != "cls_attention" or ctx.valid is None:
        return token_info(kind, q, k, scale, has_class_token)
    with torch.no_grad():
        if has_class_token:
            query = q[:, :, :1]
        else:
            w = ctx.valid.to(q.dtype)[:, None, :, None]
            query = (q * w).sum(dim=2, keepdim=True) / w.sum(dim=2, keepdim=True).clamp_min(1)
        logits = ((query * scale) @ k.transpose(-2, -1)).float() + padding_bias(ctx.valid)  # [B, H, 1, N]
        return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def _mask(block, x, attn_mask, is_causal):
    """``(attn_mask for timm's own forward, masked)``. The model's padding mask (``ctx.valid`` set) is not a
    user mask: after a reduction it is rebuilt for the current tokens (key-only, timm's additive form)."""
    state = block._tocom_state
    ctx = state.context()
    if attn_mask is None or is_causal or ctx.valid is None:
        return attn_mask, attn_mask is not None or is_causal
    if attn_mask.shape[-1] != x.shape[1]:  # tokens were reduced: the model's mask no longer fits
        valid = ctx.valid.view(x.shape[0], 1, 1, -1)
        attn_mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~valid, torch.finfo(x.dtype).min
        )
    return attn_mask, False


class ToComNaFlexBlock(ToComBlock):
    """timm ``Block`` inside a ``NaFlexVit``: removes ``r`` tokens between attention and MLP, padding masked."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        mask, masked = _mask(self, x, attn_mask, is_causal)
        return self._tocom_forward(lambda: Block.forward(self, x, attn_mask=mask, is_causal=is_causal), x, masked)

    def _tocom_branch(self, x, ctx, need_info):
        state = self._tocom_state
        form, bias = state.attention, _key_bias(ctx)
        if hasattr(form, "attend"):  # an object that replaces the whole attention (benchmarks' variants)
            out, q, k = form.attend(self.attn, x, bias)
        else:
            out, q, k = attend(self.attn, x, bias, form)
        info = _info(need_info, q, k, self.attn.scale, state.has_class_token, ctx) if need_info else None
        return out, info


class ToComNaFlexEvaBlock(ToComEvaBlock):
    """timm ``EvaBlock`` inside a ``NaFlexVit`` (rope / EVA features): rope rows and padding follow the tokens."""

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        mask, masked = _mask(self, x, attn_mask, is_causal)
        return self._tocom_forward(
            lambda: EvaBlock.forward(self, x, rope=rope, attn_mask=mask, is_causal=is_causal), x, masked, rope=rope
        )

    def _tocom_branch(self, x, ctx, need_info, rope):
        state = self._tocom_state
        out, q, k = eva_attend(self.attn, x, self._tocom_rope(ctx, rope), _key_bias(ctx), state.attention)
        info = _info(need_info, q, k, self.attn.scale, state.has_class_token, ctx) if need_info else None
        return out, info


class ToComNaFlexVit(ReducedModel):
    """Model mixin of the naflexvit family: records the padding of the forward, returns the reduced
    ``patch_valid`` with the features, pools size-weighted over real tokens only."""

    def _forward_embeds(self, x, patch_coord, patch_valid, attn_mask):
        embeds = super()._forward_embeds(x, patch_coord, patch_valid, attn_mask)
        valid = embeds["patch_valid"]
        if attn_mask is None and valid is not None:  # the model's own padding mask (not a caller's mask)
            tokens = embeds["patches"]
            prefix = torch.ones(tokens.shape[0], self.num_prefix_tokens, dtype=torch.bool, device=tokens.device)
            self._tocom_state.context().valid = torch.cat([prefix, valid.bool()], dim=1)
        return embeds

    def forward_features(self, patches, patch_coord=None, patch_valid=None, attn_mask=None):
        out = super().forward_features(patches, patch_coord=patch_coord, patch_valid=patch_valid, attn_mask=attn_mask)
        ctx = self._tocom_state.last()
        if isinstance(out, dict) and ctx is not None and ctx.valid is not None:
            out["patch_valid"] = ctx.valid[:, self.num_prefix_tokens :]  # what is left of each image
        return out

    def forward_intermediates(self, x, *args, **kwargs):
        """timm's, with merged intermediates put back on the input tokens (``core/grid.py``); a patch dict
        gives NLC only (as timm) and, with ``output_dict=True``, the input ``patch_valid`` they align with."""
        fmt = args[4] if len(args) > 4 else kwargs.get("output_fmt", "NCHW")
        if isinstance(x, dict) and fmt != "NLC":  # timm's own refusal, before the merged path reshapes
            raise ValueError('output_fmt="NCHW" is not supported for NaFlex (dict) inputs, use "NLC"')
        out = super().forward_intermediates(x, *args, **kwargs)
        if isinstance(out, dict) and isinstance(x, dict) and "patch_valid" not in out:
            out["patch_valid"] = x.get("patch_valid", kwargs.get("patch_valid"))
        return out

    def _pool(self, x, pool_type=None, patch_valid=None):
        state = self._tocom_state
        ctx = state.last()
        if ctx is None or ctx.size is None:  # nothing merged: timm's masked pooling is right as it is
            return super()._pool(x, pool_type=pool_type, patch_valid=patch_valid)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        tokens, weight = x[:, start:], ctx.size[:, start:]
        real = None if ctx.valid is None else ctx.valid[:, start:, None]
        if real is not None:
            weight = weight * real
        if self.attn_pool is not None:
            if not state.prop_attn:
                return super()._pool(x, pool_type=pool_type, patch_valid=patch_valid)
            bias = weight.clamp_min(torch.finfo(weight.dtype).tiny).log()
            if real is not None:
                bias = bias.masked_fill(~real, torch.finfo(tokens.dtype).min)
            return self.attn_pool(tokens, attn_mask=bias.transpose(1, 2)[:, None].to(tokens.dtype))
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type not in ("avg", "avgmax"):  # token / max / none: sizes do not matter
            return super()._pool(x, pool_type=pool_type, patch_valid=patch_valid)
        avg = (tokens * (weight / weight.sum(dim=1, keepdim=True)).to(tokens.dtype)).sum(dim=1)
        if pool_type == "avg":
            return avg
        top = tokens if real is None else tokens.masked_fill(~real, torch.finfo(tokens.dtype).min)
        return 0.5 * (top.amax(dim=1) + avg)


class NaFlexFamily(RopeFamily):
    name = "naflexvit"
    model_classes = (NaFlexVit,)
    model_mixin = ToComNaFlexVit
    blocks = {Block: ToComNaFlexBlock, EvaBlock: ToComNaFlexEvaBlock}

    def check(self, model, positions):
        name = type(model).__name__
        for i, blk in enumerate(model.blocks):
            attn, need = type(blk.attn), (EvaAttention, AttentionRope) if isinstance(blk, EvaBlock) else (Attention,)
            if attn not in need:
                raise TypeError(f"{name}: block {i} ({type(blk).__name__}) uses {attn.__name__}; the naflexvit "
                                f"family needs {' or '.join(c.__name__ for c in need)}")  # fmt: skip
        self.check_rope(model)
        if self.rope is not None:
            if positions != "keep":
                raise TypeError(f"{name}: positions={positions!r} is not supported for NaFlexViT rope (each image "
                                f"of a patch-dict batch has its own grid); use positions='keep'")  # fmt: skip

    def has_class_token(self, model):
        return bool(model.has_class_token)

    def qv(self, block):
        return EvaFamily.qv(self, block) if isinstance(block, EvaBlock) else ViTFamily.qv(self, block)

    def unmerged_overrides(self, block):
        return EvaFamily.unmerged_overrides(self, block) if isinstance(block, EvaBlock) else []
