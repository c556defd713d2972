"""Embedded datasets: small image-classification tasks built from images shipped in PyPI packages.

They let every training script run offline, on a laptop CPU, with no dataset download: the default of
``training/distill.py`` (ToCom bank self-distillation) and ``training/finetune.py`` (downstream model
at a source ``r``). They are a *registry*: :func:`build_dataset` builds one by name, :func:`list_datasets`
lists them, :func:`register_dataset` adds one (study datasets live here too)::

    from tocom_hub.data import build_dataset, list_datasets
    print(list_datasets())          # ['photo-crops', 'photo-jigsaw', 'photo-orientation', 'photo-regions', ...]
    ds = build_dataset("photo-crops", split="train", img_size=32)
    img, label = ds[0]                                       # PIL.Image 32×32 RGB, int

Items are ``(PIL.Image, int)`` pairs, like a torchvision/timm image dataset with ``transform=None``,
so timm's transforms (``timm.data.create_transform``) apply unchanged. Every item is a pure function
of ``(seed, split, index)``: the same index gives the same image on every process, worker and run,
and different splits draw from disjoint random streams (held-out crops are never training crops,
although they come from the same photographs).

Datasets
--------
================== ======= ==========================================================================
name               classes what
================== ======= ==========================================================================
photo-crops        15      which photograph a random 24-256 px crop comes from (the embedded default
                           backbone's pre-training task)
photo-orientation  3       is a crop upright, sideways or upside down (natural)
photo-regions      135     which photograph *and which cell of its 3 × 3 grid* a 24-96 px crop comes
                           from: the pre-training corpus of the CPU-scale study (``benchmarks/study``)
photo-jigsaw       360     photograph × permutation of the crop's 2 × 2 quadrants (tried as a study
                           corpus: too hard for the tiny ViT, see benchmarks/study/README.md)
shape-count        6       how many small discs (1-6) on a photograph background (structured, like
                           VTAB's CLEVR-count)
shape-location     9       in which 3 × 3 cell one small disc lies (structured, like dSprites-location;
                           not flip-invariant)
textures           8       which procedural texture family fills the image (texture, like DTD)
================== ======= ==========================================================================

Provenance and licenses
-----------------------
Procedural content (discs, textures, the jigsaw shuffle) is drawn by tocom-hub's own code (Apache-2.0);
everything else is pixels of the photographs below.

The photographs are scikit-image's bundled sample data (``skimage.data``; scikit-image itself is
BSD-3-Clause). Only images whose scikit-image docstring states a public-domain / CC0 / "no known
copyright restrictions" status are used; the statement quoted for each is from ``skimage.data.<name>``
(scikit-image 0.26):

================== =====================================================================================
image              license / provenance (as documented by scikit-image)
================== =====================================================================================
astronaut          NASA Great Images (Eileen Collins); "No known copyright restrictions, released into
                   the public domain."
brick              CC0Textures "Bricks25"; Creative Commons CC0 (perspective-transformed, cropped).
camera             "No copyright restrictions. CC0 by the photographer (Lav Varshney)."
cell               Quantitative phase image (Müller et al.); "CC0, dedicated to the public domain."
chelsea            "No copyright restrictions. CC0 by the photographer (Stefan van der Walt)."
clock              "Released into the public domain by the photographer (Stefan van der Walt)."
coffee             Pikolo Espresso Bar; "No copyright restrictions. CC0 by the photographer (Rachel
                   Michetti)."
coins              Brooklyn Museum Collection; "No known copyright restrictions."
grass              DeviantArt "Grass-01" (linolafett); Creative Commons CC0 (cropped, grayscale).
gravel             CC0Textures "Gravel04"; Creative Commons CC0 (rescaled, cropped, grayscale).
hubble_deep_field  HubbleSite / NASA; "may be freely used in the public domain".
immunohistochemistry  Center for Microscopy And Molecular Imaging (CMMI); "No known copyright
                   restrictions."
retina             Wikimedia Commons (Mikael Häggström); CC0 1.0 Universal Public Domain Dedication.
rocket             SpaceX launch of DSCOVR; "released in the public domain".
text               Wikipedia "Corner.png"; "No known copyright restrictions, released into the public
                   domain."
================== =====================================================================================

Images without a stated license in scikit-image (``moon``, ``page``, ``logo``, ``colorwheel``, …) and
images that need a download (``pooch``) are not used. Nothing is redistributed by tocom-hub: the
pixels are read from the installed scikit-image at run time.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from ..core.checks import is_int

__all__ = [
    "DatasetSpec",
    "PhotoCrops",
    "PHOTOS",
    "ORIENTATION_PHOTOS",
    "register_dataset",
    "build_dataset",
    "list_datasets",
    "get_dataset_spec",
    "SPLITS",
    "canonical_split",
]

# scikit-image sample photographs with a public-domain / CC0 / no-known-restrictions statement
PHOTOS: Tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
    "text",
)
# photographs whose upright orientation is recognisable (no isotropic textures / star fields)
ORIENTATION_PHOTOS: Tuple[str, ...] = (
    "astronaut",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "rocket",
    "text",
)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "eval": "val",
    "test": "test",
}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


# ---------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class DatasetSpec:
    """A registered embedded dataset.

    Attributes:
        name: registry name (``--data NAME`` in the training scripts).
        builder: ``builder(split=..., img_size=..., length=..., seed=...) -> Dataset``.
        num_classes: number of labels.
        description: one line for ``--help`` and logs.
        lengths: default number of items per split.
        license: where the pixels come from and under which terms.
    """

    name: str
    builder: Callable[..., Dataset]
    num_classes: int
    description: str
    lengths: Dict[str, int]
    license: str


_REGISTRY: Dict[str, DatasetSpec] = {}


def register_dataset(
    name: str, *, num_classes: int, description: str, lengths: Dict[str, int], license: str
) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator registering ``builder(split, img_size, length, seed) -> Dataset`` under ``name``.

    Example::

        @register_dataset("my-set", num_classes=10, description="…", lengths={"train": 1000, "val": 200,
                          "test": 200}, license="CC0")
        def _build(split, img_size, length, seed):
            return MyDataset(split, img_size, length, seed)
    """
    if name in _REGISTRY:
        raise ValueError(f"an embedded dataset named {name!r} is already registered")
    missing = [s for s in SPLITS if s not in lengths]
    if missing:
        raise ValueError(f"lengths must give a default size for every split {SPLITS}; missing {missing}")

    def wrap(builder: Callable[..., Dataset]) -> Callable[..., Dataset]:
        _REGISTRY[name] = DatasetSpec(name, builder, num_classes, description, dict(lengths), license)
        return builder

    return wrap


def canonical_split(split: str) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for a split name or alias (``"validation"``, ``"eval"``, …)."""
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_ALIASES)}; got {split!r}")
    return _SPLIT_ALIASES[split]


def list_datasets() -> List[str]:
    """Names of the registered embedded datasets."""
    return sorted(_REGISTRY)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` registered as ``name`` (``KeyError`` with the known names otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no embedded dataset named {name!r}; known: {list_datasets()}") from None


def build_dataset(
    name: str, split: str = "train", img_size: int = 32, *, length: Optional[int] = None, seed: int = 0
) -> Dataset:
    """Build the embedded dataset ``name`` for ``split`` (``train`` / ``val`` / ``test``).

    Args:
        name: a name from :func:`list_datasets`.
        split: ``"train"``, ``"val"`` (aliases ``"validation"``, ``"eval"``) or ``"test"``.
        img_size: side of the square images returned.
        length: number of items (default: the dataset's size for that split).
        seed: dataset seed; the images are a pure function of ``(seed, split, index)``.

    The returned dataset has ``num_classes``, ``classes`` and ``license`` attributes. Example::

        val = build_dataset("photo-crops", "val", img_size=32, length=256)
        print(len(val), val.num_classes, val.classes[:3])
    """
    spec = get_dataset_spec(name)
    split = canonical_split(split)
    if not is_int(img_size) or img_size < 4:
        raise ValueError(f"img_size must be an int >= 4; got {img_size!r}")
    n = spec.lengths[split] if length is None else length
    if not is_int(n) or n < 1:
        raise ValueError(f"length must be a positive int; got {length!r}")
    ds = spec.builder(split=split, img_size=img_size, length=n, seed=seed)
    ds.license = spec.license
    return ds


# ---------------------------------------------------------------------------------------------------
# scikit-image photographs


_PHOTO_CACHE: Dict[str, np.ndarray] = {}


def _load_photo(name: str) -> np.ndarray:
    """``H × W × 3`` uint8 RGB array of the scikit-image sample ``name`` (cached per process)."""
    if name not in _PHOTO_CACHE:
        try:
            import skimage.data
        except ImportError as e:  # pragma: no cover - skimage is a training extra
            raise ImportError(
                "the embedded photo datasets read scikit-image's sample images: pip install scikit-image"
            ) from e
        img = np.asarray(getattr(skimage.data, name)())
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = np.ascontiguousarray(img[:, :, :3].astype(np.uint8))
        _PHOTO_CACHE[name] = img
    return _PHOTO_CACHE[name]


def _stream_seed(*parts: object) -> List[int]:
    """A stable ``SeedSequence`` entropy list from arbitrary parts (str/int), independent of hash salt."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


class PhotoCrops(Dataset):
    """Random square crops of scikit-image sample photographs, resized to ``img_size``.

    ``task="source"``: the label is the photograph the crop comes from ("which photo is this crop
    from", ``len(photos)`` classes; a random horizontal flip is part of the sampling).
    ``task="orientation"``: the crop is shown upright (label 0), turned by 90° or 270° ("sideways",
    label 1) or upside down (label 2). The three classes are invariant under horizontal flips (a
    flipped 90° turn is a 270° turn of the flipped photo), so DeiT-style augmentation, which flips,
    cannot contradict the labels; 0/90/180/270 as four classes could not survive a flip.

    Item ``i`` draws photo, crop side (uniform in ``[min_crop, min(max_crop, H, W)]``), position (and
    flip / turn) from a generator seeded with ``(seed, task, split, i)``; the class of item ``i`` is
    ``i mod num_classes`` (balanced), so any prefix of the dataset is near-balanced.
    """

    def __init__(
        self,
        photos: Sequence[str],
        split: str,
        img_size: int,
        length: int,
        seed: int = 0,
        task: str = "source",
        min_crop: int = 24,
        max_crop: int = 256,
    ) -> None:
        if task not in ("source", "orientation"):
            raise ValueError(f"task must be 'source' or 'orientation'; got {task!r}")
        self.photos = tuple(photos)
        self.split, self.img_size, self.length, self.seed, self.task = split, img_size, length, seed, task
        self.min_crop, self.max_crop = min_crop, max_crop
        if task == "source":
            self.classes = list(self.photos)
        else:
            self.classes = ["upright", "sideways", "upside-down"]
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        from PIL import Image

        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} items")
        rng = np.random.default_rng(_stream_seed("photo-crops", self.seed, self.task, self.split, index))
        label = index % self.num_classes
        if self.task == "source":
            photo = self.photos[label]
        else:
            photo = self.photos[int(rng.integers(len(self.photos)))]
        img = _load_photo(photo)
        h, w = img.shape[:2]
        hi = max(min(self.max_crop, h, w), self.min_crop)
        side = int(rng.integers(min(self.min_crop, h, w), min(hi, h, w) + 1))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = img[y : y + side, x : x + side]
        if self.task == "source":
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
        else:
            turns = {0: 0, 2: 2}.get(label, 1 + 2 * int(rng.integers(2)))  # sideways: 90° or 270°
            crop = np.rot90(crop, k=turns)
        pil = Image.fromarray(np.ascontiguousarray(crop))
        return pil.resize((self.img_size, self.img_size), Image.BICUBIC), label

    def extra_repr(self) -> str:  # pragma: no cover - cosmetic
        return f"task={self.task}, split={self.split}, img_size={self.img_size}, length={self.length}"


_SKIMAGE_LICENSE = (
    "scikit-image sample photographs (skimage.data; public domain / CC0 / no known copyright restrictions "
    "per scikit-image's docstrings; see tocom_hub/demo/data.py)"
)


@register_dataset(
    "photo-crops",
    num_classes=len(PHOTOS),
    description=f"which of {len(PHOTOS)} scikit-image photographs a random 24-256 px crop comes from",
    lengths={"train": 12_800, "val": 1_024, "test": 1_024},
    license=_SKIMAGE_LICENSE,
)
def _photo_crops(split: str, img_size: int, length: int, seed: int) -> Dataset:
    return PhotoCrops(PHOTOS, split, img_size, length, seed, task="source")


@register_dataset(
    "photo-orientation",
    num_classes=3,
    description=(
        f"is a random crop of {len(ORIENTATION_PHOTOS)} scikit-image photographs upright, sideways or upside down"
    ),
    lengths={"train": 6_400, "val": 1_024, "test": 1_024},
    license=_SKIMAGE_LICENSE,
)
def _photo_orientation(split: str, img_size: int, length: int, seed: int) -> Dataset:
    return PhotoCrops(ORIENTATION_PHOTOS, split, img_size, length, seed, task="orientation", min_crop=48)


# ---------------------------------------------------------------------------------------------------
# study datasets (benchmarks/study): a many-class pre-training corpus and downstream tasks of different
# kinds, all from the scikit-image photographs above or drawn procedurally (no third-party pixels)


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
        canvas = _photo_background(rng, n) * 0.6
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
        canvas = _photo_background(rng, n) * 0.6
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
    "no known copyright restrictions; see tocom_hub/demo/data.py)"
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
