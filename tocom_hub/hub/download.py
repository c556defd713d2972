"""Getting banks from the Hub with full diagnostics: :func:`download_bank` (what ``tocom-hub download`` / ``info``
run) and :func:`load_bank` (the same, then :meth:`ToComBank.from_pretrained`; also ``bank=None`` through the
registry).

On top of what ``ToComBank.from_pretrained("org/name")`` does with ``hf_hub_download`` (the order of the two
files, cached-file checks and error messages of ``tocom_hub.core.bank_repo``), this module makes the extra
request that makes errors precise: for a revision that does not exist, the repo's branches and tags.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from ..core.bank import ToComBank, hub_download
from ..core.bank_config import PathLike
from ..core.bank_file import _looks_local
from ..core.bank_repo import fetch_bank_files
from ..core.registry import load_bank as _load_bank

__all__ = ["download_bank", "load_bank", "bank_path"]


def _available_refs(repo_id: str, token: Union[str, bool, None]) -> str:
    """``" (branches: main, dev; tags: v1)"`` or ``""`` when the refs cannot be listed."""
    from huggingface_hub import HfApi

    try:
        refs = HfApi().list_repo_refs(repo_id, token=token)
    except Exception:  # best effort: the message is still useful without it
        return ""
    branches = ", ".join(b.name for b in refs.branches) or "none"
    tags = ", ".join(t.name for t in refs.tags) or "none"
    return f" (branches: {branches}; tags: {tags})"


def download_bank(
    repo_id: str,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    token: Union[str, bool, None] = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> str:
    """Download (or find in the cache) a bank's files; return the local snapshot directory.

    ``tocom.safetensors`` is fetched first and pins the commit; ``tocom_config.json`` is then fetched
    at that same commit, so the two files always belong together (the config is optional: the
    weights carry it in their metadata). Files come from the huggingface_hub cache when their etag is
    unchanged, from the cache alone with ``local_files_only=True`` / ``HF_HUB_OFFLINE=1`` or when the
    Hub cannot be reached, and are checked against the hash the Hub announced. Example::

        path = tocom_hub.hub.download_bank("org/tocom-deit-base", revision="v1.0")
        bank = tocom_hub.ToComBank.from_pretrained(path)

    Raises:
        BankNotFoundError: the repo / revision / ``tocom.safetensors`` does not exist, or is not cached
            while offline (a ``FileNotFoundError``; ``__cause__`` is huggingface_hub's exception).
        BankHubError: corrupted or incomplete download, or any other Hub failure.
    """
    return fetch_bank_files(
        hub_download,
        repo_id,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
        refs=lambda: _available_refs(repo_id, token),
    )


def bank_path(pretrained: PathLike, **hub: Any) -> str:
    """``pretrained`` itself when it is (or looks like) a local path, else :func:`download_bank` of it
    (``hub``: its keyword arguments). ``ToComBank.from_pretrained`` of the result loads the bank."""
    path = os.fspath(pretrained)
    return path if os.path.exists(path) or _looks_local(path) else download_bank(path, **hub)


def load_bank(
    bank: Union[ToComBank, PathLike, None] = None,
    model: Any = None,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    token: Union[str, bool, None] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    method: Optional[str] = None,
    trust_unverified: bool = False,
) -> ToComBank:
    """A :class:`ToComBank` from a Hub repo id (through :func:`download_bank`), a local path, or (``bank=None``)
    the registry entry for ``model`` (``tocom_hub.register_bank``, ``$TOCOM_HUB_REGISTRY``, ``registry.json``).

    ``revision`` overrides the revision a registry entry pins; ``trust_unverified=True`` accepts a bank file
    without checksum (see :meth:`ToComBank.from_pretrained`). Example::

        bank = tocom_hub.hub.load_bank("org/tocom-deit-base", revision="v1.0")
        bank = tocom_hub.hub.load_bank(None, model=model)      # via tocom_hub.register_bank / registry.json
    """
    return _load_bank(
        bank,
        model,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
        method=method,
        trust_unverified=trust_unverified,
        download=download_bank,
    )
