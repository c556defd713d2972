"""Naive dense-mode reference (merge before the MLP, unmerge after), one sample and one group at a time,
on an *unpatched* timm ViT; built from the loop references in ``reference.py``, sharing no tocom_hub code."""

from __future__ import annotations

import torch
from reference import _attention, _evit_groups, _tome_groups


def reference_dense_features(model, images: torch.Tensor, k: int, method: str = "tome", fuse: bool = False):
    """``forward_features`` of ``model`` in dense mode with ``k`` tokens merged / skipping the MLP per block."""
    feats = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    num_prefix = model.num_prefix_tokens
    outs = []
    for x in feats:
        n = x.shape[0]
        for blk in model.blocks:
            out, keys, probs, q = _attention(blk, blk.norm1(x[None])[0], torch.ones(n), False)
            x = x + blk.ls1(out[None])[0]
            mlp = lambda t, blk=blk: blk.ls2(blk.mlp(blk.norm2(t[None]))[0])  # noqa: E731
            h = torch.zeros_like(x)
            if method == "tome":
                for g in _tome_groups(keys.mean(dim=0), k, num_prefix):
                    h[g] = mlp(x[g].mean(dim=0, keepdim=True))[0]
            else:
                if model.has_class_token:
                    attentive = probs[:, 0].mean(dim=0)
                else:
                    qm = q.mean(dim=1, keepdim=True)
                    attentive = ((qm @ keys.transpose(-1, -2)) * blk.attn.scale).softmax(-1)[:, 0].mean(0)
                keep, fused = _evit_groups(attentive, k, num_prefix, fuse)
                h[keep] = mlp(x[keep])
                if fused:
                    w = attentive[fused] / attentive[fused].sum()
                    h[fused] = mlp((w[:, None] * x[fused]).sum(0, keepdim=True))[0]
            x = x + h
        outs.append(model.norm(x[None])[0])
    return torch.stack(outs)
