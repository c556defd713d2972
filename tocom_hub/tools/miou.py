"""Mean intersection over union and its bootstrap intervals (segmentation evaluation).

The unit is the per-image confusion matrix (``[C, C]`` int64, rows: ground truth, columns:
prediction): the dataset's mIoU is computed from their sum, so a bootstrap over test images resamples
images and re-sums (:func:`bootstrap_miou`, :func:`paired_bootstrap_miou`), never averages per-image
IoUs. Pure tensor / numpy maths, no model. Example::

    conf = confusion_matrices(pred, target, num_classes=5)       # [B, 5, 5]
    print(miou(conf.sum(0)))                                      # in %
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch

__all__ = ["confusion_matrices", "iou_per_class", "miou", "bootstrap_miou", "paired_bootstrap_miou"]


def confusion_matrices(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """``[B, C, C]`` int64 per-image confusion matrices of class maps ``pred`` / ``target`` (``[B, H, W]``).

    ``out[b, t, p]`` counts the pixels of image ``b`` with ground truth ``t`` and prediction ``p``;
    pixels whose target is ``ignore_index`` are left out. A target outside ``[0, C)`` (other than
    ``ignore_index``) or a prediction outside it raises ``ValueError``.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred and target must both be [B, H, W]; got {tuple(pred.shape)} and {tuple(target.shape)}")
    t, p = target.reshape(target.shape[0], -1).long(), pred.reshape(pred.shape[0], -1).long()
    keep = t != ignore_index
    if ((t < 0) | (t >= num_classes))[keep].any() or ((p < 0) | (p >= num_classes)).any():
        raise ValueError(f"class indices must lie in [0, {num_classes}) (or be ignore_index={ignore_index})")
    b = torch.arange(t.shape[0], device=t.device)[:, None].expand_as(t)
    flat = (b * num_classes + t) * num_classes + p
    counts = torch.bincount(flat[keep], minlength=t.shape[0] * num_classes * num_classes)
    return counts.reshape(t.shape[0], num_classes, num_classes)


def iou_per_class(conf: Any) -> np.ndarray:
    """``[C]`` IoU (in %) per class of one confusion matrix; NaN for a class absent from truth and prediction."""
    c = np.asarray(conf, dtype=np.float64)
    inter = np.diagonal(c, axis1=-2, axis2=-1)
    union = c.sum(-1) + c.sum(-2) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, 100.0 * inter / np.where(union > 0, union, 1), np.nan)


def miou(conf: Any) -> float:
    """Mean IoU (in %) over the classes present in the truth or the prediction of confusion matrix ``conf``."""
    return float(np.nanmean(iou_per_class(conf)))


def _batched_miou(confs: np.ndarray) -> np.ndarray:
    """mIoU of every ``[C, C]`` matrix in ``[..., C, C]``."""
    iou = iou_per_class(confs)
    with np.errstate(invalid="ignore"):
        return np.nanmean(iou, axis=-1)


def _resampled_sums(confs: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """``[n_boot, seeds, C, C]``: per resample, images with replacement (the same draw for every seed), then
    seeds with replacement."""
    seeds, n = confs.shape[:2]
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # [n_boot, n]
    sums = np.einsum("bn,snij->bsij", weights, confs.astype(np.float64))
    if seeds > 1:
        pick = rng.integers(seeds, size=(n_boot, seeds))
        sums = np.take_along_axis(sums, pick[:, :, None, None], axis=1)
    return sums


def _as_seeds(confs: Any) -> np.ndarray:
    c = np.asarray(confs)
    c = c[None] if c.ndim == 3 else c
    if c.ndim != 4 or c.shape[-1] != c.shape[-2] or c.shape[1] == 0:
        raise ValueError(
            f"expected per-image confusion matrices [images, C, C] or [seeds, images, C, C]; got {c.shape}"
        )
    return c


def bootstrap_miou(confs: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Dict[str, Any]:
    """mIoU (the mean over seeds of each seed's mIoU) and its percentile bootstrap interval.

    ``confs``: ``[images, C, C]`` or ``[seeds, images, C, C]`` (every seed evaluated on the same images).
    Each resample draws the images with replacement and, with several seeds, the seeds too. Returns
    ``miou``, ``low``, ``high``, ``level``, ``images``, ``seeds``, ``resamples``.
    """
    c = _as_seeds(confs)
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level must lie in (0, 1) and n_boot be >= 1; got level={level}, n_boot={n_boot}")
    point = float(np.mean(_batched_miou(c.sum(1))))
    boot = _batched_miou(_resampled_sums(c, np.random.default_rng(seed), n_boot)).mean(1)
    a = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [a, 1.0 - a])
    return {"miou": point, "low": float(low), "high": float(high), "level": level, "images": int(c.shape[1]),
            "seeds": int(c.shape[0]), "resamples": int(n_boot)}  # fmt: skip


def paired_bootstrap_miou(
    base: Any, other: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> Dict[str, Any]:
    """mIoU of ``other`` minus mIoU of ``base`` (points) on the **same images** and seeds, with a paired
    bootstrap interval: every resample applies one image (and seed) draw to both. Returns ``delta``,
    ``low``, ``high``, ``level``, ``images``, ``seeds``, ``resamples``."""
    a, b = _as_seeds(base), _as_seeds(other)
    if a.shape != b.shape:
        raise ValueError(f"base and other must have the same shape; got {a.shape} and {b.shape}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level must lie in (0, 1) and n_boot be >= 1; got level={level}, n_boot={n_boot}")
    delta = float(np.mean(_batched_miou(b.sum(1)) - _batched_miou(a.sum(1))))
    both = np.stack([a, b])  # [2, seeds, images, C, C]
    seeds, n = a.shape[:2]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    sums = np.einsum("bn,ksnij->kbsij", weights, both.astype(np.float64))  # [2, n_boot, seeds, C, C]
    if seeds > 1:
        pick = rng.integers(seeds, size=(n_boot, seeds))
        sums = np.take_along_axis(sums, pick[None, :, :, None, None], axis=2)
    m = _batched_miou(sums).mean(-1)  # [2, n_boot]
    boot = m[1] - m[0]
    q = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [q, 1.0 - q])
    return {"delta": delta, "low": float(low), "high": float(high), "level": level, "images": int(n),
            "seeds": int(seeds), "resamples": int(n_boot)}  # fmt: skip
