"""The token-reduction step between a block's attention and its MLP, written once for every family.

A *reducer* turns what the attention measured (``info``: the keys for ToMe, the class-token attention for
EViT) into a plan and applies it. :class:`ToMe` and :class:`EViT` are the defaults of ``patch(method=...)``;
any object with the same four methods and ``info`` attribute can be passed as ``patch(reducer=...)`` (the
benchmarks' merge-free ceiling does). :func:`reduce_tokens` runs the step on a block's tokens and updates the
forward's :class:`~tocom_hub.core.context.ForwardContext` (sizes, sources, the proportional-attention
bias and the token positions of families with positional state).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .context import ForwardContext, TokenState
from .dense import compose_index, plan_positions, prune_positions
from .merge import (
    bipartite_soft_matching,
    max_merge,
    merge_index,
    merge_source,
    merge_wavg,
    padded_merge_limit,
)
from .prune import Prune, prune_source, prune_tokens, select_attentive

__all__ = ["ToMe", "EViT", "default_reducer", "reduce_tokens"]


class ToMe:
    """Bipartite soft matching on the keys, size-weighted merging (:mod:`tocom_hub.core.merge`)."""

    info = "keys"

    def plan(self, info: torch.Tensor, r: int, num_prefix: int, valid: Optional[torch.Tensor] = None) -> Any:
        """A plan removing up to ``r`` tokens, or ``None`` when nothing is removed. ``valid`` (``[B, N]``
        bool, padded batches only): a padding token never merges with a real one; an image merges the real
        pairs it would merge alone, then padding pairs (``r`` clamped by :func:`~.merge.padded_merge_limit`)."""
        if valid is not None and int(r) >= max_merge(info.shape[1], num_prefix):
            # Below max_merge the limit cannot bind (it is at least max_merge - 1 for any padding layout):
            # no host sync, so the step stays one static graph (torch.export / ONNX of a padded batch).
            r = min(int(r), padded_merge_limit(valid, num_prefix))
        return bipartite_soft_matching(info, r, num_prefix, valid=valid)

    def apply(self, plan: Any, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(x, size)`` after the plan; a merged token is the size-weighted mean of its members."""
        return merge_wavg(plan, x, size)

    def source(self, plan: Any, source: Optional[torch.Tensor]) -> torch.Tensor:
        """The source trace after the plan (identity before the first step)."""
        return merge_source(plan, source)

    def index(self, plan: Any) -> torch.Tensor:
        """``[B, N_out]``: the input token each output token sits at (its own place for a destination)."""
        return merge_index(plan)


class EViT:
    """Keep the tokens the class token attends to most (:mod:`tocom_hub.core.prune`); ``fuse`` fuses the rest."""

    info = "cls_attention"

    def __init__(self, fuse: bool = False) -> None:
        self.fuse = bool(fuse)

    def plan(self, info: torch.Tensor, r: int, num_prefix: int, valid: Optional[torch.Tensor] = None) -> Any:
        """``valid`` (padded batches only): every image keeps the real tokens it would keep alone, padding
        fills the other places (padding ranks above every real token but the most attentive one, which alone
        is always kept; with ``fuse``, above all of them), and a fused token holds real tokens only."""
        if valid is not None:
            real = info.masked_fill(~valid, -1.0)
            real[:, :num_prefix] = -1.0
            top = torch.zeros_like(valid).scatter_(1, real.argmax(dim=1, keepdim=True), True) & valid
            ranked = torch.where(valid, info, 2.0)
            if not self.fuse:
                ranked = ranked.masked_fill(top, 3.0)
            plan = select_attentive(ranked, r, num_prefix, fuse=self.fuse)
            if plan is not None and plan.dropped is not None:  # the fused token: its image's real tokens only
                plan.dropped = plan.dropped & valid
                plan.fuse_weight = info * plan.dropped
            return plan
        return select_attentive(info, r, num_prefix, fuse=self.fuse)

    def apply(self, plan: Any, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, None]:
        return prune_tokens(plan, x), None

    def source(self, plan: Any, source: Optional[torch.Tensor]) -> torch.Tensor:
        return prune_source(plan, source)

    def index(self, plan: Any) -> torch.Tensor:
        """Kept tokens sit at their own place; the fused token (``fuse``) at none: ``-1``."""
        if plan.dropped is None:
            return plan.keep
        return torch.cat([plan.keep, plan.keep.new_full((plan.keep.shape[0], 1), -1)], dim=1)


def default_reducer(method: str, fuse_token: bool) -> Any:
    """The reducer of ``method``: :class:`ToMe` or :class:`EViT`."""
    return ToMe() if method == "tome" else EViT(fuse=fuse_token)


def _positions(state: TokenState, ctx: ForwardContext, plan: Any, x: torch.Tensor, family: Any) -> None:
    """Carry the token positions through the plan: indices ("keep", pruning) or coordinates ("centroid")."""
    red = state.reducer
    if state.positions == "centroid" and state.method == "tome":
        coords = ctx.coords if ctx.coords is not None else family.initial_coords(ctx, x)
        ctx.coords = red.apply(plan, coords, ctx.size)[0]  # the size-weighted centroid of the members
        return
    index = red.index(plan)
    if ctx.coords is not None:  # EViT after a centroid-rule merge cannot happen (one method per model)
        raise RuntimeError("token coordinates and indices mixed in one forward")
    if ctx.index is None:
        ctx.index = index
    else:
        ctx.index = torch.where(index >= 0, ctx.index.gather(1, index.clamp_min(0)), index)


def _padding_last(ctx: ForwardContext, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Padded batches: the validity after a plan (``index``: its output tokens' input places; a fused token,
    ``-1``, holds real tokens only), then a stable reorder that puts padding behind the real tokens, so every
    image's real tokens are laid out (and split into ToMe's A/B sets) exactly as if it ran alone."""
    valid = ctx.valid.gather(1, index.clamp_min(0)) | (index < 0)  # (no bool torch.where: onnxruntime lacks it)
    # the stable sort of "is padding" as a sort of distinct keys (ONNX has no stable sort)
    places = torch.arange(valid.shape[1], device=valid.device)
    order = ((~valid).long() * valid.shape[1] + places).argsort(dim=1)
    step = Prune(num_tokens=x.shape[1], keep=order)
    ctx.valid = valid.gather(1, order)
    if ctx.size is not None:
        ctx.size = prune_tokens(step, ctx.size)
    if ctx.source is not None:
        ctx.source = prune_source(step, ctx.source)
    if ctx.index is not None:
        ctx.index = ctx.index.gather(1, order)
    if ctx.coords is not None:
        ctx.coords = prune_tokens(step, ctx.coords)
    if ctx.track and ctx.grid_index is not None:
        ctx.grid_index = compose_index(prune_positions(step), ctx.grid_index)
    return prune_tokens(step, x)


def reduce_tokens(state: TokenState, ctx: ForwardContext, x: torch.Tensor, info: torch.Tensor, r: int) -> torch.Tensor:
    """Remove up to ``r`` tokens of ``x`` (``[B, N, C]``) as the reducer plans from ``info``.

    In a padded batch (``ctx.valid``, NaFlexViT) the reducer's ``plan`` gets ``valid=`` and the padding
    moves behind the real tokens after the step (``ctx.valid`` follows; the family masks it in attention)."""
    red = state.reducer
    valid = ctx.valid
    plan = red.plan(info, r, state.num_prefix) if valid is None else red.plan(info, r, state.num_prefix, valid=valid)
    if plan is None:
        return x
    if ctx.track:  # the grid index map (tocom_hub.core.grid); a custom reducer's plan ends the tracking
        positions = plan_positions(plan)
        ctx.grid_index = None if positions is None else compose_index(positions, ctx.grid_index)
        ctx.track = positions is not None
    family = state.family
    if family.positional:
        _positions(state, ctx, plan, x, family)
    x, size = red.apply(plan, x, ctx.size)
    ctx.size = size
    if state.trace_source:
        ctx.source = red.source(plan, ctx.source)
    if valid is not None:
        x = _padding_last(ctx, red.index(plan), x)
        size = ctx.size
    if size is not None and state.prop_attn:
        ctx.attn_bias = size.log().view(x.shape[0], 1, 1, x.shape[1])  # [B, 1, 1, N] float32
    return x
