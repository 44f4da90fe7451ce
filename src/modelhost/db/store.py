"""The store: every read and write of the gateway's database goes through ``Store``.

``Store.open(url)`` then ``migrate()`` (Alembic ``upgrade head``), then the methods below. Each
method is one short transaction and returns plain frozen dataclasses (``rows``), never ORM
objects, so that nothing lazy-loads later in another thread. How the database is opened, and
SQLite's settings that make every acknowledged write durable, are in ``engine``.

Why synchronous: SQLite runs in-process and a call takes microseconds to a few milliseconds
(the fsync of a commit is the slowest part). The gateway calls these methods through
``asyncio.to_thread``, which keeps the event loop free during that fsync and while a call
waits for another process's write lock; an async driver (aiosqlite) would only run the same
sqlite3 calls in a thread of its own. No transaction ever spans an ``await``, so no lock is
held while the gateway does something else. The engine's connection pool makes a ``Store``
safe to share between threads.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Self, TypeVar, Unpack

import sqlalchemy as sa
from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from modelhost.db import audit, secrets, sessions, usage, workers
from modelhost.db.audit import AuditEntry, AuditRow
from modelhost.db.engine import (
    DB_FILENAME,
    WAIT_OPTION,
    WRITE_OPTION,
    alembic_config,
    default_url,
    head_revision,
    is_memory,
    is_sqlite,
    migration_engine,
    open_engine,
    private_file,
)
from modelhost.db.rows import (
    DesiredStateRow,
    DownloadRow,
    DownloadUpdate,
    ModelRow,
    RevisionRow,
    canonical_spec,
    check_count,
    check_one_of,
    check_text,
    desired_row,
    download_row,
    model_row,
    revision_row,
)
from modelhost.db.schema import (
    ACTIVE_DOWNLOAD_STATES,
    DESIRED_STATES,
    DOWNLOAD_STATES,
    FINISHED_DOWNLOAD_STATES,
    MODEL_ID_LENGTH,
    MODEL_SOURCES,
    DesiredState,
    DownloadRecord,
    ModelRecord,
    ModelRevision,
    RevisionAction,
    utcnow,
)
from modelhost.db.sessions import SessionRow
from modelhost.db.usage import Counts, UsageRow

__all__ = [
    "DB_FILENAME",
    "AuditEntry",
    "AuditRow",
    "DesiredStateRow",
    "DownloadRow",
    "DownloadUpdate",
    "ModelRow",
    "RevisionRow",
    "Store",
    "StoreError",
    "alembic_config",
    "default_url",
    "head_revision",
]

log = logging.getLogger(__name__)

# Attempts of a write that lost a race on PostgreSQL (two replicas inserting the same key).
WRITE_ATTEMPTS: Final = 3

T = TypeVar("T")


class StoreError(Exception):
    """A database that this version of modelhost cannot use."""


# -- the store ---------------------------------------------------------------------------------


class Store:
    """The gateway's database. Thread-safe; every method is one short transaction."""

    def __init__(self, url: URL, engine: Engine) -> None:
        self.url = url
        self._engine = engine
        # Same pool; its transactions take the write lock first (BEGIN IMMEDIATE on SQLite).
        self._writer = engine.execution_options(**{WRITE_OPTION: True})
        # The gateway that writes (several sharing PostgreSQL, `modelhost.cluster`): a spec
        # change then notifies the others in its transaction (`workers.notify_change`).
        self.origin: str | None = None

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect to the database at ``url``, creating a SQLite file's folder if needed.

        The schema is not touched: call ``migrate()`` before anything else.
        """
        parsed = make_url(url)
        if is_sqlite(parsed) and not is_memory(parsed) and not parsed.query.get("uri"):
            assert parsed.database is not None
            private_file(Path(parsed.database).expanduser())
        return cls(parsed, open_engine(parsed))

    def waiting_at_most(self, seconds: float) -> Store:
        """The same store (same connections), whose writes wait at most `seconds` for
        another writer's lock instead of `BUSY_TIMEOUT_S`, then fail with "database is
        locked": for a caller that must answer soon (an admin API change). Do not close it."""
        view = copy.copy(self)
        view._writer = self._writer.execution_options(**{WAIT_OPTION: seconds})
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
        engine = self._writer if is_memory(self.url) else migration_engine(self.url)
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

    def upsert_model(self, spec_json: str, model_id: str, source: str, actor: str,
                     rollback: str | None = None) -> int:
        """Store a model's spec (a ``ModelSpec`` as JSON, validated by the caller); returns
        its version.

        A new or changed spec (or one given back to a deleted model) gets the next version and
        a revision; an unchanged one (compared as canonical JSON) keeps its version and adds no
        revision, though ``source`` is updated if it differs. With ``rollback`` (why: the
        failure that undid an update, or who asked), a changed spec's revision is a
        ``rollback`` one, with that reason.
        """
        check_text("model_id", model_id, MODEL_ID_LENGTH)
        check_one_of("source", source, MODEL_SOURCES)
        check_text("actor", actor, 64)
        if rollback is not None and not isinstance(rollback, str):
            raise ValueError(f"rollback must be a reason (a string), not {rollback!r}")
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
                if rollback is not None:
                    action = "rollback"
                record.version += 1
                record.spec = spec
                record.source = source
                record.deleted = False
            session.add(ModelRevision(model_id=model_id, version=record.version, spec=spec,
                                      action=action, actor=actor,
                                      reason=rollback[:4000] if rollback else None))
            workers.notify_change(session, model_id, self.origin)
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
        if changed and is_sqlite(self.url) and not is_memory(self.url):
            with self._engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        return changed

    def delete_model(self, model_id: str, actor: str) -> int | None:
        """Mark a model deleted, keeping its history; returns the version of the deletion,
        or None when there was nothing to delete (unknown, or already deleted)."""
        check_text("actor", actor, 64)

        def write(session: Session) -> int | None:
            record = session.get(ModelRecord, model_id, with_for_update=True)
            if record is None or record.deleted:
                return None
            record.version += 1
            record.deleted = True
            session.add(ModelRevision(model_id=model_id, version=record.version, spec=None,
                                      action="deleted", actor=actor))
            workers.notify_change(session, model_id, self.origin)
            return record.version

        return self._retry(write)

    def model(self, model_id: str) -> ModelRow | None:
        with self._read() as session:
            record = session.get(ModelRecord, model_id)
            return model_row(record) if record is not None else None

    def models(self, include_deleted: bool = False) -> list[ModelRow]:
        """The stored models, by id; deleted ones only when asked."""
        query = sa.select(ModelRecord).order_by(ModelRecord.model_id)
        if not include_deleted:
            query = query.where(ModelRecord.deleted.is_(False))
        with self._read() as session:
            return [model_row(r) for r in session.scalars(query)]

    def history(self, model_id: str) -> list[RevisionRow]:
        """Every revision of a model, oldest first (empty for an unknown model)."""
        query = (sa.select(ModelRevision).where(ModelRevision.model_id == model_id)
                 .order_by(ModelRevision.version))
        with self._read() as session:
            return [revision_row(r) for r in session.scalars(query)]

    def revision(self, model_id: str, version: int) -> RevisionRow | None:
        """One revision of a model, e.g. to roll back to its spec with ``upsert_model``."""
        query = sa.select(ModelRevision).where(ModelRevision.model_id == model_id,
                                               ModelRevision.version == version)
        with self._read() as session:
            record = session.scalars(query).one_or_none()
            return revision_row(record) if record is not None else None

    # -- desired states ------------------------------------------------------------------------

    def set_desired(self, model_id: str, desired: str,
                    gpu_device_ids: Collection[int] | None = None) -> None:
        """Record whether a model should be loaded (and on which GPUs, None: any)."""
        check_text("model_id", model_id, MODEL_ID_LENGTH)
        check_one_of("desired", desired, DESIRED_STATES)
        ids: list[int] | None = None
        if gpu_device_ids is not None:
            ids = list(gpu_device_ids)
            for gpu in ids:
                check_count("gpu_device_ids[]", gpu)
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
            return {r.model_id: desired_row(r)
                    for r in session.scalars(sa.select(DesiredState))}

    # -- downloads -----------------------------------------------------------------------------

    def create_download(self, model_id: str, repo: str, revision: str = "main",
                        patterns: Collection[str] | None = None,
                        bytes_total: int | None = None) -> int:
        """Record a new download, ``queued``; returns its id."""
        check_text("model_id", model_id, MODEL_ID_LENGTH)
        check_text("repo", repo, 256)
        check_text("revision", revision, 256)
        check_count("bytes_total", bytes_total, optional=True)
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
            check_one_of("state", fields["state"], DOWNLOAD_STATES)
            if fields["state"] in FINISHED_DOWNLOAD_STATES:
                values["finished_at"] = utcnow()
        if "bytes_done" in fields:
            check_count("bytes_done", fields["bytes_done"])
        if "bytes_total" in fields:
            check_count("bytes_total", fields["bytes_total"], optional=True)
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
            return download_row(record) if record is not None else None

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
                check_one_of("state", state, DOWNLOAD_STATES)
            query = query.where(DownloadRecord.state.in_(list(states)))
        with self._read() as session:
            return [download_row(r) for r in session.scalars(query)]

    # -- audit log (``audit``) -----------------------------------------------------------------

    def record_audit(self, entry: AuditEntry) -> int:
        """Append an entry to the audit log; returns its id."""
        with self._write() as session:
            return audit.append(session, entry)

    def audit(self, **filters: Any) -> list[AuditRow]:
        """Audit entries newest first: ``since``, ``until`` (aware datetimes), ``target``,
        ``actor``, ``action``, ``limit`` (1-1000, default 100), ``offset``."""
        with self._read() as session:
            return audit.query(session, **filters)

    def prune_audit(self, before: datetime) -> int:
        """Delete the audit entries older than ``before``; returns how many."""
        with self._write() as session:
            return audit.prune(session, before)

    # -- usage (``usage``) -----------------------------------------------------------------------

    def add_usage(self, counts: dict[tuple[str, str, int], Counts]) -> int:
        """Add a second's usage counters to the table (one transaction)."""
        return self._retry(lambda session: usage.add(session, counts))

    def usage_sums(self, **filters: Any) -> list[UsageRow]:
        """Usage sums in a time range, grouped (``db.usage.query``)."""
        with self._read() as session:
            return usage.query(session, **filters)

    # -- model workers (``workers``: several gateways on PostgreSQL) ---------------------

    def publish_worker(self, model_id: str, version: str, gateway_id: str,
                       address: str) -> None:
        """Record where the owner of a model's version runs its worker."""
        self._retry(lambda session: workers.publish(session, model_id, version, gateway_id,
                                                    address))

    def unpublish_worker(self, model_id: str, version: str, gateway_id: str,
                         address: str | None = None) -> None:
        """Forget it (only if it is still `gateway_id`'s, and `address` when given)."""
        with self._write() as session:
            workers.unpublish(session, model_id, version, gateway_id, address)

    def worker_address(self, model_id: str, version: str) -> tuple[str, str] | None:
        """(gateway id, address) of the published worker of a model's version, or None."""
        with self._read() as session:
            return workers.address(session, model_id, version)

    def current_version(self, model_id: str) -> str | None:
        """The version (`workers.spec_version`) of the model's stored spec, or None."""
        with self._read() as session:
            return workers.current_version(session, model_id)

    def unload_everywhere(self, model_id: str) -> None:
        """Desired state `unloaded`, and every other gateway told to stop the model."""
        self._retry(lambda session: workers.unload_everywhere(session, model_id, self.origin))

    def desired(self, model_id: str) -> tuple[str, str] | None:
        """(desired state, when set) of one model, or None."""
        with self._read() as session:
            return workers.desired(session, model_id)

    def record_use(self, gateway_id: str, ages: dict[str, float]) -> None:
        """When this gateway last used these models (`model_activity`; PostgreSQL)."""
        with self._write() as session:
            workers.record_use(session, gateway_id, ages)

    def idle_for(self, model_id: str) -> float | None:
        """Seconds since any gateway used the model (None: never recorded)."""
        with self._read() as session:
            return workers.idle_for(session, model_id)

    def forget_uses(self, gateway_id: str, older_than: float) -> None:
        with self._write() as session:
            workers.forget_uses(session, gateway_id, older_than)

    def interrupted_downloads(self) -> list[DownloadRow]:
        """Downloads that were queued or running when the gateway stopped: to resume at
        start (``huggingface_hub`` resumes a partly downloaded file)."""
        return self.downloads(states=ACTIVE_DOWNLOAD_STATES)

    # -- sealed model secrets (``secrets``) and dashboard sessions (``sessions``) ---------

    def sealed_secrets(self, model_id: str | None = None) -> dict[str, str]:
        """{model id: sealed value} of one model (empty when it has none), or of all."""
        with self._read() as session:
            if model_id is None:
                return secrets.every(session)
            value = secrets.get(session, model_id)
            return {model_id: value} if value is not None else {}

    def put_sealed_secrets(self, model_id: str, sealed: str | None,
                           notify: bool = False) -> None:
        """Store (None: delete) a model's sealed secrets (`notify`: `db.secrets.put`)."""
        check_text("model_id", model_id, MODEL_ID_LENGTH)
        self._retry(lambda session: secrets.put(session, model_id, sealed, self.origin,
                                                notify))

    def open_dashboard_session(self, row: SessionRow, cap: int, seen_before: datetime,
                               created_before: datetime) -> None:
        """Sweep the expired sessions, make room under `cap`, insert `row`."""
        def write(session: Session) -> None:
            sessions.sweep(session, seen_before, created_before)
            sessions.open_(session, row, cap)

        self._retry(write)

    def dashboard_session(self, id_hash: str) -> SessionRow | None:
        with self._read() as session:
            return sessions.get(session, id_hash)

    def touch_dashboard_session(self, id_hash: str, seen_at: datetime) -> None:
        with self._write() as session:
            sessions.touch(session, id_hash, seen_at)

    def close_dashboard_session(self, id_hash: str) -> bool:
        with self._write() as session:
            return sessions.close(session, id_hash)
