"""The data side of a training run: datasets, timm transforms, the deterministic sampler and loader.

* :class:`EpochSampler` yields *global keys* ``epoch · N + i`` in a permutation that depends only on
  ``(seed, epoch)`` — not on the number of processes, the number of workers or the history.
  ``accelerate`` then hands process ``p`` the batches ``p, p + P, …`` of that stream, so the global
  batch of every step is the same set of samples whatever ``P`` is.
* :class:`SeededTransform` runs the (random) augmentation of key ``k`` under RNGs seeded with
  ``(seed, k)`` (:func:`~tocom_hub.training.seeds.seeded_rngs`): a sample's augmentation does not
  depend on which worker made it or on what ran before.
* :func:`build_datasets` / :func:`build_transforms` / :func:`build_train_loader` assemble them from
  ``timm.data`` (embedded datasets, ImageFolder roots, timm dataset names).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from tocom_hub.demo import data as embedded_data
from tocom_hub.training.batches import DeviceNormalize, collate_uint8, split_transform
from tocom_hub.training.seeds import derive_seed, seeded_rngs

__all__ = [
    "EpochSampler",
    "SeededTransform",
    "InMemory",
    "fits_in_memory",
    "build_datasets",
    "build_transforms",
    "build_train_loader",
]


class EpochSampler(Sampler):
    """A seeded shuffle that yields global keys ``epoch · N + i`` (decode with ``divmod(key, N)``).

    The permutation of epoch ``e`` depends only on ``(seed, e)``; the epoch length is cut to a multiple
    of ``multiple_of`` (the global batch times the accumulation steps) so that every optimizer step
    sees full batches on every process and epochs end on step boundaries. Call :meth:`set_epoch`
    before iterating (``accelerate``'s prepared loaders forward ``set_epoch`` too).
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True, multiple_of: int = 1) -> None:
        if num_items < multiple_of:
            raise ValueError(
                f"the dataset has {num_items} items, fewer than one optimizer step needs ({multiple_of} = "
                f"batch size × processes × accumulation steps); use a smaller --batch-size or more data"
            )
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.length = num_items - num_items % multiple_of
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.epoch))
            order = torch.randperm(self.num_items, generator=g)[: self.length].tolist()
        else:
            order = range(self.length)
        base = self.epoch * self.num_items
        return iter([base + i for i in order])


class SeededTransform(Dataset):
    """``dataset`` with a transform whose randomness is a function of ``(seed, key)`` only.

    Accepts the global keys of :class:`EpochSampler` (``epoch · N + i``; plain indices work too) and
    returns ``(transform(image), label)``.
    """

    def __init__(self, dataset: Dataset, transform: Any, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        index = key % len(self.dataset)
        img, label = self.dataset[index]
        if self.transform is not None:
            with seeded_rngs(derive_seed(self.seed, "sample", key)):
                img = self.transform(img)
        return img, label


class InMemory(Dataset):
    """``dataset`` (items ``(image tensor, label)`` from a deterministic transform) decoded once.

    Indexing takes the global keys of :class:`EpochSampler` like :class:`SeededTransform` does. Use it
    only when the transform has no randomness (evaluation, ``--no-augment``): every epoch / every
    target r then reads the same tensors instead of decoding or rendering the images again.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 256, num_workers: int = 0) -> None:
        xs, ys = [], []
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            xs.append(x)
            ys.append(torch.as_tensor(y))
        self.images, self.labels = torch.cat(xs), torch.cat(ys)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int):
        index = key % len(self.labels)
        return self.images[index], self.labels[index]


def fits_in_memory(num_images: int, img_size: int, limit_mb: int) -> bool:
    """Whether ``num_images`` fp32 RGB images of side ``img_size`` take at most ``limit_mb`` MiB."""
    return num_images * 3 * img_size * img_size * 4 <= limit_mb * 2**20


def build_datasets(
    args: argparse.Namespace,
    default_data: str,
    img_size: int,
    *,
    need_val: bool = True,
    seed: int = 0,
    val_length: Optional[int] = None,
):
    """``(train, val, info)`` raw datasets (items ``(PIL image, label)``; transforms are added later).

    ``val`` is ``None`` when ``need_val`` is false. ``info`` has ``data``, ``kind`` (``embedded`` /
    ``folder`` / ``timm``), ``num_classes`` (or ``None`` when unknown) and ``iterable``.
    """
    from timm.data import create_dataset

    data = args.data or default_data
    if data in embedded_data.list_datasets():
        spec = embedded_data.get_dataset_spec(data)
        train = embedded_data.build_dataset(data, "train", img_size, seed=seed)
        # the held-out split asked for (--val-split / evaluate.py --split: validation or test)
        split = embedded_data.canonical_split(getattr(args, "val_split", None) or "val")
        # ``seed`` redraws the training images only: the held-out images are the same for every seed
        # (dataset seed 0), so that runs with different seeds are measured on the same test set
        val = (
            embedded_data.build_dataset(
                data, split, img_size, seed=0, length=min(val_length, spec.lengths[split]) if val_length else None
            )
            if need_val
            else None
        )
        return (
            train,
            val,
            {
                "data": data,
                "kind": "embedded",
                "num_classes": spec.num_classes,
                "iterable": False,
                "license": spec.license,
            },
        )
    if os.path.isdir(data):
        train = create_dataset("", root=data, split=args.train_split, is_training=True)
        val = create_dataset("", root=data, split=args.val_split) if need_val else None
        if need_val and os.path.realpath(getattr(val.reader, "root", "")) == os.path.realpath(
            getattr(train.reader, "root", "x")
        ):
            raise ValueError(
                f"{data}: no '{args.val_split}' (or val/) sub-folder next to '{args.train_split}'; "
                f"the held-out set must be separate images"
            )
        num_classes = len(getattr(train.reader, "class_to_idx", {}) or {}) or None
        return train, val, {"data": data, "kind": "folder", "num_classes": num_classes, "iterable": False}
    # timm dataset names: hfds/…, hfids/…, wds/…, tfds/…, torch/…
    common = dict(root=args.data_dir, batch_size=args.batch_size or 1, seed=seed)
    train = create_dataset(data, split=args.train_split, is_training=True, **common)
    val = create_dataset(data, split=args.val_split, is_training=False, **common) if need_val else None
    num_classes = None
    reader = getattr(train, "reader", None)
    if reader is not None and getattr(reader, "class_to_idx", None):
        num_classes = len(reader.class_to_idx)
    return (
        train,
        val,
        {"data": data, "kind": "timm", "num_classes": num_classes, "iterable": isinstance(train, IterableDataset)},
    )


def build_transforms(model: torch.nn.Module, img_size: int, augment: bool, embedded: bool):
    """``(train_transform, eval_transform, data_config)`` from timm's data pipeline.

    Augmentation is DeiT's (as in the ToCom paper): ``RandomResizedCrop`` + flip, RandAugment
    ``rand-m9-mstd0.5-inc1``, random erasing 0.25 (pixel mode); mixup/cutmix are batch-level and
    applied in the training loop. Embedded datasets are already at ``img_size`` (no resize/centre crop).
    """
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = (3, img_size, img_size)
    if embedded:
        cfg["crop_pct"] = 1.0
    common = dict(input_size=cfg["input_size"], interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"])
    eval_tf = create_transform(
        **common, is_training=False, crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode", "center")
    )
    if augment:
        train_tf = create_transform(
            **common, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", re_count=1
        )
        _clamp_posterize(train_tf)
    else:
        train_tf = eval_tf
    return train_tf, eval_tf, {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _clamp_posterize(transform) -> None:
    """Keep timm's RandAugment working with Pillow >= 12.

    At magnitude 10 (reached by ``m9`` + ``mstd0.5`` in ~2 % of draws) timm's ``PosterizeIncreasing``
    asks for 0 bits; old Pillow returned a black image, Pillow >= 12 raises ``ValueError``. Clamp to
    1 bit (near-black), leaving every other op and level untouched.
    """
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if "Posterize" in op.name and op.level_fn is not None:
                    level_fn = op.level_fn
                    op.level_fn = lambda level, hparams, _f=level_fn: (max(1, _f(level, hparams)[0]),)


def build_train_loader(
    train_set: Dataset,
    transform: Any,
    *,
    iterable: bool,
    batch_size: int,
    num_workers: int,
    seed: int,
    multiple_of: int,
    pin_memory: bool,
) -> Tuple[DataLoader, Optional[EpochSampler], Optional[DeviceNormalize]]:
    """``(loader, sampler, normalize)`` of a training run; pass batches through :func:`device_batch`.

    Map-style data gets an :class:`EpochSampler` and per-sample seeded augmentation
    (:class:`SeededTransform`); streamed data (``iterable``: hfids/, wds/) is sharded and shuffled by
    timm's reader (``sampler`` is ``None``; do not ``accelerator.prepare`` that loader). When the transform
    has timm's usual shape, workers return uint8 images and ``normalize`` does the float part on the
    device (:func:`split_transform`: bit-identical, a quarter of the bytes to pin and copy); otherwise
    ``normalize`` is ``None`` and batches are float. Workers persist across epochs.
    """
    kwargs: Dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": num_workers > 0,
    }
    normalize = None
    split = split_transform(transform)
    if split is not None:
        transform, normalize = split
        kwargs["collate_fn"] = collate_uint8
    if iterable:
        train_set.transform = transform
        return DataLoader(train_set, batch_size=batch_size, drop_last=True, **kwargs), None, normalize
    sampler = EpochSampler(len(train_set), seed=seed, multiple_of=multiple_of)
    loader = DataLoader(
        SeededTransform(train_set, transform, seed),
        sampler=sampler,
        batch_size=batch_size,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return loader, sampler, normalize
