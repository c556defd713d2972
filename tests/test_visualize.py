"""``tocom-hub visualize`` and :mod:`tocom_hub.tools.visualize`: colour groups counted in the PNG against the
token count and against a source trace recorded independently."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tool_helpers import DEPTH, NAME, PATCHES, TINY, run, tiny_model

import tocom_hub
from tocom_hub.tools.visualize import PRUNED_COLOR

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py: one torch thread for the module


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
