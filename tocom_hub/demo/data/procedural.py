"""The study datasets (``benchmarks/study``): a many-class pre-training corpus and downstream tasks of
different kinds, all cut from the scikit-image photographs or drawn procedurally (no third-party pixels)."""

from __future__ import annotations

import itertools
from typing import List, Tuple

import numpy as np
from torch.utils.data import Dataset

from .photos import _SKIMAGE_LICENSE, PHOTOS, _load_photo, _stream_seed
from .registry import register_dataset


def _rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(_stream_seed(*parts))


def _to_pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8)))


def _resized_crop(img: np.ndarray, y: int, x: int, side: int, size: int) -> np.ndarray:
    from PIL import Image

    crop = Image.fromarray(np.ascontiguousarray(img[y : y + side, x : x + side]))
    return np.asarray(crop.resize((size, size), Image.BICUBIC), dtype=np.float32)


def _photo_background(rng: np.random.Generator, size: int, min_crop: int = 48, max_crop: int = 256) -> np.ndarray:
    """A random crop of a random photograph, resized to ``size`` (float32 ``size × size × 3``)."""
    img = _load_photo(PHOTOS[int(rng.integers(len(PHOTOS)))])
    h, w = img.shape[:2]
    side = int(rng.integers(min(min_crop, h, w), min(max_crop, h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    out = _resized_crop(img, y, x, side, size)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
    c = rng.random(3)
    c = c / max(c.max(), 1e-6)
    return (0.35 + 0.65 * c) * 255.0


class _Procedural(Dataset):
    """Base of the study datasets: item ``i`` has label ``i mod num_classes`` (balanced) and pixels that
    are a pure function of ``(name, seed, split, i)``; subclasses implement ``render(rng, label)``."""

    name = "procedural"
    classes: List[str] = []
    # the canvas a structured task draws on, ``(rng, size) -> [size, size, 3]`` (a subclass may replace it)
    background = staticmethod(_photo_background)

    def __init__(self, split: str, img_size: int, length: int, seed: int = 0) -> None:
        self.split, self.img_size, self.length, self.seed = split, img_size, length, seed
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return self.length

    def render(self, rng: np.random.Generator, label: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} items")
        label = index % self.num_classes
        return _to_pil(self.render(_rng(self.name, self.seed, self.split, index), label)), label


class PhotoRegions(_Procedural):
    """Pre-training corpus: "which photograph, and which cell of a ``grid × grid`` partition of it, is this
    crop from" (15 photographs × 9 cells = 135 classes). A crop (side 24-96 px, at most the cell) lies
    inside its cell; the fine-grained label needs texture and layout, not colour statistics."""

    name = "photo-regions"

    def __init__(self, split: str, img_size: int, length: int, seed: int = 0, grid: int = 3) -> None:
        self.grid = grid
        self.classes = [f"{p}/{i // grid},{i % grid}" for p in PHOTOS for i in range(grid * grid)]
        super().__init__(split, img_size, length, seed)

    def render(self, rng: np.random.Generator, label: int) -> np.ndarray:
        photo, cell = divmod(label, self.grid * self.grid)
        img = _load_photo(PHOTOS[photo])
        h, w = img.shape[:2]
        ch, cw = h // self.grid, w // self.grid
        cy, cx = divmod(cell, self.grid)
        side = int(rng.integers(min(24, ch, cw), min(96, ch, cw) + 1))
        y = cy * ch + int(rng.integers(0, ch - side + 1))
        x = cx * cw + int(rng.integers(0, cw - side + 1))
        return _resized_crop(img, y, x, side, self.img_size)


class PhotoJigsaw(_Procedural):
    """Pre-training corpus: "which photograph is this, and how were its 2 × 2 quadrants shuffled"
    (15 photographs × 24 permutations = 360 classes). A 48-192 px crop is resized to ``img_size`` and its
    quadrants are permuted; the permutation is only readable from how content continues across the
    quadrant borders and where it sits, so the task needs spatial layout, not colour statistics."""

    name = "photo-jigsaw"
    PERMS = tuple(itertools.permutations(range(4)))

    def __init__(self, split: str, img_size: int, length: int, seed: int = 0) -> None:
        self.classes = [f"{p}/{''.join(map(str, q))}" for p in PHOTOS for q in self.PERMS]
        super().__init__(split, img_size, length, seed)

    def render(self, rng: np.random.Generator, label: int) -> np.ndarray:
        photo, perm = divmod(label, len(self.PERMS))
        img = _load_photo(PHOTOS[photo])
        h, w = img.shape[:2]
        side = int(rng.integers(min(48, h, w), min(192, h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        n = self.img_size - self.img_size % 2
        crop = _resized_crop(img, y, x, side, n)
        q = n // 2
        tiles = [crop[:q, :q], crop[:q, q:], crop[q:, :q], crop[q:, q:]]
        t = [tiles[i] for i in self.PERMS[perm]]
        out = np.zeros((self.img_size, self.img_size, 3), np.float32)
        out[:n, :n] = np.concatenate([np.concatenate(t[:2], 1), np.concatenate(t[2:], 1)], 0)
        return out


def _disc(canvas: np.ndarray, cy: float, cx: float, radius: float, colour: np.ndarray) -> None:
    n = canvas.shape[0]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    alpha = np.clip(radius + 0.5 - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2), 0.0, 1.0)[..., None]
    canvas *= 1.0 - alpha
    canvas += alpha * colour


class ShapeCount(_Procedural):
    """Structured (CLEVR-count-like): how many small discs (1-6) lie on a photograph background."""

    name = "shape-count"
    classes = [str(k) for k in range(1, 7)]

    def render(self, rng: np.random.Generator, label: int) -> np.ndarray:
        n = self.img_size
        canvas = self.background(rng, n) * 0.6
        radius = n / 16.0
        placed: List[Tuple[float, float]] = []
        while len(placed) < label + 1:
            cy, cx = rng.uniform(radius + 1, n - radius - 1, size=2)
            if all((cy - py) ** 2 + (cx - px) ** 2 > (2.6 * radius) ** 2 for py, px in placed):
                placed.append((cy, cx))
        for cy, cx in placed:
            _disc(canvas, cy, cx, radius, _bright_colour(rng))
        return canvas


class ShapeLocation(_Procedural):
    """Structured (dSprites-location-like): in which of 3 × 3 cells one small disc lies, on a photograph
    background. Not flip-invariant: fine-tune it without flips (``--no-augment``)."""

    name = "shape-location"
    classes = [f"{i // 3},{i % 3}" for i in range(9)]

    def render(self, rng: np.random.Generator, label: int) -> np.ndarray:
        n = self.img_size
        canvas = self.background(rng, n) * 0.6
        radius = n / 16.0
        cy, cx = divmod(label, 3)
        cell = n / 3.0
        y = cy * cell + rng.uniform(radius, cell - radius)
        x = cx * cell + rng.uniform(radius, cell - radius)
        _disc(canvas, y, x, radius, _bright_colour(rng))
        return canvas


class Textures(_Procedural):
    """Texture (DTD-like): which of 8 procedural texture families fills the image, under random scale,
    orientation, phase and two random colours."""

    name = "textures"
    classes = ["stripes", "plaid", "checker", "dots", "rings", "noise", "blobs", "zigzag"]

    def render(self, rng: np.random.Generator, label: int) -> np.ndarray:
        n = self.img_size
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
        theta = rng.uniform(0, np.pi)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        f = rng.uniform(3.0, 7.0)
        ph = rng.uniform(0, 2 * np.pi, size=2)
        kind = self.classes[label]
        if kind == "stripes":
            t = np.sin(2 * np.pi * f * u + ph[0])
        elif kind == "plaid":
            t = 0.5 * (np.sin(2 * np.pi * f * u + ph[0]) + np.sin(2 * np.pi * f * v + ph[1]))
        elif kind == "checker":
            t = np.sign(np.sin(2 * np.pi * f * u / 1.5 + ph[0]) * np.sin(2 * np.pi * f * v / 1.5 + ph[1]))
        elif kind == "dots":
            t = (np.cos(2 * np.pi * f * u + ph[0]) * np.cos(2 * np.pi * f * v + ph[1]) > 0.5) * 2.0 - 1.0
        elif kind == "rings":
            c = rng.uniform(0.0, 1.0, size=2)
            t = np.sin(2 * np.pi * f * np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2) + ph[0])
        elif kind == "noise":
            t = rng.standard_normal((n, n)).astype(np.float32)
        elif kind == "blobs":
            low = rng.standard_normal((n // 8 + 2, n // 8 + 2)).astype(np.float32)
            from PIL import Image

            t = np.asarray(Image.fromarray(low, mode="F").resize((n, n), Image.BICUBIC))
            t = np.sign(t)
        else:  # zigzag
            t = np.sign(np.sin(2 * np.pi * f * u + 1.5 * np.abs(((v * f * 2) % 2) - 1) * np.pi + ph[0]))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        c0, c1 = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
        img = c0 + (c1 - c0) * t[..., None]
        return img + rng.normal(0, 8.0, size=img.shape)


_STUDY_LICENSE = (
    "procedural (tocom-hub, Apache-2.0) on scikit-image sample photographs (public domain / CC0 / "
    "no known copyright restrictions; see tocom_hub/demo/data/photos.py)"
)

_STUDY_DATASETS = (
    (
        PhotoRegions,
        135,
        "which of 15 photographs and which of its 3×3 cells a 24-96 px crop comes from",
        {"train": 204_800, "val": 2_048, "test": 2_048},
        _SKIMAGE_LICENSE,
    ),
    (
        PhotoJigsaw,
        360,
        "which of 15 photographs a 48-192 px crop comes from and how its 2×2 quadrants were shuffled",
        {"train": 204_800, "val": 2_048, "test": 2_048},
        _SKIMAGE_LICENSE,
    ),
    (
        ShapeCount,
        6,
        "how many small discs (1-6) lie on a photograph background",
        {"train": 2_000, "val": 1_000, "test": 1_000},
        _STUDY_LICENSE,
    ),
    (
        ShapeLocation,
        9,
        "in which of 3×3 cells one small disc lies on a photograph background",
        {"train": 2_000, "val": 1_000, "test": 1_000},
        _STUDY_LICENSE,
    ),
    (
        Textures,
        8,
        "which of 8 procedural texture families (stripes, plaid, checker, dots, rings, noise, blobs, "
        "zigzag) fills the image",
        {"train": 2_000, "val": 1_000, "test": 1_000},
        "procedural (tocom-hub, Apache-2.0)",
    ),
)

for _cls, _k, _desc, _lengths, _lic in _STUDY_DATASETS:
    register_dataset(_cls.name, num_classes=_k, description=_desc, lengths=_lengths, license=_lic)(
        lambda split, img_size, length, seed, _c=_cls: _c(split, img_size, length, seed)
    )
