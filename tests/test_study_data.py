"""The study datasets (tocom_hub/demo/data/): determinism, balance, split separation, and labels checked
against independent constructions (a jigsaw item un-shuffled by hand, discs found by thresholding)."""

from __future__ import annotations

import numpy as np
import pytest

from tocom_hub.demo import data as D

STUDY = ("photo-regions", "photo-jigsaw", "shape-count", "shape-location", "textures")


@pytest.mark.parametrize("name", STUDY)
def test_registered_deterministic_balanced(name):
    spec = D.get_dataset_spec(name)
    a = D.build_dataset(name, "train", 32, length=3 * spec.num_classes)
    b = D.build_dataset(name, "train", 32, length=3 * spec.num_classes)
    assert a.num_classes == spec.num_classes == len(a.classes)
    assert spec.license
    labels = [a[i][1] for i in range(len(a))]
    assert np.bincount(labels, minlength=spec.num_classes).tolist() == [3] * spec.num_classes
    for i in (0, 1, len(a) - 1):
        img, y = a[i]
        assert img.size == (32, 32) and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), np.asarray(b[i][0])) and y == b[i][1]
    test = D.build_dataset(name, "test", 32, length=4)
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(test[0][0])), "splits must draw different images"
    with pytest.raises(IndexError):
        a[len(a)]


def test_jigsaw_label_is_the_quadrant_permutation():
    ds = D.build_dataset("photo-jigsaw", "train", 32, length=1)
    perms = D.PhotoJigsaw.PERMS
    identity = perms.index((0, 1, 2, 3))
    for label_perm in (5, 17, 23):
        seed = np.random.SeedSequence(1234)
        plain = ds.render(np.random.default_rng(seed), identity)  # photo 0, not shuffled
        mixed = ds.render(np.random.default_rng(seed), label_perm)  # same crop, shuffled
        q = 16
        tiles = [plain[:q, :q], plain[:q, q:], plain[q:, :q], plain[q:, q:]]
        got = [mixed[:q, :q], mixed[:q, q:], mixed[q:, :q], mixed[q:, q:]]
        for pos, src in enumerate(perms[label_perm]):
            assert np.array_equal(got[pos], tiles[src])


def _discs(ds, label, seed):
    """Render with a black background and count/locate the discs with a threshold + flood fill."""
    from scipy import ndimage

    black = staticmethod(lambda rng, size, **kw: (rng.random(), np.zeros((size, size, 3), np.float32))[1])
    on_black = type("OnBlack", (type(ds),), {"background": black})(ds.split, ds.img_size, ds.length, ds.seed)
    img = on_black.render(np.random.default_rng(seed), label)
    mask = img.max(axis=2) > 60
    lab, n = ndimage.label(mask)
    centres = ndimage.center_of_mass(mask, lab, range(1, n + 1))
    return n, centres


@pytest.mark.parametrize("label", range(6))
def test_shape_count_draws_label_plus_one_discs(label):
    pytest.importorskip("scipy")
    ds = D.build_dataset("shape-count", "train", 32, length=6)
    for seed in range(5):
        n, _ = _discs(ds, label, seed)
        assert n == label + 1


@pytest.mark.parametrize("label", range(9))
def test_shape_location_disc_lies_in_the_labelled_cell(label):
    pytest.importorskip("scipy")
    ds = D.build_dataset("shape-location", "train", 32, length=9)
    for seed in range(5):
        n, centres = _discs(ds, label, seed)
        assert n == 1
        cy, cx = centres[0]
        assert (int(cy // (32 / 3)), int(cx // (32 / 3))) == divmod(label, 3)


def test_textures_classes_differ_in_statistics():
    ds = D.build_dataset("textures", "train", 32, length=8)
    imgs = [np.asarray(ds[i][0], np.float32).mean(axis=2) for i in range(8)]

    # stripes: a single orientation → the spectrum concentrates on one line; noise: flat spectrum
    def peakiness(x):
        f = np.abs(np.fft.fft2(x - x.mean()))
        return f.max() / f.mean()

    assert peakiness(imgs[ds.classes.index("stripes")]) > 3 * peakiness(imgs[ds.classes.index("noise")])


def test_training_scripts_evaluate_the_split_they_are_asked_for():
    """evaluate.py --split test must read the test split of an embedded dataset, not its validation split."""
    import argparse

    from tocom_hub.training.data import build_datasets

    def first(split):
        ns = argparse.Namespace(data="shape-count", data_dir=None, train_split="train", val_split=split, batch_size=8)
        _, val, _ = build_datasets(ns, "shape-count", 32, val_length=4)
        return np.asarray(val[0][0])

    ref_val = np.asarray(D.build_dataset("shape-count", "val", 32, length=4)[0][0])
    ref_test = np.asarray(D.build_dataset("shape-count", "test", 32, length=4)[0][0])
    assert np.array_equal(first("validation"), ref_val)
    assert np.array_equal(first("test"), ref_test)
    assert not np.array_equal(ref_val, ref_test)


def test_embedded_datasets_are_deterministic_and_split():
    import numpy as np

    from tocom_hub.demo.data import build_dataset, list_datasets

    assert {"photo-crops", "photo-orientation"} <= set(list_datasets())
    a = build_dataset("photo-crops", "train", 16, length=20)
    b = build_dataset("photo-crops", "train", 16, length=20)
    v = build_dataset("photo-crops", "val", 16, length=20)
    for i in (0, 7, 19):
        assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])) and a[i][1] == b[i][1]
        assert a[i][0].size == (16, 16) and a[i][0].mode == "RGB"
    assert not np.array_equal(np.asarray(a[3][0]), np.asarray(v[3][0]))
    assert sorted({a[i][1] for i in range(15)}) == list(range(15))
    with pytest.raises(KeyError, match="photo-crops"):
        build_dataset("nope")
