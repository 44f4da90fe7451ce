"""The ``dashboard_sessions`` table: the dashboard's signed-in sessions
(``modelhost.dashboard.sessions`` says what they are). Rows are keyed by the SHA-256 of the
session id; the id itself, and the admin key, are never stored."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from modelhost.db.schema import DashboardSession


@dataclass(frozen=True, slots=True)
class SessionRow:
    id_hash: str
    key_id: str | None
    actor: str
    csrf: str
    created_at: datetime
    seen_at: datetime


def _row(record: DashboardSession) -> SessionRow:
    return SessionRow(record.id_hash, record.key_id, record.actor, record.csrf,
                      record.created_at, record.seen_at)


def sweep(session: Session, seen_before: datetime, created_before: datetime) -> int:
    """Delete the sessions idle since `seen_before` or opened before `created_before`."""
    result = session.execute(sa.delete(DashboardSession).where(sa.or_(
        DashboardSession.seen_at < seen_before, DashboardSession.created_at < created_before)))
    return int(getattr(result, "rowcount", 0) or 0)


def open_(session: Session, row: SessionRow, cap: int) -> None:
    """Insert a session, first deleting the least recently seen ones past `cap` - 1."""
    count = session.scalar(sa.select(sa.func.count()).select_from(DashboardSession)) or 0
    if count >= cap:
        oldest = sa.select(DashboardSession.id_hash).order_by(
            DashboardSession.seen_at, DashboardSession.id_hash).limit(count - cap + 1)
        session.execute(sa.delete(DashboardSession).where(
            DashboardSession.id_hash.in_(list(session.scalars(oldest)))))
    session.add(DashboardSession(id_hash=row.id_hash, key_id=row.key_id, actor=row.actor,
                                 csrf=row.csrf, created_at=row.created_at,
                                 seen_at=row.seen_at))


def get(session: Session, id_hash: str) -> SessionRow | None:
    record = session.get(DashboardSession, id_hash)
    return _row(record) if record is not None else None


def touch(session: Session, id_hash: str, seen_at: datetime) -> None:
    session.execute(sa.update(DashboardSession).where(DashboardSession.id_hash == id_hash)
                    .values(seen_at=seen_at))


def close(session: Session, id_hash: str) -> bool:
    result = session.execute(sa.delete(DashboardSession).where(
        DashboardSession.id_hash == id_hash))
    return bool(getattr(result, "rowcount", 0))
