"""test logs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "test_logs",
        sa.Column(
            "test_id",
            sa.String(64),
            sa.ForeignKey("tests.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        # Up to protocol.MAX_SEQ (2**62): BIGINT on PostgreSQL; SQLite's INTEGER is 64-bit.
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("ts", sa.String(40), nullable=False),
        sa.Column("line", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("test_logs")
