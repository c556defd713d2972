"""Share ToCom banks through the Hugging Face Hub, the way peft shares adapters.

Everything here is the real ``huggingface_hub`` client: ``hf_hub_download`` (etag cache, revisions,
``HF_HUB_OFFLINE`` / ``local_files_only``), ``HfApi.create_repo`` / ``upload_folder`` and
``ModelCard``. A bank repo holds three files::

    tocom.safetensors     the LoRA groups (+ the config and a tensor checksum in its metadata)
    tocom_config.json     ToComConfig, human readable
    README.md             model card rendered from tocom_hub/MODEL_CARD.md

Three ways in::

    bank = tocom_hub.ToComBank.from_pretrained("org/tocom-deit-base", revision="v1.0")
    tocom_hub.apply(model, source_r=0, target_r=16, bank="org/tocom-deit-base")
    tocom_hub.apply(model, source_r=0, target_r=16)   # bank found through the registry

``ToComBank`` is a ``huggingface_hub.ModelHubMixin``, so the Hub side belongs to the bank itself and lives
next to it in the core (no module there imports this package): download in ``core/bank_download.py``,
upload in ``core/bank_push.py``, the model card in ``core/bank_card.py``, the ``bank=None`` registry in
``core/registry.py``. This module is their public namespace.
"""

from __future__ import annotations

from ..core.bank_card import MODEL_CARD_TEMPLATE, bank_facts, create_model_card
from ..core.bank_config import LIBRARY_NAME as LIBRARY_NAME  # module constants of earlier releases
from ..core.bank_download import BankHubError, BankNotFoundError, download_bank
from ..core.bank_push import CARD_NAME as CARD_NAME
from ..core.bank_push import push_bank
from ..core.registry import PACKAGE_REGISTRY as PACKAGE_REGISTRY
from ..core.registry import (
    REGISTRY_ENV,
    BankEntry,
    NoBankForModelError,
    load_bank,
    register_bank,
    registered_banks,
    resolve_bank,
    unregister_bank,
)

__all__ = [
    "download_bank",
    "load_bank",
    "push_bank",
    "create_model_card",
    "bank_facts",
    "register_bank",
    "unregister_bank",
    "registered_banks",
    "resolve_bank",
    "BankEntry",
    "BankHubError",
    "BankNotFoundError",
    "NoBankForModelError",
    "REGISTRY_ENV",
    "MODEL_CARD_TEMPLATE",
]
