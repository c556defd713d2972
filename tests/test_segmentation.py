"""Segmentation: the embedded ``photo-segments`` dataset (masks checked against an independent per-pixel
rasteriser), mIoU and its bootstrap (against naive loops and closed forms), the Segmenter model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import tocom_hub
from tocom_hub.demo import data as D
from tocom_hub.demo.data.segmentation import SEGMENT_CLASSES
from tocom_hub.tools.miou import bootstrap_miou, confusion_matrices, iou_per_class, miou, paired_bootstrap_miou
from tocom_hub.tools.segmenter import Segmenter, patch_tokens

pytestmark = pytest.mark.usefixtures("one_thread_module")


# ---------------------------------------------------------------------------------------------------
# dataset


def _inside(obj, py: float, px: float) -> bool:
    """Point-in-shape for one pixel centre, written independently of ``shape_mask`` (plain geometry)."""
    cy, cx, h = obj["cy"], obj["cx"], obj["half"]
    if obj["kind"] == "disc":
        return math.hypot(py - cy, px - cx) <= h
    if obj["kind"] in ("square", "stripes"):
        return cx - h <= px <= cx + h and cy - h <= py <= cy + h
    # triangle: apex (cx, cy -/+ h), base corners (cx ± h, cy +/- h); inside = same side of all three edges
    s = -1.0 if obj["up"] else 1.0
    a, b, c = (cx, cy + s * h), (cx - h, cy - s * h), (cx + h, cy - s * h)

    def side(p, q):
        return (q[0] - p[0]) * (py - p[1]) - (q[1] - p[1]) * (px - p[0])

    d = (side(a, b), side(b, c), side(c, a))
    return all(v >= -1e-9 for v in d) or all(v <= 1e-9 for v in d)


def test_registered_as_a_segmentation_dataset():
    spec = D.get_dataset_spec("photo-segments")
    assert spec.task == "segmentation" and spec.num_classes == len(SEGMENT_CLASSES) >= 4 and spec.license
    assert D.get_dataset_spec("photo-crops").task == "classification"
    with pytest.raises(ValueError, match="task"):
        D.register_dataset("x-bad-task", num_classes=2, description="", lengths={}, license="", task="detect")
    assert "x-bad-task" not in D.list_datasets()


def test_masks_are_what_was_drawn():
    ds = D.build_dataset("photo-segments", "train", 32, length=12)
    seen = set()
    for i in range(len(ds)):
        img, mask = ds[i]
        assert img.size == (32, 32) and mask.shape == (32, 32) and mask.dtype == np.int64
        objs = ds.objects(i)
        ref = np.zeros((32, 32), np.int64)
        for y in range(32):
            for x in range(32):
                for obj in objs:  # painter's order: the last object covering the pixel wins
                    if _inside(obj, y + 0.5, x + 0.5):
                        ref[y, x] = obj["label"]
        assert np.array_equal(mask, ref), f"item {i}"
        pix = np.asarray(img, dtype=np.float64)
        for obj in objs:  # a solid object's visible pixels have its colour (noise sigma 4)
            vis = (mask == obj["label"]) & np.array(
                [[_inside(obj, y + 0.5, x + 0.5) for x in range(32)] for y in range(32)]
            )
            later = [o for o in objs[objs.index(obj) + 1 :]]
            for o in later:
                vis &= ~np.array([[_inside(o, y + 0.5, x + 0.5) for x in range(32)] for y in range(32)])
            if obj["kind"] != "stripes" and vis.sum() > 4:
                err = np.abs(pix[vis] - np.clip(obj["colour"], 0, 255)).mean()
                assert err < 6.0, (i, obj["kind"], err)
        seen |= set(np.unique(mask).tolist())
    assert seen == set(range(5)), "the first items show every class"


def test_deterministic_by_seed_and_split():
    a = D.build_dataset("photo-segments", "train", 32, length=4, seed=3)
    b = D.build_dataset("photo-segments", "train", 32, length=4, seed=3)
    c = D.build_dataset("photo-segments", "train", 32, length=4, seed=4)
    t = D.build_dataset("photo-segments", "test", 32, length=4, seed=3)
    for i in range(4):
        assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])) and np.array_equal(a[i][1], b[i][1])
    assert not np.array_equal(np.asarray(a[1][0]), np.asarray(c[1][0]))
    assert not np.array_equal(np.asarray(a[1][0]), np.asarray(t[1][0]))
    with pytest.raises(IndexError):
        a[4]


def test_classification_tools_refuse_it():
    from tocom_hub.demo.data import build_eval_dataset

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1)
    with pytest.raises(ValueError, match="segmentation"):
        build_eval_dataset(model, "photo-segments")


# ---------------------------------------------------------------------------------------------------
# mIoU


def test_confusion_and_miou_against_naive_loops():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (3, 5, 6), generator=g)
    target = torch.randint(0, 4, (3, 5, 6), generator=g)
    target[0, 0, :3] = 255  # ignored pixels
    conf = confusion_matrices(pred, target, 4)
    ref = np.zeros((3, 4, 4), np.int64)
    for b in range(3):
        for t, p in zip(target[b].flatten().tolist(), pred[b].flatten().tolist()):
            if t != 255:
                ref[b, t, p] += 1
    assert np.array_equal(conf.numpy(), ref)
    total = ref.sum(0)
    ious = [total[c, c] / (total[c].sum() + total[:, c].sum() - total[c, c]) for c in range(4)]
    assert miou(total) == pytest.approx(100 * np.mean(ious))
    with pytest.raises(ValueError, match="class indices"):
        confusion_matrices(pred + 4, target, 4)


def test_miou_closed_forms():
    perfect = np.diag([10, 0, 5])  # class 1 absent from truth and prediction: left out, not counted as 0
    assert miou(perfect) == 100.0 and math.isnan(iou_per_class(perfect)[1])
    half = np.array([[1, 1], [0, 2]])  # IoU 1/2 and 2/3
    assert miou(half) == pytest.approx(100 * (0.5 + 2 / 3) / 2)


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    confs = rng.integers(0, 20, size=(2, 40, 3, 3))
    ci = bootstrap_miou(confs, n_boot=500)
    per_seed = [miou(c.sum(0)) for c in confs]
    assert ci["miou"] == pytest.approx(np.mean(per_seed)) and ci["low"] < ci["miou"] < ci["high"]
    assert (ci["images"], ci["seeds"]) == (40, 2)
    same = paired_bootstrap_miou(confs, confs, n_boot=200)
    assert same["delta"] == same["low"] == same["high"] == 0.0
    better = confs.copy()
    better[..., 0, 0] += 50  # strictly more true positives of class 0 on every image
    d = paired_bootstrap_miou(confs, better, n_boot=200)
    assert d["delta"] > 0 and d["low"] > 0
    # paired intervals are narrower than the difference of two independent ones
    assert d["high"] - d["low"] < (bootstrap_miou(better)["high"] - bootstrap_miou(better)["low"])
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap_miou(confs, confs[:, :5])


# ---------------------------------------------------------------------------------------------------
# Segmenter


def _backbone(seed: int = 0):
    torch.manual_seed(seed)
    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=0,
    )
    return m.eval()


def test_linear_decoder_matches_a_manual_head():
    seg = Segmenter(_backbone(), 5, "linear").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = seg.backbone.forward_features(x)[:, 1:]
        ref = seg.decoder.head(tokens).transpose(1, 2).reshape(2, 5, 8, 8)
        ref = F.interpolate(ref, size=(32, 32), mode="bilinear", align_corners=False)
        assert torch.allclose(seg(x), ref)
        assert seg.predict(x).shape == (2, 32, 32)


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_segmenter_in_dense_and_regular_mode(decoder):
    seg = Segmenter(_backbone(), 5, decoder).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = seg(x)
        tocom_hub.patch(seg.backbone, method="tome", dense=True, dense_ratio=2)
        tocom_hub.set_r(seg.backbone, 0)
        assert torch.equal(seg(x), plain)  # r = 0 is timm's own forward
        tocom_hub.set_r(seg.backbone, 8)
        dense = seg(x)
        assert dense.shape == plain.shape and torch.isfinite(dense).all() and not torch.allclose(dense, plain)
        tocom_hub.unpatch(seg.backbone)
        tocom_hub.patch(seg.backbone, method="tome")  # regular mode: merged tokens copied back to their patches
        tocom_hub.set_r(seg.backbone, 4)
        tokens = patch_tokens(seg.backbone, x)
        assert tokens.shape == (2, 64, 32) and seg(x).shape == plain.shape


def test_segmenter_validates():
    with pytest.raises(ValueError, match="decoder"):
        Segmenter(_backbone(), 5, "fpn")
    with pytest.raises(ValueError, match="num_classes"):
        Segmenter(_backbone(), 1)
    with pytest.raises(TypeError, match="patch grid"):
        Segmenter(torch.nn.Linear(3, 3), 5)
