"""The model cache: the Hub's own layout, shared with other tools, and what it holds.

Everything lands in MODEL_CACHE_DIR with the Hub's own layout, so other tools share it:

    models--ORG--REPO/
        blobs/<etag>               content, named by sha256 (LFS files) or git sha1 (others)
        blobs/<etag>.incomplete    a partial download, resumed with an HTTP Range request
        refs/<branch-or-tag>       the commit a revision pointed to
        snapshots/<commit>/<path>  relative symlinks to the blobs
        trees/<commit>.json        the commit's file listing (huggingface_hub's tree cache)
        modelhost-requests.json    which patterns modelhost was asked for, per commit

Files already in the cache (downloaded earlier, or by another tool) are trusted when their
size matches: hashing them again would read every byte of every model at each start. A model
is reported complete only when every expected file is in ``snapshots/<commit>/`` with the size
the listing gives (`is_complete`). `scan_cache` tells what the cache holds and what of it is
complete; `delete_from_cache` frees a repository or one revision without breaking the blobs
that another revision still links to.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub.utils import (  # type: ignore[attr-defined]  # public, not re-exported
    filter_repo_objects,
)

from modelhost.config import HubSource, cache_relative

COMMIT = re.compile(r"[0-9a-f]{40}")  # always fullmatch (`match` with `$` takes a "\n")
REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
TREE_FORMAT = 1  # huggingface_hub's trees/<commit>.json format_version
REQUESTS_FILE = "modelhost-requests.json"  # per repo: which patterns were asked per commit


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


def atomic_write(path: Path, text: str) -> None:
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


def local_commit(storage: Path, revision: str) -> str | None:
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


def write_listing(storage: Path, commit: str, files: dict[str, RemoteFile]) -> None:
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
    atomic_write(storage / "trees" / f"{commit}.json",
                  json.dumps({"format_version": TREE_FORMAT, "files": entries}, indent=1))


def select_files(listing: dict[str, RemoteFile], patterns: list[str] | None) -> list[RemoteFile]:
    """The files a source asks for, with huggingface_hub's glob semantics."""
    return [listing[p] for p in filter_repo_objects(sorted(listing), allow_patterns=patterns)]


def file_ok(snapshot: Path, remote: RemoteFile) -> bool:
    """True when the snapshot holds `remote` with its listed size."""
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


def record_request(storage: Path, commit: str, patterns: list[str] | None) -> None:
    """Remember which files were asked for at a commit, so that `scan_cache` can tell a
    finished partial-repository download from an interrupted one."""
    requests = _read_requests(storage)
    asked = requests.setdefault(commit, [])
    wanted = sorted(patterns) if patterns is not None else None
    if wanted not in asked:
        asked.append(wanted)
        atomic_write(storage / REQUESTS_FILE, json.dumps(requests, indent=1))


def link_blob(blob: Path, pointer: Path) -> None:
    """Point snapshots/<commit>/<path> at the blob with a relative symlink (like the Hub's
    layout); copy when the filesystem has no symlinks."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        pointer.unlink()
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:
        shutil.copyfile(blob, pointer)


def file_size(path: Path) -> int:
    """The size of a file; 0 when it is absent or cannot be read."""
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
    commit = local_commit(storage, source.revision)
    if commit is None:
        return None
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    listing = read_listing(storage, commit)
    if listing is not None:
        wanted = select_files(listing, source.files)
        return snapshot if wanted and all(file_ok(snapshot, f) for f in wanted) else None
    return snapshot if _looks_complete(snapshot, source.files) else None


def _looks_complete(snapshot: Path, patterns: list[str] | None) -> bool:
    files = [p for p in snapshot.rglob("*") if p.is_symlink() or p.is_file()]
    if not files or any(not p.exists() for p in files):
        return False
    names = [p.relative_to(snapshot).as_posix() for p in files]
    return all(any(True for _ in filter_repo_objects(names, allow_patterns=[pattern]))
               for pattern in patterns or [])


# --------------------------------------------------------------------------- inspection


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
    size_bytes: int
    revisions: tuple[CachedRevision, ...]
    complete: bool
    incomplete_bytes: int


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
            partial_bytes += file_size(blob)
            partial_etags.add(blob.name.split(".")[0])
        elif blob.is_file():
            complete_bytes += file_size(blob)
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
                                        sum(file_size(t) for t in targets), len(files), complete))
    return CachedRepo(repo, complete_bytes + partial_bytes, tuple(revisions),
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
        return all(all(file_ok(snapshot, f) for f in select_files(listing, patterns))
                   for patterns in asked)
    present = {p.relative_to(snapshot).as_posix() for p in files}
    if any(not file_ok(snapshot, listing[name]) for name in present if name in listing):
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
    commit = local_commit(storage, revision)
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
        atomic_write(storage / REQUESTS_FILE, json.dumps(requests, indent=1))
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
    return sum(file_size(p) for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _delete_tree(storage: Path, locks: Path) -> int:
    size = _tree_size(storage)
    shutil.rmtree(storage)
    shutil.rmtree(locks, ignore_errors=True)
    return size
