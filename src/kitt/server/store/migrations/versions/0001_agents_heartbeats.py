"""agents and heartbeat history

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Heartbeat ids and log sequence numbers outgrow 32 bits on a large fleet: BIGINT on
# PostgreSQL, INTEGER on SQLite (whose INTEGER is 64-bit, and an INTEGER PRIMARY KEY is
# the rowid, which BIGINT would not be).
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("hostname", sa.String(256), nullable=False),
        sa.Column("address", sa.String(64)),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("kitt_version", sa.String(64), nullable=False),
        sa.Column("gpu_info", sa.String(256)),
        sa.Column("gpu_count", sa.Integer, nullable=False),
        sa.Column("cpu_info", sa.String(256)),
        sa.Column("ram_gb", sa.Float),
        sa.Column("hardware", sa.JSON, nullable=False),
        sa.Column("capabilities", sa.JSON, nullable=False),
        sa.Column("registered_at", sa.DateTime, nullable=False),
        sa.Column("online", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("current_task", sa.String(256)),
        sa.Column("last_seen_at", sa.DateTime),
        sa.Column("uptime_s", sa.Float),
        sa.Column("gpu_utilization_pct", sa.Float),
        sa.Column("gpu_memory_used_gb", sa.Float),
        sa.Column("cpu_percent", sa.Float),
        sa.Column("ram_used_gb", sa.Float),
        sa.Column("gpus", sa.Text, nullable=False),
    )
    op.create_index("ix_agents_last_seen_at", "agents", ["last_seen_at"])
    op.create_table(
        "heartbeats",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column(
            "agent_id",
            sa.String(64),
            sa.ForeignKey("agents.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("ts", sa.DateTime, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("current_task", sa.String(256)),
        sa.Column("uptime_s", sa.Float, nullable=False),
        sa.Column("gpu_utilization_pct", sa.Float),
        sa.Column("gpu_memory_used_gb", sa.Float),
        sa.Column("cpu_percent", sa.Float),
        sa.Column("ram_used_gb", sa.Float),
        sa.Column("gpus", sa.Text, nullable=False),
    )
    op.create_index("ix_heartbeats_agent_ts", "heartbeats", ["agent_id", "ts"])
    op.create_index("ix_heartbeats_ts", "heartbeats", ["ts"])


def downgrade() -> None:
    op.drop_table("heartbeats")
    op.drop_table("agents")
