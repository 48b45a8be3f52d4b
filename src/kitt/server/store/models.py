"""Tables. Schema changes go through an Alembic revision in ``migrations/versions``."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite (no tz) and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=timezone.utc) if value is not None else None


class JsonText(TypeDecorator[Any]):
    """JSON kept as text, accepting text that is already encoded.

    Heartbeats arrive as pydantic models that encode themselves to JSON in Rust far
    faster than ``json.dumps``; this column takes that string as is (and encodes anything
    else), so the hottest write path never pays for encoding twice.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None or isinstance(value, str):
            return value
        return json.dumps(value, separators=(",", ":"))

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return json.loads(value) if value is not None else None


# 64-bit ids and sequence numbers: BIGINT on PostgreSQL, INTEGER on SQLite (64-bit there,
# and an INTEGER PRIMARY KEY is the rowid). Migrations 0001 and 0003 make them so.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    hostname: Mapped[str] = mapped_column(String(256))
    address: Mapped[str | None] = mapped_column(String(64))
    port: Mapped[int] = mapped_column(Integer)
    kitt_version: Mapped[str] = mapped_column(String(64))
    gpu_info: Mapped[str | None] = mapped_column(String(256))
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    cpu_info: Mapped[str | None] = mapped_column(String(256))
    ram_gb: Mapped[float | None] = mapped_column(Float)
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    capabilities: Mapped[list[str]] = mapped_column(JSON, default=list)
    registered_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Live state, overwritten by every heartbeat.
    online: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(16), default="idle")
    current_task: Mapped[str | None] = mapped_column(String(256))
    last_seen_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    uptime_s: Mapped[float | None] = mapped_column(Float)
    gpu_utilization_pct: Mapped[float | None] = mapped_column(Float)
    gpu_memory_used_gb: Mapped[float | None] = mapped_column(Float)
    cpu_percent: Mapped[float | None] = mapped_column(Float)
    ram_used_gb: Mapped[float | None] = mapped_column(Float)
    gpus: Mapped[list[dict[str, Any]]] = mapped_column(JsonText, default=list)
    # Settings pushed to this agent (flat keys, protocol.AgentSettings.flat()); its own
    # heartbeat interval and last_seen_at as epoch seconds are copied out for the reaper,
    # which does arithmetic on them in SQL (migration 0006 says why).
    settings: Mapped[dict[str, Any]] = mapped_column(JsonText, default=dict, server_default="{}")
    heartbeat_interval_s: Mapped[float | None] = mapped_column(Float)
    last_seen_epoch: Mapped[float | None] = mapped_column(Float)


class HeartbeatSample(Base):
    """Heartbeat history, pruned by the reaper after the retention period."""

    __tablename__ = "heartbeats"
    __table_args__ = (Index("ix_heartbeats_agent_ts", "agent_id", "ts"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(String(64), ForeignKey("agents.id", ondelete="CASCADE"))
    ts: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    status: Mapped[str] = mapped_column(String(16))
    current_task: Mapped[str | None] = mapped_column(String(256))
    uptime_s: Mapped[float] = mapped_column(Float)
    gpu_utilization_pct: Mapped[float | None] = mapped_column(Float)
    gpu_memory_used_gb: Mapped[float | None] = mapped_column(Float)
    cpu_percent: Mapped[float | None] = mapped_column(Float)
    ram_used_gb: Mapped[float | None] = mapped_column(Float)
    gpus: Mapped[list[dict[str, Any]]] = mapped_column(JsonText, default=list)


class TestRun(Base):
    """A submitted test. ``agent_name`` is kept so history survives removing the agent."""

    __tablename__ = "tests"
    __test__ = False

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    command_id: Mapped[str] = mapped_column(String(64), unique=True)
    agent_id: Mapped[str | None] = mapped_column(
        String(64), ForeignKey("agents.id", ondelete="SET NULL"), index=True
    )
    agent_name: Mapped[str] = mapped_column(String(64))
    benchmark: Mapped[str] = mapped_column(String(64))
    engine: Mapped[str | None] = mapped_column(String(256))
    model: Mapped[str | None] = mapped_column(String(256))
    params: Mapped[dict[str, Any]] = mapped_column(JsonText, default=dict)
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    result: Mapped[dict[str, Any] | None] = mapped_column(JsonText)


class TestLogLine(Base):
    """One line of a test's log; (test_id, seq) makes re-delivered batches harmless."""

    __tablename__ = "test_logs"
    __test__ = False

    test_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("tests.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigId, primary_key=True)
    ts: Mapped[str] = mapped_column(String(40))
    line: Mapped[str] = mapped_column(Text)


class AgentCredential(Base):
    """An agent's identity: its token (hashed) and its certificate, kept apart from the
    ``agents`` row (presence and facts) so that removing or re-registering an agent and
    revoking its credential are separate, explicit acts."""

    __tablename__ = "agent_credentials"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # SHA-256 of the agent token; NULL once revoked.
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    # What the server presents when it pushes to the agent (HMAC of the token): the
    # agent can check it, and it is useless for talking to the server as the agent.
    push_key: Mapped[str | None] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    cert_serial: Mapped[str | None] = mapped_column(String(64))
    cert_not_after: Mapped[datetime | None] = mapped_column(UtcDateTime)


class BootstrapToken(Base):
    """A token that lets a new agent enroll, a bounded number of times, until it expires."""

    __tablename__ = "bootstrap_tokens"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    note: Mapped[str | None] = mapped_column(String(128))


class BenchResult(Base):
    """A serving benchmark result: the whole document, plus the fields lists filter and
    sort by, copied out of it into indexed columns.

    ``id`` is the test id for a result an agent reported, and a hash of the document for
    an imported one (importing the same document again finds the same row).
    """

    __tablename__ = "bench_results"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    test_id: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    agent_name: Mapped[str | None] = mapped_column(String(256), index=True)
    model: Mapped[str | None] = mapped_column(String(256), index=True)
    engine: Mapped[str | None] = mapped_column(String(256), index=True)
    engine_version: Mapped[str | None] = mapped_column(String(256))
    gpu_model: Mapped[str | None] = mapped_column(String(256), index=True)
    gpu_count: Mapped[int | None] = mapped_column(Integer)
    hardware_fingerprint: Mapped[str | None] = mapped_column(String(256))
    # When the benchmark ran (the document's ``started_at``), else when it was stored.
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    best_step: Mapped[str | None] = mapped_column(String(256))
    best_output_token_throughput: Mapped[float | None] = mapped_column(Float)
    request_throughput: Mapped[float | None] = mapped_column(Float)
    ttft_ms_p50: Mapped[float | None] = mapped_column(Float)
    ttft_ms_p99: Mapped[float | None] = mapped_column(Float)
    tpot_ms_p50: Mapped[float | None] = mapped_column(Float)
    tpot_ms_p99: Mapped[float | None] = mapped_column(Float)
    itl_ms_p50: Mapped[float | None] = mapped_column(Float)
    e2e_ms_p50: Mapped[float | None] = mapped_column(Float)
    goodput: Mapped[float | None] = mapped_column(Float)
    error_rate: Mapped[float | None] = mapped_column(Float)
    document: Mapped[dict[str, Any]] = mapped_column(JsonText)


class WebSession(Base):
    """A dashboard login. The cookie carries a random secret; only its SHA-256 is kept,
    so a database dump opens no session. Logging out deletes the row, which ends the
    session at once (a signed cookie alone could not be taken back)."""

    __tablename__ = "web_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    # Which admin token opened it (a hash of its hash): a new admin token ends every
    # session opened with the old one.
    admin_fp: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class FleetIdentity(Base):
    """Facts every server instance on this database must share; today the fleet CA's
    fingerprint. An instance started with another CA (its identity files were not
    copied) would split the fleet: agents would fail TLS on every other connection."""

    __tablename__ = "fleet_identity"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime)
