"""training/finetune.py and training/distill.py end to end on a tiny EVA-02 (RoPE) backbone, as users run them:
fine-tune it from random weights on an embedded task, then distill a bank on the fine-tuned weights. The bank
must lower the held-out KL, and the recipe (bank config, finetune.json) records the backbone's family."""

from __future__ import annotations

import json

import pytest
from training_helpers import DISTILL, FINETUNE, run

MODEL = "eva02_tiny_patch14_224"
KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 3, "num_heads": 2, "global_pool": "token"}


def test_the_tiny_backbone_is_a_rope_eva():
    import timm

    model = timm.create_model(MODEL, pretrained=False, **KWARGS)
    assert type(model).__name__ == "Eva" and model.rope is not None  # rope is what this test is about
    assert model.patch_embed.num_patches == 64


@pytest.mark.slow
def test_finetune_then_distill_on_a_rope_eva(tmp_path):
    import tocom_hub

    ft, di = tmp_path / "ft", tmp_path / "di"
    model_args = ["--model", MODEL, "--model-kwargs", json.dumps(KWARGS), "--num-workers", "0"]
    run([FINETUNE, *model_args, "--from-scratch", "--data", "photo-crops", "--mode", "full", "--no-augment",
         "--max-steps", "200", "--batch-size", "32", "--lr", "3e-3", "--output-dir", ft])  # fmt: skip
    result = json.loads((ft / "finetune.json").read_text())
    assert result["family"] == "eva" and result["weights"] == "random-init"
    assert result["val_top1"] > 3 * 100 / 15  # 15 classes: it learned (chance is 6.7 %)

    # the student runs in train mode: no stochastic depth / augmentation noise next to a KL of ~1e-4
    run([DISTILL, *model_args, "--checkpoint", ft / "model.safetensors", "--data", "photo-crops", "--r-max", "16",
         "--max-steps", "80", "--batch-size", "32", "--lr", "1e-3", "--drop-path", "0", "--no-augment", "--mixup", "0",
         "--cutmix", "0", "--heldout-pairs", "4", "--heldout-images", "64", "--output-dir", di])  # fmt: skip
    metrics = json.loads((di / "metrics.json").read_text())
    assert metrics["heldout_kl_no_bank"] > 0
    assert metrics["heldout_kl_with_bank"] < metrics["heldout_kl_no_bank"]

    bank = tocom_hub.ToComBank.from_pretrained(di)
    assert bank.config.training_recipe["family"] == "eva"
    assert bank.config.base_model == MODEL and bank.r_max == 16 and bank.targets == ("q", "v")
    assert any(b.abs().max() > 0 for b in bank.lora_B.values())  # it trained
