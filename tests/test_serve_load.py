"""benchmarks/serve_load.py's bookkeeping (the load run itself is the committed result, not a test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schedule_is_seeded_poisson_within_each_phase(bench):
    times = bench.schedule([(100, 5), (100, 15)], seed=1)
    assert times == bench.schedule([(100, 5), (100, 15)], seed=1) and times == sorted(times)
    first = sum(t < 100 for t in times)
    assert 400 < first < 600 and 1300 < len(times) - first < 1700  # ~5 and ~15 requests per second


def test_windows_and_summary_by_hand(bench):
    rows = [
        {"t": 0.5, "status": 200, "server_ms": 10.0, "e2e_ms": 12.0, "r": 0},
        {"t": 1.5, "status": 200, "server_ms": 30.0, "e2e_ms": 33.0, "r": 4},
        {"t": 2.5, "status": 200, "server_ms": 90.0, "e2e_ms": 95.0, "r": 16},
        {"t": 2.6, "status": 500},
    ]
    ws = bench.windows(rows, seconds=4, width=2, budget_ms=50)
    assert [w["n"] for w in ws] == [2, 2] and [w["ok"] for w in ws] == [2, 1]
    assert ws[0]["p99_server_ms"] == pytest.approx(29.8) and ws[0]["mean_r"] == 2 and not ws[0]["over_budget"]
    assert ws[1]["over_budget"] and ws[1]["p99_e2e_ms"] == 95.0
    acc = {0: 50.0, 4: 40.0, 16: 30.0}
    s = bench.summarize(rows, acc, budget_ms=50)
    assert s["requests"] == 4 and s["failed"] == 1 and s["mean_accuracy"] == 40.0
    assert s["share_over_budget"] == pytest.approx(1 / 3, abs=1e-4) and s["mean_r"] == pytest.approx(6.67)


def test_accuracy_table_is_the_study_grid(bench):
    table = bench.accuracy_table()
    assert sorted(table) == ["no_tocom", "tocom"] and sorted(table["tocom"]) == list(range(17))
    assert table["tocom"][16] > table["no_tocom"][16]  # the bank helps at the mismatched r (study: 42.7 vs 40.85)
