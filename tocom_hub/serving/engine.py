"""The serving engine, without Ray: decode request bodies, run batches on one patched model, switch ``r``
between batches (:class:`ServeEngine`). :mod:`.app` wraps it in a Ray Serve deployment; tests and other
servers can drive it directly from any number of threads.

Concurrency: every batch forward holds the engine's lock in *shared* mode, every ``r`` switch (the
controller's step, :meth:`ServeEngine.set_fixed_r`) in *exclusive* mode, so a switch never lands inside a
forward, and forwards of concurrent batches at the same ``r`` run side by side (each forward's state lives
in its own thread-local :class:`~tocom_hub.core.context.ForwardContext`).
"""

from __future__ import annotations

import io
import math
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .config import ServeConfig, ServedModel, load_served_model
from .metrics import Metrics

__all__ = ["BadRequest", "ServeEngine", "SharedLock", "IMAGE_TYPES"]

# content types accepted as an image body (the decoder, not the header, decides what the bytes are)
IMAGE_TYPES = ("image/", "application/octet-stream")


class BadRequest(ValueError):
    """A request the server refuses: ``status`` (4xx) and a one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = int(status), reason


class SharedLock:
    """A readers–writer lock: many holders in shared mode, or one in exclusive mode (writers first)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def acquire_shared(self) -> None:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class ServeEngine:
    """One served model: ``decode`` request bodies, ``predict`` batches, move ``r`` between batches.

    Adaptive (``cfg.fixed_r is None``): a :class:`~tocom_hub.LatencyController` calibrated at
    ``cfg.max_batch_size`` gets, after every batch, the largest in-replica latency of its requests (queueing +
    forward, ``arrivals`` given to :meth:`predict`) plus one batch forward per full batch still queued behind
    it (``metrics.in_flight``, counted by the HTTP layer), with the budget ``cfg.control_fraction × cfg.budget_ms``
    (the controller acts on the median of its window; the rest of the budget is the tail's); queueing under a
    load spike thus reads as a slowdown and moves ``r`` up. Fixed: the model stays at ``cfg.fixed_r`` until
    :meth:`set_fixed_r` moves it.

    Args:
        cfg: the :class:`ServeConfig`.
        served: an already loaded :class:`ServedModel` (default: :func:`load_served_model`).
        calibration: ``{r: ms}`` to skip measuring (the controller's ``latencies=``).
        clock: seconds as a float (default ``time.perf_counter``).
    """

    def __init__(
        self,
        cfg: ServeConfig,
        served: Optional[ServedModel] = None,
        *,
        calibration: Optional[Dict[int, float]] = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        from ..tools.latency import LatencyController

        self.cfg, self.clock = cfg, clock
        self.served = served if served is not None else load_served_model(cfg)
        s = self.served
        self.controller = LatencyController(
            s.model,
            s.bank,
            s.source_r,
            cfg.budget_ms * cfg.control_fraction,
            batch_size=cfg.max_batch_size,
            r_values=cfg.r_values,
            scale=s.scale,
            method=s.method,
            target=cfg.target,
            window=cfg.window,
            patience_down=cfg.patience_down,
            iters=cfg.calibrate_iters,
            clock=clock,
            progress=False,
        )
        self.model = s.model
        self.r_values = self.controller.r_values
        self.fixed_r: Optional[int] = None
        self._lock = SharedLock()
        self.metrics = Metrics()
        self.labels = list(cfg.labels) if cfg.labels is not None else None
        if cfg.fixed_r is not None:
            self.set_fixed_r(cfg.fixed_r)
        else:
            self.controller.calibrate(latencies=calibration)

    # -- r -----------------------------------------------------------------------------------------
    @property
    def r(self) -> int:
        """The ``r`` the next batch runs at."""
        return self.controller.r

    @property
    def adaptive(self) -> bool:
        return self.fixed_r is None

    def _check_r(self, r: int) -> None:
        from ..core.checks import is_int

        if not is_int(r) or r not in self.r_values:
            raise ValueError(f"r must be one of the served r values {list(self.r_values)}; got {r!r}")

    def set_fixed_r(self, r: Optional[int]) -> int:
        """Serve at ``r`` from the next batch on; ``None`` hands ``r`` back to the controller (calibrating it
        first if it never was). Returns the ``r`` now in effect."""
        if r is not None:
            self._check_r(r)
        self._lock.acquire_exclusive()
        try:
            if r is None:
                if not self.controller.calibrated:
                    self.controller.calibrate()
                self.fixed_r = None
            else:
                self.controller.switch(r)  # the bank's update (set_target_r) or plain set_r
                self.fixed_r = r
            return self.controller.r
        finally:
            self._lock.release_exclusive()

    # -- requests ----------------------------------------------------------------------------------
    def decode(self, body: bytes, content_type: Optional[str] = None):
        """The model input ``[3, H, W]`` of one request body; :class:`BadRequest` (4xx) for anything else."""
        ctype = (content_type or "").split(";")[0].strip().lower()
        if not ctype.startswith(IMAGE_TYPES):
            raise BadRequest(415, f"content type must be image/* or application/octet-stream; got {ctype or 'none'!r}")
        if len(body) > self.cfg.max_bytes:
            raise BadRequest(413, f"body of {len(body)} bytes exceeds the limit of {self.cfg.max_bytes}")
        if not body:
            raise BadRequest(400, "empty body: send the image's bytes")
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(body))
            w, h = img.size
            if w * h > self.cfg.max_pixels:
                raise BadRequest(413, f"image of {w}x{h} pixels exceeds the limit of {self.cfg.max_pixels}")
            img = img.convert("RGB")
        except BadRequest:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise BadRequest(400, f"not a readable image ({type(e).__name__})") from None
        return self.served.transform(img)

    def predict(self, images: Sequence[Any], arrivals: Optional[Sequence[float]] = None) -> Tuple[List[Dict], int]:
        """Run one batch (a list of ``[3, H, W]`` tensors) at the current ``r``; returns one result per image
        (``top_k``: ``[{"index", "label", "prob"}]``) and the ``r`` used. ``arrivals``: each request's arrival
        on :attr:`clock`, for the latency the controller sees (default: the batch's start)."""
        import torch

        if not len(images):
            return [], self.r
        start = self.clock()
        self._lock.acquire_shared()
        try:
            r = self.r
            x = torch.stack(list(images)).to(next(self.model.parameters()).device)
            with torch.inference_mode():
                logits = self.model(x)
            probs = logits.float().softmax(-1)
            k = min(self.cfg.top_k, probs.shape[-1])
            top = probs.topk(k, dim=-1)
        finally:
            self._lock.release_shared()
        end = self.clock()
        waits = [end - a for a in arrivals] if arrivals is not None else [end - start]
        # what the controller sees: this batch's worst latency plus the forwards the requests already
        # waiting behind it will sit through (a queue that outlives the batch is load, not calm)
        behind = max(0, self.metrics.in_flight - len(images))
        ms = 1000.0 * max(waits) + math.ceil(behind / self.cfg.max_batch_size) * 1000.0 * (end - start)
        self._lock.acquire_exclusive()
        try:
            if self.fixed_r is None and r == self.controller.r:  # a batch that ran at an r since left is stale
                self.controller.step(ms, r=r)
        finally:
            self._lock.release_exclusive()
        self.metrics.batch(r=r, size=len(images), ms=ms, forward_ms=1000.0 * (end - start), latencies=waits)
        values, indices = top.values.tolist(), top.indices.tolist()
        out = [
            {"top_k": [{"index": i, "label": self._label(i), "prob": p} for i, p in zip(ix, vs)]}
            for ix, vs in zip(indices, values)
        ]
        return out, r

    def _label(self, i: int) -> Optional[str]:
        return self.labels[i] if self.labels is not None and i < len(self.labels) else None

    def describe(self) -> Dict[str, Any]:
        """What is served: the model, bank, pair, r values, mode, calibration curve and the settings."""
        s = self.served
        return {
            "model": s.info.get("name"),
            "bank": s.bank is not None,
            "method": s.method,
            "source_r": s.source_r,
            "r_values": list(self.r_values),
            "r": self.r,
            "mode": "adaptive" if self.adaptive else "fixed",
            "budget_ms": self.cfg.budget_ms,
            "max_batch_size": self.cfg.max_batch_size,
            "curve_ms": self.controller.curve,
            "config": self.cfg.describe(),
        }
