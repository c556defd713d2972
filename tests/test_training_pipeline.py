"""The training input pipeline and step pieces that exist for speed must not change what is trained.

* uint8 batches + the float part on the device (``common.split_transform``) equal timm's transform run
  per image under the per-sample seeded RNGs, bit for bit (augmentation and random erasing included);
* ``common.seeded_rngs`` seeds exactly what ``torch.manual_seed`` seeds on the CPU and restores it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tocom_hub.demo.data import build_dataset
from tocom_hub.training import common


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
        s = common.derive_seed(seed, "sample", key)
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
    train_tf, _, _ = common.build_transforms(_model(), 48, augment, embedded=True)
    split = common.split_transform(train_tf)
    assert split is not None
    worker_tf, normalize = split
    keys = list(range(100, 164))  # sampler keys of a later epoch (key mod length indexes the dataset)
    ref = [_reference_item(ds, train_tf, 7, k) for k in keys]
    ref_x = torch.stack([r[0] for r in ref])
    ref_y = torch.tensor([r[1] for r in ref])

    loader = DataLoader(
        common.SeededTransform(ds, worker_tf, 7),
        sampler=keys,
        batch_size=32,
        collate_fn=common.collate_uint8,
        num_workers=1,
    )
    xs, ys, erased = [], [], 0
    for batch in loader:
        assert batch[0].dtype == torch.uint8
        erased += len(batch[2].boxes)
        x, y = common.device_batch(batch, torch.device("cpu"), normalize)
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

    assert common.split_transform(T.Compose([T.ToTensor()])) is None  # no Normalize
    assert (
        common.split_transform(
            T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3), T.ConvertImageDtype(torch.float16)])
        )
        is None
    )
    assert common.split_transform(lambda img: img) is None
    _, normalize = common.split_transform(T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)]))
    img = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.allclose(normalize(img), (img.float() / 255 - 0.5) / 0.25)


def test_uint8_transform_rejects_non_rgb_images():
    from PIL import Image
    from torchvision import transforms as T

    worker, _ = common.split_transform(T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]))
    with pytest.raises(ValueError, match="RGB"):
        worker(Image.new("L", (4, 4)))


def test_seeded_rngs_seed_like_manual_seed_and_restore():
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    before = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    with common.seeded_rngs(42):
        inside = (torch.rand(4), random.random(), np.random.rand())
    after = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]  # outer streams untouched
    torch.manual_seed(42)
    random.seed(42)
    np.random.seed(42)
    assert torch.equal(inside[0], torch.rand(4)) and inside[1:] == (random.random(), np.random.rand())


def _distill_step_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_step.py"
    spec = importlib.util.spec_from_file_location("distill_step_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_functions_run_on_cpu_and_return_their_keys():
    bench = _distill_step_module()
    tiny = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
    res = bench.step_rates(
        "vit_tiny_patch16_224",
        model_kwargs=tiny,
        batch_size=4,
        rounds=2,
        warmup=1,
        r_max=2,
        device="cpu",
        breakdown=True,
    )
    for part in ("full_ft", "distill"):
        assert res[part]["ms"] > 0 and res[part]["img_per_s"] > 0
    assert res["ratio"] > 0 and len(res["distill_ms"]) == 2 and len(res["pairs"]) == 2
    assert all(m != n for m, n in res["pairs"])
    assert res["trainable_backbone_parameters"] == 0  # the frozen backbone gets no weight gradients
    assert set(res["distill_parts_ms"]) == {"teacher_forward", "student_forward", "backward", "optimizer"}

    lr = bench.loader_rate(img_size=32, batch_size=8, num_workers=0, batches=2, device="cpu")
    assert lr["batches"] == 2 and lr["img_per_s"] > 0 and lr["uint8_batches"]

    e2e = bench.end_to_end(
        steps=3, batch_size=8, num_workers=0, cpu=True, raw_img_per_s=res["distill"]["img_per_s"], timeout=300
    )
    assert e2e["steps"] == 3 and e2e["images_per_second"] > 0
    assert e2e["ratio_to_step_rate"] == pytest.approx(e2e["images_per_second"] / res["distill"]["img_per_s"])
    assert e2e["metrics"]["throughput_images_per_second"] == e2e["images_per_second"]


def test_distill_step_keeps_no_teacher_activations_and_no_backbone_gradients():
    import tocom_hub
    from tocom_hub.core.bank import ToComBank
    from tocom_hub.training.distill import Distiller, kd_loss

    torch.manual_seed(0)
    model = _model(32)
    tocom_hub.patch(model, method="tome", prop_attn=True)
    model.requires_grad_(False)  # what training/distill.py does before plugging the bank in
    bank = ToComBank.for_model(model, r_max=2, rank=2, method="tome")
    with torch.no_grad():
        for a in bank.lora_B.values():
            a.normal_(0.0, 0.02)
    tocom_hub.apply(model, 0, 0, bank=bank, merge=False)
    distiller = Distiller(model, bank).train()
    x = torch.randn(2, 3, 32, 32)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        teacher = distiller.teacher(x, 0, 2)
    assert saved == [] and teacher.grad_fn is None  # the teacher pass keeps no activations
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        student = distiller.student(x, 0, 2)
    assert saved  # (the student does, for the bank's gradients)
    kd_loss(student, teacher, "logits").backward()
    assert all(p.grad is None for p in model.parameters())  # frozen: no weight gradients computed
    assert all(p.grad is not None for p in bank.parameters())
    assert any(p.grad.abs().max() > 0 for p in bank.parameters())
