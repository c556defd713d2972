"""Token merging (ToMe, Bolya et al., ICLR 2023) as pure tensor functions.

Nothing here knows about timm: :func:`bipartite_soft_matching` decides *how* the tokens of one block
are merged and returns a :class:`Merge` (which A tokens merge into which B tokens, and the order);
:func:`merge_wavg` and :func:`merge_source` apply that plan to features, token sizes and the
source-trace matrix. The patch layer (:mod:`tocom_hub.core.patch`) calls them between attention and MLP.

Token order follows the published algorithm: tokens are split alternately into a set A (even positions)
and a set B (odd positions); the ``r`` A tokens with the most similar B partner are merged into it.
The output is ``[prefix tokens in their original order, unmerged A tokens, B tokens]``. Unmerged A
tokens keep their original relative order when the sequence has prefix tokens (class / distillation /
register tokens), and stay in descending-similarity order when it has none, as in the reference.

Speed: only the ``r`` merged A tokens are added into their destinations (an ``index_add_`` over ``r``
rows of a fresh tensor), so no atomic adds run over all ``N`` tokens. At batch 1 the output is
assembled from slices and one row selection (prefix and B tokens are plain slices, the A tokens one
``index_select`` of whole rows): the fewest operations, which is what costs at batch 1. Batched, the
whole output is one ``index_select`` of its rows and the B tokens are weighted in place in it, which
reads and writes the features about 1.5 times instead of twice (memory traffic is what costs there).
Token sizes are kept in float32 and the average is formed from normalised weights, which keeps
fp16/bf16 features in range. In-place writes only touch tensors made here (never ``out=`` into a
view) and there are no module-level caches, so ``torch.compile(..., fullgraph=True)`` traces every
function without graph breaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Merge", "bipartite_soft_matching", "max_merge", "merge_index", "merge_source", "merge_wavg"]


@dataclass
class Merge:
    """A merge plan for one block.

    The input splits into ``num_prefix`` prefix tokens, free A tokens (positions ``first_a::2``) and
    free B tokens (positions ``first_b::2``). The output is ``[prefix, A[a_idx[:, r:]], B]``, where
    A token ``a_idx[:, i]`` (``i < r``) is merged into B token ``dst_idx[:, i]``.

    Attributes:
        a_idx: ``[B, Na]`` long tensor, free A tokens (indices into the A set): the ``r`` merged ones
            first, then the unmerged ones in output order.
        dst_idx: ``[B, r]`` long tensor, B partner (index into the B set) of each merged A token.
        a_rows: the A rows to take. ``B == 1``: ``a_idx[0]`` (``[Na]``, rows of the A tokens' view, plan
            order); batched: only the merged ones, ``[B * r]`` rows of the input flattened to ``[B * N, C]``.
        dst_rows: ``[B * r]``, where the merged rows are added. ``B == 1``: ``dst_idx[0]`` (rows of the B
            tokens); batched: the partners' rows in the output flattened to ``[B * (N - r), C]``.
        keep_rows: batched only (``None`` for ``B == 1``): ``[B * (N - r)]``, the rows of the input
            flattened to ``[B * N, C]`` that make the output before the merged rows are added.
        r: tokens removed.
        num_prefix: protected prefix tokens (class / distillation / register tokens).
        num_out: number of tokens after the merge (``N - r``).
    """

    a_idx: torch.Tensor
    dst_idx: torch.Tensor
    a_rows: torch.Tensor
    dst_rows: torch.Tensor
    keep_rows: Optional[torch.Tensor]
    r: int
    num_prefix: int
    num_out: int

    @property
    def first_a(self) -> int:
        """Position of the first free A token."""
        return 2 * ((self.num_prefix + 1) // 2)

    @property
    def first_b(self) -> int:
        """Position of the first free B token."""
        return 2 * (self.num_prefix // 2) + 1


def max_merge(num_tokens: int, num_prefix: int = 0) -> int:
    """Most tokens one bipartite merge step can remove from ``num_tokens`` (prefix tokens protected)."""
    return max((num_tokens - num_prefix) // 2, 0)


def padded_merge_limit(valid: torch.Tensor, num_prefix: int = 0) -> int:
    """Most tokens one merge step can remove from every image of a padded batch (``valid``: ``[B, N]``,
    padding behind the real tokens) with no real token merged into padding or padding into a real token:
    per image, its A tokens with a partner of their own kind. A host sync (padded batches only).

    It is never below ``max_merge(N, num_prefix) - 1``: with padding behind the real tokens, an image lacks a
    partner of its own kind only for a lone real A token (one real token) or a lone padding A token (one
    padding token), and not both once it has 3 free tokens; so an ``r`` below :func:`max_merge` needs no sync."""
    first_a, first_b = 2 * ((num_prefix + 1) // 2), 2 * (num_prefix // 2) + 1
    va, vb = valid[:, first_a::2], valid[:, first_b::2]
    real = va.sum(dim=1) * vb.any(dim=1)
    pad = (~va).sum(dim=1) * (~vb).any(dim=1)
    return int((real + pad).min()) if valid.shape[0] else 0


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    num_prefix: int = 0,
    keep_order: Optional[bool] = None,
    valid: Optional[torch.Tensor] = None,
) -> Optional[Merge]:
    """Plan the merge of ``r`` tokens by bipartite soft matching.

    Args:
        metric: ``[B, N, C]`` similarity features (ToMe uses the attention keys averaged over heads;
            only their direction matters, so a sum over heads gives the same plan).
        r: tokens to remove; clamped to ``(N - num_prefix) // 2``.
        num_prefix: the first ``num_prefix`` tokens are never merged and keep positions ``0 .. P-1``.
        keep_order: keep unmerged A tokens in their original order. Defaults to ``num_prefix > 0``
            (the reference keeps order only when a class token exists); forced on when ``num_prefix > 0``.
        valid: ``[B, N]`` bool, ``False`` for padding tokens (a padded batch, padding behind the real tokens):
            a real and a padding token never merge; each image merges its ``min(r, n // 2)`` best real pairs
            (``n``: its real tokens, what it would merge alone), then padding pairs, then (a short image only)
            its remaining real pairs. ``r`` must not exceed :func:`padded_merge_limit`.

    Returns:
        a :class:`Merge`, or ``None`` when nothing is merged (``r`` clamps to 0).
    """
    batch, num_tokens, _ = metric.shape
    r = min(int(r), max_merge(num_tokens, num_prefix))
    if r <= 0:
        return None
    keep_order = bool(num_prefix) or bool(keep_order)
    first_a, first_b = 2 * ((num_prefix + 1) // 2), 2 * (num_prefix // 2) + 1

    with torch.no_grad():
        metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True)
        # Cosine similarity of every free A token to every free B token; prefix tokens take no part.
        if batch == 1:  # a plain matrix product is cheaper to launch than a batched one
            scores = torch.mm(metric[0, first_a::2], metric[0, first_b::2].t()).unsqueeze(0)
        else:
            scores = metric[:, first_a::2] @ metric[:, first_b::2].transpose(-1, -2)
        if valid is not None:  # cosine >= -1 for real pairs; -2 for padding pairs; -inf across
            va, vb = valid[:, first_a::2, None], valid[:, None, first_b::2]
            pads = torch.where(va == vb, -2.0, float("-inf")).to(scores.dtype)
            scores = torch.where(va & vb, scores, pads)
        node_max, node_idx = scores.max(dim=-1)
        if valid is not None:  # real A tokens past what the image merges alone rank below its padding pairs
            order = node_max.argsort(dim=-1, descending=True)
            places = torch.arange(order.shape[1], device=order.device).expand_as(order)
            rank = torch.empty_like(order).scatter_(1, order, places)
            alone = valid[:, num_prefix:].sum(dim=1, keepdim=True) // 2
            extra = va[..., 0] & (rank >= alone) & node_max.isfinite()
            node_max = torch.where(extra, node_max.clamp_max(-3.0), node_max)
        a_idx = node_max.argsort(dim=-1, descending=True)  # the r most similar A tokens merge
        if keep_order:
            a_idx = torch.cat([a_idx[:, :r], a_idx[:, r:].sort(dim=-1).values], dim=1)
        dst_idx = node_idx.gather(1, a_idx[:, :r])
        keep_rows = None
        if batch == 1:  # index_select / index_add_ along the token dim of the A / B views directly
            a_rows, dst_rows = a_idx, dst_idx
        else:  # rows of the input flattened to [B * N, C] and of the output flattened to [B * (N - r), C]
            num_out, num_b = num_tokens - r, scores.shape[-1]
            offsets = torch.arange(batch, device=metric.device).unsqueeze(1)
            a_rows = a_idx * 2 + (offsets * num_tokens + first_a)
            dst_rows = dst_idx + (offsets * num_out + (num_out - num_b))
            fixed = torch.cat(  # prefix and B tokens: the same positions in every sample
                [
                    torch.arange(num_prefix, device=metric.device),
                    torch.arange(first_b, num_tokens, 2, device=metric.device),
                ]
            )
            fixed = fixed + offsets * num_tokens
            keep_rows = torch.cat([fixed[:, :num_prefix], a_rows[:, r:], fixed[:, num_prefix:]], dim=1).view(-1)
            a_rows = a_rows[:, :r]
    return Merge(
        a_idx=a_idx,
        dst_idx=dst_idx,
        a_rows=a_rows.reshape(-1),
        dst_rows=dst_rows.reshape(-1),
        keep_rows=keep_rows,
        r=r,
        num_prefix=num_prefix,
        num_out=num_tokens - r,
    )


def _select(m: Merge, t: torch.Tensor) -> torch.Tensor:
    """Batch 1: the A rows of ``t`` (``[1, N, C]``) in plan order, ``[1, Na, C]``: one ``index_select``."""
    return t[:, m.first_a :: 2].index_select(1, m.a_rows)


def _merge_rows(
    m: Merge, t: torch.Tensor, w_keep: Optional[torch.Tensor] = None, w_src: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``[prefix, unmerged A, B * w_keep + merged A * w_src added to their B]`` for ``t`` (``[B, N, C]``)."""
    batch, num_tokens, channels = t.shape
    if batch != 1:  # one gather of the output rows; the B tokens weighted in place; r rows added
        flat = t.reshape(batch * num_tokens, channels)
        out = flat.index_select(0, m.keep_rows).view(batch, m.num_out, channels)
        src = flat.index_select(0, m.a_rows)
        if w_keep is not None:
            out[:, m.num_out - w_keep.shape[1] :] *= w_keep.to(t.dtype)
            src = src * w_src.reshape(batch * m.r, 1).to(t.dtype)
        out.view(batch * m.num_out, channels).index_add_(0, m.dst_rows, src)
        return out
    a = _select(m, t)
    src, b = a[:, : m.r], t[:, m.first_b :: 2]
    if w_keep is None:
        b = b.clone()
    else:
        b = b * w_keep.to(t.dtype)
        src = src * w_src.to(t.dtype)
    b.index_add_(1, m.dst_rows, src)  # b is a fresh tensor: ours to modify
    return torch.cat([t[:, : m.num_prefix], a[:, m.r :], b], dim=1)


def merge_wavg(m: Merge, x: torch.Tensor, size: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` by size-weighted average; returns ``(x, size)`` after the merge.

    ``size`` (``[B, N, 1]``, how many input patches each token stands for) starts at 1 when ``None``;
    the returned size is float32 (exact counts whatever the dtype of ``x``).
    """
    batch, num_tokens, _ = x.shape
    if size is None:
        size = torch.ones(batch, num_tokens, 1, device=x.device, dtype=torch.float32)
    else:
        size = size.float()
    # Sizes follow the same layout; a merged B token's size is the sum of its members'.
    size_b = size[:, m.first_b :: 2]
    if batch != 1:  # batched (also an empty batch: every size below is explicit, no -1)
        new_size = _merge_rows(m, size)
        total = new_size[:, m.num_out - size_b.shape[1] :]
        size_src = size.view(batch * num_tokens, 1).index_select(0, m.a_rows)
        dst_total = new_size.view(batch * m.num_out, 1).index_select(0, m.dst_rows)
    else:
        size_a = _select(m, size)
        size_src = size_a[:, : m.r]
        total = size_b.clone().index_add_(1, m.dst_rows, size_src)
        new_size = torch.cat([size[:, : m.num_prefix], size_a[:, m.r :], total], dim=1)
        dst_total = total.index_select(1, m.dst_rows)
    # Weighted average from normalised weights: every term stays in the range of x (fp16/bf16-safe).
    w_keep = size_b / total
    w_src = size_src.view(batch, m.r, 1) / dst_total.view(batch, m.r, 1)
    return _merge_rows(m, x, w_keep, w_src), new_size


def merge_source(m: Merge, source: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Update the ``[B, N, N_input]`` 0/1 source-trace matrix (identity before the first merge)."""
    if source is None:
        batch, num_tokens = m.a_idx.shape[0], m.num_out + m.r
        source = torch.eye(num_tokens, device=m.a_idx.device, dtype=dtype).expand(batch, -1, -1)
    # Each input patch belongs to exactly one token, so a sum of rows is their union.
    return _merge_rows(m, source, None, None)


def merge_index(m: Merge) -> torch.Tensor:
    """``[B, N - r]`` long: the input token each output token of the plan sits at (a merged B token sits at
    its own place: the "destination keeps its position" rule; prefix, unmerged A and B tokens are themselves)."""
    batch, device = m.a_idx.shape[0], m.a_idx.device
    num_tokens = m.num_out + m.r
    prefix = torch.arange(m.num_prefix, device=device).expand(batch, -1)
    kept_a = m.a_idx[:, m.r :] * 2 + m.first_a
    b = torch.arange(m.first_b, num_tokens, 2, device=device).expand(batch, -1)
    return torch.cat([prefix, kept_a, b], dim=1)
