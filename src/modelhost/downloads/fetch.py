"""The file fetcher: the blocking half of a download, run in worker threads.

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
costs no second pass over multi-GiB weights.

Cancellation: transfers run in worker threads that check a stop flag after each network
read; a stop closes the HTTP response (and its connection) at once and keeps the partial
file for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import httpx2
from huggingface_hub import HfApi, constants, get_session, hf_hub_url, hf_raise_for_status
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import (  # type: ignore[attr-defined]  # public, not re-exported
    build_hf_headers,
)

from modelhost.config import HubSource
from modelhost.downloads.cache import (
    COMMIT,
    RemoteFile,
    atomic_write,
    file_ok,
    file_size,
    link_blob,
    read_listing,
    record_request,
    repo_folder,
    select_files,
    write_listing,
)
from modelhost.downloads.errors import RETRYABLE_STATUS, DownloadError, ErrorKind

logger = logging.getLogger(__name__)


class Stopped(Exception):
    """Raised in a worker thread when its job was asked to stop."""


class Control:
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
            raise Stopped


@dataclass
class FileTask:
    """One file of a plan: how much of it is on disk (read by the progress monitor)."""

    remote: RemoteFile
    have: int = 0  # bytes of this file on disk, partial or complete
    fetched: int = 0  # bytes received by this job
    complete: bool = False


@dataclass
class Plan:
    """What one job fetches: the commit its revision resolved to, and the files selected."""

    repo: str
    revision: str
    commit: str
    storage: Path
    files: list[FileTask] = field(default_factory=list)

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


class Fetcher:
    """The blocking half of a job: listing, disk check and file transfers (worker threads)."""

    def __init__(self, *, cache_dir: Path, endpoint: str | None, token: str | None,
                 ctl: Control, reserve_bytes: int, retries: int, retry_delay: float) -> None:
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

    def plan(self, source: HubSource) -> Plan:
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
            write_listing(storage, commit, listing)
        wanted = select_files(listing, source.files)
        if not wanted:
            raise DownloadError(f"no file of {source.hf}@{source.revision} matches "
                                f"files={source.files}: check the patterns",
                                ErrorKind.no_files)
        plan = Plan(source.hf, source.revision, commit, storage,
                     [self._task(storage, commit, f) for f in wanted])
        self._check_disk(plan)
        plan.snapshot.mkdir(parents=True, exist_ok=True)
        if source.revision != commit:
            atomic_write(storage / "refs" / source.revision, commit)
        record_request(storage, commit, source.files)
        return plan

    @staticmethod
    def _task(storage: Path, commit: str, remote: RemoteFile) -> FileTask:
        if file_ok(storage / "snapshots" / commit, remote):
            return FileTask(remote, have=remote.size, complete=True)
        blob = storage / "blobs" / remote.etag
        if file_size(blob) == remote.size:
            return FileTask(remote, have=remote.size)
        return FileTask(remote, have=file_size(blob.with_name(blob.name + ".incomplete")))

    def _check_disk(self, plan: Plan) -> None:
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

    def fetch(self, plan: Plan, task: FileTask) -> None:
        """Bring one file into blobs/ (resuming its partial download) and link it."""
        if task.complete:
            return
        self.ctl.check()
        remote = task.remote
        blob = plan.storage / "blobs" / remote.etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        with self._blob_lock(plan.storage.name, remote.etag):
            if file_size(blob) != remote.size:
                self._download(plan, task, blob)
            link_blob(blob, plan.snapshot / remote.path)
        task.have = remote.size
        task.complete = True

    @staticmethod
    def verify(plan: Plan) -> Path:
        """The snapshot folder, once every file of the plan is in it with its listed size."""
        missing = [t.remote.path for t in plan.files if not file_ok(plan.snapshot, t.remote)]
        if missing:
            raise DownloadError(f"{plan.repo}@{plan.revision} is incomplete after the "
                                f"download ({', '.join(missing[:3])} missing or short): start "
                                "it again", ErrorKind.internal)
        return plan.snapshot

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

    def _download(self, plan: Plan, task: FileTask, blob: Path) -> None:
        """Stream the file into blobs/<etag>.incomplete, retrying network failures from where
        they stopped; verify it; move it into place."""
        part = blob.with_name(blob.name + ".incomplete")
        url = hf_hub_url(plan.repo, task.remote.path, revision=plan.commit,
                         endpoint=self.endpoint)
        digest = _Digest(task.remote)
        failures = 0
        while True:
            self.ctl.check()
            before = file_size(part)
            try:
                self._stream(url, part, task, digest)
                break
            except (httpx2.TransportError, _Retryable) as exc:
                failures = 0 if file_size(part) > before else failures + 1
                if failures > self.retries:
                    if isinstance(exc, _Retryable):
                        raise exc.error from None
                    raise
                logger.warning("download of %s/%s interrupted at byte %d (%s); resuming",
                               plan.repo, task.remote.path, file_size(part), exc)
                if self.ctl.stop.wait(self.retry_delay * min(failures, 5)):
                    raise Stopped from None
        if file_size(part) != task.remote.size or not digest.matches():
            part.unlink()
            raise DownloadError(
                f"{task.remote.path} of {plan.repo} does not match the hub's checksum (the "
                "transfer was corrupted); the partial file was discarded: start the download "
                "again", ErrorKind.checksum)
        os.replace(part, blob)

    def _stream(self, url: str, part: Path, task: FileTask, digest: _Digest) -> None:
        """One GET, from the end of the partial file (Range) to the end of the file."""
        size = task.remote.size
        offset = file_size(part)
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
