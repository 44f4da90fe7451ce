"""The spec of an earlier version of a model, from its history: what a rollback serves."""

from __future__ import annotations

import json

from pydantic import ValidationError

from modelhost.config import UNION_TAGS, ModelSpec
from modelhost.db.rows import RevisionRow
from modelhost.errors import validation_message
from modelhost.persistence import spec_json, spec_secrets
from modelhost.redaction import MASK, restore_masked


class NoSuchVersion(Exception):
    """No version to go back to (unknown, or no earlier spec)."""


class NotServable(Exception):
    """The version exists but cannot serve now; the message says why."""


def earlier_spec(rows: list[RevisionRow], current: ModelSpec, version: int | None
                 ) -> tuple[int, ModelSpec]:
    """(version, spec) of `version` in the history `rows` (oldest first) of the model that
    serves `current`; None: the latest spec before the current one. The stored spec's
    secrets (`***`) are the current spec's where they are still known."""
    now = json.loads(spec_json(current))
    found = [r for r in rows if r.spec_json is not None
             and (version is None or r.version == version)]
    if version is None:
        found = [r for r in found if json.loads(r.spec_json or "") != now][-1:]
    if not found:
        raise NoSuchVersion(f"model '{current.id}' has no version {version} to go back to"
                            if version is not None else
                            f"model '{current.id}' has no earlier spec")
    row = found[0]
    data = restore_masked(row.spec() or {}, spec_secrets(current))
    if MASK in json.dumps(data):
        raise NotServable(f"version {row.version} of model '{current.id}' had secrets that "
                          "are no longer known; PUT its spec with them instead")
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        details, _ = validation_message(exc.errors(), drop=UNION_TAGS, whole="spec")
        raise NotServable(f"version {row.version} of model '{current.id}' is no longer a "
                          f"valid spec: {details}") from None
    if json.loads(spec_json(spec)) == now:
        raise NotServable(f"model '{current.id}' already serves the spec of version "
                          f"{row.version}")
    return row.version, spec
