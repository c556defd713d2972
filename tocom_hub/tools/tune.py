"""Pick the ToCom scale ``s`` on a small calibration set (the paper searches s ∈ {0.01 … 0.15})."""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.bank.module import ToComBank
from ..core.compensation.api import apply

__all__ = ["tune_scale", "PAPER_SCALES"]

PAPER_SCALES = (0.01, 0.02, 0.05, 0.08, 0.1, 0.12, 0.15)

Metric = Union[str, Callable[[torch.Tensor, torch.Tensor], float]]


def _score(
    model: nn.Module, loader: Iterable, metric: Metric, device: torch.device, max_batches: Optional[int]
) -> float:
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = batch[0], batch[1]
        x, y = x.to(device), y.to(device)
        out = model(x)
        if metric == "accuracy":
            total += (out.argmax(dim=-1) == y).sum().item()
            count += y.shape[0]
        elif metric == "loss":
            total += F.cross_entropy(out.float(), y, reduction="sum").item()
            count += y.shape[0]
        else:
            total += float(metric(out, y)) * y.shape[0]
            count += y.shape[0]
    if count == 0:
        raise ValueError("the calibration loader yielded no samples")
    return total / count


@torch.no_grad()
def tune_scale(
    model: nn.Module,
    bank: ToComBank,
    loader: Iterable,
    source_r: int,
    target_r: int,
    candidates: Sequence[float] = PAPER_SCALES,
    metric: Metric = "accuracy",
    *,
    max_batches: Optional[int] = None,
) -> Tuple[float, Dict[float, float]]:
    """Evaluate every candidate ``s`` on ``loader`` and keep the best.

    ``loader`` yields ``(images, labels, …)`` batches. ``metric``: ``"accuracy"`` (top-1, higher is
    better), ``"loss"`` (mean cross-entropy, lower is better) or a callable ``(logits, labels) ->
    float`` (batch mean, higher is better). Ties go to the candidate closest to the bank's own
    ``scale``. The model is evaluated in eval mode (its train/eval mode is restored) and is left
    with the bank applied in merged mode at the best ``s`` (``source_r → target_r``); call
    :func:`tocom_hub.remove` to take it out. Returns ``(best_s, {s: score})``. Example::

        best, scores = tocom_hub.tune_scale(model, bank, calib_loader, source_r=0, target_r=16)
        print(best, scores)
        logits = model(images)  # runs at r = 16 with s = best
    """
    if not isinstance(bank, ToComBank):
        raise TypeError(f"bank must be a ToComBank; got {type(bank).__name__} (load it with ToComBank.from_pretrained)")
    if not (metric in ("accuracy", "loss") or callable(metric)):
        raise ValueError(f"metric must be 'accuracy', 'loss' or a callable; got {metric!r}")
    candidates = [float(s) for s in candidates]
    if not candidates:
        raise ValueError("candidates must not be empty")
    lower_is_better = metric == "loss"
    device = model.blocks[0].attn.proj.weight.device
    was_training = model.training
    model.eval()
    scores: Dict[float, float] = {}
    try:
        for s in candidates:
            apply(model, source_r, target_r, bank=bank, scale=s)  # re-applying re-derives from W₀
            scores[s] = _score(model, loader, metric, device, max_batches)
        sign = -1.0 if lower_is_better else 1.0
        best = max(candidates, key=lambda s: (sign * scores[s], -abs(s - bank.scale)))
        apply(model, source_r, target_r, bank=bank, scale=best)
    finally:
        model.train(was_training)
    return best, scores
