"""tests (submitted benchmark runs)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tests",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("command_id", sa.String(64), nullable=False, unique=True),
        sa.Column(
            "agent_id",
            sa.String(64),
            sa.ForeignKey("agents.id", ondelete="SET NULL"),
        ),
        sa.Column("agent_name", sa.String(64), nullable=False),
        sa.Column("benchmark", sa.String(64), nullable=False),
        sa.Column("engine", sa.String(256)),
        sa.Column("model", sa.String(256)),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("dispatched_at", sa.DateTime),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("result", sa.Text),
    )
    op.create_index("ix_tests_agent_id", "tests", ["agent_id"])
    op.create_index("ix_tests_status", "tests", ["status"])
    op.create_index("ix_tests_created_at", "tests", ["created_at"])


def downgrade() -> None:
    op.drop_table("tests")
