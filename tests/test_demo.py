"""The embedded study demo (tocom_hub/assets/study): it loads through the public paths, the bank fits the
backbone, and re-evaluating the shipped files reproduces the numbers the study committed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tocom_hub
from tocom_hub.demo import DEMO_DIR, demo_bank_path, demo_info, load_demo_model

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


def test_quickstart_json_reproduces_the_committed_demo_numbers(tmp_path):
    """Acceptance (issue 6): the shipped model + bank at (source 0, target R) and (source R, target 0),
    with and without ToCom, re-measured by the README's first command, within 0.5 pt of demo.json."""
    info = demo_info()
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--json", str(out)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    want = info["committed"]
    for key in ("src0_tgtR", "srcR_tgt0"):
        for kind in ("no_tocom", "tocom"):
            assert abs(got[key][kind] - want[key][kind]) <= 0.5, (key, kind, got[key], want[key])
    assert "source 0 → target" in proc.stdout
