"""The study demo's models as model aliases, so every tool loads what ``examples/quickstart.py`` runs.

``study-backbone`` is the backbone the study demo's bank (:func:`tocom_hub.demo.demo_bank_path`) was trained
for; ``study-<task>-src<r>`` (first seed) and ``study-<task>-src<r>-seed<k>`` are the downstream AdaptFormer
models :func:`tocom_hub.demo.load_demo_model` returns. ``demo`` (:mod:`.models`) is another backbone: the
training scripts' default, pre-trained on photo-crops. Each alias's ``info["lineage"]`` names the backbone
weights, so a bank from the other world is warned about (:mod:`tocom_hub.tools.bank_fit`)::

    tocom-hub eval --model study-shape-count-src0 --data shape-count --split test --bank "$(python -c \
        'from tocom_hub.demo import demo_bank_path; print(demo_bank_path())')" --target-r 0,16
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

from torch import nn

from ..tools.models import ModelAlias, _create, _head_classes, _load_weights, read_state_dict, register_model_alias

__all__ = ["STUDY_DIR", "register_study_aliases"]

STUDY_DIR = Path(__file__).resolve().parent / "assets" / "study"


def register_study_aliases(load_demo_model: Callable[..., Tuple[nn.Module, Dict[str, Any]]]) -> None:
    """``study-backbone`` and ``study-<task>-src<r>[-seed<k>]``: the study demo's models (``tocom_hub.demo``:
    ``load_demo_model``, the ones ``examples/quickstart.py`` runs), which its bank (``demo_bank_path()``) was
    trained for. Read from ``assets/study/demo.json``; an install without it registers none.
    ``load_demo_model`` is :func:`tocom_hub.demo.load_demo_model` (the package registers them at import)."""
    study = STUDY_DIR
    try:
        info = json.loads((study / "demo.json").read_text())
        models, task, first = info["models"], info["task"], info["seeds"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return

    def lineage() -> list:
        from ..tools.bank_fit import sha256_file

        trained = info.get("backbone_trained_sha256")
        return [f"sha256:{sha256_file(study / info['backbone'])}"] + ([f"sha256:{trained}"] if trained else [])

    def backbone() -> Tuple[nn.Module, Dict[str, Any]]:
        sd = {k: v.float() for k, v in read_state_dict(study / info["backbone"]).items()}
        kwargs = _head_classes(sd, dict(info["model_kwargs"]))
        model = _create(info["model"], False, kwargs)
        _load_weights(model, study / info["backbone"], info["model"], sd)
        out = {"model_kwargs": kwargs, "weights": str(study / info["backbone"]), "lineage": lineage()}
        return model, out

    def downstream(r: int, seed: int) -> Callable[[], Tuple[nn.Module, Dict[str, Any]]]:
        def load() -> Tuple[nn.Module, Dict[str, Any]]:
            model, demo = load_demo_model(r, seed=seed)
            entry = next(e for e in models[str(r)] if e["seed"] == seed)
            out = {"model_kwargs": dict(info["model_kwargs"]), "weights": str(study / entry["file"])}
            out.update(method="tome", source_r=r, lineage=lineage(), adaptformer=str(study / entry["file"]))
            return model, out

        return load

    what = f"the study demo's {info.get('corpus', 'corpus')} backbone, which demo_bank_path() was trained for"
    register_model_alias("study-backbone", ModelAlias(info["model"], description=what, loader=backbone))
    for r, entries in models.items():
        for e in entries:
            names = [f"study-{task}-src{r}-seed{e['seed']}"] + ([f"study-{task}-src{r}"] if e["seed"] == first else [])
            for name in names:
                desc = f"the quickstart's {task} model (AdaptFormer), fine-tuned at r = {r}, seed {e['seed']}"
                register_model_alias(
                    name, ModelAlias(info["model"], description=desc, loader=downstream(int(r), e["seed"]))
                )
