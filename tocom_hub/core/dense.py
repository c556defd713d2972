"""Dense prediction maths: map merged / pruned tokens back to the positions they came from.

Pure tensor functions (nothing here knows about timm). A reduction plan (:class:`~.merge.Merge` or
:class:`~.prune.Prune`) turns ``N`` tokens into ``N - r``; its *positions* (:func:`merge_positions`,
:func:`prune_positions`) say, for every input token, which output token now holds it (``-1``: none,
a pruned token without a fuse token). :func:`scatter_back` copies each output row back to every
input position it holds — the *unmerge* of dense prediction (ToCom paper, appendix: merge before
the FFN, unmerge after it) — and :func:`unmerge` / :func:`unprune` are that for one plan.

Across blocks the positions compose (:func:`compose_index`) into one ``[B, N_in]`` index map from
the input patches to the current tokens: the light alternative to the ``[B, N, N_in]`` source trace
(:func:`~.merge.merge_source`) for putting the tokens of a merged model back on the patch grid
(:func:`tokens_to_grid`): ``B·N_in`` integers instead of ``B·N·N_in`` floats, one gather per block.
"""

from __future__ import annotations

from typing import Optional

import torch

from .merge import Merge
from .prune import Prune

__all__ = [
    "merge_positions",
    "prune_positions",
    "plan_positions",
    "scatter_back",
    "unmerge",
    "unprune",
    "compose_index",
    "tokens_to_grid",
]


def merge_positions(m: Merge) -> torch.Tensor:
    """``[B, N]`` long: the output token of :func:`~.merge.merge_wavg` that holds each input token.

    Output layout ``[prefix, unmerged A (plan order), B]``; a merged A token is held by its B partner.
    """
    batch, num_a = m.a_idx.shape
    num_tokens = m.num_out + m.r
    num_b = (num_tokens - m.first_b + 1) // 2
    dev = m.a_idx.device
    first_b_out = m.num_out - num_b  # where the B tokens start in the output
    a_out = torch.cat(
        [m.dst_idx + first_b_out, torch.arange(m.num_prefix, m.num_prefix + num_a - m.r, device=dev).expand(batch, -1)],
        dim=1,
    )
    a_pos = torch.empty_like(a_out).scatter_(1, m.a_idx, a_out)  # A token i (in input order) -> output
    pos = torch.empty(batch, num_tokens, dtype=torch.long, device=dev)
    pos[:, : m.num_prefix] = torch.arange(m.num_prefix, device=dev)
    pos[:, m.first_a :: 2] = a_pos
    pos[:, m.first_b :: 2] = torch.arange(first_b_out, m.num_out, device=dev)
    return pos


def prune_positions(p: Prune) -> torch.Tensor:
    """``[B, N]`` long: the output token of :func:`~.prune.prune_tokens` that holds each input token.

    Kept token ``keep[:, j]`` -> ``j``; a dropped token -> the fuse token (last) when fused, else ``-1``.
    """
    batch, num_keep = p.keep.shape
    fill = num_keep if p.dropped is not None else -1
    pos = torch.full((batch, p.num_tokens), fill, dtype=torch.long, device=p.keep.device)
    return pos.scatter_(1, p.keep, torch.arange(num_keep, device=p.keep.device).expand(batch, -1))


def plan_positions(plan: object) -> Optional[torch.Tensor]:
    """:func:`merge_positions` or :func:`prune_positions` of ``plan``; ``None`` for another kind of plan
    (a custom reducer's), whose positions are unknown."""
    if isinstance(plan, Merge):
        return merge_positions(plan)
    if isinstance(plan, Prune):
        return prune_positions(plan)
    return None


def scatter_back(y: torch.Tensor, positions: torch.Tensor, empty: bool = False) -> torch.Tensor:
    """``out[b, n] = y[b, positions[b, n]]`` (``[B, N, C]``).

    ``empty=True`` allows ``-1`` positions, which get a zero row (decided by the caller, not by the
    data, so ``torch.compile(fullgraph=True)`` sees no data-dependent branch). One ``index_select``
    of whole rows over the batch flattened to ``[B * M, C]``.
    """
    batch, num_out, channels = y.shape
    if empty:  # a zero row at the end of every sample takes the -1 positions
        y = torch.cat([y, y.new_zeros(batch, 1, channels)], dim=1)
        num_out += 1
        positions = torch.where(positions < 0, num_out - 1, positions)
    rows = positions + torch.arange(0, batch * num_out, num_out, device=y.device).unsqueeze(1)
    return y.reshape(batch * num_out, channels).index_select(0, rows.reshape(-1)).view(batch, -1, channels)


def unmerge(m: Merge, y: torch.Tensor) -> torch.Tensor:
    """Undo the token layout of a merge: ``[B, N - r, C]`` -> ``[B, N, C]``, every merged token's row
    copied to all of its sources (the inverse of :func:`~.merge.merge_wavg` on tokens that were equal)."""
    return scatter_back(y, merge_positions(m))


def unprune(p: Prune, y: torch.Tensor) -> torch.Tensor:
    """Undo the token layout of a pruning step: ``[B, K, C]`` -> ``[B, N, C]``; dropped tokens get the
    fuse token's row when fused, else zeros."""
    return scatter_back(y, prune_positions(p), empty=p.dropped is None)


def compose_index(positions: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """The index map after one more step: input patch -> current token (``-1`` stays ``-1``).

    ``index``: ``[B, N_in]`` map before the step (``None``: the identity, nothing reduced yet);
    ``positions``: the step's ``[B, N]`` positions.
    """
    if index is None:
        return positions
    out = positions.gather(1, index.clamp_min(0))
    return torch.where(index < 0, index, out)


def tokens_to_grid(tokens: torch.Tensor, index: Optional[torch.Tensor], num_prefix: int = 0) -> torch.Tensor:
    """The spatial tokens of ``tokens`` (``[B, M, C]``, prefix first) on the full patch grid, ``[B, L, C]``
    (NLC, row-major patches). ``index``: the ``[B, N_in]`` map of the forward that made ``tokens``
    (``None``: nothing was reduced). Patches whose token was pruned (``-1``) are zero."""
    if index is None:
        return tokens[:, num_prefix:]
    return scatter_back(tokens, index[:, num_prefix:], empty=True)
