"""Token merging (ToMe, Bolya et al., ICLR 2023) as pure tensor functions.

Nothing here knows about timm: :func:`bipartite_soft_matching` decides *how* the tokens of one block
are merged and returns a :class:`Merge` (for every input token, the output slot it lands in);
:func:`merge_wavg` and :func:`merge_source` apply that plan to features, token sizes and the
source-trace matrix. The patch layer (:mod:`tocom_hub.patch`) calls them between attention and MLP.

Token order follows the published algorithm: tokens are split alternately into a set A (even positions)
and a set B (odd positions); the ``r`` A tokens with the most similar B partner are merged into it.
The output is ``[prefix tokens in their original order, unmerged A tokens, B tokens]``. Unmerged A
tokens keep their original relative order when the sequence has prefix tokens (class / distillation /
register tokens), and stay in descending-similarity order when it has none, as in the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["Merge", "bipartite_soft_matching", "merge_wavg", "merge_source", "max_merge"]


@dataclass
class Merge:
    """A merge plan for one block.

    Attributes:
        dest: ``[B, N]`` long tensor, output slot of every input token.
        index: ``[B * N]`` long tensor, ``dest`` offset by ``b * num_out`` (row into the flattened output).
        num_out: number of tokens after the merge (``N - r``).
    """

    dest: torch.Tensor
    index: torch.Tensor
    num_out: int


def max_merge(num_tokens: int, num_prefix: int = 0) -> int:
    """Most tokens one bipartite merge step can remove from ``num_tokens`` (prefix tokens protected)."""
    return max((num_tokens - num_prefix) // 2, 0)


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    num_prefix: int = 0,
    keep_order: Optional[bool] = None,
) -> Optional[Merge]:
    """Plan the merge of ``r`` tokens by bipartite soft matching.

    Args:
        metric: ``[B, N, C]`` similarity features (ToMe uses the attention keys averaged over heads).
        r: tokens to remove; clamped to ``(N - num_prefix) // 2``.
        num_prefix: the first ``num_prefix`` tokens are never merged and keep positions ``0 .. P-1``.
        keep_order: keep unmerged A tokens in their original order. Defaults to ``num_prefix > 0``
            (the reference keeps order only when a class token exists); forced on when ``num_prefix > 0``.

    Returns:
        a :class:`Merge`, or ``None`` when nothing is merged (``r`` clamps to 0).
    """
    batch, num_tokens, _ = metric.shape
    r = min(int(r), max_merge(num_tokens, num_prefix))
    if r <= 0:
        return None
    keep_order = bool(num_prefix) or bool(keep_order)

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, 0::2] @ metric[:, 1::2].transpose(-1, -2)  # [B, Na, Nb]
        prefix_a, prefix_b = (num_prefix + 1) // 2, num_prefix // 2
        if prefix_a:
            scores[:, :prefix_a, :] = -torch.inf
        if prefix_b:
            scores[:, :, :prefix_b] = -torch.inf

        node_max, node_idx = scores.max(dim=-1)
        order = node_max.argsort(dim=-1, descending=True)
        src_idx = order[:, :r]
        unm_idx = order[:, r:]
        if keep_order:
            unm_idx = unm_idx.sort(dim=-1).values
        dst_idx = node_idx.gather(-1, src_idx)

        num_a, num_b = scores.shape[1], scores.shape[2]
        num_unm = num_a - r
        num_out = num_tokens - r
        device = metric.device
        # Output slots. Protected tokens keep their original position (A: 0, 2, ..; B: 1, 3, ..);
        # free unmerged A tokens follow the prefix; free B tokens come last.
        slot_b = torch.arange(num_unm, num_unm + num_b, device=device)
        slot_unm = torch.arange(num_prefix - prefix_a, num_prefix - prefix_a + num_unm, device=device)
        if prefix_a:
            slot_unm[:prefix_a] = torch.arange(0, 2 * prefix_a, 2, device=device)
        if prefix_b:
            slot_b[:prefix_b] = torch.arange(1, 2 * prefix_b, 2, device=device)

        dest = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
        dest_a = dest[:, 0::2]
        dest_a.scatter_(1, unm_idx, slot_unm.expand(batch, -1))
        dest_a.scatter_(1, src_idx, slot_b[dst_idx])
        dest[:, 1::2] = slot_b
        index = (dest + torch.arange(0, batch * num_out, num_out, device=device)[:, None]).view(-1)
    return Merge(dest=dest, index=index, num_out=num_out)


def _scatter_sum(m: Merge, x: torch.Tensor) -> torch.Tensor:
    batch, _, channels = x.shape
    out = x.new_zeros(batch * m.num_out, channels)
    out.index_add_(0, m.index, x.reshape(-1, channels))
    return out.view(batch, m.num_out, channels)


def merge_wavg(
    m: Merge, x: torch.Tensor, size: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` by size-weighted average; returns ``(x, size)`` after the merge.

    ``size`` (``[B, N, 1]``, how many input patches each token stands for) starts at 1 when ``None``.
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
        total = _scatter_sum(m, x)
    else:
        total = _scatter_sum(m, x * size)
    size = _scatter_sum(m, size)
    return total / size, size


def merge_source(
    m: Merge, source: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Update the ``[B, N, N_input]`` 0/1 source-trace matrix (identity before the first merge)."""
    if source is None:
        batch, num_tokens = m.dest.shape
        source = torch.eye(num_tokens, device=m.dest.device, dtype=dtype).expand(batch, -1, -1)
    # Each input patch belongs to exactly one token, so a sum of rows is their union.
    return _scatter_sum(m, source)
