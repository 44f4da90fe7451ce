"""What several gateways sharing a PostgreSQL database tell each other through it, used by
``Store`` (``modelhost.cluster`` is the rest):

* ``notify_change``: a model's spec changed (added, updated, rolled back, deleted). Sent
  with ``pg_notify`` in the transaction that makes the change, so the others hear of it
  exactly when it is committed (never of a change rolled back), and re-read the row.
  Nothing is sent on SQLite, where one gateway owns the database. The payload names the
  model, the gateway and the kind of change (`Change`): ``spec``, or ``unload``
  (``unload_everywhere``: the model's desired state is ``unloaded``, every gateway stops
  it). A payload without a kind (a gateway of an earlier version) is a ``spec`` change.
* The ``model_activity`` table: when each gateway last used each model (``record_use``,
  written from a timer, never per request), so that a model is unloaded for idleness only
  when no gateway used it for its ``idle_ttl`` (``idle_for``). Times are the database
  server's clock (``now()``), so that the gateways' clocks need not agree.
* The ``model_workers`` table: the address of the worker of each version of a model (its
  spec: `spec_version`), published by the gateway that owns that version (its advisory
  lock), for the others to relay to. Keyed by version, so that while one gateway rolls an
  update out, the old and the new version each have one worker, and a gateway relaying to
  the old one is not moved to the new one before it applies the change.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Final, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from modelhost.db.rows import canonical_spec
from modelhost.db.schema import (
    DesiredState,
    ModelActivity,
    ModelRecord,
    ModelWorker,
    utcnow,
)

# The LISTEN/NOTIFY channel of model changes; the payload is `change_payload`'s JSON.
CHANNEL: Final = "modelhost_models"


def spec_version(spec_json: str, model_id: str) -> str:
    """A version of a spec as every gateway computes it: a digest of its canonical JSON (as
    stored, secrets masked)."""
    return hashlib.sha256(canonical_spec(spec_json, model_id).encode()).hexdigest()[:24]


# The kinds of change a notification names.
SPEC: Final = "spec"
UNLOAD: Final = "unload"


class Change(NamedTuple):
    """A notification: `model` changed (`kind`), by the gateway `gateway`."""

    model: str
    gateway: str
    kind: str = SPEC


def change_payload(model_id: str, origin: str, kind: str = SPEC) -> str:
    return json.dumps({"model": model_id, "gateway": origin, "kind": kind},
                      separators=(",", ":"))


def parse_payload(text: str) -> Change | None:
    """The change a payload names, or None for a payload not ours. A payload without a kind
    (sent by an earlier version) is a spec change."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    model, gateway, kind = data.get("model"), data.get("gateway"), data.get("kind", SPEC)
    if not isinstance(model, str) or not isinstance(gateway, str) or not isinstance(kind, str):
        return None
    return Change(model, gateway, kind)


def notify_change(session: Session, model_id: str, origin: str | None,
                  kind: str = SPEC) -> None:
    """Tell the other gateways, at commit, that `model_id` changed (PostgreSQL only)."""
    if origin is None or session.get_bind().dialect.name != "postgresql":
        return
    session.execute(sa.select(sa.func.pg_notify(CHANNEL, change_payload(model_id, origin,
                                                                        kind))))


def unload_everywhere(session: Session, model_id: str, origin: str | None) -> None:
    """Record the model as unloaded (its desired state) and tell every other gateway to
    stop it, in one transaction: a gateway that finds the model's owner gone reads this
    before it would take the model over (`desired`)."""
    record = session.get(DesiredState, model_id, with_for_update=True)
    if record is None:
        session.add(DesiredState(model_id=model_id, desired="unloaded"))
    else:
        record.desired, record.gpu_device_ids, record.updated_at = "unloaded", None, utcnow()
    notify_change(session, model_id, origin, UNLOAD)


def desired(session: Session, model_id: str) -> tuple[str, str] | None:
    """The model's desired state and when it was set (as text: compared, never computed
    with), or None."""
    record = session.get(DesiredState, model_id)
    return (record.desired, record.updated_at.isoformat()) if record is not None else None


def record_use(session: Session, gateway_id: str, ages: dict[str, float]) -> None:
    """This gateway used these models `ages[model]` seconds ago (PostgreSQL only)."""
    from sqlalchemy.dialects.postgresql import insert

    for model_id, age in ages.items():
        at = sa.func.now() - timedelta(seconds=max(age, 0.0))
        statement = insert(ModelActivity).values(model_id=model_id, gateway_id=gateway_id,
                                                 last_used_at=at)
        session.execute(statement.on_conflict_do_update(
            index_elements=[ModelActivity.model_id, ModelActivity.gateway_id],
            set_={"last_used_at": sa.func.greatest(ModelActivity.last_used_at,
                                                   statement.excluded.last_used_at)}))


def idle_for(session: Session, model_id: str) -> float | None:
    """Seconds since any gateway last used the model (None: none recorded a use)."""
    latest = sa.func.max(ModelActivity.last_used_at)
    seconds = session.scalar(sa.select(sa.func.extract("epoch", sa.func.now() - latest))
                             .where(ModelActivity.model_id == model_id))
    return float(seconds) if seconds is not None else None


def forget_uses(session: Session, gateway_id: str, older_than: float) -> None:
    """Forget what this gateway recorded (it stops), and every row older than
    `older_than` seconds (gateways that died without forgetting theirs)."""
    session.execute(sa.delete(ModelActivity).where(sa.or_(
        ModelActivity.gateway_id == gateway_id,
        ModelActivity.last_used_at < sa.func.now() - timedelta(seconds=older_than))))


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
