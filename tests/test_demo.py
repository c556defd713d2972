"""The embedded study demo (tocom_hub/demo/assets/study): it loads through the public paths, the bank fits the
backbone, and re-evaluating the shipped files reproduces the numbers the study committed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tocom_hub
from tocom_hub.demo import DEMO_DIR, demo_bank_path, demo_info, evaluate_demo, load_demo_model

ROOT = Path(__file__).resolve().parents[1]


def test_demo_files_and_info():
    info = demo_info()
    R = info["R"]
    assert sorted(info["models"], key=int) == ["0", str(R)]
    bank = tocom_hub.ToComBank.from_pretrained(demo_bank_path())
    assert bank.r_max == R and bank.method == "tome"
    files = [e["file"] for entries in info["models"].values() for e in entries]
    assert all(sorted(e["seed"] for e in entries) == sorted(info["seeds"]) for entries in info["models"].values())
    for name in [info["backbone"], *files]:
        assert (DEMO_DIR / name).stat().st_size < 2_000_000
    study = json.loads((ROOT / "benchmarks" / "results" / "study.json").read_text())
    assert study["demo_task"] == info["task"] and study["R"] == R and study["seeds"] == info["seeds"]


def test_committed_demo_numbers_are_the_study_numbers_of_the_demo_task():
    """The shipped fp16 files (every seed) give the study's seed-mean numbers for the demo task."""
    info = demo_info()
    task = json.loads((ROOT / "benchmarks" / "results" / "study.json").read_text())["tasks"][info["task"]]
    for key in ("src0_tgtR", "srcR_tgt0"):
        for kind in ("no_tocom", "tocom"):
            assert abs(info["committed"][key][kind] - task[key][kind]) <= 0.5, (key, kind)


def test_load_demo_model_rejects_unknown_source_and_seed():
    with pytest.raises(ValueError, match="source r"):
        load_demo_model(source_r=3)
    with pytest.raises(ValueError, match="seeds"):
        load_demo_model(source_r=0, seed=99)


def test_demo_model_runs_with_and_without_bank_and_unmerges_exactly():
    info = demo_info()
    model, _ = load_demo_model(0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        tocom_hub.apply(model, source_r=0, target_r=info["R"], bank=demo_bank_path(), scale=info["scale"]["0"])
        out = model(x)
        assert out.shape == ref.shape and not torch.allclose(out, ref)
        tocom_hub.remove(model)
        tocom_hub.unpatch(model)
        after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_demo_model_returns_a_named_tuple_that_still_unpacks():
    loaded = load_demo_model(0)
    model, info = loaded
    assert loaded.model is model and loaded.info is info and info["source_r"] == 0
    assert isinstance(model, torch.nn.Module) and not model.training
    from tocom_hub.demo.models import DEMO_WEIGHTS
    from tocom_hub.tools.models import load_model

    if DEMO_WEIGHTS.is_file():  # the embedded default backbone, the same way
        demo = load_model("demo")
        model, info = demo
        assert demo.model is model and demo.info["name"] == "demo" and model(torch.randn(1, 3, 32, 32)).shape[0] == 1


@pytest.mark.slow
def test_evaluate_demo_reproduces_the_committed_demo_numbers():
    """What the quickstart prints (through the same library call, full test split, every seed) is what
    demo.json commits, to 0.1 point (two images of the 2 × 1,000 evaluated), intervals included."""
    info = demo_info()
    got = evaluate_demo(progress=False, n_boot=2000)
    want = info["committed"]
    assert got["images"] == 1000 and got["seeds"] == info["seeds"]
    for key in ("src0_tgt0", "srcR_tgtR"):
        assert abs(got[key] - want[key]) <= 0.1, (key, got[key], want[key])
    for key in ("src0_tgtR", "srcR_tgt0"):
        for kind in ("no_tocom", "tocom", "delta"):
            assert abs(got[key][kind] - want[key][kind]) <= 0.1, (key, kind, got[key], want[key])
        lo, hi = got[key]["ci95"]
        assert lo <= got[key]["delta"] <= hi
        assert abs(lo - want[key]["ci95"][0]) <= 0.5 and abs(hi - want[key]["ci95"][1]) <= 0.5


def test_quickstart_runs_at_a_small_setting_and_explains_its_numbers(tmp_path):
    """README command 1 end to end on 40 test images: the table, the legend and the JSON with intervals.
    (The full-size numbers are checked through the library above; nothing here depends on wall time.)"""
    out = tmp_path / "q.json"
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "quickstart.py"),
        "--limit",
        "40",
        "--batch-size",
        "20",
        "--targets",
        "0,8",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    R = demo_info()["R"]
    for text in ("guessing", "What it means", "95 % CI", f"fine-tuned at r = {R}", "(same model)"):
        assert text in proc.stdout, text
    assert "evaluating" in proc.stderr  # the progress bar
    got = json.loads(out.read_text())
    assert got["images"] == 40 and got["targets"] == [0, 8, R]
    assert got["chance"] == pytest.approx(100 / got["num_classes"], abs=0.01)
    assert [row["target_r"] for row in got["table"]] == [0, 8, R]
    for row in got["table"]:
        for src in ("src0", f"src{R}"):
            d = row[src]["delta"]
            assert d["low"] <= d["delta"] <= d["high"] and d["images"] == 40
            assert d["delta"] == pytest.approx(row[src]["tocom"] - row[src]["no_tocom"], abs=0.011)
    assert got["src0_tgtR"]["no_tocom"] == got["table"][-1]["src0"]["no_tocom"]


def test_quickstart_rejects_targets_outside_the_bank():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--targets", "0,99"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=3600,
    )
    assert proc.returncode != 0 and "--targets" in proc.stderr
