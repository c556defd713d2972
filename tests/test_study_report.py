"""benchmarks/study: the per-task summary, the average / gap-closed arithmetic and the reports, on
hand-made evaluate.py outputs whose answers are known."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study"
sys.path.insert(0, str(STUDY))

import report  # noqa: E402
import run as study  # noqa: E402


def _eval(no, tc):
    return {"no_tocom": {str(t): v for t, v in enumerate(no)}, "tocom": {"0.1": {str(t): v for t, v in enumerate(tc)}}}


def test_summarise_means_over_seeds_and_reads_the_right_cells():
    R = 2
    runs = {"0": [_eval([80, 78, 70], [80, 79, 74]), _eval([82, 80, 72], [82, 81, 76])],
            "2": [_eval([75, 76, 77], [78, 77, 77]), _eval([77, 78, 79], [80, 79, 79])]}
    s = study.summarise(runs, R, {"0": "0.1", "2": "0.1"})
    assert s["src0_tgt0"] == 81
    assert s["src0_tgtR"] == {"no_tocom": 71, "tocom": 75}
    assert s["srcR_tgtR"] == 78
    assert s["srcR_tgt0"] == {"no_tocom": 76, "tocom": 79}
    assert s["grid"]["src0"]["tocom"] == [81, 80, 75]
    assert s["grid"]["matched"] == {"0": 81, "2": 78}

    avg = study.average({"a": s, "b": s})
    assert avg["gap_closed"] == pytest.approx((75 - 71) / (78 - 71), abs=1e-3)


def test_average_has_no_gap_closed_without_a_gap():
    s = {"src0_tgt0": 80, "src0_tgtR": {"no_tocom": 79, "tocom": 79.5}, "srcR_tgtR": 78,
         "srcR_tgt0": {"no_tocom": 77, "tocom": 78}}
    assert study.average({"a": s})["gap_closed"] is None


def test_reports_render(tmp_path):
    R = 2
    runs = {"0": [_eval([80, 78, 70], [80, 79, 74])], "2": [_eval([75, 76, 77], [78, 77, 77])]}
    per_task = {"count": {**study.summarise(runs, R, {"0": "0.1", "2": "0.1"}), "scale": {"0": 0.1, "2": 0.1}}}
    result = {"R": R, "seeds": [0], "scale_grid": [0.1], "demo_task": "count", "corpus": "c", "model": "m",
              "kinds": {"count": "structured"}, "pretrained": {"top1": {"0": 70.0, "2": 66.0}, "drop_at_R": 4.0},
              "bank": {"kd": "features", "heldout_kl_no_bank": 0.2, "heldout_kl_with_bank": 0.1,
                       "heldout_pairs": [[0, 2]], "heldout_metric": "L1"},
              "tasks": per_task, "average": study.average(per_task), "total_runtime_s": 60.0,
              "machine": {"cpus": 2}, "command": "python benchmarks/study/run.py"}
    report.write_reports(result, tmp_path)
    md = (tmp_path / "study.md").read_text()
    assert "| count | structured | 80.00 | 70.00 | 74.00 (+4.00, s=0.1) | 77.00 | 57 % | 75.00 | 78.00 (+3.00, s=0.1) |" in md
    assert "(-50.0 %)" in md
    assert json.loads((tmp_path / "study.json").read_text())["R"] == R
    assert (tmp_path / "study.png").stat().st_size > 1000


def test_a_finished_stage_is_reused_only_with_the_same_arguments(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "eval.json").write_text("{}")
    (stage / "command.json").write_text(json.dumps(["evaluate.py", "--split", "test"]))
    # same arguments: reused, nothing runs (no log is written)
    study.run("evaluate.py", ["--split", "test"], tmp_path / "log", stage, done="eval.json")
    assert not (tmp_path / "log").exists()
    with pytest.raises(SystemExit, match="another recipe"):
        study.run("evaluate.py", ["--split", "val"], tmp_path / "log", stage, done="eval.json")
    (stage / "command.json").unlink()  # a stage of unknown origin is not trusted either
    with pytest.raises(SystemExit, match="another recipe"):
        study.run("evaluate.py", ["--split", "test"], tmp_path / "log", stage, done="eval.json")
