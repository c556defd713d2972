"""A bank's files from the Hugging Face Hub, through the real ``huggingface_hub`` client: ``hf_hub_download``
(etag cache, revisions, ``HF_HUB_OFFLINE`` / ``local_files_only``), with the cached files checked against the
hash the Hub announced and errors that say what to do. ``ToComBank.from_pretrained("org/name")`` (the
``ModelHubMixin`` side of the bank) and ``tocom_hub.hub.download_bank`` both come here. Imports nothing
of ours but the bank's file names.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Union

from .bank_config import CONFIG_NAME, LIBRARY_NAME, WEIGHTS_NAME, PathLike

__all__ = ["download_bank", "BankHubError", "BankNotFoundError"]

_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
