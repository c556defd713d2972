"""The Hugging Face Hub layer: every request tocom-hub makes lives here (the core makes none).

A bank repo holds three files, the folder ``ToComBank.save_pretrained`` writes::

    tocom.safetensors     the LoRA groups (+ the config and a checksum in its metadata)
    tocom_config.json     ToComConfig, human readable
    README.md             the model card, rendered from tocom_hub/MODEL_CARD.md

Ways in::

    bank = tocom_hub.load_bank("org/tocom-deit-base", revision="v1.0")      # or a local path, or None + model=
    tocom_hub.apply(model, source_r=0, target_r=16, bank="org/tocom-deit-base")
    tocom_hub.apply(model, source_r=0, target_r=16)   # bank found through the registry
    tocom_hub.hub.push_bank(bank, "my-org/tocom-deit-base")

Modules: :mod:`.load` (:func:`load_bank`, the one path-or-repo rule :func:`is_local_bank`, :func:`apply`:
``tocom_hub.apply``), :mod:`.fetch` (:func:`download_bank`: bounded downloads into the huggingface_hub cache),
:mod:`.verify` (hashes, the bank's own checks, eviction), :mod:`.push` (:func:`push_bank`), :mod:`.card` (the
card as a ``huggingface_hub.ModelCard``), :mod:`.errors` (one-line errors). The registry (``bank=None``) and the
card's text are network-free and live in the core (``core/bank/registry.py``, ``core/bank/card.py``).
"""

from __future__ import annotations

from ..core.bank.card import CARD_NAME as CARD_NAME
from ..core.bank.card import MODEL_CARD_TEMPLATE, bank_facts, render_model_card
from ..core.bank.config import LIBRARY_NAME as LIBRARY_NAME
from ..core.bank.config import PathLike as PathLike
from ..core.bank.registry import PACKAGE_REGISTRY as PACKAGE_REGISTRY
from ..core.bank.registry import (
    REGISTRY_ENV,
    BankEntry,
    NoBankForModelError,
    register_bank,
    registered_banks,
    resolve_bank,
    unregister_bank,
)
from .card import create_model_card
from .errors import BankHubError, BankNotFoundError, DownloadTimeoutError, HubUnreachableError
from .fetch import DEFAULT_TIMEOUT, download_bank
from .load import apply, is_local_bank, load_bank
from .push import push_bank

__all__ = [
    "apply",
    "load_bank",
    "is_local_bank",
    "download_bank",
    "push_bank",
    "create_model_card",
    "render_model_card",
    "bank_facts",
    "register_bank",
    "unregister_bank",
    "registered_banks",
    "resolve_bank",
    "BankEntry",
    "BankHubError",
    "BankNotFoundError",
    "DownloadTimeoutError",
    "HubUnreachableError",
    "NoBankForModelError",
    "REGISTRY_ENV",
    "MODEL_CARD_TEMPLATE",
    "DEFAULT_TIMEOUT",
]
