"""Segmentation end to end at toy scale: ``finetune.py --task segmentation`` (training/segment.py) writes a
Segmenter that ``load_segmenter`` rebuilds exactly, ``distill.py --kd tokens`` compares every token, and
``tocom-hub visualize`` paints the patches sharing an MLP in dense mode and a predicted mask."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import timm
import torch

import tocom_hub
from tocom_hub import cli
from tocom_hub.tools.segmenter import Segmenter, load_segmenter
from tocom_hub.tools.visualize_dense import dense_groups, visualize_dense

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory):
    from tocom_hub.training import finetune

    out = str(tmp_path_factory.mktemp("seg") / "seg")
    argv = ["--task", "segmentation", "--output-dir", out, "--model", "vit_tiny_patch16_224", "--from-scratch",
            "--model-kwargs", json.dumps(TINY), "--decoder", "mask", "--steps", "3", "--batch-size", "4",
            "--train-images", "8", "--val-images", "4", "--seed", "1"]  # fmt: skip
    result = finetune.main(argv)
    assert result["decoder"] == "mask" and result["val_images"] == 4 and 0 <= result["val_miou"] <= 100
    return out


def test_finetune_segmentation_saves_a_loadable_segmenter(seg_dir):
    from safetensors.torch import load_file

    for name in ("backbone.safetensors", "decoder.safetensors", "segmenter.json"):
        assert os.path.isfile(os.path.join(seg_dir, name))
    assert "head.weight" not in load_file(os.path.join(seg_dir, "backbone.safetensors"))  # a head-less backbone
    model = load_segmenter(seg_dir)
    assert isinstance(model, Segmenter) and model.num_classes == 5 and not model.training
    from tocom_hub.tools.miou import miou
    from tocom_hub.training.segment import evaluate_confusions, tensor_dataset

    cfg = json.load(open(os.path.join(seg_dir, "segmenter.json")))
    x, y = tensor_dataset("photo-segments", "test", 32, 4, 0, cfg["mean"], cfg["std"])
    assert miou(evaluate_confusions(model, x, y).sum(0).numpy()) == pytest.approx(cfg["val_miou"])


def test_finetune_refuses_a_segmentation_dataset_for_classification(capsys):
    from tocom_hub.training import finetune

    with pytest.raises(SystemExit):
        finetune.parse_args(["--data", "photo-segments", "--output-dir", "x"])
    assert "--task segmentation" in capsys.readouterr().err


def test_tokens_distillation_compares_every_token():
    from tocom_hub.core.bank.module import ToComBank
    from tocom_hub.training.distiller import Distiller, kd_loss

    torch.manual_seed(0)
    bb = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY).eval()
    tocom_hub.patch(bb, method="tome", dense=True, dense_ratio=2)
    bank = ToComBank.for_model(bb, r_max=4, rank=2, dense=True, dense_ratio=2)
    tocom_hub.apply(bb, 0, 0, bank=bank, merge=False)
    d = Distiller(bb, bank, kd="tokens")
    x = torch.randn(2, 3, 32, 32)
    s, t = d(x, 0, 4)
    assert s.shape == t.shape == (2, 65, 32)  # dense: every patch token plus the class token
    assert kd_loss(s, t, "tokens", reduction="none").shape == (2,)
    assert torch.allclose(kd_loss(s, t, "tokens"), (s - t).abs().mean())


def test_dense_groups_count_the_merges():
    torch.manual_seed(0)
    bb = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="dense"):
        dense_groups(bb, x)
    tocom_hub.patch(bb, method="tome", dense=True, dense_ratio=2)
    tocom_hub.set_r(bb, 6)  # k = 12 merges of the 64 patches in every block
    for block in (0, -1):
        g = dense_groups(bb, x, block)
        assert g.shape == (8, 8) and g.min() == 0 and len(np.unique(g)) == 64 - 12
        assert g.flatten()[0] == 0 and sorted(np.unique(g)) == list(range(52))  # raster-order numbering
    tocom_hub.set_r(bb, [0, 3])
    assert len(np.unique(dense_groups(bb, x, 0))) == 64  # block 0 merged nothing
    assert len(np.unique(dense_groups(bb, x, 1))) == 64 - 6
    with pytest.raises(ValueError, match="block"):
        dense_groups(bb, x, 2)
    tocom_hub.unpatch(bb)
    tocom_hub.patch(bb, method="evit", dense=True, dense_ratio=2)
    tocom_hub.set_r(bb, 5)
    g = dense_groups(bb, x)
    assert (g < 0).sum() == 10 and len(np.unique(g[g >= 0])) == 54  # EViT: 10 patches skip the MLP


def test_visualize_dense_writes_groups_and_mask(seg_dir, tmp_path):
    from PIL import Image

    from tocom_hub.demo.data import build_dataset

    img, _ = build_dataset("photo-segments", "test", 32, length=1)[0]
    path = tmp_path / "shapes.png"
    img.save(path)
    model = load_segmenter(seg_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = visualize_dense(model, str(path), 4, tmp_path / "d.png", dense_ratio=2)
    assert info["groups"] == 64 - 8 and sum(info["mask_classes"]) == 32 * 32
    assert "_tocom_state" not in model.backbone.__dict__  # left as found
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pic = np.asarray(Image.open(tmp_path / "d.png").convert("RGB"))
    x0, y0, w, h = info["panels"]["mask"]
    colours = {tuple(c) for c in info["mask_colors"]}
    cells = {tuple(c) for c in pic[y0 : y0 + h, x0 : x0 + w].reshape(-1, 3)}
    assert cells <= colours  # the mask panel holds class colours only
    # the CLI: a segmenter directory implies dense mode and adds the mask
    out = tmp_path / "cli.png"
    argv = ["visualize", "--model", seg_dir, "--image", str(path), "--r", "8", "--dense-ratio", "2", "-o", str(out)]
    assert cli.main(argv) == 0
    side = json.load(open(tmp_path / "cli.json"))
    assert out.is_file() and side["groups"] == 64 - 16 and "mask" in side["panels"]


@pytest.mark.slow
def test_segmentation_study_end_to_end_tiny(tmp_path):
    """benchmarks/study/segmentation.py at toy scale: every stage runs, the table has a row per r, and the
    counted GFLOPs fall by the closed form of the FFN tokens removed (plus a little bipartite matching)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "study" / "segmentation.py"
    spec = importlib.util.spec_from_file_location("seg_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    argv = ["--workdir", str(tmp_path / "w"), "--seeds", "0", "--rs", "0", "8", "--ft-steps", "2", "--bank-steps",
            "2", "--test-images", "8", "--boot", "50", "--out", str(tmp_path / "res")]  # fmt: skip
    result = study.main(argv)
    assert [row["r"] for row in result["rows"]] == [0, 8]
    for ext in (".json", ".md", ".png"):
        assert (tmp_path / f"res{ext}").is_file()
    r0, r8 = result["rows"]
    removed = (r0["gflops"] - r8["gflops"]) * 1e9
    ffn = 6 * 16 * 2 * 2 * 96 * 384  # 6 blocks, k = 16 tokens, fc1 + fc2 of the 96 -> 384 MLP
    assert 0.97 * ffn < removed < ffn  # matching costs a little, so slightly less than the FFN is saved
    assert r0["gain"]["delta"] == 0.0  # r = 0: the bank's 0 -> 0 update is empty
    for row in result["rows"]:
        assert row["plain"]["low"] <= row["plain"]["miou"] <= row["plain"]["high"]
