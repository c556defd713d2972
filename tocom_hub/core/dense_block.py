"""The dense block step (ToCom paper, appendix): merge before the FFN, unmerge after it.

For segmentation and other dense heads every patch needs an output, so the token grid never
shrinks: attention runs on all ``N`` tokens, ``k`` of them are merged (ToMe: bipartite matching on
this block's keys) or skip the MLP (EViT: the least attentive ones), the MLP runs on the ``N - k``
remaining tokens, and each of its outputs is copied back to the tokens it stands for before the
residual. The residual stream itself is never averaged: token ``i`` leaves the block as
``x_i + MLP(norm2(mean of its group))``. :func:`dense_step` is that step between a block's attention
and its MLP; every family's reduced block calls it from the one shared block forward
(:meth:`~tocom_hub.core.families.base.ReducedBlock._tocom_forward`) when ``patch(dense=True)``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .dense import prune_positions, scatter_back, unmerge
from .merge import Merge
from .prune import Prune

__all__ = ["dense_step"]


def dense_step(
    reducer: Any,
    x: torch.Tensor,
    info: torch.Tensor,
    k: int,
    num_prefix: int,
    mlp_branch: Callable[[torch.Tensor], torch.Tensor],
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x + unmerge(mlp_branch(reduced x))``: the MLP on ``N - k`` tokens, its outputs copied back.

    Args:
        reducer: :class:`~tocom_hub.core.reducers.ToMe` (merge ``k`` tokens; the MLP sees their
            size-weighted means) or :class:`~tocom_hub.core.reducers.EViT` (``k`` least attentive tokens
            skip the MLP; with ``fuse`` they get the MLP output of their fuse token instead).
        x: ``[B, N, C]`` tokens after the attention residual, prefix first; the output has the same shape.
        info: what the reducer plans from (the block's keys or class-token attention).
        k: tokens merged / skipping the MLP; clamped by the reducer to what one step allows.
        num_prefix: protected prefix tokens (never merged or skipped).
        mlp_branch: the block's MLP residual branch (without the residual).
        valid: ``[B, N]`` bool, ``False`` at padding (a padded NaFlex batch), passed to the reducer's plan.
    """
    plan = reducer.plan(info, k, num_prefix) if valid is None else reducer.plan(info, k, num_prefix, valid=valid)
    if plan is None:
        return x + mlp_branch(x)
    if isinstance(plan, Merge):
        merged, _ = reducer.apply(plan, x, None)
        return x + unmerge(plan, mlp_branch(merged))
    if isinstance(plan, Prune):
        kept, _ = reducer.apply(plan, x, None)
        return x + scatter_back(mlp_branch(kept), prune_positions(plan), empty=plan.dropped is None)
    raise TypeError(f"dense mode needs a ToMe merge or an EViT pruning plan; the reducer gave {type(plan).__name__}")
