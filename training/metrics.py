"""Measurements a training script takes along the way: top-1 on a loader, peak memory."""

from __future__ import annotations

import torch

__all__ = ["evaluate_top1"]


@torch.no_grad()
def evaluate_top1(accelerator, model: torch.nn.Module, loader) -> float:
    """Top-1 (%) of ``model`` over ``loader``, gathered across processes; the model's mode is kept."""
    was_training = model.training
    model.eval()
    correct = total = 0
    from tqdm.auto import tqdm

    for x, y in tqdm(
        loader, desc="validation", unit="batch", leave=False, disable=not accelerator.is_local_main_process
    ):
        with accelerator.autocast():
            pred = model(x).argmax(-1)
        pred, y = accelerator.gather_for_metrics((pred, y))
        correct += int((pred == y).sum())
        total += int(y.numel())
    model.train(was_training)
    return 100.0 * correct / max(total, 1)
