"""Load test of ``tocom_hub.serving`` on loopback: steady load, a spike, steady again, against one Ray Serve
deployment run three ways — fixed r = 0, fixed r = R, adaptive r (latency controller, bank merged).

The served model is a DeiT-Tiny-shaped stand-in (timm ``deit_tiny_patch16_224``, ``pretrained=False``) with a
ToCom bank of its shape (R = 16, rank 2, random up factors): latency does not depend on the weights (the bank
is merged into them), and the embedded demo model is too small for HTTP load to be limited by its forward.
Each served request's accuracy is looked up from the demo's *measured* accuracy at the r that served it
(``benchmarks/results/study.json``, task shape-count, fine-tuned at r = 0, with / without the bank), so a run
reports the accuracy a client received on average. The client is open-loop (Poisson arrivals, seeded, asyncio +
httpx), bounded (an in-flight cap and a per-request timeout), records every request's latency and the r in its
``x-tocom-r`` header, and stops by itself::

    python benchmarks/serve_load.py --json benchmarks/results/serve_load.json --plot benchmarks/results/serve_load.png

The budget holds for the in-replica latency (queue + batch forward, ``x-tocom-latency-ms``: what the
controller sees); the client's end-to-end latency (Ray's HTTP proxy and the client on the same 2 cores
included) is recorded next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tocom_hub.core.jsonio import write_json  # noqa: E402
from tocom_hub.tools.timing import percentile  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STUDY = os.path.join(HERE, "results", "study.json")


def schedule(phases: Sequence[Sequence[float]], seed: int) -> List[float]:
    """Poisson send times (s from the start) for ``phases`` = ``[(seconds, requests per second), …]``."""
    rng, times, start = random.Random(seed), [], 0.0
    for seconds, rps in phases:
        t = start
        while True:
            t += rng.expovariate(rps)
            if t >= start + seconds:
                break
            times.append(t)
        start += seconds
    return times


def accuracy_table(path: str = STUDY) -> Dict[str, Dict[int, float]]:
    """``{"tocom"|"no_tocom": {r: top-1 %}}`` of the demo (shape-count, source r = 0) from the study."""
    study = json.loads(open(path).read())
    grid = study["tasks"][study["demo_task"]]["grid"]
    return {k: {int(r): float(a) for r, a in zip(grid["targets"], grid["src0"][k])} for k in ("tocom", "no_tocom")}


def windows(rows: List[Dict[str, Any]], seconds: float, width: float, budget_ms: float) -> List[Dict[str, Any]]:
    """Per ``width``-s window of send time: requests, p99 in-replica / end-to-end ms, mean r, over budget."""
    out = []
    k = 0
    while k * width < seconds:
        lo, hi = k * width, (k + 1) * width
        ok = [x for x in rows if lo <= x["t"] < hi and x["status"] == 200]
        w: Dict[str, Any] = {"t0": lo, "t1": hi, "n": len([x for x in rows if lo <= x["t"] < hi]), "ok": len(ok)}
        if ok:
            w["p99_server_ms"] = round(percentile([x["server_ms"] for x in ok], 99), 1)
            w["p99_e2e_ms"] = round(percentile([x["e2e_ms"] for x in ok], 99), 1)
            w["mean_r"] = round(sum(x["r"] for x in ok) / len(ok), 2)
            w["over_budget"] = w["p99_server_ms"] > budget_ms
        out.append(w)
        k += 1
    return out


def summarize(rows: List[Dict[str, Any]], acc: Dict[int, float], budget_ms: float) -> Dict[str, Any]:
    ok = [x for x in rows if x["status"] == 200]
    s: Dict[str, Any] = {"requests": len(rows), "ok": len(ok), "failed": len(rows) - len(ok)}
    if ok:
        server, e2e = [x["server_ms"] for x in ok], [x["e2e_ms"] for x in ok]
        s.update(
            {
                "server_ms": {f"p{q}": round(percentile(server, q), 1) for q in (50, 90, 99)},
                "e2e_ms": {f"p{q}": round(percentile(e2e, q), 1) for q in (50, 90, 99)},
                "mean_r": round(sum(x["r"] for x in ok) / len(ok), 2),
                "mean_accuracy": round(sum(acc[x["r"]] for x in ok) / len(ok), 3),
                "share_over_budget": round(sum(x["server_ms"] > budget_ms for x in ok) / len(ok), 4),
            }
        )
    return s


def _image(size: int = 224) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


async def drive(url: str, times: List[float], body: bytes, max_in_flight: int, timeout_s: float) -> List[Dict]:
    """Send ``body`` at ``times`` (open loop); one row per scheduled request (``status`` 0: shed at the cap or
    timed out / failed in transport)."""
    import httpx

    rows: List[Dict[str, Any]] = []
    in_flight = 0
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def one(t: float) -> None:
            nonlocal in_flight
            row: Dict[str, Any] = {"t": round(t, 4), "status": 0}
            rows.append(row)
            if in_flight >= max_in_flight:
                row["error"] = "shed"
                return
            in_flight += 1
            start = time.perf_counter()
            try:
                resp = await client.post(url, content=body, headers={"content-type": "image/png"})
                row["e2e_ms"] = round((time.perf_counter() - start) * 1000, 2)
                row["status"] = resp.status_code
                if resp.status_code == 200:
                    row["server_ms"] = float(resp.headers["x-tocom-latency-ms"])
                    row["r"] = int(resp.headers["x-tocom-r"])
            except Exception as e:  # noqa: BLE001 - recorded per request
                row["error"] = type(e).__name__
            finally:
                in_flight -= 1

        t0 = time.perf_counter()
        tasks = []
        for t in times:
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(t)))
        await asyncio.gather(*tasks)
    return sorted(rows, key=lambda x: x["t"])


def _bank_dir(model_name: str, r_max: int, root: str) -> str:
    import timm
    import torch

    from tocom_hub.core.bank.module import ToComBank

    model = timm.create_model(model_name, pretrained=False)
    bank = ToComBank.for_model(model, r_max=r_max, rank=2)
    with torch.no_grad():
        for p in bank.lora_B.values():
            p.normal_(0, 0.02)
    path = os.path.join(root, "bank")
    bank.save_pretrained(path)
    return path


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    colors = {"fixed_r0": "tab:red", "fixed_rmax": "tab:blue", "adaptive": "tab:green"}
    for name, run in result["runs"].items():
        ws = [w for w in run["windows"] if "p99_server_ms" in w]
        mid = [(w["t0"] + w["t1"]) / 2 for w in ws]
        ax1.plot(mid, [w["p99_server_ms"] for w in ws], "o-", color=colors[name], label=name)
        ok = [x for x in run["rows"] if x["status"] == 200]
        lift = {"fixed_r0": -0.3, "fixed_rmax": 0.3}.get(name, 0.0)  # keep the runs' dots apart
        ax2.plot([x["t"] for x in ok], [x["r"] + lift for x in ok], ".", ms=2, color=colors[name], label=name)
    ax1.axhline(result["budget_ms"], color="k", ls="--", label="budget")
    ax1.set_yscale("log")
    ax1.set_ylabel(f"p99 in-replica latency per {result['window_s']:.0f} s window (ms)")
    ax1.legend(fontsize=8)
    edges = [0.0]
    for seconds, _ in result["phases"]:
        edges.append(edges[-1] + seconds)
    for ax in (ax1, ax2):
        for e in edges[1:-1]:
            ax.axvline(e, color="grey", lw=0.5)
    ax2.set_ylabel("r that served the request")
    rates = " / ".join(f"{rps:g} rps" for _, rps in result["phases"])
    ax2.set_xlabel(f"send time (s); grey lines: load changes ({rates})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--r-max", type=int, default=16)
    p.add_argument("--budget-ms", type=float, default=400.0)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--control-fraction", type=float, default=0.5)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--phases", default="15:8,10:24,10:8", help="seconds:rps,… (default steady, 3x spike, steady)")
    p.add_argument("--window-s", type=float, default=5.0)
    p.add_argument("--reaction-s", type=float, default=2.0, help="the controller's allowance after a load change")
    p.add_argument("--max-in-flight", type=int, default=400)
    p.add_argument("--timeout-s", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--runs", default="fixed_r0,fixed_rmax,adaptive")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw --plot from a result file")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.plot)
        return 0
    phases = [tuple(float(v) for v in ph.split(":")) for ph in args.phases.split(",")]
    seconds = sum(s for s, _ in phases)
    times = schedule(phases, args.seed)
    acc = accuracy_table()

    import httpx
    import ray
    from ray import serve

    from tocom_hub.serving.app import build_app
    from tocom_hub.serving.config import ServeConfig

    wall = time.time()
    tmp = tempfile.mkdtemp(prefix="serve-load-")
    cfg = ServeConfig(
        model=args.model,
        bank=_bank_dir(args.model, args.r_max, tmp),
        source_r=0,
        budget_ms=args.budget_ms,
        control_fraction=args.control_fraction,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000,
        calibrate_iters=5,
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs: Dict[str, Any] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(cfg, num_cpus=1), name="tocom", route_prefix="/")
        base = f"http://127.0.0.1:{args.port}/"
        info = httpx.get(base + "info", timeout=30).json()
        body = _image()
        fixed = {"fixed_r0": 0, "fixed_rmax": args.r_max, "adaptive": None}
        for name in args.runs.split(","):
            httpx.post(base + "r", json={"r": fixed[name]}, timeout=120).raise_for_status()
            for _ in range(3):  # warm the path at this r, then let the queue empty
                httpx.post(base, content=body, headers={"content-type": "image/png"}, timeout=30)
            time.sleep(2.0)
            print(f"{name}: {len(times)} requests over {seconds:.0f} s …", flush=True)
            rows = asyncio.run(drive(base, times, body, args.max_in_flight, args.timeout_s))
            table = acc["tocom"]
            run = {
                "r": fixed[name],
                "summary": summarize(rows, table, args.budget_ms),
                "summary_accuracy_no_bank": summarize(rows, acc["no_tocom"], args.budget_ms).get("mean_accuracy"),
                "windows": windows(rows, seconds, args.window_s, args.budget_ms),
                "rows": rows,
            }
            runs[name] = run
            print(f"  {json.dumps(run['summary'])}", flush=True)
            time.sleep(max(2.0, args.timeout_s / 10))
        metrics = httpx.get(base + "metrics", timeout=30).json()
    finally:
        serve.shutdown()
        ray.shutdown()

    edges, t = [], 0.0
    for s, _ in phases[:-1]:
        t += s
        edges.append(t)
    checks: Dict[str, Any] = {}
    if "fixed_r0" in runs and len(phases) >= 2:
        end = edges[1] if len(edges) > 1 else seconds
        spike = [w for w in runs["fixed_r0"]["windows"] if edges[0] <= w["t0"] < end]
        checks["fixed_r0_over_budget_in_spike"] = any(w.get("over_budget") for w in spike)
    if "adaptive" in runs:
        ws = runs["adaptive"]["windows"]
        checks["adaptive_within_budget_every_window"] = all(not w.get("over_budget", False) for w in ws)
        settled = [x for x in runs["adaptive"]["rows"] if not any(e <= x["t"] < e + args.reaction_s for e in edges)]
        checks["adaptive_within_budget_every_window_after_reaction"] = all(
            not w.get("over_budget", False) for w in windows(settled, seconds, args.window_s, args.budget_ms)
        )
        if "fixed_rmax" in runs:
            a, m = runs["adaptive"]["summary"], runs["fixed_rmax"]["summary"]
            checks["adaptive_accuracy_above_fixed_rmax"] = a.get("mean_accuracy", 0) > m.get("mean_accuracy", 0)
            checks["adaptive_accuracy_above_fixed_rmax_no_bank"] = (
                a.get("mean_accuracy", 0) > runs["fixed_rmax"]["summary_accuracy_no_bank"]
            )
    result = {
        "model": args.model,
        "stand_in": "random weights + a random bank of the model's shape; accuracy from the demo's measured grid",
        "accuracy_source": "benchmarks/results/study.json tasks.shape-count.grid.src0 (tocom: with the bank)",
        "budget_ms": args.budget_ms,
        "control_fraction": args.control_fraction,
        "budget_applies_to": "in-replica latency (queue + batch forward, x-tocom-latency-ms)",
        "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "phases": phases,
        "window_s": args.window_s,
        "reaction_s": args.reaction_s,
        "seed": args.seed,
        "served": info,
        "checks": checks,
        "runs": runs,
        "final_metrics_tail": metrics.get("batches", [])[-20:],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_s": round(time.time() - wall, 1),
    }
    print(json.dumps(checks, indent=1))
    if args.json:
        write_json(args.json, result, indent=1)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
