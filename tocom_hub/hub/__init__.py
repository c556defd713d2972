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

The layer sits on top of the core. ``ToComBank`` is a ``huggingface_hub.ModelHubMixin`` whose
``from_pretrained`` / ``push_to_hub`` call the library directly (``core/bank.py``; what its errors mean:
``core/bank_repo.py``; the model card: ``core/bank_card.py``; the ``bank=None`` registry: ``core/registry.py``).
This package adds the network code of ours: :func:`download_bank` / :func:`load_bank` with their extra
diagnostics (``hub/download.py``) and :func:`push_bank` (``hub/push.py``). Nothing in ``tocom_hub.core``
imports it.
"""

from __future__ import annotations

from ..core.bank_card import CARD_NAME as CARD_NAME
from ..core.bank_card import MODEL_CARD_TEMPLATE, bank_facts, create_model_card
from ..core.bank_config import LIBRARY_NAME as LIBRARY_NAME
from ..core.bank_config import PathLike as PathLike
from ..core.bank_repo import BankHubError, BankNotFoundError
from ..core.registry import PACKAGE_REGISTRY as PACKAGE_REGISTRY
from ..core.registry import (
    REGISTRY_ENV,
    BankEntry,
    NoBankForModelError,
    register_bank,
    registered_banks,
    resolve_bank,
    unregister_bank,
)
from .download import download_bank, load_bank
from .push import push_bank

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
