"""The model card (core/bank/card.py): rendered from MODEL_CARD.md, optional facts left out, ``base_model`` only
when the backbone is that Hub model, current file names, a "Use it" snippet that runs, README.md written by
``save_pretrained``."""

from __future__ import annotations

import torch
from hub_helpers import ROOT, card_snippet, run_card_snippet

import tocom_hub
from tocom_hub import ToComBank, ToComConfig
from tocom_hub.core.bank.card import render_model_card, verified_base_model
from tocom_hub.demo import demo_bank_path
from tocom_hub.hub import create_model_card

VIT_TINY = dict(embed_dim=192, depth=12, num_heads=3)  # timm's vit_tiny_patch16_224
TAG = "augreg_in21k_ft_in1k"


def test_model_card_without_optional_facts():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # no pretrained tag
    bank = ToComBank.for_model(model, r_max=3, method="evit")
    card = create_model_card(bank)
    assert card.data.library_name == "tocom-hub" and card.data.base_model is None
    assert {"evit", "token-pruning"} <= set(card.data.tags) and "token-merging" not in card.data.tags
    assert "None" not in card.text and "{{" not in card.text and "{%" not in card.text
    assert "recorded no training recipe" in card.text and "No evaluation results" in card.text
    assert "| r range | 0 … 3 " in card.text


def test_base_model_only_when_the_backbone_is_that_hub_model():
    def config(**kw):
        base = dict(VIT_TINY, r_max=2, rank=1, base_model="vit_tiny_patch16_224", pretrained_tag=TAG)
        return ToComConfig(**{**base, **kw})

    assert verified_base_model(config())[0] == f"timm/vit_tiny_patch16_224.{TAG}"
    recipe = {"weights": f"timm-pretrained:{TAG}", "model_kwargs": {"img_size": 384}}
    assert verified_base_model(config(training_recipe=recipe))[0] == f"timm/vit_tiny_patch16_224.{TAG}"
    refused = [
        config(pretrained_tag=None),  # random or private weights record no tag
        config(embed_dim=96),  # the trainer's embedded default: a 96-dim vit_tiny is not the Hub's 192-dim one
        config(depth=11),
        config(num_heads=4),
        config(pretrained_tag="no_such_tag"),
        config(base_model="no_such_architecture"),
        config(training_recipe={"weights": "random-init"}),
        config(training_recipe={"weights": "file:model.safetensors"}),
        config(training_recipe={"weights": f"timm-pretrained:{TAG}", "model_kwargs": {"patch_size": 8}}),
    ]
    for cfg in refused:
        assert verified_base_model(cfg) == (None, None), cfg
        card = create_model_card(ToComBank(cfg), repo_id="org/x")
        assert card.data.base_model is None and "base_model" not in card.text.split("---")[1]
    card = create_model_card(ToComBank(config()), repo_id="org/x")
    assert card.data.base_model == f"timm/vit_tiny_patch16_224.{TAG}" and card.data.base_model_relation == "adapter"


def test_the_card_of_the_trainers_default_bank_runs_its_snippet(tmp_path):
    """The shipped demo bank was written by training/distill.py from the embedded 96-dim backbone: its card
    claims no Hub base model, lists the current file and tensor names, and its snippet builds that backbone and
    applies the bank (the bank's own shape and name checks pass)."""
    bank = ToComBank.from_pretrained(demo_bank_path())
    assert bank.config.training_recipe["script"] == "training/distill.py"
    text = render_model_card(bank, repo_id="org/demo-bank")
    assert "base_model" not in text.split("---")[1] and "timm/vit_tiny" not in text
    files = text.split("## Files", 1)[1].split("##", 1)[0]
    for name in ("`tocom.safetensors`", "`tocom_config.json`", "`README.md`", "`lora_A.q`", "`lora_B.v`"):
        assert name in files, name
    assert "`A.<target>`" not in files and "`B.<target>`" not in files  # format-1 names are gone
    model = run_card_snippet(text, "org/demo-bank", demo_bank_path())
    assert tocom_hub.get_r(model) == bank.r_max and tocom_hub.compensate.get_compensation(model) is not None
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 32, 32)).shape[0] == 1


def test_a_verified_card_snippet_runs_on_the_model_it_names(tmp_path):
    cfg = ToComConfig(**VIT_TINY, r_max=2, rank=1, base_model="vit_tiny_patch16_224", pretrained_tag=TAG)
    bank = ToComBank(cfg)
    bank.save_pretrained(tmp_path / "bank")
    text = render_model_card(bank, repo_id="org/tiny")
    assert f'timm.create_model("vit_tiny_patch16_224.{TAG}", pretrained=True)' in card_snippet(text)
    applied = run_card_snippet(text, "org/tiny", str(tmp_path / "bank"))
    assert tocom_hub.get_r(applied) == 2


def test_save_pretrained_writes_the_card_beside_the_files(tmp_path):
    bank = ToComBank.from_pretrained(demo_bank_path())
    out = tmp_path / "saved"
    bank.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "tocom.safetensors", "tocom_config.json"]
    text = (out / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: tocom-hub\n") and f'bank="{out}"' in text
    assert f"({(out / 'tocom.safetensors').stat().st_size:,} bytes" in text
    model = run_card_snippet(text, str(out), str(out))  # the saved folder's card runs as it is
    assert tocom_hub.get_r(model) == bank.r_max


def test_model_card_template_is_shipped_and_in_sync():
    assert (ROOT / "MODEL_CARD.md").read_text() == (ROOT / "tocom_hub" / "MODEL_CARD.md").read_text()
    assert "MODEL_CARD.md" in (ROOT / "setup.cfg").read_text().split("[options.package_data]")[1].split("[")[0]
