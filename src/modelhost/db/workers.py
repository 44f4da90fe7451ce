"""What several gateways sharing a PostgreSQL database tell each other through it, used by
``Store`` (``modelhost.cluster`` is the rest):

* ``notify_change``: a model's spec changed (added, updated, rolled back, deleted). Sent
  with ``pg_notify`` in the transaction that makes the change, so the others hear of it
  exactly when it is committed (never of a change rolled back), and re-read the row.
  Nothing is sent on SQLite, where one gateway owns the database.
* The ``model_workers`` table: the address of the worker of each version of a model (its
  spec: `spec_version`), published by the gateway that owns that version (its advisory
  lock), for the others to relay to. Keyed by version, so that while one gateway rolls an
  update out, the old and the new version each have one worker, and a gateway relaying to
  the old one is not moved to the new one before it applies the change.
"""

from __future__ import annotations

import hashlib
import json
from typing import Final

import sqlalchemy as sa
from sqlalchemy.orm import Session

from modelhost.db.rows import canonical_spec
from modelhost.db.schema import ModelRecord, ModelWorker, utcnow

# The LISTEN/NOTIFY channel of model changes; the payload is `change_payload`'s JSON.
CHANNEL: Final = "modelhost_models"


def spec_version(spec_json: str, model_id: str) -> str:
    """A version of a spec as every gateway computes it: a digest of its canonical JSON (as
    stored, secrets masked)."""
    return hashlib.sha256(canonical_spec(spec_json, model_id).encode()).hexdigest()[:24]


def change_payload(model_id: str, origin: str) -> str:
    return json.dumps({"model": model_id, "gateway": origin}, separators=(",", ":"))


def parse_payload(text: str) -> tuple[str, str] | None:
    """(model id, the gateway that made the change), or None for a payload not ours."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    model, gateway = data.get("model"), data.get("gateway")
    if not isinstance(model, str) or not isinstance(gateway, str):
        return None
    return model, gateway


def notify_change(session: Session, model_id: str, origin: str | None) -> None:
    """Tell the other gateways, at commit, that `model_id` changed (PostgreSQL only)."""
    if origin is None or session.get_bind().dialect.name != "postgresql":
        return
    session.execute(sa.select(sa.func.pg_notify(CHANNEL, change_payload(model_id, origin))))


def publish(session: Session, model_id: str, version: str, gateway_id: str,
            address: str) -> None:
    record = session.get(ModelWorker, (model_id, version), with_for_update=True)
    if record is None:
        session.add(ModelWorker(model_id=model_id, version=version, gateway_id=gateway_id,
                                address=address, updated_at=utcnow()))
    else:
        record.gateway_id, record.address, record.updated_at = gateway_id, address, utcnow()


def unpublish(session: Session, model_id: str, version: str, gateway_id: str,
              address: str | None) -> None:
    """Forget a worker's address, only if it is still this gateway's (and this address)."""
    statement = sa.delete(ModelWorker).where(ModelWorker.model_id == model_id,
                                             ModelWorker.version == version,
                                             ModelWorker.gateway_id == gateway_id)
    if address is not None:
        statement = statement.where(ModelWorker.address == address)
    session.execute(statement)


def address(session: Session, model_id: str, version: str) -> tuple[str, str] | None:
    """(gateway id, address) of the published worker of a model's version, or None."""
    record = session.get(ModelWorker, (model_id, version))
    return (record.gateway_id, record.address) if record is not None else None


def current_version(session: Session, model_id: str) -> str | None:
    """The version of the model's stored spec (None: unknown or deleted)."""
    record = session.get(ModelRecord, model_id)
    if record is None or record.deleted:
        return None
    return spec_version(record.spec, model_id)
