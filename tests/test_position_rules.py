"""benchmarks/study/position_rules.py on a minimal configuration (two seeds, a few steps, a 1-block model): the
files it writes, the curves that must agree, and the bootstrap that decides the default position rule."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("position_rules", ROOT / "benchmarks" / "study" / "position_rules.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_minimal_run_writes_consistent_results(tmp_path):
    mod = _script()
    argv = ["--steps", "2", "--seeds", "0,1", "--depth", "1", "--dim", "16", "--heads", "2", "--train-images", "64",
            "--test-images", "40", "--rs", "0,8,15", "--boot", "200", "--threads", "1"]  # fmt: skip
    argv += ["--results-dir", str(tmp_path), "--workdir", str(tmp_path / "work")]
    out = mod.main(argv)
    again = mod.main(argv)  # resumed from --workdir: the same numbers without training
    assert {k: v for k, v in again.items() if k != "runtime_s"} == {k: v for k, v in out.items() if k != "runtime_s"}
    assert len(list((tmp_path / "work").glob("*.json"))) == 4  # 2 models x 2 seeds
    assert json.loads((tmp_path / "position_rules.json").read_text()) == again
    assert (tmp_path / "position_rules.png").stat().st_size > 1000
    md = (tmp_path / "position_rules.md").read_text()
    assert "tome-centroid" in md and out["better_rule"] in md
    rope, vit = out["curves"]["rope"], out["curves"]["vit"]
    assert set(rope) == {"tome-keep", "tome-centroid", "evit"} and set(vit) == {"tome", "evit"}
    for curves in (rope, vit):  # at r = 0 nothing is reduced: every curve of a model is the same model
        assert len({json.dumps(c["0"]) for c in curves.values()}) == 1
    for curves in (rope, vit):
        for c in curves.values():
            for row in c.values():
                assert len(row["per_seed"]) == 2 and row["ci95"][0] <= row["top1"] <= row["ci95"][1]
                assert row["top1"] == pytest.approx(np.mean(row["per_seed"]), abs=1e-3)
    assert out["centroid_minus_keep"]["0"] == {"delta": 0.0, "ci95": [0.0, 0.0]}
    avg = out["centroid_minus_keep_averaged"]
    assert avg["rs"] == [8, 15] and avg["seeds"] == 2 and avg["images"] == 40
    assert avg["low"] <= avg["delta"] <= avg["high"]


def test_the_averaged_difference_decides_only_when_its_interval_excludes_zero():
    mod = _script()
    rng = np.random.default_rng(0)
    keep = {r: (rng.random((2, 500)) < 0.5).astype(np.int8) for r in (4, 8)}
    better = {r: np.maximum(h, (rng.random(h.shape) < 0.2).astype(np.int8)) for r, h in keep.items()}
    noise = {r: (rng.random((2, 500)) < 0.5).astype(np.int8) for r in (4, 8)}
    up = mod.averaged_difference(keep, better, [4, 8], 2000)
    assert up["delta"] > 5 and up["low"] > 0 and mod.verdict(up) == "centroid"
    down = mod.averaged_difference(better, keep, [4, 8], 2000)
    assert down["high"] < 0 and mod.verdict(down) == "keep"
    same = mod.averaged_difference(keep, noise, [4, 8], 2000)
    assert same["low"] < 0 < same["high"] and mod.verdict(same) == "undecided"
    nil = mod.averaged_difference(keep, keep, [4, 8], 100)
    assert (nil["delta"], nil["low"], nil["high"]) == (0.0, 0.0, 0.0) and mod.verdict(nil) == "undecided"


def test_bad_r_list_is_refused(capsys):
    with pytest.raises(SystemExit):
        _script().parse_args(["--rs", "4,8"])
    assert "--rs must hold 0" in capsys.readouterr().err


def test_the_library_default_is_the_committed_verdict():
    """``patch``'s default rule is the measured better one; "undecided" keeps the cheaper, exact-for-pruning
    ``keep`` (docs/positions.md says so)."""
    import inspect

    import tocom_hub

    out = json.loads((ROOT / "benchmarks" / "results" / "position_rules.json").read_text())
    assert out["better_rule"] == _script().verdict(out["centroid_minus_keep_averaged"])
    expected = "keep" if out["better_rule"] == "undecided" else out["better_rule"]
    for fn in (tocom_hub.patch, tocom_hub.check_supported):
        assert inspect.signature(fn).parameters["positions"].default == expected
    assert out["config"]["seeds"] and len(out["config"]["seeds"]) >= 2
