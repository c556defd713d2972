"""The tools around the patcher: ``tocom-hub eval | bench | visualize | convert`` and LatencyController.

Everything runs offline on tiny timm models built with ``pretrained=False`` (64 px, patch 8 → 64
patches, depth 2, width 64). Expected values come from independent sources: a naive accuracy loop
over plain timm, the LoRA closed form written out with the raw bank tensors, the token-count
closed form ``N - depth·r``, pixel counting in the PNG, and a fake clock whose cost model is known.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tocom_hub
from tocom_hub import ToComBank, cli
from tocom_hub.compensate import get_state
from tocom_hub.demo.models import DEMO_WEIGHTS, load_model
from tocom_hub.tools.visualize import PRUNED_COLOR

TINY = dict(img_size=64, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=3)
KW = json.dumps(TINY)
NAME = "vit_tiny_patch16_224"
PATCHES, DEPTH = 64, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP hand-offs that dominate on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = timm.create_model(NAME, pretrained=False, **dict(TINY, **overrides)).eval()
    with torch.no_grad():  # timm zero-inits the head: give it weights so predictions differ per image
        model.head.weight.normal_(0, 0.5)
        model.head.bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny model (timm's config.json + model.safetensors), a bank, an ImageFolder, an image."""
    root = tmp_path_factory.mktemp("tools")
    model = tiny_model()
    timm.models.save_for_hf(model, root / "model", safe_serialization=True)
    bank = ToComBank.for_model(model, r_max=8, rank=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in bank.targets:
            bank.A[t].copy_(torch.randn(bank.A[t].shape, generator=g) * 0.5)
    bank.save_pretrained(root / "bank")
    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cat"):
        (root / "data" / "val" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(
                root / "data" / "val" / c / f"{i}.png"
            )
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(root / "img.png")
    return root


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("command", ["eval", "bench", "visualize", "convert"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"tocom-hub {command} " in out.split("examples:")[1]


# ---------------------------------------------------------------------------------------------------
# eval


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
                        up = bank.A[t][b][:, g * h : (g + 1) * h]
                        down = bank.B[t][b][g * h : (g + 1) * h]
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
    from tocom_hub.tools.evaluation import build_eval_dataset, evaluate

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


# ---------------------------------------------------------------------------------------------------
# bench


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


# ---------------------------------------------------------------------------------------------------
# honest intervals


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


def test_help_imports_neither_torch_nor_timm():
    """`tocom-hub --help` must answer at once: nothing heavy is imported to build the parser."""
    import subprocess
    import sys

    code = (
        "import sys; from tocom_hub.cli import build_parser; build_parser().format_help(); "
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, sorted(sys.modules); "
        "import tocom_hub, tocom_hub.patch; assert callable(tocom_hub.patch) and tocom_hub.patch.__module__ "
        "== 'tocom_hub.core.patch'; assert tocom_hub.ToComBank.__name__ == 'ToComBank'"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_info_prints_recipe_and_results_on_several_lines(files, tmp_path, capsys):
    bank = ToComBank.from_pretrained(files / "bank")
    bank.config.training_recipe = {"lr": 0.001, "steps": 10, "model_kwargs": {"img_size": 64, "depth": 2}}
    bank.config.eval_results = {"heldout_kl_no_bank": 0.0537794553, "pairs": [[1, 2], [3, 4]]}
    bank.save_pretrained(tmp_path / "b")
    code, out, err = run(["info", tmp_path / "b"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "training recipe:" in lines and "eval results:" in lines
    assert any(line.split() == ["lr:", "0.001"] for line in lines)
    assert any(line.split() == ["heldout_kl_no_bank:", "0.05378"] for line in lines)
    assert max(len(line) for line in lines) < 120


def test_unreachable_hub_is_one_line_without_retries(hub_server, tmp_path, capfd, caplog):
    """Hub down and the bank not cached: one clear line at once, none of huggingface_hub's retry lines
    (it retries such a connection 5 times with back-off) and no traceback; --debug raises the error."""
    import logging

    from tocom_hub.hub import BankNotFoundError

    caplog.set_level(logging.INFO, logger="huggingface_hub")
    hub_server.stop()
    argv = ["info", "org/never-cached", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tocom-hub info: error: "), err
    assert "could not be reached" in err and "HF_HUB_OFFLINE=1" in err
    assert "Retrying" not in err and "Traceback" not in err
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    with pytest.raises(BankNotFoundError, match="could not be reached") as info:
        cli.main([*argv, "--debug"])
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "Retrying" not in capfd.readouterr().err


def test_training_threads_under_accelerate_launch(monkeypatch):
    """accelerate launch exports OMP_NUM_THREADS=1 on a CPU machine: the training scripts take the cores back
    (split between the local processes), TOCOM_HUB_CPU_THREADS overrides, anything else is left alone."""
    from tocom_hub.tools._threads import available_cpus, setup_cpu_threads

    old = torch.get_num_threads()
    said = []
    try:
        names = [v for v in os.environ if v.startswith("ACCELERATE_")] + ["LOCAL_WORLD_SIZE", "TOCOM_HUB_CPU_THREADS"]
        for var in names:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert setup_cpu_threads("cpu", log=said.append) is None and torch.get_num_threads() == 1  # plain python
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate launch exports
        assert setup_cpu_threads("cuda", log=said.append) is None and torch.get_num_threads() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))  # an idle machine: every core
        assert setup_cpu_threads("cpu", log=said.append) == available_cpus() == torch.get_num_threads()
        assert (len(said) == 1 and "OMP_NUM_THREADS=1" in said[0]) or available_cpus() == 1
        torch.set_num_threads(1)
        said.clear()
        monkeypatch.setattr(os, "getloadavg", lambda: (float(available_cpus()), 0.0, 0.0))  # busy: keep 1
        assert setup_cpu_threads("cpu", log=said.append) == 1 == torch.get_num_threads()
        assert (len(said) == 1 and "busy" in said[0]) or available_cpus() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(available_cpus()))  # one core per process: nothing to gain
        assert setup_cpu_threads("cpu", log=said.append) == 1
        monkeypatch.setenv("TOCOM_HUB_CPU_THREADS", "3")
        assert setup_cpu_threads("cpu", log=said.append) == 3 == torch.get_num_threads()
        monkeypatch.setenv("TOCOM_HUB_CPU_THREADS", "zero")
        with pytest.raises(ValueError, match="TOCOM_HUB_CPU_THREADS must be a positive integer"):
            setup_cpu_threads("cpu")
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------------
# visualize


def flat_panel_cells(png, info):
    """The colour of every patch cell of the flat panel (and a check that each cell is one colour)."""
    x0, y0, w, h = info["panels"]["groups"]
    with Image.open(png) as img:
        arr = np.asarray(img.convert("RGB"))[y0 : y0 + h, x0 : x0 + w]
    gh, gw = info["grid"]
    cell = info["cell_px"]
    assert (h, w) == (gh * cell, gw * cell)
    cells = arr.reshape(gh, cell, gw, cell, 3).transpose(0, 2, 1, 3, 4).reshape(gh, gw, cell * cell, 3)
    assert (cells == cells[:, :, :1]).all(), "a patch cell of the flat panel is not one flat colour"
    return cells[:, :, 0]


@pytest.mark.parametrize(
    "method,r,extra,prefix",
    [
        ("tome", 8, {}, 1),
        ("tome", 0, {}, 1),
        ("tome", 5, {"reg_tokens": 4}, 5),  # registers are prefix tokens too: never painted
        ("tome", 7, {"class_token": False, "global_pool": "avg"}, 0),
        ("evit", 20, {}, 1),
    ],
)
def test_visualize_colour_groups_equal_tokens_left(files, tmp_path, capsys, method, r, extra, prefix):
    png = tmp_path / "merged.png"
    code, out, err = run(
        [
            "visualize",
            "--model",
            NAME,
            "--model-kwargs",
            json.dumps(dict(TINY, **extra)),
            "--image",
            files / "img.png",
            "--r",
            r,
            "--method",
            method,
            "-o",
            png,
        ],
        capsys,
    )
    assert code == 0, err
    info = json.loads(png.with_suffix(".json").read_text())
    left = PATCHES - DEPTH * r  # closed form: no clamping at these r
    assert info["prefix_tokens"] == prefix and info["tokens_left"] == left and info["groups"] == left
    cells = flat_panel_cells(png, info)
    colours = {tuple(c) for c in cells.reshape(-1, 3).tolist()}
    pruned = sum(1 for c in cells.reshape(-1, 3).tolist() if tuple(c) == PRUNED_COLOR)
    assert len(colours - {PRUNED_COLOR}) == left
    assert pruned == (DEPTH * r if method == "evit" else 0)
    assert f"-> {left} tokens" in out
    assert "RANDOM weights" in err  # a timm name without --pretrained / --checkpoint: said loudly


def test_visualize_groups_are_the_source_trace(files, tmp_path):
    """Independent check of the painting: patches sharing a colour are exactly those a token holds."""
    from tocom_hub.tools.images import eval_transform
    from tocom_hub.tools.visualize import visualize

    model = tiny_model()
    info = visualize(model, files / "img.png", 12, tmp_path / "v.png")
    assert not tocom_hub.is_patched(model)  # left as found
    cells = flat_panel_cells(tmp_path / "v.png", info).reshape(-1, 3)
    # the source trace of the same image, recorded independently of visualize()
    tocom_hub.patch(model, trace_source=True)
    tocom_hub.set_r(model, 12)
    with torch.no_grad():
        model(eval_transform(model)[0](Image.open(files / "img.png").convert("RGB"))[None])
    source = tocom_hub.get_source(model)[0, 1:, 1:]  # drop the class token row and column
    for row in source:
        members = row.nonzero().flatten().tolist()
        assert members and len({tuple(cells[j]) for j in members}) == 1
        others = [j for j in range(PATCHES) if j not in members]
        assert tuple(cells[members[0]]) not in {tuple(cells[j]) for j in others}


# ---------------------------------------------------------------------------------------------------
# convert


def test_convert_official_checkpoint(tmp_path, capsys):
    R, h, d = 16, 2, 64
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(DEPTH):
        for t in ("q", "v"):
            sd[f"blocks.{i}.attn.{t}_tocom.adapter_down.weight"] = torch.randn(R * h, d, generator=g)
            sd[f"blocks.{i}.attn.{t}_tocom.adapter_up.weight"] = torch.randn(d, R * h, generator=g)
    torch.save(sd, tmp_path / "official.pth")
    out = tmp_path / "bank"
    code, stdout, err = run(
        ["convert", tmp_path / "official.pth", "-o", out, "--num-heads", "2", "--base-model", NAME], capsys
    )
    assert code == 0, err
    assert "2 blocks" in stdout
    bank = ToComBank.from_pretrained(out)
    assert (bank.r_max, bank.rank, bank.config.num_heads, bank.config.base_model) == (R, h, 2, NAME)
    # official group g -> g+1 sits at inner slice [R·h − h(g+1), R·h − h·g)
    for n in (1, 5, 16):
        want = (
            sum(
                sd["blocks.1.attn.v_tocom.adapter_up.weight"][:, R * h - h * (k + 1) : R * h - h * k]
                @ sd["blocks.1.attn.v_tocom.adapter_down.weight"][R * h - h * (k + 1) : R * h - h * k]
                for k in range(n)
            )
            * 0.1
        )
        assert torch.allclose(bank.delta(1, "v", 0, n), want, atol=1e-4)
    code, _, err = run(["convert", tmp_path / "official.pth", "-o", out], capsys)
    assert code == 1 and "--overwrite" in err


# ---------------------------------------------------------------------------------------------------
# errors: one line, non-zero exit, no traceback


def _eva():
    return [
        "--model",
        "eva02_tiny_patch14_224",
        "--model-kwargs",
        json.dumps(dict(img_size=56, depth=2, embed_dim=64, num_heads=2)),
    ]


ERRORS = [
    # missing files
    (["eval", "--model", "{m}", "--data", "{root}/nope"], 1, "no such directory"),
    (["eval", "--model", NAME, "--checkpoint", "{root}/nope.safetensors", "--data", "{root}/data"], 1, "no such file"),
    (["eval", "--model", "{root}/nope_model", "--data", "{root}/data"], 1, "no such file or directory"),
    (["eval", "--model", "{m}", "--data", "{root}/data", "--bank", "{root}/nope_bank"], 1, "does not exist"),
    (
        ["visualize", "--model", "{m}", "--image", "{root}/nope.jpg", "--r", "4", "-o", "{root}/x.png"],
        1,
        "no such file",
    ),
    (["convert", "{root}/nope.pth", "-o", "{root}/out"], 1, "no such file"),
    # bad r
    (["bench", "--model", "{m}", "--r", "0,40"], 1, "r=40 cannot be supported"),
    (
        ["visualize", "--model", "{m}", "--image", "{root}/img.png", "--r", "33", "-o", "{root}/x.png"],
        1,
        "cannot be supported",
    ),
    (
        ["eval", "--model", "{m}", "--data", "{root}/data", "--bank", "{root}/bank", "--target-r", "0,9"],
        1,
        "outside the bank's range 0…8",
    ),
    (["bench", "--model", "{m}", "--r", "-3"], 2, "r must be >= 0"),
    (["bench", "--model", "{m}", "--r", "0,4.5"], 2, "non-negative integer"),
    (
        ["visualize", "--model", "{m}", "--image", "{root}/img.png", "--r", "x", "-o", "{root}/x.png"],
        2,
        "non-negative integer",
    ),
    # unsupported / unknown models
    (["bench", *_eva(), "--r", "0"], 1, "not supported"),
    (["eval", *_eva(), "--data", "{root}/data"], 1, "not supported"),
    (["visualize", *_eva(), "--image", "{root}/img.png", "--r", "2", "-o", "{root}/x.png"], 1, "not supported"),
    (["bench", "--model", "vit_no_such_model", "--r", "0"], 1, "unknown model"),
]


@pytest.mark.parametrize("argv,code,message", ERRORS, ids=[f"{a[0]}-{m}" for a, _, m in ERRORS])
def test_errors_are_one_clear_line(files, capsys, argv, code, message):
    argv = [a.replace("{root}", str(files)).replace("{m}", str(files / "model")) for a in argv]
    if code == 2:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
    else:
        got, _, err = run(argv, capsys)
        assert got == code
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and lines[0].startswith(f"tocom-hub {argv[0]}: error:")
    assert message in err and "Traceback" not in err


def test_debug_shows_the_exception(files):
    with pytest.raises(ValueError, match="cannot be supported"):
        cli.main(["bench", "--debug", "--model", str(files / "model"), "--r", "40"])


# ---------------------------------------------------------------------------------------------------
# models: saved directories and the demo alias


def test_load_model_saved_directories(files, tmp_path):
    from safetensors.torch import save_file

    reference = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    model, info = load_model(str(files / "model"))
    assert info["model"] == NAME and torch.allclose(model(x), reference(x), atol=1e-6)
    # a training/finetune.py output directory
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, ft / "model.safetensors")
    kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    (ft / "finetune.json").write_text(
        json.dumps({"model": NAME, "model_kwargs": kwargs, "num_classes": 3, "method": "evit", "source_r": 2})
    )
    model, info = load_model(str(ft))
    assert (info["method"], info["source_r"]) == ("evit", 2) and torch.allclose(model(x), reference(x), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="not a saved model directory"):
        load_model(str(tmp_path))


def test_demo_alias(files, tmp_path, capsys):
    """`--model demo` is the embedded model: a clear error until its weights ship, then every command runs."""
    argv = {
        "bench": ["bench", "--model", "demo", "--r", "0,8", "--batch", "2", "--iters", "2", "--warmup", "0"],
        "visualize": [
            "visualize",
            "--model",
            "demo",
            "--image",
            files / "img.png",
            "--r",
            "8",
            "-o",
            tmp_path / "d.png",
        ],
        "eval": [
            "eval",
            "--model",
            "demo",
            "--data",
            "photo-crops",
            "--limit",
            "8",
            "--target-r",
            "0,8",
            "--workers",
            "0",
        ],
    }
    for name, args in argv.items():
        code, out, err = run(args, capsys)
        if DEMO_WEIGHTS.is_file():
            assert code == 0, (name, err)
        else:
            assert code == 1 and "demo weights" in err and "Traceback" not in err, (name, err)


# ---------------------------------------------------------------------------------------------------
# LatencyController


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
        assert tocom_hub.get_r(model) == ctl.r == get_state(model).target_r  # switched through set_target_r
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
    assert not tocom_hub.is_patched(model) and get_state(model) is None


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


def test_latency_controller_validates_before_touching_the_model():
    model = tiny_model()
    bank = ToComBank.for_model(model, r_max=4)
    for kwargs, match in [
        (dict(bank=bank, source_r=0, budget_ms=0), "budget_ms"),
        (dict(bank=bank, source_r=5, budget_ms=10), "source_r"),
        (dict(bank=bank, source_r=0, budget_ms=10, r_values=[0, 8]), "bank's range"),
        (dict(bank=None, source_r=0, budget_ms=10, r_values=[0, 40]), "cannot be supported"),
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


def test_throughput_benchmark_ceiling_rows_and_restores_the_merge_step():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    patch_module = bench._PATCH
    real = (patch_module.bipartite_soft_matching, patch_module.merge_wavg)

    model = timm.create_model(NAME, pretrained=False, **TINY).eval()
    configs = [("plain", 0), ("tome", 4), ("tome-ceiling", 4)]
    rows = bench.run(model, 1, configs, rounds=1, iters=1, img_size=64)
    assert [(row["method"], row["r"]) for row in rows] == configs
    assert all(row["ms_per_batch"] > 0 for row in rows)
    # the ceiling swaps the merge step out only while it is measured
    assert (patch_module.bipartite_soft_matching, patch_module.merge_wavg) == real
    assert not tocom_hub.is_patched(model)

    # the ceiling keeps ToMe's token counts (truncation instead of merging)
    bench._configure(model, ("tome-ceiling", 4))
    try:
        seen = []
        hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in model.blocks]
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
        for h in hooks:
            h.remove()
    finally:
        bench._configure(model, ("plain", 0))
    assert seen == [PATCHES + 1 - 4 * (i + 1) for i in range(DEPTH)]
    assert (patch_module.bipartite_soft_matching, patch_module.merge_wavg) == real


def test_trust_unverified_flag_loads_a_bank_without_checksum(files, tmp_path, capsys):
    """A bank file stripped of its checksum is refused by info / push / eval, and loads with --trust-unverified."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    bank_dir = tmp_path / "unverified"
    shutil.copytree(files / "bank", bank_dir)
    path = bank_dir / "tocom.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.pop("tocom_sha256")
    save_file(load_file(str(path)), str(path), metadata=meta)

    code, out, err = run(["info", bank_dir], capsys)
    assert code != 0 and "tocom_sha256" in err, (code, err)
    code, out, err = run(["info", bank_dir, "--trust-unverified"], capsys)
    assert code == 0, err
    assert "r_max" in out or "r range" in out or "rank" in out
    argv = [
        "eval",
        "--model",
        files / "model",
        "--data",
        files / "data",
        "--target-r",
        "0,2",
        "--bank",
        bank_dir,
        "--batch-size",
        "4",
        "--workers",
        "0",
    ]
    code, out, err = run(argv, capsys)
    assert code != 0 and "tocom_sha256" in err, (code, err)
    code, out, err = run([*argv, "--trust-unverified"], capsys)
    assert code == 0, err
