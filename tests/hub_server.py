"""A small, self-contained Hugging Face Hub test server (stdlib only).

The real ``huggingface_hub`` client talks plain HTTP to it through ``HF_ENDPOINT``; nothing in the
client is patched. Written against huggingface_hub 2.4.0. Supported endpoints:

* ``HEAD/GET /{repo}/resolve/{revision}/{filename}`` (``hf_hub_download``, ``file_exists``). Regular
  files are served directly (``ETag`` = git blob sha1). Files matching ``lfs_patterns`` are served
  like LFS files on the real Hub: a 302 to a "CDN" URL on another host name (``localhost`` vs
  ``127.0.0.1``, same port) with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``. No ``X-Xet-*``
  header is ever sent, so the client (even with ``hf_xet`` installed) downloads over plain HTTP.
* ``GET /api/{models,datasets,spaces}/{repo}[/revision/{rev}]`` (``repo_info``/``model_info``),
  ``/tree/{rev}[/{path}]`` (``list_repo_tree``, used by ``snapshot_download``), ``/refs``.
* ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``POST .../branch/{b}``, ``POST .../tag/{rev}``.
* ``POST .../preupload/{rev}`` answers ``uploadMode: "regular"`` for every file so that
  ``upload_folder``/``create_commit`` never take the LFS/Xet path (which needs a CAS server), then
  ``POST .../commit/{rev}`` applies the NDJSON payload (base64 files, file/folder deletions).
* ``POST /api/validate-yaml`` (README.md uploads via ``create_commit``) and ``GET /api/whoami-v2``.

A broken or hostile Hub, per file name (:meth:`HubServer.hostile`): a GET that stalls after its headers, a body
that trickles one byte every ``trickle_interval`` s, a body cut in half and sent without any size, an ETag that
is not a hash (``"not-a-hash"``) or names a path (``"../../escape"``); :meth:`HubServer.release` (and ``reset``)
frees the handlers that stall or trickle. ``reject_tokens = True`` answers 401 to any token but the server's.

Errors carry the ``X-Error-Code`` headers ``huggingface_hub.utils.hf_raise_for_status`` maps to
``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``RemoteEntryNotFoundError``.
The server speaks HTTP/1.0 (one request per connection), so :meth:`HubServer.stop` really cuts off
clients that keep a connection pool (e.g. an in-process ``huggingface_hub``).

Usage (fixtures from ``tests/conftest.py``)::

    def test_download(hub_server, tmp_path):            # in-process: HF_ENDPOINT == hub_server.url
        sha = hub_server.commit("org/model", {"config.json": b"{}"})
        path = hf_hub_download("org/model", "config.json", cache_dir=tmp_path)
        hub_server.stop()                               # Hub unreachable from now on
        assert hf_hub_download("org/model", "config.json", cache_dir=tmp_path) == path
        hub_server.start()

    def test_offline(hub_server, hub_client):          # subprocess, per-test HF_HOME
        hub_server.commit("org/model", {"config.json": b"{}"})
        hub_client.run("from huggingface_hub import hf_hub_download; hf_hub_download('org/model', 'config.json')")
        out = hub_client.run("import tocom_hub; result = ...", offline=True)   # HF_HUB_OFFLINE=1
        assert out.unwrap() == ... and hub_server.requests == [...]
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_LFS_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.npz",
)
REPO_TYPE_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_ACTIONS = {"revision", "tree", "refs", "preupload", "commit", "branch", "tag"}
_CDN_PREFIX = "/__lfs_cdn__/"
_SHA_COUNTER = itertools.count()  # module-level: commit shas stay unique across server resets


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob, as ``git hash-object`` computes it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """Content of the git-lfs pointer file for ``data``."""
    sha256 = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]  # full snapshot of the repo at this commit
    message: str
    parent: str | None
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str  # raw path, without the query string
    query: str
    authorization: str | None


class HubError(Exception):
    """Raised inside handlers; turned into an HTTP error response with Hub error headers."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class HubServer:
    """In-memory Hub. Thread-safe; start/stop/restart keeps its state and its port."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        username: str = "test-user",
        token: str = "hf_test_token",
        lfs_patterns: Iterable[str] = DEFAULT_LFS_PATTERNS,
    ) -> None:
        self.host, self.port = host, port
        self.username, self.token = username, token
        self._default_lfs_patterns = tuple(lfs_patterns)
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        """Endpoint to use as ``HF_ENDPOINT`` (valid once started; the port survives restarts)."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> HubServer:
        if self._httpd is None:
            httpd = ThreadingHTTPServer((self.host, self.port), _Handler)
            httpd.daemon_threads = True
            httpd.hub = self  # type: ignore[attr-defined]
            self.port = httpd.server_address[1]
            self._httpd = httpd
            self._thread = threading.Thread(
                target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"hub-server-{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: clients now get connection errors (like an unreachable Hub)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._httpd = self._thread = None

    def restart(self) -> HubServer:
        self.stop()
        return self.start()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget all repos, the request log, corruptions, forced failures and ``lfs_patterns`` changes."""
        with self._lock:
            self.lfs_patterns: tuple[str, ...] = self._default_lfs_patterns
            self._repos: dict[tuple[str, str], Repo] = {}
            self._log: list[LoggedRequest] = []
            self._corrupt: dict[tuple[str, str, str], bytes] = {}
            self.failure_status: int | None = None
            self.reject_tokens = False
            self.release()
            self._hostile: dict[str, tuple[str | None, str | None]] = {}
            self.trickle_interval = 2.0
            self._released = threading.Event()

    # ------------------------------------------------------------------ test helpers
    def add_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = False) -> str:
        """Create a repo whose ``main`` branch points to an initial, empty commit; return its sha."""
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                if not exist_ok:
                    raise ValueError(f"repo {repo_id!r} already exists")
                return self._repos[key].branches["main"]
            repo = self._repos[key] = Repo(repo_id, repo_type, private)
            return self._new_commit(repo, {}, "initial commit", None, "main")

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str],
        *,
        branch: str = "main",
        message: str = "update files",
        delete: Iterable[str] = (),
        repo_type: str = "model",
    ) -> str:
        """Add/replace ``files`` (and remove ``delete``) on top of ``branch``; return the new commit sha.

        The repo is created if needed; a missing branch is started from ``main``.
        """
        with self._lock:
            if (repo_type, repo_id) not in self._repos:
                self.add_repo(repo_id, repo_type=repo_type)
            repo = self._repo(repo_id, repo_type)
            parent = repo.branches.get(branch, repo.branches["main"])
            snapshot = dict(self._commit_by_sha(repo, parent).files)
            for path in delete:
                snapshot.pop(path, None)
            snapshot.update({p: d.encode() if isinstance(d, str) else bytes(d) for p, d in files.items()})
            return self._new_commit(repo, snapshot, message, parent, branch)

    def tag(self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Point tag ``tag`` at ``revision``; return the tagged commit sha."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            sha = self._resolve(repo, revision).sha
            repo.tags[tag] = sha
            return sha

    def branch(self, repo_id: str, name: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Create or move branch ``name`` to ``revision``; return its commit sha."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            sha = repo.branches[name] = self._resolve(repo, revision).sha
            return sha

    def resolve(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Commit sha that ``revision`` (branch, tag, full or short sha) points to."""
        with self._lock:
            return self._resolve(self._repo(repo_id, repo_type), revision).sha

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """Snapshot of the repo at ``revision`` (e.g. to check what a push uploaded)."""
        with self._lock:
            return dict(self._resolve(self._repo(repo_id, repo_type), revision).files)

    def commits(self, repo_id: str, *, repo_type: str = "model") -> list[str]:
        """All commit shas of the repo, oldest first."""
        with self._lock:
            return [c.sha for c in self._repo(repo_id, repo_type).commits]

    def has_repo(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def corrupt(self, repo_id: str, filename: str, data: bytes, *, repo_type: str = "model") -> None:
        """Serve ``data`` as the body of ``filename`` (any revision) while HEAD/metadata stay intact.

        ETag and announced size are unchanged, so a shorter ``data`` simulates a truncated download
        (the client raises ``OSError: Consistency check failed``) and same-length ``data`` a silently
        corrupted one (only a content hash check can notice).
        """
        with self._lock:
            self._corrupt[(repo_type, repo_id, filename)] = bytes(data)

    def hostile(self, filename: str, *, body: str | None = None, etag: str | None = None) -> None:
        """Serve ``filename`` (any repo, any revision) like a broken or hostile Hub.

        ``body``: ``"stall"`` (status and headers, then nothing until :meth:`release`), ``"trickle"`` (one byte
        every ``trickle_interval`` s), ``"truncate"`` (half the body, no ``Content-Length`` in HEAD or GET, no
        ``X-Linked-Size``). ``etag``: the ETag (and ``X-Linked-Etag``) announced instead of the content's hash.
        """
        if body not in (None, "stall", "trickle", "truncate"):
            raise ValueError(f"unknown hostile body mode {body!r}")
        with self._lock:
            self._hostile[filename] = (body, etag)

    def clear_hostile(self) -> None:
        """Serve every file normally again and free the handlers still stalling or trickling."""
        with self._lock:
            self._hostile.clear()
            self.release()
            self._released = threading.Event()

    def release(self) -> None:
        """Let every stalled or trickling handler finish now (they close their connection)."""
        released = getattr(self, "_released", None)
        if released is not None:
            released.set()

    def clear_corruption(self) -> None:
        with self._lock:
            self._corrupt.clear()

    def fail_requests(self, status: int | None = 503) -> None:
        """Answer every request with ``status`` (``None`` to heal). Beware: the client retries
        5xx/429 with backoff sleeps when it has no cached fallback."""
        self.failure_status = status

    @property
    def requests(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request received (path without query string)."""
        with self._lock:
            return [(r.method, r.path) for r in self._log]

    @property
    def request_log(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # ------------------------------------------------------------------ store internals
    def _repo(self, repo_id: str, repo_type: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _new_commit(self, repo: Repo, files: dict[str, bytes], message: str, parent: str | None, branch: str) -> str:
        digest = hashlib.sha1(f"{parent}\n{message}\n{next(_SHA_COUNTER)}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha1(files[path])}\n".encode())
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        repo.commits.append(Commit(digest.hexdigest(), files, message, parent, date))
        repo.branches[branch] = digest.hexdigest()
        return digest.hexdigest()

    @staticmethod
    def _commit_by_sha(repo: Repo, sha: str) -> Commit:
        return next(c for c in repo.commits if c.sha == sha)

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        rev = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        sha = repo.branches.get(rev) or repo.tags.get(rev)
        if sha is None and re.fullmatch(r"[0-9a-f]{7,40}", rev):
            matches = [c.sha for c in repo.commits if c.sha.startswith(rev)]
            sha = matches[0] if len(matches) == 1 else None
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self._commit_by_sha(repo, sha)

    def _check_access(self, repo: Repo, authorization: str | None) -> None:
        if repo.private and authorization != f"Bearer {self.token}":
            raise HubError(401, "Invalid username or password.", "RepoNotFound")

    def _is_lfs(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], pat) for pat in self.lfs_patterns)

    def _entry(self, path: str, data: bytes, *, tree: bool) -> dict[str, Any]:
        """A file as listed by ``/tree`` (``tree=True``) or in ``siblings`` (``blobs=True``)."""
        lfs = self._is_lfs(path)
        entry: dict[str, Any] = {
            "size": len(data),
            "oid" if tree else "blobId": git_blob_sha1(lfs_pointer(data) if lfs else data),
        }
        if tree:
            entry.update(type="file", path=path)
        else:
            entry["rfilename"] = path
        if lfs:
            sha256 = hashlib.sha256(data).hexdigest()
            entry["lfs"] = {
                "oid" if tree else "sha256": sha256,
                "size": len(data),
                "pointerSize": len(lfs_pointer(data)),
            }
        return entry


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the :class:`HubServer` attached to the ``ThreadingHTTPServer``."""

    protocol_version = "HTTP/1.0"
    server_version = "tocom-hub-test-server"

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr logging
        pass

    def do_HEAD(self) -> None:
        self._dispatch()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD

    # ------------------------------------------------------------------ plumbing
    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.raw_path, self.query = split.path, parse_qs(split.query)
        auth = self.headers.get("Authorization")
        self.body = self._read_body() if self.command not in ("GET", "HEAD") else b""  # read outside the lock
        with self.hub._lock:
            self.hub._log.append(LoggedRequest(self.command, self.raw_path, split.query, auth))
        try:
            if self.hub.failure_status is not None:
                raise HubError(self.hub.failure_status, "Simulated Hub failure")
            if self.hub.reject_tokens and auth is not None and auth != f"Bearer {self.hub.token}":
                raise HubError(401, "Invalid credentials in Authorization header")
            self._route()
        except HubError as e:
            headers = {"X-Error-Message": e.message.encode("ascii", "backslashreplace").decode()}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._send_json({"error": e.message}, e.status, headers)
        except Exception:  # pragma: no cover - surfaced to the client for debugging
            self._send_json({"error": traceback.format_exc()}, 500)

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/octet-stream",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers, "application/json")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self) -> Any:
        return json.loads(self.body or b"{}")

    def _base_url(self) -> str:
        return f"http://{self.headers.get('Host') or f'{self.hub.host}:{self.hub.port}'}"

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub._repo(repo_id, repo_type)
        self.hub._check_access(repo, self.headers.get("Authorization"))
        return repo

    # ------------------------------------------------------------------ routing
    def _route(self) -> None:
        path, method = self.raw_path, self.command
        hub = self.hub
        if path.startswith(_CDN_PREFIX) and method in ("GET", "HEAD"):
            repo_type, repo_id, sha, filename = (unquote(p) for p in path[len(_CDN_PREFIX) :].split("/"))
            with hub._lock:
                data = hub._commit_by_sha(hub._repo(repo_id, repo_type), sha).files[filename]
                data = hub._corrupt.get((repo_type, repo_id, filename), data)
                body, _ = hub._hostile.get(filename, (None, None))
            if body is not None:
                return self._send_hostile(data, {}, body)
            return self._send_file(data, {})
        if path == "/api/whoami-v2":
            return self._send_json(
                {
                    "type": "user",
                    "name": hub.username,
                    "fullname": hub.username,
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
                }
            )
        if path == "/api/validate-yaml" and method == "POST":
            return self._send_json({"errors": [], "warnings": []})
        if path in ("/api/repos/create", "/api/repos/delete"):
            return self._create_or_delete_repo(self._json(), create=path.endswith("create"))
        if path.startswith("/api/"):
            return self._api(path[len("/api/") :].split("/"))
        if "/resolve/" in path and method in ("GET", "HEAD"):
            return self._resolve_file(path)
        raise HubError(404, f"Not found: {method} {path} (unsupported by the test server)")

    def _create_or_delete_repo(self, payload: dict[str, Any], *, create: bool) -> None:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.hub.username}/{payload['name']}"
        url = f"{self._base_url()}/{REPO_TYPE_PREFIXES[repo_type]}{repo_id}"
        with self.hub._lock:
            exists = self.hub.has_repo(repo_id, repo_type=repo_type)
            if not create:
                if not exists:
                    raise HubError(404, "Repository not found", "RepoNotFound")
                del self.hub._repos[(repo_type, repo_id)]
                return self._send_json({})
            if exists:
                return self._send_json({"error": "You already created this repo", "url": url}, 409)
            self.hub.add_repo(repo_id, repo_type=repo_type, private=payload.get("visibility") == "private")
        self._send_json({"url": url, "name": repo_id})

    def _api(self, segs: list[str]) -> None:
        types = {"models": "model", "datasets": "dataset", "spaces": "space"}
        if not segs or segs[0] not in types:
            raise HubError(404, f"Not found: {self.raw_path}")
        repo_type, segs = types[segs[0]], segs[1:]
        # repo ids are "name" or "namespace/name": find where the action keyword (if any) starts
        n = next((i for i in (2, 1) if len(segs) > i and segs[i] in _API_ACTIONS), len(segs))
        if n not in (1, 2):
            raise HubError(404, f"Not found: {self.raw_path}")
        repo_id, action = "/".join(segs[:n]), (segs[n] if len(segs) > n else None)
        args = [unquote(s) for s in segs[n + 1 :]]
        method, hub = self.command, self.hub
        with hub._lock:
            repo = self._repo(repo_type, repo_id)
            if action in (None, "revision") and method == "GET":
                commit = hub._resolve(repo, args[0] if args else "main")
                return self._send_json(self._repo_info(repo, commit))
            if action == "tree" and method == "GET":
                commit = hub._resolve(repo, args[0] if args else "main")
                return self._send_json(self._tree(commit, "/".join(args[1:]).strip("/")))
            if action == "refs" and method == "GET":

                def refs(kind: str, items: dict[str, str]) -> list[dict[str, str]]:
                    return [{"name": k, "ref": f"refs/{kind}/{k}", "targetCommit": v} for k, v in items.items()]

                heads = {k: v for k, v in repo.branches.items() if not k.startswith("refs/pr/")}
                prs = [{"name": k, "ref": k, "targetCommit": v} for k, v in repo.branches.items() if k not in heads]
                return self._send_json(
                    {
                        "branches": refs("heads", heads),
                        "tags": refs("tags", repo.tags),
                        "converts": [],
                        "pullRequests": prs,
                    }
                )
            if action == "preupload" and method == "POST":
                files = hub._resolve(repo, args[0]).files
                return self._send_json(
                    {
                        "files": [
                            {
                                "path": f["path"],
                                "uploadMode": "regular",
                                "shouldIgnore": False,
                                "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None,
                            }
                            for f in self._json().get("files", [])
                        ]
                    }
                )
            if action == "commit" and method == "POST":
                return self._commit(repo, args[0])
            if action == "branch" and method in ("POST", "DELETE"):
                if method == "DELETE":
                    repo.branches.pop(args[0], None)
                    return self._send_json({})
                if args[0] in repo.branches:
                    raise HubError(409, f"Branch {args[0]} already exists")
                start = self._json().get("startingPoint") or "main"
                repo.branches[args[0]] = hub._resolve(repo, start).sha
                return self._send_json({})
            if action == "tag" and method in ("POST", "DELETE"):
                if method == "DELETE":
                    repo.tags.pop(args[0], None)
                    return self._send_json({})
                tag = self._json()["tag"]
                if tag in repo.tags:
                    raise HubError(409, f"Tag {tag} already exists")
                repo.tags[tag] = hub._resolve(repo, args[0]).sha
                return self._send_json({})
        raise HubError(404, f"Not found: {method} {self.raw_path} (unsupported by the test server)")

    def _repo_info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = [
            self.hub._entry(p, d, tree=False) if blobs else {"rfilename": p} for p, d in sorted(commit.files.items())
        ]
        return {
            "_id": repo.repo_id,
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.commits[0].date,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }

    def _tree(self, commit: Commit, prefix: str) -> list[dict[str, Any]]:
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in commit.files.items():
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # parent folders
                folder = base + "/".join(parts[:i])
                entries[folder] = {
                    "type": "directory",
                    "path": folder,
                    "size": 0,
                    "oid": hashlib.sha1(f"{commit.sha}:{folder}".encode()).hexdigest(),
                }
            if recursive or len(parts) == 1:
                entries[path] = self.hub._entry(path, data, tree=True)
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist on {commit.sha}", "EntryNotFound")
        return [entries[k] for k in sorted(entries)]

    def _commit(self, repo: Repo, revision: str) -> None:
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next((ln["value"] for ln in lines if ln["key"] == "header"), {})
        branch = revision.removeprefix("refs/heads/")
        if "create_pr" in self.query:
            base = self.hub._resolve(repo, branch).sha
            num = 1 + sum(b.startswith("refs/pr/") for b in repo.branches)
            branch = f"refs/pr/{num}"
            repo.branches[branch] = base
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (not a branch)", "RevisionNotFound")
        head = repo.branches[branch]
        if header.get("parentCommit") and header["parentCommit"] != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(self.hub._commit_by_sha(repo, head).files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(folder)}
            elif key != "header":
                raise HubError(
                    400,
                    f"Commit operation {key!r} is not supported by the test server "
                    "(preupload always answers uploadMode='regular')",
                )
        sha = self.hub._new_commit(repo, files, header.get("summary", ""), head, branch)
        repo_url = f"{self._base_url()}/{REPO_TYPE_PREFIXES[repo.repo_type]}{repo.repo_id}"
        pr_url = f"{repo_url}/discussions/{branch.rsplit('/', 1)[-1]}" if branch.startswith("refs/pr/") else None
        self._send_json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{repo_url}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    # ------------------------------------------------------------------ file downloads
    def _resolve_file(self, path: str) -> None:
        repo_part, rest = path.lstrip("/").split("/resolve/", 1)
        repo_type = "model"
        for rtype, prefix in REPO_TYPE_PREFIXES.items():
            if prefix and repo_part.startswith(prefix):
                repo_type, repo_part = rtype, repo_part[len(prefix) :]
        revision, _, filename = rest.partition("/")
        revision, filename = unquote(revision), unquote(filename)
        with self.hub._lock:
            repo = self._repo(repo_type, repo_part)
            commit = self.hub._resolve(repo, revision)
            if filename not in commit.files:
                raise HubError(404, "Entry not found", "EntryNotFound", commit=commit.sha)
            data = commit.files[filename]
            served = self.hub._corrupt.get((repo_type, repo_part, filename), data)
            body, bad_etag = self.hub._hostile.get(filename, (None, None))
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if not self.hub._is_lfs(filename):
            headers["ETag"] = f'"{bad_etag or git_blob_sha1(data)}"'
            if body is not None:
                return self._send_hostile(served, headers, body)
            return self._send_file(served, headers, announced=len(data))
        # LFS file: redirect to a "CDN" on another host name so the client treats it as off-Hub.
        host = urlsplit(self._base_url()).hostname
        cdn_host = "127.0.0.1" if host == "localhost" else "localhost"
        location = (
            f"http://{cdn_host}:{self.hub.port}{_CDN_PREFIX}{repo_type}/{quote(repo_part, safe='')}/"
            f"{commit.sha}/{quote(filename, safe='')}"
        )
        linked = {
            "ETag": f'"{bad_etag or git_blob_sha1(lfs_pointer(data))}"',
            "X-Linked-Etag": f'"{bad_etag or hashlib.sha256(data).hexdigest()}"',
        }
        if body != "truncate":
            linked["X-Linked-Size"] = str(len(data))
        self._send(302, b"", {**headers, "Location": location, **linked})

    def _send_hostile(self, data: bytes, headers: dict[str, str], body: str) -> None:
        """Answer like a broken Hub (see :meth:`HubServer.hostile`); HEAD gets the headers only."""
        released, interval = self.hub._released, self.hub.trickle_interval
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        if body != "truncate":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.flush()
        if self.command == "HEAD":
            return
        try:
            if body == "truncate":
                self.wfile.write(data[: len(data) // 2])
            elif body == "stall":
                released.wait(60)
            else:
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    if released.wait(interval):
                        return
        except OSError:  # the client gave up
            return

    def _send_file(self, data: bytes, headers: dict[str, str], announced: int | None = None) -> None:
        """Send ``data`` honouring a ``Range: bytes=a-[b]`` header. HEAD announces ``announced`` bytes."""
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if self.command == "HEAD":
            self.send_response(200)
            for key, value in {**headers, "Content-Length": str(len(data) if announced is None else announced)}.items():
                self.send_header(key, value)
            return self.end_headers()
        if match:
            start, end = int(match[1]), int(match[2] or len(data) - 1)
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
            return self._send(206, data[start : end + 1], headers)
        self._send(200, data, headers)


# ---------------------------------------------------------------------- subprocess client helpers
_CLIENT_PRELUDE = r"""
import json, sys
ns = {"__name__": "__hub_client__"}
try:
    exec(compile(sys.argv[1], "<hub-client>", "exec"), ns)
    payload = {"result": ns.get("result")}
except BaseException as e:
    payload = {"error": {"type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                         "message": str(e)}}
print("\n@@HUB_CLIENT_RESULT@@" + json.dumps(payload, default=str))
"""


@dataclass
class ClientResult:
    """Outcome of :func:`run_client`: the script's ``result`` variable, or the exception it raised."""

    result: Any = None
    error_type: str | None = None
    error_mro: list[str] = field(default_factory=list)
    error_message: str | None = None
    stdout: str = ""
    stderr: str = ""

    def raised(self, exc_name: str) -> bool:
        """Whether the script raised ``exc_name`` or a subclass of it (matched by class name)."""
        return exc_name in self.error_mro

    def unwrap(self) -> Any:
        if self.error_type is not None:
            raise AssertionError(f"client raised {self.error_type}: {self.error_message}\n{self.stderr}")
        return self.result


def client_env(
    endpoint: str, hf_home: str | os.PathLike[str], *, offline: bool = False, **extra: str
) -> dict[str, str]:
    """Environment for a subprocess using ``huggingface_hub`` against ``endpoint`` with an isolated cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.pop("TRANSFORMERS_OFFLINE", None)
    repo_root = str(Path(__file__).resolve().parents[1])
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(Path(hf_home) / "hub"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1" if offline else "0",
        PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


def run_client(code: str, env: Mapping[str, str], *, timeout: float = 120) -> ClientResult:
    """Run ``code`` in a fresh interpreter (env read at import time, e.g. ``HF_HUB_OFFLINE``).

    The code may set a JSON-serialisable variable ``result``; exceptions are captured by name.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _CLIENT_PRELUDE, code], env=dict(env), capture_output=True, text=True, timeout=timeout
    )
    out, marker, payload = proc.stdout.rpartition("@@HUB_CLIENT_RESULT@@")
    if not marker:
        raise RuntimeError(f"client subprocess crashed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    data = json.loads(payload)
    err = data.get("error") or {}
    return ClientResult(data.get("result"), err.get("type"), err.get("mro", []), err.get("message"), out, proc.stderr)


class HubClient:
    """Runs client code in subprocesses that share one isolated ``HF_HOME`` (so the cache persists)."""

    def __init__(self, server: HubServer, hf_home: str | os.PathLike[str]) -> None:
        self.server, self.hf_home = server, Path(hf_home)
        self.cache_dir = self.hf_home / "hub"

    def env(self, *, offline: bool = False, **extra: str) -> dict[str, str]:
        return client_env(self.server.url, self.hf_home, offline=offline, **extra)

    def run(self, code: str, *, offline: bool = False, timeout: float = 120, **extra_env: str) -> ClientResult:
        return run_client(code, self.env(offline=offline, **extra_env), timeout=timeout)
