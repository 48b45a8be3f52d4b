"""agents: settings pushed by the server, and what the reaper needs to honour them

``settings`` holds the agent's pushed settings (JSON, flat keys as ``kitt agents set``
names them). ``heartbeat_interval_s`` is copied out of it, and ``last_seen_epoch`` out of
``last_seen_at``, so that the reaper can find agents silent for 3 of *their own*
intervals with plain arithmetic in one SQL statement, the same on SQLite and PostgreSQL
(date arithmetic differs between them; numbers do not).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

from datetime import timezone

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("settings", sa.Text, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("heartbeat_interval_s", sa.Float, nullable=True))
        batch.add_column(sa.Column("last_seen_epoch", sa.Float, nullable=True))
    agents = sa.table(
        "agents",
        sa.column("id", sa.String),
        sa.column("last_seen_at", sa.DateTime),
        sa.column("last_seen_epoch", sa.Float),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(agents.c.id, agents.c.last_seen_at).where(agents.c.last_seen_at.is_not(None))
    ).all()
    if rows:
        # Stored naive, in UTC (models.UtcDateTime).
        conn.execute(
            agents.update()
            .where(agents.c.id == sa.bindparam("b_id"))
            .values(last_seen_epoch=sa.bindparam("b_epoch")),
            [
                {"b_id": r.id, "b_epoch": r.last_seen_at.replace(tzinfo=timezone.utc).timestamp()}
                for r in rows
            ],
        )


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("last_seen_epoch")
        batch.drop_column("heartbeat_interval_s")
        batch.drop_column("settings")
