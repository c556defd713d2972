"""tocom-hub: Token Compensator (ToCom) for timm Vision Transformers.

Make any timm ViT merge (ToMe) or prune (EViT) ``r`` tokens per block, then plug a pretrained
ToCom bank into it so a model fine-tuned at one ``r`` runs well at another::

    import timm, tocom_hub
    model = timm.create_model("deit_base_patch16_224", pretrained=True)
    tocom_hub.patch(model, method="tome"); tocom_hub.set_r(model, 16)
"""
from .patch import METHODS, get_method, get_r, get_size, get_source, is_patched, patch, set_r, unpatch

__version__ = "0.1.0"

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
]

# ToCom bank and its weight arithmetic (issue 3)
from . import compensate  # noqa: E402
from .bank import ToComBank, ToComConfig  # noqa: E402
from .compensate import apply, remove, set_target_r  # noqa: E402
from .convert import convert_official  # noqa: E402
from .tune import tune_scale  # noqa: E402

__all__ += ["ToComBank", "ToComConfig", "apply", "set_target_r", "remove", "compensate", "convert_official", "tune_scale"]

# Hugging Face Hub: download / push banks, bank=None resolution through the registry (issue 4)
from . import hub  # noqa: E402
from .hub import register_bank, registered_banks, unregister_bank  # noqa: E402

__all__ += ["hub", "register_bank", "unregister_bank", "registered_banks"]

# Tools: hold a latency budget by switching r with the server's load (issue 7)
from .latency import LatencyController  # noqa: E402

__all__ += ["LatencyController"]
