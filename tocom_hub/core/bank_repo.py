"""A bank repo on the Hugging Face Hub, without any network code: the error types, what huggingface_hub's
exceptions mean for a bank (:func:`explain_download_error`, :func:`explain_push_error`), the order a bank's two
files are fetched in (:func:`fetch_bank_files`: the weights pin the commit, the optional config follows at that
commit) and the check of a cached file against the hash the Hub announced (:func:`verify_cached_file`, which
reads the local cache only).

The fetching itself is the caller's ``download`` function: ``ToComBank.from_pretrained`` passes huggingface_hub's
``hf_hub_download``; ``tocom_hub.hub.download_bank`` passes its own, which first checks that the Hub can be
reached and lists a repo's branches and tags when a revision does not exist.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional, Union

from .bank_config import CONFIG_NAME, LIBRARY_NAME, WEIGHTS_NAME, PathLike

__all__ = [
    "BankHubError",
    "BankNotFoundError",
    "explain_download_error",
    "explain_push_error",
    "unreachable_error",
    "fetch_bank_files",
    "verify_cached_file",
]

_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def _rev(revision: Optional[str]) -> str:
    return revision or "main"


def _hub_url(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


def explain_download_error(
    err: BaseException,
    repo_id: str,
    filename: str,
    revision: Optional[str],
    cache_dir: Optional[PathLike],
    local_files_only: bool,
    refs: str = "",
) -> BaseException:
    """The error to raise for huggingface_hub's ``err``: one that says what to do, or ``err`` itself.

    ``refs`` (e.g. ``" (branches: main; tags: v1)"``) is added to the message of a revision that does not exist.
    """
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
    if isinstance(err, BankHubError):
        return err
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
            f"revision {rev!r} does not exist in ToCom bank repo {repo_id!r}{refs}: pass an existing branch, tag "
            f"or commit sha",
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
        else:  # huggingface_hub raises this when the Hub did not answer; its cause is the connection error
            return unreachable_error(repo_id, filename, revision, cache_dir, err.__cause__)
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


def unreachable_error(
    repo_id: str,
    filename: str,
    revision: Optional[str],
    cache_dir: Optional[PathLike],
    reason: Optional[BaseException],
) -> BankNotFoundError:
    """The error for a file the cache does not hold when the Hub could not be reached (``reason``: why)."""
    from huggingface_hub import constants

    why = " ".join(str(reason).split())[:200] or type(reason).__name__ if reason is not None else ""
    return BankNotFoundError(
        f"{filename} of ToCom bank {repo_id!r} (revision {_rev(revision)!r}) is not in the cache "
        f"({cache_dir or constants.HF_HUB_CACHE}) and the Hub ({constants.ENDPOINT}) could not be reached"
        f"{f' ({why})' if why else ''}: check your connection and retry, or fill the cache once with network "
        f"access (`tocom-hub download {repo_id}`) and set HF_HUB_OFFLINE=1",
        repo_id=repo_id,
        revision=_rev(revision),
        filename=filename,
    )


def explain_push_error(err: BaseException, repo_id: str, revision: Optional[str]) -> BankHubError:
    """The error to raise for huggingface_hub's HTTP error ``err`` while pushing a bank."""
    from huggingface_hub.errors import RepositoryNotFoundError

    status = getattr(getattr(err, "response", None), "status_code", None)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if status in (401, 403) or isinstance(err, RepositoryNotFoundError):
        todo = (
            ": check that you may write to it: pass a write token (token=... / --token) or log in with `hf auth login`"
        )
    elif status in (412, 429) or (status or 0) >= 500:
        todo = ": retry later"
    else:
        todo = ""
    return BankHubError(
        f"pushing the ToCom bank to {repo_id!r} failed (HTTP {status}: {first}){todo}",
        repo_id=repo_id,
        revision=_rev(revision),
    )


def verify_cached_file(path: str, *, repo_id: str, filename: str, revision: str) -> None:
    """Check a cached file against the hash the Hub announced for it, and evict it when it differs.

    The huggingface_hub cache stores every file as ``blobs/<etag>`` (symlinked from ``snapshots/``): the
    git blob sha1 for regular files, the SHA-256 of the content for LFS files. ``hf_hub_download``
    only checks the size, so a download that was altered on the way (same length) would otherwise
    stay in the cache and be served again and again. Reads the local file only.
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


def fetch_bank_files(
    download: Callable[..., str],
    repo_id: str,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    token: Union[str, bool, None] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    refs: Optional[Callable[[], str]] = None,
) -> str:
    """Fetch a bank's files with ``download`` (``hf_hub_download``'s signature); return the snapshot directory.

    ``tocom.safetensors`` is fetched first and pins the commit; ``tocom_config.json`` is then fetched at that
    same commit, so the two files always belong together (the config is optional: the weights carry it in
    their metadata). Each file is checked with :func:`verify_cached_file`; huggingface_hub's errors become
    ours (:func:`explain_download_error`; ``refs()`` names the repo's branches and tags for a bad revision).
    """
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    from .. import __version__

    def fetch(filename: str, rev: Optional[str]) -> str:
        try:
            path = download(
                repo_id,
                filename,
                revision=rev,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                force_download=force_download,
                library_name=LIBRARY_NAME,
                library_version=__version__,
            )
        except Exception as e:
            listed = refs() if refs is not None and isinstance(e, RevisionNotFoundError) else ""
            explained = explain_download_error(e, repo_id, filename, rev, cache_dir, local_files_only, listed)
            if explained is e:
                raise
            raise explained from e
        verify_cached_file(path, repo_id=repo_id, filename=filename, revision=_rev(revision))
        return path

    folder = os.path.dirname(fetch(WEIGHTS_NAME, revision))
    commit = os.path.basename(folder)  # the cache layout is .../snapshots/<commit sha>/<file>
    try:
        config = fetch(CONFIG_NAME, commit if _COMMIT_HASH.fullmatch(commit) else revision)
    except BankNotFoundError as e:
        if not isinstance(e.__cause__, EntryNotFoundError):
            raise
        # no tocom_config.json in the repo (or not cached): the config embedded in the weights is used
    else:
        if os.path.dirname(config) != folder:  # pragma: no cover - defensive, same commit by construction
            raise BankHubError(
                f"{CONFIG_NAME} and {WEIGHTS_NAME} of {repo_id!r} resolved to different commits",
                repo_id=repo_id,
                revision=_rev(revision),
            )
    return folder
