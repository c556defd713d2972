"""The backbone a training run starts from: the embedded default, or ``--model`` / ``--checkpoint``.

Built by the package's one model loader, :func:`tocom_hub.demo.models.load_model`; this module only
maps the training flags onto it and records what was loaded (for recipes, resume checks and the bank).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Tuple

import torch

from tocom_hub.demo.models import DEMO_MODEL, DEMO_MODEL_KWARGS, DEMO_WEIGHTS
from tocom_hub.training.checkpoints import sha256_file

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_MODEL_KWARGS",
    "EMBEDDED_DATA",
    "EMBEDDED_DOWNSTREAM_DATA",
    "EMBEDDED_CHECKPOINT",
    "EMBEDDED_R_MAX",
    "build_backbone",
]

# the embedded default backbone: a 6-block, 96-dim, 3-head timm ViT on 32 px images (64 patches of
# 4 px + class token), pre-trained on the embedded "photo-crops" task. Its weights ship with the
# package (1.4 MB, fp16); `training/finetune.py --data photo-crops --from-scratch ...` rebuilds them
# (the exact command is in the file's metadata and in README.md).

EMBEDDED_MODEL = DEMO_MODEL
EMBEDDED_MODEL_KWARGS: Dict[str, Any] = DEMO_MODEL_KWARGS
EMBEDDED_DATA = "photo-crops"
EMBEDDED_DOWNSTREAM_DATA = "photo-orientation"
EMBEDDED_CHECKPOINT = DEMO_WEIGHTS
# R such that >= ~90 % of the 64 patch tokens are merged by the last of the 6 blocks
# (65 → 55 → 45 → 35 → 25 → 15 → 8 tokens with ToMe; DeiT-B at r = 16 merges 192 of 196).
EMBEDDED_R_MAX = 10


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    from timm.models import load_state_dict

    try:
        sd = load_state_dict(path, use_ema=False, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: cannot read a state_dict ({type(e).__name__}: {e}); expected a .safetensors file or a "
            f"torch file saved with torch.save(model.state_dict()) (loaded with weights_only=True)"
        ) from None
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}


def build_backbone(
    args: argparse.Namespace, num_classes: Optional[int] = None, drop_path: Optional[float] = None
) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The timm backbone described by ``--model / --model-kwargs / --pretrained / --checkpoint``.

    ``num_classes=None`` keeps the checkpoint's (or timm's pretrained) classifier; an int replaces the
    head when it differs (``reset_classifier``). Returns ``(model, info)``; ``info`` records what was
    built and from which weights (for recipes and the bank config).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    embedded = args.model is None
    name = EMBEDDED_MODEL if embedded else args.model
    kwargs: Dict[str, Any] = dict(EMBEDDED_MODEL_KWARGS) if embedded else {}
    kwargs.update(args.model_kwargs or {})
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    checkpoint = args.checkpoint
    if embedded and checkpoint is None and not getattr(args, "from_scratch", False):
        checkpoint = str(EMBEDDED_CHECKPOINT)
        if not EMBEDDED_CHECKPOINT.is_file():
            raise FileNotFoundError(
                f"the embedded backbone weights are missing ({EMBEDDED_CHECKPOINT}); rebuild them with the "
                f"command in README.md ('Embedded default backbone') or pass --checkpoint"
            )
    state_dict = _read_state_dict(checkpoint) if checkpoint else None
    ckpt_classes: Optional[int] = None
    if state_dict is not None:
        head = state_dict.get("head.weight")
        ckpt_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 0
    build_classes = ckpt_classes if ckpt_classes is not None else num_classes
    create_kwargs = dict(kwargs)
    if build_classes is not None:
        create_kwargs["num_classes"] = build_classes
    dp = args.drop_path if drop_path is None else drop_path
    model = timm.create_model(name, pretrained=bool(args.pretrained), drop_path_rate=dp, **create_kwargs)
    if state_dict is not None:
        if isinstance(model, VisionTransformer):
            state_dict = checkpoint_filter_fn(state_dict, model)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} does not fit {name} {kwargs}: missing keys {missing[:6]}"
                f"{'…' if len(missing) > 6 else ''}, unexpected keys {unexpected[:6]}"
                f"{'…' if len(unexpected) > 6 else ''}; pass the matching "
                f"--model / --model-kwargs"
            )
    if num_classes is not None and model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    info = {
        "model": name,
        "model_kwargs": kwargs,
        "embedded": embedded,
        "weights": ("timm-pretrained:" + str(model.pretrained_cfg.get("tag")))
        if args.pretrained
        else (f"file:{os.path.basename(checkpoint)}" if checkpoint else "random-init"),
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "num_classes": int(model.num_classes),
    }
    return model, info
