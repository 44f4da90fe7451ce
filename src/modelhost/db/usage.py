"""Usage counters (the ``usage`` table), used by ``Store``: what each key used of each model,
by the hour.

The gateway adds to them (``add``) once a second, all of that second's counts in one
transaction, from what it accumulated in memory (``modelhost.usage.Ledger``): a row per
(key id, model, hour) is created or added to, never replaced, so two gateways sharing a
database add up. A key is only ever stored by its id (``auth.key_id``).

Reading (``query``) sums the rows whose hour starts in [since, until), grouped by any of the
key, the model and the hour or the day: the database sums by key, model and hour; days are
made of hours here, so that the same code runs on SQLite and PostgreSQL (a day's truncation
differs between them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.orm import Session

from modelhost.db.schema import MODEL_ID_LENGTH, USAGE_KEY_LENGTH, UsageRecord

# The counters of a row, in this order everywhere (the ledger's lists, the API's objects).
COUNTERS: Final = ("requests", "prompt_tokens", "completion_tokens", "audio_seconds",
                   "embedding_inputs")
GROUPS: Final = ("key", "model", "hour", "day")

Counts = list[float]
"""The counters of one (key id, model, hour), in the order of `COUNTERS`."""


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group's sums: `key`, `model` and `start` (hour or day) are None when not grouped
    by."""

    key: str | None
    model: str | None
    start: datetime | None
    counts: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of the admin API."""
        data: dict[str, Any] = {}
        if self.key is not None:
            data["key_id"] = self.key
        if self.model is not None:
            data["model"] = self.model
        if self.start is not None:
            data["start"] = self.start.isoformat().replace("+00:00", "Z")
        for name, value in zip(COUNTERS, self.counts, strict=True):
            data[name] = value if name == "audio_seconds" else int(value)
        return data


def hour_start(epoch_hour: int) -> datetime:
    return datetime.fromtimestamp(epoch_hour * 3600, UTC)


def add(session: Session, counts: Mapping[tuple[str, str, int], Counts]) -> int:
    """Add `counts` ({(key id, model, hour since the epoch): counters}) to the table;
    returns how many rows were touched."""
    for (key, model, hour), values in counts.items():
        pk = (key[:USAGE_KEY_LENGTH], model[:MODEL_ID_LENGTH], hour_start(hour))
        record = session.get(UsageRecord, pk)
        if record is None:
            record = UsageRecord(key_id=pk[0], model=pk[1], hour=pk[2], requests=0,
                                 prompt_tokens=0, completion_tokens=0, audio_seconds=0.0,
                                 embedding_inputs=0)
            session.add(record)
        record.requests += int(values[0])
        record.prompt_tokens += int(values[1])
        record.completion_tokens += int(values[2])
        record.audio_seconds += float(values[3])
        record.embedding_inputs += int(values[4])
    session.flush()
    return len(counts)


def query(session: Session, *, since: datetime | None = None, until: datetime | None = None,
          key: str | None = None, model: str | None = None,
          group_by: Iterable[str] = ("key", "model")) -> list[UsageRow]:
    """The sums of the rows whose hour starts in [since, until) (of one key id or model
    when asked), one per group, ordered by group."""
    groups = set(group_by)
    if not groups <= set(GROUPS) or {"hour", "day"} <= groups:
        raise ValueError(f"group_by: any of key, model and one of hour or day, not {groups}")
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and moment.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware")
    # Summed by the database over the groups asked (by hour for a day: its start is
    # truncated here, the same on every database).
    columns = [c for g, c in (("key", UsageRecord.key_id), ("model", UsageRecord.model),
                              ("hour", UsageRecord.hour), ("day", UsageRecord.hour))
               if g in groups]
    statement = sa.select(*columns, sa.func.sum(UsageRecord.requests),
                          sa.func.sum(UsageRecord.prompt_tokens),
                          sa.func.sum(UsageRecord.completion_tokens),
                          sa.func.sum(UsageRecord.audio_seconds),
                          sa.func.sum(UsageRecord.embedding_inputs))
    if columns:
        statement = statement.group_by(*columns)
    if since is not None:
        statement = statement.where(UsageRecord.hour >= since)
    if until is not None:
        statement = statement.where(UsageRecord.hour < until)
    if key is not None:
        statement = statement.where(UsageRecord.key_id == key)
    if model is not None:
        statement = statement.where(UsageRecord.model == model)
    sums: dict[tuple[str | None, str | None, datetime | None], list[float]] = {}
    for found in session.execute(statement):
        values = list(found)
        group_key = values.pop(0) if "key" in groups else None
        group_model = values.pop(0) if "model" in groups else None
        start = values.pop(0) if {"hour", "day"} & groups else None
        if values[0] is None:  # no row at all (a sum without groups)
            continue
        if start is not None and "day" in groups:
            start = _utc(start).replace(hour=0)
        elif start is not None:
            start = _utc(start)
        total = sums.setdefault((group_key, group_model, start), [0, 0, 0, 0.0, 0])
        for i, value in enumerate(values):
            total[i] += value or 0
    return [UsageRow(k, m, s, tuple(v)) for (k, m, s), v in
            sorted(sums.items(), key=lambda item: (item[0][2] or _EPOCH, item[0][0] or "",
                                                   item[0][1] or ""))]


_EPOCH = datetime.fromtimestamp(0, UTC)


def _utc(moment: datetime) -> datetime:
    """A grouped column comes back without the column type's processing on some databases."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
