"""Attention with a per-key bias: ToMe's proportional attention (``softmax(q·kᵀ·scale + log s) v``, where
``s`` counts the input patches a token stands for), through SDPA.

:func:`key_bias_attention` is the one kernel every family's reduced attention calls; its *form* is chosen
by ``patch(attention=...)``: ``"auto"`` (fold the bias into q and k on :data:`FOLD_BIAS_DEVICES`, an
additive mask elsewhere), ``"mask"``, ``"fold"``, or a callable ``(q, k, v, bias, scale, dropout_p) -> out``.
:func:`attend` is timm ``Attention.forward`` with that bias (the classic ViT family).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention

__all__ = ["ATTENTION_FORMS", "FOLD_BIAS_DEVICES", "sdpa_key_bias", "key_bias_attention", "attention_heads", "attend"]

# Device types on which the "auto" form folds log(size) into q and k instead of passing an additive mask to
# SDPA. On CUDA a mask forces SDPA off the flash kernel (measured ~3x slower on an H200 at N = 197, while one
# more head-dim block costs ~1.4x); on the CPU the mask is cheaper than the padding.
FOLD_BIAS_DEVICES = ("cuda", "xpu", "mps")
ATTENTION_FORMS = ("auto", "mask", "fold")


def sdpa_key_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    fold: bool = True,
) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + bias) v`` for a per-key ``bias`` (``[B, 1, 1, N]``), by SDPA.

    With ``fold=True`` no mask is passed: the head dim is padded by ``p = 8 - D % 8`` channels, q's
    extra channels hold ``1 / (p · scale)`` and k's hold ``bias``, so the extra ``p`` products add
    exactly ``bias`` to every logit (``q·k + log s_j`` is a dot product with more channels); v is
    zero-padded and the output sliced back. SDPA then keeps its mask-free (flash) kernels.
    """
    if not fold:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p, scale=scale)
    batch, heads, num_tokens, dim = k.shape
    pad = 8 - dim % 8
    q = F.pad(q, (0, pad), value=1.0 / (pad * scale))
    k = torch.cat([k, bias.to(k.dtype).view(batch, 1, num_tokens, 1).expand(batch, heads, num_tokens, pad)], dim=-1)
    v = F.pad(v, (0, pad))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)[..., :dim]


def key_bias_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: float,
    dropout_p: float,
    fused: bool,
    form: Any = "auto",
    attn_drop: Optional[torch.nn.Module] = None,
) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + bias) v`` (``[B, H, N, D]``): SDPA when ``fused`` (in the chosen ``form``),
    else the explicit product with ``attn_drop`` on the probabilities (timm's non-fused path)."""
    if not fused:
        scores = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        probs = scores.softmax(dim=-1)
        return (attn_drop(probs) if attn_drop is not None else probs) @ v
    if bias is None:  # as timm calls it (its default scale is head_dim ** -0.5, as every family's)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if callable(form):
        return form(q, k, v, bias, scale, dropout_p)
    fold = form == "fold" or (form == "auto" and q.device.type in FOLD_BIAS_DEVICES)
    return sdpa_key_bias(q, k, v, bias, scale, dropout_p=dropout_p, fold=fold)


def attention_heads(attn: torch.nn.Module, q, k, v, bias: Optional[torch.Tensor], form: Any = "auto") -> torch.Tensor:
    """:func:`key_bias_attention` with a timm attention module's ``scale``, ``fused_attn`` and ``attn_drop``
    (dropout only in training), the heads joined: ``[B, H, N, D]`` → ``[B, N, H·D]`` (before ``proj``)."""
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out = key_bias_attention(q, k, v, bias, attn.scale, dropout_p, attn.fused_attn, form, attn.attn_drop)
    B, H, N, D = out.shape
    return out.transpose(1, 2).reshape(B, N, H * D)  # explicit: B may be 0


def attend(attn: Attention, x: torch.Tensor, bias: Optional[torch.Tensor], form: Any = "auto"):
    """timm ``Attention.forward`` with a per-key bias (``[B, 1, 1, N]``, log token size, or ``None``).

    Returns ``(out, q, k)``: the attention output after ``proj`` and the (normed) queries and keys
    ``[B, H, N, D]`` that token merging / pruning decide with.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attn.norm(attention_heads(attn, q, k, v, bias, form))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), q, k
