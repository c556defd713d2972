"""Embedded datasets: small image-classification tasks built from images shipped in PyPI packages.

They let every training script run offline, on a laptop CPU, with no dataset download: the default of
``training/distill.py`` (ToCom bank self-distillation) and ``training/finetune.py`` (downstream model
at a source ``r``). They are a *registry*: :func:`build_dataset` builds one by name, :func:`list_datasets`
lists them, :func:`register_dataset` adds one (study datasets live here too)::

    from tocom_hub.demo.data import build_dataset, list_datasets
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
photo-segments     5       semantic segmentation: items are ``(PIL.Image, mask)``, ``mask`` an ``[H, W]``
                           int64 array (background, disc, square, triangle, stripes; ``segmentation``)
================== ======= ==========================================================================

Modules: ``registry`` (the registry and :func:`build_dataset`), ``photos`` (the scikit-image
photographs, their provenance and licenses, ``photo-crops`` / ``photo-orientation``), ``procedural`` (the
study datasets drawn on them or from scratch).
"""

from .eval_dataset import build_eval_dataset
from .photos import ORIENTATION_PHOTOS, PHOTOS, PhotoCrops
from .procedural import (
    PhotoJigsaw,
    PhotoRegions,
    ShapeCount,
    ShapeLocation,
    Textures,
)
from .registry import (
    SPLITS,
    DatasetSpec,
    build_dataset,
    canonical_split,
    get_dataset_spec,
    list_datasets,
    register_dataset,
)
from .segmentation import SEGMENT_CLASSES, PhotoSegments

__all__ = [
    "DatasetSpec",
    "PhotoCrops",
    "PhotoRegions",
    "PhotoJigsaw",
    "ShapeCount",
    "ShapeLocation",
    "Textures",
    "PhotoSegments",
    "SEGMENT_CLASSES",
    "PHOTOS",
    "ORIENTATION_PHOTOS",
    "register_dataset",
    "build_dataset",
    "build_eval_dataset",
    "list_datasets",
    "get_dataset_spec",
    "SPLITS",
    "canonical_split",
]
