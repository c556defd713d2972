"""The one way to get a bank from anything: :func:`load_bank` (a :class:`ToComBank`, a local path, a Hub repo
id, or ``None`` for the registry entry of a model), the one rule that tells a local path from a repo id,
:func:`is_local_bank`, and :func:`apply` (``tocom_hub.apply``: the core's ``apply`` with a bank from anywhere).
The tools, the CLI, the server and the training scripts load banks through here; ``ToComBank.from_pretrained``
itself reads local files only.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import nn

from ..core.bank.config import PathLike
from ..core.bank.module import ToComBank
from ..core.bank.registry import resolve_bank
from ..core.compensation import api as compensate
from .errors import _rev, one_line
from .fetch import DEFAULT_TIMEOUT, download_bank

__all__ = ["load_bank", "is_local_bank", "apply", "BankLike"]

BankLike = Union[ToComBank, str, os.PathLike, None]
_LOCAL_SUFFIXES = (".safetensors", ".json", ".pth", ".pt", ".bin")


def is_local_bank(bank: PathLike) -> bool:
    """Whether ``bank`` names a local file or directory rather than a Hub repo id.

    Local: an ``os.PathLike`` (e.g. a ``pathlib.Path``), a path that exists, and a string that is clearly a path
    even when it does not exist (starts with ``.``, ``/`` or ``~``, is absolute, holds a backslash, ends in a file
    suffix such as ``.safetensors``, or has more than one ``/``). Anything else (``"name"``, ``"org/name"``) is a
    repo id. Example::

        assert is_local_bank("out/run1/bank") and is_local_bank("./bank") and not is_local_bank("org/bank")
    """
    if not isinstance(bank, str):
        if isinstance(bank, os.PathLike):
            return True
        raise TypeError(f"a bank path or repo id must be a string or os.PathLike; got {type(bank).__name__}")
    if os.path.exists(bank) or bank.startswith((".", "/", "~")) or os.path.isabs(bank) or "\\" in bank:
        return True
    return bank.endswith(_LOCAL_SUFFIXES) or bank.count("/") > 1


def load_bank(
    bank: BankLike = None,
    model: Any = None,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    token: Union[str, bool, None] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    method: Optional[str] = None,
    trust_unverified: bool = False,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
) -> ToComBank:
    """A :class:`ToComBank` from a local path, a Hub repo id, or (``bank=None``) the registry entry for ``model``.

    - a ``ToComBank`` is returned as it is;
    - a local path (:func:`is_local_bank`) is read by ``ToComBank.from_pretrained``;
    - a repo id is fetched by :func:`~tocom_hub.hub.fetch.download_bank` (``revision``, ``cache_dir``,
      ``token``, ``local_files_only``, ``force_download`` and ``timeout``, the deadline per file in seconds,
      apply there), then read;
    - ``None`` looks ``model`` up in the registry (``tocom_hub.register_bank``, ``$TOCOM_HUB_REGISTRY``, the
      packaged ``registry.json``; ``method`` picks among a name's entries, ``revision`` overrides the entry's).

    ``trust_unverified=True`` accepts a bank file without checksum; ``dtype`` / ``device`` move the loaded bank.
    Example::

        bank = tocom_hub.load_bank("org/tocom-deit-base", revision="v1.0")
        bank = tocom_hub.load_bank("out/bank")
        bank = tocom_hub.load_bank(None, model=model)      # via tocom_hub.register_bank / registry.json
    """
    hub = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    hub.update(force_download=force_download)
    given = sorted(k for k, v in dict(hub, timeout=timeout != DEFAULT_TIMEOUT).items() if v not in (None, False))
    if bank is not None and not isinstance(bank, (ToComBank, str, os.PathLike)):
        raise TypeError(
            f"bank must be a ToComBank, a local directory / .safetensors file, a Hub repo id or None; "
            f"got {type(bank).__name__}"
        )
    if isinstance(bank, ToComBank) or (bank is not None and is_local_bank(bank)):
        if given:
            raise TypeError(f"{given} only apply when the bank is a Hub repo id (or None: the registry)")
        if isinstance(bank, ToComBank):
            return bank if dtype is None and device is None else bank.to(device=device, dtype=dtype)
        return ToComBank.from_pretrained(bank, trust_unverified=trust_unverified, dtype=dtype, device=device)
    if bank is None:
        if model is None:
            raise TypeError("load_bank(None) needs model= to look a bank up in the registry")
        entry = resolve_bank(model, method=method)
        repo_id, revision = entry.repo_id, revision if revision is not None else entry.revision
        hub["revision"] = revision
    else:
        repo_id = bank
    folder = download_bank(repo_id, timeout=timeout, **hub)
    try:
        return ToComBank.from_pretrained(folder, trust_unverified=trust_unverified, dtype=dtype, device=device)
    except ValueError as e:
        raise ValueError(f"ToCom bank {repo_id!r} (revision {_rev(revision)!r}) cannot be loaded: {one_line(e)}") from e


def apply(
    model: nn.Module,
    source_r: int,
    target_r: int,
    bank: BankLike = None,
    *,
    scale: Optional[float] = None,
    method: Optional[str] = None,
    merge: bool = True,
    ignore_base_model: bool = False,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    token: Union[str, bool, None] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    trust_unverified: bool = False,
) -> nn.Module:
    """Run a model fine-tuned at ``r = source_r`` at ``r = target_r``, compensated by a ToCom bank.

    ``bank``: a :class:`ToComBank`, a local directory or ``tocom.safetensors`` file, a Hub repo id (``revision``,
    ``cache_dir``, ``token``, ``local_files_only``, ``force_download`` and ``timeout``, seconds per file, apply to
    its download), or ``None``: the registry entry for the model's timm name (``tocom_hub.register_bank``; for the
    method the model is patched with, or ``method``). Everything else is :func:`tocom_hub.compensate.apply`: the
    bank is loaded and checked before the model changes. Example::

        tocom_hub.apply(model, source_r=0, target_r=16, bank="org/tocom-deit-base", revision="v1.0")
        tocom_hub.apply(model, source_r=0, target_r=16, bank="out/bank")
    """
    loaded = load_bank(
        bank,
        model,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
        timeout=timeout,
        method=method,
        trust_unverified=trust_unverified,
    )
    return compensate.apply(
        model, source_r, target_r, loaded, scale=scale, method=method, merge=merge, ignore_base_model=ignore_base_model
    )
