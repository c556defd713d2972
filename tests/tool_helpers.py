"""Shared by the tests of the tools and the CLI: a tiny timm ViT (``pretrained=False``, 64 px, patch 8 → 64
patches, depth 2, width 64), the files the commands read (a saved model, a bank, an ImageFolder, an image)
and a runner for :func:`tocom_hub.cli.main`."""

from __future__ import annotations

import json

import numpy as np
import timm
import torch
from PIL import Image

from tocom_hub import ToComBank, cli

TINY = dict(img_size=64, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=3)
KW = json.dumps(TINY)
NAME = "vit_tiny_patch16_224"
PATCHES, DEPTH = 64, 2


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = timm.create_model(NAME, pretrained=False, **dict(TINY, **overrides)).eval()
    with torch.no_grad():  # timm zero-inits the head: give it weights so predictions differ per image
        model.head.weight.normal_(0, 0.5)
        model.head.bias.normal_(0, 0.1)
    return model


def make_files(root):
    """A saved tiny model (timm's config.json + model.safetensors), a bank, an ImageFolder, an image."""
    model = tiny_model()
    timm.models.save_for_hf(model, root / "model", safe_serialization=True)
    bank = ToComBank.for_model(model, r_max=8, rank=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in bank.targets:
            bank.lora_B[t].copy_(torch.randn(bank.lora_B[t].shape, generator=g) * 0.5)
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
