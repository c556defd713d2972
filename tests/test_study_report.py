"""benchmarks/study: the per-task summary, the average / gap-closed arithmetic and the reports, on
hand-made evaluate.py outputs whose answers are known."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study"
sys.path.insert(0, str(STUDY))

import intervals  # noqa: E402
import report  # noqa: E402
import run as study  # noqa: E402


def _eval(no, tc):
    return {"no_tocom": {str(t): v for t, v in enumerate(no)}, "tocom": {"0.1": {str(t): v for t, v in enumerate(tc)}}}


def test_summarise_means_over_seeds_and_reads_the_right_cells():
    R = 2
    runs = {
        "0": [_eval([80, 78, 70], [80, 79, 74]), _eval([82, 80, 72], [82, 81, 76])],
        "2": [_eval([75, 76, 77], [78, 77, 77]), _eval([77, 78, 79], [80, 79, 79])],
    }
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
    s = {
        "src0_tgt0": 80,
        "src0_tgtR": {"no_tocom": 79, "tocom": 79.5},
        "srcR_tgtR": 78,
        "srcR_tgt0": {"no_tocom": 77, "tocom": 78},
    }
    assert study.average({"a": s})["gap_closed"] is None


def test_reports_render(tmp_path):
    R = 2
    runs = {"0": [_eval([80, 78, 70], [80, 79, 74])], "2": [_eval([75, 76, 77], [78, 77, 77])]}
    per_task = {"count": {**study.summarise(runs, R, {"0": "0.1", "2": "0.1"}), "scale": {"0": 0.1, "2": 0.1}}}
    result = {
        "R": R,
        "seeds": [0],
        "scale_grid": [0.1],
        "demo_task": "count",
        "corpus": "c",
        "model": "m",
        "kinds": {"count": "structured"},
        "pretrained": {"top1": {"0": 70.0, "2": 66.0}, "drop_at_R": 4.0},
        "bank": {
            "kd": "features",
            "heldout_kl_no_bank": 0.2,
            "heldout_kl_with_bank": 0.1,
            "heldout_pairs": [[0, 2]],
            "heldout_metric": "L1",
        },
        "tasks": per_task,
        "average": study.average(per_task),
        "total_runtime_s": 60.0,
        "machine": {"cpus": 2},
        "command": "python benchmarks/study/run.py",
    }
    report.write_reports(result, tmp_path)
    md = (tmp_path / "study.md").read_text()
    assert (
        "| count | structured | 80.00 | 70.00 | 74.00 (+4.00, s=0.1; seeds +4.00) | 77.00 | 57 % | 75.00 "
        "| 78.00 (+3.00, s=0.1; seeds +3.00) |"
    ) in md
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


def test_table_shows_per_seed_changes_and_the_demo_row_with_its_interval():
    R = 2
    runs = {
        "0": [_eval([80, 78, 70], [80, 79, 74]), _eval([82, 80, 72], [82, 81, 73])],
        "2": [_eval([75, 76, 77], [78, 77, 77]), _eval([77, 78, 79], [76, 79, 79])],
    }
    per_task = {"count": {**study.summarise(runs, R, {"0": "0.1", "2": "0.1"}), "scale": {"0": 0.1, "2": 0.2}}}
    demo = {
        "task": "count",
        "src0_tgt0": 80.5,
        "src0_tgtR": {"no_tocom": 71.0, "tocom": 73.5, "ci95": [-0.4, 5.1]},
        "srcR_tgtR": 78.0,
        "srcR_tgt0": {"no_tocom": 76.0, "tocom": 77.0, "ci95": [0.2, 1.9]},
    }
    result = {
        "R": R,
        "tasks": per_task,
        "kinds": {"count": "structured"},
        "demo": demo,
        "average": study.average(per_task),
    }
    lines = report.table(result).splitlines()
    # seeds: 74-70 = +4 and 73-72 = +1 (mean +2.5); 78-75 = +3 and 76-77 = -1 (mean +1)
    assert lines[2] == (
        "| count | structured | 81.00 | 71.00 | 73.50 (+2.50, s=0.1; seeds +4.00, +1.00) | 78.00 "
        "| 36 % | 76.00 | 77.00 (+1.00, s=0.2; seeds +3.00, −1.00) |"
    )
    assert lines[3] == (
        "| count, shipped files | quickstart | 80.50 | 71.00 | 73.50 (+2.50 [−0.40, +5.10], s=0.1) "
        "| 78.00 | 36 % | 76.00 | 77.00 (+1.00 [+0.20, +1.90], s=0.2) |"
    )
    assert lines[4].startswith("| **average** |")
    note = report.intervals_note(result)
    assert "one of them contains 0" in note and "5.5 and 1.7 points" in note


def test_readme_tables_are_the_committed_json(tmp_path):
    """README.md's result tables are rendered from the committed JSON (benchmarks/render_readme.py); a
    hand-edited number is caught."""
    sys.path.insert(0, str(STUDY.parent))
    import render_readme

    assert [render_readme.stale(f) for f in render_readme.FILES] == [[]] * len(render_readme.FILES), (
        "run python benchmarks/render_readme.py"
    )
    readme = (STUDY.parents[1] / "README.md").read_text()
    demo = json.loads((STUDY.parents[1] / "tocom_hub" / "demo" / "assets" / "study" / "demo.json").read_text())
    got = demo["committed"]["src0_tgtR"]
    row = f"| r = 0 | r = {demo['R']} | {got['no_tocom']:.2f} | {got['tocom']:.2f} |"
    assert row in readme
    edited = tmp_path / "README.md"
    edited.write_text(readme.replace(row, row.replace(f"{got['tocom']:.2f}", f"{got['tocom'] + 0.1:.2f}")))
    assert render_readme.stale(edited) == ["quickstart-table"]
    assert render_readme.main(["--check", "--readme", str(edited)]) == 1
    assert render_readme.main(["--readme", str(edited)]) == 0 and render_readme.stale(edited) == []
    assert edited.read_text() == readme


def _hits_workdir(tmp_path, R=2, seeds=(0, 1), n=200):
    """A study workdir whose eval stages hold known per-image hits, and the results those hits give."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    results = {"R": R, "seeds": list(seeds), "bank": {"kd": "logits"}, "tasks": {"t": {"scale": {}, "per_seed": {}}}}
    truth = {}
    for src, tgt, s in ((0, R, 0.1), (R, 0, 0.05)):
        results["tasks"]["t"]["scale"][str(src)] = s
        runs = []
        for seed in seeds:
            base = rng.random(n) < 0.5
            other = base | (rng.random(n) < 0.2)  # ToCom only adds hits: the change is positive
            stage = tmp_path / "downstream" / "t" / f"src{src}-seed{seed}" / f"eval-logits-s{s:g}"
            stage.mkdir(parents=True)
            save_file(
                {
                    f"no_tocom.r{tgt}": torch.tensor(base, dtype=torch.uint8),
                    f"tocom.s{s:g}.r{tgt}": torch.tensor(other, dtype=torch.uint8),
                },
                str(stage / "correct.safetensors"),
            )
            runs.append(
                {"no_tocom": {str(tgt): 100.0 * int(base.sum()) / n}, "tocom": {str(tgt): 100.0 * int(other.sum()) / n}}
            )
            truth.setdefault((src, tgt), []).append(100.0 * (int(other.sum()) - int(base.sum())) / n)
        results["tasks"]["t"]["per_seed"][str(src)] = runs
        results["tasks"]["t"]["src0_tgtR" if src == 0 else "srcR_tgt0"] = {"no_tocom": 0.0, "tocom": 0.0}
    return results, truth


def test_intervals_bootstrap_the_kept_hits_and_refuse_other_models(tmp_path):

    results, truth = _hits_workdir(tmp_path)
    out = intervals.intervals(tmp_path, results)
    for cell, key in (("src0_tgtR", (0, 2)), ("srcR_tgt0", (2, 0))):
        c = out["tasks"]["t"][cell]
        assert c["delta"] == pytest.approx(sum(truth[key]) / 2, abs=1e-3)  # the mean change over the seeds
        assert c["ci95"][0] <= c["delta"] <= c["ci95"][1] and c["ci95"][0] > 0  # only added hits: all > 0
        assert (c["images"], c["seeds"]) == (200, 2)
    table = report.table(
        report.with_intervals(
            results | {"tasks": {"t": {**results["tasks"]["t"], "srcR_tgtR": 1.0, "src0_tgt0": 1.0}}}, out
        )
    )
    lo, hi = out["tasks"]["t"]["src0_tgtR"]["ci95"]
    assert f"[{report._signed(lo)}, {report._signed(hi)}]" in table
    results["tasks"]["t"]["per_seed"]["0"][1]["tocom"]["2"] += 0.5  # committed numbers of other models
    with pytest.raises(SystemExit, match="not those of the committed models"):
        intervals.intervals(tmp_path, results)


def test_committed_intervals_belong_to_the_rerun_they_name():
    """study_intervals.json names the results it was measured for; each cell's bootstrap change is that
    table's change (to rounding) and lies inside its interval."""
    results_dir = STUDY.parents[0] / "results"
    intervals = json.loads((results_dir / "study_intervals.json").read_text())
    result = json.loads((STUDY.parents[1] / intervals["results"]).read_text())
    assert intervals["results"] != "benchmarks/results/study.json"  # the first run kept no hits
    assert set(intervals["tasks"]) == set(result["tasks"])
    for task, cells in intervals["tasks"].items():
        for cell, c in cells.items():
            v = result["tasks"][task][cell]
            assert c["delta"] == pytest.approx(v["tocom"] - v["no_tocom"], abs=0.011), (task, cell)
            assert c["ci95"][0] <= c["delta"] <= c["ci95"][1] and c["seeds"] == len(result["seeds"])
    table = report.table(report.with_intervals(result, intervals))
    assert table.count(" [") == 2 * len(result["tasks"])  # every task-level change carries its interval
