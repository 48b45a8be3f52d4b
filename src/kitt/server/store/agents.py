"""Queries about agents and their heartbeats.

The heartbeat path is the hottest write in the system (one per agent every interval),
so it is two Core statements in one transaction and no ORM object loading.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from pydantic import TypeAdapter
from sqlalchemy import (
    Engine,
    Float,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.orm import sessionmaker

from kitt.protocol import (
    MISSED_HEARTBEATS_OFFLINE,
    SETTING_RANGES,
    GpuSample,
    Heartbeat,
    RegisterRequest,
)
from kitt.server.store.db import is_postgres
from kitt.server.store.group_commit import GroupCommit
from kitt.server.store.models import Agent, HeartbeatSample
from kitt.server.store.retention import delete_in_batches

_AGENT = cast(Table, Agent.__table__)
_HEARTBEAT = cast(Table, HeartbeatSample.__table__)


_LIVE_COLUMNS = (
    "status", "current_task", "uptime_s", "gpu_utilization_pct", "gpu_memory_used_gb",
    "cpu_percent", "ram_used_gb", "gpus",
)  # fmt: skip
_LIVE_UPDATE = (
    update(_AGENT)
    .where(_AGENT.c.id == bindparam("b_id"))
    .values(
        online=True,
        last_seen_at=bindparam("b_ts"),
        last_seen_epoch=bindparam("b_epoch"),
        kitt_version=func.coalesce(bindparam("b_version"), _AGENT.c.kitt_version),
        **{c: bindparam(f"b_{c}") for c in _LIVE_COLUMNS},
    )
)
# The agents' settings come back with the check that they exist: the heartbeat response
# carries them, and this read costs nothing extra on the hottest path.
_KNOWN_IDS = select(_AGENT.c.id, _AGENT.c.settings).where(
    _AGENT.c.id.in_(bindparam("ids", expanding=True))
)
_SAMPLE_INSERT = insert(_HEARTBEAT).values(
    agent_id=bindparam("b_id"),
    ts=bindparam("b_ts"),
    **{c: bindparam(f"b_{c}") for c in _LIVE_COLUMNS},
)


_GPU_LIST = TypeAdapter(list[GpuSample])


@dataclass(frozen=True, slots=True)
class BeatRecord:
    """One heartbeat as it will be written: which agent, when, and what it said."""

    agent_id: str
    ts: datetime
    beat: Heartbeat

    def params(self) -> dict[str, Any]:
        """Bind parameters for both statements (the INSERT ignores ``b_version`` and
        ``b_epoch``)."""
        b = self.beat
        return {
            "b_id": self.agent_id,
            "b_ts": self.ts,
            "b_epoch": self.ts.timestamp(),
            "b_version": b.kitt_version,
            "b_status": b.status,
            "b_current_task": b.current_task,
            "b_uptime_s": b.uptime_s,
            "b_gpu_utilization_pct": b.gpu_utilization_pct,
            "b_gpu_memory_used_gb": b.gpu_memory_used_gb,
            "b_cpu_percent": b.cpu_percent,
            "b_ram_used_gb": b.ram_used_gb,
            "b_gpus": _GPU_LIST.dump_json(b.gpus).decode(),
        }


# Per beat: its agent's pushed settings, or None when the agent is unknown.
HeartbeatWriter = GroupCommit[BeatRecord, dict[str, Any] | None]


def heartbeat_writer(store: AgentStore) -> HeartbeatWriter:
    return GroupCommit(store.record_beats, name="heartbeat-writer")


def new_agent_id() -> str:
    return f"agt_{uuid.uuid4().hex[:20]}"


class AgentStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self._postgres = is_postgres(engine)
        # Settings edits are read-modify-write: one at a time, so none is lost.
        self._settings_lock = threading.Lock()
        # Called after every committed change to what the fleet shows (registration,
        # heartbeats, going offline, removal): live streams wake on it and re-read.
        self.on_change: Callable[[], None] = lambda: None

    def register(
        self, req: RegisterRequest, address: str | None, now: datetime
    ) -> tuple[str, bool]:
        """Create the agent or refresh its facts; the name is the identity. Returns (id, new)."""
        facts: dict[str, Any] = {
            "hostname": req.hostname,
            "address": address,
            "port": req.port,
            "kitt_version": req.kitt_version,
            "gpu_info": req.gpu_info,
            "gpu_count": req.gpu_count,
            "cpu_info": req.cpu_info,
            "ram_gb": req.ram_gb,
            "hardware": req.hardware.model_dump(mode="json"),
            "capabilities": list(req.capabilities),
            "online": True,
            "last_seen_at": now,
            "last_seen_epoch": now.timestamp(),
        }
        with self.sessions.begin() as s:
            agent = s.scalars(select(Agent).where(Agent.name == req.name)).one_or_none()
            created = agent is None
            if agent is None:
                agent = Agent(
                    id=new_agent_id(), name=req.name, registered_at=now, status="idle",
                    gpus=[], **facts,
                )  # fmt: skip
                s.add(agent)
            else:
                for key, value in facts.items():
                    setattr(agent, key, value)
        self.on_change()
        return agent.id, created

    def record_beats(self, beats: Sequence[BeatRecord]) -> list[dict[str, Any] | None]:
        """Store live state and a history sample for each beat, in one transaction.

        Returns, per beat, its agent's pushed settings, or None where the agent does not
        exist (an unknown one is told to register). Statements are built once
        (:data:`_LIVE_UPDATE`, :data:`_SAMPLE_INSERT`) and run as executemany: building
        them per call cost more than the SQLite write itself.
        """
        ids = list({b.agent_id for b in beats})
        with self.engine.begin() as conn:
            known: dict[str, dict[str, Any]] = {
                row.id: row.settings or {} for row in conn.execute(_KNOWN_IDS, {"ids": ids})
            }
            rows = [b for b in beats if b.agent_id in known]
            if self._postgres:
                # Row locks taken in one order: two server instances writing batches that
                # share agents cannot deadlock (stable: one agent's beats keep their order).
                rows.sort(key=lambda b: b.agent_id)
            if rows:
                params = [b.params() for b in rows]
                conn.execute(_LIVE_UPDATE, params)
                conn.execute(_SAMPLE_INSERT, params)
        if rows:
            self.on_change()  # once per batch, after its commit
        return [known.get(b.agent_id) for b in beats]

    def settings_of(self, agent_id: str) -> dict[str, Any] | None:
        """The agent's pushed settings (flat keys), or None when there is no such agent."""
        with self.engine.connect() as conn:
            row = conn.execute(select(_AGENT.c.settings).where(_AGENT.c.id == agent_id)).first()
        return None if row is None else dict(row.settings or {})

    def update_settings(
        self, agent_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any] | None:
        """Replace the agent's settings with ``change(current)`` (which may raise to refuse
        the change); returns the new settings, or None when there is no such agent."""
        with self._settings_lock, self.engine.begin() as conn:
            # The lock serves within this process (and on SQLite); FOR UPDATE across
            # server instances on PostgreSQL (SQLite's SQL leaves it out).
            row = conn.execute(
                select(_AGENT.c.settings).where(_AGENT.c.id == agent_id).with_for_update()
            ).first()
            if row is None:
                return None
            new = change(dict(row.settings or {}))
            interval = new.get("heartbeat_interval_s")
            conn.execute(
                update(_AGENT)
                .where(_AGENT.c.id == agent_id)
                .values(settings=new, heartbeat_interval_s=interval)
            )
        return new

    def list_agents(self) -> list[Agent]:
        """Every agent, by name."""
        with self.sessions() as s:
            return list(s.scalars(select(Agent).order_by(Agent.name)))

    def find(self, id_or_name: str) -> Agent | None:
        with self.sessions() as s:
            query = select(Agent).where(or_(Agent.id == id_or_name, Agent.name == id_or_name))
            return s.scalars(query).first()

    def delete(self, agent_id: str) -> bool:
        with self.sessions.begin() as s:
            s.execute(delete(HeartbeatSample).where(HeartbeatSample.agent_id == agent_id))
            deleted: bool = s.execute(delete(Agent).where(Agent.id == agent_id)).rowcount > 0  # type: ignore[attr-defined]
        self.on_change()
        return deleted

    def heartbeats(
        self, agent_id: str, since: datetime | None, limit: int, until: datetime | None = None
    ) -> list[HeartbeatSample]:
        """The newest ``limit`` samples after ``since`` (and at or before ``until``: a
        past window, such as a finished test's run, is then not crowded out by the
        samples that came after it), returned oldest first."""
        query = select(HeartbeatSample).where(HeartbeatSample.agent_id == agent_id)
        if since is not None:
            query = query.where(HeartbeatSample.ts > since)
        if until is not None:
            query = query.where(HeartbeatSample.ts <= until)
        query = query.order_by(HeartbeatSample.ts.desc(), HeartbeatSample.id.desc()).limit(limit)
        with self.sessions() as s:
            return list(reversed(list(s.scalars(query))))

    def mark_offline(
        self, now: datetime, default_interval_s: float, counting_from: datetime
    ) -> list[tuple[str, float]]:
        """Agents online but silent for 3 of *their own* heartbeat intervals (their pushed
        one, else ``default_interval_s``) go offline; returns their names and allowances.

        Silence only counts from ``counting_from`` (the server's start). One query for the
        whole fleet (and one update for the agents it finds): the per-agent arithmetic runs
        in SQL, on numbers (epoch seconds), which SQLite and PostgreSQL do alike. The
        ``last_seen_at`` bound (no agent's allowance is shorter) lets the index skip the
        agents heard from recently.
        """
        interval = func.coalesce(_AGENT.c.heartbeat_interval_s, literal(default_interval_s, Float))
        allowance = interval * MISSED_HEARTBEATS_OFFLINE
        shortest = MISSED_HEARTBEATS_OFFLINE * min(
            default_interval_s, SETTING_RANGES["heartbeat_interval_s"][0]
        )
        silent = and_(
            _AGENT.c.online.is_(True),
            _AGENT.c.last_seen_at < now - timedelta(seconds=shortest),
            _AGENT.c.last_seen_epoch < literal(now.timestamp(), Float) - allowance,
            allowance <= literal((now - counting_from).total_seconds(), Float),
        )
        with self.engine.begin() as conn:
            if self._postgres:
                # One statement: of several server instances' reapers, exactly one reports
                # each agent (the others wait on its row lock, then find it offline).
                marked = update(_AGENT).where(silent).values(online=False)
                returned = marked.returning(_AGENT.c.name, allowance.label("allowance"))
                found = [(row.name, row.allowance) for row in conn.execute(returned)]
            else:
                found = [
                    (row.name, row.allowance)
                    for row in conn.execute(
                        select(_AGENT.c.name, allowance.label("allowance")).where(silent)
                    )
                ]
                if found:
                    conn.execute(update(_AGENT).where(silent).values(online=False))
        if found:
            self.on_change()
        return found

    def offline_since(self, cutoff: datetime) -> list[str]:
        """Ids of offline agents last seen before ``cutoff``."""
        query = select(Agent.id).where(Agent.online.is_(False), Agent.last_seen_at < cutoff)
        with self.sessions() as s:
            return list(s.scalars(query))

    def prune_heartbeats(self, older_than: datetime) -> int:
        """Delete history older than ``older_than`` (in batches: see store.retention)."""
        return delete_in_batches(
            self.engine, _HEARTBEAT, [_HEARTBEAT.c.id], _HEARTBEAT.c.ts < older_than
        )
