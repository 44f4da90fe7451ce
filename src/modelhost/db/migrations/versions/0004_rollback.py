"""Rollbacks in the history of model specs: the `rollback` action and its reason.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

A revision may now be a `rollback` (an earlier version's spec given back: asked through the
admin API, or an update undone by its rollout), with a `reason`. SQLite cannot alter a CHECK
constraint: batch mode rebuilds the table, from the table as 0001 created it (`_BEFORE`)
rather than from reflection, so that no constraint is lost on the way.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = "action IN ('created', 'updated', 'deleted')"
_NEW = "action IN ('created', 'updated', 'deleted', 'rollback')"


def _table(action_check: str, reason: bool) -> sa.Table:
    """model_revisions as it is before the change (or after, for the downgrade)."""
    columns: list[sa.Column[object]] = [
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec", sa.Text(), nullable=True),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    ]
    if reason:
        columns.append(sa.Column("reason", sa.Text(), nullable=True))
    return sa.Table(
        "model_revisions", sa.MetaData(), *columns,
        sa.CheckConstraint("(action = 'deleted') = (spec IS NULL)",
                           name="ck_model_revisions_spec_iff_not_deleted"),
        sa.CheckConstraint(action_check, name="ck_model_revisions_action"),
        sa.ForeignKeyConstraint(["model_id"], ["models.model_id"],
                                name="fk_model_revisions_model_id_models"),
        sa.PrimaryKeyConstraint("id", name="pk_model_revisions"),
        sa.UniqueConstraint("model_id", "version",
                            name="uq_model_revisions_model_id_version"),
    )


def upgrade() -> None:
    with op.batch_alter_table("model_revisions", copy_from=_table(_OLD, reason=False)) as batch:
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch.drop_constraint(op.f("ck_model_revisions_action"), type_="check")
        batch.create_check_constraint(op.f("ck_model_revisions_action"), sa.text(_NEW))


def downgrade() -> None:
    # A rollback revision becomes an update (its reason is dropped with the column).
    op.execute("UPDATE model_revisions SET action = 'updated' WHERE action = 'rollback'")
    with op.batch_alter_table("model_revisions", copy_from=_table(_NEW, reason=True)) as batch:
        batch.drop_constraint(op.f("ck_model_revisions_action"), type_="check")
        batch.create_check_constraint(op.f("ck_model_revisions_action"), sa.text(_OLD))
        batch.drop_column("reason")
