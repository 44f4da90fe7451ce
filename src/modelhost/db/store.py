"""The store: every read and write of the gateway's database goes through ``Store``.

``Store.open(url)`` then ``migrate()`` (Alembic ``upgrade head``), then the methods below. Each
method is one short transaction and returns plain frozen dataclasses, never ORM objects, so
that nothing lazy-loads later in another thread.

Why synchronous: SQLite runs in-process and a call takes microseconds to a few milliseconds
(the fsync of a commit is the slowest part). The gateway calls these methods through
``asyncio.to_thread``, which keeps the event loop free during that fsync and while a call
waits for another process's write lock; an async driver (aiosqlite) would only run the same
sqlite3 calls in a thread of its own. No transaction ever spans an ``await``, so no lock is
held while the gateway does something else. The engine's connection pool makes a ``Store``
safe to share between threads.

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

import copy
import json
import logging
import os
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Self, TypedDict, TypeVar, Unpack, cast

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, StaticPool

from modelhost.db.schema import (
    ACTIVE_DOWNLOAD_STATES,
    DESIRED_STATES,
    DOWNLOAD_STATES,
    FINISHED_DOWNLOAD_STATES,
    MODEL_ID_LENGTH,
    MODEL_SOURCES,
    Desired,
    DesiredState,
    DownloadRecord,
    DownloadState,
    ModelRecord,
    ModelRevision,
    ModelSource,
    RevisionAction,
    utcnow,
)

log = logging.getLogger(__name__)

MIGRATIONS_DIR: Final = Path(__file__).parent / "migrations"
DB_FILENAME: Final = "modelhost.db"
BUSY_TIMEOUT_S: Final = 30.0
# Attempts of a write that lost a race on PostgreSQL (two replicas inserting the same key).
WRITE_ATTEMPTS: Final = 3
_WRITE_OPTION: Final = "modelhost_write"
_WAIT_OPTION: Final = "modelhost_busy_timeout"

T = TypeVar("T")


def default_url(data_dir: Path) -> str:
    """The database URL when none is configured: a SQLite file under the data directory."""
    return f"sqlite:///{data_dir / DB_FILENAME}"


class StoreError(Exception):
    """A database that this version of modelhost cannot use."""


# -- rows returned to callers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelRow:
    model_id: str
    spec_json: str  # canonical JSON: sorted keys, no spaces
    version: int
    source: ModelSource
    deleted: bool
    created_at: datetime
    updated_at: datetime

    def spec(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads(self.spec_json))


@dataclass(frozen=True, slots=True)
class RevisionRow:
    id: int
    model_id: str
    version: int
    action: RevisionAction
    spec_json: str | None  # None for a deletion
    actor: str
    created_at: datetime

    def spec(self) -> dict[str, Any] | None:
        if self.spec_json is None:
            return None
        return cast(dict[str, Any], json.loads(self.spec_json))


@dataclass(frozen=True, slots=True)
class DesiredStateRow:
    model_id: str
    desired: Desired
    gpu_device_ids: tuple[int, ...] | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class DownloadRow:
    id: int
    model_id: str
    repo: str
    revision: str
    patterns: tuple[str, ...] | None
    state: DownloadState
    bytes_done: int
    bytes_total: int | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_DOWNLOAD_STATES


class DownloadUpdate(TypedDict, total=False):
    """The fields ``Store.update_download`` may change; a key left out is left unchanged."""

    state: DownloadState
    bytes_done: int
    bytes_total: int | None
    error: str | None


def _model_row(r: ModelRecord) -> ModelRow:
    return ModelRow(r.model_id, r.spec, r.version, cast(ModelSource, r.source), r.deleted,
                    r.created_at, r.updated_at)


def _revision_row(r: ModelRevision) -> RevisionRow:
    return RevisionRow(r.id, r.model_id, r.version, cast(RevisionAction, r.action), r.spec,
                       r.actor, r.created_at)


def _desired_row(r: DesiredState) -> DesiredStateRow:
    ids = tuple(r.gpu_device_ids) if r.gpu_device_ids is not None else None
    return DesiredStateRow(r.model_id, cast(Desired, r.desired), ids, r.updated_at)


def _download_row(r: DownloadRecord) -> DownloadRow:
    patterns = tuple(r.patterns) if r.patterns is not None else None
    return DownloadRow(r.id, r.model_id, r.repo, r.revision, patterns,
                       cast(DownloadState, r.state), r.bytes_done, r.bytes_total, r.error,
                       r.created_at, r.updated_at, r.finished_at)


# -- validation --------------------------------------------------------------------------------


def _one_of(name: str, value: str, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def _text(name: str, value: str, max_length: int) -> None:
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise ValueError(f"{name} must be a non-empty string of at most {max_length} "
                         f"characters, not {value!r}")


def _count(name: str, value: int | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")


def canonical_spec(spec_json: str, model_id: str) -> str:
    """The spec as canonical JSON (sorted keys, compact); raises ValueError if it is not a
    JSON object or names another model."""
    try:
        spec = json.loads(spec_json)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"spec of model '{model_id}' is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"spec of model '{model_id}' must be a JSON object")
    if "id" in spec and spec["id"] != model_id:
        raise ValueError(f"spec has id {spec['id']!r} but is stored as model '{model_id}'")
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# -- engines -----------------------------------------------------------------------------------


def _is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def _is_memory(url: URL) -> bool:
    return _is_sqlite(url) and url.database in (None, "", ":memory:")


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
    immediate = options.get(_WRITE_OPTION, False)
    if immediate:  # how long this write waits for another writer (`Store.waiting_at_most`)
        wait = float(options.get(_WAIT_OPTION, BUSY_TIMEOUT_S))
        connection.exec_driver_sql(f"PRAGMA busy_timeout = {int(wait * 1000)}")
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _create_engine(url: URL, *, migration: bool = False) -> Engine:
    if not _is_sqlite(url):
        return sa.create_engine(url, pool_pre_ping=True,
                                **({"poolclass": NullPool} if migration else {}))
    options: dict[str, Any] = {"connect_args": {"timeout": BUSY_TIMEOUT_S}}
    if _is_memory(url):
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
    return _create_engine(make_url(url), migration=True).execution_options(
        **{_WRITE_OPTION: True})


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


# -- the store ---------------------------------------------------------------------------------


class Store:
    """The gateway's database. Thread-safe; every method is one short transaction."""

    def __init__(self, url: URL, engine: Engine) -> None:
        self.url = url
        self._engine = engine
        # Same pool; its transactions take the write lock first (BEGIN IMMEDIATE on SQLite).
        self._writer = engine.execution_options(**{_WRITE_OPTION: True})

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect to the database at ``url``, creating a SQLite file's folder if needed.

        The schema is not touched: call ``migrate()`` before anything else.
        """
        parsed = make_url(url)
        if _is_sqlite(parsed) and not _is_memory(parsed) and not parsed.query.get("uri"):
            assert parsed.database is not None
            private_file(Path(parsed.database).expanduser())
        return cls(parsed, _create_engine(parsed))

    def waiting_at_most(self, seconds: float) -> Store:
        """The same store (same connections), whose writes wait at most `seconds` for
        another writer's lock instead of `BUSY_TIMEOUT_S`, then fail with "database is
        locked": for a caller that must answer soon (an admin API change). Do not close it."""
        view = copy.copy(self)
        view._writer = self._writer.execution_options(**{_WAIT_OPTION: seconds})
        return view

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (health checks, tests); prefer the methods below."""
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url.render_as_string(hide_password=True)!r})"

    # -- schema --------------------------------------------------------------------------------

    def migrate(self) -> str:
        """Bring the schema to the latest revision (a new database gets every table);
        returns that revision. Safe to call on every start and from several processes at
        once; a migration is one transaction, so an interrupted one leaves no trace.

        Raises StoreError when the database was migrated by a newer modelhost.
        """
        # An in-memory database exists only on the store's own connection.
        engine = self._writer if _is_memory(self.url) else migration_engine(self.url)
        config = alembic_config(self.url)
        try:
            with engine.connect() as connection:
                config.attributes["connection"] = connection
                try:
                    command.upgrade(config, "head")
                except CommandError as exc:
                    hint = (" (was it migrated by a newer version of modelhost?)"
                            if "Can't locate revision" in str(exc) else "")
                    raise StoreError(f"cannot migrate the database {self!r} to revision "
                                     f"{head_revision()}: {exc}{hint}") from exc
        finally:
            if engine is not self._writer:
                engine.dispose()
        return head_revision()

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None before the first ``migrate()``)."""
        with self._engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    # -- transactions --------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engine) as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self._writer) as session, session.begin():
            yield session

    def _retry(self, write: Callable[[Session], T]) -> T:
        """Run ``write`` in a write transaction, again if it lost a race to insert a key.

        Only PostgreSQL can lose such a race: SQLite's BEGIN IMMEDIATE serializes writers.
        """
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self._write() as session:
                    return write(session)
            except IntegrityError:
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.debug("write lost a race, retrying (%d)", attempt)
        raise AssertionError("unreachable")

    # -- model specs ---------------------------------------------------------------------------

    def upsert_model(self, spec_json: str, model_id: str, source: str, actor: str) -> int:
        """Store a model's spec (a ``ModelSpec`` as JSON, validated by the caller); returns
        its version.

        A new or changed spec (or one given back to a deleted model) gets the next version and
        a revision; an unchanged one (compared as canonical JSON) keeps its version and adds no
        revision, though ``source`` is updated if it differs.
        """
        _text("model_id", model_id, MODEL_ID_LENGTH)
        _one_of("source", source, MODEL_SOURCES)
        _text("actor", actor, 64)
        spec = canonical_spec(spec_json, model_id)

        def write(session: Session) -> int:
            record = session.get(ModelRecord, model_id, with_for_update=True)
            action: RevisionAction
            if record is None:
                now = utcnow()
                record = ModelRecord(model_id=model_id, spec=spec, version=1, source=source,
                                     deleted=False, created_at=now, updated_at=now)
                session.add(record)
                action = "created"
            elif not record.deleted and record.spec == spec:
                if record.source != source:
                    record.source = source
                return record.version
            else:
                action = "created" if record.deleted else "updated"
                record.version += 1
                record.spec = spec
                record.source = source
                record.deleted = False
            session.add(ModelRevision(model_id=model_id, version=record.version, spec=spec,
                                      action=action, actor=actor))
            return record.version

        return self._retry(write)

    def rewrite_specs(self, rewrite: Callable[[str, str], str]) -> int:
        """Rewrite every stored spec, current and past (`rewrite(model_id, spec_json)`
        returns the new JSON), in one transaction, without adding revisions; returns how many
        changed. Then, on SQLite, the log is checkpointed and truncated, so that the old
        bytes are gone from the files (with secure_delete on, freed space is zeroed)."""

        def write(session: Session) -> int:
            changed = 0
            for record in session.scalars(sa.select(ModelRecord)):
                new = canonical_spec(rewrite(record.model_id, record.spec), record.model_id)
                if new != record.spec:
                    record.spec, changed = new, changed + 1
            for revision in session.scalars(sa.select(ModelRevision)):
                if revision.spec is None:
                    continue
                new = canonical_spec(rewrite(revision.model_id, revision.spec),
                                     revision.model_id)
                if new != revision.spec:
                    revision.spec, changed = new, changed + 1
            return changed

        changed = self._retry(write)
        if changed and _is_sqlite(self.url) and not _is_memory(self.url):
            with self._engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        return changed

    def delete_model(self, model_id: str, actor: str) -> int | None:
        """Mark a model deleted, keeping its history; returns the version of the deletion,
        or None when there was nothing to delete (unknown, or already deleted)."""
        _text("actor", actor, 64)

        def write(session: Session) -> int | None:
            record = session.get(ModelRecord, model_id, with_for_update=True)
            if record is None or record.deleted:
                return None
            record.version += 1
            record.deleted = True
            session.add(ModelRevision(model_id=model_id, version=record.version, spec=None,
                                      action="deleted", actor=actor))
            return record.version

        return self._retry(write)

    def model(self, model_id: str) -> ModelRow | None:
        with self._read() as session:
            record = session.get(ModelRecord, model_id)
            return _model_row(record) if record is not None else None

    def models(self, include_deleted: bool = False) -> list[ModelRow]:
        """The stored models, by id; deleted ones only when asked."""
        query = sa.select(ModelRecord).order_by(ModelRecord.model_id)
        if not include_deleted:
            query = query.where(ModelRecord.deleted.is_(False))
        with self._read() as session:
            return [_model_row(r) for r in session.scalars(query)]

    def history(self, model_id: str) -> list[RevisionRow]:
        """Every revision of a model, oldest first (empty for an unknown model)."""
        query = (sa.select(ModelRevision).where(ModelRevision.model_id == model_id)
                 .order_by(ModelRevision.version))
        with self._read() as session:
            return [_revision_row(r) for r in session.scalars(query)]

    def revision(self, model_id: str, version: int) -> RevisionRow | None:
        """One revision of a model, e.g. to roll back to its spec with ``upsert_model``."""
        query = sa.select(ModelRevision).where(ModelRevision.model_id == model_id,
                                               ModelRevision.version == version)
        with self._read() as session:
            record = session.scalars(query).one_or_none()
            return _revision_row(record) if record is not None else None

    # -- desired states ------------------------------------------------------------------------

    def set_desired(self, model_id: str, desired: str,
                    gpu_device_ids: Collection[int] | None = None) -> None:
        """Record whether a model should be loaded (and on which GPUs, None: any)."""
        _text("model_id", model_id, MODEL_ID_LENGTH)
        _one_of("desired", desired, DESIRED_STATES)
        ids: list[int] | None = None
        if gpu_device_ids is not None:
            ids = list(gpu_device_ids)
            for gpu in ids:
                _count("gpu_device_ids[]", gpu)
            if len(set(ids)) != len(ids):
                raise ValueError(f"gpu_device_ids must be distinct, not {ids}")

        def write(session: Session) -> None:
            record = session.get(DesiredState, model_id, with_for_update=True)
            if record is None:
                session.add(DesiredState(model_id=model_id, desired=desired,
                                         gpu_device_ids=ids))
            else:
                record.desired = desired
                record.gpu_device_ids = ids
                record.updated_at = utcnow()  # even when nothing else changed

        self._retry(write)

    def desired_states(self) -> dict[str, DesiredStateRow]:
        with self._read() as session:
            return {r.model_id: _desired_row(r)
                    for r in session.scalars(sa.select(DesiredState))}

    # -- downloads -----------------------------------------------------------------------------

    def create_download(self, model_id: str, repo: str, revision: str = "main",
                        patterns: Collection[str] | None = None,
                        bytes_total: int | None = None) -> int:
        """Record a new download, ``queued``; returns its id."""
        _text("model_id", model_id, MODEL_ID_LENGTH)
        _text("repo", repo, 256)
        _text("revision", revision, 256)
        _count("bytes_total", bytes_total, optional=True)
        if isinstance(patterns, str):
            raise ValueError("patterns must be a list of glob patterns, not a string")
        globs = list(patterns) if patterns is not None else None
        if globs is not None and not all(isinstance(g, str) and g for g in globs):
            raise ValueError(f"patterns must be non-empty strings, not {globs!r}")
        now = utcnow()
        record = DownloadRecord(model_id=model_id, repo=repo, revision=revision,
                                patterns=globs, state="queued", bytes_done=0,
                                bytes_total=bytes_total, created_at=now, updated_at=now)
        with self._write() as session:
            session.add(record)
            session.flush()
            return record.id

    def update_download(self, download_id: int, **fields: Unpack[DownloadUpdate]) -> bool:
        """Change a download's state or progress: one UPDATE, cheap enough for a few calls a
        second. A download that reaches completed, failed or cancelled gets its
        ``finished_at`` and never changes again: returns False (and changes nothing) when it
        had already finished, so a late progress update cannot undo a cancellation. Raises
        KeyError for an unknown id.
        """
        unknown = set(fields) - set(DownloadUpdate.__annotations__)
        if unknown:
            raise TypeError(f"update_download() got unknown fields {sorted(unknown)}")
        values: dict[str, Any] = dict(fields)
        if "state" in fields:
            _one_of("state", fields["state"], DOWNLOAD_STATES)
            if fields["state"] in FINISHED_DOWNLOAD_STATES:
                values["finished_at"] = utcnow()
        if "bytes_done" in fields:
            _count("bytes_done", fields["bytes_done"])
        if "bytes_total" in fields:
            _count("bytes_total", fields["bytes_total"], optional=True)
        if "error" in fields and fields["error"] is not None and not isinstance(
                fields["error"], str):
            raise ValueError(f"error must be a string or None, not {fields['error']!r}")
        values["updated_at"] = utcnow()
        statement = (sa.update(DownloadRecord)
                     .where(DownloadRecord.id == download_id,
                            DownloadRecord.state.in_(ACTIVE_DOWNLOAD_STATES))
                     .values(**values))
        with self._writer.begin() as connection:
            if connection.execute(statement).rowcount == 1:
                return True
            exists = connection.execute(
                sa.select(DownloadRecord.id).where(DownloadRecord.id == download_id)).first()
        if exists is None:
            raise KeyError(download_id)
        return False

    def download(self, download_id: int) -> DownloadRow | None:
        with self._read() as session:
            record = session.get(DownloadRecord, download_id)
            return _download_row(record) if record is not None else None

    def downloads(self, model_id: str | None = None,
                  states: Collection[str] | None = None) -> list[DownloadRow]:
        """Downloads, oldest first; of one model and/or in some states when asked."""
        query = sa.select(DownloadRecord).order_by(DownloadRecord.id)
        if model_id is not None:
            query = query.where(DownloadRecord.model_id == model_id)
        if states is not None:
            if isinstance(states, str):
                raise ValueError("states must be a collection of states, not a string")
            for state in states:
                _one_of("state", state, DOWNLOAD_STATES)
            query = query.where(DownloadRecord.state.in_(list(states)))
        with self._read() as session:
            return [_download_row(r) for r in session.scalars(query)]

    def interrupted_downloads(self) -> list[DownloadRow]:
        """Downloads that were queued or running when the gateway stopped: to resume at
        start (``huggingface_hub`` resumes a partly downloaded file)."""
        return self.downloads(states=ACTIVE_DOWNLOAD_STATES)
