"""The backbone a training run starts from: the embedded default, or ``--model`` / ``--checkpoint``.

Built by the package's one model loader, :func:`tocom_hub.tools.models.load_model`; this module only
maps the training flags onto it and records what was loaded (for recipes, resume checks and the bank).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Tuple

import torch

from tocom_hub.demo.models import DEMO_MODEL, DEMO_MODEL_KWARGS, DEMO_WEIGHTS
from tocom_hub.tools.models import load_model, read_state_dict
from tocom_hub.training.checkpoints import sha256_file

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_MODEL_KWARGS",
    "EMBEDDED_DATA",
    "EMBEDDED_DOWNSTREAM_DATA",
    "EMBEDDED_CHECKPOINT",
    "EMBEDDED_R_MAX",
    "BackboneError",
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


class BackboneError(ValueError):
    """``--model`` / ``--checkpoint`` do not give a model (unknown name, unreadable or misfitting weights):
    the training scripts print the one-line message and exit 1."""


def _checkpoint_classes(path: str) -> int:
    """The classifier size of the weights file ``path`` (0: it has no ``head.weight``, a head-less backbone)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:  # reads the header only
                keys = set(f.keys())
                name = next((k for k in ("head.weight", "module.head.weight") if k in keys), None)
                shape = f.get_slice(name).get_shape() if name else []
        except Exception:
            return _state_dict_classes(path)  # let the loader's reader say what is wrong with the file
        return int(shape[0]) if len(shape) == 2 else 0
    return _state_dict_classes(path)


def _state_dict_classes(path: str) -> int:
    head = read_state_dict(path).get("head.weight")
    return int(head.shape[0]) if head is not None and head.ndim == 2 else 0


def build_backbone(
    args: argparse.Namespace, num_classes: Optional[int] = None, drop_path: Optional[float] = None
) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The timm backbone described by ``--model / --model-kwargs / --pretrained / --checkpoint``.

    Loaded by :func:`tocom_hub.tools.models.load_model` (so ``--model`` also takes what it takes: a model
    alias or a saved model directory). ``num_classes=None`` keeps the checkpoint's (or timm's pretrained)
    classifier, a head-less checkpoint builds a head-less model; an int replaces the head when it differs
    (``reset_classifier``). Returns ``(model, info)`` in train mode; ``info`` records what was built and
    from which weights (for recipes and the bank config).
    """
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
    create = dict(kwargs, drop_path_rate=args.drop_path if drop_path is None else drop_path)
    try:
        build_classes = _checkpoint_classes(checkpoint) if checkpoint else num_classes
        if build_classes is not None:
            create["num_classes"] = build_classes
        loaded = load_model(name, model_kwargs=create, pretrained=bool(args.pretrained), checkpoint=checkpoint)
    except (ValueError, TypeError, OSError) as e:  # unknown name, bad kwargs, unreadable / misfitting weights
        raise BackboneError(f"cannot build the backbone: {' '.join(str(e).split())}") from None
    except RuntimeError as e:
        if not args.pretrained:
            raise
        raise BackboneError(f"cannot build the backbone: {' '.join(str(e).split())}") from None
    model = loaded.model
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
        "family": _family_name(model),
    }
    return model.train(), info


def _family_name(model: torch.nn.Module) -> Optional[str]:
    """The tocom_hub family adapter of ``model`` (``"vit"``, ``"eva"``, ...), or ``None`` if none covers it
    (``patch`` then says why)."""
    from tocom_hub.core.families import find_family

    try:
        return find_family(model).name
    except TypeError:
        return None
