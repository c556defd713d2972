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
