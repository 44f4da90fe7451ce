"""How the store opens its database: engines, SQLite's settings, the Alembic configuration.

SQLite settings (``_sqlite_connect``), chosen so that a ``kill -9`` (or a power cut) at any
moment leaves no record lost or half-written:

* ``journal_mode=WAL``: a commit appends to the write-ahead log; readers never block the writer
  and the writer never blocks readers (the gateway reads while a download writes progress).
  After a crash the next connection replays the committed frames of the log and ignores an
  incomplete tail, so a transaction is there whole or not at all.
* ``synchronous=FULL``: the log is fsynced at every commit. ``NORMAL`` would be enough for a
  ``kill -9`` alone (a committed transaction is in the operating system's page cache, which
  outlives the process), but on a power cut or a kernel panic ``NORMAL`` may lose the last
  transactions that the gateway had already acknowledged: an added model, an unload. ``FULL``
  makes an acknowledged write durable; at the gateway's write rate (spec changes, desired
  states, a few download progress updates a second) the extra fsync costs nothing visible.
* ``foreign_keys=ON``: SQLite does not check foreign keys unless asked, on each connection.
* ``busy_timeout``: a writer waits up to ``BUSY_TIMEOUT_S`` for another writer (another
  gateway process, ``modelhost`` CLI) instead of failing at once with "database is locked".
* Write transactions start with ``BEGIN IMMEDIATE``. A deferred transaction that reads then
  writes can fail with "database is locked" *without* waiting when another connection
  committed in between (its snapshot is stale, and the busy timeout does not apply): taking
  the write lock first makes every writer wait its turn under the busy timeout.

PostgreSQL (``postgresql+psycopg://...``) needs none of this: the same code runs there, with
``SELECT ... FOR UPDATE`` on the rows a write reads, and a retry when two replicas create the
same row at once. WAL does not work on a network file system: keep a SQLite database on a
local disk, and use PostgreSQL to share one between machines.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, StaticPool

log = logging.getLogger(__name__)

MIGRATIONS_DIR: Final = Path(__file__).parent / "migrations"
DB_FILENAME: Final = "modelhost.db"
BUSY_TIMEOUT_S: Final = 30.0
# Execution options of the store's write engine (BEGIN IMMEDIATE) and of its wait for the lock.
WRITE_OPTION: Final = "modelhost_write"
WAIT_OPTION: Final = "modelhost_busy_timeout"


def default_url(data_dir: Path) -> str:
    """The database URL when none is configured: a SQLite file under the data directory."""
    return f"sqlite:///{data_dir / DB_FILENAME}"



def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def is_memory(url: URL) -> bool:
    return is_sqlite(url) and url.database in (None, "", ":memory:")


def _sqlite_connect(foreign_keys: bool) -> Callable[[Any, ConnectionPoolEntry], None]:
    def on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN (see _sqlite_begin): the sqlite3 module's
        # own transaction handling would start transactions late and never with IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # First, so that switching to WAL (which needs an exclusive lock) waits as well.
            cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() not in ("wal", "memory"):
                log.warning("SQLite refused journal_mode=WAL (got %s): is the database on a "
                            "network file system?", mode)
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
            # What a write replaces or deletes is overwritten on disk, not left in free
            # space: a spec rewritten without its secrets leaves no copy of them.
            cursor.execute("PRAGMA secure_delete = ON")
        finally:
            cursor.close()

    return on_connect


def _sqlite_begin(connection: Connection) -> None:
    options = connection.get_execution_options()
    immediate = options.get(WRITE_OPTION, False)
    if immediate:  # how long this write waits for another writer (`Store.waiting_at_most`)
        wait = float(options.get(WAIT_OPTION, BUSY_TIMEOUT_S))
        connection.exec_driver_sql(f"PRAGMA busy_timeout = {int(wait * 1000)}")
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def open_engine(url: URL, *, migration: bool = False) -> Engine:
    if not is_sqlite(url):
        return sa.create_engine(url, pool_pre_ping=True,
                                **({"poolclass": NullPool} if migration else {}))
    options: dict[str, Any] = {"connect_args": {"timeout": BUSY_TIMEOUT_S}}
    if is_memory(url):
        # One shared connection, or every checkout would see a new, empty database.
        options.update(poolclass=StaticPool,
                       connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})
    elif migration:
        options["poolclass"] = NullPool
    engine = sa.create_engine(url, **options)
    # Foreign keys are off while migrating: SQLite's procedure to rebuild a table (batch
    # mode). The migration checks them all before it commits (migrations/env.py).
    sa.event.listen(engine, "connect", _sqlite_connect(foreign_keys=not migration))
    sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def migration_engine(url: str | URL) -> Engine:
    """An engine for Alembic: one connection, every transaction a write transaction."""
    return open_engine(make_url(url), migration=True).execution_options(
        **{WRITE_OPTION: True})


def alembic_config(url: str | URL | None = None) -> Config:
    """The Alembic configuration of the store, for ``alembic.command`` (no alembic.ini).

    For example, to write a new migration after changing ``schema.py``::

        command.revision(alembic_config("sqlite:///dev.db"), "add x", autogenerate=True)
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if url is not None:
        rendered = make_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def private_file(path: Path) -> None:
    """Create the database file with mode 0600 (its folder 0700 when it is created here),
    before SQLite opens it: SQLite gives its -wal and -shm files the database file's mode.
    An existing file that others may read is made 0600 (it holds the model specs)."""
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            log.warning("state database %s was readable by others: made 0600", path)
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        with suppress(FileNotFoundError, PermissionError):
            if side.stat().st_mode & 0o077:
                side.chmod(0o600)
