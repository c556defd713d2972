"""What is in the cache is what the Hub announced and what the bank says it is: content hashes of blobs
(:func:`content_hash`, :func:`verify_cached_file`), the bank's own checks after a download (:func:`verify_bank`),
eviction (:func:`evict_snapshot`), and the path checks that keep every write inside the cache. Local files only.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional

from ..core.bank.config import CONFIG_NAME, WEIGHTS_NAME, PathLike
from ..core.bank.file import read_bank
from .errors import BankHubError, _rev, one_line

__all__ = ["is_hash", "content_hash", "verify_cached_file", "verify_bank", "evict_snapshot", "COMMIT"]

COMMIT = re.compile(r"[0-9a-f]{40}")  # a commit sha, and the git blob sha1 of a regular file
_SHA256 = re.compile(r"[0-9a-f]{64}")  # the blob name of an LFS file


def is_hash(name: object) -> bool:
    """Whether ``name`` is a git sha1 or a SHA-256 in lowercase hex (the only names a blob may have)."""
    return isinstance(name, str) and bool(COMMIT.fullmatch(name) or _SHA256.fullmatch(name))


def unlink_quiet(path: str) -> bool:
    """Remove ``path``; ``True`` when it is gone (or was never there)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def inside(path: str, root: str) -> bool:
    """Whether ``path``, symlinks resolved, lies inside the directory ``root``."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, base]) == base


def content_hash(path: str, name: str) -> tuple:
    """``(hex digest, algorithm)`` of the file at ``path`` in the algorithm a blob called ``name`` uses."""
    if _SHA256.fullmatch(name):
        h, algo = hashlib.sha256(), "SHA-256"
    else:
        h, algo = hashlib.sha1(b"blob %d\0" % os.path.getsize(path)), "git blob sha1"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest(), algo


def verify_cached_file(path: str, *, repo_id: str, filename: str, revision: str, cache_dir: Optional[PathLike]) -> None:
    """Check a cached file against the hash it is stored under (``blobs/<etag>``: git blob sha1 or SHA-256), and
    evict it when it differs, when its name is not a hash, or when it lies outside the cache. Reads local files."""
    from huggingface_hub import constants

    blob = os.path.realpath(path)
    if blob == os.path.abspath(path):
        return  # no symlinks (e.g. Windows without developer mode): nothing to compare with
    cache = os.fspath(cache_dir or constants.HF_HUB_CACHE)
    name = os.path.basename(blob)
    where = dict(repo_id=repo_id, revision=revision, filename=filename)
    what = f"{filename} of ToCom bank {repo_id!r} (revision {revision!r})"
    if not inside(blob, cache):
        unlink_quiet(path)
        raise BankHubError(f"{what} points outside the cache ({blob}); the link was removed: run again", **where)
    if is_hash(name):
        actual, algo = content_hash(blob, name)
        if actual == name:
            return
        why = f"is corrupted: its {algo} is {actual}, the Hub announced {name}"
    else:
        why = f"is cached under {name!r}, which is not a hash, so it cannot be verified"
    removed = all(unlink_quiet(p) for p in (path, blob))
    todo = (
        "the copy was removed from the cache: run again to download it afresh"
        if removed
        else f"delete {path} and {blob} (or pass force_download=True) and run again"
    )
    raise BankHubError(f"{what} {why}; {todo}", **where)


def evict_snapshot(folder: PathLike, cache_dir: Optional[PathLike] = None) -> bool:
    """Remove a bank's files from a cache snapshot folder (the links and the blobs inside the cache they point
    to); ``True`` when everything went."""
    from huggingface_hub import constants

    cache = os.fspath(cache_dir or constants.HF_HUB_CACHE)
    ok = True
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        pointer = os.path.join(folder, name)
        blob = os.path.realpath(pointer)
        if os.path.lexists(pointer):
            ok &= unlink_quiet(pointer)
        if blob != os.path.abspath(pointer) and os.path.exists(blob) and inside(blob, cache):
            ok &= unlink_quiet(blob)
    return ok


def verify_bank(folder: str, repo_id: str, revision: Optional[str], cache: str) -> None:
    """The bank's own checks on a downloaded folder (checksum, config, shapes); evict it when they fail."""
    try:
        read_bank(Path(folder), trust_unverified=True)  # whether to trust a file without checksum: load_bank's call
    except (ValueError, OSError) as e:
        removed = evict_snapshot(folder, cache)
        todo = (
            "the copy was removed from the cache: run again to download it afresh"
            if removed
            else f"delete {folder} and run again"
        )
        raise BankHubError(
            f"ToCom bank {repo_id!r} (revision {_rev(revision)!r}, commit {os.path.basename(folder)[:12]}) failed "
            f"its own checks after download ({one_line(e, 240)}); {todo}",
            repo_id=repo_id,
            revision=_rev(revision),
        ) from None
