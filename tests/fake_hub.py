"""A small Hugging Face Hub on loopback: the part of the Hub's HTTP API huggingface_hub uses.

    python tests/fake_hub.py --port PORT --root DIR [--cdn-port PORT] [--lfs-threshold BYTES]

Repositories come from a folder: ``ROOT/<org>/<repo>/<revision>/...files``. Each revision
folder is one commit: a folder named by 40 hex digits is that commit; any other name (``main``,
``v1``) is a branch whose commit id is derived from its content, so changing a file makes a new
commit. Files of at least ``lfs_threshold`` bytes are served like LFS files: ``/resolve``
redirects (302) to a second server, the "CDN", on another port (another origin, as on the real
Hub, so huggingface_hub keeps the metadata of the redirect and drops the token); smaller ones
are served by ``/resolve`` itself.

Endpoints (what `snapshot_download`, `hf_hub_download`, `model_info`, `list_repo_files` and
`list_repo_tree` call):

    GET  /api/models/ORG/REPO[/revision/REV][?blobs=true]   model info (sha, siblings)
    GET  /api/models/ORG/REPO/tree/REV[/PATH][?recursive=true]   listing (paginated, Link)
    HEAD|GET /ORG/REPO/resolve/REV/PATH    ETag, X-Repo-Commit, Content-Length or, for LFS
                                           files, 302 + Location, X-Linked-Etag/-Size
    HEAD|GET (cdn) /lfs/SHA256             the LFS content; Range -> 206, Accept-Ranges

ETags are what huggingface_hub names blobs by: the git blob sha1 of a small file, the sha256
of an LFS file. Errors carry the Hub's ``X-Error-Code`` header (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo), which huggingface_hub maps to its exceptions.

Faults and controls, in-process (methods of FakeHub) or over HTTP on the hub port:

    cut(path, after, times=1)     close the connection after `after` bytes of a response
                                  carrying this file (`times` responses; None: always)
    throttle(bytes_per_second)    slow every content response down (None: full speed)
    set_access(repo, gated=..., private=..., tokens=[...])
        gated: 401 (no token) / 403 (a token without access) with X-Error-Code: GatedRepo
        private: 401 RepoNotFound without a token, 401 "Invalid credentials" with a wrong one
    requests / content_requests() / bytes_served()    what was asked and sent

    POST /_fake/cut {"path", "after", "times", "repo"}   POST /_fake/throttle {"bytes_per_second"}
    POST /_fake/access {"repo", "gated", "private", "tokens"}   POST /_fake/reset
    GET  /_fake/stats -> {"requests": [...]}
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

COMMIT = re.compile(r"^[0-9a-f]{40}$")
CHUNK = 16 * 1024


@dataclass(frozen=True)
class FileInfo:
    """One file of a revision, with the ids the Hub gives it."""

    path: str  # inside the repository, "/"-separated
    disk: Path
    size: int
    git_sha1: str  # git blob id of the content (small files) or of the LFS pointer
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_sha1


@dataclass(frozen=True)
class Revision:
    repo: str
    name: str
    commit: str
    files: tuple[FileInfo, ...]

    def file(self, path: str) -> FileInfo | None:
        return next((f for f in self.files if f.path == path), None)


@dataclass
class Access:
    gated: bool = False
    private: bool = False
    tokens: tuple[str, ...] = ()


@dataclass
class RequestRecord:
    """One request as the server saw it (never the token: only whether one was sent)."""

    server: str  # "hub" or "cdn"
    method: str
    path: str
    status: int = 0
    range: str | None = None
    authorized: bool = False
    repo: str | None = None
    file: str | None = None  # repository path of the file whose content was asked for
    bytes_sent: int = 0
    completed: bool = False  # the whole body was sent
    cut: bool = False  # closed on purpose midway
    aborted: bool = False  # the client went away


@dataclass
class _Cut:
    path: str
    after: int
    times: int | None
    repo: str | None


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _file_hashes(disk: Path) -> tuple[str, str]:
    sha1 = hashlib.sha1()
    sha256 = hashlib.sha256()
    size = disk.stat().st_size
    sha1.update(b"blob %d\0" % size)
    with disk.open("rb") as f:
        while block := f.read(1 << 20):
            sha1.update(block)
            sha256.update(block)
    return sha1.hexdigest(), sha256.hexdigest()


class FakeHub:
    """The hub and its CDN, each a ThreadingHTTPServer in a daemon thread."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0,
                 cdn_port: int = 0, lfs_threshold: int = 10_000, page_size: int = 1000) -> None:
        self.root = Path(root)
        self.lfs_threshold = lfs_threshold
        self.page_size = page_size
        self.requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._access: dict[str, Access] = {}
        self._cuts: list[_Cut] = []
        self._bps: int | None = None
        self._blobs: dict[str, tuple[str, FileInfo]] = {}  # sha256 -> (repo, file)
        self._hash_cache: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._hub = _Server((host, port), _HubHandler, self, "hub")
        self._cdn = _Server((host, cdn_port), _CdnHandler, self, "cdn")
        self._threads: list[threading.Thread] = []

    # ---- lifecycle

    @property
    def url(self) -> str:
        host, port = self._hub.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def cdn_url(self) -> str:
        host, port = self._cdn.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        for server in (self._hub, self._cdn):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"fake-{server.name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- controls

    def cut(self, path: str, after: int, times: int | None = 1, repo: str | None = None) -> None:
        """Close the connection after `after` body bytes of the next `times` responses carrying
        file `path` (None: every response)."""
        with self._lock:
            self._cuts.append(_Cut(path, after, times, repo))

    def throttle(self, bytes_per_second: int | None) -> None:
        with self._lock:
            self._bps = bytes_per_second

    def set_access(self, repo: str, *, gated: bool = False, private: bool = False,
                   tokens: list[str] | tuple[str, ...] = ()) -> None:
        with self._lock:
            self._access[repo] = Access(gated, private, tuple(tokens))

    def clear_faults(self) -> None:
        with self._lock:
            self._cuts.clear()
            self._bps = None

    def reset_stats(self) -> None:
        with self._lock:
            self.requests.clear()

    # ---- statistics

    def content_requests(self, path: str | None = None, repo: str | None = None,
                         method: str = "GET") -> list[RequestRecord]:
        """Requests that asked for a file's content (GET on /resolve or on the CDN)."""
        with self._lock:
            return [r for r in self.requests
                    if r.file is not None and r.method == method
                    and (path is None or r.file == path) and (repo is None or r.repo == repo)]

    def bytes_served(self, path: str | None = None, repo: str | None = None) -> int:
        return sum(r.bytes_sent for r in self.content_requests(path, repo))

    def stats(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dataclasses.asdict(r) for r in self.requests]

    # ---- repositories

    def revision(self, repo: str, rev: str) -> Revision | None:
        folder = self.root / repo
        if not folder.is_dir():
            return None
        candidate = folder / rev
        if rev and "/" not in rev and not rev.startswith(".") and candidate.is_dir():
            return self._load(repo, candidate)
        if COMMIT.match(rev):
            for sub in sorted(folder.iterdir()):
                if sub.is_dir() and not sub.name.startswith("."):
                    loaded = self._load(repo, sub)
                    if loaded.commit == rev:
                        return loaded
        return None

    def repo_exists(self, repo: str) -> bool:
        return repo.count("/") == 1 and (self.root / repo).is_dir()

    def _load(self, repo: str, folder: Path) -> Revision:
        files = []
        for disk in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = disk.relative_to(folder).as_posix()
            files.append(self._describe(rel, disk))
        if COMMIT.match(folder.name):
            commit = folder.name
        else:
            digest = hashlib.sha1(f"{repo}@{folder.name}".encode())
            for f in files:
                digest.update(f"\0{f.path}:{f.etag}".encode())
            commit = digest.hexdigest()
        with self._lock:
            for f in files:
                if f.sha256:
                    self._blobs[f.sha256] = (repo, f)
        return Revision(repo, folder.name, commit, tuple(files))

    def _describe(self, rel: str, disk: Path) -> FileInfo:
        st = disk.stat()
        key = (str(disk), st.st_size, st.st_mtime_ns)
        with self._lock:
            hashes = self._hash_cache.get(key)
        if hashes is None:
            hashes = _file_hashes(disk)
            with self._lock:
                self._hash_cache[key] = hashes
        sha1, sha256 = hashes
        if st.st_size >= self.lfs_threshold:
            pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
                       f"size {st.st_size}\n").encode()
            return FileInfo(rel, disk, st.st_size, git_blob_sha1(pointer), sha256)
        return FileInfo(rel, disk, st.st_size, sha1, None)

    def blob(self, sha256: str) -> tuple[str, FileInfo] | None:
        with self._lock:
            return self._blobs.get(sha256)

    # ---- used by the handlers

    def access(self, repo: str) -> Access:
        with self._lock:
            return self._access.get(repo, Access())

    def take_cut(self, repo: str | None, path: str) -> int | None:
        with self._lock:
            for cut in self._cuts:
                if cut.path == path and (cut.repo is None or cut.repo == repo):
                    if cut.times is not None:
                        cut.times -= 1
                        if cut.times <= 0:
                            self._cuts.remove(cut)
                    return cut.after
        return None

    def bytes_per_second(self) -> int | None:
        with self._lock:
            return self._bps

    def record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.requests.append(rec)

    def update(self, rec: RequestRecord, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(rec, key, value)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 hub: FakeHub, name: str) -> None:
        self.hub = hub
        self.name = name
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away (cancel, cut) is part of the tests, not an error to print.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    rec: RequestRecord

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _begin(self) -> None:
        self.rec = RequestRecord(
            server=self.server.name, method=self.command, path=urlsplit(self.path).path,
            range=self.headers.get("Range"),
            authorized=self.headers.get("Authorization", "").startswith("Bearer "))
        self.hub.record(self.rec)

    def _token(self) -> str | None:
        value = self.headers.get("Authorization", "")
        return value[len("Bearer "):] if value.startswith("Bearer ") else None

    def _head(self, status: int, headers: dict[str, str], length: int) -> None:
        self.hub.update(self.rec, status=status)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self._head(status, {"Content-Type": "application/json", **(headers or {})}, len(body))
        if self.command != "HEAD":
            self.wfile.write(body)
            self.hub.update(self.rec, bytes_sent=len(body), completed=True)

    def _error(self, status: int, code: str | None, message: str,
               headers: dict[str, str] | None = None) -> None:
        extra = {"X-Error-Message": message, **(headers or {})}
        if code:
            extra["X-Error-Code"] = code
        self._json({"error": message}, status, extra)

    def _send_file(self, info: FileInfo, repo: str | None, headers: dict[str, str]) -> None:
        """The file's bytes, honouring Range (206) and the cut and throttle faults."""
        size = info.size
        start, end = 0, size - 1
        status = 200
        spec = self.headers.get("Range")
        if spec:
            parsed = _parse_range(spec, size)
            if parsed is None:
                self._head(416, {**headers, "Content-Range": f"bytes */{size}"}, 0)
                return
            start, end = parsed
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        length = end - start + 1
        self.hub.update(self.rec, file=info.path, repo=repo)
        self._head(status, {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                            **headers}, length)
        if self.command == "HEAD":
            return
        limit = self.hub.take_cut(repo, info.path)
        self._stream(info.disk, start, length, length if limit is None else min(limit, length))

    def _stream(self, disk: Path, start: int, length: int, limit: int) -> None:
        sent = 0
        try:
            with disk.open("rb") as f:
                f.seek(start)
                while sent < limit:
                    bps = self.hub.bytes_per_second()
                    step = CHUNK if bps is None else max(1024, min(CHUNK, bps // 20))
                    piece = f.read(min(step, limit - sent))
                    if not piece:
                        break
                    self.wfile.write(piece)
                    sent += len(piece)
                    self.hub.update(self.rec, bytes_sent=sent)
                    if bps:
                        time.sleep(len(piece) / bps)
        except (ConnectionError, TimeoutError):
            self.hub.update(self.rec, aborted=True)
            self.close_connection = True
            return
        if sent < length:
            # Cut on purpose: the client was promised `length` bytes and gets fewer.
            self.hub.update(self.rec, cut=True)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.hub.update(self.rec, completed=True)


class _HubHandler(_Handler):
    def do_HEAD(self) -> None:
        self._begin()
        self._route()

    def do_GET(self) -> None:
        self._begin()
        self._route()

    def do_POST(self) -> None:
        self._begin()
        path = urlsplit(self.path).path
        if not path.startswith("/_fake/"):
            self._error(405, None, "method not allowed")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}") if length else {}
        self._control(path.removeprefix("/_fake/"), body)

    def _route(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.split("/")[1:]
        query = parse_qs(url.query)
        if url.path == "/_fake/stats":
            self._json({"requests": self.hub.stats()})
        elif len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            self._api(parts[2:], query)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(f"{parts[0]}/{parts[1]}", unquote(parts[3]),
                          unquote("/".join(parts[4:])))
        else:
            self._error(404, None, "not found")

    def _allowed(self, repo: str) -> bool:
        """Apply the repository's access rules like the Hub; False when an error was sent."""
        self.hub.update(self.rec, repo=repo)
        if not self.hub.repo_exists(repo):
            self._error(404, "RepoNotFound", "Repository not found")
            return False
        access = self.hub.access(repo)
        token = self._token()
        if access.private and token not in access.tokens:
            if token is None:
                self._error(401, "RepoNotFound", "Repository not found")
            else:
                self._error(401, None, "Invalid credentials in Authorization header")
            return False
        if access.gated and token not in access.tokens:
            if token is None:
                self._error(401, "GatedRepo", f"Access to model {repo} is restricted. You must "
                            "have access to it and be authenticated to access it. Please log in.")
            else:
                self._error(403, "GatedRepo", f"Access to model {repo} is restricted and you are "
                            f"not in the authorized list. Visit {self.hub.url}/{repo} to ask for "
                            "access.")
            return False
        return True

    def _revision(self, repo: str, rev: str) -> Revision | None:
        found = self.hub.revision(repo, rev)
        if found is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return found

    def _api(self, parts: list[str], query: dict[str, list[str]]) -> None:
        repo = "/".join(parts[:2])
        if not self._allowed(repo):
            return
        rest = parts[2:]
        if not rest or rest[0] == "revision":
            rev = unquote(rest[1]) if len(rest) > 1 else "main"
            revision = self._revision(repo, rev)
            if revision is not None:
                blobs = query.get("blobs", ["false"])[0].lower() == "true"
                self._json(self._info(revision, blobs))
        elif rest[0] == "tree" and len(rest) >= 2:
            revision = self._revision(repo, unquote(rest[1]))
            if revision is not None:
                self._tree(revision, unquote("/".join(rest[2:])), query)
        else:
            self._error(404, None, "not found")

    def _info(self, revision: Revision, blobs: bool) -> dict[str, Any]:
        access = self.hub.access(revision.repo)
        siblings = []
        for f in revision.files:
            sibling: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                sibling.update(size=f.size, blobId=f.git_sha1)
                if f.sha256:
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(sibling)
        org = revision.repo.split("/")[0]
        return {"_id": revision.commit[:24], "id": revision.repo, "modelId": revision.repo,
                "author": org, "sha": revision.commit, "private": access.private,
                "gated": "manual" if access.gated else False, "disabled": False,
                "lastModified": "2024-01-01T00:00:00.000Z", "tags": [], "downloads": 0,
                "likes": 0, "library_name": None, "siblings": siblings,
                "createdAt": "2024-01-01T00:00:00.000Z"}

    def _tree(self, revision: Revision, path: str, query: dict[str, list[str]]) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for f in revision.files:
            if not f.path.startswith(prefix):
                continue
            rel = f.path[len(prefix):]
            dirs = rel.split("/")[:-1]
            for depth in range(len(dirs) if recursive else min(1, len(dirs))):
                folder = prefix + "/".join(dirs[: depth + 1])
                entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or not dirs:
                entry: dict[str, Any] = {"type": "file", "path": f.path, "size": f.size,
                                         "oid": f.git_sha1}
                if f.sha256:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
                entries[f.path] = entry
        if prefix and not entries:
            self._error(404, "EntryNotFound", f"{path} does not exist on {revision.name}")
            return
        listing = sorted(entries.values(), key=lambda e: str(e["path"]))
        cursor = int(query.get("cursor", ["0"])[0])
        page = listing[cursor: cursor + self.hub.page_size]
        headers = {}
        if cursor + self.hub.page_size < len(listing):
            tail = f"/{quote(path)}" if path else ""
            rev = quote(revision.name, safe="")
            nxt = (f"{self.hub.url}/api/models/{revision.repo}/tree/{rev}{tail}"
                   f"?recursive={str(recursive).lower()}&cursor={cursor + self.hub.page_size}")
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(page, headers=headers)

    def _resolve(self, repo: str, rev: str, path: str) -> None:
        if not self._allowed(repo):
            return
        revision = self._revision(repo, rev)
        if revision is None:
            return
        info = revision.file(path)
        if info is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {rev}",
                        {"X-Repo-Commit": revision.commit})
            return
        common = {"X-Repo-Commit": revision.commit}
        if info.sha256 is None:
            self._send_file(info, repo, {**common, "ETag": f'"{info.git_sha1}"'})
            return
        # The redirect carries no content: it is not counted as a content request.
        self._head(302, {**common, "ETag": f'"{info.git_sha1}"',
                         "X-Linked-Etag": f'"{info.sha256}"', "X-Linked-Size": str(info.size),
                         "Location": f"{self.hub.cdn_url}/lfs/{info.sha256}"}, 0)

    def _control(self, action: str, body: dict[str, Any]) -> None:
        if action == "cut":
            self.hub.cut(body["path"], int(body["after"]), body.get("times", 1), body.get("repo"))
        elif action == "throttle":
            self.hub.throttle(body.get("bytes_per_second"))
        elif action == "access":
            self.hub.set_access(body["repo"], gated=bool(body.get("gated")),
                                private=bool(body.get("private")), tokens=body.get("tokens", []))
        elif action == "reset":
            if body.get("faults", True):
                self.hub.clear_faults()
            if body.get("stats", True):
                self.hub.reset_stats()
        else:
            self._error(404, None, f"unknown control {action}")
            return
        self._json({"ok": True})


class _CdnHandler(_Handler):
    """Content-addressed LFS storage: no token needed (the Hub's CDN URLs are signed)."""

    def do_HEAD(self) -> None:
        self._begin()
        self._blob()

    def do_GET(self) -> None:
        self._begin()
        self._blob()

    def _blob(self) -> None:
        parts = urlsplit(self.path).path.split("/")[1:]
        found = self.hub.blob(parts[1]) if len(parts) == 2 and parts[0] == "lfs" else None
        if found is None:
            self._error(404, None, "no such object")
            return
        repo, info = found
        self._send_file(info, repo, {"ETag": f'"{info.etag}"'})


def _parse_range(spec: str, size: int) -> tuple[int, int] | None:
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
    if not match or (not match[1] and not match[2]):
        return None
    if not match[1]:  # suffix range: the last N bytes
        start, end = max(0, size - int(match[2])), size - 1
    else:
        start = int(match[1])
        end = min(int(match[2]), size - 1) if match[2] else size - 1
    if start >= size or start > end:
        return None
    return start, end


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cdn-port", type=int, default=0)
    parser.add_argument("--lfs-threshold", type=int, default=10_000)
    args = parser.parse_args(argv)
    hub = FakeHub(args.root, host=args.host, port=args.port, cdn_port=args.cdn_port,
                  lfs_threshold=args.lfs_threshold)
    hub.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"ready {hub.url} cdn {hub.cdn_url}", flush=True)
    while not stop.wait(0.5):
        pass
    hub.stop()


if __name__ == "__main__":
    main()
