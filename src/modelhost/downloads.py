"""Hugging Face downloads: progress, resume, cancel, verification; cache inspection.

Everything lands in MODEL_CACHE_DIR with the Hub's own layout, so other tools share it:

    models--ORG--REPO/
        blobs/<etag>               content, named by sha256 (LFS files) or git sha1 (others)
        blobs/<etag>.incomplete    a partial download, resumed with an HTTP Range request
        refs/<branch-or-tag>       the commit a revision pointed to
        snapshots/<commit>/<path>  relative symlinks to the blobs
        trees/<commit>.json        the commit's file listing (huggingface_hub's tree cache)

Why modelhost moves the bytes itself. huggingface_hub 2.x downloads each file into a
temporary file with a random name and deletes it when the transfer fails, and its own retry
resumes only from the last whole 10 MiB chunk received: an interrupted download (network
cut, gateway restart, cancel) starts over, and a running `hf_hub_download` cannot be stopped
from another thread. So the library is used for everything but the transfer itself: the API calls
(`model_info`, `list_repo_tree`), the file URLs (`hf_hub_url`), the HTTP session (its proxy
and client-factory settings), the request headers (`build_hf_headers`), the error
classification (`hf_raise_for_status`) and the pattern semantics (`filter_repo_objects`);
the transfer is a plain streamed GET that appends to ``blobs/<etag>.incomplete`` and, when
that file exists, asks only for the missing bytes (``Range: bytes=N-``). That is the partial
file name huggingface_hub itself used before 2.x, and the lock (``.locks/.../<etag>.lock``)
is the one it still takes, so a concurrent `hf_hub_download` of the same blob waits instead
of racing.

Verification: every file is checked against the listing before it is moved into ``blobs/``:
its size, and its hash (sha256 for LFS files, the git blob sha1 for the others). The hash is
computed while the bytes arrive (a resumed file re-reads only its partial part once), so it
costs no second pass over multi-GiB weights. Files already in the cache (downloaded earlier,
or by another tool) are trusted when their size matches: hashing them again would read every
byte of every model at each start. A model is reported complete only when every expected
file is in ``snapshots/<commit>/`` with the size the listing gives (`is_complete`).

Cancellation: transfers run in worker threads that check a stop flag after each network
read; a stop closes the HTTP response (and its connection) at once and keeps the partial
file for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import filelock
import httpx2
from huggingface_hub import HfApi, constants, get_session, hf_hub_url, hf_raise_for_status
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import (  # type: ignore[attr-defined]  # public, not re-exported
    build_hf_headers,
    filter_repo_objects,
)

from modelhost.config import HubSource, cache_relative
from modelhost.hubtoken import mask

logger = logging.getLogger(__name__)

T = TypeVar("T")

COMMIT = re.compile(r"[0-9a-f]{40}")  # always fullmatch (`match` with `$` takes a "\n")
REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
PROGRESS_INTERVAL = 0.25  # seconds between progress events: at most 4 per second per job
RATE_TIME_CONSTANT = 3.0  # seconds; smooths the rate so the ETA does not jump around
TREE_FORMAT = 1  # huggingface_hub's trees/<commit>.json format_version
REQUESTS_FILE = "modelhost-requests.json"  # per repo: which patterns were asked per commit
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
SET_TOKEN = "set a token with `modelhost token set` or the HUGGINGFACE_TOKEN environment variable"


# --------------------------------------------------------------------------- public types


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE_STATES = frozenset({JobState.queued, JobState.running})


class ErrorKind(StrEnum):
    """Why a download failed, for the gateway to decide what to show or whether to retry."""

    gated = "gated"
    unauthorized = "unauthorized"
    not_found = "not_found"
    revision_not_found = "revision_not_found"
    no_files = "no_files"
    network = "network"
    hub = "hub"
    disk_space = "disk_space"
    disk = "disk"
    checksum = "checksum"
    offline = "offline"
    internal = "internal"


RETRYABLE_KINDS = frozenset({ErrorKind.network, ErrorKind.hub, ErrorKind.checksum})


class DownloadError(Exception):
    """A download that cannot go on; the message says what happened and what to do."""

    def __init__(self, message: str, kind: ErrorKind) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def retryable(self) -> bool:
        """True when starting again later may succeed (and resumes where it stopped)."""
        return self.kind in RETRYABLE_KINDS


@dataclass
class DownloadJob:
    """One download of one model: what the gateway persists and pushes to clients.

    `bytes_done` counts what is on disk for the expected files (complete and partial), so a
    resumed download starts where it stopped rather than at 0; `bytes_fetched` counts only
    what this job received from the network.
    """

    model_id: str
    repo: str
    revision: str
    patterns: list[str] | None
    state: JobState = JobState.queued
    bytes_done: int = 0
    bytes_total: int | None = None
    bytes_fetched: int = 0
    rate: float = 0.0  # bytes per second, smoothed
    eta_seconds: float | None = None
    files_total: int = 0
    files_done: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None
    commit: str | None = None
    snapshot: str | None = None  # the snapshot folder, once completed
    started_at: float | None = None  # time.time()
    finished_at: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def copy(self) -> DownloadJob:
        patterns = list(self.patterns) if self.patterns is not None else None
        return dataclasses.replace(self, patterns=patterns)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = str(self.state)
        data["error_kind"] = str(self.error_kind) if self.error_kind else None
        return data


Subscriber = Callable[[DownloadJob], object]


@dataclass(frozen=True)
class CachedRevision:
    commit: str
    refs: tuple[str, ...]
    size_bytes: int
    files: int
    complete: bool


@dataclass(frozen=True)
class CachedRepo:
    """A model repository in the cache. `size_bytes` is what it takes on disk, partial
    downloads included; `incomplete_bytes` is the part held by partial downloads."""

    repo: str
    path: Path
    size_bytes: int
    revisions: tuple[CachedRevision, ...]
    complete: bool
    incomplete_bytes: int


# --------------------------------------------------------------------------- cache layout


@dataclass(frozen=True)
class RemoteFile:
    """A file of a commit, as the Hub lists it."""

    path: str
    size: int
    blob_id: str  # git blob sha1 (of the LFS pointer, for LFS files)
    sha256: str | None = None  # LFS files only
    xet_hash: str | None = None

    def __post_init__(self) -> None:
        # Names that come from the hub (or a listing file) become paths in the cache: a
        # file's path must stay inside the snapshot, its etag must be a hash.
        cache_relative(self.path, f"file path {self.path!r} listed by the hub")
        if not ETAG.fullmatch(self.etag):
            raise ValueError(f"the hub listed {self.path!r} with an invalid hash")

    @property
    def etag(self) -> str:
        """The name of its blob in the cache: what the Hub sends as (X-Linked-)ETag."""
        return self.sha256 or self.blob_id


def repo_folder(cache_dir: Path, repo: str) -> Path:
    return Path(cache_dir) / ("models--" + repo.replace("/", "--"))


def _atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _local_commit(storage: Path, revision: str) -> str | None:
    """The commit a revision stands for in the cache: itself, or what its ref says."""
    if COMMIT.fullmatch(revision):
        return revision
    try:
        commit = (storage / "refs" / revision).read_text().strip()
    except (OSError, ValueError):
        return None
    return commit if COMMIT.fullmatch(commit) else None


def read_listing(storage: Path, commit: str) -> dict[str, RemoteFile] | None:
    """The recorded listing of a commit (trees/<commit>.json), or None."""
    try:
        data = json.loads((storage / "trees" / f"{commit}.json").read_text(encoding="utf-8"))
        if data.get("format_version") != TREE_FORMAT:
            return None
        return {path: RemoteFile(path, int(info["size"]), str(info["blob_id"]),
                                 info.get("lfs_sha256"), info.get("xet_hash"))
                for path, info in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_listing(storage: Path, commit: str, files: dict[str, RemoteFile]) -> None:
    """Record the listing in huggingface_hub's own tree-cache format, so that the library
    (e.g. `snapshot_download(local_files_only=True)`) also knows what a complete snapshot is."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(files):
        f = files[path]
        entry: dict[str, Any] = {"size": f.size, "blob_id": f.blob_id}
        if f.sha256 is not None:
            entry.update(lfs_sha256=f.sha256, lfs_size=f.size)
        if f.xet_hash is not None:
            entry["xet_hash"] = f.xet_hash
        entries[path] = entry
    _atomic_write(storage / "trees" / f"{commit}.json",
                  json.dumps({"format_version": TREE_FORMAT, "files": entries}, indent=1))


def _select(listing: dict[str, RemoteFile], patterns: list[str] | None) -> list[RemoteFile]:
    """The files a source asks for, with huggingface_hub's glob semantics."""
    return [listing[p] for p in filter_repo_objects(sorted(listing), allow_patterns=patterns)]


def _file_ok(snapshot: Path, remote: RemoteFile) -> bool:
    try:
        return (snapshot / remote.path).stat().st_size == remote.size  # follows the symlink
    except OSError:
        return False


def _read_requests(storage: Path) -> dict[str, list[list[str] | None]]:
    try:
        data = json.loads((storage / REQUESTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_request(storage: Path, commit: str, patterns: list[str] | None) -> None:
    """Remember which files were asked for at a commit, so that `scan_cache` can tell a
    finished partial-repository download from an interrupted one."""
    requests = _read_requests(storage)
    asked = requests.setdefault(commit, [])
    wanted = sorted(patterns) if patterns is not None else None
    if wanted not in asked:
        asked.append(wanted)
        _atomic_write(storage / REQUESTS_FILE, json.dumps(requests, indent=1))


def _link(blob: Path, pointer: Path) -> None:
    """Point snapshots/<commit>/<path> at the blob with a relative symlink (like the Hub's
    layout); copy when the filesystem has no symlinks."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        pointer.unlink()
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:
        shutil.copyfile(blob, pointer)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def is_complete(cache_dir: Path, source: HubSource) -> Path | None:
    """The snapshot folder of `source` when every file it asks for is fully in the cache.

    With the commit's recorded listing (written by every modelhost download, and by
    huggingface_hub 2.x), "every file" is exact: each file the patterns select must be in the
    snapshot with its listed size. A cache written by older tools has no listing; then the
    snapshot is accepted when it has no dangling link and every pattern matches a file,
    which is the best that can be known offline.
    """
    storage = repo_folder(cache_dir, source.hf)
    commit = _local_commit(storage, source.revision)
    if commit is None:
        return None
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    listing = read_listing(storage, commit)
    if listing is not None:
        wanted = _select(listing, source.files)
        return snapshot if wanted and all(_file_ok(snapshot, f) for f in wanted) else None
    return snapshot if _looks_complete(snapshot, source.files) else None


def _looks_complete(snapshot: Path, patterns: list[str] | None) -> bool:
    files = [p for p in snapshot.rglob("*") if p.is_symlink() or p.is_file()]
    if not files or any(not p.exists() for p in files):
        return False
    names = [p.relative_to(snapshot).as_posix() for p in files]
    return all(any(True for _ in filter_repo_objects(names, allow_patterns=[pattern]))
               for pattern in patterns or [])


# --------------------------------------------------------------------------- inspection


def scan_cache(cache_dir: Path) -> list[CachedRepo]:
    """Every model repository in the cache, with its size and what is complete.

    A revision is complete when each download asked of it (the patterns recorded at start)
    has all its files; for revisions fetched by other tools, when no listed file is missing
    from the snapshot while half-downloaded, and no linked file is broken or short.
    """
    root = Path(cache_dir)
    if not root.is_dir():
        return []
    return [_scan_repo(path) for path in sorted(root.glob("models--*")) if path.is_dir()]


def _scan_repo(storage: Path) -> CachedRepo:
    repo = storage.name.removeprefix("models--").replace("--", "/")
    complete_bytes, partial_bytes = 0, 0
    partial_etags: set[str] = set()
    for blob in (storage / "blobs").glob("*") if (storage / "blobs").is_dir() else []:
        if blob.name.endswith(".incomplete"):
            partial_bytes += _size(blob)
            partial_etags.add(blob.name.split(".")[0])
        elif blob.is_file():
            complete_bytes += _size(blob)
    refs = _refs_by_commit(storage)
    requests = _read_requests(storage)
    revisions = []
    snapshots = storage / "snapshots"
    for snapshot in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
        if not snapshot.is_dir():
            continue
        commit = snapshot.name
        files = [p for p in snapshot.rglob("*") if p.is_symlink() or p.is_file()]
        targets = {p.resolve() for p in files if p.exists()}
        complete = _revision_complete(storage, commit, files, requests.get(commit),
                                      partial_etags)
        revisions.append(CachedRevision(commit, tuple(sorted(refs.get(commit, []))),
                                        sum(_size(t) for t in targets), len(files), complete))
    return CachedRepo(repo, storage, complete_bytes + partial_bytes, tuple(revisions),
                      bool(revisions) and all(r.complete for r in revisions)
                      and partial_bytes == 0, partial_bytes)


def _refs_by_commit(storage: Path) -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    folder = storage / "refs"
    for ref in folder.rglob("*") if folder.is_dir() else []:
        if ref.is_file():
            with contextlib.suppress(OSError):
                refs.setdefault(ref.read_text().strip(), []).append(
                    ref.relative_to(folder).as_posix())
    return refs


def _revision_complete(storage: Path, commit: str, files: list[Path],
                       asked: list[list[str] | None] | None, partial_etags: set[str]) -> bool:
    if any(not p.exists() for p in files):
        return False
    snapshot = storage / "snapshots" / commit
    listing = read_listing(storage, commit)
    if listing is None:
        return bool(files)
    if asked:
        return all(all(_file_ok(snapshot, f) for f in _select(listing, patterns))
                   for patterns in asked)
    present = {p.relative_to(snapshot).as_posix() for p in files}
    if any(not _file_ok(snapshot, listing[name]) for name in present if name in listing):
        return False
    return not any(f.etag in partial_etags for name, f in listing.items() if name not in present)


def delete_from_cache(cache_dir: Path, repo: str, revision: str | None = None) -> int:
    """Delete a repository (or one revision of it) from the cache; return the bytes freed.

    A revision's blobs are deleted only when no remaining revision links to them; partial
    downloads are kept while a remaining revision lists them (they still resume).
    """
    if not REPO.fullmatch(repo) or ".." in repo:
        raise ValueError(f"not a repository id: {repo!r}")
    storage = repo_folder(cache_dir, repo)
    if not storage.is_dir():
        return 0
    if revision is None:
        return _delete_tree(storage, Path(cache_dir) / ".locks" / storage.name)
    commit = _local_commit(storage, revision)
    if commit is None or not (storage / "snapshots" / commit).is_dir():
        raise FileNotFoundError(f"revision '{revision}' of {repo} is not in the cache")
    before = _tree_size(storage)
    shutil.rmtree(storage / "snapshots" / commit)
    for ref_commit, names in _refs_by_commit(storage).items():
        if ref_commit == commit:
            for name in names:
                (storage / "refs" / name).unlink()
    with contextlib.suppress(FileNotFoundError):
        (storage / "trees" / f"{commit}.json").unlink()
    requests = _read_requests(storage)
    if requests.pop(commit, None) is not None:
        _atomic_write(storage / REQUESTS_FILE, json.dumps(requests, indent=1))
    remaining = [p for p in (storage / "snapshots").iterdir() if p.is_dir()]
    if not remaining:
        _delete_tree(storage, Path(cache_dir) / ".locks" / storage.name)
        return before
    _collect_blobs(storage, remaining)
    return before - _tree_size(storage)


def _collect_blobs(storage: Path, snapshots: list[Path]) -> None:
    """Delete the blobs no remaining snapshot links to (and partials none of them lists)."""
    linked = {p.resolve() for s in snapshots for p in s.rglob("*") if p.is_symlink()}
    listed = {f.etag for s in snapshots for f in (read_listing(storage, s.name) or {}).values()}
    for blob in (storage / "blobs").glob("*"):
        if blob.name.endswith(".incomplete"):
            if blob.name.split(".")[0] not in listed:
                blob.unlink()
        elif blob.resolve() not in linked:
            blob.unlink()


def _tree_size(path: Path) -> int:
    return sum(_size(p) for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _delete_tree(storage: Path, locks: Path) -> int:
    size = _tree_size(storage)
    shutil.rmtree(storage)
    shutil.rmtree(locks, ignore_errors=True)
    return size


# --------------------------------------------------------------------------- errors


def explain(exc: BaseException, *, repo: str, revision: str, token_set: bool,
            endpoint: str | None, cache_dir: Path) -> DownloadError:
    """Turn whatever a download raised into a DownloadError that says what to do."""
    if isinstance(exc, DownloadError):
        return exc
    page = f"{(endpoint or constants.ENDPOINT).rstrip('/')}/{repo}"
    if isinstance(exc, OfflineModeIsEnabled):
        return DownloadError(f"cannot download {repo}: HF_HUB_OFFLINE is set, which forbids "
                             "any access to the hub; unset it to download", ErrorKind.offline)
    if isinstance(exc, GatedRepoError):
        if token_set:
            return DownloadError(
                f"{repo} is a gated model and the token in use has no access to it: accept "
                f"the model's terms at {page} with the account that owns the token, or "
                f"{SET_TOKEN} (one of an account that has access)", ErrorKind.gated)
        return DownloadError(f"{repo} is a gated model: accept the model's terms at {page}, "
                             f"then {SET_TOKEN}", ErrorKind.gated)
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(f"revision '{revision}' does not exist in {repo}: check "
                             f"`revision` in the model's source (a branch, tag or commit of "
                             f"{page})", ErrorKind.revision_not_found)
    if isinstance(exc, RepositoryNotFoundError):
        if token_set:
            return DownloadError(f"repository {repo} was not found, or the token in use cannot "
                                 f"read it: check `hf: {repo}`; for a private repository use a "
                                 "token with read access to it", ErrorKind.not_found)
        return DownloadError(f"repository {repo} was not found: check `hf: {repo}`; if it is "
                             f"private, {SET_TOKEN}", ErrorKind.not_found)
    if isinstance(exc, RemoteEntryNotFoundError):
        return DownloadError(f"a file of {repo}@{revision} disappeared from the hub during the "
                             "download: start it again", ErrorKind.not_found)
    if isinstance(exc, HfHubHTTPError):
        return _explain_status(exc, repo, revision, token_set)
    if isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError):
        detail = str(exc) or type(exc).__name__
        return DownloadError(f"network error while downloading {repo} from "
                             f"{endpoint or constants.ENDPOINT}: {detail}; the download "
                             "resumes where it stopped when started again", ErrorKind.network)
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return DownloadError(f"the disk holding {cache_dir} is full: free some space or "
                                 "point MODEL_CACHE_DIR at a larger disk; the download resumes "
                                 "where it stopped", ErrorKind.disk_space)
        return DownloadError(f"cannot write to the model cache {cache_dir}: "
                             f"{exc.strerror or exc}; check MODEL_CACHE_DIR and its "
                             "permissions", ErrorKind.disk)
    return DownloadError(f"download of {repo}@{revision} failed: {type(exc).__name__}: {exc}",
                         ErrorKind.internal)


def _explain_status(exc: HfHubHTTPError, repo: str, revision: str,
                    token_set: bool) -> DownloadError:
    status = exc.response.status_code
    if status == 401:
        if token_set:
            return DownloadError("the Hugging Face token was rejected (invalid, expired or "
                                 f"revoked): {SET_TOKEN} with a valid one",
                                 ErrorKind.unauthorized)
        return DownloadError(f"the hub requires a token to download {repo}: {SET_TOKEN}",
                             ErrorKind.unauthorized)
    if status == 403:
        return DownloadError(f"the token in use is not allowed to read {repo} (a fine-grained "
                             f"token needs read access to it): {SET_TOKEN} with that permission",
                             ErrorKind.unauthorized)
    if status in RETRYABLE_STATUS:
        return DownloadError(f"the hub answered {status} while downloading {repo}: try again "
                             "later; the download resumes where it stopped", ErrorKind.hub)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else str(status)
    return DownloadError(f"the hub refused the download of {repo}@{revision}: {first}",
                         ErrorKind.hub)


# --------------------------------------------------------------------------- transfer


class _Stopped(Exception):
    """Raised in a worker thread when its job was asked to stop."""


class _Control:
    """The stop switch of one job, shared by the event loop and the worker threads."""

    def __init__(self) -> None:
        self.stop = threading.Event()  # read by worker threads
        self.halted = asyncio.Event()  # awaited by the job while it is queued
        self.reason: str | None = None

    def halt(self, reason: str) -> None:
        """Called in the event loop thread only."""
        if self.reason is None:
            self.reason = reason
        self.stop.set()
        self.halted.set()

    def check(self) -> None:
        if self.stop.is_set():
            raise _Stopped


@dataclass
class _FileTask:
    remote: RemoteFile
    have: int = 0  # bytes of this file on disk, partial or complete
    fetched: int = 0  # bytes received by this job
    complete: bool = False


@dataclass
class _Plan:
    repo: str
    revision: str
    commit: str
    storage: Path
    files: list[_FileTask] = field(default_factory=list)

    @property
    def snapshot(self) -> Path:
        return self.storage / "snapshots" / self.commit

    @property
    def bytes_total(self) -> int:
        return sum(t.remote.size for t in self.files)


class _Digest:
    """The hash the listing gives for a file, computed as its bytes are written."""

    def __init__(self, remote: RemoteFile) -> None:
        self.remote = remote
        self.reset()

    def reset(self) -> None:
        self.length = 0
        if self.remote.sha256 is not None:
            self._hash = hashlib.sha256()
        else:  # git blob id: sha1 over "blob <size>\0" + content
            self._hash = hashlib.sha1(b"blob %d\0" % self.remote.size)

    def update(self, data: bytes) -> None:
        self._hash.update(data)
        self.length += len(data)

    def matches(self) -> bool:
        return self._hash.hexdigest() == (self.remote.sha256 or self.remote.blob_id)


class _Fetcher:
    """The blocking half of a job: listing, disk check and file transfers (worker threads)."""

    def __init__(self, *, cache_dir: Path, endpoint: str | None, token: str | None,
                 ctl: _Control, reserve_bytes: int, retries: int, retry_delay: float) -> None:
        self.cache_dir = cache_dir
        self.endpoint = endpoint
        self.token = token
        self.ctl = ctl
        self.reserve_bytes = reserve_bytes
        self.retries = retries
        self.retry_delay = retry_delay
        self.timeout = httpx2.Timeout(float(constants.HF_HUB_DOWNLOAD_TIMEOUT),
                                      connect=float(constants.HF_HUB_ETAG_TIMEOUT))

    # ---- planning

    def plan(self, source: HubSource) -> _Plan:
        """Resolve the revision, list its files, check the disk, prepare the layout."""
        api = HfApi(endpoint=self.endpoint, token=self.token or False, library_name="modelhost")
        storage = repo_folder(self.cache_dir, source.hf)
        commit = source.revision
        if not COMMIT.fullmatch(commit):
            info = api.model_info(source.hf, revision=source.revision)
            if not info.sha:
                raise DownloadError(f"the hub did not say which commit {source.revision} of "
                                    f"{source.hf} is", ErrorKind.hub)
            commit = info.sha
            if not COMMIT.fullmatch(commit):
                raise DownloadError(f"the hub named an invalid commit for {source.revision} "
                                    f"of {source.hf}", ErrorKind.hub)
        listing = read_listing(storage, commit)
        if listing is None:
            listing = {f.path: RemoteFile(f.path, f.size, f.blob_id,
                                          f.lfs.sha256 if f.lfs else None, f.xet_hash)
                       for f in api.list_repo_tree(source.hf, recursive=True, revision=commit)
                       if isinstance(f, RepoFile)}
            _write_listing(storage, commit, listing)
        wanted = _select(listing, source.files)
        if not wanted:
            raise DownloadError(f"no file of {source.hf}@{source.revision} matches "
                                f"files={source.files}: check the patterns",
                                ErrorKind.no_files)
        plan = _Plan(source.hf, source.revision, commit, storage,
                     [self._task(storage, commit, f) for f in wanted])
        self._check_disk(plan)
        plan.snapshot.mkdir(parents=True, exist_ok=True)
        if source.revision != commit:
            _atomic_write(storage / "refs" / source.revision, commit)
        _record_request(storage, commit, source.files)
        return plan

    @staticmethod
    def _task(storage: Path, commit: str, remote: RemoteFile) -> _FileTask:
        if _file_ok(storage / "snapshots" / commit, remote):
            return _FileTask(remote, have=remote.size, complete=True)
        blob = storage / "blobs" / remote.etag
        if _size(blob) == remote.size:
            return _FileTask(remote, have=remote.size)
        return _FileTask(remote, have=_size(blob.with_name(blob.name + ".incomplete")))

    def _check_disk(self, plan: _Plan) -> None:
        """Refuse before the first byte when the missing bytes do not fit."""
        missing = sum(t.remote.size - min(t.have, t.remote.size) for t in plan.files)
        if missing == 0:
            return
        where = self.cache_dir
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free
        if missing + self.reserve_bytes > free:
            margin = f" ({gib(self.reserve_bytes)} must stay free)" if self.reserve_bytes else ""
            raise DownloadError(
                f"not enough disk space for {plan.repo}@{plan.revision}: needs "
                f"{gib(missing)}, {gib(free)} free in {where}{margin}; delete unused models "
                "from the cache or point MODEL_CACHE_DIR at a larger disk",
                ErrorKind.disk_space)

    # ---- transfer

    def fetch(self, plan: _Plan, task: _FileTask) -> None:
        """Bring one file into blobs/ (resuming its partial download) and link it."""
        if task.complete:
            return
        self.ctl.check()
        remote = task.remote
        blob = plan.storage / "blobs" / remote.etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        with self._blob_lock(plan.storage.name, remote.etag):
            if _size(blob) != remote.size:
                self._download(plan, task, blob)
            _link(blob, plan.snapshot / remote.path)
        task.have = remote.size
        task.complete = True

    @contextlib.contextmanager
    def _blob_lock(self, folder: str, etag: str) -> Iterator[None]:
        """huggingface_hub's own lock for this blob, waited for without ignoring a stop."""
        path = self.cache_dir / ".locks" / folder / f"{etag}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path))
        while True:
            self.ctl.check()
            try:
                lock.acquire(timeout=0.2)
                break
            except filelock.Timeout:
                continue
        try:
            yield
        finally:
            lock.release()

    def _download(self, plan: _Plan, task: _FileTask, blob: Path) -> None:
        """Stream the file into blobs/<etag>.incomplete, retrying network failures from where
        they stopped; verify it; move it into place."""
        part = blob.with_name(blob.name + ".incomplete")
        url = hf_hub_url(plan.repo, task.remote.path, revision=plan.commit,
                         endpoint=self.endpoint)
        digest = _Digest(task.remote)
        failures = 0
        while True:
            self.ctl.check()
            before = _size(part)
            try:
                self._stream(url, part, task, digest)
                break
            except (httpx2.TransportError, _Retryable) as exc:
                failures = 0 if _size(part) > before else failures + 1
                if failures > self.retries:
                    if isinstance(exc, _Retryable):
                        raise exc.error from None
                    raise
                logger.warning("download of %s/%s interrupted at byte %d (%s); resuming",
                               plan.repo, task.remote.path, _size(part), exc)
                if self.ctl.stop.wait(self.retry_delay * min(failures, 5)):
                    raise _Stopped from None
        if _size(part) != task.remote.size or not digest.matches():
            part.unlink()
            raise DownloadError(
                f"{task.remote.path} of {plan.repo} does not match the hub's checksum (the "
                "transfer was corrupted); the partial file was discarded: start the download "
                "again", ErrorKind.checksum)
        os.replace(part, blob)

    def _stream(self, url: str, part: Path, task: _FileTask, digest: _Digest) -> None:
        """One GET, from the end of the partial file (Range) to the end of the file."""
        size = task.remote.size
        offset = _size(part)
        if offset > size:  # not this file's partial download: start over
            offset = 0
        if digest.length != offset:  # resuming a partial file from an earlier attempt
            self._rehash(part, offset, digest)
        task.have = offset
        if offset == size:
            return
        headers = build_hf_headers(token=self.token or False, library_name="modelhost")
        headers["Accept-Encoding"] = "identity"
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with get_session().stream("GET", url, headers=headers, timeout=self.timeout,
                                  follow_redirects=True) as response:
            self._raise_for_status(response)
            if offset and response.status_code != 206:  # the server ignored the Range
                offset = 0
                digest.reset()
                task.have = 0
            with part.open("r+b" if part.exists() else "wb") as out:
                out.seek(offset)
                out.truncate()
                for chunk in response.iter_bytes():
                    self.ctl.check()
                    out.write(chunk)
                    digest.update(chunk)
                    task.have += len(chunk)
                    task.fetched += len(chunk)
                out.flush()
                os.fsync(out.fileno())

    def _rehash(self, part: Path, length: int, digest: _Digest) -> None:
        digest.reset()
        if length == 0:
            return
        with part.open("rb") as f:
            while digest.length < length:
                self.ctl.check()
                block = f.read(min(8 << 20, length - digest.length))
                if not block:
                    break
                digest.update(block)

    @staticmethod
    def _raise_for_status(response: httpx2.Response) -> None:
        if response.status_code < 400:
            return
        response.read()
        try:
            hf_raise_for_status(response)
        except HfHubHTTPError as exc:
            if response.status_code in RETRYABLE_STATUS:
                raise _Retryable(exc) from exc
            raise


class _Retryable(Exception):
    """An HTTP answer worth retrying (429, 5xx); carries the library's error."""

    def __init__(self, error: HfHubHTTPError) -> None:
        super().__init__(str(error))
        self.error = error


def gib(n: float) -> str:
    """Bytes for people: 12.3 GiB, 456.7 MiB, 12 KiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------- the downloader


@dataclass
class _Meter:
    """Turns byte counts sampled over time into a smoothed rate.

    An exponential moving average (time constant RATE_TIME_CONSTANT) with its start-up bias
    corrected, so that the first second shows the real average so far instead of a rate
    creeping up from 0.
    """

    last_bytes: int = 0
    last_time: float = 0.0
    average: float = 0.0
    weight: float = 0.0

    def sample(self, fetched: int, now: float) -> float:
        dt = now - self.last_time
        if dt > 0:
            alpha = 1 - math.exp(-dt / RATE_TIME_CONSTANT)
            instant = max(0, fetched - self.last_bytes) / dt
            self.average += alpha * (instant - self.average)
            self.weight += alpha * (1 - self.weight)
            self.last_bytes, self.last_time = fetched, now
        return self.average / self.weight if self.weight else 0.0


class Downloader:
    """Downloads hub models into the cache, one job per model at a time.

    `token_provider` is called at the start of each job, so a token set through the admin
    API applies to the next download. `endpoint` defaults to HF_ENDPOINT (huggingface.co).
    `reserve_bytes` is the free space that must remain after a download (the margin of the
    disk check). `max_jobs` jobs run at once; the others wait in state `queued`.
    `files_in_parallel` files of one job are transferred at once. A file whose transfer
    breaks is resumed at once (Range) as long as each attempt brings new bytes; after
    `retries` attempts in a row that bring none (waiting `retry_delay`, then longer, between
    them) the job fails, keeping its partial files for the next start.

    Subscribers are called in the event loop thread with a copy of the job: on every state
    change and, while running, at most every PROGRESS_INTERVAL seconds.
    """

    def __init__(self, cache_dir: Path, token_provider: Callable[[], str | None],
                 endpoint: str | None = None, *, reserve_bytes: int = 1 << 30,
                 max_jobs: int = 2, files_in_parallel: int = 4, retries: int = 5,
                 retry_delay: float = 1.0) -> None:
        self.cache_dir = Path(cache_dir)
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.reserve_bytes = reserve_bytes
        self.files_in_parallel = files_in_parallel
        self.retries = retries
        self.retry_delay = retry_delay
        self._token_provider = token_provider
        self._jobs: dict[str, DownloadJob] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._controls: dict[str, _Control] = {}
        self._subscribers: list[Subscriber] = []
        self._meters: dict[str, _Meter] = {}
        self._pending: set[asyncio.Future[Any]] = set()
        self._slots = asyncio.Semaphore(max_jobs)
        self._pool = ThreadPoolExecutor(max_workers=max_jobs * files_in_parallel + max_jobs,
                                        thread_name_prefix="modelhost-download")
        self._closed = False

    # ---- public API

    async def start(self, model_id: str, source: HubSource) -> DownloadJob:
        """Start downloading `source` for `model_id`; if a job for it is queued or running,
        return that job instead (one job per model at a time)."""
        current = self._jobs.get(model_id)
        if current is not None and current.active:
            return current
        if self._closed:
            raise RuntimeError("the downloader is closed")
        job = DownloadJob(model_id, source.hf, source.revision,
                          list(source.files) if source.files is not None else None)
        ctl = _Control()
        self._jobs[model_id], self._controls[model_id] = job, ctl
        self._emit(job)
        self._tasks[model_id] = asyncio.create_task(self._run(job, source, ctl),
                                                    name=f"download:{model_id}")
        return job

    async def cancel(self, model_id: str) -> DownloadJob | None:
        """Stop the model's download and wait until no more bytes are transferred; the partial
        files stay, so the next start resumes them."""
        job, ctl = self._jobs.get(model_id), self._controls.get(model_id)
        if job is None or ctl is None:
            return None
        if job.active:
            ctl.halt("cancelled")
            await self.wait(model_id)
        return job

    async def wait(self, model_id: str) -> DownloadJob:
        """Wait for the model's current job to finish; return it (KeyError if none)."""
        job = self._jobs[model_id]
        task = self._tasks.get(model_id)
        if task is not None:
            await asyncio.shield(task)
        return job

    def get(self, model_id: str) -> DownloadJob | None:
        """The model's latest job (live object: read it, do not change it)."""
        return self._jobs.get(model_id)

    def jobs(self) -> list[DownloadJob]:
        return [job.copy() for job in self._jobs.values()]

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(job_copy)` on each event; returns the function that unsubscribes.
        A callback may be a coroutine function: its coroutine is scheduled, not awaited."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def is_complete(self, source: HubSource) -> Path | None:
        return is_complete(self.cache_dir, source)

    def scan(self) -> list[CachedRepo]:
        return scan_cache(self.cache_dir)

    async def delete(self, repo: str, revision: str | None = None) -> int:
        """Delete from the cache, refusing while a download of that repository runs."""
        busy = [j.model_id for j in self._jobs.values() if j.active and j.repo == repo]
        if busy:
            raise DownloadError(f"{repo} is being downloaded for {', '.join(busy)}: cancel the "
                                "download first", ErrorKind.internal)
        return await self._in_thread(delete_from_cache, self.cache_dir, repo, revision)

    async def close(self) -> None:
        """Stop every job (their partial files stay for the next start) and the threads."""
        self._closed = True
        for model_id, ctl in self._controls.items():
            if self._jobs[model_id].active:
                ctl.halt("shutdown")
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._pool.shutdown(wait=True)

    async def __aenter__(self) -> Downloader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- one job

    async def _run(self, job: DownloadJob, source: HubSource, ctl: _Control) -> None:
        token: str | None = None
        try:
            if not await self._wait_slot(ctl):
                raise _Stopped
            try:
                token = self._token_provider()
                job.started_at = time.time()
                self._set_state(job, JobState.running)
                logger.info("download of %s@%s for %s started", job.repo, job.revision,
                            job.model_id)
                fetcher = _Fetcher(cache_dir=self.cache_dir, endpoint=self.endpoint,
                                   token=token, ctl=ctl, reserve_bytes=self.reserve_bytes,
                                   retries=self.retries, retry_delay=self.retry_delay)
                plan = await self._in_thread(fetcher.plan, source)
                self._adopt(job, plan)
                await self._transfer(job, plan, fetcher, ctl)
                job.snapshot = str(await self._in_thread(self._verify, plan))
            finally:
                self._slots.release()
        except _Stopped:
            self._finish_stopped(job, ctl)
        except asyncio.CancelledError:  # the loop itself is going away
            ctl.halt("shutdown")
            self._finish_stopped(job, ctl)
            raise
        except Exception as exc:  # every failure becomes the job's error, with what to do
            error = explain(exc, repo=job.repo, revision=job.revision, token_set=bool(token),
                            endpoint=self.endpoint, cache_dir=self.cache_dir)
            self._finish(job, JobState.failed, _scrub(str(error), token), error.kind)
        else:
            self._finish(job, JobState.completed)

    async def _wait_slot(self, ctl: _Control) -> bool:
        """Wait for a free slot, or for a stop while still queued. True once a slot is held."""
        slot = asyncio.ensure_future(self._slots.acquire())
        halted = asyncio.ensure_future(ctl.halted.wait())
        await asyncio.wait({slot, halted}, return_when=asyncio.FIRST_COMPLETED)
        halted.cancel()
        if not slot.done():
            slot.cancel()
            return False
        if ctl.stop.is_set():
            self._slots.release()
            return False
        return True

    async def _transfer(self, job: DownloadJob, plan: _Plan, fetcher: _Fetcher,
                        ctl: _Control) -> None:
        """Fetch the files a few at a time while a monitor publishes progress."""
        limit = asyncio.Semaphore(self.files_in_parallel)

        async def one(task: _FileTask) -> None:
            async with limit:
                if task.complete:
                    return
                ctl.check()
                try:
                    await self._in_thread(fetcher.fetch, plan, task)
                except _Stopped:
                    raise
                except asyncio.CancelledError:
                    ctl.halt("shutdown")
                    raise
                except Exception:
                    ctl.halt("error")  # the other files stop too: the job has failed
                    raise

        monitor = asyncio.create_task(self._monitor(job, plan))
        try:
            results = await asyncio.gather(*(one(t) for t in plan.files),
                                           return_exceptions=True)
        except asyncio.CancelledError:
            ctl.halt("shutdown")
            raise
        finally:
            monitor.cancel()
        self._progress(job, plan)
        errors = [r for r in results if isinstance(r, BaseException)]
        real = [e for e in errors if not isinstance(e, _Stopped)]
        if real:
            raise real[0]
        if errors:
            raise _Stopped

    async def _monitor(self, job: DownloadJob, plan: _Plan) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            if self._progress(job, plan):
                self._emit(job)

    def _adopt(self, job: DownloadJob, plan: _Plan) -> None:
        job.commit = plan.commit
        job.bytes_total = plan.bytes_total
        job.files_total = len(plan.files)
        self._meters[job.model_id] = _Meter(last_time=time.monotonic())
        self._progress(job, plan)
        self._emit(job)

    def _progress(self, job: DownloadJob, plan: _Plan) -> bool:
        """Update the job's counters from the file tasks; True when something changed."""
        before = (job.bytes_done, job.files_done, job.bytes_fetched)
        job.bytes_done = sum(min(t.have, t.remote.size) for t in plan.files)
        job.files_done = sum(t.complete for t in plan.files)
        job.bytes_fetched = sum(t.fetched for t in plan.files)
        meter = self._meters.setdefault(job.model_id, _Meter(last_time=time.monotonic()))
        job.rate = meter.sample(job.bytes_fetched, time.monotonic())
        left = (job.bytes_total or 0) - job.bytes_done
        job.eta_seconds = left / job.rate if job.rate > 1 and left > 0 else None
        return before != (job.bytes_done, job.files_done, job.bytes_fetched)

    @staticmethod
    def _verify(plan: _Plan) -> Path:
        missing = [t.remote.path for t in plan.files if not _file_ok(plan.snapshot, t.remote)]
        if missing:
            raise DownloadError(f"{plan.repo}@{plan.revision} is incomplete after the "
                                f"download ({', '.join(missing[:3])} missing or short): start "
                                "it again", ErrorKind.internal)
        return plan.snapshot

    # ---- state and events

    def _set_state(self, job: DownloadJob, state: JobState) -> None:
        job.state = state
        self._emit(job)

    def _finish(self, job: DownloadJob, state: JobState, error: str | None = None,
                kind: ErrorKind | None = None) -> None:
        job.error, job.error_kind = error, kind
        job.finished_at = time.time()
        job.rate, job.eta_seconds = 0.0, None
        self._meters.pop(job.model_id, None)
        if state is JobState.failed:
            logger.warning("download of %s@%s for %s failed: %s", job.repo, job.revision,
                           job.model_id, error)
        else:
            logger.info("download of %s@%s for %s %s", job.repo, job.revision, job.model_id,
                        state)
        self._set_state(job, state)

    def _finish_stopped(self, job: DownloadJob, ctl: _Control) -> None:
        error = None
        if ctl.reason == "shutdown":
            error = "interrupted by the gateway's shutdown; it resumes where it stopped"
        self._finish(job, JobState.cancelled, error)

    def _emit(self, job: DownloadJob) -> None:
        event = job.copy()
        for callback in list(self._subscribers):
            try:
                result = callback(event)
            except Exception:
                logger.exception("download event subscriber %r failed", callback)
                continue
            if inspect.isawaitable(result):
                future = asyncio.ensure_future(result)
                self._pending.add(future)
                future.add_done_callback(self._pending.discard)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


def _scrub(text: str, token: str | None) -> str:
    """Belt and braces: a token must never reach an error message."""
    if token and token in text:
        return text.replace(token, mask(token) or "…")
    return text


__all__ = [
    "CachedRepo", "CachedRevision", "DownloadError", "DownloadJob", "Downloader", "ErrorKind",
    "JobState", "delete_from_cache", "explain", "is_complete", "read_listing", "repo_folder",
    "scan_cache",
]
