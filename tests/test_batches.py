"""uint8 batches normalised on the device (training/batches.py) must not change what is trained: they equal
timm's transform run per image under the per-sample seeded RNGs, bit for bit (augmentation and random
erasing included)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tocom_hub.demo.data import build_dataset
from tocom_hub.training import batches, data, seeds


def _model(img_size=48):
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8, depth=2, embed_dim=64, num_heads=2
    )


def _reference_item(ds, transform, seed, key):
    """What training did per image before: the whole timm transform under torch.manual_seed & co."""
    img, label = ds[key % len(ds)]
    with torch.random.fork_rng(devices=[]):
        py, npst = random.getstate(), np.random.get_state()
        s = seeds.derive_seed(seed, "sample", key)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        out = transform(img)
        random.setstate(py)
        np.random.set_state(npst)
    return out, label


@pytest.mark.parametrize("augment", [True, False])
def test_uint8_batches_normalised_on_device_equal_the_per_image_transform(augment):
    ds = build_dataset("photo-crops", "train", 48, length=64)
    train_tf, _, _ = data.build_transforms(_model(), 48, augment, embedded=True)
    split = batches.split_transform(train_tf)
    assert split is not None
    worker_tf, normalize = split
    keys = list(range(100, 164))  # sampler keys of a later epoch (key mod length indexes the dataset)
    ref = [_reference_item(ds, train_tf, 7, k) for k in keys]
    ref_x = torch.stack([r[0] for r in ref])
    ref_y = torch.tensor([r[1] for r in ref])

    loader = DataLoader(
        data.SeededTransform(ds, worker_tf, 7),
        sampler=keys,
        batch_size=32,
        collate_fn=batches.collate_uint8,
        num_workers=1,
    )
    xs, ys, erased = [], [], 0
    for batch in loader:
        assert batch[0].dtype == torch.uint8
        erased += len(batch[2].boxes)
        x, y = batches.device_batch(batch, torch.device("cpu"), normalize)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == ref_x.dtype and x.shape == ref_x.shape
    assert torch.equal(x, ref_x), (x - ref_x).abs().max()
    assert torch.equal(y, ref_y)
    if augment:
        assert erased > 0  # random erasing (p = 0.25) did fire, so its replay is covered
    else:
        assert erased == 0


def test_split_transform_declines_unusual_pipelines():
    from torchvision import transforms as T

    assert batches.split_transform(T.Compose([T.ToTensor()])) is None  # no Normalize
    assert (
        batches.split_transform(
            T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3), T.ConvertImageDtype(torch.float16)])
        )
        is None
    )
    assert batches.split_transform(lambda img: img) is None
    _, normalize = batches.split_transform(T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)]))
    img = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.allclose(normalize(img), (img.float() / 255 - 0.5) / 0.25)


def test_uint8_transform_rejects_non_rgb_images():
    from PIL import Image
    from torchvision import transforms as T

    worker, _ = batches.split_transform(T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]))
    with pytest.raises(ValueError, match="RGB"):
        worker(Image.new("L", (4, 4)))
