"""tocom-hub: Token Compensator (ToCom) for timm Vision Transformers.

Make any timm ViT merge (ToMe) or prune (EViT) ``r`` tokens per block, then plug a pretrained
ToCom bank into it so a model fine-tuned at one ``r`` runs well at another::

    import timm, tocom_hub
    model = timm.create_model("deit_base_patch16_224", pretrained=True)
    tocom_hub.patch(model, method="tome"); tocom_hub.set_r(model, 16)

The names below are imported on first use (PEP 562), so ``import tocom_hub`` — and ``tocom-hub --help``
— does not pay for torch and timm until something needs them.
"""

import importlib as _importlib
from typing import Any as _Any

__version__ = "0.1.0"

# The package in layers, each importing only from those before it (docs/ARCHITECTURE.md; checked by
# tests/test_architecture.py):
#   core/   token maths (merge, prune), timm surgery (attention, patch), the bank (bank/: module, config,
#           file, card, registry; local files only, no network) and its application to a model
#           (compensation/: api, merged, hooked, locks, marker; preserve: remember and restore both states)
#   hub/    every network request: load_bank (path or repo id or registry), apply (tocom_hub.apply),
#           download_bank (bounded, verified), push_bank
#   tools/  evaluation, benchmark, timing, latency controller, visualisation, scale tuning, checkpoint
#           conversion, the model loader, saving and restoring a model's token-reduction state
#   demo/   the embedded world: datasets, the demo model and bank, assets, evaluate_demo
#   cli/    the ``tocom-hub`` command;   training/ (installed as tocom_hub.training): the trainers

# public name -> module that defines it
_LAZY = {
    # token merging / pruning on timm ViTs
    **dict.fromkeys(
        [
            "METHODS",
            "patch",
            "unpatch",
            "check_supported",
            "set_r",
            "get_r",
            "is_patched",
            "get_method",
            "get_source",
            "get_size",
        ],
        "core.patch",
    ),
    # the tokens of a merged model back on the patch grid (dense prediction)
    **dict.fromkeys(["unmerge_to_grid", "track_grid"], "core.grid"),
    # ToCom bank and its weight arithmetic
    **dict.fromkeys(["ToComBank", "ToComConfig"], "core.bank.module"),
    **dict.fromkeys(["remove", "set_target_r", "set_pair"], "core.compensation.api"),
    # a bank from a path, a Hub repo id or the registry (the core's apply takes local banks only)
    **dict.fromkeys(["apply", "load_bank"], "hub.load"),
    "convert_official": "tools.convert",
    "tune_scale": "tools.tune",
    # which bank for which model (bank=None), no network
    **dict.fromkeys(["register_bank", "unregister_bank", "registered_banks"], "core.bank.registry"),
    # Tools: hold a latency budget by switching r with the server's load
    "LatencyController": "tools.latency",
}
_SUBMODULES = {"compensate": "core.compensation.api", "hub": "hub"}

__all__ = ["__version__", *_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> _Any:
    if name in _SUBMODULES:
        module = _importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    elif name in _LAZY:
        module = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = module
    return module


def __dir__() -> list:
    """The public API (and the sub-packages already imported), not this module's helpers."""
    return sorted(set(__all__) | {n for n in globals() if not n.startswith("_")})
