"""``tocom-hub eval`` and :mod:`tocom_hub.tools.evaluation` / :mod:`~tocom_hub.tools.intervals`: top-1 against a
naive accuracy loop over plain timm (with the LoRA closed form merged by hand from the raw bank tensors), the
token-count closed form ``N - depth·r``, and the paired bootstrap against the textbook loop and closed forms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tool_helpers import DEPTH, KW, NAME, PATCHES, run

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.tools.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py: one torch thread for the module


def reference_top1(model, data_dir, r=None, bank=None, source_r=0, scale=0.1):
    """Naive loop: timm's own dataset + transform, plain timm (or the closed form merged by hand)."""
    from timm.data import create_dataset, create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = (3, 64, 64)
    ds = create_dataset("", root=str(data_dir), split="validation", transform=create_transform(**cfg))
    if bank is not None:  # W_q/v += s·Σ_{g=m}^{n-1} A_g B_g, from the raw tensors
        h, d = bank.rank, model.embed_dim
        with torch.no_grad():
            for b, blk in enumerate(model.blocks):
                for t, row in (("q", 0), ("v", 2)):
                    for g in range(source_r, r):
                        up = bank.lora_B[t][b][:, g * h : (g + 1) * h]
                        down = bank.lora_A[t][b][g * h : (g + 1) * h]
                        blk.attn.qkv.weight[row * d : (row + 1) * d] += scale * up @ down
    if r:
        tocom_hub.patch(model)
        tocom_hub.set_r(model, r)
    correct = 0
    with torch.no_grad():
        for i in range(len(ds)):
            x, y = ds[i]
            correct += int(model(x[None]).argmax(-1).item() == y)
    return 100.0 * correct / len(ds)


def test_eval_with_and_without_bank_writes_json_and_png(files, tmp_path, capsys):
    out_json, out_png = tmp_path / "eval.json", tmp_path / "plots" / "eval.png"
    code, out, err = run(
        [
            "eval",
            "--model",
            files / "model",
            "--data",
            files / "data",
            "--target-r",
            "0,4,8",
            "--bank",
            files / "bank",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--json",
            out_json,
            "--plot",
            out_png,
        ],
        capsys,
    )
    assert code == 0, err
    assert "top-1 +ToCom" in out and "img/s plain" in out
    result = json.loads(out_json.read_text())
    assert result["images"] == 9 and result["source_r"] == 0 and result["scale"] == pytest.approx(0.1)
    rows = {(row["target_r"], row["tocom"]): row for row in result["rows"]}
    assert set(rows) == {(r, b) for r in (0, 4, 8) for b in (False, True)}
    for (r, with_bank), row in rows.items():
        assert row["tokens"] == 1 + PATCHES - DEPTH * r  # class token + patches left
        assert row["images_per_s"] > 0
        want = reference_top1(
            load_model(str(files / "model"))[0],
            files / "data",
            r=r,
            bank=ToComBank.from_pretrained(files / "bank") if with_bank else None,
        )
        assert row["top1"] == pytest.approx(want), (r, with_bank)
    with Image.open(out_png) as img:
        assert img.format == "PNG" and img.size[0] >= 800
    # the difference of every +ToCom row comes with its paired-bootstrap interval; img/s with its spread
    assert "delta [95 % CI]" in out and "paired bootstrap" in out
    for r in (0, 4, 8):
        tc, plain = rows[(r, True)], rows[(r, False)]
        assert tc["delta"] == pytest.approx(tc["top1"] - plain["top1"])
        lo, hi = tc["delta_ci95"]
        assert lo <= tc["delta"] <= hi and "correct" not in tc
        assert tc["images_per_s_range"][0] <= tc["images_per_s"] <= tc["images_per_s_range"][1]
    assert result["model_label"] == f"model ({NAME}, tome, 64 px, depth 2, embed dim 64)"


def test_evaluate_runs_the_source_r_forward_once_for_both_rows(files):
    """At target r = source r the bank's update is zero: one forward serves the plain and the +ToCom row."""
    from tocom_hub.demo.data import build_eval_dataset
    from tocom_hub.tools.evaluation import evaluate

    model = load_model(str(files / "model")).model
    loader = torch.utils.data.DataLoader(build_eval_dataset(model, str(files / "data")), batch_size=3)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    rows = evaluate(model, loader, [0, 4], bank=str(files / "bank"), source_r=4, progress=False, keep_correct=True)
    handle.remove()
    assert len(calls) == len(loader) * 3  # (0, plain), (0, +ToCom), (4, one forward for both)
    by = {(r["target_r"], r["tocom"]): r for r in rows}
    assert torch.equal(by[(4, True)]["correct"], by[(4, False)]["correct"])
    want = reference_top1(load_model(str(files / "model")).model, files / "data", r=4)
    assert by[(4, True)]["top1"] == pytest.approx(want) and by[(4, True)]["tokens"] == by[(4, False)]["tokens"]


def test_eval_timm_name_with_model_kwargs(files, tmp_path, capsys):
    out_json = tmp_path / "e.json"
    code, out, err = run(
        [
            "eval",
            "--model",
            NAME,
            "--model-kwargs",
            KW,
            "--data",
            files / "data",
            "--target-r",
            "0-2",
            "--limit",
            "5",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--method",
            "evit",
            "--json",
            out_json,
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["images"] == 5 and result["method"] == "evit" and result["bank"] is None
    assert [(r["target_r"], r["tocom"]) for r in result["rows"]] == [(0, False), (1, False), (2, False)]
    assert "+ToCom" not in out


def test_paired_bootstrap_matches_a_naive_bootstrap_and_closed_forms():
    from tocom_hub.tools.evaluation import paired_bootstrap

    rng = np.random.default_rng(3)
    a = rng.random(400) < 0.6
    b = a.copy()
    flip = rng.random(400) < 0.15
    b[flip] = ~b[flip]
    got = paired_bootstrap(a, b, n_boot=20000)
    d = b.astype(int) - a.astype(int)
    naive = [100 * d[rng.integers(0, 400, 400)].mean() for _ in range(4000)]  # the textbook loop
    lo, hi = np.quantile(naive, [0.025, 0.975])
    assert got["delta"] == pytest.approx(100 * d.mean())
    assert abs(got["low"] - lo) < 0.6 and abs(got["high"] - hi) < 0.6
    # closed forms: no change at all; every image flips to right
    same = paired_bootstrap(a, a)
    assert (same["delta"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    all_right = paired_bootstrap(np.zeros(50), np.ones(50))
    assert (all_right["delta"], all_right["low"], all_right["high"]) == (100.0, 100.0, 100.0)
    # two seeds, one gains on every image, one on none: resampling seeds gives 0, 50 or 100 points
    two = paired_bootstrap(np.zeros((2, 50)), np.stack([np.ones(50), np.zeros(50)]))
    assert two["delta"] == 50.0 and two["low"] == 0.0 and two["high"] == 100.0 and two["seeds"] == 2
    with pytest.raises(ValueError, match="same non-empty shape"):
        paired_bootstrap(np.zeros(3), np.zeros(4))


def test_plain_false_and_gather_and_the_models_own_patch_settings(files):
    """What training/evaluate.py relies on: plain=False gives exactly the +ToCom rows of a full run;
    ``gather`` sees every batch's hits (a gather that repeats them, like two processes with the same
    images, doubles the count and keeps top-1); a patched model is evaluated with its own prop_attn and left
    with it."""
    from tocom_hub.core.patch import get_settings
    from tocom_hub.demo.data import build_eval_dataset
    from tocom_hub.tools.evaluation import evaluate

    model = load_model(str(files / "model")).model
    loader = torch.utils.data.DataLoader(build_eval_dataset(model, str(files / "data")), batch_size=4)
    bank = ToComBank.from_pretrained(files / "bank")
    full = evaluate(model, loader, [0, 4, 8], bank=bank, source_r=4, progress=False, keep_correct=True)
    only = evaluate(model, loader, [0, 4, 8], bank=bank, source_r=4, progress=False, keep_correct=True, plain=False)
    assert [(r["target_r"], r["tocom"]) for r in only] == [(0, True), (4, True), (8, True)]
    for row in only:
        ref = next(f for f in full if f["target_r"] == row["target_r"] and f["tocom"])
        assert row["top1"] == ref["top1"] and torch.equal(row["correct"], ref["correct"])
    with pytest.raises(ValueError, match="pass a bank"):
        evaluate(model, loader, [0], plain=False, progress=False)

    seen = []

    def twice(hits):
        seen.append(hits.shape[0])
        return torch.cat([hits, hits])

    (row,) = evaluate(model, loader, [4], progress=False, gather=twice)
    plain = next(f for f in full if f["target_r"] == 4 and not f["tocom"])
    assert seen == [4, 4, 1] and row["images"] == 2 * plain["images"] and row["top1"] == plain["top1"]

    for prop_attn in (False, True):
        tocom_hub.patch(model, prop_attn=prop_attn)
        tocom_hub.set_r(model, 2)
        logits = []
        handle = model.register_forward_hook(lambda m, a, out, _seen=logits: _seen.append(out))
        evaluate(model, loader, [8], progress=False)
        handle.remove()
        assert get_settings(model)["prop_attn"] is prop_attn and tocom_hub.get_r(model) == 2
        tocom_hub.set_r(model, 8)
        with torch.no_grad():
            want = [model(x) for x, _ in loader]
        tocom_hub.unpatch(model)
        assert len(logits) == len(want) and all(torch.equal(a, b) for a, b in zip(logits, want))
    # the two settings really give different logits here (otherwise the check above proves nothing)
    tocom_hub.patch(model, prop_attn=False)
    tocom_hub.set_r(model, 8)
    x = next(iter(loader))[0]
    with torch.no_grad():
        off = model(x)
        tocom_hub.patch(model, prop_attn=True)
        on = model(x)
    assert not torch.allclose(off, on)


def test_plot_accuracy_draws_one_line_per_scale_and_the_matched_points(tmp_path, monkeypatch):
    """The one accuracy plotter (tocom-hub eval and training/evaluate.py): one +ToCom line for plain rows,
    one per scale for rows carrying ``scale``, the matched source = target points, each point where the
    rows put it."""
    import matplotlib.pyplot as plt

    from tocom_hub.tools.plots import plot_accuracy

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its legend and points
    rows = [{"target_r": r, "tocom": False, "top1": 80.0 - r, "images": 50} for r in (0, 2, 4)]
    one = rows + [{"target_r": r, "tocom": True, "top1": 81.0 - r / 2, "images": 50} for r in (0, 2, 4)]
    scaled = [(k, s, r) for k, s in ((2, 0.1), (3, 1.0)) for r in (0, 2, 4)]
    many = rows + [{"target_r": r, "tocom": True, "top1": 80.0 - r / k, "scale": s} for k, s, r in scaled]
    plot_accuracy({"rows": one, "source_r": 0, "method": "tome", "scale": 0.1}, tmp_path / "one.png")
    result = {"rows": many, "source_r": 2, "method": "evit", "images": 50, "matched": {"4": 79.0}}
    plot_accuracy(result, tmp_path / "many.png")
    labels = [[t.get_text() for t in fig.axes[0].get_legend().get_texts()] for fig in figures]
    assert sorted(labels[0]) == sorted(["ToMe (no ToCom)", "ToMe + ToCom (s = 0.1)", "source r = 0"])
    assert sorted(labels[1]) == sorted(
        [
            "EViT (no ToCom)",
            "EViT + ToCom (s = 0.1)",
            "EViT + ToCom (s = 1)",
            "source r = target r",
            "source r = 2",
        ]
    )
    lines = [line for line in figures[1].axes[0].get_lines() if line.get_marker() in ("o", "s")]  # not the caps
    ys = sorted(tuple(float(v) for v in line.get_ydata()) for line in lines)
    assert ys == sorted([(80.0, 78.0, 76.0), (80.0, 79.0, 78.0), (80.0, 80 - 2 / 3, 80 - 4 / 3)])
    for name in ("one.png", "many.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.size[0] > 500
