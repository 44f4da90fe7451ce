"""Model workers: where the gateway that owns a model runs its worker.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Several gateways sharing one PostgreSQL database (``modelhost.cluster``): the owner of a
version of a model (the gateway holding its advisory lock) publishes its worker's address
here, and the others relay to it. Unused on SQLite (one gateway).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_workers",
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("gateway_id", sa.String(length=128), nullable=False),
        sa.Column("address", sa.String(length=512), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_id", "version", name=op.f("pk_model_workers")),
    )


def downgrade() -> None:
    op.drop_table("model_workers")
