"""Put the tokens of a merged (or pruned) model back on the patch grid, through the index map.

A patched model in the regular mode ends with fewer tokens than patches. While a forward *tracks*
(``patch(..., trace_source=True)``, inside :func:`track_grid`, and always inside
``forward_intermediates``) every block composes its plan's positions into one ``[B, N_in]`` index map
(input patch -> token holding it, :mod:`tocom_hub.core.dense`): ``B·N_in`` integers, against the
``[B, N, N_in]`` float source trace, and one gather per block. :func:`unmerge_to_grid` copies every
token to each patch it holds; ``forward_intermediates`` of a merged model does the same per block, so
it returns full NCHW / NLC grids like timm's. Patches whose token was pruned (EViT without a fuse
token) are zero. Nothing here is used by a plain forward.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .dense import tokens_to_grid

__all__ = ["track_grid", "unmerge_to_grid", "merged_intermediates"]


def _token_state(model: nn.Module):
    state = model.__dict__.get("_tocom_state")
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched; call tocom_hub.patch(model) first")
    return state


@contextlib.contextmanager
def track_grid(model: nn.Module) -> Iterator[None]:
    """Record the index map in the forwards run inside the block (for :func:`unmerge_to_grid`). Example::

    with tocom_hub.track_grid(model):
        tokens = model.forward_features(x)
    grid = tocom_hub.unmerge_to_grid(model, tokens, output_fmt="NCHW")
    """
    state = _token_state(model)
    old = state.set_tracking(True)  # this thread's forwards only
    try:
        yield
    finally:
        state.set_tracking(old)


def _spatial_index(index: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Index map of the spatial patches into the spatial tokens (prefix tokens stay first, unmerged)."""
    spatial = index[:, num_prefix:]
    return torch.where(spatial < 0, spatial, spatial - num_prefix)


def _to_nchw(y: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
    return y.reshape(y.shape[0], grid_size[0], grid_size[1], -1).permute(0, 3, 1, 2).contiguous()


def unmerge_to_grid(
    model: nn.Module,
    tokens: torch.Tensor,
    output_fmt: str = "NLC",
    grid_size: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """The spatial tokens of the last forward (``tokens``: ``[B, M, C]``, prefix first, e.g. the output
    of ``forward_features``) copied onto the full patch grid: ``[B, L, C]`` (NLC) or ``[B, C, H, W]``.

    The forward must have tracked the index map (``trace_source=True`` or inside :func:`track_grid`)
    unless nothing was reduced (dense mode, ``r = 0``). ``grid_size``: ``(H, W)`` patches for NCHW
    (default ``model.patch_embed.grid_size``).
    """
    state = _token_state(model)
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC'; got {output_fmt!r}")
    ctx = state.last()
    index = None if ctx is None else ctx.grid_index
    prefix = int(model.num_prefix_tokens)
    if index is not None and index.shape[0] != tokens.shape[0]:
        raise ValueError(f"tokens have batch {tokens.shape[0]} but the last forward had {index.shape[0]}")
    if index is None:
        full = getattr(model.patch_embed, "num_patches", None)
        reduced = ctx is not None and (ctx.size is not None or ctx.source is not None or ctx.reduced)
        if reduced or tokens.shape[1] - prefix != full:
            raise ValueError(
                "the last forward did not record the index map from patches to tokens: run it inside "
                "`with tocom_hub.track_grid(model):` (or patch with trace_source=True)"
            )
        grid = tokens[:, prefix:]
    else:
        grid = tokens_to_grid(tokens[:, prefix:], _spatial_index(index, prefix))
    if output_fmt == "NLC":
        return grid
    hw = tuple(grid_size) if grid_size is not None else tuple(model.patch_embed.grid_size)
    if hw[0] * hw[1] != grid.shape[1]:
        raise ValueError(f"grid_size {hw} does not hold {grid.shape[1]} patches; pass grid_size=(H, W)")
    return _to_nchw(grid, hw)


def merged_intermediates(
    model: nn.Module,
    forward: Any,
    x: torch.Tensor,
    indices: Optional[Union[int, List[int]]] = None,
    return_prefix_tokens: bool = False,
    norm: bool = False,
    stop_early: bool = False,
    output_fmt: str = "NCHW",
    intermediates_only: bool = False,
    output_dict: bool = False,
    num_prefix: Optional[int] = None,
    **kwargs: Any,
):
    """timm's ``forward_intermediates`` (``forward``, bound to ``model``) for a model that merges tokens:
    every intermediate is unmerged onto the full grid through the index map of its block; the final
    features (``image_features``) keep the merged tokens, as ``forward_features`` does. The caller
    (the patched model's ``forward_intermediates``) has started a tracking forward context. ``num_prefix``:
    the prefix tokens inside the blocks where that is not ``model.num_prefix_tokens`` (CaiT's blocks: 0)."""
    from timm.models._features import feature_take_indices

    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC'; got {output_fmt!r}")
    state = _token_state(model)
    take, _ = feature_take_indices(len(model.blocks), indices)
    trail: List[Optional[torch.Tensor]] = []
    hooks = [blk.register_forward_hook(lambda *_: trail.append(state.context().grid_index)) for blk in model.blocks]
    prefix = int(model.num_prefix_tokens if num_prefix is None else num_prefix)
    call = dict(norm=norm, stop_early=stop_early, output_fmt="NLC", intermediates_only=intermediates_only)
    if output_dict:  # only where the model has it (timm's Eva does not)
        call["output_dict"] = True
    try:
        res = forward(x, indices=indices, return_prefix_tokens=prefix > 0, **call, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    if output_dict:
        raw, prefix_tokens = res["image_intermediates"], res.get("image_intermediates_prefix")
        final = res.get("image_features")
    else:
        final, raw = (None, res) if intermediates_only else res
        prefix_tokens = [p for _, p in raw] if prefix > 0 else None
        raw = [y for y, _ in raw] if prefix > 0 else raw
    inter = []
    for y, i in zip(raw, sorted(take)):
        index = trail[i]
        inter.append(y if index is None else tokens_to_grid(y, _spatial_index(index, prefix)))
    if output_fmt == "NCHW":
        embed = model.patch_embed if hasattr(model, "patch_embed") else model.embeds  # NaFlexVit: embeds
        hw = embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        inter = [_to_nchw(y, hw) for y in inter]
    if output_dict:
        out = {"image_intermediates": inter}
        if prefix_tokens is not None and return_prefix_tokens:
            out["image_intermediates_prefix"] = prefix_tokens
        if not intermediates_only:
            out["image_features"] = final
        return out
    if return_prefix_tokens and prefix_tokens is not None:
        inter = list(zip(inter, prefix_tokens))
    if intermediates_only:
        return inter
    return final, inter
