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

Speed: at batch size 1 a merge step is a few dozen tiny tensor operations between large matrix
products, and each one costs far more than its arithmetic (the GEMMs before it evict the caches).
So the plan is built from as few operations as possible: prefix tokens are sliced out of the
similarity matrix instead of masked, and the parts of the slot layout that depend only on the token
count (:func:`_layout`) are computed once per shape and reused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple

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


class _Layout(NamedTuple):
    """What a merge plan's slot layout owes to the shape alone (not to the similarities)."""

    first_a: int  # position of the first free (non-prefix) A token; free A tokens are first_a::2
    first_b: int  # same for B
    dst_offset: int  # slot of the first free B token (after the prefix and the unmerged A tokens)
    dest: torch.Tensor  # [B, N]: slots of prefix and B tokens; free A entries are overwritten
    unm_slots: torch.Tensor  # [B, Na_free - r]: slots of the unmerged free A tokens, in order
    batch_offset: Optional[torch.Tensor]  # [B, 1]: b * num_out, None for B == 1


_LAYOUTS: Dict[tuple, _Layout] = {}
_MAX_LAYOUTS = 512


def _layout(batch: int, num_tokens: int, r: int, num_prefix: int, device: torch.device) -> _Layout:
    key = (batch, num_tokens, r, num_prefix, device)
    layout = _LAYOUTS.get(key)
    if layout is not None:
        return layout
    # Plain (non-inference) tensors, so that plans built under inference_mode also work in training.
    with torch.inference_mode(False), torch.no_grad():
        prefix_a, prefix_b = (num_prefix + 1) // 2, num_prefix // 2
        num_free_a = (num_tokens + 1) // 2 - prefix_a
        num_free_b = num_tokens // 2 - prefix_b
        num_unm = num_free_a - r
        num_out = num_tokens - r
        # Output: [prefix tokens (original order), unmerged free A tokens, free B tokens].
        dest = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
        dest[:num_prefix] = torch.arange(num_prefix, device=device)
        dest[2 * prefix_b + 1 :: 2] = torch.arange(num_free_b, device=device) + num_prefix + num_unm
        unm_slots = torch.arange(num_prefix, num_prefix + num_unm, device=device)
        offset = None
        if batch > 1:
            offset = torch.arange(0, batch * num_out, num_out, device=device)[:, None]
        layout = _Layout(
            first_a=2 * prefix_a,
            first_b=2 * prefix_b + 1,
            dst_offset=num_prefix + num_unm,
            dest=dest.expand(batch, -1),
            unm_slots=unm_slots.expand(batch, -1),
            batch_offset=offset,
        )
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.clear()
    _LAYOUTS[key] = layout
    return layout


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    num_prefix: int = 0,
    keep_order: Optional[bool] = None,
) -> Optional[Merge]:
    """Plan the merge of ``r`` tokens by bipartite soft matching.

    Args:
        metric: ``[B, N, C]`` similarity features (ToMe uses the attention keys averaged over heads;
            only their direction matters, so a sum over heads gives the same plan).
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
    layout = _layout(batch, num_tokens, r, num_prefix, metric.device)
    first_a, first_b = layout.first_a, layout.first_b

    with torch.no_grad():
        metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True)
        # Cosine similarity of every free A token to every free B token; prefix tokens take no part.
        if batch == 1:  # a plain matrix product is cheaper to launch than a batched one
            scores = torch.mm(metric[0, first_a::2], metric[0, first_b::2].t()).unsqueeze(0)
        else:
            scores = metric[:, first_a::2] @ metric[:, first_b::2].transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        unm_idx = node_max.argsort(dim=-1, descending=True)[:, r:]  # the r most similar A tokens merge
        if keep_order:
            unm_idx = unm_idx.sort(dim=-1).values

        dest = layout.dest.clone()
        dest_a = dest[:, first_a::2]
        # Every free A token first points at its best B partner, then the unmerged ones get their own slot.
        torch.add(node_idx, layout.dst_offset, out=dest_a)
        dest_a.scatter_(1, unm_idx, layout.unm_slots)
        index = dest.view(-1) if layout.batch_offset is None else (dest + layout.batch_offset).view(-1)
    return Merge(dest=dest, index=index, num_out=num_tokens - r)


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
