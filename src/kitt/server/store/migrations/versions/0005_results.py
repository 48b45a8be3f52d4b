"""bench_results (serving benchmark results, whole and indexed)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

METRICS = (
    "best_output_token_throughput",
    "request_throughput",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "tpot_ms_p50",
    "tpot_ms_p99",
    "itl_ms_p50",
    "e2e_ms_p50",
    "goodput",
    "error_rate",
)
INDEXED = ("agent_name", "model", "engine", "gpu_model", "created_at")


def upgrade() -> None:
    op.create_table(
        "bench_results",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("test_id", sa.String(64)),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("agent_name", sa.String(256)),
        sa.Column("model", sa.String(256)),
        sa.Column("engine", sa.String(256)),
        sa.Column("engine_version", sa.String(256)),
        sa.Column("gpu_model", sa.String(256)),
        sa.Column("gpu_count", sa.Integer),
        sa.Column("hardware_fingerprint", sa.String(256)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("best_step", sa.String(256)),
        *(sa.Column(name, sa.Float) for name in METRICS),
        sa.Column("document", sa.Text, nullable=False),
    )
    for column in INDEXED:
        op.create_index(f"ix_bench_results_{column}", "bench_results", [column])


def downgrade() -> None:
    op.drop_table("bench_results")
