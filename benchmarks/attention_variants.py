"""Candidate forms of ToMe's proportional attention that ``benchmarks/gpu.py`` times next to the library's.

The library (``tocom_hub/core/attention.py``) adds ``log(size)`` per key either as an additive SDPA mask
(CPU) or folded into q/k with the head dim padded by copies of q, k and v (CUDA). The two forms here
are exact as well and are measured before either could replace those:

* :func:`flex_key_bias` — ``torch.nn.attention.flex_attention`` with a ``score_mod`` adding ``log s`` per
  key (no padding, no mask; compiled on CUDA, eager elsewhere);
* :func:`attend_padded_weights` — the fold without the three activation copies: the qkv projection is
  run with its weight and bias padded per head, so q's extra channels come out as ``1 / (pad · scale)``
  and v's as 0, and ``log s`` is written into k's extra channels in place. Measured on the project's
  2-core CPU (DeiT-B, r = 16): 0.91× the mask's speed at batch 1 (the padded weight is rebuilt every
  forward) and 0.98× at batch 8, so the CPU keeps the mask.

Neither is used by tocom_hub by default; ``gpu.py`` passes them as ``tocom_hub.patch(attention=...)`` for its
``tome-flex`` (the kernel :func:`flex_attention_form`) and ``tome-foldw`` (:data:`PADDED_WEIGHTS`, an object
whose ``attend`` replaces the classic family's whole attention) rows.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from tocom_hub.core import attention as _attention

__all__ = ["flex_key_bias", "flex_attention_form", "attend_padded_weights", "PaddedWeights", "PADDED_WEIGHTS"]

_FLEX: Dict[str, Callable[..., torch.Tensor]] = {}  # device type -> flex_attention (compiled on CUDA)


def flex_key_bias(q, k, v, bias, scale, dropout_p=0.0, fold=True):
    """``softmax(q·kᵀ·scale + bias) v`` by ``flex_attention``: a ``score_mod`` adds ``bias[b, key]``.

    Same signature as :func:`tocom_hub.core.attention.sdpa_key_bias` (``fold`` is ignored)."""
    if dropout_p:
        raise ValueError("the flex_attention variant is for inference (dropout_p=0)")
    if q.device.type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[q.device.type] = torch.compile(flex_attention) if q.device.type == "cuda" else flex_attention
    per_key = bias.reshape(bias.shape[0], -1)  # [B, N], float32 log(size)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + per_key[b, kv_idx].to(score.dtype)

    return _FLEX[q.device.type](q, k, v, score_mod=score_mod, scale=scale)


def flex_attention_form(q, k, v, bias, scale, dropout_p=0.0):
    """:func:`flex_key_bias` as a ``patch(attention=...)`` kernel ``(q, k, v, bias, scale, dropout_p)``."""
    return flex_key_bias(q, k, v, bias, scale, dropout_p)


def _plain_qkv(attn: Attention) -> bool:
    """The projection is a bare ``nn.Linear`` nobody hooks, and q/k are not normed over the head dim."""
    qkv = attn.qkv
    return (
        type(qkv) is nn.Linear
        and not qkv._forward_hooks
        and not qkv._forward_pre_hooks
        and isinstance(attn.q_norm, nn.Identity)
        and isinstance(attn.k_norm, nn.Identity)
        and attn.fused_attn
        and not attn.training
    )


def attend_padded_weights(attn: Attention, x: torch.Tensor, bias: Optional[torch.Tensor]):
    """:func:`tocom_hub.core.attention.attend` with the fold done by padded qkv weights (same returns).

    Falls back to the library's ``attend`` without a bias, in training, with hooks on the projection (a
    ToCom bank in unmerged mode, peft) or q/k norms (they would mix the extra channels in)."""
    if bias is None or not _plain_qkv(attn) or getattr(attn, "gate", None) is not None:
        return _attention.attend(attn, x, bias)
    B, N, _ = x.shape
    H, D = attn.num_heads, attn.head_dim
    pad = 8 - D % 8
    weight, b = attn.qkv.weight, attn.qkv.bias
    w_pad = F.pad(weight.view(3, H, D, -1), (0, 0, 0, pad)).view(3 * H * (D + pad), -1)
    b_pad = F.pad(b.view(3, H, D), (0, pad)) if b is not None else weight.new_zeros(3, H, D + pad)
    b_pad[0, :, D:] = 1.0 / (pad * attn.scale)  # q's extra channels (a fresh tensor: ours to write)
    qkv = F.linear(x, w_pad, b_pad.view(-1)).view(B, N, 3, H, D + pad)
    qkv[:, :, 1, :, D:] = bias.view(B, N, 1, 1).to(qkv.dtype)  # k's extra channels: log(size) per key
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)[..., :D]
    out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
    return attn.proj_drop(attn.proj(out)), q[..., :D], k[..., :D]


class PaddedWeights:
    """``patch(attention=PADDED_WEIGHTS)``: the classic family attends through :func:`attend_padded_weights`."""

    def attend(self, attn: Attention, x: torch.Tensor, bias: Optional[torch.Tensor]):
        return attend_padded_weights(attn, x, bias)

    def __call__(self, q, k, v, bias, scale, dropout_p=0.0):  # other families: the library's auto form
        return _attention.key_bias_attention(q, k, v, bias, scale, dropout_p, True, "auto")

    def __repr__(self) -> str:
        return "PaddedWeights()"


PADDED_WEIGHTS = PaddedWeights()
