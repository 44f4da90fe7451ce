"""Downloads against a real HTTP hub on loopback (tests/fake_hub.py), into a real cache.

No mocks: huggingface_hub talks HTTP to the fake hub, faults (a connection cut midway, a
slow link) happen on the wire, and the cache is checked on disk, also through
huggingface_hub's own cache functions, since other tools must be able to share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import huggingface_hub
import pytest
from huggingface_hub import HfApi, constants

from modelhost import hubtoken
from modelhost.config import HubSource
from modelhost.downloads import Downloader, DownloadJob, JobState
from modelhost.downloads.cache import (
    delete_from_cache,
    is_complete,
    read_listing,
    repo_folder,
    scan_cache,
)
from modelhost.downloads.errors import ErrorKind
from modelhost.downloads.fetch import gib
from tests.fake_hub import FakeHub, git_blob_sha1

T = TypeVar("T")
TESTS = Path(__file__).parent
MIB = 1 << 20
BIG = "model.safetensors"
BIG_SIZE = 3 * MIB
GOOD_TOKEN = "hf_GoodTokenAbcdefghijklmnop1234"
BAD_TOKEN = "hf_BadTokenZyxwvutsrqponmlk9876"


def _bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _make_repos(root: Path) -> None:
    files = {
        "acme/tiny/main": {"config.json": b'{"v": 2}\n', "README.md": b"# tiny\n",
                           BIG: _bytes(1, BIG_SIZE), "extra/model-q4.gguf": _bytes(2, 400_000),
                           "sub/tokenizer.json": b'{"tokens": []}\n'},
        "acme/tiny/v1": {"config.json": b'{"v": 1}\n', BIG: _bytes(3, 200_000)},
        "acme/gated/main": {"config.json": b"{}\n", "weights.bin": _bytes(4, 50_000)},
        "acme/private/main": {"config.json": b"{}\n", "weights.bin": _bytes(5, 50_000)},
    }
    for folder, content in files.items():
        for name, data in content.items():
            path = root / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def hub_root(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    _make_repos(root)
    return root


@pytest.fixture
def hub(hub_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: make sure it allows this test.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    with FakeHub(hub_root) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def downloader(hub: FakeHub, cache: Path, token: str | None = None,
               **kwargs: Any) -> Downloader:
    kwargs.setdefault("reserve_bytes", 0)
    kwargs.setdefault("retry_delay", 0.05)
    kwargs.setdefault("endpoint", hub.url)
    return Downloader(cache, lambda: token, **kwargs)


async def fetch(hub: FakeHub, cache: Path, source: HubSource, token: str | None = None,
                events: list[DownloadJob] | None = None, **kwargs: Any) -> DownloadJob:
    """One download from start to end, with a fresh Downloader."""
    async with downloader(hub, cache, token, **kwargs) as d:
        if events is not None:
            d.subscribe(events.append)
        await d.start("m", source)
        return (await d.wait("m")).copy()


async def until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def commit_of(hub: FakeHub, repo: str, rev: str) -> str:
    revision = hub.revision(repo, rev)
    assert revision is not None
    return revision.commit


def source_file(hub_root: Path, rev: str, name: str, repo: str = "acme/tiny") -> bytes:
    return (hub_root / repo / rev / name).read_bytes()


def blob_name(data: bytes, lfs: bool) -> str:
    return hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)


def link_down_after(hub: FakeHub, path: str, after: int) -> None:
    """The link breaks after `after` bytes of `path` and stays down: every later response
    is cut before its first byte (a failure without progress, which ends a job)."""
    hub.cut(path, after=after, times=1)
    hub.cut(path, after=0, times=None)


def partial(cache: Path, data: bytes) -> Path:
    return repo_folder(cache, "acme/tiny") / "blobs" / f"{blob_name(data, True)}.incomplete"


# --------------------------------------------------------------------------- downloads


def test_whole_repo_lands_in_the_hub_cache_layout(hub: FakeHub, hub_root: Path,
                                                  cache: Path) -> None:
    job = run(fetch(hub, cache, HubSource(hf="acme/tiny")))
    assert job.state is JobState.completed, job.error
    commit = commit_of(hub, "acme/tiny", "main")
    storage = cache / "models--acme--tiny"
    snapshot = storage / "snapshots" / commit
    assert job.commit == commit and job.snapshot == str(snapshot)
    assert (storage / "refs" / "main").read_text() == commit
    names = ["config.json", "README.md", BIG, "extra/model-q4.gguf", "sub/tokenizer.json"]
    assert job.files_total == job.files_done == len(names)
    for name in names:
        data = source_file(hub_root, "main", name)
        link = snapshot / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        blob = link.resolve()
        assert blob.parent == (storage / "blobs").resolve()
        assert blob.name == blob_name(data, len(data) >= hub.lfs_threshold)
        assert blob.read_bytes() == data
    assert not list((storage / "blobs").glob("*.incomplete"))
    # Other tools see the same cache: huggingface_hub finds the snapshot without the network.
    assert huggingface_hub.snapshot_download(
        "acme/tiny", cache_dir=cache, local_files_only=True) == str(snapshot)
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings
    assert [r.repo_id for r in info.repos] == ["acme/tiny"]


def test_selected_files_by_glob(hub: FakeHub, cache: Path) -> None:
    source = HubSource(hf="acme/tiny", files=["*.json", "extra/"])
    job = run(fetch(hub, cache, source))
    assert job.state is JobState.completed, job.error
    snapshot = Path(job.snapshot or "")
    got = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    # huggingface_hub's semantics: "*" crosses folders, "extra/" means everything below it.
    assert got == ["config.json", "extra/model-q4.gguf", "sub/tokenizer.json"]
    assert hub.content_requests(BIG) == []
    assert is_complete(cache, source) == snapshot
    # The same snapshot is only partial for a source that wants the whole repository.
    assert is_complete(cache, HubSource(hf="acme/tiny")) is None


def test_revision_branch_and_commit(hub: FakeHub, hub_root: Path, cache: Path) -> None:
    commit = commit_of(hub, "acme/tiny", "v1")
    job = run(fetch(hub, cache, HubSource(hf="acme/tiny", revision="v1")))
    assert job.state is JobState.completed, job.error
    assert job.commit == commit
    assert (Path(job.snapshot or "") / "config.json").read_bytes() == b'{"v": 1}\n'
    assert (cache / "models--acme--tiny" / "refs" / "v1").read_text() == commit
    # A commit id needs no resolution, and its listing is already recorded: no request.
    hub.reset_stats()
    job = run(fetch(hub, cache, HubSource(hf="acme/tiny", revision=commit)))
    assert job.state is JobState.completed and job.snapshot is not None
    assert hub.requests == []


def test_progress_events(hub: FakeHub, cache: Path) -> None:
    hub.throttle(2 * MIB)
    events: list[DownloadJob] = []
    started = time.monotonic()
    job = run(fetch(hub, cache, HubSource(hf="acme/tiny", files=[BIG]), events=events))
    elapsed = time.monotonic() - started
    assert job.state is JobState.completed, job.error
    states = [e.state for e in events]
    assert states[0] is JobState.queued and states[-1] is JobState.completed
    assert states.count(JobState.running) >= 3
    done = [e.bytes_done for e in events]
    assert done == sorted(done), "bytes_done never goes back"
    totals = {e.bytes_total for e in events if e.bytes_total is not None}
    assert totals == {BIG_SIZE}
    final = events[-1]
    assert final.bytes_done == final.bytes_total == final.bytes_fetched == BIG_SIZE
    assert final.files_done == final.files_total == 1 and final.finished_at is not None
    running = [e for e in events if e.state is JobState.running]
    assert any(e.rate > 0.5 * MIB for e in running)
    assert any(e.eta_seconds is not None and 0 < e.eta_seconds < 10 for e in running)
    # At most about 4 progress events per second, plus the state changes.
    assert len(running) <= 4 * elapsed + 3
    assert json.loads(json.dumps(final.to_dict()))["state"] == "completed"


def test_second_download_downloads_nothing(hub: FakeHub, cache: Path) -> None:
    first = run(fetch(hub, cache, HubSource(hf="acme/tiny")))
    assert first.state is JobState.completed and first.bytes_fetched > BIG_SIZE
    hub.reset_stats()
    second = run(fetch(hub, cache, HubSource(hf="acme/tiny")))
    assert second.state is JobState.completed and second.snapshot == first.snapshot
    assert second.bytes_fetched == 0 and second.bytes_done == first.bytes_total
    assert hub.content_requests() == [] and hub.content_requests(method="HEAD") == []
    # Only the revision is resolved again (main may have moved); the listing is recorded.
    assert [r.path for r in hub.requests] == ["/api/models/acme/tiny/revision/main"]


def test_cut_midway_resumes_with_range(hub: FakeHub, hub_root: Path, cache: Path) -> None:
    hub.cut(BIG, after=MIB)
    job = run(fetch(hub, cache, HubSource(hf="acme/tiny", files=[BIG])))
    assert job.state is JobState.completed, job.error
    gets = hub.content_requests(BIG)
    assert [(g.cut, g.range) for g in gets] == [(True, None), (False, f"bytes={MIB}-")]
    assert gets[1].status == 206
    assert hub.bytes_served(BIG) == BIG_SIZE  # not twice the file
    assert (Path(job.snapshot or "") / BIG).read_bytes() == source_file(hub_root, "main", BIG)


def test_failed_download_resumes_on_next_start(hub: FakeHub, hub_root: Path,
                                               cache: Path) -> None:
    data = source_file(hub_root, "main", BIG)
    source = HubSource(hf="acme/tiny", files=[BIG])
    link_down_after(hub, BIG, MIB)
    failed = run(fetch(hub, cache, source, retries=0))
    assert failed.state is JobState.failed
    assert failed.error_kind is ErrorKind.network
    assert "network error" in (failed.error or "") and "resumes" in (failed.error or "")
    assert _size(partial(cache, data)) == MIB
    assert is_complete(cache, source) is None
    hub.clear_faults()
    hub.reset_stats()
    job = run(fetch(hub, cache, source))
    assert job.state is JobState.completed, job.error
    assert [g.range for g in hub.content_requests(BIG)] == [f"bytes={MIB}-"]
    assert hub.bytes_served(BIG) == BIG_SIZE - MIB
    assert job.bytes_fetched == BIG_SIZE - MIB
    assert (Path(job.snapshot or "") / BIG).read_bytes() == data
    assert not partial(cache, data).exists()


def test_cancel_stops_the_transfer_and_start_resumes(hub: FakeHub, hub_root: Path,
                                                     cache: Path) -> None:
    data = source_file(hub_root, "main", BIG)
    source = HubSource(hf="acme/tiny", files=[BIG])
    hub.throttle(MIB)

    async def scenario() -> tuple[DownloadJob, DownloadJob]:
        async with downloader(hub, cache) as d:
            job = await d.start("m", source)
            assert await d.start("m", source) is job  # one job per model at a time
            await until(lambda: job.bytes_done >= MIB // 2)
            with pytest.raises(Exception, match="being downloaded"):
                await d.delete("acme/tiny")
            cancelled = await d.cancel("m")
            assert cancelled is job
            assert job.state is JobState.cancelled and job.error is None
            # The connection is closed: the hub's next write fails and its transfer ends.
            await until(lambda: hub.content_requests(BIG)[-1].aborted, timeout=2)
            served = hub.bytes_served(BIG)
            count = len(hub.requests)
            await asyncio.sleep(0.5)
            assert hub.bytes_served(BIG) == served, "bytes still flowing after cancel"
            assert len(hub.requests) == count, "requests made after cancel"
            assert not any(g.completed for g in hub.content_requests(BIG))
            kept = _size(partial(cache, data))
            assert MIB // 2 <= kept < BIG_SIZE
            hub.clear_faults()
            hub.reset_stats()
            again = await d.start("m", source)
            assert again is not job
            await d.wait("m")
            assert [g.range for g in hub.content_requests(BIG)] == [f"bytes={kept}-"]
            assert hub.bytes_served(BIG) == BIG_SIZE - kept
            return job.copy(), again.copy()

    first, second = run(scenario())
    assert first.state is JobState.cancelled
    assert second.state is JobState.completed, second.error
    assert (Path(second.snapshot or "") / BIG).read_bytes() == data


def test_jobs_wait_in_the_queue_and_a_queued_job_can_be_cancelled(hub: FakeHub,
                                                                   cache: Path) -> None:
    hub.throttle(4 * MIB)
    seen: list[tuple[str, JobState]] = []

    async def record(job: DownloadJob) -> None:  # subscribers may be coroutine functions
        seen.append((job.model_id, job.state))

    def broken(job: DownloadJob) -> None:
        raise RuntimeError("a subscriber bug must not break downloads")

    async def scenario() -> tuple[DownloadJob, DownloadJob]:
        async with downloader(hub, cache, max_jobs=1) as d:
            d.subscribe(broken)
            unsubscribe = d.subscribe(record)
            first = await d.start("a", HubSource(hf="acme/tiny", files=[BIG]))
            second = await d.start("b", HubSource(hf="acme/tiny", revision="v1"))
            await until(lambda: first.bytes_done > 0)
            assert (first.state, second.state) == (JobState.running, JobState.queued)
            await d.cancel("b")
            assert second.state is JobState.cancelled
            await d.wait("a")
            await asyncio.sleep(0.05)  # the scheduled coroutines of `record` run
            unsubscribe()
            return first.copy(), second.copy()

    first, second = run(scenario())
    assert first.state is JobState.completed, first.error
    assert second.state is JobState.cancelled and second.bytes_total is None
    assert ("b", JobState.cancelled) in seen and ("b", JobState.running) not in seen
    assert ("a", JobState.completed) in seen
    assert not any("v1" in r.path for r in hub.requests)  # "b" never reached the hub


CHILD = """
import asyncio, sys
from pathlib import Path
from modelhost.config import HubSource
from modelhost.downloads import Downloader

async def main() -> None:
    async with Downloader(Path(sys.argv[1]), lambda: None, sys.argv[2], reserve_bytes=0) as d:
        await d.start("m", HubSource(hf="acme/tiny", files=["model.safetensors"]))
        await d.wait("m")

asyncio.run(main())
"""


def test_gateway_killed_midway_resumes_after_restart(hub: FakeHub, hub_root: Path,
                                                     cache: Path) -> None:
    """A gateway killed with SIGKILL (no cleanup at all) leaves a partial blob that the next
    process resumes with a Range request."""
    data = source_file(hub_root, "main", BIG)
    hub.throttle(MIB)
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(cache), hub.url], env=env)
    try:
        deadline = time.monotonic() + 30
        while _size(partial(cache, data)) < MIB // 2:
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    time.sleep(0.2)
    kept = _size(partial(cache, data))
    assert MIB // 2 <= kept < BIG_SIZE
    hub.clear_faults()
    hub.reset_stats()
    job = run(fetch(hub, cache, HubSource(hf="acme/tiny", files=[BIG])))
    assert job.state is JobState.completed, job.error
    assert [g.range for g in hub.content_requests(BIG)] == [f"bytes={kept}-"]
    assert hub.bytes_served(BIG) == BIG_SIZE - kept
    assert (Path(job.snapshot or "") / BIG).read_bytes() == data


def test_not_enough_disk_space_is_refused_before_any_byte(hub: FakeHub, cache: Path) -> None:
    cache.mkdir()
    free = shutil.disk_usage(cache).free
    job = run(fetch(hub, cache, HubSource(hf="acme/tiny", files=[BIG]), reserve_bytes=free))
    assert job.state is JobState.failed and job.error_kind is ErrorKind.disk_space
    assert f"needs 3.0 MiB, {gib(free)} free in {cache}" in (job.error or "")
    assert "MODEL_CACHE_DIR" in (job.error or "")
    assert hub.content_requests() == []
    # Bytes already on disk count: a complete download needs no space at all.
    ok = run(fetch(hub, cache, HubSource(hf="acme/tiny", files=["*.json"])))
    assert ok.state is JobState.completed
    again = run(fetch(hub, cache, HubSource(hf="acme/tiny", files=["*.json"]),
                      reserve_bytes=free * 2))
    assert again.state is JobState.completed


# --------------------------------------------------------------------------- errors


GATED, PRIVATE = {"gated": True}, {"private": True}


@pytest.mark.parametrize(("repo", "access", "token", "kind", "says"), [
    ("acme/gated", GATED, None, ErrorKind.gated,
     ["accept the model's terms at {url}/acme/gated", "modelhost token set", "HUGGINGFACE_TOKEN"]),
    ("acme/gated", GATED, BAD_TOKEN, ErrorKind.gated, ["has no access"]),
    ("acme/private", PRIVATE, None, ErrorKind.not_found,
     ["if it is private, set a token with `modelhost token set`"]),
    ("acme/private", PRIVATE, BAD_TOKEN, ErrorKind.unauthorized, ["token was rejected"]),
], ids=["gated-no-token", "gated-bad-token", "private-no-token", "private-bad-token"])
def test_access_refused_says_what_to_do(hub: FakeHub, cache: Path, repo: str,
                                        access: dict[str, bool], token: str | None,
                                        kind: ErrorKind, says: list[str]) -> None:
    hub.set_access(repo, tokens=[GOOD_TOKEN], **access)
    job = run(fetch(hub, cache, HubSource(hf=repo), token=token))
    assert job.state is JobState.failed and job.error_kind is kind
    error = job.error or ""
    for text in says:
        assert text.format(url=hub.url) in error
    assert token is None or token not in error


@pytest.mark.parametrize(("repo", "access"), [("acme/gated", GATED), ("acme/private", PRIVATE)],
                         ids=["gated", "private"])
def test_access_granted_to_the_right_token(hub: FakeHub, cache: Path, repo: str,
                                           access: dict[str, bool]) -> None:
    hub.set_access(repo, tokens=[GOOD_TOKEN], **access)
    job = run(fetch(hub, cache, HubSource(hf=repo), token=GOOD_TOKEN))
    assert job.state is JobState.completed, job.error
    # The token went to the hub, never to the CDN (another origin).
    assert all(r.authorized for r in hub.requests if r.server == "hub")
    assert not any(r.authorized for r in hub.requests if r.server == "cdn")
    assert any(r.server == "cdn" for r in hub.requests)


@pytest.mark.parametrize(("source", "endpoint", "kind", "says"), [
    (HubSource(hf="acme/nope"), None, ErrorKind.not_found,
     "repository acme/nope was not found: check `hf: acme/nope`"),
    (HubSource(hf="acme/tiny", revision="nope"), None, ErrorKind.revision_not_found,
     "revision 'nope' does not exist in acme/tiny"),
    (HubSource(hf="acme/tiny", files=["*.onnx"]), None, ErrorKind.no_files, "*.onnx"),
    (HubSource(hf="acme/tiny"), "http://127.0.0.1:9", ErrorKind.network,
     "network error while downloading acme/tiny from http://127.0.0.1:9"),
], ids=["repo", "revision", "files", "no-hub"])
def test_missing_repo_revision_files_or_hub(hub: FakeHub, cache: Path, source: HubSource,
                                            endpoint: str | None, kind: ErrorKind,
                                            says: str) -> None:
    job = run(fetch(hub, cache, source, endpoint=endpoint or hub.url))
    assert job.state is JobState.failed and job.error_kind is kind
    assert says in (job.error or "")


def test_checksum_mismatch_discards_the_partial_file(hub: FakeHub, hub_root: Path,
                                                     cache: Path) -> None:
    data = source_file(hub_root, "main", BIG)
    source = HubSource(hf="acme/tiny", files=[BIG])
    link_down_after(hub, BIG, MIB)
    # Corrupt the partial file between two attempts: the resumed file cannot match.
    failed = run(fetch(hub, cache, source, retries=0))
    assert failed.state is JobState.failed
    part = partial(cache, data)
    part.write_bytes(b"\0" * MIB)
    hub.clear_faults()
    job = run(fetch(hub, cache, source))
    assert job.state is JobState.failed and job.error_kind is ErrorKind.checksum
    assert not part.exists() and is_complete(cache, source) is None
    job = run(fetch(hub, cache, source))
    assert job.state is JobState.completed, job.error


# --------------------------------------------------------------------------- token


def test_token_file_is_0600_from_the_start(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for path in folder.glob(".hf_token*") if folder.exists() else []:
                with contextlib.suppress(FileNotFoundError):
                    seen.add(stat.S_IMODE(path.stat().st_mode))

    watcher = threading.Thread(target=watch)
    old = os.umask(0)  # even a permissive umask must not make the file readable to others
    watcher.start()
    try:
        for i in range(100):
            assert hubtoken.write_token(folder, f"hf_token{i:04d}abcdefgh") == "hf_…efgh"
    finally:
        stop.set()
        watcher.join()
        os.umask(old)
    path = folder / ".hf_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert seen and all(mode & 0o077 == 0 for mode in seen), seen
    assert [p.name for p in folder.iterdir()] == [".hf_token"]  # no temporary file left
    assert hubtoken.read_token(folder) == "hf_token0099abcdefgh"
    assert hubtoken.delete_token(folder) and not hubtoken.delete_token(folder)
    assert hubtoken.read_token(folder) is None
    with pytest.raises(hubtoken.TokenError):
        hubtoken.write_token(folder, "has space")


@pytest.mark.parametrize(("token", "masked"), [
    ("hf_AbCdEfGhIjKlMnOpQrStUvWx", "hf_…UvWx"),
    ("hf_short", "hf_…"),
    ("custom-token-12345", "…2345"),
    (None, None),
    ("", None),
])
def test_mask(token: str | None, masked: str | None) -> None:
    assert hubtoken.mask(token) == masked


def test_token_precedence(tmp_path: Path) -> None:
    hubtoken.write_token(tmp_path, "hf_FromTheFileAbcdefgh")
    # The environment (settings) wins; the file is used only without it.
    assert hubtoken.resolve_token("hf_FromTheEnvironment1234", tmp_path) == \
        "hf_FromTheEnvironment1234"
    assert hubtoken.resolve_token(None, tmp_path) == "hf_FromTheFileAbcdefgh"
    assert hubtoken.resolve_token("  ", tmp_path) == "hf_FromTheFileAbcdefgh"
    info = hubtoken.token_info("hf_FromTheEnvironment1234", tmp_path)
    assert (info.source, info.masked) == ("environment", "hf_…1234")
    info = hubtoken.token_info(None, tmp_path)
    assert (info.source, info.masked) == ("file", "hf_…efgh")
    hubtoken.delete_token(tmp_path)
    assert hubtoken.token_info(None, tmp_path).source is None


def test_token_is_never_logged(hub: FakeHub, cache: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hub.set_access("acme/gated", gated=True, tokens=[GOOD_TOKEN])
    hubtoken.write_token(cache, GOOD_TOKEN)
    token = hubtoken.resolve_token(None, cache)
    events: list[DownloadJob] = []
    bad = run(fetch(hub, cache, HubSource(hf="acme/gated"), token=BAD_TOKEN, events=events))
    assert bad.state is JobState.failed
    hub.cut("weights.bin", after=10_000)
    good = run(fetch(hub, cache, HubSource(hf="acme/gated"), token=token, events=events))
    assert good.state is JobState.completed, good.error
    assert any(r.authorized for r in hub.requests)
    assert caplog.records
    for secret in (GOOD_TOKEN, BAD_TOKEN):
        for record in caplog.records:
            assert secret not in record.getMessage()
            assert secret not in (record.exc_text or "")
        assert not any(secret in json.dumps(e.to_dict()) for e in events)


# --------------------------------------------------------------------------- cache


def test_scan_and_delete(hub: FakeHub, hub_root: Path, cache: Path) -> None:
    assert scan_cache(cache) == []
    assert run(fetch(hub, cache, HubSource(hf="acme/tiny"))).state is JobState.completed
    assert run(fetch(hub, cache, HubSource(hf="acme/tiny", revision="v1"))).state \
        is JobState.completed
    main, v1 = commit_of(hub, "acme/tiny", "main"), commit_of(hub, "acme/tiny", "v1")
    [repo] = scan_cache(cache)
    main_bytes = sum(len(source_file(hub_root, "main", n)) for n in (
        "config.json", "README.md", BIG, "extra/model-q4.gguf", "sub/tokenizer.json"))
    v1_bytes = sum(len(source_file(hub_root, "v1", n)) for n in ("config.json", BIG))
    assert repo.repo == "acme/tiny" and repo.complete and repo.incomplete_bytes == 0
    assert repo.size_bytes == main_bytes + v1_bytes
    revisions = {r.commit: r for r in repo.revisions}
    assert revisions[main].refs == ("main",) and revisions[main].size_bytes == main_bytes
    assert revisions[v1].refs == ("v1",) and revisions[v1].files == 2
    assert all(r.complete for r in repo.revisions)

    # An interrupted download shows as incomplete, with its partial bytes.
    (hub_root / "acme/tiny/v2").mkdir()
    (hub_root / "acme/tiny/v2" / BIG).write_bytes(_bytes(9, MIB))
    link_down_after(hub, BIG, 300_000)
    failed = run(fetch(hub, cache, HubSource(hf="acme/tiny", revision="v2"), retries=0))
    assert failed.state is JobState.failed
    [repo] = scan_cache(cache)
    assert not repo.complete and repo.incomplete_bytes == 300_000
    v2 = commit_of(hub, "acme/tiny", "v2")
    assert [r.complete for r in repo.revisions if r.commit == v2] == [False]

    # Bytes freed: the blobs, plus a few bytes of metadata (listing, ref).
    freed = delete_from_cache(cache, "acme/tiny", "v2")
    assert 300_000 <= freed < 300_000 + 4096
    freed = delete_from_cache(cache, "acme/tiny", "v1")
    assert v1_bytes <= freed < v1_bytes + 4096
    [repo] = scan_cache(cache)
    assert [r.commit for r in repo.revisions] == [main] and repo.complete
    assert not (cache / "models--acme--tiny" / "refs" / "v1").exists()
    assert is_complete(cache, HubSource(hf="acme/tiny")) is not None
    assert not huggingface_hub.scan_cache_dir(cache).warnings
    with pytest.raises(FileNotFoundError):
        delete_from_cache(cache, "acme/tiny", "v1")
    with pytest.raises(ValueError, match="not a repository"):
        delete_from_cache(cache, "../etc", None)
    assert main_bytes <= delete_from_cache(cache, "acme/tiny") < main_bytes + 4096
    assert scan_cache(cache) == [] and not (cache / "models--acme--tiny").exists()


def test_is_complete_rejects_a_partial_snapshot(hub: FakeHub, cache: Path) -> None:
    source = HubSource(hf="acme/tiny")
    assert run(fetch(hub, cache, HubSource(hf="acme/tiny", files=["*.json"]))).snapshot
    link_down_after(hub, BIG, MIB)
    job = run(fetch(hub, cache, source, retries=0))
    assert job.state is JobState.failed
    commit = commit_of(hub, "acme/tiny", "main")
    snapshot = cache / "models--acme--tiny" / "snapshots" / commit
    assert (snapshot / "config.json").is_file()  # some files are there...
    assert is_complete(cache, source) is None  # ...but not all of them
    assert is_complete(cache, HubSource(hf="acme/tiny", files=["*.json"])) == snapshot
    assert read_listing(cache / "models--acme--tiny", commit) is not None
    # A snapshot with a short file (truncated by hand) is not complete either.
    hub.clear_faults()
    assert run(fetch(hub, cache, source)).state is JobState.completed
    assert is_complete(cache, source) == snapshot
    (snapshot / "README.md").resolve().write_bytes(b"#")
    assert is_complete(cache, source) is None
    # Without a recorded listing (a cache from older tools), a best effort: no broken link.
    shutil.rmtree(cache / "models--acme--tiny" / "trees")
    assert is_complete(cache, source) == snapshot
    (snapshot / BIG).resolve().unlink()
    assert is_complete(cache, source) is None
    assert is_complete(cache, HubSource(hf="acme/other")) is None


def test_shares_the_cache_with_huggingface_hub(hub: FakeHub, cache: Path) -> None:
    """What `huggingface-cli download` fetched is not fetched again, and vice versa."""
    path = huggingface_hub.snapshot_download("acme/tiny", cache_dir=cache, endpoint=hub.url)
    hub.reset_stats()
    job = run(fetch(hub, cache, HubSource(hf="acme/tiny")))
    assert job.state is JobState.completed and job.snapshot == path
    assert hub.content_requests() == [] and job.bytes_fetched == 0
    files = HfApi(endpoint=hub.url).list_repo_files("acme/tiny", revision="v1")
    assert sorted(files) == ["config.json", BIG]


# --------------------------------------------------------------------------- the fake hub


def test_fake_hub_runs_as_a_program(hub_root: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(TESTS / "fake_hub.py"), "--root",
                             str(hub_root), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[0] == "ready"
        url = line[1]
        api = HfApi(endpoint=url, token=False)
        assert sorted(api.list_repo_files("acme/tiny", revision="v1")) == ["config.json", BIG]
        assert api.model_info("acme/tiny").sha == api.model_info("acme/tiny", revision="main").sha
        _post(url + "/_fake/cut", {"path": "config.json", "after": 3, "times": 1})
        _post(url + "/_fake/access", {"repo": "acme/private", "private": True, "tokens": ["t"]})
        with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):
            api.model_info("acme/private")
        with urllib.request.urlopen(url + "/_fake/stats") as resp:
            stats = json.load(resp)["requests"]
        assert [r["status"] for r in stats if r["path"].startswith("/api/")] == [200, 200, 200, 401]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        if proc.stdout is not None:
            proc.stdout.close()


def _post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as resp:
        assert resp.status == 200


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
