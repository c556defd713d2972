"""LatencyController (:mod:`tocom_hub.tools.latency`) against a fake clock whose cost model is known, real timing
smoke tests and ``examples/latency_budget.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tool_helpers import DEPTH, PATCHES, tiny_model

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.core.compensation.api import get_compensation

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py: one torch thread for the module


class FakeClock:
    """Time advances only through the cost model below: deterministic 'latency'."""

    def __init__(self):
        self.t = 0.0
        self.load = 1.0

    def __call__(self):
        return self.t


MS_PER_TOKEN = 0.1


def attach_cost(model, clock):
    """Every block costs MS_PER_TOKEN per token it outputs, times the load."""

    def hook(module, args, out):
        clock.t += clock.load * MS_PER_TOKEN * out.shape[1] / 1000.0

    for blk in model.blocks:
        blk.register_forward_hook(hook)


def closed_form_ms(r, n=1 + PATCHES, prefix=1):
    total = 0.0
    for _ in range(DEPTH):
        n -= min(r, (n - prefix) // 2)
        total += MS_PER_TOKEN * n
    return total


def test_latency_controller_follows_load_fake_clock():
    model = tiny_model()
    clock = FakeClock()
    attach_cost(model, clock)
    bank = ToComBank.for_model(model, r_max=32, rank=2)
    rs = list(range(0, 33, 4))
    budget = closed_form_ms(0) / 0.9 * 1.05  # r = 0 fits with 5 % to spare
    ctl = tocom_hub.LatencyController(
        model, bank, 0, budget, batch_size=2, r_values=rs, clock=clock, warmup=0, iters=2, progress=False
    )
    curve = ctl.calibrate()
    assert curve == pytest.approx({r: closed_form_ms(r) for r in rs})
    assert ctl.r == 0
    x = torch.randn(2, 3, 64, 64)
    for i in range(60):
        clock.load = 2.0 if 20 <= i < 40 else 1.0
        ctl(x)
        assert tocom_hub.get_r(model) == ctl.r == get_compensation(model).target_r  # switched through set_target_r
    rs_seen = [h["r"] for h in ctl.history]
    # up within 3 requests of the slowdown, to the smallest r predicted to fit: r=20 (62 → 6.2 ms · 2 ≤ 0.9 · budget)
    want_up = min(r for r in rs if 2 * closed_form_ms(r) <= 0.9 * budget)
    assert rs_seen[:20] == [0] * 20
    assert rs_seen[23:40] == [want_up] * 17
    # back down within window + patience requests of the end, then stays
    assert rs_seen[46:] == [0] * 14
    switches = sum(a != b for a, b in zip(rs_seen, rs_seen[1:]))
    assert switches == 2, rs_seen
    assert all(h["ms"] <= budget for h in ctl.history[23:40])
    ctl.remove()
    assert not tocom_hub.is_patched(model) and get_compensation(model) is None


def test_latency_calibration_reports_spread_and_warns_when_rounds_disagree():
    model = tiny_model()
    clock = FakeClock()
    attach_cost(model, clock)
    bank = ToComBank.for_model(model, r_max=8, rank=2)
    ctl = tocom_hub.LatencyController(
        model, bank, 0, 100.0, batch_size=2, r_values=[0, 8], clock=clock, warmup=0, iters=4, progress=False
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # steady rounds: no warning
        ctl.calibrate()
    assert not ctl.noisy and all(hi == pytest.approx(lo) for lo, hi in ctl.spread.values())
    loads = iter([1.0, 1.0, 3.0, 3.0, 1.0, 1.0, 3.0, 3.0])  # every other round 3x slower, for both r alike

    def forward_pre(module, args):
        clock.load = next(loads, 1.0)

    handle = model.register_forward_pre_hook(forward_pre)
    with pytest.warns(RuntimeWarning, match="noisy — rerun"):
        ctl.calibrate()
    handle.remove()
    assert ctl.noisy and all(hi == pytest.approx(3 * lo) for lo, hi in ctl.spread.values())
    ctl.remove()


def test_latency_controller_step_hysteresis():
    model = tiny_model()
    curve = {0: 10.0, 2: 8.0, 4: 6.0, 6: 4.0, 8: 3.0}
    ctl = tocom_hub.LatencyController(model, None, 0, 11.5, r_values=list(curve), progress=False)
    ctl.calibrate(latencies=curve)
    assert ctl.r == 0 and tocom_hub.get_r(model) == 0

    def serve(loads):
        out = []
        for load in loads:
            out.append(ctl.r)
            ctl.step(curve[ctl.r] * load)
        return out

    assert serve([1.1] * 10) == [0] * 10  # 11 ms: inside the band (0.9·budget, budget]: no move
    seen = serve([1.2] * 10)  # 12 ms > budget: up to r=2 (8 · 1.2 = 9.6 ≤ 10.35), then steady
    assert seen[:2] == [0, 0] and set(seen[4:]) == {2}
    seen = serve([2.0] * 10 + [1.0] * 12)
    assert max(seen) == 6 and seen[-5:] == [0] * 5
    assert sum(a != b for a, b in zip(seen, seen[1:])) <= 3
    assert tocom_hub.get_r(model) == ctl.r


def test_latency_controller_switch_pins_r_and_validates():
    model = tiny_model()
    curve = {0: 10.0, 2: 8.0, 4: 6.0}
    ctl = tocom_hub.LatencyController(model, None, 0, 11.5, r_values=list(curve), progress=False)
    ctl.calibrate(latencies=curve)
    ctl.switch(4)
    assert ctl.r == 4 and tocom_hub.get_r(model) == 4
    for bad in (3, -1, 2.0, "2"):
        with pytest.raises(ValueError, match="r values"):
            ctl.switch(bad)
    assert ctl.r == 4 and tocom_hub.get_r(model) == 4


def test_latency_controller_validates_before_touching_the_model():
    model = tiny_model()
    bank = ToComBank.for_model(model, r_max=4)
    for kwargs, match in [
        (dict(bank=bank, source_r=0, budget_ms=0), "budget_ms"),
        (dict(bank=bank, source_r=5, budget_ms=10), "source_r"),
        (dict(bank=bank, source_r=0, budget_ms=10, r_values=[0, 8]), "bank's range"),
        (dict(bank=None, source_r=0, budget_ms=10, r_values=[0, 40]), r"r_values\[1\] must be an int in \[0, "),
    ]:
        with pytest.raises(ValueError, match=match):
            tocom_hub.LatencyController(model, **kwargs)
        assert not tocom_hub.is_patched(model)
    with pytest.raises(RuntimeError, match="calibrate"):
        tocom_hub.LatencyController(model, None, 0, 10.0).step(5.0)


def test_latency_controller_real_timing_smoke():
    """Real clock, generous assertions: a big injected slowdown moves r up, its end brings r down."""
    import time

    model = tiny_model()
    ctl = tocom_hub.LatencyController(
        model, None, 0, 1e9, batch_size=2, r_values=[0, 16, 32], warmup=1, iters=3, progress=False
    )
    curve = ctl.calibrate()
    assert set(curve) == {0, 16, 32} and all(v > 0 for v in curve.values()) and ctl.r == 0
    ctl.budget_ms = 3.0 * max(curve.values())
    slow = {"on": True}
    model.register_forward_hook(lambda m, a, o: time.sleep(0.05) if slow["on"] else None)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(6):
        ctl(x)
    assert ctl.r == 32 and ctl.over_budget  # 50 ms extra: over budget even at the largest r
    slow["on"] = False
    for _ in range(20):
        ctl(x)
        if ctl.r == 0:
            break
    assert ctl.r < 32


@pytest.mark.slow
def test_latency_budget_example_runs():
    """examples/latency_budget.py: r goes up under the injected load and comes back down (real timing)."""
    import re
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "latency_budget.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--requests", "40", "--busy", "10-24", "--load", "2.5"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TQDM_DISABLE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"r before the load: (\d+), highest r under load: (\d+), r at the end: (\d+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    before, busy, end = (int(v) for v in m.groups())
    assert busy > before and end < busy
