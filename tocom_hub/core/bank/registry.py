"""Which bank for which model: the registry ``tocom_hub.apply(model, source_r, target_r)`` and
``tocom_hub.load_bank(None, model=model)`` consult when they get ``bank=None`` (:func:`resolve_bank` gives the
entry; fetching it is ``tocom_hub.hub``'s job).

``bank=None`` looks the model's timm pretrained name (``model.pretrained_cfg``: architecture + tag,
e.g. ``deit_base_patch16_224.fb_in1k``) up in layers, highest priority first: entries added in this process
with :func:`register_bank`, then the JSON file named by ``$TOCOM_HUB_REGISTRY``, then ``registry.json``
shipped with the package (empty until official banks are published). Reading the registry needs no network.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import METHODS, PathLike, _read_json_file

__all__ = [
    "register_bank",
    "unregister_bank",
    "registered_banks",
    "resolve_bank",
    "BankEntry",
    "NoBankForModelError",
    "REGISTRY_ENV",
    "PACKAGE_REGISTRY",
]

REGISTRY_ENV = "TOCOM_HUB_REGISTRY"
PACKAGE_REGISTRY = Path(__file__).with_name("registry.json")


class NoBankForModelError(LookupError):
    """``bank=None`` and the registry has no bank for the model's timm pretrained name."""


@dataclasses.dataclass(frozen=True)
class BankEntry:
    """A registry entry: the bank for timm pretrained model ``name`` and token-reduction ``method``."""

    name: str
    repo_id: str
    revision: Optional[str] = None
    method: str = "tome"
    source: str = "tocom-hub"  # "register_bank", the $TOCOM_HUB_REGISTRY file, or "tocom-hub" (packaged)

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.name} → {self.repo_id}{rev} ({self.method})"


_USER_REGISTRY: Dict[str, List[BankEntry]] = {}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")


def register_bank(timm_name: str, repo_id: str, revision: Optional[str] = None, method: str = "tome") -> BankEntry:
    """Use Hub repo ``repo_id`` when ``tocom_hub.apply`` gets ``bank=None`` for a model named ``timm_name``.

    ``timm_name`` is timm's pretrained name, ``"architecture.tag"`` (``model.pretrained_cfg``), or a bare
    architecture that matches every tag. Entries registered here (for this process) win over
    ``$TOCOM_HUB_REGISTRY`` and the packaged registry; registering the same name and method again
    replaces the entry. Example::

        tocom_hub.register_bank("deit_base_patch16_224.fb_in1k", "my-org/tocom-deit-base", revision="v1.0")
        model = timm.create_model("deit_base_patch16_224.fb_in1k", pretrained=True)
        tocom_hub.apply(model, source_r=0, target_r=16)
    """
    if not isinstance(timm_name, str) or not timm_name:
        raise ValueError(
            f"timm_name must be a timm model name such as 'deit_base_patch16_224.fb_in1k'; got {timm_name!r}"
        )
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a Hub repo id such as 'org/name'; got {repo_id!r}")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise ValueError(f"revision must be a branch, tag or commit sha (a string) or None; got {revision!r}")
    _check_method(method)
    entry = BankEntry(timm_name, repo_id, revision, method, source="register_bank")
    entries = [e for e in _USER_REGISTRY.get(timm_name, []) if e.method != method]
    _USER_REGISTRY[timm_name] = [entry] + entries
    return entry


def unregister_bank(timm_name: str, method: Optional[str] = None) -> None:
    """Forget what :func:`register_bank` registered for ``timm_name`` (all methods, or one)."""
    entries = [e for e in _USER_REGISTRY.pop(timm_name, []) if method is not None and e.method != method]
    if entries:
        _USER_REGISTRY[timm_name] = entries


def _read_registry_file(path: PathLike, source: str) -> Dict[str, List[BankEntry]]:
    """Parse a registry JSON file: ``{"banks": {name: entry | [entry, ...]}}`` (or the mapping alone),
    each entry ``{"repo_id": ..., "revision": ... (optional), "method": "tome" | "evit" (optional)}``."""
    data = _read_json_file(path, what="ToCom bank registry")
    if not isinstance(data, dict):
        raise ValueError(f"ToCom bank registry {path}: expected a JSON object, got {type(data).__name__}")
    banks = data.get("banks", {k: v for k, v in data.items() if not k.startswith("_") and k != "format_version"})
    if not isinstance(banks, dict):
        raise ValueError(f"ToCom bank registry {path}: 'banks' must map timm names to entries")
    out: Dict[str, List[BankEntry]] = {}
    for name, value in banks.items():
        items = value if isinstance(value, list) else [value]
        if not name:
            raise ValueError(f"ToCom bank registry {path}: an entry has an empty timm name")
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("repo_id"), str) or not item["repo_id"]:
                raise ValueError(
                    f"ToCom bank registry {path}: entry for {name!r} needs a 'repo_id' string; got {_short(item)}"
                )
            for key, example in (("revision", "'v1.0' or a commit sha"), ("method", repr(METHODS[0]))):
                if item.get(key) is not None and not isinstance(item[key], str):
                    raise ValueError(
                        f"ToCom bank registry {path}: entry for {name!r} has {key} {_short(item[key])} "
                        f"({type(item[key]).__name__}); expected a string such as {example}"
                    )
            method = item.get("method") or "tome"
            if method not in METHODS:
                raise ValueError(
                    f"ToCom bank registry {path}: entry for {name!r} has method {method!r}; expected one of {METHODS}"
                )
            out.setdefault(name, []).append(BankEntry(name, item["repo_id"], item.get("revision"), method, source))
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _registry_layers():
    """The registry layers, highest priority first, each read only when asked for (a generator): a
    malformed ``$TOCOM_HUB_REGISTRY`` file cannot hide an entry :func:`register_bank` added."""
    yield {name: list(entries) for name, entries in _USER_REGISTRY.items()}
    user_file = os.environ.get(REGISTRY_ENV)
    if user_file:
        try:
            yield _read_registry_file(user_file, source=user_file)
        except ValueError as e:
            raise ValueError(f"{e} (the file is named by ${REGISTRY_ENV}: fix it, or unset ${REGISTRY_ENV})") from None
    yield _read_registry_file(PACKAGE_REGISTRY, source="tocom-hub")


def registered_banks() -> Dict[str, List[BankEntry]]:
    """Every known bank, by timm name, highest priority first: :func:`register_bank`, then the file
    named by ``$TOCOM_HUB_REGISTRY``, then the packaged ``registry.json``."""
    merged: Dict[str, List[BankEntry]] = {}
    for layer in _registry_layers():
        for name, entries in layer.items():
            merged.setdefault(name, []).extend(entries)
    return merged


def _timm_names(model: Any) -> List[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    names = []
    if arch and tag:
        names.append(f"{arch}.{tag}")
    if arch:
        names.append(arch)
    return names


def resolve_bank(model: Any, method: Optional[str] = None) -> BankEntry:
    """The registry entry for ``model`` (matched on ``model.pretrained_cfg`` ``"architecture.tag"``, then
    ``"architecture"``); ``method`` defaults to the method the model is patched with, if any.

    Raises :class:`NoBankForModelError` listing the known banks and showing how to pass ``bank=``.
    """
    from ..patch import get_method, is_patched

    if method is None and is_patched(model):
        method = get_method(model)
    names = _timm_names(model)
    for layer in _registry_layers():  # a register_bank entry is found before any file is read
        for name in names:
            for entry in layer.get(name, []):
                if method is None or entry.method == method:
                    return entry
    known = registered_banks()
    listing = "; ".join(str(e) for entries in known.values() for e in entries)
    listing = (
        f"known banks: {listing}"
        if listing
        else "no banks are registered yet (tocom-hub does not ship official banks yet)"
    )
    example_name = names[0] if names else "<arch>.<tag>"
    if not names:
        what = f"{type(model).__name__} has no timm pretrained_cfg (architecture/tag) to look a bank up by"
    else:
        what = f"no ToCom bank is registered for {names[0]}" + (f" with method {method!r}" if method else "")
    raise NoBankForModelError(
        f"{what}; {listing}. Pass one explicitly, e.g. tocom_hub.apply(model, source_r, target_r, "
        f'bank="org/name") (a Hub repo id, a local directory or a ToComBank), or register it with '
        f'tocom_hub.register_bank({example_name!r}, "org/name")'
    )
