"""Uncertainty of an accuracy: the paired bootstrap of a difference between two evaluations of the same
images (:func:`paired_bootstrap`, :func:`add_intervals`) and the Wilson interval of one accuracy
(:func:`wilson`). Pure numbers: no model, no torch."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

__all__ = ["paired_bootstrap", "add_intervals", "wilson"]


def paired_bootstrap(
    base: Any,
    other: Any,
    *,
    n_boot: int = 10000,
    level: float = 0.95,
    seed: int = 0,
) -> Dict[str, Any]:
    """Difference in top-1 (points) between two evaluations of the **same images**, with a bootstrap interval.

    ``base`` / ``other``: per-image top-1 hits (bool or 0/1), shape ``(images,)``, or ``(seeds, images)``
    when several models (e.g. fine-tuning seeds) were evaluated on the same images — row ``k`` of both
    comes from seed ``k``. Every resample draws the images with replacement (the same draw for every
    seed: the comparison stays paired) and, with several seeds, the seeds with replacement too; the
    interval is the percentile interval of the resampled mean difference. With few seeds the seed part
    of the interval is crude (two seeds cannot say much about seed-to-seed spread). Example::

        ci = paired_bootstrap(plain_row["correct"], tocom_row["correct"])
        print(f"{ci['delta']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}]")

    Returns ``delta`` (mean of other − base, in points), ``low`` / ``high`` (the interval), ``level``,
    ``images``, ``seeds``, ``resamples``. Deterministic for a given ``seed``.
    """
    import numpy as np

    a = np.atleast_2d(np.asarray(base, dtype=np.int8))
    b = np.atleast_2d(np.asarray(other, dtype=np.int8))
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(
            f"base and other must be per-image hits of the same non-empty shape (images,) or "
            f"(seeds, images); got {a.shape} and {b.shape}"
        )
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level must lie in (0, 1) and n_boot be >= 1; got level={level}, n_boot={n_boot}")
    d = (b - a).astype(np.int64)  # (seeds, images) in {-1, 0, 1}
    seeds, n = d.shape
    rng = np.random.default_rng(seed)
    # resampling images with replacement only changes how often each per-image pattern (one value per seed)
    # occurs, so draw the pattern counts from a multinomial: exact, and cheap for any number of images
    patterns, counts = np.unique(d.T, axis=0, return_counts=True)  # (k, seeds), (k,)
    drawn = rng.multinomial(n, counts / n, size=n_boot)  # (n_boot, k)
    per_seed = drawn @ patterns / n  # (n_boot, seeds)
    if seeds > 1:
        pick = rng.integers(seeds, size=(n_boot, seeds))
        per_seed = np.take_along_axis(per_seed, pick, axis=1)
    boot = 100.0 * per_seed.mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return {
        "delta": 100.0 * float(d.mean()),
        "low": float(low),
        "high": float(high),
        "level": level,
        "images": int(n),
        "seeds": int(seeds),
        "resamples": int(n_boot),
    }


def add_intervals(rows: List[Dict[str, Any]], *, drop_correct: bool = True, **kwargs: Any) -> List[Dict[str, Any]]:
    """Add ``delta`` and ``delta_ci95`` (+ToCom − plain, points, :func:`paired_bootstrap`) to every +ToCom row.

    ``rows`` come from ``evaluate(..., keep_correct=True)``; the per-image ``correct`` tensors are removed
    afterwards unless ``drop_correct=False`` (they are large and not JSON). Returns ``rows``.
    """
    plain = {row["target_r"]: row for row in rows if not row["tocom"]}
    for row in rows:
        base = plain.get(row["target_r"])
        if row["tocom"] and base is not None and "correct" in row and "correct" in base:
            ci = paired_bootstrap(base["correct"], row["correct"], **kwargs)
            row["delta"] = ci["delta"]
            row["delta_ci95"] = [ci["low"], ci["high"]]
    if drop_correct:
        for row in rows:
            row.pop("correct", None)
    return rows


def wilson(hits: float, n: int, z: float = 1.96) -> Tuple[float, float]:
    """95 % Wilson score interval (in %) of ``hits`` successes out of ``n``."""
    if n <= 0:
        return 0.0, 100.0
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)
