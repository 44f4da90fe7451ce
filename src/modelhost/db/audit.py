"""The audit log's rows and queries (the ``audit`` table), used by ``Store``.

Entries are only ever appended (``append``) and read back newest first (``query``); the only
deletion is ``prune``, for a retention period. What is given is made safe to store rather than
refused: an entry describes a request that already happened, so a path too long for its column
is cut, a control character (which PostgreSQL refuses in text, and which a terminal would act
on) is written as ``\\xNN``. The caller (``modelhost.api.audit``) keeps secrets out of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.orm import Session

from modelhost.db.schema import (
    AUDIT_ACTION_LENGTH,
    AUDIT_ACTOR_LENGTH,
    MODEL_ID_LENGTH,
    AuditRecord,
    utcnow,
)

MAX_LIMIT: Final = 1000
DEFAULT_LIMIT: Final = 100


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """What the caller records; ``at`` defaults to now (UTC)."""

    actor: str
    method: str
    path: str
    action: str
    status: int
    outcome: str
    target: str | None = None
    client: str | None = None
    detail: dict[str, Any] | None = None
    at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    client: str | None
    method: str
    path: str
    action: str
    target: str | None
    status: int
    outcome: str
    detail: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of the admin API (`at` in ISO 8601, UTC)."""
        return {"id": self.id, "at": self.at.isoformat().replace("+00:00", "Z"),
                "actor": self.actor, "client": self.client, "method": self.method,
                "path": self.path, "action": self.action, "model": self.target,
                "status": self.status, "outcome": self.outcome, "detail": self.detail}


def printable(text: str, length: int) -> str:
    """`text` with control characters written as \\xNN, cut to `length` characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text[:length]


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value, 1024)
    if isinstance(value, dict):
        return {printable(str(k), 128): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return printable(str(value), 1024)


def append(session: Session, entry: AuditEntry) -> int:
    if entry.at.tzinfo is None:
        raise ValueError("audit entry time must be timezone-aware")
    record = AuditRecord(
        at=entry.at, actor=printable(entry.actor, AUDIT_ACTOR_LENGTH),
        client=printable(entry.client, 128) if entry.client is not None else None,
        method=printable(entry.method, 8), path=printable(entry.path, 512),
        action=printable(entry.action, AUDIT_ACTION_LENGTH),
        target=printable(entry.target, MODEL_ID_LENGTH) if entry.target is not None else None,
        status=int(entry.status), outcome=printable(entry.outcome, 64),
        detail=_clean(entry.detail) if entry.detail else None)
    session.add(record)
    session.flush()
    return record.id


def query(session: Session, *, since: datetime | None = None, until: datetime | None = None,
          target: str | None = None, actor: str | None = None, action: str | None = None,
          limit: int = DEFAULT_LIMIT, offset: int = 0) -> list[AuditRow]:
    """Entries newest first, in [since, until), of one model, key or action when asked."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be 1-{MAX_LIMIT}, not {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and moment.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware")
    statement = sa.select(AuditRecord)
    if since is not None:
        statement = statement.where(AuditRecord.at >= since)
    if until is not None:
        statement = statement.where(AuditRecord.at < until)
    if target is not None:
        statement = statement.where(AuditRecord.target == target)
    if actor is not None:
        statement = statement.where(AuditRecord.actor == actor)
    if action is not None:
        statement = statement.where(AuditRecord.action == action)
    statement = (statement.order_by(AuditRecord.at.desc(), AuditRecord.id.desc())
                 .limit(limit).offset(offset))
    return [_row(r) for r in session.scalars(statement)]


def prune(session: Session, before: datetime) -> int:
    """Delete the entries older than `before`; returns how many."""
    result = session.execute(sa.delete(AuditRecord).where(AuditRecord.at < before))
    return int(getattr(result, "rowcount", 0) or 0)


def _row(record: AuditRecord) -> AuditRow:
    return AuditRow(id=record.id, at=record.at, actor=record.actor, client=record.client,
                    method=record.method, path=record.path, action=record.action,
                    target=record.target, status=record.status, outcome=record.outcome,
                    detail=record.detail)
