"""tocom-hub: Token Compensator (ToCom) for timm Vision Transformers.

Make any timm ViT merge (ToMe) or prune (EViT) ``r`` tokens per block, then plug a pretrained
ToCom bank into it so a model fine-tuned at one ``r`` runs well at another::

    import timm, tocom_hub
    model = timm.create_model("deit_base_patch16_224", pretrained=True)
    tocom_hub.patch(model, method="tome"); tocom_hub.set_r(model, 16)

The names below are imported on first use (PEP 562), so ``import tocom_hub`` — and ``tocom-hub --help``
— does not pay for torch and timm until something needs them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any, Optional

__version__ = "0.1.0"

# The package in layers, each importing only from those before it (docs/ARCHITECTURE.md; checked by
# tests/test_architecture.py):
#   core/   token maths (merge, prune), timm surgery (attention, patch), the bank (bank, bank_config,
#           bank_file, bank_repo, bank_card, registry) and its application to a model (compensate, lora_merged,
#           lora_hooks, state)
#   hub/    the Hugging Face Hub layer on top of the bank: download_bank / load_bank / push_bank
#   tools/  evaluation, benchmark, latency controller, visualisation, scale tuning, checkpoint conversion
#   demo/   the embedded world: datasets, the model loader, adapters, assets, evaluate_demo
#   cli/    the ``tocom-hub`` command;   training/ (installed as tocom_hub.training): the trainers

# public name -> module that defines it
_LAZY = {
    # token merging / pruning on timm ViTs
    **dict.fromkeys(
        ["METHODS", "patch", "unpatch", "set_r", "get_r", "is_patched", "get_method", "get_source", "get_size"],
        "core.patch",
    ),
    # the tokens of a merged model back on the patch grid (dense prediction)
    **dict.fromkeys(["unmerge_to_grid", "track_grid"], "core.grid"),
    # ToCom bank and its weight arithmetic
    **dict.fromkeys(["ToComBank", "ToComConfig"], "core.bank"),
    **dict.fromkeys(["apply", "remove", "set_target_r"], "core.compensate"),
    "convert_official": "tools.convert",
    "tune_scale": "tools.tune",
    # Hugging Face Hub: download / push banks, bank=None resolution through the registry
    **dict.fromkeys(["register_bank", "unregister_bank", "registered_banks"], "hub"),
    # Tools: hold a latency budget by switching r with the server's load
    "LatencyController": "tools.latency",
}
_SUBMODULES = {"compensate": "core.compensate", "hub": "hub"}

# Module paths of earlier releases -> where the module lives now. ``import tocom_hub.bank`` and
# ``tocom_hub.bank.ToComBank`` keep working and give the very same module object.
_MOVED = {
    **{m: f"core.{m}" for m in ("merge", "prune", "patch", "bank", "compensate")},
    **{m: f"tools.{m}" for m in ("evaluation", "benchmark", "latency", "visualize", "tune", "convert")},
    **{m: f"demo.{m}" for m in ("data", "models", "adaptformer")},
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: ``tocom_hub.<old name>`` resolves to the module in its sub-package."""

    def __init__(self) -> None:
        self._real_specs: dict = {}

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or name not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.rpartition('.')[2]]}")
        self._real_specs[spec.name] = module.__spec__  # the import system overwrites it with the alias spec
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self._real_specs[f"{__name__}.{module.__name__.rpartition('.')[2]}"]


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())

__all__ = ["__version__", *_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    elif name in _LAZY:
        module = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _MOVED:
        module = importlib.import_module(f".{_MOVED[name]}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = module
    return module


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodule ``tocom_hub.patch`` must not replace the function ``tocom_hub.patch``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
