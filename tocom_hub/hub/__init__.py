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
    tocom_hub.apply(model, source_r=0, target_r=16)   # bank found through the registry (see below)

``bank=None`` looks the model's timm pretrained name (``model.pretrained_cfg``: architecture + tag,
e.g. ``deit_base_patch16_224.fb_in1k``) up in a small registry: entries added in this process with
:func:`register_bank`, then the JSON file named by ``$TOCOM_HUB_REGISTRY``, then ``registry.json``
shipped with the package (empty until official banks are published).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..core.bank import CONFIG_NAME, METHODS, WEIGHTS_NAME, ToComBank, _looks_local, _read_json_file

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

REGISTRY_ENV = "TOCOM_HUB_REGISTRY"
PACKAGE_REGISTRY = Path(__file__).with_name("registry.json")
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "MODEL_CARD.md"
LIBRARY_NAME = "tocom-hub"
CARD_NAME = "README.md"

PathLike = Union[str, os.PathLike]
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_METHOD_NAMES = {"tome": "ToMe token merging", "evit": "EViT token pruning"}


# ---------------------------------------------------------------------------------------------------
# errors


class BankHubError(OSError):
    """Getting a bank from (or putting one on) the Hub failed. ``__cause__`` is huggingface_hub's error.

    Attributes: ``repo_id``, ``revision``, ``filename`` (``None`` where they do not apply).
    """

    def __init__(
        self,
        message: str,
        *,
        repo_id: Optional[str] = None,
        revision: Optional[str] = None,
        filename: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.repo_id, self.revision, self.filename = repo_id, revision, filename

    def __str__(self) -> str:  # OSError.__str__ would show "[Errno None] None: <filename>"
        return str(self.args[0])


class BankNotFoundError(BankHubError, FileNotFoundError):
    """The repo, the revision or a bank file does not exist, or is not in the cache while offline."""


class NoBankForModelError(LookupError):
    """``bank=None`` and the registry has no bank for the model's timm pretrained name."""


# ---------------------------------------------------------------------------------------------------
# download


def _rev(revision: Optional[str]) -> str:
    return revision or "main"


def _hub_url(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


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


def _explain(
    err: BaseException,
    repo_id: str,
    filename: str,
    revision: Optional[str],
    cache_dir: Optional[PathLike],
    local_files_only: bool,
    token: Union[str, bool, None],
) -> BaseException:
    """Turn a huggingface_hub exception into one that says what to do (the original becomes ``__cause__``)."""
    from huggingface_hub import constants, errors
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # huggingface_hub < 1.0 raised EntryNotFoundError itself for a 404 (checked after the local case)
    remote_entry_error = getattr(errors, "RemoteEntryNotFoundError", EntryNotFoundError)
    offline = bool(constants.HF_HUB_OFFLINE)

    rev = _rev(revision)
    where = dict(repo_id=repo_id, revision=rev, filename=filename)
    if isinstance(err, HFValidationError):
        return ValueError(f"{repo_id!r} is neither an existing local path nor a valid Hub repo id ('org/name'): {err}")
    if isinstance(err, GatedRepoError):
        return BankNotFoundError(
            f"ToCom bank repo {repo_id!r} is gated: request access at {_hub_url(repo_id)}, then pass a token "
            f"(token=... / --token) or log in with `hf auth login`",
            **where,
        )
    if isinstance(err, RepositoryNotFoundError):
        return BankNotFoundError(
            f"ToCom bank repo {repo_id!r} was not found on {constants.ENDPOINT} (or it is private and no valid "
            f"token was given): check the repo id, or pass a token (token=... / --token) or log in with "
            f"`hf auth login`",
            **where,
        )
    if isinstance(err, RevisionNotFoundError):
        return BankNotFoundError(
            f"revision {rev!r} does not exist in ToCom bank repo {repo_id!r}"
            f"{_available_refs(repo_id, token)}: pass an existing branch, tag or commit sha",
            **where,
        )
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        cache = cache_dir or constants.HF_HUB_CACHE
        if offline or local_files_only:
            why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "local_files_only=True"
            todo = (
                f"run once with network access (e.g. `tocom-hub download {repo_id}"
                f"{'' if revision is None else f' --revision {revision}'}`) to fill the cache"
            )
        else:
            why = f"the Hub ({constants.ENDPOINT}) could not be reached"
            todo = "check your connection and retry"
        return BankNotFoundError(
            f"{filename} of ToCom bank {repo_id!r} (revision {rev!r}) is not in the cache ({cache}) and {why}: {todo}",
            **where,
        )
    if isinstance(err, remote_entry_error):
        return BankNotFoundError(
            f"ToCom bank repo {repo_id!r} has no {filename} at revision {rev!r}: it does not look like a ToCom "
            f"bank (expected {WEIGHTS_NAME} + {CONFIG_NAME}, as written by ToComBank.push_to_hub)",
            **where,
        )
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", "?")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return BankHubError(
            f"downloading {filename} of ToCom bank {repo_id!r} (revision {rev!r}) failed: the Hub answered "
            f"HTTP {status} ({first}); retry later",
            **where,
        )
    if isinstance(err, OSError) and "Consistency check failed" in str(err):
        return BankHubError(
            f"the download of {filename} from ToCom bank {repo_id!r} (revision {rev!r}) was incomplete or "
            f"corrupted (received a different number of bytes than the Hub announced): retry, or pass "
            f"force_download=True",
            **where,
        )
    return err


def _unreachable(
    repo_id: str,
    filename: str,
    *,
    revision: Optional[str],
    cache_dir: Optional[PathLike],
    token: Union[str, bool, None],
    force_download: bool,
) -> Optional[BaseException]:
    """The connection error when the Hub cannot be reached for a file the cache does not hold, else ``None``.

    For such a file huggingface_hub retries a failed connection five times with back-off (about 25 s of
    "Retrying in …" lines) before it gives up; one HEAD request without retries (``get_hf_file_metadata``,
    timeout ``HF_HUB_ETAG_TIMEOUT``) tells an unreachable Hub at once. A cached file needs no probe:
    huggingface_hub falls back to it immediately.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str) and not force_download:
            return None
        get_hf_file_metadata(
            hf_hub_url(repo_id, filename, revision=revision), token=token, timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    except (HfHubHTTPError, HFValidationError, ValueError):
        return None  # the Hub answered (404, 401, …) or a bad id: hf_hub_download raises the precise error
    except Exception as e:  # no answer at all: DNS, refused connection, timeout
        return e
    return None


def _download_file(
    repo_id: str,
    filename: str,
    *,
    revision: Optional[str],
    cache_dir: Optional[PathLike],
    token: Union[str, bool, None],
    local_files_only: bool,
    force_download: bool,
) -> str:
    from huggingface_hub import constants, hf_hub_download

    from .. import __version__

    if not local_files_only:
        err = _unreachable(
            repo_id, filename, revision=revision, cache_dir=cache_dir, token=token, force_download=force_download
        )
        if err is not None:
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise BankNotFoundError(
                f"{filename} of ToCom bank {repo_id!r} (revision {_rev(revision)!r}) is not in the cache "
                f"({cache_dir or constants.HF_HUB_CACHE}) and the Hub ({constants.ENDPOINT}) could not be reached "
                f"({reason}): check your connection and retry, or fill the cache once with network access "
                f"(`tocom-hub download {repo_id}`) and set HF_HUB_OFFLINE=1",
                repo_id=repo_id,
                revision=_rev(revision),
                filename=filename,
            ) from None

    try:
        return hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            force_download=force_download,
            library_name=LIBRARY_NAME,
            library_version=__version__,
        )
    except Exception as e:
        explained = _explain(e, repo_id, filename, revision, cache_dir, local_files_only, token)
        if explained is e:
            raise
        raise explained from e


def _verify_cached_file(path: str, *, repo_id: str, filename: str, revision: str) -> None:
    """Check a cached file against the hash the Hub announced for it, and evict it when it differs.

    The huggingface_hub cache stores every file as ``blobs/<etag>`` (symlinked from ``snapshots/``): the
    git blob sha1 for regular files, the SHA-256 of the content for LFS files. ``hf_hub_download``
    only checks the size, so a download that was altered on the way (same length) would otherwise
    stay in the cache and be served again and again.
    """
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    blob = os.path.realpath(path)
    expected = os.path.basename(blob)
    if blob == os.path.abspath(path):
        return  # no symlinks (e.g. Windows without developer mode): nothing to compare with
    if _SHA256.fullmatch(expected):
        with open(blob, "rb") as f:
            actual, algo = sha_fileobj(f).hex(), "SHA-256"
    elif _COMMIT_HASH.fullmatch(expected):
        with open(blob, "rb") as f:
            actual, algo = git_hash(f.read()), "git blob sha1"
    else:
        return
    if actual == expected:
        return
    removed = True
    for p in (path, blob):
        try:
            os.remove(p)
        except OSError:
            removed = False
    todo = (
        "the corrupted copy was removed from the cache: run again to download it afresh"
        if removed
        else f"delete {path} and {blob} (or pass force_download=True) and run again"
    )
    raise BankHubError(
        f"{filename} of ToCom bank {repo_id!r} (revision {revision!r}) is corrupted: its {algo} is {actual}, "
        f"the Hub announced {expected}; {todo}",
        repo_id=repo_id,
        revision=revision,
        filename=filename,
    )


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
    opts = dict(cache_dir=cache_dir, token=token, local_files_only=local_files_only, force_download=force_download)
    weights = _download_file(repo_id, WEIGHTS_NAME, revision=revision, **opts)
    _verify_cached_file(weights, repo_id=repo_id, filename=WEIGHTS_NAME, revision=_rev(revision))
    folder = os.path.dirname(weights)
    commit = os.path.basename(folder)  # the cache layout is .../snapshots/<commit sha>/<file>
    pinned = commit if _COMMIT_HASH.fullmatch(commit) else revision
    try:
        config = _download_file(repo_id, CONFIG_NAME, revision=pinned, **opts)
    except BankNotFoundError as e:
        from huggingface_hub.errors import EntryNotFoundError

        if not isinstance(e.__cause__, EntryNotFoundError):
            raise
        # no tocom_config.json in the repo (or not cached): the config embedded in the weights is used
    else:
        _verify_cached_file(config, repo_id=repo_id, filename=CONFIG_NAME, revision=_rev(revision))
        if os.path.dirname(config) != folder:  # pragma: no cover - defensive, same commit by construction
            raise BankHubError(
                f"{CONFIG_NAME} and {WEIGHTS_NAME} of {repo_id!r} resolved to different commits",
                repo_id=repo_id,
                revision=_rev(revision),
            )
    return folder


# ---------------------------------------------------------------------------------------------------
# registry


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
    from ..core.patch import get_method, is_patched

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
    """A :class:`ToComBank` from a Hub repo id, a local path, or (``bank=None``) the registry entry for ``model``.

    This is what :func:`tocom_hub.apply` calls when it gets a repo id or ``bank=None``. ``revision``
    overrides the revision a registry entry pins; ``trust_unverified=True`` accepts a bank file
    without checksum (see :meth:`ToComBank.from_pretrained`). Example::

        bank = tocom_hub.hub.load_bank("org/tocom-deit-base", revision="v1.0")
        bank = tocom_hub.hub.load_bank(None, model=model)      # via tocom_hub.register_bank / registry.json
    """
    if isinstance(bank, ToComBank):
        return bank
    if bank is None:
        if model is None:
            raise TypeError("load_bank(None) needs model= to look a bank up in the registry")
        entry = resolve_bank(model, method=method)
        repo_id, revision = entry.repo_id, revision if revision is not None else entry.revision
    else:
        repo_id = os.fspath(bank)
        if os.path.exists(repo_id) or _looks_local(repo_id):
            return ToComBank.from_pretrained(repo_id, trust_unverified=trust_unverified)
    folder = download_bank(
        repo_id,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    try:
        return ToComBank.from_pretrained(folder, trust_unverified=trust_unverified)
    except ValueError as e:
        raise ValueError(f"ToCom bank {repo_id!r} (revision {_rev(revision)!r}) cannot be loaded: {e}") from e


# ---------------------------------------------------------------------------------------------------
# facts and model card


def _format_size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def bank_facts(bank: ToComBank, path: Optional[PathLike] = None) -> Dict[str, Any]:
    """What a bank is, as a JSON-able dict (used by the model card and ``tocom-hub info``).

    ``size_bytes`` is the size of ``tocom.safetensors`` when ``path`` (its file or directory) is given,
    else the bytes of the tensors alone.
    """
    cfg = bank.config
    if path is not None:
        p = Path(path)
        size = (p / WEIGHTS_NAME if p.is_dir() else p).stat().st_size
    else:
        size = sum(t.numel() * t.element_size() for t in bank.state_dict().values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in bank.state_dict().values()})
    return {
        "base_model": cfg.base_model_id,
        "method": cfg.method,
        "r_min": 0,
        "r_max": cfg.r_max,
        "rank": cfg.rank,
        "targets": list(cfg.targets),
        "num_parameters": bank.num_parameters(),
        "size_bytes": int(size),
        "dtype": ", ".join(dtypes),
        "scale": cfg.scale,
        "format_version": cfg.format_version,
        "embed_dim": cfg.embed_dim,
        "attn_dim": cfg.qkv_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "training_recipe": cfg.training_recipe,
        "eval_results": cfg.eval_results,
    }


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_table(obj: Any, key_header: str = "") -> str:
    """Render free-form facts: a flat dict as key/value rows, a dict of dicts or a list of dicts as a
    table with one column per key, anything else as a JSON block. ``""`` for ``None``/empty."""
    if obj is None or (isinstance(obj, (dict, list)) and not obj):
        return ""
    rows: Optional[List[Tuple[str, Mapping[str, Any]]]] = None
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        rows = [("", r) for r in obj]
        key_header = ""
    elif isinstance(obj, dict) and all(isinstance(v, dict) for v in obj.values()):
        rows = [(str(k), v) for k, v in obj.items()]
    if rows is not None:
        cols: List[str] = []
        for _, r in rows:
            cols += [c for c in r if c not in cols]
        lead = [key_header or " "] if key_header or any(k for k, _ in rows) else []
        lines = ["| " + " | ".join(lead + [_cell(c) for c in cols]) + " |", "|" + "---|" * (len(lead) + len(cols))]
        for k, r in rows:
            lines.append("| " + " | ".join(([_cell(k)] if lead else []) + [_cell(r.get(c, "")) for c in cols]) + " |")
        return "\n".join(lines)
    if isinstance(obj, dict):
        head = f"| {key_header} | value |" if key_header else "| | |"
        lines = [head, "|---|---|"] + [f"| {_cell(k)} | {_cell(v)} |" for k, v in obj.items()]
        return "\n".join(lines)
    return "```json\n" + json.dumps(obj, indent=2, default=str) + "\n```"


def _timm_hub_id(name: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """``(hf_hub_id, license)`` timm knows for pretrained name ``name``, or ``(None, None)``."""
    if not name:
        return None, None
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:
        return None, None
    if cfg is None:
        return None, None
    return getattr(cfg, "hf_hub_id", None) or None, getattr(cfg, "license", None) or None


def create_model_card(
    bank: ToComBank,
    *,
    repo_id: Optional[str] = None,
    path: Optional[PathLike] = None,
    license: Optional[str] = None,
    template_path: Optional[PathLike] = None,
):
    """A ``huggingface_hub.ModelCard`` for ``bank``, rendered from ``tocom_hub/MODEL_CARD.md`` (Jinja2).

    Front matter: ``library_name: tocom-hub``, ``base_model`` (the backbone's timm Hub id, when timm
    knows it), ``tags``, ``license`` (``license=``, else the backbone's weights license timm reports,
    else ``apache-2.0``), ``pipeline_tag: image-classification``; the body gets the bank's facts
    (:func:`bank_facts`), its training recipe and evaluation table when the config carries them.
    Example::

        card = tocom_hub.hub.create_model_card(bank, repo_id="my-org/tocom-deit-base")
        card.save("out/bank/README.md")
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .. import __version__

    facts = bank_facts(bank, path)
    base_name = facts["base_model"]
    base_hub_id, base_license = _timm_hub_id(base_name)
    recipe = facts["training_recipe"] if isinstance(facts["training_recipe"], dict) else {}
    dataset = recipe.get("dataset") if isinstance(recipe.get("dataset"), str) else None
    method = facts["method"]
    tags = [
        "tocom",
        "token-compression",
        "token-merging" if method == "tome" else "token-pruning",
        method,
        "lora",
        "timm",
        "vision-transformer",
    ]
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base_hub_id,
        base_model_relation="adapter" if base_hub_id else None,
        license=license or base_license or "apache-2.0",
        tags=tags,
        pipeline_tag="image-classification",
        datasets=[dataset] if dataset else None,
    )
    template = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATE
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        repo_id=repo_id or "org/name",
        base_model_name=base_name,
        base_model_hub_id=base_hub_id,
        method=method,
        method_name=_METHOD_NAMES.get(method, method),
        r_min=0,
        r_max=facts["r_max"],
        rank=facts["rank"],
        targets=", ".join(facts["targets"]),
        num_parameters=f"{facts['num_parameters']:,}",
        size=_format_size(facts["size_bytes"]),
        size_bytes=f"{facts['size_bytes']:,}",
        dtype=facts["dtype"],
        scale=facts["scale"],
        format_version=facts["format_version"],
        embed_dim=facts["embed_dim"],
        depth=facts["depth"],
        num_heads=facts["num_heads"],
        training_recipe_table=_markdown_table(facts["training_recipe"], "setting"),
        eval_table=_markdown_table(facts["eval_results"]),
        tocom_hub_version=__version__,
    )


# ---------------------------------------------------------------------------------------------------
# upload


def push_bank(
    bank: ToComBank,
    repo_id: str,
    *,
    revision: Optional[str] = None,
    private: Optional[bool] = None,
    token: Union[str, bool, None] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    create_pr: bool = False,
    license: Optional[str] = None,
    dtype: Any = None,
):
    """Upload ``tocom.safetensors``, ``tocom_config.json`` and a ``README.md`` model card to ``repo_id``.

    ``create_repo(exist_ok=True)`` (``private`` only applies to a new repo), then one
    ``upload_folder`` commit; a ``revision`` branch that does not exist yet is created from ``main``.
    The model card is regenerated on every push (see :func:`create_model_card`; ``license=`` sets
    its license). Returns huggingface_hub's ``CommitInfo``. ``bank.push_to_hub(...)`` calls this. Example::

        bank = tocom_hub.ToComBank.from_pretrained("out/bank")
        tocom_hub.hub.push_bank(bank, "my-org/tocom-deit-base", private=True)
        bank = tocom_hub.ToComBank.from_pretrained("my-org/tocom-deit-base")
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    from .. import __version__

    if not isinstance(bank, ToComBank):
        raise TypeError(f"push_bank needs a ToComBank; got {type(bank).__name__}")
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
    cfg = bank.config
    message = commit_message or (
        f"Upload ToCom bank ({cfg.method}, r 0-{cfg.r_max}, rank {cfg.rank}, {'+'.join(cfg.targets)})"
    )
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tocom-push-") as tmp:
            bank.save_pretrained(tmp, dtype=dtype)
            card = create_model_card(
                ToComBank.from_pretrained(tmp) if dtype is not None else bank,
                repo_id=repo_id,
                path=tmp,
                license=license,
            )
            card.save(os.path.join(tmp, CARD_NAME))
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=message,
                commit_description=commit_description,
                create_pr=create_pr,
                allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, CARD_NAME],
            )
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if status in (401, 403) or isinstance(e, RepositoryNotFoundError):
            todo = (
                ": check that you may write to it: pass a write token (token=... / --token) or log in with "
                "`hf auth login`"
            )
        elif status in (412, 429) or (status or 0) >= 500:
            todo = ": retry later"
        else:
            todo = ""
        raise BankHubError(
            f"pushing the ToCom bank to {repo_id!r} failed (HTTP {status}: {first}){todo}",
            repo_id=repo_id,
            revision=_rev(revision),
        ) from e
