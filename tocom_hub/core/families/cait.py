"""The ``cait`` family: timm ``Cait`` — ``LayerScaleBlock`` / ``TalkingHeadAttn`` self-attention blocks on the
patch tokens only (no class token in them: prefix 0, EViT ranks by the mean query), then
``LayerScaleBlockClassAttn`` / ``ClassAttn`` blocks where the class token attends to the patch tokens.

Tokens are reduced in the self-attention blocks only. With ToMe's proportional attention a merged token of
size ``s`` stands for ``s`` equal keys, and talking heads keep that exact:

* ``log s`` is added per key *after* the pre-softmax head mixing (``proj_l``) and before the softmax (added
  before ``proj_l`` it would be scaled by the mixing weights);
* the post-softmax mixing ``proj_w`` is linear in the probabilities except for its bias, which timm adds once
  per key: on merged tokens it is added ``s`` times (``b · s_j``), as the ``s`` keys would have received it.

The class-attention blocks see the merged tokens with the same ``log s`` bias (the class token: 0), and
average pooling weights tokens by size. No positional state travels (CaiT adds its position embedding
before the first block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.cait import Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn

from ..attention import attention_heads
from ..grid import merged_intermediates
from .base import Family, ReducedBlock, ReducedModel, fused_qkv_rows, token_info

__all__ = ["CaitFamily", "ToComLayerScaleBlock", "ToComCait", "talking_heads_attend"]


def talking_heads_attend(attn: TalkingHeadAttn, x: torch.Tensor, ctx):
    """``TalkingHeadAttn.forward`` with ToMe's size bias (see the module docstring); returns ``(out, q, k)``."""
    B, N, C = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
    logits = attn.proj_l(((q * attn.scale) @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    bias, size = ctx.attn_bias, ctx.size
    if bias is not None:
        logits = logits + bias.to(logits.dtype)  # per key, after the head mixing, before the softmax
    probs = logits.softmax(dim=-1).permute(0, 2, 3, 1)  # [B, N, N, H]
    if bias is not None and attn.proj_w.bias is not None:
        mixed = F.linear(probs, attn.proj_w.weight) + size.view(B, 1, N, 1).to(probs.dtype) * attn.proj_w.bias
    else:
        mixed = attn.proj_w(probs)
    mixed = attn.attn_drop(mixed.permute(0, 3, 1, 2))
    out = (mixed @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj_drop(attn.proj(out)), q, k


class ToComLayerScaleBlock(ReducedBlock, LayerScaleBlock):
    """timm CaiT ``LayerScaleBlock`` that removes ``r`` tokens between attention and MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tocom_forward(lambda: LayerScaleBlock.forward(self, x), x, False)

    def _tocom_attention(self, x, ctx, need_info):
        out, q, k = talking_heads_attend(self.attn, self.norm1(x), ctx)
        info = token_info(need_info, q, k, self.attn.scale, False) if need_info else None
        return x + self.drop_path(self.gamma_1 * out), info

    def _tocom_mlp_branch(self, x):
        return self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def _class_attention(blk: LayerScaleBlockClassAttn, x, x_cls, bias, form):
    """``LayerScaleBlockClassAttn.forward`` with a per-key bias on ``[class token, tokens]``."""
    u = blk.norm1(torch.cat((x_cls, x), dim=1))
    attn = blk.attn
    B, N, C = u.shape
    H = attn.num_heads
    q = attn.q(u[:, :1]).reshape(B, 1, H, C // H).transpose(1, 2)
    k = attn.k(u).reshape(B, N, H, C // H).transpose(1, 2)
    v = attn.v(u).reshape(B, N, H, C // H).transpose(1, 2)
    out = attn.proj_drop(attn.proj(attention_heads(attn, q, k, v, bias, form)))
    x_cls = x_cls + blk.drop_path(blk.gamma_1 * out)
    return x_cls + blk.drop_path(blk.gamma_2 * blk.mlp(blk.norm2(x_cls)))


class ToComCait(ReducedModel):
    """Model mixin of the cait family: class attention with the size bias, size-weighted average pooling,
    ``forward_intermediates`` on the full grid (the blocks hold no prefix token)."""

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        state = self._tocom_state
        bias = state.context().attn_bias
        if bias is None:
            return super().forward_cls(x)
        bias = torch.cat([bias.new_zeros(bias.shape[0], 1, 1, 1), bias], dim=-1)  # the class token: size 1
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token_only:
            cls_tokens = _class_attention(blk, x, cls_tokens, bias, state.attention)
        return torch.cat((cls_tokens, x), dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        ctx = self._tocom_state.last()
        size = None if ctx is None else ctx.size
        if self.global_pool != "avg" or size is None or x.shape[1] != size.shape[1] + 1:
            return super().forward_head(x, pre_logits=pre_logits)
        x = (x[:, 1:] * (size / size.sum(dim=1, keepdim=True)).to(x.dtype)).sum(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, **kwargs):
        state = self._tocom_state
        if not any(state.r) or state.dense:
            return super().forward_intermediates(x, indices=indices, **kwargs)
        state.begin().track = True
        base = super(ReducedModel, self).forward_intermediates  # timm's (ReducedModel's would start again)

        def forward(*a, return_prefix_tokens=False, **kw):  # timm's Cait returns no prefix tokens
            return base(*a, **kw)

        return merged_intermediates(self, forward, x, indices=indices, num_prefix=0, **kwargs)


class CaitFamily(Family):
    name = "cait"
    model_classes = (Cait,)
    model_mixin = ToComCait
    blocks = {LayerScaleBlock: ToComLayerScaleBlock}

    def check(self, model, positions):
        name = type(model).__name__
        self.check_attentions(model, (TalkingHeadAttn,))
        for i, blk in enumerate(model.blocks_token_only or ()):
            if type(blk) is not LayerScaleBlockClassAttn or type(blk.attn) is not ClassAttn:
                got = f"{type(blk).__name__} / {type(blk.attn).__name__}"
                raise TypeError(f"{name}: class-attention block {i} is {got}; the cait family needs "
                                f"LayerScaleBlockClassAttn / ClassAttn")  # fmt: skip

    def num_prefix(self, model) -> int:
        return 0  # the class token joins only in the class-attention blocks

    def has_class_token(self, model) -> bool:
        return False

    def qv(self, block):
        attn = block.attn
        return fused_qkv_rows(attn.qkv, attn.proj)
