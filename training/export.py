"""What ``finetune.py`` hands on: the fine-tuned model in timm's ``save_for_hf`` layout.

``config.json`` (timm's: ``architecture``, ``model_args``, ``pretrained_cfg``; plus the recipe under
``"tocom_finetune"``) next to ``model.safetensors`` (the recipe also in its metadata, so the file alone
describes itself) and, for AdaptFormer models, ``adaptformer.safetensors``. The package's model loader,
:func:`tocom_hub.tools.models.load_model`, rebuilds the model from these files, adapters included.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from tocom_hub.tools.models import ADAPTERS_FILE, FINETUNE_FORMAT, FINETUNE_KEY

__all__ = ["save_finetuned"]


def save_finetuned(
    model: nn.Module,
    output_dir: str,
    recipe: Dict[str, Any],
    *,
    adapters: Optional[nn.Module] = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write ``model`` (a timm model, patched or not) and its ``adapters`` into ``output_dir``.

    The weights are stored in ``dtype``; ``recipe`` (JSON-serialisable values; others are written as
    strings) is recorded with ``"format_version"``. Example::

        save_finetuned(model, "out/ft-r0", {"method": "tome", "source_r": 0, "mode": "full"})
        model, info = tocom_hub.tools.models.load_model("out/ft-r0")   # info["recipe"] is the recipe
    """
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf  # what timm.models.save_for_hf writes next to the weights

    recipe = json.loads(json.dumps({"format_version": FINETUNE_FORMAT, **recipe}, default=str))
    meta = {"format": "pt", FINETUNE_KEY: json.dumps(recipe, sort_keys=True)}
    os.makedirs(output_dir, exist_ok=True)
    weights = os.path.join(output_dir, "model.safetensors")
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}, weights, meta)
    os.chmod(weights, 0o644)
    if adapters is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in adapters.state_dict().items()}
        save_file(tensors, os.path.join(output_dir, ADAPTERS_FILE), meta)
    save_config_for_hf(model, os.path.join(output_dir, "config.json"), model_config={FINETUNE_KEY: recipe})
