"""Paint which image patches ended up in the same token (``tocom-hub visualize``).

The model runs once with source tracing on (``tocom_hub.patch(model, trace_source=True)``);
:func:`tocom_hub.get_source` says which input tokens every output token holds. Prefix tokens
(class / distillation / register) are dropped — rows and columns — and every remaining output token
becomes one *group* of patches with one colour. With ToMe every patch belongs to exactly one group,
so the number of groups equals the number of tokens left after the last block (prefix excluded).
With EViT every kept token holds one patch; the patches of pruned tokens belong to no group and are
painted grey (darkened in the overlay).

The PNG has three panels side by side: the input as the model saw it (timm's eval transform, then
de-normalised), the groups blended over it with group borders, and the groups as flat colours
(exact RGB, no blending, no borders — one colour per group, so the groups can be counted from the
pixels). A side-car JSON records the counts and where each panel lies. Example::

    from tocom_hub.tools.visualize import visualize
    info = visualize(model, "cat.jpg", r=8, output="merged.png")
    print(info["tokens_left"], info["groups"])
"""

from __future__ import annotations

import colorsys
import math
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..core.jsonio import write_json
from ..core.patch import get_method, get_r, get_source, patch, set_r
from ..core.preserve import preserved

__all__ = ["token_groups", "distinct_colors", "render", "visualize", "PRUNED_COLOR"]

PRUNED_COLOR = (128, 128, 128)  # flat panel colour of pruned (EViT) patches; never a group colour
PANEL_PX = 320  # target side of a panel in pixels (cells are whole pixels)


def _grid(model: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
    ph, pw = model.patch_embed.patch_size
    return x.shape[-2] // ph, x.shape[-1] // pw


@torch.no_grad()
def token_groups(model: nn.Module, x: torch.Tensor) -> Tuple[np.ndarray, int]:
    """Run ``x`` (one image, ``[1, 3, H, W]``) through a model patched with ``trace_source=True`` and map
    every patch to its output token.

    Returns ``(groups, tokens_left)``: ``groups`` is an ``[gh, gw]`` int array, the index of the output
    token (prefix excluded, numbered in raster order of each token's first patch) holding each patch,
    ``-1`` for a pruned patch; ``tokens_left`` is the number of non-prefix output tokens.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image of shape [1, 3, H, W]; got {tuple(x.shape)}")
    if get_method(model) is None:
        raise ValueError("patch the model first: tocom_hub.patch(model, method=..., trace_source=True)")
    model(x)
    gh, gw = _grid(model, x)
    prefix = int(model.num_prefix_tokens)
    source = get_source(model)
    if source is None:
        r = get_r(model)
        if any(r) if isinstance(r, list) else r:
            raise ValueError("no source trace was recorded: patch the model with trace_source=True")
        return np.arange(gh * gw).reshape(gh, gw), gh * gw  # nothing merged: one token per patch
    src = source[0, prefix:, prefix:]  # [tokens left, patches]
    if src.shape[1] != gh * gw:
        raise RuntimeError(f"source trace has {src.shape[1]} patch columns, the grid has {gh}x{gw}")
    owned = src > 0
    owner = owned.float().argmax(dim=0)  # first row holding the patch
    owner[~owned.any(dim=0)] = -1
    owner = owner.cpu().numpy()
    # renumber tokens by their first patch in raster order: colours do not depend on token order
    order: Dict[int, int] = {}
    for t in owner.tolist():
        if t >= 0 and t not in order:
            order[t] = len(order)
    groups = np.array([order.get(t, -1) for t in owner.tolist()], dtype=np.int64).reshape(gh, gw)
    return groups, int(src.shape[0])


def distinct_colors(n: int) -> np.ndarray:
    """``[n, 3]`` uint8 colours, pairwise distinct, saturated (never grey, black or white).

    Hues follow the golden-ratio sequence (neighbouring indices look different); saturation and
    value cycle through three levels each. Any exact RGB collision is nudged away.
    """
    out: List[Tuple[int, int, int]] = []
    used = set()
    sats, vals = (0.85, 0.55, 0.7), (0.95, 0.75, 0.6)
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        s, v = sats[i % 3], vals[(i // 3) % 3]
        while True:
            rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))
            if rgb not in used and rgb != PRUNED_COLOR:
                break
            h = (h + 0.0007) % 1.0
        used.add(rgb)
        out.append(rgb)
    return np.array(out, dtype=np.uint8).reshape(n, 3)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render(
    image: np.ndarray,
    groups: np.ndarray,
    *,
    alpha: float = 0.5,
    cell: Optional[int] = None,
    caption: Optional[str] = None,
    titles: Tuple[str, str, str] = ("input", "merged tokens", "one colour per token"),
):
    """The three-panel picture: ``(PIL.Image, layout)``.

    ``image``: ``[H, W, 3]`` uint8, the model's input. ``groups``: from :func:`token_groups`.
    ``layout`` has ``cell_px``, ``panels`` (``{"input" | "overlay" | "groups": [x, y, w, h]}``),
    ``colors`` (group index → RGB) and ``pruned_color``.
    """
    from PIL import Image, ImageDraw

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    gh, gw = groups.shape
    cell = cell or max(4, math.ceil(PANEL_PX / max(gh, gw)))
    ph, pw = gh * cell, gw * cell
    n = int(groups.max()) + 1 if (groups >= 0).any() else 0
    colors = distinct_colors(n)
    labels = np.repeat(np.repeat(groups, cell, axis=0), cell, axis=1)  # [ph, pw]
    pruned = labels < 0

    flat = np.empty((ph, pw, 3), dtype=np.uint8)
    flat[pruned] = PRUNED_COLOR
    flat[~pruned] = colors[labels[~pruned]]

    base = np.asarray(Image.fromarray(image).resize((pw, ph), Image.BICUBIC), dtype=np.float32)
    over = base.copy()
    over[~pruned] = (1 - alpha) * base[~pruned] + alpha * flat[~pruned].astype(np.float32)
    over[pruned] = base[pruned] * 0.3 + 0.7 * 40.0  # pruned: darkened
    edge = np.zeros((ph, pw), dtype=bool)  # group borders (both sides of a change of label)
    diff_x = labels[:, 1:] != labels[:, :-1]
    diff_y = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    over[edge] = 255.0
    over = np.clip(over + 0.5, 0, 255).astype(np.uint8)

    margin, gap = 12, 12
    font = _font(15)
    text_h = 28 if caption else 0
    label_h = 22
    width = 2 * margin + 3 * pw + 2 * gap
    height = margin + label_h + ph + text_h + margin
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    panels = {}
    arrays = (("input", base.clip(0, 255).astype(np.uint8)), ("overlay", over), ("groups", flat))
    for k, ((name, arr), title) in enumerate(zip(arrays, titles)):
        x0, y0 = margin + k * (pw + gap), margin + label_h
        canvas.paste(Image.fromarray(arr), (x0, y0))
        draw.text((x0, margin), title, fill=(0, 0, 0), font=font)
        panels[name] = [x0, y0, pw, ph]
    if caption:
        draw.text((margin, margin + label_h + ph + 8), caption, fill=(0, 0, 0), font=font)
    layout = {"cell_px": cell, "panels": panels, "colors": colors.tolist(), "pruned_color": list(PRUNED_COLOR)}
    return canvas, layout


def _load_image(path: Union[str, os.PathLike]):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not an image Pillow can read ({e})") from None


@torch.no_grad()
def visualize(
    model: nn.Module,
    image: Any,
    r: int,
    output: Union[str, os.PathLike],
    *,
    method: Optional[str] = None,
    bank: Any = None,
    source_r: int = 0,
    scale: Optional[float] = None,
    alpha: float = 0.5,
    cell: Optional[int] = None,
    json_path: Union[str, os.PathLike, None] = None,
    title: Optional[str] = None,
) -> Dict[str, Any]:
    """Write the merged-groups PNG of ``image`` at ``r`` and its side-car JSON; returns the JSON dict.

    ``image``: a path or a PIL image (resized / cropped with the model's timm eval transform).
    ``bank``: optional ToCom bank applied merged for ``source_r → r`` (it changes what merges).
    ``json_path`` defaults to ``output`` with ``.json``. The model is left as found (patch state, ``r``,
    bank, train/eval mode). The JSON has ``tokens_left`` (non-prefix
    tokens after the last block), ``groups`` (colour groups painted; equal to ``tokens_left``),
    ``pruned_patches``, ``grid``, ``prefix_tokens``, ``cell_px`` and ``panels`` (``[x, y, w, h]`` of
    ``input`` / ``overlay`` / ``groups``).
    """
    from PIL import Image

    from ..core.compensation.api import apply
    from .images import eval_transform

    pil = image if isinstance(image, Image.Image) else _load_image(image)
    if bank is not None:
        from ..hub.load import load_bank

        bank = load_bank(bank)
        if method is not None and method != bank.method:
            raise ValueError(f"the bank was trained for {bank.method!r} but method={method!r} was requested")
        method = bank.method
    method = method or "tome"
    with preserved(model):  # the model is left as found: patch state, r, bank, train/eval mode
        patch(model, method=method, trace_source=True)
        set_r(model, r)  # validates r (ValueError) before anything runs
        if bank is not None:
            apply(model, source_r, r, bank=bank, scale=scale, merge=True)
        tf, cfg = eval_transform(model)
        x = tf(pil)[None]
        param = next(model.parameters())
        model.eval()
        groups, left = token_groups(model, x.to(param.device, param.dtype))
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    shown = ((x[0].float() * std + mean).clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()

    n_groups = int(len(np.unique(groups[groups >= 0])))
    pruned = int((groups < 0).sum())
    prefix = int(model.num_prefix_tokens)
    name = {"tome": "ToMe", "evit": "EViT"}[method]
    caption = title or (
        f"{name} r={r}: {groups.size} patches -> {left} tokens"
        + (f" (+{prefix} prefix)" if prefix else "")
        + (f", {pruned} patches pruned (grey)" if pruned else "")
    )
    titles = (
        "input",
        "merged tokens" if method == "tome" else "kept tokens (pruned: dark)",
        "one colour per token" + ("" if method == "tome" else ", pruned: grey"),
    )
    canvas, layout = render(shown, groups, alpha=alpha, cell=cell, caption=caption, titles=titles)
    output = os.fspath(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    canvas.save(output, format="PNG")
    info = {
        "image": os.fspath(image) if not isinstance(image, Image.Image) else None,
        "output": output,
        "method": method,
        "r": r,
        "source_r": source_r if bank is not None else None,
        "bank": bank is not None,
        "grid": list(groups.shape),
        "patches": int(groups.size),
        "prefix_tokens": prefix,
        "tokens_left": left,
        "groups": n_groups,
        "pruned_patches": pruned,
        **layout,
    }
    json_path = os.fspath(json_path) if json_path is not None else os.path.splitext(output)[0] + ".json"
    write_json(json_path, info, default=None)
    info["json"] = json_path
    return info
