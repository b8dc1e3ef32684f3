"""A local Hugging Face Hub for tests: the HTTP endpoints the real ``huggingface_hub`` (2.4) client calls.

The server runs in a thread (``http.server``), bound to ``127.0.0.1`` on a free port. Point the client at
it with ``HF_ENDPOINT`` (the ``hub_server`` fixture does that, for this process and for subprocesses) and
the client's own code runs unpatched: downloads, Range reads, repo creation, pre-upload, LFS upload and
commits travel over HTTP and are answered here, from repos held in memory (or files on disk).

Served (model repos only; ``{repo}`` is ``org/name``, ``{rev}`` a branch, tag or 40-hex commit, URL-quoted):

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info (``sha``, ``siblings``;
  sizes, blob ids and LFS info with ``?blobs=true``)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``?recursive=true``): the file listing, one page
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` (git blob id, or the
  sha256 for LFS files, which also get ``X-Linked-Etag`` / ``X-Linked-Size``), ``Content-Length``,
  ``Accept-Ranges``; ``Range: bytes=a-b`` answers 206 with ``Content-Range`` (416 past the end). Files are
  served directly (200), not through a redirect to a CDN.
- errors as the Hub sends them: 404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound`` (the client raises ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` /
  ``RemoteEntryNotFoundError``); 401 for writes without the server's token
- ``POST /api/repos/create`` (409 if it exists; a new repo gets the Hub's initial commit with
  ``.gitattributes``), ``POST /api/validate-yaml``
- ``POST /api/models/{repo}/preupload/{rev}``: ``uploadMode`` ``lfs`` for binary files (a NUL byte in the
  512-byte sample) and files of 10 MB or more, else ``regular``; ``oid`` of the file already there, if any
- ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer), then ``PUT /_lfs/{repo}/{oid}`` and
  ``POST /_lfs/{repo}/{oid}/verify``: the body is checked against its sha256 and size
- ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: ``header``, ``file``, ``lfsFile``, ``deletedFile``,
  ``deletedFolder``; ``parentCommit`` checked): one new commit with a new sha; an ``lfsFile`` whose object
  was never uploaded is refused (422) and nothing is committed

Not served: Xet. Downloads are plain HTTP because no response carries ``X-Xet-Hash``. Uploads are the
client's own choice: with ``hf_xet`` installed and ``HF_HUB_DISABLE_XET`` unset it uploads LFS files
through Xet, asking ``/api/models/{repo}/xet-write-token/{rev}`` first; that answers 501 here, so such an
upload fails before any commit. The fixture sets ``HF_HUB_DISABLE_XET=1`` (uploads then use LFS basic
transfer); ``hub_server.xet(True)`` undoes that for a test.

API for tests: ``server.add_repo(repo_id, files, private=, gated=, tags=)`` (``files``: ``{path: bytes | Path}``
or a folder) makes a repo whose ``main`` (and ``tags``) point at one commit, returns its sha;
``server.add_commit(repo_id, files, delete=)`` adds one on ``main``; ``server.commits(repo_id)`` lists
:class:`Commit` (oldest first: ``sha``, ``parent``, ``message``, ``files`` = ``{path: Blob}``);
``server.files(repo_id, rev)`` returns ``{path: bytes}``; ``server.requests`` records every request;
``server.fail(method, path_regex, status)`` makes matching requests fail; ``server.stop()`` makes the
Hub unreachable. ``HubServer(storage=folder)`` streams uploaded LFS objects to disk (for large
checkpoints); repos added from a folder are served from their files (sendfile), not copied into memory.
``HubServer(sink=True)`` checks each uploaded LFS object (sha256, size) and keeps only those two: the
bytes are dropped (benchmarks push whole checkpoints without the disk for a copy; such files cannot be
downloaded or read back, their commits and listings work). ``server.traffic`` counts body bytes:
``served`` (file downloads, full or ranged) and ``uploaded`` (LFS objects received).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

TOKEN = "hf_local_test_server_token"
LFS_MIN_SIZE = 10 * 1000 * 1000  # the Hub stores files of 10 MB or more in LFS
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_CHUNK = 1 << 20


def git_blob_id(data: bytes) -> str:
    """git's object id of a blob (what the Hub calls a regular file's ``oid`` / ``blobId``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    """A file's content, in memory (``data``) or on disk (``path``), with its hashes."""

    size: int
    sha256: str
    lfs: bool
    data: bytes | None = None
    path: Path | None = None

    @classmethod
    def of(cls, content: bytes | os.PathLike, lfs: bool | None = None) -> "Blob":
        if isinstance(content, (bytes, bytearray)):
            data = bytes(content)
            big = lfs if lfs is not None else is_lfs(data[:512], len(data))
            return cls(len(data), hashlib.sha256(data).hexdigest(), big, data=data)
        path, h = Path(content), hashlib.sha256()
        with open(path, "rb") as f:
            head = f.read(512)
            f.seek(0)
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        size = path.stat().st_size
        return cls(size, h.hexdigest(), lfs if lfs is not None else is_lfs(head, size), path=path)

    def read(self, start: int = 0, end: int | None = None) -> bytes:
        end = self.size if end is None else end
        if self.data is None and self.path is None:
            raise ValueError("a blob received by a sink server (HubServer(sink=True)) has no content")
        if self.data is not None:
            return self.data[start:end]
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @property
    def blob_id(self) -> str:
        """The git object id: of the LFS pointer for LFS files, of the content otherwise."""
        return git_blob_id(self.pointer if self.lfs else self.read())

    @property
    def oid(self) -> str:
        """What preupload reports for an existing file, compared by the client to its local oid."""
        return self.sha256 if self.lfs else git_blob_id(self.read())


def is_lfs(sample: bytes, size: int) -> bool:
    return size >= LFS_MIN_SIZE or b"\0" in sample


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Blob]
    description: str = ""


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False  # files answer 403 GatedRepo (terms not accepted), info still answers
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs: dict[str, Blob] = field(default_factory=dict)  # uploaded LFS objects, by sha256

    def resolve(self, rev: str) -> Commit | None:
        sha = self.branches.get(rev) or self.tags.get(rev) or rev
        return next((c for c in self.commits if c.sha == sha), None)


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    """The local Hub. ``url`` is its endpoint once :meth:`start` ran."""

    def __init__(self, token: str = TOKEN, storage: os.PathLike | None = None, sink: bool = False):
        """``storage``: a folder for uploaded LFS objects (streamed to disk); None keeps them in memory.
        ``sink``: check uploaded LFS objects, keep only their sha256 and size (no storage needed)."""
        self.token = token
        self.storage = Path(storage) if storage is not None else None
        self.sink = sink
        self.traffic = {"served": 0, "uploaded": 0}  # body bytes sent by resolve, LFS bytes received
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._failures: list[list] = []  # [method, compiled regex, status, times left]
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._address: tuple = ("127.0.0.1", 0)
        self._connections: set = set()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "HubServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._address = self._httpd.server_address[:2]  # kept after stop(): the URL then refuses connections
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open (keep-alive) connections and free the port: the Hub is then
        unreachable (connection refused), also for clients holding a pooled connection."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None
        with self._lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._connections.clear()

    @property
    def url(self) -> str:
        return f"http://{self._address[0]}:{self._address[1]}"

    # --- test API -------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes | os.PathLike] | os.PathLike, *, private: bool = False,
                 gated: bool = False, tags: tuple[str, ...] = (), message: str = "initial upload") -> str:
        """Create (or replace) ``repo_id`` with one commit on ``main`` holding ``files``; returns its sha."""
        if not isinstance(files, dict):
            root = Path(files)
            files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        with self._lock:
            repo = self.repos[repo_id] = Repo(repo_id, private=private, gated=gated)
            sha = self._commit(repo, "main", {k: Blob.of(v) for k, v in files.items()}, message)
            for t in tags:
                repo.tags[t] = sha
            return sha

    def add_commit(self, repo_id: str, files: dict[str, bytes | os.PathLike], *, branch: str = "main",
                   message: str = "update", delete: tuple[str, ...] = ()) -> str:
        """A new commit on ``branch`` adding/replacing ``files`` and deleting ``delete``; returns its sha."""
        with self._lock:
            repo = self.repos[repo_id]
            head = repo.resolve(branch)
            tree = {k: v for k, v in (head.files if head else {}).items() if k not in delete}
            tree.update({k: Blob.of(v) for k, v in files.items()})
            return self._commit(repo, branch, tree, message)

    def commits(self, repo_id: str) -> list[Commit]:
        return list(self.repos[repo_id].commits)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(rev)
        return {p: b.read() for p, b in sorted(commit.files.items())}

    def fail(self, method: str, path_regex: str, status: int = 403, times: int | None = None) -> None:
        """Answer ``status`` to requests ``method`` on a path matching ``path_regex`` (``times`` times, or
        always). Use a 4xx: the client retries 5xx answers with backoff."""
        with self._lock:
            self._failures.append([method.upper(), re.compile(path_regex), status, times])

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    # --- internals ------------------------------------------------------------------------------

    def _commit(self, repo: Repo, branch: str, files: dict[str, Blob], message: str, description: str = "") -> str:
        self._counter += 1
        parent = repo.branches.get(branch)
        h = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{message}\0{self._counter}".encode())
        for path, blob in sorted(files.items()):
            h.update(f"\0{path}\0{blob.sha256}".encode())
        commit = Commit(h.hexdigest(), parent, message, dict(files), description)
        repo.commits.append(commit)
        repo.branches[branch] = commit.sha
        return commit.sha

    def _failure(self, method: str, path: str) -> int | None:
        with self._lock:
            for f in self._failures:
                if f[0] == method and f[1].search(path) and (f[3] is None or f[3] > 0):
                    if f[3] is not None:
                        f[3] -= 1
                    return f[2]
        return None


# --- request handling -------------------------------------------------------------------------------

def _handler(server: HubServer):
    class Handler(_Handler):
        hub = server
    return Handler


_API = re.compile(r"/api/models/([^/]+/[^/]+)/(revision|tree|preupload|commit|xet-read-token|xet-write-token)"
                  r"(?:/([^/]*)(/.*)?)?")
_INFO = re.compile(r"/api/models/([^/]+/[^/]+)")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")
_BATCH = re.compile(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch")
_LFS = re.compile(r"/_lfs/([^/]+/[^/]+)/([0-9a-f]{64})(/verify)?")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer has a Content-Length
    hub: HubServer

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, *args) -> None:  # quiet: tests read server.requests instead
        pass

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # --- plumbing -----------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), {k: v[-1] for k, v in parse_qs(parts.query).items()}
        raw = parts.path
        self.hub.requests.append(Request(method, path, query, {k.lower(): v for k, v in self.headers.items()}))
        try:
            # an LFS upload is streamed (to disk with HubServer(storage=...)); other bodies are small
            self._pending = method == "PUT" and bool(_LFS.fullmatch(path))
            body = b"" if self._pending else self._body()
            status = self.hub._failure(method, path)
            if status is not None:
                raise HubError(status, f"injected failure ({status}) for {method} {path}")
            self._route(method, raw, path, query, body)
        except HubError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            self._json({"error": e.message}, e.status, self._closing(headers))
        except Exception as e:  # a bug in the test server: say so rather than hang the client
            self._json({"error": f"test server error: {type(e).__name__}: {e}"}, 500, self._closing({}))

    def _closing(self, headers: dict) -> dict:
        """An error answered before the request body was read: close the connection after it."""
        if getattr(self, "_pending", False):
            self.close_connection = True
            headers["Connection"] = "close"
        return headers

    def _body(self, sink=None) -> bytes:
        """The request body (chunked or with a Content-Length); written to ``sink`` instead when given."""
        self._pending = False
        out = bytearray()
        write = sink.write if sink is not None else out.extend

        def copy(n: int) -> None:
            while n > 0:
                chunk = self.rfile.read(min(n, _CHUNK))
                if not chunk:
                    raise HubError(400, "request body shorter than announced")
                write(chunk)
                n -= len(chunk)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                copy(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
        else:
            copy(int(self.headers.get("Content-Length") or 0))
        return bytes(out)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if write and not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # --- routes -------------------------------------------------------------------------------------

    def _route(self, method: str, raw: str, path: str, query: dict, body: bytes) -> None:
        if m := _LFS.fullmatch(path):
            return self._lfs_object(method, m.group(1), m.group(2), bool(m.group(3)), body)
        if m := _BATCH.fullmatch(path):
            return self._lfs_batch(m.group(1), json.loads(body))
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        # the revision is one URL-quoted path segment: split the raw path before unquoting it
        if m := _API.fullmatch(raw):
            repo_id, what, rev, rest = unquote(m.group(1)), m.group(2), unquote(m.group(3) or "main"), m.group(4)
            if what.startswith("xet-"):
                raise HubError(501, "this test server does not serve Xet storage; set HF_HUB_DISABLE_XET=1")
            repo = self._repo(repo_id, write=what in ("preupload", "commit"))
            if what == "revision" and method == "GET":
                return self._info(repo, self._commit_at(repo, rev), query)
            if what == "tree" and method == "GET":
                return self._tree(repo, self._commit_at(repo, rev), unquote(rest or "/").strip("/"), query)
            if what == "preupload" and method == "POST":
                return self._preupload(repo, rev, json.loads(body))
            if what == "commit" and method == "POST":
                return self._commit(repo, rev, body, query)
        if method == "GET" and (m := _INFO.fullmatch(path)):
            repo = self._repo(m.group(1))
            return self._info(repo, self._commit_at(repo, "main"), query)
        if method in ("GET", "HEAD") and (m := _RESOLVE.fullmatch(raw)):
            repo = self._repo(unquote(m.group(1)))
            return self._resolve(repo, self._commit_at(repo, unquote(m.group(2))), unquote(m.group(3)))
        raise HubError(404, f"no such endpoint on the test server: {method} {path}")

    def _info(self, repo: Repo, commit: Commit, query: dict) -> None:
        blobs = query.get("blobs", "").lower() == "true"
        siblings = []
        for p, b in sorted(commit.files.items()):
            s = {"rfilename": p}
            if blobs:
                s.update(size=b.size, blobId=b.blob_id)
                if b.lfs:
                    s["lfs"] = {"size": b.size, "sha256": b.sha256, "pointerSize": len(b.pointer)}
            siblings.append(s)
        self._json({"_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.sha,
                    "private": repo.private, "gated": "manual" if repo.gated else False, "disabled": False, "tags": [], "downloads": 0,
                    "likes": 0, "lastModified": "2026-01-01T00:00:00.000Z", "siblings": siblings})

    def _tree(self, repo: Repo, commit: Commit, under: str, query: dict) -> None:
        recursive = query.get("recursive", "").lower() == "true"
        prefix = f"{under}/" if under else ""
        entries, dirs = [], set()
        for p, b in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):].split("/")
            for i in range(1, len(rest) if recursive else min(len(rest), 2)):
                dirs.add(prefix + "/".join(rest[:i]))
            if recursive or len(rest) == 1:
                e = {"type": "file", "oid": b.blob_id, "size": b.size, "path": p}
                if b.lfs:
                    e["lfs"] = {"oid": b.sha256, "size": b.size, "pointerSize": len(b.pointer)}
                entries.append(e)
        if under and not entries and not dirs:
            raise HubError(404, f"{under} does not exist", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs)]
        self._json(folders + entries)

    def _resolve(self, repo: Repo, commit: Commit, path: str) -> None:
        blob = commit.files.get(path)
        base = {"X-Repo-Commit": commit.sha}
        if repo.gated:
            raise HubError(403, f"Access to model {repo.repo_id} is restricted: you must accept its conditions",
                           "GatedRepo", base)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", base)
        etag = f'"{blob.sha256 if blob.lfs else blob.blob_id}"'
        headers = {**base, "ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": blob.size})
        start, end, status = 0, blob.size, 200
        if (rng := self.headers.get("Range")) is not None:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or m.groups() == ("", ""):
                raise HubError(416, f"bad range {rng!r}", headers={"Content-Range": f"bytes */{blob.size}"})
            a, b = m.groups()
            start, end = (max(blob.size - int(b), 0), blob.size) if a == "" else \
                (int(a), min(int(b) + 1, blob.size) if b else blob.size)
            if start >= blob.size or start >= end:
                raise HubError(416, f"range {rng!r} not satisfiable", headers={"Content-Range": f"bytes */{blob.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        if blob.data is None and blob.path is None:
            raise HubError(410, f"{path}: uploaded to a sink server (HubServer(sink=True)): content not kept")
        self._send(status, headers=headers, length=end - start)
        if self.command == "GET":
            if blob.path is not None:  # one open file, copied by the kernel (wfile is unbuffered)
                with open(blob.path, "rb") as f:
                    self.connection.sendfile(f, start, end - start)
            else:
                for pos in range(start, end, _CHUNK):
                    self.wfile.write(blob.read(pos, min(pos + _CHUNK, end)))
            with self.hub._lock:
                self.hub.traffic["served"] += end - start

    def _create_repo(self, payload: dict) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, "this test server serves model repos only")
        with self.hub._lock:
            if repo_id in self.hub.repos:  # the Hub's 409 carries the url too: create_repo(exist_ok=True) reads it
                return self._json({"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"},
                                  409, {"X-Error-Message": "You already created this model repo"})
            repo = self.hub.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
            self.hub._commit(repo, "main", {".gitattributes": Blob.of(GITATTRIBUTES, lfs=False)}, "initial commit")
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _preupload(self, repo: Repo, rev: str, payload: dict) -> None:
        head = repo.resolve(rev)
        out = []
        for f in payload["files"]:
            lfs = is_lfs(base64.b64decode(f["sample"]), f["size"])
            have = head.files.get(f["path"]) if head else None
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": have.oid if have is not None and have.lfs == lfs else None})
        self._json({"files": out, "commitOid": head.sha if head else None})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        repo = self._repo(repo_id, write=True)
        objects = []
        for o in payload["objects"]:
            oid, size = o["oid"], o["size"]
            if oid in repo.lfs:
                objects.append({"oid": oid, "size": size})  # already uploaded: no actions
                continue
            href = f"{self.hub.url}/_lfs/{repo_id}/{oid}"
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": href, "header": {}},
                "verify": {"href": href + "/verify", "header": {}}}})
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_object(self, method: str, repo_id: str, oid: str, verify: bool, body: bytes) -> None:
        repo = self.hub.repos.get(repo_id)  # the upload URL is pre-signed (as on S3): no token, even if private
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if method == "PUT" and not verify:
            blob = self._receive(oid)
            with self.hub._lock:
                repo.lfs[oid] = blob
            return self._send(200)
        if method == "POST" and verify:
            if not self._authorized():
                raise HubError(401, "Invalid credentials in Authorization header")
            req = json.loads(body)
            have = repo.lfs.get(oid)
            if have is None or have.size != req.get("size"):
                raise HubError(404, f"LFS object {oid} was not uploaded", "EntryNotFound")
            return self._json({"success": True})
        raise HubError(405, f"{method} not allowed here")

    def _receive(self, oid: str) -> Blob:
        """Read an uploaded object, checking its sha256: in memory, or into ``storage/lfs/<oid>``."""
        h = hashlib.sha256()
        if self.hub.sink:
            class Count:
                n = 0

                def write(self, chunk: bytes) -> None:
                    h.update(chunk)
                    self.n += len(chunk)
            count = Count()
            self._body(count)
            blob = Blob(count.n, h.hexdigest(), True)
        elif self.hub.storage is None:
            data = self._body()
            h.update(data)
            blob = Blob(len(data), h.hexdigest(), True, data=data)
        else:
            final = self.hub.storage / "lfs" / oid
            final.parent.mkdir(parents=True, exist_ok=True)
            part = final.with_name(f"{oid}.{threading.get_ident()}.part")

            class Sink:
                def __init__(self, f):
                    self.f, self.n = f, 0

                def write(self, chunk: bytes) -> None:
                    h.update(chunk)
                    self.f.write(chunk)
                    self.n += len(chunk)
            with open(part, "wb") as f:
                sink = Sink(f)
                self._body(sink)
            os.replace(part, final)
            blob = Blob(sink.n, h.hexdigest(), True, path=final)
        with self.hub._lock:
            self.hub.traffic["uploaded"] += blob.size
        if blob.sha256 != oid:
            raise HubError(400, f"uploaded content does not match sha256 {oid}")
        return blob

    def _commit(self, repo: Repo, rev: str, body: bytes, query: dict) -> None:
        if query.get("create_pr"):
            raise HubError(400, "this test server does not open pull requests")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first NDJSON line must be the commit header")
        header = lines[0]["value"]
        with self.hub._lock:
            head = repo.resolve(rev)
            if rev not in repo.branches and head is not None:
                raise HubError(400, f"cannot commit to {rev!r}: not a branch")
            if header.get("parentCommit") and (head is None or header["parentCommit"] != head.sha):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(head.files) if head else {}
            for line in lines[1:]:
                key, v = line["key"], line["value"]
                if key == "file":
                    tree[v["path"]] = Blob.of(base64.b64decode(v["content"]), lfs=False)
                elif key == "lfsFile":
                    blob = repo.lfs.get(v["oid"])
                    if blob is None:
                        raise HubError(422, f"Your push was rejected because an LFS pointer ({v['path']}) points to "
                                            "a file that does not exist")
                    tree[v["path"]] = blob
                elif key == "deletedFile":
                    if tree.pop(v["path"], None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {v['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    tree = {p: b for p, b in tree.items() if not p.startswith(v["path"].rstrip("/") + "/")}
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            sha = self.hub._commit(repo, rev, tree, header.get("summary", ""), header.get("description", ""))
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}",
                    "hookOutput": "", "pullRequestUrl": None})


# --- pytest fixtures ---------------------------------------------------------------------------------

def point_client_at(monkeypatch, endpoint: str, hf_home: Path, *, xet: bool = False, token: str = TOKEN) -> dict:
    """Point huggingface_hub, in this process and in subprocesses, at ``endpoint`` with a fresh
    ``HF_HOME``. huggingface_hub reads its environment once, at import: its constants are patched too.
    Returns the environment for subprocesses."""
    from huggingface_hub import constants
    hub_cache = hf_home / "hub"
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hub_cache), "HF_TOKEN": token,
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "" if xet else "1", "HF_HUB_OFFLINE": "0"}
    for k in ("HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_XET_CACHE", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for name, value in (("ENDPOINT", endpoint),
                        ("HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
                        ("HF_HOME", str(hf_home)), ("HF_HUB_CACHE", str(hub_cache)),
                        ("HF_HUB_OFFLINE", False), ("HF_HUB_DISABLE_XET", not xet),
                        ("HF_HUB_DISABLE_TELEMETRY", True), ("HF_TOKEN_PATH", str(hf_home / "token")),
                        ("HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens")),
                        ("HF_XET_CACHE", str(hf_home / "xet"))):
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    return {**os.environ}


class LocalHub:
    """What the ``hub_server`` fixture yields: the running :class:`HubServer` (``.server``), the
    ``HF_HOME`` it set (``.hf_home``) and the environment for subprocesses (``.env``)."""

    def __init__(self, server: HubServer, hf_home: Path, monkeypatch):
        self.server, self.hf_home, self._mp = server, hf_home, monkeypatch
        self.env = point_client_at(monkeypatch, server.url, hf_home, token=server.token)

    def __getattr__(self, name):  # add_repo, commits, files, fail, requests, stop, url ...
        return getattr(self.server, name)

    def xet(self, enabled: bool) -> None:
        """Let the client use Xet for uploads (as it does by default with hf_xet installed)."""
        self.env = point_client_at(self._mp, self.server.url, self.hf_home, xet=enabled, token=self.server.token)

    def offline_env(self) -> dict:
        """The subprocess environment with ``HF_HUB_OFFLINE=1`` (same ``HF_HOME``)."""
        return {**self.env, "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A running local Hub, with huggingface_hub pointed at it (endpoint, token, a fresh HF_HOME under
    ``tmp_path``, Xet off, telemetry off); stopped afterwards."""
    server = HubServer().start()
    try:
        yield LocalHub(server, tmp_path / "hf-home", monkeypatch)
    finally:
        server.stop()

