"""Getting a bank's files into the huggingface_hub cache, bounded and verified: :func:`download_bank` (what
``tocom-hub download`` and :func:`tocom_hub.load_bank` run).

Per file, one worker thread asks the Hub for the file's metadata (``get_hf_file_metadata``: commit, ETag,
size, location) and downloads it (``http_get``) into the cache's own layout (``blobs/<etag>``, linked from
``snapshots/<commit>/<file>``, ``refs/<revision>``), with these guarantees:

- **a deadline**: the whole file (metadata + body) must arrive within ``timeout`` seconds
  (:data:`DEFAULT_TIMEOUT`); a Hub that stalls or trickles is abandoned at the deadline (the worker is told to
  stop at its next byte and can no longer publish anything), its partial file removed, and
  :class:`~.errors.DownloadTimeoutError` names the file and the deadline;
- **names that are hashes**: a commit that is not a 40-hex sha or an ETag that is neither a git blob sha1
  nor a SHA-256 is refused before anything is written, so no answer of the Hub can name a path (``../``);
- **content that matches its name**: the body is hashed before it is moved into ``blobs/`` (a truncated or
  altered body never enters the cache); a cached file is hashed again on every use and evicted when it
  differs (:func:`~.verify.verify_cached_file`); finally the bank's own checks run (:func:`~.verify.verify_bank`:
  the ``tocom_sha256`` checksum, the config, the shapes) and a bank that fails them is evicted, so the next call
  downloads again.

Offline (``local_files_only=True`` / ``HF_HUB_OFFLINE=1``) or when the Hub cannot be reached, files come from
the cache (``hf_hub_download(local_files_only=True)``, which makes no request).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, List, Optional, Set, Union
from urllib.parse import urlsplit

from ..core.bank.config import CONFIG_NAME, LIBRARY_NAME, WEIGHTS_NAME, PathLike
from .errors import (
    BankHubError,
    BankNotFoundError,
    DownloadTimeoutError,
    HubUnreachableError,
    _rev,
    explain_download_error,
    unreachable_error,
)
from .verify import COMMIT, content_hash, inside, is_hash, unlink_quiet, verify_bank, verify_cached_file

__all__ = ["download_bank", "abandoned_downloads", "check_timeout", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 120.0  # seconds per file, metadata request included (a bank is a few MB)
_ABANDONED: List[threading.Thread] = []  # workers left behind at a deadline (see abandoned_downloads)


def abandoned_downloads() -> List[threading.Thread]:
    """The worker threads of downloads abandoned at their deadline that are still running (each stops at its
    next received byte, or when its connection ends; none can write into the cache any more)."""
    _ABANDONED[:] = [t for t in _ABANDONED if t.is_alive()]
    return list(_ABANDONED)


def check_timeout(timeout: Any) -> float:
    """``timeout`` as a float, or ``ValueError``: a download deadline is a finite number of seconds > 0."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a finite number of seconds > 0; got {timeout!r}")
    return float(timeout)


_WORKER = "tocom-hub-download"  # the name of every download worker thread


class _QuietWorkers(logging.Filter):
    """Drops huggingface_hub's retry chatter ("Trying to resume download...", "Retrying in 1s") logged from our
    workers: a download that fails says so in one line, at its deadline (other threads' records pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != _WORKER


def _quiet_hf_retries() -> None:
    for name in ("huggingface_hub.file_download", "huggingface_hub.utils._http"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietWorkers) for f in logger.filters):
            logger.addFilter(_QuietWorkers())


class _Job:
    """What a download's worker and the thread waiting for it share: the cancel flag and the partial files."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = False
        self.partial: Set[str] = set()

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            for path in list(self.partial):
                unlink_quiet(path)


class _Cancelled(Exception):
    pass


class _Sink:
    """The file ``http_get`` writes to; once the job is cancelled every write raises, which ends the worker."""

    def __init__(self, f: Any, job: _Job) -> None:
        self._f, self._job = f, job

    def write(self, data: bytes) -> int:
        if self._job.cancelled:
            raise _Cancelled()
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _bounded(work: Callable[[_Job], Any], *, timeout: float, expired: Callable[[], BaseException]) -> Any:
    """``work(job)`` in a worker thread; at ``timeout`` the job is cancelled, its partial files removed and
    ``expired()`` raised (the thread is left to end by itself, see :func:`abandoned_downloads`)."""
    _quiet_hf_retries()
    job, box = _Job(), {}

    def run() -> None:
        try:
            box["value"] = work(job)
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e

    thread = threading.Thread(target=run, name=_WORKER, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        job.cancel()
        _ABANDONED.append(thread)
        raise expired()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _link(blob: str, pointer: str) -> None:
    os.makedirs(os.path.dirname(pointer), exist_ok=True)
    unlink_quiet(pointer)
    try:
        os.symlink(os.path.relpath(blob, os.path.dirname(pointer)), pointer)
    except OSError:  # no symlinks here (e.g. Windows without developer mode): a copy, as huggingface_hub does
        shutil.copyfile(blob, pointer)


def _write_ref(storage: str, revision: Optional[str], commit: str) -> None:
    revision = revision or "main"
    if revision == commit:
        return
    ref = os.path.join(storage, "refs", revision)
    if not inside(ref, storage):
        return
    os.makedirs(os.path.dirname(ref), exist_ok=True)
    if not os.path.isfile(ref) or Path(ref).read_text() != commit:
        Path(ref).write_text(commit)


def _from_cache(repo_id: str, filename: str, revision: Optional[str], cache_dir: Optional[PathLike]) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=True)


def _download_file(
    job: _Job,
    repo_id: str,
    filename: str,
    revision: Optional[str],
    cache: str,
    token: Union[str, bool, None],
    force_download: bool,
    timeout: float,
) -> Optional[str]:
    """The worker: metadata, checks, body into ``blobs/`` when its hash matches its name; the snapshot path."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.file_download import http_get, repo_folder_name
    from huggingface_hub.utils import build_hf_headers

    from .. import __version__

    where = dict(repo_id=repo_id, revision=_rev(revision), filename=filename)
    what = f"{filename} of ToCom bank {repo_id!r} (revision {_rev(revision)!r})"
    url = hf_hub_url(repo_id, filename, revision=revision)
    library = dict(library_name=LIBRARY_NAME, library_version=str(__version__))
    try:
        meta = get_hf_file_metadata(url, token=token, timeout=min(timeout, constants.HF_HUB_ETAG_TIMEOUT), **library)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, GatedRepoError):
        raise  # the Hub answered precisely: explain_download_error says what to do
    except Exception as e:  # no answer (or 5xx, 401, ...): the cache may still hold the file
        try:
            return _from_cache(repo_id, filename, revision, cache)
        except Exception:
            pass
        if isinstance(e, HfHubHTTPError):
            raise
        raise unreachable_error(repo_id, filename, revision, cache, e) from None
    commit, etag = meta.commit_hash, meta.etag
    if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
        raise BankHubError(
            f"the Hub answered for {what} with commit {commit!r}, which is not a commit sha: nothing was written "
            f"(is HF_ENDPOINT={constants.ENDPOINT} a Hugging Face Hub?)",
            **where,
        )
    if not is_hash(etag):
        raise BankHubError(
            f"the Hub announced ETag {etag!r:.80} for {what}, which is neither a git nor a SHA-256 hash: refusing "
            f"to write it into the cache (is HF_ENDPOINT={constants.ENDPOINT} a Hugging Face Hub?)",
            **where,
        )
    storage = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    blob = os.path.join(storage, "blobs", etag)
    pointer = os.path.join(storage, "snapshots", commit, *filename.split("/"))
    if not force_download and os.path.exists(pointer):
        _write_ref(storage, revision, commit)
        return pointer
    if not force_download and os.path.isfile(blob):  # same content under another commit (checked by the caller)
        _link(blob, pointer)
        _write_ref(storage, revision, commit)
        return pointer

    headers = build_hf_headers(token=token, **library)
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed CDN url: the token stays with the Hub
    os.makedirs(os.path.dirname(blob), exist_ok=True)
    partial = f"{blob}.{uuid.uuid4().hex[:8]}.incomplete"
    with job.lock:  # created under the lock: a cancelled job never leaves a file behind
        if job.cancelled:
            return None
        f = open(partial, "wb")
        job.partial.add(partial)
    try:
        with f:
            sink = _Sink(f, job)
            http_get(meta.location, sink, headers=headers, expected_size=meta.size, displayed_filename=filename)
        actual, algo = content_hash(partial, etag)
        if actual != etag:
            raise BankHubError(
                f"the download of {what} is incomplete or corrupted: its {algo} is {actual}, the Hub announced {etag}; "
                f"nothing was kept in the cache: retry",
                **where,
            )
        with job.lock:
            if job.cancelled:
                return None
            os.replace(partial, blob)
            _link(blob, pointer)
            _write_ref(storage, revision, commit)
    finally:
        unlink_quiet(partial)
        job.partial.discard(partial)
    return pointer


def _available_refs(repo_id: str, token: Union[str, bool, None]) -> str:
    """``" (branches: main, dev; tags: v1)"`` or ``""`` when the refs cannot be listed within 10 s."""
    from huggingface_hub import HfApi

    try:
        refs = _bounded(lambda job: HfApi().list_repo_refs(repo_id, token=token), timeout=10, expired=TimeoutError)
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
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Download (or find in the cache) a bank's files; return the local snapshot directory.

    ``tocom.safetensors`` is fetched first and pins the commit; ``tocom_config.json`` follows at that same
    commit (it is optional: the weights carry the config in their metadata). Each file must arrive within
    ``timeout`` seconds (default :data:`DEFAULT_TIMEOUT`); what arrives is checked as the module docstring says,
    and a bank that fails its own checks is evicted. Example::

        path = tocom_hub.hub.download_bank("org/tocom-deit-base", revision="v1.0")
        bank = tocom_hub.ToComBank.from_pretrained(path)

    Raises:
        BankNotFoundError: the repo / revision / ``tocom.safetensors`` does not exist, or is not cached while
            offline or with the Hub unreachable (a ``FileNotFoundError``).
        DownloadTimeoutError: a file did not arrive within ``timeout`` (a ``TimeoutError``).
        BankHubError: a corrupted, incomplete or unverifiable download, or any other Hub failure.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    timeout = check_timeout(timeout)
    cache = os.fspath(cache_dir or constants.HF_HUB_CACHE)
    offline = local_files_only or constants.HF_HUB_OFFLINE

    def fetch(filename: str, rev: Optional[str]) -> str:
        def expired() -> BaseException:
            return DownloadTimeoutError(
                f"{filename} of ToCom bank {repo_id!r} (revision {_rev(rev)!r}) did not arrive within the "
                f"{timeout:g} s deadline (the Hub at {constants.ENDPOINT} stalled or is too slow); nothing was kept "
                f"in the cache: retry, or allow more time (timeout= / --timeout)",
                repo_id=repo_id,
                revision=_rev(rev),
                filename=filename,
            )

        try:
            validate_repo_id(repo_id)
            if offline:
                path = _from_cache(repo_id, filename, rev, cache_dir)
            else:
                work = lambda job: _download_file(job, repo_id, filename, rev, cache, token, force_download, timeout)  # noqa: E731
                path = _bounded(work, timeout=timeout, expired=expired)
        except Exception as e:
            listed = _available_refs(repo_id, token) if isinstance(e, RevisionNotFoundError) else ""
            explained = explain_download_error(e, repo_id, filename, rev, cache_dir, local_files_only, listed)
            if explained is e:
                raise
            raise explained from e
        verify_cached_file(path, repo_id=repo_id, filename=filename, revision=_rev(revision), cache_dir=cache)
        return path

    folder = os.path.dirname(fetch(WEIGHTS_NAME, revision))
    commit = os.path.basename(folder)  # the cache layout is .../snapshots/<commit sha>/<file>
    try:
        fetch(CONFIG_NAME, commit if COMMIT.fullmatch(commit) else revision)
    except BankNotFoundError as e:
        if not isinstance(e, HubUnreachableError) and not isinstance(e.__cause__, EntryNotFoundError):
            raise
        # no tocom_config.json in the repo (or not cached, and no Hub to ask): the weights carry the config
    verify_bank(folder, repo_id, revision, cache)
    return folder
