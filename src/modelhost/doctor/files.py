"""Disk space in the model cache (`doctor.disk.cache`, `doctor.disk.model-sizes`) and the
directories the gateway writes (`doctor.dirs.writable`).

A directory is tested by writing in it: a temporary file in it when it exists, a temporary
folder in its nearest existing parent when it does not (the gateway creates it at start).
Permission bits alone would lie for root and on read-only mounts. Whatever is made is
removed at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from modelhost.checks.report import Finding
from modelhost.doctor.context import (
    GIB,
    Context,
    failed,
    gib,
    names,
    not_applicable,
    passed,
)
from modelhost.doctor.rules import DIRS, DISK, DISK_SIZES

# What the downloader keeps free after a download (downloads/jobs.py: reserve_bytes).
RESERVE = 1 * GIB


def existing_parent(path: Path) -> Path:
    """`path` itself when it exists, else its nearest existing parent."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def writable(path: Path) -> str | None:
    """None when `path` is (or can be made) a writable directory, else why not."""
    base = existing_parent(path)
    if not base.is_dir():
        return f"{base} is not a directory" + ("" if base == path else
                                               f", so {path} cannot be created")
    try:
        if base == path:
            fd, name = tempfile.mkstemp(dir=path, prefix=".modelhost-doctor-")
            os.close(fd)
            os.unlink(name)
        else:
            os.rmdir(tempfile.mkdtemp(dir=base, prefix=".modelhost-doctor-"))
    except OSError as exc:
        verb = "write in" if base == path else f"create {path} in"
        return f"cannot {verb} {base}: {exc.strerror or exc}"
    return None


def sqlite_folder(url: str | None) -> Path | None:
    """The folder of a SQLite database file given by MODELHOST_DATABASE_URL, else None."""
    if not url or not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).parent


def check_dirs(ctx: Context) -> list[Finding]:
    settings = ctx.settings
    folders = [("data directory (MODELHOST_DATA_DIR)", settings.data_dir),
               ("log directory (LOG_DIR)", settings.logs_path)]
    database = sqlite_folder(settings.database_url)
    if database is not None and database != settings.data_dir:
        folders.append(("database folder (MODELHOST_DATABASE_URL)", database))
    downloads = [n for n in ctx.needs if n.from_hub and n.download_bytes != 0]
    if downloads:
        folders.append(("model cache (MODEL_CACHE_DIR)", settings.model_cache_dir))
    findings = []
    for what, folder in folders:
        problem = writable(folder)
        if problem is None:
            state = "writable" if folder.is_dir() else "can be created"
            findings.append(passed(DIRS, f"{what} {folder}: {state}"))
        else:
            findings.append(failed(DIRS, f"{what} {folder}: {problem}",
                                   "point the setting at a directory the gateway's user may "
                                   "write, or give that user the directory (chown)"))
    return findings


def check_disk(ctx: Context) -> list[Finding]:
    hub = [n for n in ctx.needs if n.from_hub]
    if not hub:
        why = "no configured model is downloaded into the model cache"
        return [not_applicable(DISK, why), not_applicable(DISK_SIZES, why)]
    cache = ctx.settings.model_cache_dir
    try:
        free = shutil.disk_usage(existing_parent(cache)).free
    except OSError as exc:
        return [failed(DISK, f"cannot read the free space of {cache}: {exc.strerror or exc}"),
                not_applicable(DISK_SIZES, "the cache cannot be read")]
    known = [n for n in hub if n.download_bytes is not None]
    unknown = [n for n in hub if n.download_bytes is None]
    todo = sum(n.download_bytes or 0 for n in known)
    pending = [n for n in known if n.download_bytes]
    findings = []
    if todo + RESERVE > free:
        findings.append(failed(
            DISK, f"{gib(todo)} still to download ({names(pending)}); {gib(free)} is free in "
                  f"{cache}, and {gib(RESERVE)} must stay free",
            "delete unused models (`modelhost models rm ID`), or point MODEL_CACHE_DIR at a "
            "larger disk"))
    elif pending:
        findings.append(passed(DISK, f"{gib(todo)} to download ({names(pending)}); "
                                     f"{gib(free)} free in {cache}"))
    else:
        findings.append(passed(DISK, f"no known download pending; {gib(free)} free in "
                                     f"{cache}"))
    if unknown:
        findings.append(failed(
            DISK_SIZES, f"size unknown until the file listing is in the cache: "
                        f"{names(unknown)}; {gib(free)} free in {cache}",
            "start their download (`modelhost models download ID`) to learn it, or check "
            "their size on the hub"))
    else:
        findings.append(passed(DISK_SIZES, "the size of every hub model is known"))
    return findings

