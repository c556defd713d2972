"""What goes wrong between a bank and the Hub, in one line each: the error types (:class:`BankHubError`,
:class:`BankNotFoundError`, :class:`DownloadTimeoutError`) and what huggingface_hub's exceptions mean for a bank
(:func:`explain_download_error`, :func:`unreachable_error`, :func:`explain_push_error`). Makes no request itself.
"""

from __future__ import annotations

from typing import Optional

from ..core.bank.config import CONFIG_NAME, WEIGHTS_NAME, PathLike

__all__ = [
    "BankHubError",
    "BankNotFoundError",
    "explain_download_error",
    "explain_push_error",
    "unreachable_error",
    "DownloadTimeoutError",
    "HubUnreachableError",
]


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


class HubUnreachableError(BankNotFoundError):
    """A bank file is not in the cache and the Hub could not be reached (no answer, or no usable one)."""


class DownloadTimeoutError(BankHubError, TimeoutError):
    """A bank file did not arrive within its deadline (``timeout=``); nothing of it was left in the cache."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """``err``'s message on one line (whitespace folded, at most ``limit`` characters), or its type's name."""
    text = " ".join(str(err).split())
    return (text[:limit] + "…" if len(text) > limit else text) or type(err).__name__


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
            f"bank (expected {WEIGHTS_NAME} + {CONFIG_NAME}, as written by tocom_hub.hub.push_bank)",
            **where,
        )
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", "?")
        first = one_line(err, 200)
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
) -> HubUnreachableError:
    """The error for a file the cache does not hold when the Hub could not be reached (``reason``: why)."""
    from huggingface_hub import constants

    why = one_line(reason, 200) if reason is not None else ""
    return HubUnreachableError(
        f"{filename} of ToCom bank {repo_id!r} (revision {_rev(revision)!r}) is not in the cache "
        f"({cache_dir or constants.HF_HUB_CACHE}) and the Hub ({constants.ENDPOINT}) could not be reached"
        f"{f' ({why})' if why else ''}: check your connection and retry, or fill the cache once with network "
        f"access (`tocom-hub download {repo_id}`) and set HF_HUB_OFFLINE=1",
        repo_id=repo_id,
        revision=_rev(revision),
        filename=filename,
    )


_TOKEN_HOW = "(token=... / --token) or log in with `hf auth login`"


def _is_connection_error(err: BaseException) -> bool:
    """Whether ``err`` says the Hub did not answer at all (DNS, refused connection, timeout, TLS)."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return any(c.__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3") for c in type(err).__mro__)


def explain_push_error(err: BaseException, repo_id: str, revision: Optional[str]) -> BaseException:
    """The one-line error to raise for ``err`` while pushing a bank (``err`` itself when it means nothing here):
    offline mode, an unreachable Hub, a rejected token, no right to write, or the Hub's HTTP error."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    where = dict(repo_id=repo_id, revision=_rev(revision))
    what = f"pushing the ToCom bank to {repo_id!r} failed"
    if isinstance(err, BankHubError):
        return err
    if isinstance(err, OfflineModeIsEnabled):
        return BankHubError(f"{what}: offline mode is on (HF_HUB_OFFLINE=1); unset it to upload", **where)
    if not isinstance(err, HfHubHTTPError):
        if _is_connection_error(err):
            return BankHubError(
                f"{what}: the Hub ({constants.ENDPOINT}) could not be reached ({one_line(err, 200)}); check your "
                f"connection and HF_ENDPOINT, then retry",
                **where,
            )
        return err
    status = getattr(getattr(err, "response", None), "status_code", None)
    server = (getattr(err, "server_message", None) or "").strip()
    reason = one_line(server or err, 200)
    if status == 401:
        todo = f"the Hub rejected the token: pass a valid write token {_TOKEN_HOW}"
    elif status == 403 or isinstance(err, RepositoryNotFoundError):
        todo = f"check that you may write to it: pass a write token {_TOKEN_HOW}"
    elif status in (412, 429) or (status or 0) >= 500:
        todo = "retry later"
    else:
        todo = ""
    return BankHubError(f"{what} (HTTP {status}: {reason}){': ' + todo if todo else ''}", **where)
