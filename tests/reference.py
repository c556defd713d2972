"""Naive, loop-based reference implementations of ToMe and EViT on an *unpatched* timm ViT.

Written independently of ``tocom_hub`` (straight from the algorithm descriptions, one sample and one
token group at a time, plain Python lists) so the tests compare the fast implementation against
something that shares none of its code. Slow on purpose; use only on tiny models.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch


def _attention(blk, x: torch.Tensor, size: torch.Tensor, prop_attn: bool):
    """Unfused attention of one timm Block on [N, C] tokens; returns (out, keys, probs)."""
    attn = blk.attn
    n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x[None])[0].reshape(n, 3, h, d)
    q = attn.q_norm(qkv[:, 0].transpose(0, 1))  # [H, N, D]
    k = attn.k_norm(qkv[:, 1].transpose(0, 1))
    v = qkv[:, 2].transpose(0, 1)
    logits = (q @ k.transpose(-1, -2)) * (d**-0.5)
    if prop_attn:
        logits = logits + torch.log(size)[None, None, :]
    probs = logits.softmax(dim=-1)
    out = (probs @ v).transpose(0, 1).reshape(n, h * d)
    out = attn.norm(out[None])[0]
    out = attn.proj(out[None])[0]
    return out, k, probs, q


def _tome_groups(metric: torch.Tensor, r: int, num_prefix: int) -> List[List[int]]:
    """Bipartite soft matching on one sample; returns the output tokens as lists of input indices."""
    n = metric.shape[0]
    r = min(r, (n - num_prefix) // 2)
    if r <= 0:
        return [[i] for i in range(n)]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a_pos = list(range(0, n, 2))
    b_pos = list(range(1, n, 2))
    best_score, best_b = [], []
    for i in a_pos:
        if i < num_prefix:
            best_score.append(-math.inf)
            best_b.append(0)
            continue
        sims = [(float(metric[i] @ metric[j]) if j >= num_prefix else -math.inf) for j in b_pos]
        j_best = max(range(len(sims)), key=lambda j: (sims[j], -j))  # first max on ties
        best_score.append(sims[j_best])
        best_b.append(j_best)
    order = sorted(range(len(a_pos)), key=lambda i: -best_score[i])
    merged, kept = order[:r], order[r:]
    if num_prefix:
        kept = sorted(kept)
    groups_b = {j: [b_pos[j]] for j in range(len(b_pos))}
    for i in merged:
        groups_b[best_b[i]].append(a_pos[i])
    prefix = list(range(num_prefix))
    out = [[p] for p in prefix]
    out += [[a_pos[i]] for i in kept if a_pos[i] >= num_prefix]
    out += [sorted(groups_b[j]) for j in range(len(b_pos)) if b_pos[j] >= num_prefix]
    return out


def _evit_groups(attentive: torch.Tensor, r: int, num_prefix: int, fuse: bool) -> Tuple[List[int], List[int]]:
    n = attentive.shape[0]
    r = min(r, n - num_prefix - 1)
    if r <= 0:
        return list(range(n)), []
    rest = sorted(range(num_prefix, n), key=lambda i: -float(attentive[i]))
    keep = n - num_prefix - r - (1 if fuse else 0)
    return list(range(num_prefix)) + rest[:keep], rest[keep:] if fuse else []


def reference_forward(
    model,
    images: torch.Tensor,
    r: int,
    method: str = "tome",
    prop_attn: bool = True,
    fuse: bool = False,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[List[int]]]:
    """Run ``model`` (plain timm, eval mode) with token reduction, one sample at a time.

    Returns ``(logits [B, classes], sources, token_counts)``: per sample, the 0/1 source matrix
    ``[N_out, N_in]`` of the last block and the token count after each block.
    """
    feats = model.patch_embed(images)
    feats = model._pos_embed(feats)
    feats = model.norm_pre(model.patch_drop(feats))
    num_prefix = model.num_prefix_tokens
    logits, sources, counts = [], [], []
    for x in feats:
        n_in = x.shape[0]
        size = torch.ones(n_in)
        members: List[List[int]] = [[i] for i in range(n_in)]
        count = []
        for blk in model.blocks:
            out, k, probs, q = _attention(blk, blk.norm1(x[None])[0], size, prop_attn and method == "tome")
            x = x + blk.ls1(out[None])[0]
            if method == "tome":
                groups = _tome_groups(k.mean(dim=0), r, num_prefix)
                x = torch.stack([(x[g] * size[g, None]).sum(0) / size[g].sum() for g in groups])
                members = [sum((members[i] for i in g), []) for g in groups]
                size = torch.stack([size[g].sum() for g in groups])
            else:
                if model.has_class_token:
                    attentive = probs[:, 0].mean(dim=0)
                else:  # mean query, as documented by tocom_hub
                    qm = q.mean(dim=1, keepdim=True)
                    attentive = ((qm @ k.transpose(-1, -2)) * blk.attn.scale).softmax(-1)[:, 0].mean(0)
                keep, fused = _evit_groups(attentive, r, num_prefix, fuse)
                new_x = [x[i] for i in keep]
                new_members = [members[i] for i in keep]
                if fused:
                    w = attentive[fused] / attentive[fused].sum()
                    new_x.append((w[:, None] * x[fused]).sum(0))
                    new_members.append(sorted(sum((members[i] for i in fused), [])))
                x, members = torch.stack(new_x), new_members
                size = torch.ones(x.shape[0])
            x = x + blk.ls2(blk.mlp(blk.norm2(x[None]))[0])
            count.append(x.shape[0])
        x = model.norm(x[None])[0]
        logits.append(_head(model, x, size if method == "tome" else None, prop_attn))
        src = torch.zeros(len(members), n_in)
        for row, m in enumerate(members):
            src[row, m] = 1.0
        sources.append(src)
        counts.append(count)
    return torch.stack(logits), sources, counts


def _head(model, x: torch.Tensor, size: Optional[torch.Tensor], prop_attn: bool) -> torch.Tensor:
    start = 0 if model.pool_include_prefix else model.num_prefix_tokens
    if hasattr(model, "head_dist"):  # VisionTransformerDistilled
        return (model.head(x[0]) + model.head_dist(x[1])) / 2
    if model.attn_pool is not None:
        tokens = x[start:][None]
        bias = None
        if size is not None and prop_attn:
            bias = torch.log(size[start:])[None, None, None, :]
        pooled = model.attn_pool(tokens, attn_mask=bias)[0]
    elif model.global_pool == "token":
        pooled = x[0]
    else:
        tokens = x[start:]
        w = torch.ones(tokens.shape[0]) if size is None else size[start:]
        avg = (tokens * w[:, None]).sum(0) / w.sum()
        if model.global_pool == "avg":
            pooled = avg
        elif model.global_pool == "avgmax":
            pooled = 0.5 * (tokens.amax(0) + avg)
        else:
            pooled = tokens.amax(0)
    return model.head(model.fc_norm(pooled[None]))[0]
