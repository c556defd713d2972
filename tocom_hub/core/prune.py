"""Token pruning (EViT, Liang et al., ICLR 2022) as pure tensor functions, as used by the ToCom paper.

Every block drops the ``r`` least attentive tokens, where the attentiveness of a token is the
attention its key receives from the class token's query, averaged over heads (:func:`cls_attention`
computes just that row, never the full map). Optionally the dropped tokens are fused into one extra
token, their attentiveness-weighted average ("fuse token" in EViT). Nothing here knows about timm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Prune", "cls_attention", "select_attentive", "prune_tokens", "prune_source", "max_prune"]


@dataclass
class Prune:
    """A pruning plan for one block.

    Attributes:
        num_tokens: token count before pruning.
        keep: ``[B, K]`` long tensor, indices of the kept tokens (prefix first, then by attentiveness).
        dropped: ``[B, N]`` bool mask of the dropped tokens when they are fused into one extra last
            token, else ``None``.
        fuse_weight: ``[B, N]`` attentiveness of the dropped tokens (0 for kept ones), with ``dropped``.
    """

    num_tokens: int
    keep: torch.Tensor
    dropped: Optional[torch.Tensor] = None
    fuse_weight: Optional[torch.Tensor] = None


def max_prune(num_tokens: int, num_prefix: int = 0) -> int:
    """Most tokens one pruning step can remove: at least one non-prefix token always stays."""
    return max(num_tokens - num_prefix - 1, 0)


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, has_class_token: bool = True) -> torch.Tensor:
    """Attentiveness ``[B, N]``: attention from the class token's query (row 0), mean over heads.

    ``q``, ``k``: ``[B, H, N, D]``. Models without a class token use the mean query instead.
    Costs ``O(B·H·N·D)``: only one row of the attention map is computed.
    """
    query = q[:, :, :1] if has_class_token else q.mean(dim=2, keepdim=True)
    attn = (query * scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
    return attn.float().softmax(dim=-1).mean(dim=1)[:, 0]


def select_attentive(attentiveness: torch.Tensor, r: int, num_prefix: int = 0, fuse: bool = False) -> Optional[Prune]:
    """Plan pruning ``r`` tokens (clamped so one non-prefix token stays); ``None`` if nothing is pruned.

    With ``fuse=True`` the sequence still shrinks by exactly ``r``: ``N - P - r - 1`` tokens are kept
    and the other ``r + 1`` are fused into one token appended at the end.
    """
    batch, num_tokens = attentiveness.shape
    r = min(int(r), max_prune(num_tokens, num_prefix))
    if r <= 0:
        return None
    num_keep = num_tokens - num_prefix - r - (1 if fuse else 0)
    with torch.no_grad():
        scores = attentiveness[:, num_prefix:]
        kept = scores.topk(num_keep, dim=-1, sorted=True).indices + num_prefix
        prefix = torch.arange(num_prefix, device=kept.device).expand(batch, -1)
        keep = torch.cat([prefix, kept], dim=1)
        if not fuse:
            return Prune(num_tokens=num_tokens, keep=keep)
        dropped = torch.ones_like(attentiveness, dtype=torch.bool)
        dropped[:, :num_prefix] = False
        dropped.scatter_(1, kept, False)
    return Prune(num_tokens=num_tokens, keep=keep, dropped=dropped, fuse_weight=attentiveness * dropped)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[b, index[b, j]]`` as ``[B, K, C]``: one ``index_select`` of whole rows (cheaper than a
    ``gather`` with an index expanded over the channels)."""
    batch, num_tokens, channels = x.shape
    if batch > 1:
        index = index + torch.arange(0, batch * num_tokens, num_tokens, device=x.device).unsqueeze(1)
    rows = x.reshape(batch * num_tokens, channels).index_select(0, index.reshape(-1))
    return rows.view(batch, index.shape[1], channels)  # explicit sizes: an empty batch has no -1 to infer


def _fused(p: Prune, x: torch.Tensor) -> torch.Tensor:
    w = p.fuse_weight.to(x.dtype)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return (w[..., None] * x).sum(dim=1, keepdim=True)


def prune_tokens(p: Prune, x: torch.Tensor) -> torch.Tensor:
    """Keep the planned tokens of ``x`` (``[B, N, C]``), appending the fused token if planned."""
    out = _gather(x, p.keep)
    if p.dropped is not None:
        out = torch.cat([out, _fused(p, x)], dim=1)
    return out


def prune_source(p: Prune, source: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Update the ``[B, N, N_input]`` 0/1 source-trace matrix (identity before the first step)."""
    if source is None:
        batch = p.keep.shape[0]
        source = torch.eye(p.num_tokens, device=p.keep.device, dtype=dtype).expand(batch, -1, -1)
    out = _gather(source, p.keep)
    if p.dropped is not None:
        dropped = p.dropped.to(source.dtype)
        out = torch.cat([out, (dropped[..., None] * source).amax(dim=1, keepdim=True)], dim=1)
    return out
