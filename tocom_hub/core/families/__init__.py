"""Model families: one adapter per timm model / block type, found through one table (:data:`FAMILIES`).

Adding a family is one module here (its :class:`~.base.Family` subclass and reduced block classes) and
one row in :data:`FAMILIES`; the reduction step, the per-forward context and ``patch`` stay as they are.
Models outside every family get a ``TypeError`` with the true reason (:data:`UNSUPPORTED`).
"""

from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from .base import Family
from .beit import BeitFamily
from .cait import CaitFamily
from .eva import EvaFamily
from .gemma4 import Gemma4Family
from .naflex import NaFlexFamily
from .qwen3 import Qwen3Family
from .relpos import RelPosFamily
from .vit import ViTFamily

__all__ = ["FAMILIES", "UNSUPPORTED", "find_family", "patched_block_classes"]

# model class → family adapter class (a subclass of a listed model class belongs to its family)
FAMILIES: Dict[type, type] = {
    cls: fam
    for fam in (ViTFamily, EvaFamily, BeitFamily, RelPosFamily, CaitFamily, NaFlexFamily, Qwen3Family, Gemma4Family)
    for cls in fam.model_classes
}

# timm model / block class name → why it is not supported (checked along the model's MRO and its blocks)
_HIERARCHICAL = "a hierarchical model: its stages pool or window the token grid, which merged tokens no longer form"
UNSUPPORTED: Dict[str, str] = {
    **{
        n: _HIERARCHICAL
        for n in (
            "SwinTransformer",
            "SwinTransformerV2",
            "SwinTransformerV2Cr",
            "Hiera",
            "MultiScaleVit",
            "Levit",
            "LevitDistilled",
            "PoolingVisionTransformer",
            "CrossVit",
            "Xcit",
            "VOLO",
            "Twins",
            "PyramidVisionTransformerV2",
        )
    },  # fmt: skip
    "VisionTransformerSAM": "windowed attention (SAM): windows need the full token grid",
}


def _family_class(model: nn.Module) -> Optional[type]:
    for cls in type(model).__mro__:
        if cls in FAMILIES:
            return FAMILIES[cls]
    return None


def find_family(model: nn.Module, positions: str = "keep") -> Family:
    """The family adapter for ``model`` (checked: every block and attention is covered), or ``TypeError``."""
    name = type(model).__name__
    reason = next((UNSUPPORTED[c.__name__] for c in type(model).__mro__ if c.__name__ in UNSUPPORTED), None)
    fam_cls = _family_class(model)
    if fam_cls is None:
        why = reason or "not a model of a supported family"
        raise TypeError(f"tocom_hub cannot patch {name}: {why} (supported: {', '.join(sorted(supported_names()))})")
    blocks = fam_cls.model_blocks(model)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise TypeError(f"{name}: expected `model.blocks` to be a non-empty sequence of transformer blocks")
    family = fam_cls(model)
    known = set(family.blocks) | set(family.blocks.values())
    for i, blk in enumerate(blocks):
        if type(blk) not in known:
            sub = type(blk).__name__
            for part in (blk, getattr(blk, "attn", None)):
                why = UNSUPPORTED.get(type(part).__name__) if part is not None else None
                if why:
                    break
            why = why or f"not a block type of the {family.name} family"
            raise TypeError(f"{name}: block {i} is {sub}: {why}")
    family.check(model, positions)
    return family


def supported_names():
    return {cls.__name__ for cls in FAMILIES}


def patched_block_classes() -> Dict[type, type]:
    """``{reduced block class: timm block class}`` over every family (for ``unpatch``)."""
    return {new: old for fam in set(FAMILIES.values()) for old, new in fam.blocks.items()}
