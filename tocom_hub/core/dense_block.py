"""The dense block step (ToCom paper, appendix): merge before the FFN, unmerge after it.

For segmentation and other dense heads every patch needs an output, so the token grid never
shrinks: attention runs on all ``N`` tokens, ``k`` of them are merged (ToMe: bipartite matching on
this block's keys) or skip the MLP (EViT: the least attentive ones), the MLP runs on the ``N - k``
remaining tokens, and each of its outputs is copied back to the tokens it stands for before the
residual. The residual stream itself is never averaged: token ``i`` leaves the block as
``x_i + MLP(norm2(mean of its group))``. :func:`dense_forward` is the whole step for one timm-style
block (``attn``, ``norm1``/``ls1``/``drop_path1``, ``norm2``/``mlp``/``ls2``/``drop_path2``).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import attend
from .dense import prune_positions, scatter_back, unmerge
from .merge import bipartite_soft_matching, merge_wavg
from .prune import cls_attention, prune_tokens, select_attentive

__all__ = ["dense_forward"]


def _mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def dense_forward(
    block: nn.Module,
    x: torch.Tensor,
    k: int,
    method: str = "tome",
    num_prefix: int = 0,
    has_class_token: bool = True,
    fuse_token: bool = False,
) -> torch.Tensor:
    """One dense block: attention on all tokens, the MLP on ``N - k`` (``k`` merged / skipped), unmerge.

    Args:
        block: a timm ``Block`` (its submodules are called; nothing is modified).
        x: ``[B, N, C]`` tokens, prefix first; the output has the same shape.
        k: tokens merged (ToMe) or skipping the MLP (EViT) in this block; clamped to what the step allows.
        method: ``"tome"`` or ``"evit"``.
        num_prefix: protected prefix tokens (never merged or skipped).
        has_class_token: EViT ranks by the class token's attention (else the mean query).
        fuse_token: EViT: the skipped tokens get the MLP output of their attentiveness-weighted fuse
            token instead of none.
    """
    out, q, keys = attend(block.attn, block.norm1(x), None)
    x = x + block.drop_path1(block.ls1(out))
    if k <= 0:
        return x + _mlp(block, x)
    if method == "tome":
        plan = bipartite_soft_matching(keys.sum(dim=1), k, num_prefix)
        if plan is None:
            return x + _mlp(block, x)
        merged, _ = merge_wavg(plan, x)
        return x + unmerge(plan, _mlp(block, merged))
    with torch.no_grad():
        attentive = cls_attention(q, keys, block.attn.scale, has_class_token)
    plan = select_attentive(attentive, k, num_prefix, fuse=fuse_token)
    if plan is None:
        return x + _mlp(block, x)
    return x + scatter_back(_mlp(block, prune_tokens(plan, x)), prune_positions(plan), empty=not fuse_token)
