"""``tocom-hub bench`` and :mod:`tocom_hub.tools.benchmark`: the table, the JSON, token counts against
``N - depth·r`` and the "noisy, rerun" verdict."""

from __future__ import annotations

import json

import pytest
from tool_helpers import KW, NAME, run

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py: one torch thread for the module


def test_bench_prints_table_and_json(files, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    code, out, err = run(
        [
            "bench",
            "--model",
            NAME,
            "--model-kwargs",
            KW,
            "--r",
            "0,8,16",
            "--batch",
            "2",
            "--iters",
            "3",
            "--warmup",
            "1",
            "--json",
            out_json,
        ],
        capsys,
    )
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if "median ms" in line)
    assert all(col in header for col in ("p90 ms", "images/s", "speed-up", "tokens"))
    table = [line.split() for line in lines if line.startswith(("timm", "tome"))]
    assert [row[:3] for row in table] == [
        ["timm", "-", "65"],
        ["tome", "0", "65"],
        ["tome", "8", "49"],
        ["tome", "16", "33"],
    ]
    result = json.loads(out_json.read_text())
    assert [len(r["samples"]) for r in result["rows"]] == [3] * 4
    assert result["rows"][0]["speedup"] == 1.0
    timm_ms = result["rows"][0]["samples"]
    for row in result["rows"]:
        assert row["p90_ms"] >= row["median_ms"] >= row["p10_ms"] > 0
        assert row["images_per_s"] == pytest.approx(2000.0 / row["median_ms"])
        # the speed-up pairs the timm and patched forwards of the same iteration (naive recomputation)
        ratios = sorted(t / c for t, c in zip(timm_ms, row["samples"]))
        assert row["speedup"] == pytest.approx(ratios[1])
        assert row["speedup_range"][0] <= row["speedup"] <= row["speedup_range"][1]
    assert result["noisy"] == any(row["noisy"] for row in result["rows"])
    assert ("noisy — rerun" in out) == result["noisy"]


def test_bench_table_says_noisy_rerun_when_iterations_disagree():
    from tocom_hub.tools.benchmark import format_table

    def result(spread):
        row = {
            "config": "tome",
            "r": 8,
            "tokens": 49,
            "median_ms": 10.0,
            "p90_ms": 12.0,
            "images_per_s": 200.0,
            "speedup": 1.4,
            "speedup_range": [1.4 - spread, 1.4 + spread],
            "noisy": 2 * spread > 0.25 * 1.4,
        }
        base = {
            "config": "timm",
            "r": None,
            "tokens": 65,
            "median_ms": 14.0,
            "p90_ms": 15.0,
            "images_per_s": 140.0,
            "speedup": 1.0,
        }
        return {
            "batch_size": 2,
            "input_size": [64, 64],
            "device": "cpu",
            "dtype": "float32",
            "threads": 1,
            "iters": 9,
            "rows": [base, row],
            "noisy": row["noisy"],
        }

    assert "noisy — rerun" not in format_table(result(0.05))
    noisy = format_table(result(0.4))
    assert "noisy — rerun" in noisy and "1.40x (1.00-1.80) noisy" in noisy
