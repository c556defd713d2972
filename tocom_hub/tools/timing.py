"""The one timing harness: timers, interleaved rounds of A / B / …, medians, paired ratios, the noise flag.

CPU and shared-GPU timings drift with machine load. Everything this project times (``tocom-hub bench``,
the latency controller, ``benchmarks/*``, the trainer's step timer) therefore measures its contenders
*interleaved*: every round visits each of them once, in a fresh random order (``order="shuffle"``) or
forwards and backwards in turn (``order="alternate"``: A B C, C B A, …), so a slow drift hits all alike.
A speed-up is the median over rounds of the *paired* ratio (baseline / contender within one round),
with its 10th-90th percentile as the interval; when that interval is wider than :data:`NOISY_SPREAD` of
the median the result is flagged ``noisy`` ("rerun"). Example::

    timer = device_timer(x.device)
    ms = interleaved({"plain": lambda: plain(x), "tome": lambda: merged(x)}, rounds=20, timer=timer)
    print(ratio_summary(paired_ratios(ms["plain"], ms["tome"])))   # {'median': 1.8, 'p10': …, 'noisy': False}

Every clock is injectable (``WallTimer(clock=…)``), so the harness is tested on fake clocks.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Any, Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch

__all__ = [
    "NOISY_SPREAD",
    "Clock",
    "synchronize",
    "WallTimer",
    "Stopwatch",
    "CudaEventTimer",
    "device_timer",
    "round_orders",
    "interleaved",
    "percentile",
    "summary",
    "paired_ratios",
    "is_noisy",
    "ratio_summary",
]

NOISY_SPREAD = 0.25  # (p90 - p10) / median above this: "noisy — rerun"
ORDERS = ("shuffle", "alternate", "fixed")

Clock = Callable[[], float]
K = TypeVar("K", bound=Hashable)


def synchronize(device: Any) -> None:
    """Wait for ``device`` (a ``torch.device`` or its name) to finish its queued work; no-op off CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WallTimer:
    """Wall-clock milliseconds per call of ``fn`` over ``iters`` back-to-back calls.

    ``clock`` (seconds, default :func:`time.perf_counter`) and ``sync`` (called before starting and
    before stopping the clock, e.g. ``lambda: synchronize(device)``) are injectable."""

    def __init__(self, clock: Clock = time.perf_counter, sync: Optional[Callable[[], None]] = None) -> None:
        self.clock, self.sync = clock, sync or (lambda: None)

    def ms(self, fn: Callable[[], Any], iters: int = 1) -> float:
        self.sync()
        start = self.clock()
        for _ in range(iters):
            fn()
        self.sync()
        return (self.clock() - start) * 1e3 / iters

    def timed(self, fn: Callable[[], Any]) -> Tuple[Any, float]:
        """``(fn(), its milliseconds)`` for one call (a request that is served and measured)."""
        self.sync()
        start = self.clock()
        out = fn()
        self.sync()
        return out, (self.clock() - start) * 1e3


class Stopwatch:
    """Laps of a sequence (``lap()``: milliseconds since the previous lap or :meth:`restart`), the device
    synchronised by ``sync`` before every reading; ``clock`` injectable like :class:`WallTimer`."""

    def __init__(self, clock: Clock = time.perf_counter, sync: Optional[Callable[[], None]] = None) -> None:
        self.clock, self.sync = clock, sync or (lambda: None)
        self.restart()

    def restart(self) -> None:
        self.sync()
        self._last = self.clock()

    def lap(self) -> float:
        self.sync()
        now = self.clock()
        ms, self._last = (now - self._last) * 1e3, now
        return ms


class CudaEventTimer:
    """Device milliseconds per call of ``fn`` over ``iters`` back-to-back calls, from two CUDA events
    (the host may run ahead; only the GPU's time between the events counts)."""

    def __init__(self, device: Any) -> None:
        self.device = torch.device(device)

    def sync(self) -> None:
        synchronize(self.device)

    def ms(self, fn: Callable[[], Any], iters: int = 1) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters


def device_timer(device: Any, clock: Clock = time.perf_counter):
    """:class:`CudaEventTimer` on a CUDA device, else a :class:`WallTimer` (``clock``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return CudaEventTimer(device)
    return WallTimer(clock)


def round_orders(keys: Sequence[K], rounds: int, order: str = "shuffle", seed: int = 0) -> Iterator[List[K]]:
    """The visiting order of each round: ``"shuffle"`` (a fresh permutation, ``random.Random(seed)``),
    ``"alternate"`` (``keys``, then reversed, then ``keys`` …) or ``"fixed"`` (always ``keys``: for
    contenders that must follow each other, e.g. a switch up then back down)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}")
    rng = random.Random(seed)
    for k in range(rounds):
        if order == "shuffle":
            out = list(keys)
            rng.shuffle(out)
        else:
            out = list(keys) if order == "fixed" or k % 2 == 0 else list(keys)[::-1]
        yield out


def interleaved(
    runners: Mapping[K, Callable[[], Any]],
    rounds: int,
    *,
    timer: Any = None,
    iters: int = 1,
    order: str = "shuffle",
    seed: int = 0,
    before: Optional[Callable[[K], None]] = None,
    settle: int = 0,
    on_sample: Optional[Callable[[K, float], None]] = None,
) -> Dict[K, List[float]]:
    """Time every runner once per round, rounds interleaved; returns ``{key: [ms per call, one per round]}``.

    In each round (order: :func:`round_orders`) a runner is prepared by ``before(key)`` (e.g. switch the
    model in place; not timed), called ``settle`` times untimed, then timed by ``timer.ms(fn, iters)``
    (default :class:`WallTimer`). ``on_sample(key, ms)`` sees every measurement (a progress bar).
    """
    if rounds < 1 or iters < 1 or settle < 0:
        raise ValueError(f"rounds and iters must be >= 1 and settle >= 0; got {rounds}, {iters}, {settle}")
    timer = timer if timer is not None else WallTimer()
    samples: Dict[K, List[float]] = {k: [] for k in runners}
    for keys in round_orders(list(runners), rounds, order, seed):
        for key in keys:
            if before is not None:
                before(key)
            fn = runners[key]
            for _ in range(settle):
                fn()
            ms = timer.ms(fn, iters)
            samples[key].append(ms)
            if on_sample is not None:
                on_sample(key, ms)
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (``q`` in [0, 100]) of a non-empty sequence."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of an empty sequence")
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> Dict[str, float]:
    """``median``, ``p10``, ``p90``, ``mean``, ``min``, ``max`` of a non-empty sequence."""
    return {
        "median": statistics.median(values),
        "p10": percentile(values, 10),
        "p90": percentile(values, 90),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
    }


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> List[float]:
    """``numerator[i] / denominator[i]`` for measurements paired by round (e.g. baseline ms / contender ms)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired ratios need as many rounds on both sides; got {len(numerator)}, {len(denominator)}")
    return [a / b for a, b in zip(numerator, denominator)]


def is_noisy(values: Sequence[float], spread: float = NOISY_SPREAD) -> bool:
    """Whether the 10th-90th percentile interval of ``values`` is wider than ``spread`` × their median."""
    return (percentile(values, 90) - percentile(values, 10)) > spread * statistics.median(values)


def ratio_summary(ratios: Sequence[float], spread: float = NOISY_SPREAD) -> Dict[str, Any]:
    """:func:`summary` of paired ratios plus ``noisy`` (:func:`is_noisy`)."""
    return {**summary(ratios), "noisy": is_noisy(ratios, spread)}
