"""Paint which patches share an MLP in dense mode, and a Segmenter's predicted mask (``tocom-hub visualize
--dense``).

In dense mode (``patch(dense=True)``, docs/dense.md) no token ever disappears: in every block ``k`` tokens
are merged only for the MLP and the MLP's outputs are copied back. What one block shares is therefore a
grouping of the patches per block: :func:`dense_groups` runs the model once and records, for a chosen
block, which patches went through the MLP as one token (ToMe), or which skipped it (EViT: painted grey,
or with ``fuse_token`` one group holding all of them). The picture has the panels of
:mod:`tocom_hub.tools.visualize` (input, groups over it, flat groups) plus, for a
:class:`~tocom_hub.tools.segmenter.Segmenter`, its predicted mask at that r (one fixed colour per
class). Example::

    from tocom_hub.tools.visualize_dense import visualize_dense
    info = visualize_dense(segmenter, "street.png", r=8, output="dense.png", dense_ratio=2)
    print(info["groups"], info["mask_classes"])
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn

from ..core.dense import merge_positions, prune_positions
from ..core.jsonio import write_json
from ..core.merge import Merge
from ..core.patch import patch, set_r
from ..core.preserve import preserved
from .visualize import _font, _load_image, distinct_colors, render

__all__ = ["dense_groups", "mask_colors", "visualize_dense"]


class _Recorder:
    """A reducer that delegates to the model's own and keeps every plan it makes (one per block, in order)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.plans: List[Any] = []

    def plan(self, *args: Any, **kwargs: Any) -> Any:
        p = self.inner.plan(*args, **kwargs)
        self.plans.append(p)
        return p

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _positions(plan: Any) -> torch.Tensor:
    return merge_positions(plan) if isinstance(plan, Merge) else prune_positions(plan)


@torch.no_grad()
def dense_groups(model: nn.Module, x: torch.Tensor, block: int = -1) -> np.ndarray:
    """``[gh, gw]`` int: for one image ``x`` (``[1, 3, H, W]``) through a model patched with ``dense=True``,
    the MLP token of every patch in block ``block`` (``-1``: the last), numbered in raster order of each
    group's first patch; ``-1`` for a patch that skipped the MLP (EViT without fuse token). With ``r = 0``
    (or a block that merged nothing) every patch is its own group."""
    state = model.__dict__.get("_tocom_state")
    if state is None or not getattr(state, "dense", False):
        raise ValueError("patch the model in dense mode first: tocom_hub.patch(model, dense=True, ...)")
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image of shape [1, 3, H, W]; got {tuple(x.shape)}")
    depth = len(model.blocks)
    if not -depth <= block < depth:
        raise ValueError(f"block must lie in [{-depth}, {depth}); the model has {depth} blocks")
    block = block % depth
    recorder = _Recorder(state.reducer)
    state.reducer = recorder
    try:
        model(x)
    finally:
        state.reducer = recorder.inner
    ph, pw = model.patch_embed.patch_size
    gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
    prefix = int(model.num_prefix_tokens)
    r_blocks = state.r if isinstance(state.r, list) else [state.r] * depth
    merging = [i for i in range(depth) if r_blocks[i] > 0]  # the blocks that planned, in order
    plan = recorder.plans[merging.index(block)] if block in merging else None
    if plan is None:
        return np.arange(gh * gw).reshape(gh, gw)
    owner = _positions(plan)[0, prefix:].cpu().numpy()
    order: Dict[int, int] = {}
    for t in owner.tolist():
        if t >= 0 and t not in order:
            order[t] = len(order)
    return np.array([order.get(t, -1) for t in owner.tolist()], dtype=np.int64).reshape(gh, gw)


def mask_colors(num_classes: int) -> np.ndarray:
    """``[C, 3]`` uint8: class 0 (background) dark grey, the others distinct saturated colours."""
    return np.concatenate([np.array([[40, 40, 40]], np.uint8), distinct_colors(num_classes - 1)])


@torch.no_grad()
def visualize_dense(
    model: nn.Module,
    image: Any,
    r: int,
    output: Union[str, os.PathLike],
    *,
    dense_ratio: int = 32,
    method: str = "tome",
    block: int = -1,
    alpha: float = 0.5,
    cell: Optional[int] = None,
    json_path: Union[str, os.PathLike, None] = None,
) -> Dict[str, Any]:
    """Write the dense MLP-sharing PNG of ``image`` at ``r`` (``k = dense_ratio · r``) and its side-car JSON.

    ``model``: a timm ViT, or a :class:`~tocom_hub.tools.segmenter.Segmenter` (then a fourth panel shows
    its predicted mask at ``r``). ``image``: a path or a PIL image (the backbone's timm eval transform).
    The model is left as found. The JSON has ``groups`` (MLP tokens of the block's patches), ``block``,
    ``k``, ``skipped_patches``, ``grid``, ``panels`` and, for a segmenter, ``mask_classes`` (pixels per class).
    """
    from PIL import Image

    from .images import eval_transform
    from .segmenter import Segmenter

    seg = model if isinstance(model, Segmenter) else None
    backbone = seg.backbone if seg is not None else model
    pil = image if isinstance(image, Image.Image) else _load_image(image)
    with preserved(backbone):
        patch(backbone, method=method, dense=True, dense_ratio=dense_ratio)
        set_r(backbone, r)  # validates r (ValueError) before anything runs
        was = (seg or backbone).training
        (seg or backbone).eval()
        tf, cfg = eval_transform(backbone)
        param = next(backbone.parameters())
        x = tf(pil)[None].to(param.device, param.dtype)
        groups = dense_groups(backbone, x, block)
        pred = seg.predict(x)[0].cpu().numpy() if seg is not None else None
        (seg or backbone).train(was)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    shown = ((x[0].cpu().float() * std + mean).clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()
    n_groups = int(len(np.unique(groups[groups >= 0])))
    skipped = int((groups < 0).sum())
    depth = len(backbone.blocks)
    caption = (
        f"dense {'ToMe' if method == 'tome' else 'EViT'} r={r} (k={dense_ratio * r}), block {block % depth}: "
        f"{groups.size} patches -> {n_groups} MLP tokens" + (f", {skipped} skip the MLP (grey)" if skipped else "")
    )
    titles = ("input", f"patches sharing an MLP (block {block % depth})", "one colour per MLP token")
    canvas, layout = render(shown, groups, alpha=alpha, cell=cell, caption=caption, titles=titles)
    info: Dict[str, Any] = {"r": r, "k": dense_ratio * r, "dense_ratio": dense_ratio, "method": method}
    info.update(block=block % depth, grid=list(groups.shape), groups=n_groups, skipped_patches=skipped)
    if pred is not None:
        canvas, info["mask_classes"] = _add_mask_panel(canvas, layout, pred, seg.num_classes)
    output = os.fspath(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    canvas.save(output, format="PNG")
    info.update(output=output, **layout)
    json_path = os.fspath(json_path) if json_path is not None else os.path.splitext(output)[0] + ".json"
    write_json(json_path, info, default=None)
    info["json"] = json_path
    return info


def _add_mask_panel(canvas: Any, layout: Dict[str, Any], pred: np.ndarray, num_classes: int):
    """``canvas`` widened by a panel of the predicted mask; returns ``(canvas, pixels per class)``."""
    from PIL import Image, ImageDraw

    x0, y0, pw, ph = layout["panels"]["groups"]
    colours = mask_colors(num_classes)
    panel = Image.fromarray(colours[pred]).resize((pw, ph), Image.NEAREST)
    gap = x0 - (layout["panels"]["overlay"][0] + pw)
    wide = Image.new("RGB", (canvas.width + pw + gap, canvas.height), (255, 255, 255))
    wide.paste(canvas, (0, 0))
    px = x0 + pw + gap
    wide.paste(panel, (px, y0))
    ImageDraw.Draw(wide).text((px, layout["panels"]["input"][1] - 22), "predicted mask", fill=(0, 0, 0), font=_font(15))
    layout["panels"]["mask"] = [px, y0, pw, ph]
    layout["mask_colors"] = colours.tolist()
    return wide, np.bincount(pred.ravel(), minlength=num_classes).tolist()
