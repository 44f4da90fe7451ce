"""The ``model_secrets`` table: one sealed value per model added through the admin API
(``modelhost.sealing``; ``modelhost.persistence.SealedSecrets`` says what it holds). The
store never sees a secret in clear: it keeps the text it is given."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from modelhost.db import workers
from modelhost.db.schema import ModelSecret, utcnow


def get(session: Session, model_id: str) -> str | None:
    record = session.get(ModelSecret, model_id)
    return record.sealed if record is not None else None


def every(session: Session) -> dict[str, str]:
    return {r.model_id: r.sealed for r in session.scalars(sa.select(ModelSecret))}


def put(session: Session, model_id: str, sealed: str | None, origin: str | None,
        notify: bool) -> None:
    """Store (None: delete) a model's sealed value; with `notify`, tell the other gateways
    at commit that the model changed (a change of its secrets alone, which leaves its stored
    spec as it was and so notifies nothing by itself)."""
    record = session.get(ModelSecret, model_id, with_for_update=True)
    if sealed is None:
        if record is not None:
            session.delete(record)
    elif record is None:
        session.add(ModelSecret(model_id=model_id, sealed=sealed, updated_at=utcnow()))
    else:
        record.sealed, record.updated_at = sealed, utcnow()
    if notify:
        workers.notify_change(session, model_id, origin)
