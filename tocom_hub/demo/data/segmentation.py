"""``photo-segments``: the embedded semantic-segmentation dataset (pixel masks, 5 classes).

Every image is a random crop of a scikit-image photograph (class 0, ``background``, darkened) with 1-4
procedural objects painted over it in order, each of a random size, position and colour:

=========== ===== ===================================================================================
class       index what is painted
=========== ===== ===================================================================================
background  0     the photograph
disc        1     a filled disc in one colour
square      2     a filled axis-aligned square in one colour
triangle    3     a filled isosceles triangle, apex up or down, in one colour
stripes     4     a square filled with stripes of two colours at a random angle (a texture, not a shape)
=========== ===== ===================================================================================

Edges are hard (no anti-aliasing), so the mask is exact: a pixel belongs to the last object drawn
over it (painter's order), otherwise to the background, and its colour is that object's. Objects
differ by shape or texture, never by colour (colours are drawn independently of the class), so the task
needs the patch layout, not colour statistics. Items are ``(PIL.Image, mask)`` with ``mask`` an
``[H, W]`` ``int64`` array of class indices; item ``i`` is a pure function of ``(seed, split, i)``
(:meth:`PhotoSegments.objects` returns the drawing list of an item, for tests and visualisations)::

    from tocom_hub.demo.data import build_dataset
    ds = build_dataset("photo-segments", "test", img_size=32)
    img, mask = ds[0]          # PIL 32×32 RGB, int64 [32, 32] in {0, …, 4}
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
from torch.utils.data import Dataset

from .photos import PHOTOS
from .procedural import _STUDY_LICENSE, _bright_colour, _photo_background, _rng, _to_pil
from .registry import register_dataset

__all__ = ["PhotoSegments", "SEGMENT_CLASSES", "shape_mask"]

SEGMENT_CLASSES: Tuple[str, ...] = ("background", "disc", "square", "triangle", "stripes")


def shape_mask(obj: Dict[str, Any], size: int) -> np.ndarray:
    """``[size, size]`` bool: the pixels (centres at ``+0.5``) that object ``obj`` covers.

    ``obj`` is one entry of :meth:`PhotoSegments.objects`: ``kind`` plus ``cy``, ``cx`` (centre, px) and
    ``half`` (radius / half side, px); triangles also have ``up`` (apex up).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dy, dx, h = yy - obj["cy"], xx - obj["cx"], obj["half"]
    kind = obj["kind"]
    if kind == "disc":
        return dy * dy + dx * dx <= h * h
    if kind in ("square", "stripes"):
        return (np.abs(dy) <= h) & (np.abs(dx) <= h)
    if kind == "triangle":
        t = (dy + h) / (2 * h) if obj["up"] else (h - dy) / (2 * h)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)
    raise ValueError(f"unknown object kind {kind!r}")


class PhotoSegments(Dataset):
    """Procedural objects on crops of the scikit-image photographs, with their exact pixel masks.

    Args:
        split, img_size, length, seed: as every embedded dataset (``build_dataset``).
        max_objects: at most this many objects per image (at least 1).
        min_frac, max_frac: object radius / half side as a fraction of ``img_size``.
    """

    name = "photo-segments"
    classes: List[str] = list(SEGMENT_CLASSES)

    def __init__(
        self,
        split: str,
        img_size: int,
        length: int,
        seed: int = 0,
        max_objects: int = 4,
        min_frac: float = 0.12,
        max_frac: float = 0.28,
    ) -> None:
        if not 0 < min_frac <= max_frac < 0.5:
            raise ValueError(f"need 0 < min_frac <= max_frac < 0.5; got {min_frac}, {max_frac}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1; got {max_objects}")
        self.split, self.img_size, self.length, self.seed = split, img_size, length, seed
        self.max_objects, self.min_frac, self.max_frac = max_objects, min_frac, max_frac
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return self.length

    def _check(self, index: int) -> None:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} items")

    def _draw(self, index: int) -> Tuple[np.ndarray, List[Dict[str, Any]], np.random.Generator]:
        rng = _rng(self.name, self.seed, self.split, index)
        n = self.img_size
        background = _photo_background(rng, n) * 0.6
        objs: List[Dict[str, Any]] = []
        count = int(rng.integers(1, self.max_objects + 1))
        # the first object's class cycles with the index, so every prefix of the dataset shows every class
        kinds = [1 + index % 4] + [int(k) for k in rng.integers(1, 5, size=count - 1)]
        for label in kinds:
            half = float(rng.uniform(self.min_frac, self.max_frac) * n)
            cy, cx = rng.uniform(0.5 * half, n - 0.5 * half, size=2)  # may stick out up to half its size
            obj: Dict[str, Any] = {"kind": SEGMENT_CLASSES[label], "label": label, "cy": float(cy), "cx": float(cx)}
            obj["half"] = half
            obj["colour"] = _bright_colour(rng).tolist()
            if label == 3:
                obj["up"] = bool(rng.random() < 0.5)
            if label == 4:
                obj["colour2"] = (rng.uniform(0, 255, size=3) * 0.5).tolist()
                obj["angle"] = float(rng.uniform(0, np.pi))
                obj["period"] = float(rng.uniform(3.0, 6.0))
            objs.append(obj)
        return background, objs, rng

    def objects(self, index: int) -> List[Dict[str, Any]]:
        """The objects of item ``index`` in drawing order (``kind``, ``label``, ``cy``, ``cx``, ``half``, …)."""
        self._check(index)
        return self._draw(index)[1]

    def __getitem__(self, index: int):
        self._check(index)
        canvas, objs, rng = self._draw(index)
        n = self.img_size
        mask = np.zeros((n, n), dtype=np.int64)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
        for obj in objs:
            inside = shape_mask(obj, n)
            if obj["kind"] == "stripes":
                u = xx * np.cos(obj["angle"]) + yy * np.sin(obj["angle"])
                on = (np.floor(u / obj["period"]) % 2 == 0)[inside]
                fill = np.where(on[:, None], np.asarray(obj["colour"]), np.asarray(obj["colour2"]))
            else:
                fill = np.asarray(obj["colour"])
            canvas[inside] = fill
            mask[inside] = obj["label"]
        canvas += rng.normal(0.0, 4.0, size=canvas.shape)  # sensor noise: no class is one flat colour
        return _to_pil(canvas), mask

    def extra_repr(self) -> str:  # pragma: no cover - cosmetic
        return f"split={self.split}, img_size={self.img_size}, length={self.length}"


@register_dataset(
    PhotoSegments.name,
    num_classes=len(SEGMENT_CLASSES),
    description="semantic segmentation: discs, squares, triangles and striped squares (pixel masks, "
    f"5 classes with background) on crops of {len(PHOTOS)} scikit-image photographs",
    lengths={"train": 4_096, "val": 256, "test": 512},
    license=_STUDY_LICENSE,
    task="segmentation",
)
def _photo_segments(split: str, img_size: int, length: int, seed: int) -> Dataset:
    return PhotoSegments(split, img_size, length, seed)
