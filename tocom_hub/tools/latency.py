"""Hold a latency budget by switching the compression degree ``r`` as the server's load changes.

The ToCom paper's use case: one deployed model, a latency budget, and a machine whose load varies.
:class:`LatencyController` measures the latency of every target ``r`` once on the running machine
(:meth:`~LatencyController.calibrate`), starts at the smallest ``r`` that fits the budget, and then
watches the latency of real requests. It models load as a *slowdown factor* — observed latency over
the calibrated latency of the ``r`` the request ran at — and predicts every ``r``'s latency under the
current load as ``calibrated(r) × factor``:

* **up** as soon as the predicted latency of the current ``r`` (median factor of the last ``window``
  requests) exceeds the budget: to the smallest ``r`` predicted to fit within ``target × budget``;
* **down** when a smaller ``r`` is predicted to fit within ``target × budget`` for ``patience_down``
  requests in a row.

Between ``target × budget`` and the budget nothing moves: that band is the hysteresis that keeps
``r`` from oscillating. Switching is :func:`tocom_hub.set_target_r` (the bank's update changes in
place, a few ms for DeiT-B) or, without a bank, :func:`tocom_hub.set_r` (plain ToMe / EViT).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..core.bank.module import ToComBank
from ..core.checks import is_int
from ..core.compensation.api import apply, get_compensation, set_target_r
from ..core.patch import METHODS, get_method, patch, set_r
from ..core.preserve import preserved
from ..core.rspec import BANK_RANGE, check_r, check_r_values, model_r_limit
from .timing import NOISY_SPREAD, WallTimer, interleaved, is_noisy, percentile, synchronize

__all__ = ["LatencyController"]

Clock = Callable[[], float]


class LatencyController:
    """Keep a ViT within ``budget_ms`` per batch by moving ``r`` with the load. Example::

        ctl = tocom_hub.LatencyController(model, bank, source_r=0, budget_ms=40, batch_size=8)
        ctl.calibrate()                      # latency of every r on this machine, picks the start r
        logits = ctl(images)                 # runs, measures, moves r up/down as load changes

    Args:
        model: a timm ViT (patched here if needed; left patched, with the bank merged).
        bank: a :class:`~tocom_hub.ToComBank`, a bank path / Hub id, or ``None`` for plain ToMe/EViT
            ``r`` control.
        source_r: the ``r`` the model was fine-tuned at (the bank's source degree).
        budget_ms: the latency budget of one forward of ``batch_size`` images, in milliseconds.
        batch_size: batch size of the calibration batch (that of your requests).
        r_values: the ``r`` values the controller may use (sorted, validated). Default: the bank's
            ``0 … R`` (capped at what the model supports); without a bank ``0 … ⌈patches / depth⌉``
            (beyond that the last block has nothing left to merge).
        scale: ToCom ``s`` (default: the bank's). method: ``"tome"`` / ``"evit"`` (default: the
            bank's, else the model's patch method, else ToMe).
        input_size: ``(H, W)`` of the calibration batch (default: the model's).
        target: fraction of the budget a new ``r`` must be predicted to fit in (default 0.9).
        window: requests whose median slowdown factor drives the decisions (default 5).
        patience_down: requests in a row a smaller ``r`` must fit before moving down (default 3).
        warmup, iters: untimed / timed calibration forwards per ``r`` (interleaved over ``r``).
        clock: seconds as a float (default ``time.perf_counter``); inject a fake one for tests.
        progress: tqdm bar during calibration.

    Attributes: ``r`` (current), ``curve`` (calibrated ms per ``r``), ``spread`` (10th and 90th percentile
    ms per ``r`` of the calibration rounds), ``noisy`` (rounds disagreed: calibration warned, rerun it on a
    quieter machine or with more ``iters``), ``factor`` (current median slowdown), ``history`` (one dict
    per request: ``request``, ``ms``, ``r``, ``factor``, ``next_r``).
    """

    def __init__(
        self,
        model: nn.Module,
        bank: Union[ToComBank, str, None],
        source_r: int,
        budget_ms: float,
        batch_size: int = 1,
        r_values: Optional[Sequence[int]] = None,
        *,
        scale: Optional[float] = None,
        method: Optional[str] = None,
        input_size: Optional[Sequence[int]] = None,
        target: float = 0.9,
        window: int = 5,
        patience_down: int = 3,
        warmup: int = 2,
        iters: int = 5,
        clock: Clock = time.perf_counter,
        progress: bool = True,
    ) -> None:
        # -- validate everything before touching the model -----------------------------------------
        if (
            isinstance(budget_ms, bool)
            or not isinstance(budget_ms, (int, float))
            or not (math.isfinite(budget_ms) and budget_ms > 0)
        ):
            raise ValueError(f"budget_ms must be a positive number of milliseconds; got {budget_ms!r}")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target must be in (0, 1]; got {target!r}")
        for name, v, low in (
            ("window", window, 1),
            ("patience_down", patience_down, 1),
            ("warmup", warmup, 0),
            ("iters", iters, 1),
        ):
            if not is_int(v) or v < low:
                raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
        if get_compensation(model) is not None:
            raise ValueError(
                "the model already carries a ToCom bank; call tocom_hub.remove(model) and pass the "
                "bank to LatencyController"
            )
        if bank is not None and not isinstance(bank, ToComBank):
            from ..hub.load import load_bank

            bank = load_bank(bank)
        if method is not None and method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        if bank is not None:
            if method is not None and method != bank.method:
                raise ValueError(f"the bank was trained for {bank.method!r} but method={method!r} was requested")
            method = bank.method
        r_max, r_why = (bank.r_max, BANK_RANGE) if bank is not None else (None, None)
        source_r = check_r(source_r, "source_r", r_max=r_max, why=r_why)
        method = method or get_method(model) or "tome"
        limit, limit_why = model_r_limit(model, method)
        if r_values is None:
            if bank is not None:
                top = bank.r_max
            else:
                patches = int(model.patch_embed.num_patches)
                top = math.ceil(patches / len(model.blocks))
            r_values = range(0, min(top, limit) + 1)
        rs = check_r_values(r_values, "r_values", r_max=limit, why=limit_why)
        if bank is not None:
            rs = check_r_values(rs, "r_values", r_max=bank.r_max, why=BANK_RANGE)
        rs = sorted(set(rs))

        self.model, self.bank, self.source_r, self.method = model, bank, source_r, method
        self.budget_ms, self.batch_size, self.r_values = float(budget_ms), batch_size, tuple(rs)
        self.scale, self.input_size, self.target = scale, input_size, float(target)
        self.window, self.patience_down, self.warmup, self.iters = window, patience_down, warmup, iters
        self.clock, self.progress = clock, progress
        self.curve: Optional[Dict[int, float]] = None
        self.spread: Dict[int, Any] = {}
        self.noisy = False
        self._expected: Dict[int, float] = {}
        self._factors: Deque[float] = deque(maxlen=window)
        self._down_streak = 0
        self._requests = 0
        self.history: List[Dict[str, Any]] = []

        # -- attach --------------------------------------------------------------------------------
        self._restore = contextlib.ExitStack()  # closing it puts the model back as it was (remove())
        self._restore.enter_context(preserved(model))
        try:
            patch(model, method=method)
            set_r(model, rs[0])
            if bank is not None:
                apply(model, source_r, rs[0], bank=bank, scale=scale, merge=True)
        except BaseException:
            self._restore.close()
            raise
        self.r = rs[0]

    # -- helpers -----------------------------------------------------------------------------------
    def _switch(self, r: int) -> None:
        if self.bank is not None:
            set_target_r(self.model, r)
        else:
            set_r(self.model, r)
        self.r = r

    def switch(self, r: int) -> None:
        """Move to ``r`` now (one of :attr:`r_values`), e.g. to pin it; :meth:`step` may move it again."""
        if not is_int(r) or r not in self.r_values:
            raise ValueError(f"r must be one of the controller's r values {self.r_values}; got {r!r}")
        self._switch(r)

    def _timer(self) -> WallTimer:
        """Wall-clock timer on ``clock``, the model's device synchronised at both ends."""
        device = next(self.model.parameters()).device
        return WallTimer(self.clock, sync=lambda: synchronize(device))

    # -- calibration -------------------------------------------------------------------------------
    @torch.inference_mode()
    def calibrate(
        self, x: Optional[torch.Tensor] = None, latencies: Optional[Mapping[int, float]] = None
    ) -> Dict[int, float]:
        """Measure the latency (median ms) of every ``r`` on this machine and switch to the smallest
        ``r`` that fits ``target × budget`` (the largest ``r`` if none does).

        ``x``: the calibration batch (default: ``batch_size`` random images at the model's size).
        ``latencies``: skip measuring and use these ``{r: ms}`` (e.g. ``ctl.curve`` saved from an
        earlier run on the same machine). Forwards are interleaved over ``r`` (``warmup`` untimed,
        then ``iters`` timed rounds), so a load drift during calibration hits every ``r`` alike.
        Returns the calibrated ``{r: ms}``.
        """
        if latencies is not None:
            missing = [r for r in self.r_values if r not in latencies]
            if missing:
                raise ValueError(f"latencies lacks r values {missing}")
            bad = [r for r in self.r_values if not (math.isfinite(latencies[r]) and latencies[r] > 0)]
            if bad:
                raise ValueError(f"latencies must be positive ms; bad entries for r={bad}")
            curve = {r: float(latencies[r]) for r in self.r_values}
        else:
            from tqdm.auto import tqdm

            from .images import model_img_size

            if x is None:
                param = next(self.model.parameters())
                size = tuple(self.input_size) if self.input_size is not None else model_img_size(self.model)
                x = torch.randn(self.batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
                x = x.to(param.device, param.dtype)
            was_training = self.model.training
            self.model.eval()
            rounds = self.warmup + self.iters  # forwards, backwards, forwards … over r; warm-up rounds dropped
            off = {} if self.progress else {"disable": True}  # disable=False would override TQDM_DISABLE=1
            bar = tqdm(total=rounds * len(self.r_values), desc="calibrate", unit="fwd", **off)
            try:
                runs = {r: (lambda: self.model(x)) for r in self.r_values}  # one model, switched by _switch
                timed = interleaved(
                    runs,
                    rounds,
                    timer=self._timer(),
                    order="alternate",
                    before=self._switch,
                    on_sample=lambda r, ms: bar.update(1),
                )
                samples = {r: v[self.warmup :] for r, v in timed.items()}
            finally:
                bar.close()
                self.model.train(was_training)
            curve = {r: statistics.median(v) for r, v in samples.items()}
            self.spread = {r: (percentile(v, 10), percentile(v, 90)) for r, v in samples.items()}
            self.noisy = any(is_noisy(v) for v in samples.values())
            if self.noisy:
                warnings.warn(
                    f"LatencyController.calibrate: noisy — rerun: the {self.iters} rounds of some r differ "
                    f"by more than {100 * NOISY_SPREAD:.0f} % of their median ({self._spread_text()}); "
                    f"calibrate again on a quieter machine or with more iters",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.curve = curve
        # the expected latency never increases with r (merging more cannot cost more): a running
        # minimum over increasing r irons out measurement noise
        best = math.inf
        for r in self.r_values:
            best = min(best, curve[r])
            self._expected[r] = best
        self._factors.clear()
        self._down_streak = 0
        self.history = []
        self._requests = 0
        self._switch(self.pick(1.0))
        return dict(curve)

    def _spread_text(self) -> str:
        return ", ".join(f"r={r}: {lo:.1f}-{hi:.1f} ms" for r, (lo, hi) in self.spread.items())

    @property
    def calibrated(self) -> bool:
        return self.curve is not None

    def expected_ms(self, r: int, factor: float = 1.0) -> float:
        """Predicted latency of ``r`` under slowdown ``factor`` (calibrated, monotone in ``r``)."""
        self._require_calibration()
        return self._expected[r] * factor

    def pick(self, factor: float = 1.0) -> int:
        """Smallest ``r`` predicted to fit ``target × budget`` under slowdown ``factor`` (else the largest)."""
        self._require_calibration()
        limit = self.target * self.budget_ms
        for r in self.r_values:
            if self._expected[r] * factor <= limit:
                return r
        return self.r_values[-1]

    @property
    def factor(self) -> float:
        """Median slowdown of the last ``window`` requests (1.0 before any request)."""
        return statistics.median(self._factors) if self._factors else 1.0

    @property
    def over_budget(self) -> bool:
        """Whether even the current ``r`` is predicted to exceed the budget (e.g. at the largest ``r``)."""
        return self.calibrated and self.expected_ms(self.r, self.factor) > self.budget_ms

    def _require_calibration(self) -> None:
        if self.curve is None:
            raise RuntimeError("call calibrate() first (it measures the latency of every r on this machine)")

    # -- control -----------------------------------------------------------------------------------
    def step(self, measured_ms: float, r: Optional[int] = None) -> int:
        """Record one request's latency (measured at ``r``, default the current one) and move ``r``
        if the load calls for it; returns the ``r`` for the next request."""
        self._require_calibration()
        if (
            isinstance(measured_ms, bool)
            or not isinstance(measured_ms, (int, float))
            or not (math.isfinite(measured_ms) and measured_ms >= 0)
        ):
            raise ValueError(f"measured_ms must be a non-negative number; got {measured_ms!r}")
        ran_at = self.r if r is None else r
        if ran_at not in self._expected:
            raise ValueError(f"r={ran_at!r} is not one of the controller's r values {self.r_values}")
        self._factors.append(measured_ms / self._expected[ran_at])
        factor = self.factor
        new = self.r
        best = self.pick(factor)
        if self.expected_ms(self.r, factor) > self.budget_ms:  # over budget: go up now
            self._down_streak = 0
            if best > self.r:
                new = best
        elif best < self.r:  # a smaller r fits again: go down once it has for `patience_down` requests
            self._down_streak += 1
            if self._down_streak >= self.patience_down:
                new = best
        else:
            self._down_streak = 0
        if new != self.r:
            self._switch(new)
            self._down_streak = 0
        self.history.append(
            {"request": self._requests, "ms": float(measured_ms), "r": ran_at, "factor": factor, "next_r": self.r}
        )
        self._requests += 1
        return self.r

    def __call__(self, x: torch.Tensor) -> Any:
        """Run ``model(x)`` (inference mode) at the current ``r``, time it, :meth:`step`; returns the output.
        Calibrates first if :meth:`calibrate` was not called."""
        if self.curve is None:
            self.calibrate()
        ran_at = self.r
        with torch.inference_mode():
            out, ms = self._timer().timed(lambda: self.model(x))
        self.step(ms, r=ran_at)
        return out

    def remove(self) -> nn.Module:
        """Take the bank out and put the model back as it was before the controller (patch state, ``r``)."""
        self._restore.close()
        return self.model

    def __repr__(self) -> str:
        return (
            f"LatencyController(budget_ms={self.budget_ms}, r={getattr(self, 'r', None)}, "
            f"r_values={self.r_values[0]}…{self.r_values[-1]}, bank={'yes' if self.bank is not None else 'no'}, "
            f"method={self.method!r}, calibrated={self.calibrated})"
        )
