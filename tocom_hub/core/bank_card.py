"""The model card of a bank: its facts (:func:`bank_facts`, also ``tocom-hub info``) rendered from
``tocom_hub/MODEL_CARD.md`` with ``huggingface_hub.ModelCard``, and the folder ``push_to_hub`` uploads
(:func:`write_upload_folder`). No network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch import nn

from .bank_config import LIBRARY_NAME, WEIGHTS_NAME, PathLike

__all__ = ["bank_facts", "create_model_card", "write_upload_folder", "MODEL_CARD_TEMPLATE", "CARD_NAME"]

CARD_NAME = "README.md"
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "MODEL_CARD.md"
_METHOD_NAMES = {"tome": "ToMe token merging", "evit": "EViT token pruning"}


def _format_size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def bank_facts(bank: nn.Module, path: Optional[PathLike] = None) -> Dict[str, Any]:
    """What a bank is, as a JSON-able dict (used by the model card and ``tocom-hub info``).

    ``size_bytes`` is the size of ``tocom.safetensors`` when ``path`` (its file or directory) is given,
    else the bytes of the tensors alone.
    """
    cfg = bank.config
    if path is not None:
        p = Path(path)
        size = (p / WEIGHTS_NAME if p.is_dir() else p).stat().st_size
    else:
        size = sum(t.numel() * t.element_size() for t in bank.state_dict().values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in bank.state_dict().values()})
    return {
        "base_model": cfg.base_model_id,
        "method": cfg.method,
        "r_min": 0,
        "r_max": cfg.r_max,
        "rank": cfg.rank,
        "targets": list(cfg.targets),
        "num_parameters": bank.num_parameters(),
        "size_bytes": int(size),
        "dtype": ", ".join(dtypes),
        "scale": cfg.scale,
        "format_version": cfg.format_version,
        "embed_dim": cfg.embed_dim,
        "attn_dim": cfg.qkv_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "training_recipe": cfg.training_recipe,
        "eval_results": cfg.eval_results,
    }


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_table(obj: Any, key_header: str = "") -> str:
    """Render free-form facts: a flat dict as key/value rows, a dict of dicts or a list of dicts as a
    table with one column per key, anything else as a JSON block. ``""`` for ``None``/empty."""
    if obj is None or (isinstance(obj, (dict, list)) and not obj):
        return ""
    rows: Optional[List[Tuple[str, Mapping[str, Any]]]] = None
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        rows = [("", r) for r in obj]
        key_header = ""
    elif isinstance(obj, dict) and all(isinstance(v, dict) for v in obj.values()):
        rows = [(str(k), v) for k, v in obj.items()]
    if rows is not None:
        cols: List[str] = []
        for _, r in rows:
            cols += [c for c in r if c not in cols]
        lead = [key_header or " "] if key_header or any(k for k, _ in rows) else []
        lines = ["| " + " | ".join(lead + [_cell(c) for c in cols]) + " |", "|" + "---|" * (len(lead) + len(cols))]
        for k, r in rows:
            lines.append("| " + " | ".join(([_cell(k)] if lead else []) + [_cell(r.get(c, "")) for c in cols]) + " |")
        return "\n".join(lines)
    if isinstance(obj, dict):
        head = f"| {key_header} | value |" if key_header else "| | |"
        lines = [head, "|---|---|"] + [f"| {_cell(k)} | {_cell(v)} |" for k, v in obj.items()]
        return "\n".join(lines)
    return "```json\n" + json.dumps(obj, indent=2, default=str) + "\n```"


def _timm_hub_id(name: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """``(hf_hub_id, license)`` timm knows for pretrained name ``name``, or ``(None, None)``."""
    if not name:
        return None, None
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:
        return None, None
    if cfg is None:
        return None, None
    return getattr(cfg, "hf_hub_id", None) or None, getattr(cfg, "license", None) or None


def create_model_card(
    bank: nn.Module,
    *,
    repo_id: Optional[str] = None,
    path: Optional[PathLike] = None,
    license: Optional[str] = None,
    template_path: Optional[PathLike] = None,
):
    """A ``huggingface_hub.ModelCard`` for ``bank``, rendered from ``tocom_hub/MODEL_CARD.md`` (Jinja2).

    Front matter: ``library_name: tocom-hub``, ``base_model`` (the backbone's timm Hub id, when timm
    knows it), ``tags``, ``license`` (``license=``, else the backbone's weights license timm reports,
    else ``apache-2.0``), ``pipeline_tag: image-classification``; the body gets the bank's facts
    (:func:`bank_facts`), its training recipe and evaluation table when the config carries them.
    Example::

        card = tocom_hub.hub.create_model_card(bank, repo_id="my-org/tocom-deit-base")
        card.save("out/bank/README.md")
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .. import __version__

    facts = bank_facts(bank, path)
    base_name = facts["base_model"]
    base_hub_id, base_license = _timm_hub_id(base_name)
    recipe = facts["training_recipe"] if isinstance(facts["training_recipe"], dict) else {}
    dataset = recipe.get("dataset") if isinstance(recipe.get("dataset"), str) else None
    method = facts["method"]
    tags = [
        "tocom",
        "token-compression",
        "token-merging" if method == "tome" else "token-pruning",
        method,
        "lora",
        "timm",
        "vision-transformer",
    ]
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base_hub_id,
        base_model_relation="adapter" if base_hub_id else None,
        license=license or base_license or "apache-2.0",
        tags=tags,
        pipeline_tag="image-classification",
        datasets=[dataset] if dataset else None,
    )
    template = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATE
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        repo_id=repo_id or "org/name",
        base_model_name=base_name,
        base_model_hub_id=base_hub_id,
        method=method,
        method_name=_METHOD_NAMES.get(method, method),
        r_min=0,
        r_max=facts["r_max"],
        rank=facts["rank"],
        targets=", ".join(facts["targets"]),
        num_parameters=f"{facts['num_parameters']:,}",
        size=_format_size(facts["size_bytes"]),
        size_bytes=f"{facts['size_bytes']:,}",
        dtype=facts["dtype"],
        scale=facts["scale"],
        format_version=facts["format_version"],
        embed_dim=facts["embed_dim"],
        depth=facts["depth"],
        num_heads=facts["num_heads"],
        training_recipe_table=_markdown_table(facts["training_recipe"], "setting"),
        eval_table=_markdown_table(facts["eval_results"]),
        tocom_hub_version=__version__,
    )


def write_upload_folder(
    bank: nn.Module, folder: PathLike, *, repo_id: str, dtype: Any = None, license: Optional[str] = None
) -> None:
    """Write what ``push_to_hub`` uploads into ``folder``: ``tocom.safetensors``, ``tocom_config.json`` and the
    ``README.md`` model card, whose facts are those of the files as written (their dtype and format version)."""
    bank.save_pretrained(folder, dtype=dtype)
    card = create_model_card(type(bank).from_pretrained(folder), repo_id=repo_id, path=folder, license=license)
    card.save(os.path.join(folder, CARD_NAME))
