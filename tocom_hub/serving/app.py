"""The Ray Serve deployment (needs ``pip install tocom-hub[serve]``): HTTP in, :class:`~.engine.ServeEngine`
batches out. Routes (relative to the application's route prefix):

* ``POST /`` (or ``/predict``): body = the image's bytes (``Content-Type: image/*`` or
  ``application/octet-stream``) → ``{"top_k": [{"index", "label", "prob"}], "r": r}``; headers
  ``x-tocom-r`` (the r that served it) and ``x-tocom-latency-ms`` (in-replica latency). Bad input → 4xx,
  a failing model call → 500, each with ``{"error": one line}``; the replica keeps serving.
* ``GET /metrics``: :meth:`~.metrics.Metrics.snapshot` plus the current ``r`` and mode.
* ``GET /info``: :meth:`~.engine.ServeEngine.describe`.
* ``POST /r``: ``{"r": 8}`` serves at r = 8 from the next batch on, ``{"r": null}`` hands r back to the
  latency controller.

Requests are batched with ``@serve.batch``; each batch runs in a worker thread (the event loop keeps
accepting and time-stamping requests meanwhile) and ``r`` moves only between batches.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

from ray import serve
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from .config import ServeConfig
from .engine import BadRequest, ServeEngine

__all__ = ["TocomServer", "build_app", "run"]


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


class TocomServer:
    """The deployment's class (wrapped by :func:`build_app`); one instance per replica."""

    def __init__(self, cfg: ServeConfig, calibration: Optional[Dict[int, float]] = None) -> None:
        self.engine = ServeEngine(cfg, calibration=calibration)
        self.cfg = cfg
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tocom-forward")
        self.predict_batch.set_max_batch_size(cfg.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def predict_batch(self, items: List[Tuple[Any, float]]) -> List[Tuple[Dict, int]]:
        images = [x for x, _ in items]
        arrivals = [a for _, a in items]
        loop = asyncio.get_running_loop()
        outs, r = await loop.run_in_executor(self.pool, self.engine.predict, images, arrivals)
        return [(o, r) for o in outs]

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.max_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(413, f"body of {declared} bytes exceeds the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _predict(self, request: Request) -> JSONResponse:
        arrival = self.engine.clock()
        try:
            body = await self._body(request)
            x = self.engine.decode(body, request.headers.get("content-type"))
        except BadRequest as e:
            return _error(e.status, e.reason)
        except ClientDisconnect:
            return _error(400, "the client closed the connection before the body was complete")
        try:
            out, r = await self.predict_batch((x, arrival))
        except Exception as e:  # the model call failed: this batch gets 500, the replica goes on
            return _error(500, f"model call failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        ms = 1000.0 * (self.engine.clock() - arrival)
        return JSONResponse({**out, "r": r}, headers={"x-tocom-r": str(r), "x-tocom-latency-ms": f"{ms:.3f}"})

    async def _set_r(self, request: Request) -> JSONResponse:
        try:
            payload = json.loads(await request.body() or b"null")
            if not isinstance(payload, dict) or "r" not in payload:
                raise ValueError('send {"r": R} or {"r": null}')
            loop = asyncio.get_running_loop()
            r = await loop.run_in_executor(self.pool, self.engine.set_fixed_r, payload["r"])
        except (ValueError, TypeError) as e:
            return _error(400, str(e).splitlines()[0])
        return JSONResponse({"r": r, "mode": "adaptive" if self.engine.adaptive else "fixed"})

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        method = request.method
        if method == "GET" and path == "metrics":
            snap = self.engine.metrics.snapshot()
            return JSONResponse({"r": self.engine.r, "mode": "adaptive" if self.engine.adaptive else "fixed", **snap})
        if method == "GET" and path == "info":
            return JSONResponse(self.engine.describe())
        if method == "GET" and path in ("healthz", ""):
            return JSONResponse({"ok": True, "r": self.engine.r})
        if method == "POST" and path == "r":
            return await self._set_r(request)
        if method == "POST" and path in ("", "predict"):
            self.engine.metrics.enter()
            status = 500
            try:
                response = await self._predict(request)
                status = response.status_code
                return response
            finally:
                self.engine.metrics.leave(status)
        return _error(404, f"no route {method} {request.url.path} (POST / or /predict, GET /metrics, /info, POST /r)")


def build_app(
    cfg: ServeConfig,
    *,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
    max_ongoing_requests: int = 256,
    calibration: Optional[Dict[int, float]] = None,
):
    """The Ray Serve application of ``cfg`` (``serve.run(build_app(cfg))``). ``num_cpus`` per replica;
    ``max_ongoing_requests`` per replica (requests beyond it wait in Ray's router, outside the budget)."""
    deployment = serve.deployment(
        TocomServer,
        name="tocom",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=max_ongoing_requests,
    )
    return deployment.bind(cfg, calibration)


def run(
    cfg: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    route_prefix: str = "/",
    num_cpus: Optional[int] = None,
    replica_cpus: float = 1.0,
    num_replicas: int = 1,
    address: Optional[str] = None,
    name: str = "tocom",
):
    """Start (or join, ``address="auto"``) Ray, start Serve's HTTP proxy on ``host:port`` (loopback by
    default) and deploy ``cfg``; returns the application's handle once it is ready."""
    import ray

    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    app = build_app(cfg, num_cpus=replica_cpus, num_replicas=num_replicas)
    return serve.run(app, name=name, route_prefix=route_prefix)  # returns once the replicas are ready
