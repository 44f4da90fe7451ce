"""The tables, as SQLAlchemy 2 declarative models.

Portable SQL only: the same models (and the migrations written from them) run on SQLite and
on PostgreSQL. Enumerations are short strings with a named CHECK constraint rather than a
native ENUM type (which SQLite lacks, and which PostgreSQL can only extend outside a
transaction). Timestamps are timezone-aware UTC (``UTCDateTime``). Every constraint and index
is named through ``NAMING_CONVENTION``, so that Alembic can find them again, including in
SQLite's batch mode, which rebuilds a table to alter it.

Nothing outside ``modelhost.db`` should use these classes: ``Store`` returns plain frozen
dataclasses instead.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ModelSource = Literal["file", "api"]
"""Where a model spec comes from: the models file, or added at run time (admin API)."""
# `rollback`: a spec of an earlier version given back (asked, or a failed update undone).
RevisionAction = Literal["created", "updated", "deleted", "rollback"]
Desired = Literal["loaded", "unloaded"]
DownloadState = Literal["queued", "running", "completed", "failed", "cancelled"]

MODEL_SOURCES: Final[tuple[str, ...]] = get_args(ModelSource)
REVISION_ACTIONS: Final[tuple[str, ...]] = get_args(RevisionAction)
DESIRED_STATES: Final[tuple[str, ...]] = get_args(Desired)
DOWNLOAD_STATES: Final[tuple[str, ...]] = get_args(DownloadState)
ACTIVE_DOWNLOAD_STATES: Final[tuple[DownloadState, ...]] = ("queued", "running")
FINISHED_DOWNLOAD_STATES: Final[tuple[DownloadState, ...]] = ("completed", "failed", "cancelled")

MODEL_ID_LENGTH = 128  # config.MODEL_ID allows 1-128 characters.

NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database.

    PostgreSQL stores it as ``timestamp with time zone``. SQLite has no such type: the value is
    stored as UTC text without an offset, and read back with ``tzinfo=UTC``. Naive datetimes
    are refused rather than guessed at.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: use a timezone-aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _one_of(column: str, values: tuple[str, ...], name: str) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=name)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class ModelRecord(Base):
    """The current spec of a model; a deleted model keeps its row (``deleted``) and history."""

    __tablename__ = "models"
    __table_args__ = (
        _one_of("source", MODEL_SOURCES, "source"),
        sa.CheckConstraint("version >= 1", name="version_positive"),
    )

    model_id: Mapped[str] = mapped_column(sa.String(MODEL_ID_LENGTH), primary_key=True)
    # The ModelSpec as canonical JSON text (sorted keys, compact), so that an unchanged spec
    # compares equal whatever the order of its keys.
    spec: Mapped[str] = mapped_column(sa.Text)
    # The version of the latest revision: 1 at creation, +1 at every change and deletion.
    version: Mapped[int] = mapped_column(sa.Integer)
    source: Mapped[str] = mapped_column(sa.String(8))
    deleted: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ModelRevision(Base):
    """One change of a model spec. Rows are only ever appended, never updated or deleted."""

    __tablename__ = "model_revisions"
    __table_args__ = (
        sa.UniqueConstraint("model_id", "version"),
        _one_of("action", REVISION_ACTIONS, "action"),
        # A deletion carries no spec; a creation or an update always does.
        sa.CheckConstraint("(action = 'deleted') = (spec IS NULL)", name="spec_iff_not_deleted"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(
        sa.String(MODEL_ID_LENGTH), sa.ForeignKey("models.model_id")
    )
    version: Mapped[int] = mapped_column(sa.Integer)
    spec: Mapped[str | None] = mapped_column(sa.Text)
    action: Mapped[str] = mapped_column(sa.String(8))
    actor: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Why (a rollback's: the failure that undid an update, or who asked for it).
    reason: Mapped[str | None] = mapped_column(sa.Text)


class DesiredState(Base):
    """What the operator wants for a model; rebuilt into the runtime after a restart."""

    __tablename__ = "desired_states"
    __table_args__ = (_one_of("desired", DESIRED_STATES, "desired"),)

    # No foreign key: built-in models have a desired state but need no row in `models`.
    model_id: Mapped[str] = mapped_column(sa.String(MODEL_ID_LENGTH), primary_key=True)
    desired: Mapped[str] = mapped_column(sa.String(8))
    # The GPUs the model was placed on (null: let the scheduler choose).
    gpu_device_ids: Mapped[list[int] | None] = mapped_column(sa.JSON(none_as_null=True))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class DownloadRecord(Base):
    """A download of a model's files from the Hugging Face hub."""

    __tablename__ = "downloads"
    __table_args__ = (
        sa.Index("ix_downloads_model_id_state", "model_id", "state"),
        _one_of("state", DOWNLOAD_STATES, "state"),
        sa.CheckConstraint("bytes_done >= 0", name="bytes_done_positive"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(sa.String(MODEL_ID_LENGTH))
    repo: Mapped[str] = mapped_column(sa.String(256))
    revision: Mapped[str] = mapped_column(sa.String(256))
    # Glob patterns of the files to fetch (null: the whole repository).
    patterns: Mapped[list[str] | None] = mapped_column(sa.JSON(none_as_null=True))
    state: Mapped[str] = mapped_column(sa.String(16))
    bytes_done: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    bytes_total: Mapped[int | None] = mapped_column(sa.BigInteger)
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


AUDIT_ACTOR_LENGTH = 64
AUDIT_ACTION_LENGTH = 32


class AuditRecord(Base):
    """One admin request that reached an admin route (``modelhost.api.audit``): who (the id
    of the key, never the key), from where, what, and how it ended. Only ever appended."""

    __tablename__ = "audit"
    __table_args__ = (
        sa.Index("ix_audit_at", "at"),
        sa.Index("ix_audit_target", "target"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(sa.String(AUDIT_ACTOR_LENGTH))
    client: Mapped[str | None] = mapped_column(sa.String(128))
    method: Mapped[str] = mapped_column(sa.String(8))
    path: Mapped[str] = mapped_column(sa.String(512))
    action: Mapped[str] = mapped_column(sa.String(AUDIT_ACTION_LENGTH))
    # The model the action is about (null: the token, or no model).
    target: Mapped[str | None] = mapped_column(sa.String(MODEL_ID_LENGTH))
    status: Mapped[int] = mapped_column(sa.Integer)
    # `ok`, or the error's code (`model_not_found`, `invalid_request_error`...).
    outcome: Mapped[str] = mapped_column(sa.String(64))
    # What else is worth keeping (query parameters, GPUs asked, the error message), never a
    # secret.
    detail: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON(none_as_null=True))


USAGE_KEY_LENGTH = 64


class UsageRecord(Base):
    """What one key (by its id, never the key) used of one model in one hour: counters,
    added to once a second by the gateway (``modelhost.usage``)."""

    __tablename__ = "usage"

    key_id: Mapped[str] = mapped_column(sa.String(USAGE_KEY_LENGTH), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(MODEL_ID_LENGTH), primary_key=True)
    # The start of the hour (UTC).
    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    requests: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    audio_seconds: Mapped[float] = mapped_column(sa.Float, default=0.0)
    embedding_inputs: Mapped[int] = mapped_column(sa.BigInteger, default=0)


GATEWAY_ID_LENGTH = 128
SPEC_VERSION_LENGTH = 32


class ModelWorker(Base):
    """Where the gateway that owns a model's version runs its worker, for the other gateways
    sharing a PostgreSQL database to relay to (``modelhost.cluster``). Written by the owner
    once its worker answers, deleted when it stops it; a row left by a gateway that died is
    overwritten by the next owner (ownership itself is an advisory lock, not this row)."""

    __tablename__ = "model_workers"

    model_id: Mapped[str] = mapped_column(sa.String(MODEL_ID_LENGTH), primary_key=True)
    # Which version of the model's spec the worker runs (`db.workers.spec_version`): during
    # an update the old and the new one may each have an owner.
    version: Mapped[str] = mapped_column(sa.String(SPEC_VERSION_LENGTH), primary_key=True)
    gateway_id: Mapped[str] = mapped_column(sa.String(GATEWAY_ID_LENGTH))
    # The worker's base URL (ending in /v1), as the owner's relay reaches it.
    address: Mapped[str] = mapped_column(sa.String(512))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ModelActivity(Base):
    """When each gateway sharing a PostgreSQL database last relayed a request to a model
    (``modelhost.cluster``): the owner of a model's worker unloads it for idleness only when
    no gateway has used it for its ``idle_ttl``. Written at most every few seconds per
    gateway and model, only while the model is used."""

    __tablename__ = "model_activity"

    model_id: Mapped[str] = mapped_column(sa.String(MODEL_ID_LENGTH), primary_key=True)
    gateway_id: Mapped[str] = mapped_column(sa.String(GATEWAY_ID_LENGTH), primary_key=True)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelSecret(Base):
    """The secrets of a model added through the admin API (the values that the stored spec
    shows as ``***``), sealed with the deployment's secret key (``MODELHOST_SECRET_KEY``), so
    that every gateway sharing the database can serve the model while the database alone
    reveals nothing."""

    __tablename__ = "model_secrets"

    model_id: Mapped[str] = mapped_column(sa.String(MODEL_ID_LENGTH), primary_key=True)
    # The sealed JSON object of secret values (authenticated encryption; see the module that
    # writes it for the format).
    sealed: Mapped[str] = mapped_column(sa.Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


SESSION_HASH_LENGTH = 64


class DashboardSession(Base):
    """A signed-in dashboard session, shared by every gateway using the database. Only a
    digest of the session id is stored (the browser's cookie holds the id), and the key it was
    opened with by its id only, never the key."""

    __tablename__ = "dashboard_sessions"
    __table_args__ = (sa.Index("ix_dashboard_sessions_seen_at", "seen_at"),)

    # SHA-256 of the session id, in hex.
    id_hash: Mapped[str] = mapped_column(sa.String(SESSION_HASH_LENGTH), primary_key=True)
    # The id of the admin key that opened it (null: no keys configured).
    key_id: Mapped[str | None] = mapped_column(sa.String(USAGE_KEY_LENGTH))
    actor: Mapped[str] = mapped_column(sa.String(AUDIT_ACTOR_LENGTH))
    csrf: Mapped[str] = mapped_column(sa.String(SESSION_HASH_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
