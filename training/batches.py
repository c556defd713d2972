"""uint8 batches: loader workers stop at the uint8 image, the device does the float arithmetic.

A 224 px float32 batch of 128 is 77 MB that workers write, the main process pins and the GPU copies;
as uint8 it is 19 MB, and the per-image float passes (to float, / 255, normalise) leave the workers.
The result is bit-identical to running timm's transform per image: the same PIL operations under the
same seeded RNGs, then the same element-wise float32 operations in the same order.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "ErasedPatches",
    "Uint8Transform",
    "DeviceNormalize",
    "split_transform",
    "collate_uint8",
    "device_batch",
]


class ErasedPatches:
    """Random-erasing rectangles of a batch: drawn in the loader workers, pasted on the device.

    ``boxes`` holds ``(sample, top, left, height, width, value shape)`` per rectangle (plain ints, so
    pasting needs no device → host copy) and ``values`` the concatenated fill values (float32).
    ``to`` / ``pin_memory`` let ``DataLoader(pin_memory=True)`` and accelerate move it like a tensor.
    """

    def __init__(self, boxes: List[Tuple[int, int, int, int, int, Tuple[int, ...]]], values: torch.Tensor) -> None:
        self.boxes, self.values = boxes, values

    def to(self, *args, **kwargs) -> ErasedPatches:
        return ErasedPatches(self.boxes, self.values.to(*args, **kwargs))

    def pin_memory(self, *args) -> ErasedPatches:
        return ErasedPatches(self.boxes, self.values.pin_memory(*args))

    def paste_(self, x: torch.Tensor) -> torch.Tensor:
        """Write every rectangle into the normalised batch ``x`` (in place) and return ``x``."""
        offset = 0
        for b, top, left, h, w, shape in self.boxes:
            k = math.prod(shape)
            x[b, :, top : top + h, left : left + w] = self.values[offset : offset + k].view(shape)
            offset += k
        return x


class _ErasingRecorder:
    """Stands in for the image tensor while timm's ``RandomErasing`` draws: records what it would write."""

    def __init__(self) -> None:
        self.writes: List[Tuple[int, int, int, int, torch.Tensor]] = []

    def __setitem__(self, key, value: torch.Tensor) -> None:
        _, rows, cols = key
        self.writes.append((rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start, value))


class Uint8Transform:
    """The PIL part of a timm transform, ending in a ``3 × H × W`` uint8 tensor (what ``to_tensor`` reads).

    Random erasing (if any) is drawn here, with the same RNG calls in the same order as timm's
    per-image transform, and returned as ``(top, left, h, w, values)`` writes for the device to apply.
    """

    def __init__(self, pil_ops: Any, erasing: Any = None) -> None:
        self.pil_ops, self.erasing = pil_ops, erasing

    def __call__(self, img):
        img = self.pil_ops(img)
        if getattr(img, "mode", None) != "RGB":
            raise ValueError(
                f"expected an RGB PIL image after the PIL transforms; got {img!r} (convert the dataset's images to RGB)"
            )
        w, h = img.size
        x = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(h, w, 3).permute(2, 0, 1).contiguous()
        writes: List[Tuple[int, int, int, int, torch.Tensor]] = []
        if self.erasing is not None:
            rec = _ErasingRecorder()
            self.erasing._erase(rec, 3, h, w, torch.float32)
            writes = rec.writes
        return x, writes

    def __repr__(self) -> str:
        return f"Uint8Transform(pil_ops={self.pil_ops!r}, erasing={self.erasing!r})"


class DeviceNormalize:
    """The float part of timm's transform on a uint8 batch: ``to_tensor``'s ``/ 255``, ``Normalize``, erasing."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        if (self.std == 0).any():
            raise ValueError(f"std must be non-zero; got {list(std)}")

    def __call__(self, x: torch.Tensor, patches: Optional[ErasedPatches] = None) -> torch.Tensor:
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        x = x.to(torch.float32).div(255).sub_(self.mean).div_(self.std)
        return patches.paste_(x) if patches is not None else x


def split_transform(transform: Any) -> Optional[Tuple[Uint8Transform, DeviceNormalize]]:
    """``(worker part, device part)`` of a timm transform, or ``None`` when it is not of the usual shape.

    The usual shape is ``Compose([PIL ops…, MaybeToTensor/ToTensor, Normalize[, RandomErasing]])``:
    what :func:`build_transforms` returns (train and eval). Apply the worker part per image (it returns
    ``(uint8 image, erasing writes)``), batch with :func:`collate_uint8`, and call the device part on the
    batch after moving it to the device: the result equals ``transform`` applied per image, bit for bit.
    """
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    ops = list(getattr(transform, "transforms", []))
    idx = [i for i, t in enumerate(ops) if type(t).__name__ in ("MaybeToTensor", "ToTensor")]
    if len(idx) != 1:
        return None
    tail = ops[idx[0] + 1 :]
    if not tail or not isinstance(tail[0], T.Normalize) or tail[0].inplace:
        return None
    erasing = None
    if len(tail) == 2 and isinstance(tail[1], RandomErasing) and str(tail[1].device) == "cpu":
        erasing = tail[1]
    elif len(tail) != 1:
        return None
    return Uint8Transform(T.Compose(ops[: idx[0]]), erasing), DeviceNormalize(tail[0].mean, tail[0].std)


def collate_uint8(batch) -> Tuple[torch.Tensor, torch.Tensor, ErasedPatches]:
    """Collate ``((uint8 image, erasing writes), label)`` items into ``(images, labels, ErasedPatches)``."""
    from torch.utils.data import default_collate

    images = default_collate([item[0][0] for item in batch])  # in a worker: stacked straight into shared memory
    labels = default_collate([item[1] for item in batch])
    boxes, values = [], []
    for b, item in enumerate(batch):
        for top, left, h, w, v in item[0][1]:
            boxes.append((b, top, left, h, w, tuple(v.shape)))
            values.append(v.reshape(-1))
    return images, labels, ErasedPatches(boxes, torch.cat(values) if values else torch.empty(0))


def device_batch(batch, device: torch.device, normalize: Optional[DeviceNormalize] = None):
    """``(x, y)`` on ``device`` from a loader batch: ``(x, y)``, or ``(uint8 x, y, patches)`` + ``normalize``."""
    batch = [t.to(device, non_blocking=True) for t in batch]
    if normalize is None:
        return batch[0], batch[1]
    return normalize(batch[0], batch[2]), batch[1]
