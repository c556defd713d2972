"""What a replica reports on ``/metrics``: ``r`` over time, latency quantiles, queue length, counts."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Deque, Dict, Optional, Sequence

from ..tools.timing import percentile

__all__ = ["Metrics"]


class Metrics:
    """Thread-safe rolling record of served batches (the last ``keep_batches``) and request latencies (the
    last ``keep_requests``), plus the number of requests in the replica (``queue``) and error counts."""

    def __init__(self, keep_batches: int = 2048, keep_requests: int = 8192) -> None:
        self._lock = threading.Lock()
        self._batches: Deque[Dict[str, Any]] = deque(maxlen=keep_batches)
        self._latencies: Deque[float] = deque(maxlen=keep_requests)
        self.t0 = time.time()
        self.requests = 0
        self.in_flight = 0
        self.errors: Dict[str, int] = {"4xx": 0, "5xx": 0}

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1

    def leave(self, status: int = 200) -> None:
        with self._lock:
            self.in_flight -= 1
            if 400 <= status < 500:
                self.errors["4xx"] += 1
            elif status >= 500:
                self.errors["5xx"] += 1

    def batch(self, *, r: int, size: int, ms: float, forward_ms: float, latencies: Sequence[float]) -> None:
        with self._lock:
            self.requests += size
            self._latencies.extend(1000.0 * x for x in latencies)
            self._batches.append(
                {
                    "t": round(time.time() - self.t0, 4),
                    "r": r,
                    "size": size,
                    "max_ms": round(ms, 3),
                    "forward_ms": round(forward_ms, 3),
                    "queue": self.in_flight,
                }
            )

    def snapshot(self, last: Optional[int] = 200) -> Dict[str, Any]:
        """JSON-ready: ``requests``, ``in_flight`` (queue length now), ``errors``, ``latency_ms``
        (p50/p90/p99/max of the recent requests' in-replica latency) and the ``last`` batches
        (``t`` s since start, ``r``, ``size``, ``max_ms``, ``forward_ms``, ``queue``)."""
        with self._lock:
            lat = list(self._latencies)
            batches = list(self._batches)[-last:] if last else list(self._batches)
            q = (
                {f"p{p}": round(percentile(lat, p), 3) for p in (50, 90, 99)} | {"max": round(max(lat), 3)}
                if lat
                else {}
            )
            return {
                "requests": self.requests,
                "in_flight": self.in_flight,
                "errors": dict(self.errors),
                "latency_ms": q,
                "batches": batches,
            }
