"""Images for a model from a ``--data`` argument: an ImageFolder root or the name of an embedded dataset,
with timm's evaluation transform at the size the model was built for (used by ``tocom-hub eval`` and the demo)."""

from __future__ import annotations

import os
from typing import Optional

from torch import nn
from torch.utils.data import Dataset, Subset

from ...core.checks import is_int
from ...tools.images import eval_transform, model_img_size
from .registry import build_dataset, get_dataset_spec, list_datasets

__all__ = ["build_eval_dataset"]


class _Transformed(Dataset):
    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, label = self.dataset[i][:2]
        return self.transform(img), label


def build_eval_dataset(
    model: nn.Module,
    data: str,
    *,
    split: str = "validation",
    limit: Optional[int] = None,
    class_map: Optional[str] = None,
) -> Dataset:
    """Images and labels for ``model`` with timm's evaluation transform (``resolve_data_config`` +
    ``create_transform`` at the size the model was built for).

    ``data``: an ImageFolder root (one sub-folder per class; a ``val/`` / ``validation/`` sub-folder
    is used when present, see ``timm.data.create_dataset``), or an embedded dataset name from
    :func:`list_datasets` (offline, no files). ``limit``: the first N images. The
    dataset has ``num_classes`` (or ``None``) set.
    """

    if limit is not None and (not is_int(limit) or limit < 1):
        raise ValueError(f"limit must be a positive int; got {limit!r}")
    embedded = list_datasets()
    if data in embedded and not os.path.isdir(data):
        task = get_dataset_spec(data).task
        if task != "classification":
            raise ValueError(
                f"{data} is a {task} dataset (pixel masks): evaluate it with benchmarks/study/segmentation.py "
                f"or tocom_hub.tools.miou, not as image classification"
            )
        h, w = model_img_size(model)
        if h != w:
            raise ValueError(f"embedded datasets are square; the model takes {h}x{w} images")
        split = "val" if split in ("validation", "val", "eval") else split
        raw = build_dataset(data, split, img_size=h, length=limit)
        tf, _ = eval_transform(model, crop_pct=1.0)  # already at the model's size: no resize/crop
        ds = _Transformed(raw, tf)
        ds.num_classes = getattr(raw, "num_classes", None)
        return ds
    if not os.path.isdir(data):
        raise FileNotFoundError(
            f"--data {data}: no such directory (expected an ImageFolder root with one sub-folder per class"
            + (f", or an embedded dataset: {', '.join(embedded)}" if embedded else "")
            + ")"
        )
    from timm.data import create_dataset

    if class_map is not None and not os.path.isfile(class_map):
        raise FileNotFoundError(f"--class-map {class_map}: no such file")
    tf, _ = eval_transform(model)
    try:
        ds = create_dataset("", root=data, split=split, class_map=class_map or "", transform=tf)
    except (RuntimeError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"{data}: no images found ({' '.join(str(e).split())}); expected DIR/<class>/<image>.jpg|png"
        ) from None
    if len(ds) == 0:
        raise FileNotFoundError(f"{data}: no images found; expected DIR/<class>/<image>.jpg|png")
    class_to_idx = getattr(getattr(ds, "reader", None), "class_to_idx", None) or {}
    num_classes = len(class_to_idx) or None
    if limit is not None and limit < len(ds):
        ds = Subset(ds, range(limit))
    ds.num_classes = num_classes
    return ds
