"""Usage: what each key used of each model, by the hour.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

One table of counters (``modelhost.db.usage``), keyed by the key's id, the model and the
hour; the primary key is also the index the queries use (a time range, a key, a model).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("audio_seconds", sa.Float(), nullable=False),
        sa.Column("embedding_inputs", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key_id", "model", "hour", name=op.f("pk_usage")),
    )


def downgrade() -> None:
    op.drop_table("usage")
