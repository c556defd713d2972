"""The accuracy-vs-target-``r`` figure (Fig. 5 of the ToCom paper) of ``tocom-hub eval`` and
``training/evaluate.py``: :func:`plot_accuracy`."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

from .intervals import wilson

__all__ = ["plot_accuracy"]


def plot_accuracy(result: Dict[str, Any], path: Union[str, os.PathLike], *, title: Optional[str] = None) -> None:
    """Top-1 vs target ``r`` (Fig. 5 of the ToCom paper): plain ToMe/EViT and +ToCom, as a PNG (dpi 150).

    Every point carries its 95 % interval (Wilson, from the image count); the y-axis spans at least 5
    points so that a difference of a few images does not look like a cliff; the title names the model
    (``result["model_label"]``, else ``model``), the data and the image count. ``result`` needs ``rows``
    (from :func:`~tocom_hub.tools.evaluation.evaluate`), ``source_r``, ``method`` and optionally ``scale``,
    ``model_label``, ``model``, ``data_name``, ``images``. +ToCom rows that carry their own ``scale`` are
    drawn as one line per scale; ``matched`` (``{r: top1}``: models fine-tuned at ``r`` and run at ``r``)
    adds the paper's "source = target" reference.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or tocom-hub[dev])") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    method = result.get("method", "tome")
    name = {"tome": "ToMe", "evit": "EViT"}.get(method, method)
    verb = "merged" if method == "tome" else "pruned"
    n = int(result.get("images") or rows[0]["images"])

    def series(points):
        pts = sorted(points)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        cis = [wilson(y * n / 100.0, n) for y in ys]
        err = [[y - lo for y, (lo, _) in zip(ys, cis)], [hi - y for y, (_, hi) in zip(ys, cis)]]
        lows.extend(c[0] for c in cis)
        highs.extend(c[1] for c in cis)
        return xs, ys, err

    lows: List[float] = []
    highs: List[float] = []
    with plt.rc_context({"font.size": 12, "axes.titlesize": 11, "legend.fontsize": 10}):
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        xs, ys, err = series((r["target_r"], r["top1"]) for r in rows if not r["tocom"])
        ax.errorbar(xs, ys, yerr=err, fmt="o--", color="0.35", lw=2, ms=6, capsize=3, label=f"{name} (no ToCom)")
        scales = sorted({r.get("scale") for r in rows if r["tocom"]}, key=lambda s: (s is not None, s))
        cmap = plt.get_cmap("viridis")
        for i, scale in enumerate(scales):
            xt, yt, errt = series((r["target_r"], r["top1"]) for r in rows if r["tocom"] and r.get("scale") == scale)
            s = result.get("scale") if scale is None else scale
            label = f"{name} + ToCom" + (f" (s = {s:g})" if isinstance(s, (int, float)) else "")
            color = "tab:red" if len(scales) == 1 else cmap(0.15 + 0.7 * i / (len(scales) - 1))
            ax.errorbar(
                [x + 0.12 * (i + 1) for x in xt],
                yt,
                yerr=errt,
                fmt="s-",
                color=color,
                lw=2,
                ms=6,
                capsize=3,
                label=label,
            )
        matched = result.get("matched") or {}
        if matched:
            xm, ym, errm = series((int(r), acc) for r, acc in matched.items())
            ax.errorbar(
                xm, ym, yerr=errm, fmt="D:", color="tab:orange", lw=2, ms=6, capsize=3, label="source r = target r"
            )
        src = result.get("source_r")
        if src is not None:
            ax.axvline(src, color="0.6", ls=":", lw=1.5, label=f"source r = {src}")
        lo, hi = min(lows), max(highs)
        if hi - lo < 5.0:  # at least 5 points: a few images must not look like a cliff
            mid = (hi + lo) / 2
            lo, hi = mid - 2.5, mid + 2.5
        pad = 0.08 * (hi - lo)
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
        ax.set_xlabel(f"target r (tokens {verb} per block)")
        ax.set_ylabel("top-1 accuracy (%)")
        xs_all = sorted({r["target_r"] for r in rows})
        if len(xs_all) <= 20:
            ax.set_xticks(xs_all)
        model = result.get("model_label") or result.get("model")
        data = result.get("data_name")
        ax.set_title(
            title
            or (
                f"{model or ''}\n"
                + " · ".join(v for v in (str(data) if data else "", f"{n:,} images") if v)
                + " · bars: 95 % interval per point"
            ),
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="best", frameon=False)
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=150)
        plt.close(fig)
