"""The model card (core/bank_card.py): rendered from MODEL_CARD.md, optional facts left out."""

from __future__ import annotations

from hub_helpers import ROOT

from tocom_hub import ToComBank
from tocom_hub.hub import create_model_card


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


def test_model_card_template_is_shipped_and_in_sync():
    assert (ROOT / "MODEL_CARD.md").read_text() == (ROOT / "tocom_hub" / "MODEL_CARD.md").read_text()
    assert "MODEL_CARD.md" in (ROOT / "setup.cfg").read_text().split("[options.package_data]")[1].split("[")[0]
