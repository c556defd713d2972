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
import sys
import types
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    # token merging / pruning on timm ViTs
    **dict.fromkeys(
        ["METHODS", "patch", "unpatch", "set_r", "get_r", "is_patched", "get_method", "get_source", "get_size"], "patch"
    ),
    # ToCom bank and its weight arithmetic
    **dict.fromkeys(["ToComBank", "ToComConfig"], "bank"),
    **dict.fromkeys(["apply", "remove", "set_target_r"], "compensate"),
    "convert_official": "convert",
    "tune_scale": "tune",
    # Hugging Face Hub: download / push banks, bank=None resolution through the registry
    **dict.fromkeys(["register_bank", "unregister_bank", "registered_banks"], "hub"),
    # Tools: hold a latency budget by switching r with the server's load
    "LatencyController": "latency",
}
_SUBMODULES = ("compensate", "hub")

__all__ = [
    "METHODS",
    "patch",
    "unpatch",
    "set_r",
    "get_r",
    "is_patched",
    "get_method",
    "get_source",
    "get_size",
    "__version__",
    "ToComBank",
    "ToComConfig",
    "apply",
    "set_target_r",
    "remove",
    "compensate",
    "convert_official",
    "tune_scale",
    "hub",
    "register_bank",
    "unregister_bank",
    "registered_banks",
    "LatencyController",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
    elif name in _LAZY:
        module = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = module
    return module


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodule ``tocom_hub.patch`` must not replace the function ``tocom_hub.patch``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
