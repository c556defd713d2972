"""The scikit-image photographs and the datasets of random crops of them (``photo-crops``,
``photo-orientation``).

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
from typing import Dict, List, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from .registry import register_dataset

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
    "per scikit-image's docstrings; see tocom_hub/demo/data/photos.py)"
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
