"""Latency and throughput of a timm ViT at several ``r`` next to plain timm (``tocom-hub bench``).

CPU and shared-GPU timings drift with machine load, so the configurations are measured
*interleaved* on the same model object (patched / unpatched in place, weights at the same
addresses): every iteration visits plain timm and each ``r`` once, in a fresh random order, and a
configuration's statistics come from its own forwards across all iterations. Slow drifts therefore
hit every configuration alike. A speed-up is the median over iterations of the *paired* ratio
(plain timm's time / this configuration's time, within one iteration), reported with its 10th-90th
percentile; when those ratios move by more than :data:`NOISY_SPREAD` of the median, the result is
flagged ``noisy`` and the table says "noisy — rerun". Example::

    from tocom_hub.tools.benchmark import benchmark, format_table
    result = benchmark(model, r_values=[0, 8, 16], batch_size=8, iters=20)
    print(format_table(result))
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..core.checks import is_int
from ..core.patch import patch, set_r, unpatch
from ..core.preserve import preserved
from .timing import NOISY_SPREAD, WallTimer, interleaved, paired_ratios, ratio_summary, summary, synchronize

__all__ = ["tokens_left", "benchmark", "format_table"]


@torch.inference_mode()
def tokens_left(model: nn.Module, x: torch.Tensor) -> int:
    """Tokens (prefix included) leaving the last block for input ``x`` (one forward of ``x[:1]``)."""
    seen: List[int] = []
    handle = model.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(int(out.shape[1])))
    try:
        model(x[:1])
    finally:
        handle.remove()
    return seen[-1]


def benchmark(
    model: nn.Module,
    r_values: Sequence[int],
    batch_size: int = 8,
    *,
    method: str = "tome",
    iters: int = 20,
    warmup: int = 3,
    seed: int = 0,
    progress: bool = True,
    input_size: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """Interleaved latency / throughput of plain timm and of ``model`` patched at each ``r``.

    Every ``r`` is validated first (``ValueError`` from :func:`tocom_hub.set_r`, model untouched).
    The model is left as found (unpatched, or patched at its previous ``r``). Returns a dict with
    the setup and ``rows``: one per configuration (``config`` ``"timm"`` or the method, ``r``,
    ``tokens`` left after the last block, ``median_ms``, ``p10_ms``, ``p90_ms``, ``mean_ms``,
    ``images_per_s`` = ``batch / median``, ``speedup`` = median over iterations of timm's time / this
    time in the same iteration, ``speedup_range`` = its 10th and 90th percentile, ``noisy``, ``samples``)
    and ``noisy`` (any row noisy: rerun before trusting the speed-ups).
    """
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0; got iters={iters}, warmup={warmup}")
    r_values = list(r_values)
    if not r_values:
        raise ValueError("r_values must not be empty")

    with preserved(model):
        samples, tokens, param, size = _time_configs(
            model, r_values, method, batch_size, iters, warmup, seed, progress, input_size
        )
    configs: List[Any] = [None] + r_values  # None: plain timm

    rows = []
    for cfg in configs:
        times = summary(samples[cfg])
        speed = ratio_summary(paired_ratios(samples[None], samples[cfg]))  # paired within each iteration
        rows.append(
            {
                "config": "timm" if cfg is None else method,
                "r": cfg,
                "tokens": tokens[cfg],
                "median_ms": times["median"],
                "p10_ms": times["p10"],
                "p90_ms": times["p90"],
                "mean_ms": times["mean"],
                "images_per_s": batch_size * 1000.0 / times["median"],
                "speedup": speed["median"],
                "speedup_range": [speed["p10"], speed["p90"]],
                "noisy": cfg is not None and speed["noisy"],
                "samples": samples[cfg],
            }
        )
    return {
        "batch_size": batch_size,
        "input_size": list(size),
        "method": method,
        "iters": iters,
        "warmup": warmup,
        "device": str(param.device),
        "dtype": str(param.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "noisy": any(row["noisy"] for row in rows),
        "rows": rows,
    }


def _time_configs(model, r_values, method, batch_size, iters, warmup, seed, progress, input_size):
    """Per-iteration forward times of plain timm (``None``) and of each ``r``, interleaved in a random order.
    Changes the model's patch state and mode: the caller holds :func:`~tocom_hub.core.preserve.preserved`."""
    from tqdm.auto import tqdm

    from .images import model_img_size

    patch(model, method=method)
    for r in r_values:  # validate every r before timing anything
        set_r(model, r)
    param = next(model.parameters())
    size = tuple(input_size) if input_size is not None else model_img_size(model)
    x = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(seed)).to(param.device, param.dtype)
    configs: List[Any] = [None] + r_values  # None: plain timm

    def configure(cfg):
        if cfg is None:
            unpatch(model)
        else:
            patch(model, method=method)
            set_r(model, cfg)

    timer = WallTimer(sync=lambda: synchronize(param.device))
    tokens: Dict[Any, int] = {}
    model.eval()
    with torch.inference_mode():
        for cfg in configs:
            configure(cfg)
            tokens[cfg] = tokens_left(model, x)
            for _ in range(warmup):
                model(x)
    off = {} if progress else {"disable": True}  # an explicit disable=False would override TQDM_DISABLE=1
    runners = {cfg: (lambda: model(x)) for cfg in configs}  # one model object, switched in place by configure
    with torch.inference_mode(), tqdm(total=iters * len(configs), desc="bench", unit="fwd", **off) as bar:
        samples = interleaved(
            runners, iters, timer=timer, seed=seed, before=configure, on_sample=lambda cfg, ms: bar.update(1)
        )
    return samples, tokens, param, size


def format_table(result: Dict[str, Any], title: Optional[str] = None) -> str:
    """The rows of :func:`benchmark` as an aligned text table."""
    head = title or ""
    setup = (
        f"batch {result['batch_size']}, {result['input_size'][0]}x{result['input_size'][1]}, "
        f"{result['device']} {result['dtype']}, {result['threads']} threads, "
        f"{result['iters']} interleaved iterations"
    )
    lines = [f"{head}{' — ' if head else ''}{setup}"]
    cols = ("config", "r", "tokens", "median ms", "p90 ms", "images/s", "speed-up (p10-p90)")

    def speed(row):
        rng = row.get("speedup_range")
        if row["r"] is None or not rng:
            return f"{row['speedup']:.2f}x"
        return f"{row['speedup']:.2f}x ({rng[0]:.2f}-{rng[1]:.2f}){' noisy' if row.get('noisy') else ''}"

    body = [
        (
            row["config"],
            "-" if row["r"] is None else str(row["r"]),
            str(row["tokens"]),
            f"{row['median_ms']:.2f}",
            f"{row['p90_ms']:.2f}",
            f"{row['images_per_s']:.1f}",
            speed(row),
        )
        for row in result["rows"]
    ]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines.append(fmt(cols))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(b) for b in body]
    lines.append(
        "speed-up: median over iterations of plain timm's time / this time in the same iteration "
        "(10th-90th percentile in brackets)"
    )
    if result.get("noisy"):
        lines.append(
            f"noisy — rerun: the per-iteration speed-ups of the rows marked 'noisy' spread by more than "
            f"{100 * NOISY_SPREAD:.0f} % of their median (a busy machine?); rerun on an idle machine, "
            f"with more --iters, or --threads 1"
        )
    return "\n".join(lines)
