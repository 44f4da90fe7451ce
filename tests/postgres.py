"""A real PostgreSQL server for tests: Debian's binaries, on loopback, torn down after.

`postgres_server()` runs `initdb` in a fresh folder and `pg_ctl start` on a free port of
127.0.0.1 (its Unix socket in that folder, fsync off: a test database), creates a database,
and yields its SQLAlchemy URL (`postgresql+psycopg://...`). PostgreSQL refuses to run as
root: as root, the binaries run as the `postgres` user (Debian's package creates it), and
the folder is theirs. `missing()` says why none can be started here (no binaries, no psycopg),
for a test to skip with.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelhost.workers.process import free_port

BIN_GLOB = "/usr/lib/postgresql/*/bin"


def bin_dir() -> Path | None:
    found = sorted(glob.glob(BIN_GLOB), key=lambda p: int(Path(p).parent.name)
                   if Path(p).parent.name.isdigit() else 0)
    for folder in reversed(found):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def missing() -> str | None:
    if bin_dir() is None:
        return (f"no PostgreSQL server binaries ({BIN_GLOB}/initdb): install Debian's "
                "`postgresql` package (scripts/check does)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install -e '.[postgres]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run PostgreSQL as"
    return None


def _as_owner(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    folder = bin_dir()
    assert folder is not None, missing()
    # Not under pytest's tmp folder, which only root may enter.
    base = Path(tempfile.mkdtemp(prefix="modelhost-pg-"))
    data, log = base / "data", base / "server.log"
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
    port = free_port()
    started = False
    try:
        subprocess.run(_as_owner([str(folder / "initdb"), "-D", str(data), "-A", "trust",
                                  "-U", "postgres", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        subprocess.run(_as_owner([str(folder / "pg_ctl"), "-D", str(data), "-l", str(log),
                                  "-o", options, "-w", "-t", "60", "start"]),
                       check=True, capture_output=True, timeout=90)
        started = True
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE modelhost")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/modelhost"
    except subprocess.CalledProcessError as exc:
        server_log = log.read_text(errors="replace") if log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr!r}\n{server_log}") from exc
    finally:
        if started:
            subprocess.run(_as_owner([str(folder / "pg_ctl"), "-D", str(data), "-m",
                                      "immediate", "-w", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


# Tests that need the server (and psycopg): skipped, saying why, where they cannot run.
needs_postgres = pytest.mark.skipif(missing() is not None, reason=str(missing()))
