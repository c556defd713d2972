"""The ``demo`` model alias: the embedded tiny ViT, for :func:`tocom_hub.tools.models.load_model`.

A ``vit_tiny_patch16_224`` at 32 px (patch 4, 6 blocks, 96 dims, 3 heads) trained on the embedded
``photo-crops`` task; its weights are ``assets/vit_tiny_photo_crops.safetensors`` (an install without them
gets a clear error). Importing :mod:`tocom_hub.demo` registers the alias, so ``load_model("demo")`` and
``tocom-hub eval --model demo`` work offline. Example::

    import tocom_hub.demo
    from tocom_hub.tools.models import load_model
    model = load_model("demo").model
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from ..tools.models import ModelAlias, register_model_alias

__all__ = ["DEMO_MODEL", "DEMO_MODEL_KWARGS", "DEMO_WEIGHTS"]

# The embedded demo model (training/backbone.py's EMBEDDED_* defaults point here).
DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_MODEL_KWARGS: Dict[str, Any] = dict(img_size=32, patch_size=4, depth=6, embed_dim=96, num_heads=3)
DEMO_WEIGHTS = Path(__file__).resolve().parent / "assets" / "vit_tiny_photo_crops.safetensors"

register_model_alias(
    "demo",
    ModelAlias(
        DEMO_MODEL,
        DEMO_MODEL_KWARGS,
        DEMO_WEIGHTS,
        description="embedded tiny ViT (32 px, 6 blocks) trained on the embedded photo-crops task: the training "
        "scripts' default backbone (not the backbone of the study demo's bank, tocom_hub.demo.demo_bank_path(): "
        "that one is study-backbone)",
        missing_hint="this install lacks the embedded demo weights (reinstall tocom-hub); pass a timm model name "
        "(with --model-kwargs / --checkpoint) or a saved model directory",
    ),
)
