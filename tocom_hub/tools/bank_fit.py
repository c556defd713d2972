"""Does a ToCom bank belong to this model? The check behind the warnings of ``tocom-hub eval`` / ``visualize``,
:func:`tocom_hub.tools.evaluation.evaluate` and ``training/evaluate.py``.

A bank learns to compensate one backbone. Applied to another one of the same shape it runs without error
and changes little or nothing — the silent failure this module turns into a warning. It compares what the
bank records (``base_model``, ``pretrained_tag``, and its training recipe's backbone weights: the SHA-256 of
``--checkpoint`` or timm's pretrained tag) with the model:

* the **architecture**: the bank's ``base_model`` against the model's ``pretrained_cfg["architecture"]``;
* the **pretrained tag**, when the bank records one, against the model's ``pretrained_cfg["tag"]``;
* the **weights lineage**, when both sides know it (:func:`model_lineage`): the weights files the model was
  built from and the backbone it was fine-tuned from (a ``training/finetune.py`` recipe). A model fine-tuned
  from the bank's backbone matches; a model from another pre-training does not.

Unknown on either side (a random-init model, a bank converted without a recipe) is not a mismatch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Set

from torch import nn

__all__ = ["bank_lineage", "model_lineage", "backbone_mismatch", "sha256_file"]


def sha256_file(path: os.PathLike) -> str:
    """Hex SHA-256 of the file at ``path`` (what ``training/*.py`` record as ``checkpoint_sha256``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _arch(name: Optional[str]) -> Optional[str]:
    """``vit_tiny_patch16_224`` for ``timm/vit_tiny_patch16_224.augreg_in21k`` / ``hf-hub:timm/…`` / the bare name."""
    if not name:
        return None
    name = name.split(":", 1)[1] if name.startswith("hf-hub:") else name
    name = name[len("timm/") :] if name.startswith("timm/") else name
    return name.split(".", 1)[0] or None


def bank_lineage(bank: Any) -> Set[str]:
    """What the bank's backbone weights were: ``{"sha256:<hex>"}`` (a ``--checkpoint`` file) and/or
    ``{"timm:<arch>.<tag>"}`` (timm's pretrained weights); empty when the bank does not record it."""
    cfg = bank.config
    recipe = cfg.training_recipe if isinstance(getattr(cfg, "training_recipe", None), dict) else {}
    out = set()
    if recipe.get("checkpoint_sha256"):
        out.add(f"sha256:{recipe['checkpoint_sha256']}")
    weights = recipe.get("weights")
    if isinstance(weights, str) and weights.startswith("timm-pretrained:") and cfg.base_model:
        out.add(f"timm:{_arch(cfg.base_model)}.{weights.split(':', 1)[1]}")
    elif cfg.pretrained_tag and cfg.base_model and not recipe.get("checkpoint_sha256"):
        out.add(f"timm:{_arch(cfg.base_model)}.{cfg.pretrained_tag}")
    return out


def _weights_files(weights: Any) -> Iterable[Path]:
    if not isinstance(weights, (str, os.PathLike)):
        return []
    p = Path(weights)
    if p.is_dir():
        return [f for f in (p / "model.safetensors", p / "pytorch_model.bin") if f.is_file()][:1]
    return [p] if p.is_file() else []


def model_lineage(model: nn.Module, info: Dict[str, Any]) -> Set[str]:
    """The weights ``model`` descends from, from :func:`~tocom_hub.tools.models.load_model`'s ``info``: the SHA-256
    of its weights file(s), the backbone its fine-tuning recipe started from, or timm's pretrained tag;
    plus ``info["lineage"]`` where a loader records it (the embedded study models). Empty: unknown."""
    out = set(info.get("lineage") or ())
    for f in _weights_files(info.get("weights")):
        out.add(f"sha256:{sha256_file(f)}")
    recipe = info.get("recipe") if isinstance(info.get("recipe"), dict) else {}
    if recipe.get("checkpoint_sha256"):
        out.add(f"sha256:{recipe['checkpoint_sha256']}")
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
    rw = recipe.get("weights")
    if isinstance(rw, str) and rw.startswith("timm-pretrained:"):
        out.add(f"timm:{_arch(recipe.get('model'))}.{rw.split(':', 1)[1]}")
    if str(info.get("weights", "")).startswith("timm-pretrained") and tag:
        out.add(f"timm:{_arch(info.get('model'))}.{tag}")
    return out


def _bank_id(cfg: Any) -> str:
    return f"{cfg.base_model}.{cfg.pretrained_tag}" if cfg.pretrained_tag else str(cfg.base_model)


def _short(tokens: Set[str]) -> str:
    return ", ".join(sorted(t[:19] + "…" if t.startswith("sha256:") else t for t in tokens))


def backbone_mismatch(bank: Any, model: nn.Module, lineage: Optional[Set[str]] = None) -> Optional[str]:
    """One sentence saying how the bank's recorded backbone differs from ``model`` (``None``: no known difference).

    ``lineage`` is :func:`model_lineage`'s set for the model (``None``: compare architecture and tag only).
    """
    cfg = bank.config
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    have, want = _arch(pcfg.get("architecture")), _arch(cfg.base_model)
    if have and want and have != want:
        return (
            f"the bank was trained for {_bank_id(cfg)} but the model is a {have}; its compensation is "
            f"for another backbone (expect no gain, or a loss)"
        )
    if cfg.pretrained_tag and pcfg.get("tag") and pcfg.get("tag") != cfg.pretrained_tag:
        return (
            f"the bank was trained for {_bank_id(cfg)} but the model's pretrained tag is "
            f"{pcfg.get('tag')!r}; its compensation is for other weights (expect no gain, or a loss)"
        )
    theirs = bank_lineage(bank)
    if lineage and theirs and not (lineage & theirs):
        return (
            f"the bank was trained on other backbone weights ({_short(theirs)}) than this model's "
            f"({_short(lineage)}): same architecture, another "
            f"pre-training, so expect no gain, or a loss; pair the bank with the model it was trained for"
        )
    return None
