"""State that several gateways share: model activity, sealed secrets, dashboard sessions.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

* ``model_activity``: when each gateway last used a model, so that the owner of its worker
  unloads it for idleness only when the whole cluster left it idle.
* ``model_secrets``: the secrets of models added through the admin API, sealed with the
  deployment's secret key, so that every gateway can serve them.
* ``dashboard_sessions``: signed-in dashboard sessions (a digest of the id, the key's id),
  valid on every gateway and across restarts.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_activity",
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("gateway_id", sa.String(length=128), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_id", "gateway_id", name=op.f("pk_model_activity")),
    )
    op.create_table(
        "model_secrets",
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("sealed", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_id", name=op.f("pk_model_secrets")),
    )
    op.create_table(
        "dashboard_sessions",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=True),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_dashboard_sessions")),
    )
    op.create_index("ix_dashboard_sessions_seen_at", "dashboard_sessions", ["seen_at"])


def downgrade() -> None:
    op.drop_index("ix_dashboard_sessions_seen_at", table_name="dashboard_sessions")
    op.drop_table("dashboard_sessions")
    op.drop_table("model_secrets")
    op.drop_table("model_activity")
