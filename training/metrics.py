"""Measurements a training script takes along the way: top-1 on a loader, step speed, peak memory."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Dict, Optional

import torch

from tocom_hub.tools.timing import Clock, synchronize

__all__ = ["evaluate_top1", "peak_memory_mb", "StepTimer", "step_metrics"]


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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: allocated on a CUDA device, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB


class StepTimer:
    """Wall-clock time of every optimizer step; the throughput window starts after the first step (the
    loader workers warm up during it) and the device is synchronised at both ends of the window.
    ``clock`` (seconds) is injectable, like every timer of :mod:`tocom_hub.tools.timing`."""

    def __init__(self, device: torch.device, clock: Clock = time.perf_counter) -> None:
        self.device, self.times, self.clock = device, [], clock
        self._last, self._window_start = clock(), 0.0

    def tick(self) -> None:
        """Call once per optimizer step, after it."""
        now = self.clock()
        self.times.append(now - self._last)
        self._last = now
        if len(self.times) == 1:
            synchronize(self.device)
            self._window_start = self.clock()

    def window_seconds(self) -> float:
        """Seconds from the end of the first step to now (0.0 for fewer than two steps)."""
        synchronize(self.device)
        return self.clock() - self._window_start if len(self.times) > 1 else 0.0

    def median(self) -> Optional[float]:
        """Median step time in seconds, the first step left out when there are others."""
        timed = self.times[1:] or self.times
        return statistics.median(timed) if timed else None


def step_metrics(timer: StepTimer, window_seconds: float, images_per_step: int) -> Dict[str, Any]:
    """Speed and memory of a run: median step time and images/s (all steps but the first, which warms up
    the loader workers), wall-clock throughput over ``window_seconds``, peak memory, device, platform."""
    med = timer.median()
    if med is None:
        return {}
    return {
        "median_step_seconds": med,
        "images_per_second": images_per_step / med,
        # wall-clock rate over all steps but the first, the device synchronised at both ends
        "throughput_images_per_second": ((len(timer.times) - 1) * images_per_step / window_seconds)
        if window_seconds > 0
        else None,
        "peak_memory_mb_per_process": peak_memory_mb(timer.device),
        "device": str(timer.device),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
