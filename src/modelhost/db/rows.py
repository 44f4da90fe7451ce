"""What crosses the store's boundary: the rows it returns and the checks of what it is given.

Rows are plain frozen dataclasses, never ORM objects, so that nothing lazy-loads later in
another thread; the checks raise ValueError before a transaction starts.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict, cast

from modelhost.db.schema import (
    FINISHED_DOWNLOAD_STATES,
    Desired,
    DesiredState,
    DownloadRecord,
    DownloadState,
    ModelRecord,
    ModelRevision,
    ModelSource,
    RevisionAction,
)

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
    reason: str | None = None  # a rollback's

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


def model_row(r: ModelRecord) -> ModelRow:
    return ModelRow(r.model_id, r.spec, r.version, cast(ModelSource, r.source), r.deleted,
                    r.created_at, r.updated_at)


def revision_row(r: ModelRevision) -> RevisionRow:
    return RevisionRow(r.id, r.model_id, r.version, cast(RevisionAction, r.action), r.spec,
                       r.actor, r.created_at, r.reason)


def desired_row(r: DesiredState) -> DesiredStateRow:
    ids = tuple(r.gpu_device_ids) if r.gpu_device_ids is not None else None
    return DesiredStateRow(r.model_id, cast(Desired, r.desired), ids, r.updated_at)


def download_row(r: DownloadRecord) -> DownloadRow:
    patterns = tuple(r.patterns) if r.patterns is not None else None
    return DownloadRow(r.id, r.model_id, r.repo, r.revision, patterns,
                       cast(DownloadState, r.state), r.bytes_done, r.bytes_total, r.error,
                       r.created_at, r.updated_at, r.finished_at)


# -- checks of the arguments -------------------------------------------------------------------


def check_one_of(name: str, value: str, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def check_text(name: str, value: str, max_length: int) -> None:
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise ValueError(f"{name} must be a non-empty string of at most {max_length} "
                         f"characters, not {value!r}")


def check_count(name: str, value: int | None, *, optional: bool = False) -> None:
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
