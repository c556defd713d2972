"""Build the model a tool runs on from one ``NAME_OR_PATH`` string (``tocom-hub eval/bench/visualize``).

``NAME_OR_PATH`` is resolved in this order (first match wins):

1. **an alias** registered with :func:`register_model_alias` (in :data:`MODEL_ALIASES`). ``tocom_hub.demo``
   registers ``demo``, the embedded tiny ViT (:mod:`tocom_hub.demo.models`).
2. **a saved model directory**:

   * timm's own export layout — ``config.json`` (``architecture``, ``num_classes``, ``model_args`` =
     the ``timm.create_model`` keyword arguments, ``pretrained_cfg`` = preprocessing) next to
     ``model.safetensors`` (or ``pytorch_model.bin``). Write one with
     ``timm.models.save_for_hf(model, "my-model", safe_serialization=True)`` (``timm.models.push_to_hf_hub``
     uploads the same files); it is rebuilt with ``timm.create_model("local-dir:my-model", pretrained=True)``.
   * an output directory of ``training/finetune.py`` — the same layout, with the fine-tuning recipe
     (``method``, ``source_r``, ``mode``, …) under ``config.json``'s ``"tocom_finetune"`` and, for
     AdaptFormer models, ``adaptformer.safetensors`` (attached with their hooks).
3. **a weights file** (``.safetensors``) that describes itself: one written by ``finetune.py``
   (its metadata holds the recipe) or one lying next to a timm ``config.json``.
4. **a timm model name** (``timm.list_models()``) or ``hf-hub:org/name``, built with
   ``pretrained=False`` unless ``pretrained=True`` (which needs the network or a filled Hugging Face
   cache); ``checkpoint=FILE`` then loads a state dict (``.safetensors``, or a torch file read with
   ``weights_only=True``; ``model`` / ``state_dict`` nesting and ``module.`` prefixes are unwrapped).

``model_kwargs`` (e.g. ``{"img_size": 64, "depth": 2}``) go to ``timm.create_model`` in every case;
``num_classes`` defaults to the classifier size found in the weights.
Example::

    from tocom_hub.tools.models import load_model
    model, info = load_model("vit_tiny_patch16_224", model_kwargs={"img_size": 64, "depth": 2})
    model, info = load_model("out/my-model")          # config.json + model.safetensors
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from .images import eval_transform, model_img_size

__all__ = [
    "LoadedModel",
    "ModelAlias",
    "MODEL_ALIASES",
    "register_model_alias",
    "load_model",
    "read_state_dict",
    "model_img_size",
    "eval_transform",
    "FINETUNE_KEY",
    "FINETUNE_FORMAT",
    "ADAPTERS_FILE",
]

PathLike = Union[str, os.PathLike]

# A fine-tuned model (training/finetune.py) is timm's save_for_hf layout: config.json (with the recipe under
# FINETUNE_KEY, "format_version": FINETUNE_FORMAT) + model.safetensors (the recipe also in its metadata) and,
# for AdaptFormer models, ADAPTERS_FILE.
FINETUNE_KEY = "tocom_finetune"
FINETUNE_FORMAT = 2
ADAPTERS_FILE = "adaptformer.safetensors"


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns: unpacks as ``model, info = load_model(...)`` and reads as
    ``load_model(...).model`` / ``.info``."""

    model: nn.Module
    info: Dict[str, Any]


@dataclass
class ModelAlias:
    """A short name for a timm model + keyword arguments + a weights file (e.g. ``demo``).

    ``weights`` is a path (or a callable returning one, resolved when the alias is used, e.g. a
    ``hf_hub_download``); ``missing_hint`` completes the error when the file does not exist. ``loader``
    (instead of ``weights``) builds a model that is more than a timm model and a file — e.g. the study
    demo's AdaptFormer models — and returns ``(model, info)``.
    """

    model: str
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    weights: Union[PathLike, Callable[[], PathLike], None] = None
    description: str = ""
    missing_hint: str = ""
    loader: Optional[Callable[[], Tuple[nn.Module, Dict[str, Any]]]] = None


MODEL_ALIASES: Dict[str, ModelAlias] = {}


def register_model_alias(name: str, alias: ModelAlias, *, overwrite: bool = False) -> None:
    """Make ``name`` usable wherever a model name is, e.g. ``tocom-hub eval --model name``. Example::

    register_model_alias("my-vit", ModelAlias("vit_small_patch16_224", {"num_classes": 10}, "w.safetensors"))
    model, info = load_model("my-vit")
    """
    if not overwrite and name in MODEL_ALIASES:
        raise ValueError(f"model alias {name!r} is already registered (pass overwrite=True to replace it)")
    MODEL_ALIASES[name] = alias


# ---------------------------------------------------------------------------------------------------
# helpers


def _looks_like_path(s: str) -> bool:
    return (
        os.sep in s
        or (os.altsep or "\0") in s
        or s.startswith(".")
        or s.startswith("~")
        or s.endswith((".safetensors", ".pth", ".pt", ".bin", ".json"))
    ) and not s.startswith("hf-hub:")


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The state dict in ``path`` (``.safetensors``, or a torch file read with ``weights_only=True``);
    ``model`` / ``state_dict`` nesting and ``module.`` prefixes are unwrapped."""
    from timm.models import load_state_dict

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path} (expected a .safetensors or torch state_dict file)")
    try:
        sd = load_state_dict(path, use_ema=False, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: cannot read a state dict ({type(e).__name__}: {' '.join(str(e).split())}); "
            f"expected a .safetensors file or a torch.save(model.state_dict()) file"
        ) from None
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}


def _head_classes(sd: Dict[str, torch.Tensor], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``kwargs`` with ``num_classes`` taken from the state dict's classifier when not given."""
    head = sd.get("head.weight")
    if "num_classes" not in kwargs and head is not None and head.ndim == 2:
        kwargs = dict(kwargs, num_classes=int(head.shape[0]))
    return kwargs


# Not timm.create_model(checkpoint_path=...) / pretrained_cfg_overlay=dict(file=...), measured with timm 1.0.31 on the
# demo weights: checkpoint_path= skips checkpoint_filter_fn (at img_size 48: pos_embed size mismatch), the overlay
# re-initialised the 3-class head (its cfg says 1000 classes), and both raise a multi-line RuntimeError on a misfit.
def _load_weights(model: nn.Module, path: PathLike, name: str, sd: Optional[Dict[str, torch.Tensor]] = None) -> None:
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    sd = read_state_dict(path) if sd is None else sd
    if isinstance(model, VisionTransformer):
        sd = checkpoint_filter_fn(sd, model)  # timm's remapping (pos-embed resize, …)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:

        def few(keys):
            return f"{list(keys)[:4]}{' …' if len(keys) > 4 else ''}"

        raise ValueError(
            f"{path} does not fit {name}: missing keys {few(missing)}, unexpected keys "
            f"{few(unexpected)}; pass the matching model name / --model-kwargs"
        )


def _create(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise TypeError(f"timm.create_model({name!r}) rejected the model kwargs {kwargs}: {e}") from None
    except (OSError, RuntimeError) as e:
        if pretrained:
            raise RuntimeError(
                f"cannot load timm's pretrained weights for {name!r} ({type(e).__name__}: {e}); "
                f"offline, set HF_HUB_OFFLINE=1 to use the cache only, or drop --pretrained and pass --checkpoint FILE"
            ) from None
        raise


def _finetune_safetensors_recipe(path: Path) -> Optional[Dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None
    text = meta.get(FINETUNE_KEY)
    return json.loads(text) if text else None


def _with_recipe(model: nn.Module, info: Dict[str, Any], recipe: Dict[str, Any], adapters: Path, required: bool):
    """Record ``recipe`` in ``info`` and attach the AdaptFormer adapters it names (``adapters``)."""
    info.update(method=recipe.get("method"), source_r=recipe.get("source_r"), recipe=recipe)
    if recipe.get("mode") != "adaptformer":
        return
    if not adapters.is_file():
        if required:
            raise FileNotFoundError(f"{adapters} is missing: the model was fine-tuned with AdaptFormer adapters")
        return
    from safetensors.torch import load_file

    from .adaptformer import AdaptFormer

    af = AdaptFormer.for_model(model, bottleneck=recipe["adapter_bottleneck"], scale=recipe["adapter_scale"])
    af.load_state_dict(load_file(str(adapters)))
    af.attach(model)
    model._tocom_adaptformer = af  # keep the adapters alive with the model
    info["adaptformer"] = str(adapters)


def _from_finetune(recipe: Dict[str, Any], weights: Path, kwargs: Dict[str, Any], source: str):
    """A ``.safetensors`` file written by finetune.py on its own: its metadata's recipe names the timm model
    (a whole output directory is timm's ``config.json`` layout, :func:`_from_timm_dir`)."""
    create = dict(recipe.get("model_kwargs") or {})
    create.update(kwargs)
    if recipe.get("num_classes") is not None:
        create.setdefault("num_classes", int(recipe["num_classes"]))
    model = _create(recipe["model"], False, create)
    _load_weights(model, weights, recipe["model"])
    info = {"model": recipe["model"], "model_kwargs": create, "source": source, "weights": str(weights)}
    _with_recipe(model, info, recipe, weights.parent / ADAPTERS_FILE, required=False)
    return model, info


def _from_timm_dir(path: Path, kwargs: Dict[str, Any], checkpoint: Optional[PathLike]):
    cfg = json.loads((path / "config.json").read_text())
    name = cfg.get("architecture")
    if not name:
        raise ValueError(
            f"{path / 'config.json'} has no 'architecture'; expected timm's export layout (timm.models.save_for_hf)"
        )
    has_weights = any(
        (path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
    )
    if not has_weights and checkpoint is None:
        raise FileNotFoundError(f"{path}: config.json but no model.safetensors / pytorch_model.bin next to it")
    model = _create(f"local-dir:{path}", checkpoint is None, kwargs)
    if checkpoint is not None:
        _load_weights(model, checkpoint, name)
    info = {
        "model": name,
        "model_kwargs": dict(cfg.get("model_args") or {}, **kwargs),
        "source": str(path),
        "weights": str(checkpoint) if checkpoint else str(path),
    }
    recipe = cfg.get(FINETUNE_KEY)
    if isinstance(recipe, dict):  # written by training/finetune.py (format 2)
        _with_recipe(model, info, recipe, path / ADAPTERS_FILE, required=True)
    return model, info


# ---------------------------------------------------------------------------------------------------
# public


def load_model(
    name_or_path: str,
    *,
    model_kwargs: Optional[Dict[str, Any]] = None,
    pretrained: bool = False,
    checkpoint: Optional[PathLike] = None,
) -> LoadedModel:
    """Build the model ``name_or_path`` names (see the module docstring) in eval mode, on the CPU.

    Returns ``(model, info)`` as a :class:`LoadedModel` (``.model``, ``.info``); ``info`` records ``name``
    (as given), ``model`` (timm architecture), ``model_kwargs``, ``source`` and ``weights``
    (``"random-init"`` for a bare timm name), plus ``method`` / ``source_r`` / ``recipe`` (the whole
    fine-tuning recipe) for a finetune.py output. Raises ``FileNotFoundError`` for a missing path / weights
    file and ``ValueError`` for an unknown name.
    Example::

        model, info = load_model("vit_tiny_patch16_224", model_kwargs={"img_size": 64, "depth": 2})
        model, info = load_model("vit_base_patch16_224", checkpoint="weights.safetensors")
        model, info = load_model("out/finetune-r0")
        model = load_model("demo").model   # the embedded tiny ViT, offline (alias registered by tocom_hub.demo)
    """
    model, info = _load_model(name_or_path, model_kwargs=model_kwargs, pretrained=pretrained, checkpoint=checkpoint)
    return LoadedModel(model, {"name": name_or_path, **info})


def _load_model(
    name_or_path: str,
    *,
    model_kwargs: Optional[Dict[str, Any]] = None,
    pretrained: bool = False,
    checkpoint: Optional[PathLike] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    import timm

    kwargs = dict(model_kwargs or {})
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"expected a timm model name, a model alias or a path; got {name_or_path!r}")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(
            f"--checkpoint {checkpoint}: no such file (expected .safetensors or a torch state dict)"
        )
    if pretrained and checkpoint is not None:
        raise ValueError("pretrained=True and checkpoint= are exclusive: pick timm's weights or your own file")

    alias = MODEL_ALIASES.get(name_or_path)
    if alias is not None and alias.loader is not None and not os.path.exists(name_or_path):
        if kwargs or checkpoint is not None or pretrained:
            raise ValueError(
                f"model {name_or_path!r} is loaded as shipped: drop --model-kwargs / --checkpoint / --pretrained"
            )
        model, extra = alias.loader()
        return model.eval(), {"model": alias.model, "source": f"alias:{name_or_path}", **extra}
    if alias is not None and not os.path.exists(name_or_path):
        weights = alias.weights() if callable(alias.weights) else alias.weights
        if checkpoint is None and weights is not None and not os.path.isfile(weights):
            raise FileNotFoundError(f"model {name_or_path!r}: weights file {weights} is missing; {alias.missing_hint}")
        create = dict(alias.model_kwargs, **kwargs)
        w = checkpoint or weights
        sd = read_state_dict(w) if w is not None and not pretrained else None
        if sd is not None:
            create = _head_classes(sd, create)
        model = _create(alias.model, pretrained, create)
        if sd is not None:
            _load_weights(model, w, alias.model, sd)
        info = {
            "model": alias.model,
            "model_kwargs": create,
            "source": f"alias:{name_or_path}",
            "weights": str(w) if w and not pretrained else ("timm-pretrained" if pretrained else "random-init"),
        }
        return model.eval(), info

    path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        if (path / "config.json").is_file():
            model, info = _from_timm_dir(path, kwargs, checkpoint)
            return model.eval(), info
        raise FileNotFoundError(
            f"{path}: not a saved model directory (expected config.json + model.safetensors, as written by "
            f"timm.models.save_for_hf(model, DIR, safe_serialization=True), or a training/finetune.py output)"
        )
    if path.is_file():
        if (path.parent / "config.json").is_file() and path.suffix in (".safetensors", ".bin", ".pth"):
            model, info = _from_timm_dir(path.parent, kwargs, checkpoint or path)
            return model.eval(), info
        recipe = _finetune_safetensors_recipe(path) if path.suffix == ".safetensors" else None
        if recipe is not None and "model" in recipe:
            model, info = _from_finetune(recipe, path, kwargs, str(path))
            return model.eval(), info
        raise ValueError(
            f"{path}: a weights file alone does not say which architecture it holds; pass "
            f"--model <timm name> --checkpoint {path} (with --model-kwargs if needed)"
        )
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(
            f"{name_or_path}: no such file or directory (expected a timm model name, a model "
            f"alias ({', '.join(sorted(MODEL_ALIASES))}) or a saved model directory)"
        )

    bare = name_or_path.split(":", 1)[1] if name_or_path.startswith("hf-hub:") else None
    if bare is None and not timm.is_model(name_or_path):
        close = timm.list_models(f"*{name_or_path.split('.')[0][:12]}*")[:5]
        raise ValueError(
            f"unknown model {name_or_path!r}: not a timm model name, a model alias "
            f"({', '.join(sorted(MODEL_ALIASES))}) or an existing path"
            + (f"; similar timm names: {', '.join(close)}" if close else "")
        )
    sd = read_state_dict(checkpoint) if checkpoint is not None else None
    if sd is not None:
        kwargs = _head_classes(sd, kwargs)
    model = _create(name_or_path, pretrained, kwargs)
    if sd is not None:
        _load_weights(model, checkpoint, name_or_path, sd)
    info = {
        "model": name_or_path,
        "model_kwargs": kwargs,
        "source": "timm",
        "weights": str(checkpoint) if checkpoint else ("timm-pretrained" if pretrained else "random-init"),
    }
    return model.eval(), info
