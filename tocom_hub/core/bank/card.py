"""The model card of a bank (``README.md`` beside its files): its facts (:func:`bank_facts`, also ``tocom-hub info``)
rendered from ``tocom_hub/MODEL_CARD.md`` with Jinja2 (:func:`render_model_card`; ``save_pretrained`` writes it,
:func:`write_model_card`). No network: ``tocom_hub.hub.create_model_card`` wraps the text in a
``huggingface_hub.ModelCard``.

The card claims only what it can check: ``base_model`` (the Hub model the bank adapts) is set only when the
bank's backbone is that model (:func:`verified_base_model`: timm knows ``architecture.tag`` with a Hub id, the
pretrained tag is recorded, the training recipe, if any, loaded those weights, and the architecture's
dimensions are the bank's); the "Use it" snippet builds the model the bank was trained for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .config import CONFIG_NAME, LIBRARY_NAME, WEIGHTS_NAME, PathLike, model_dims
from .file import factor_names

__all__ = [
    "bank_facts",
    "render_model_card",
    "write_model_card",
    "verified_base_model",
    "MODEL_CARD_TEMPLATE",
    "CARD_NAME",
]

CARD_NAME = "README.md"
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "MODEL_CARD.md"
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


def _timm_pretrained(name: str) -> Any:
    """timm's pretrained config for ``"architecture.tag"``, or ``None`` when timm does not know that exact name."""
    try:
        from timm.models import get_pretrained_cfg

        return get_pretrained_cfg(name, allow_unregistered=True)
    except Exception:  # an architecture timm knows with another tag raises; an unknown name too
        return None


def verified_base_model(config: Any) -> Tuple[Optional[str], Optional[str]]:
    """``(Hub id, license)`` of the Hub model this bank's backbone really is, or ``(None, None)``.

    Needed: the config records an architecture *and* a pretrained tag (a bank trained on random or private
    weights records no tag), the training recipe (when there is one) says those timm weights were loaded
    (``weights: "timm-pretrained:<tag>"``) with no size-changing ``model_kwargs``, timm knows
    ``architecture.tag`` with a Hub id, and the architecture built on the ``meta`` device (no weights, no
    download) has the bank's ``embed_dim``, ``depth``, ``num_heads`` and attention width.
    """
    arch, tag = config.base_model, config.pretrained_tag
    if not arch or not tag:
        return None, None
    recipe = config.training_recipe if isinstance(config.training_recipe, dict) else {}
    if "weights" in recipe and recipe["weights"] != f"timm-pretrained:{tag}":
        return None, None
    kwargs = recipe.get("model_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - set(_RESOLUTION_KWARGS):
        return None, None  # e.g. embed_dim / depth / patch_size changed: not the Hub model's weights
    cfg = _timm_pretrained(f"{arch}.{tag}")
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None, None
    try:
        import timm

        with torch.device("meta"):
            dims = model_dims(timm.create_model(arch, pretrained=False))
    except Exception:  # not a model the bank layer can read: claim nothing
        return None, None
    want = (config.embed_dim, config.depth, config.num_heads, config.qkv_dim)
    if (dims["embed_dim"], dims["depth"], dims["num_heads"], dims["attn_dim"]) != want:
        return None, None
    return hub_id, getattr(cfg, "license", None) or None


_RESOLUTION_KWARGS = ("img_size",)  # model_kwargs that keep the Hub model's weights (timm resamples positions)


def _kwargs_source(kwargs: Mapping[str, Any]) -> str:
    return "".join(f", {k}={v!r}" for k, v in kwargs.items())


def _variant(config: Any) -> str:
    """The recipe's ``model_kwargs`` as ``"depth=6, embed_dim=96"`` (``""`` without them): how the backbone differs
    from the architecture's defaults."""
    recipe = config.training_recipe if isinstance(config.training_recipe, dict) else {}
    kwargs = recipe.get("model_kwargs")
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) if isinstance(kwargs, dict) else ""


def use_snippet_model(config: Any, hub_id: Optional[str]) -> Tuple[str, str]:
    """``(timm.create_model arguments, comment)`` for the card's "Use it" snippet: the model the bank was
    trained for (the verified Hub model with its weights; else the architecture with the recipe's
    ``model_kwargs`` or the bank's dimensions, whose weights the user supplies)."""
    arch = config.base_model
    recipe = config.training_recipe if isinstance(config.training_recipe, dict) else {}
    kwargs = recipe.get("model_kwargs") if isinstance(recipe.get("model_kwargs"), dict) else None
    if hub_id:
        extra = _kwargs_source({k: v for k, v in (kwargs or {}).items() if k in _RESOLUTION_KWARGS})
        return (
            f'"{config.base_model_id}", pretrained=True{extra}',
            "the Hub model this bank was trained for, or your fine-tune of it",
        )
    if not arch:
        return '"your_timm_vit"', "the backbone this bank was trained for (the bank does not record its name)"
    if kwargs is None:
        kwargs = dict(embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads)
    weights = recipe.get("weights")
    where = f" ({weights})" if isinstance(weights, str) and weights else ""
    note = f"the backbone this bank was trained for: load its weights{where}, or your fine-tune's, into it"
    return f'"{arch}", pretrained=False{_kwargs_source(kwargs)}', note


def render_model_card(
    bank: nn.Module,
    *,
    repo_id: Optional[str] = None,
    path: Optional[PathLike] = None,
    license: Optional[str] = None,
    template_path: Optional[PathLike] = None,
) -> str:
    """The model card of ``bank`` as Markdown with YAML front matter, rendered from ``tocom_hub/MODEL_CARD.md``.

    Front matter: ``library_name: tocom-hub``, ``base_model`` (+ ``base_model_relation: adapter``) only when
    :func:`verified_base_model` finds it, ``tags``, ``license`` (``license=``, else the verified backbone's weights
    license, else ``apache-2.0``), ``pipeline_tag``, ``datasets`` (the recipe's); the body gets the bank's facts
    (:func:`bank_facts`; ``path``: its folder or file, for the size on disk), its file and tensor names, the
    recipe and evaluation tables, and a "Use it" snippet that loads the bank from ``repo_id`` (a Hub repo id or a
    local path) onto the model it was trained for. Example::

        text = render_model_card(bank, repo_id="my-org/tocom-deit-base")
    """
    import jinja2
    import yaml

    from ... import __version__

    cfg = bank.config
    facts = bank_facts(bank, path)
    base_name = facts["base_model"]
    base_hub_id, base_license = verified_base_model(cfg)
    recipe = facts["training_recipe"] if isinstance(facts["training_recipe"], dict) else {}
    dataset = recipe.get("dataset") if isinstance(recipe.get("dataset"), str) else None
    method = facts["method"]
    tags = ["tocom", "token-compression", "token-merging" if method == "tome" else "token-pruning", method]
    front: Dict[str, Any] = {"library_name": LIBRARY_NAME}
    if base_hub_id:
        front.update(base_model=base_hub_id, base_model_relation="adapter")
    front.update(license=license or base_license or "apache-2.0", tags=tags + ["lora", "timm", "vision-transformer"])
    front["pipeline_tag"] = "image-classification"
    if dataset:
        front["datasets"] = [dataset]
    create_args, create_note = use_snippet_model(cfg, base_hub_id)
    down, up = factor_names(cfg.format_version)
    template = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATE
    return jinja2.Template(template.read_text(encoding="utf-8")).render(
        card_data=yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(),
        repo_id=repo_id or "org/name",
        base_model_name=base_name,
        base_model_hub_id=base_hub_id,
        base_model_variant="" if base_hub_id else _variant(cfg),
        create_model_args=create_args,
        create_model_note=create_note,
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
        weights_name=WEIGHTS_NAME,
        config_name=CONFIG_NAME,
        card_name=CARD_NAME,
        down_name=down,
        up_name=up,
        tensor_names=", ".join(f"`{n}.{t}`" for t in cfg.targets for n in (down, up)),
        training_recipe_table=_markdown_table(facts["training_recipe"], "setting"),
        eval_table=_markdown_table(facts["eval_results"]),
        tocom_hub_version=__version__,
    )


def write_model_card(bank: nn.Module, folder: PathLike, **card: Any) -> str:
    """Write :func:`render_model_card` (``card``: its keyword arguments) as ``README.md`` into ``folder``, whose
    bank files give the size on disk; returns the path."""
    from ..jsonio import atomic_write_bytes

    out = Path(folder) / CARD_NAME
    atomic_write_bytes(out, render_model_card(bank, path=folder, **card).encode("utf-8"))
    return str(out)
