"""Queries about agents and their heartbeats.

The heartbeat path is the hottest write in the system (one per agent every interval),
so it is two Core statements in one transaction and no ORM object loading.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Engine, Table, delete, insert, or_, select, update
from sqlalchemy.orm import sessionmaker

from kitt.protocol import Heartbeat, RegisterRequest
from kitt.server.store.models import Agent, HeartbeatSample

_AGENT = cast(Table, Agent.__table__)
_HEARTBEAT = cast(Table, HeartbeatSample.__table__)


def new_agent_id() -> str:
    return f"agt_{uuid.uuid4().hex[:20]}"


class AgentStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

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
        }
        with self.sessions.begin() as s:
            agent = s.scalars(select(Agent).where(Agent.name == req.name)).one_or_none()
            if agent is not None:
                for key, value in facts.items():
                    setattr(agent, key, value)
                return agent.id, False
            agent = Agent(
                id=new_agent_id(),
                name=req.name,
                registered_at=now,
                status="idle",
                gpus=[],
                **facts,
            )
            s.add(agent)
            return agent.id, True

    def record_heartbeat(self, agent_id: str, beat: Heartbeat, now: datetime) -> bool:
        """Store the live state and one history sample. False when the agent is unknown."""
        gpus = [g.model_dump(mode="json") for g in beat.gpus]
        live = {
            "online": True,
            "status": beat.status,
            "current_task": beat.current_task,
            "last_seen_at": now,
            "uptime_s": beat.uptime_s,
            "gpu_utilization_pct": beat.gpu_utilization_pct,
            "gpu_memory_used_gb": beat.gpu_memory_used_gb,
            "cpu_percent": beat.cpu_percent,
            "ram_used_gb": beat.ram_used_gb,
            "gpus": gpus,
        }
        if beat.kitt_version:
            live["kitt_version"] = beat.kitt_version
        with self.engine.begin() as conn:
            updated = conn.execute(update(_AGENT).where(_AGENT.c.id == agent_id).values(live))
            if updated.rowcount == 0:
                return False
            conn.execute(
                insert(_HEARTBEAT).values(
                    agent_id=agent_id,
                    ts=now,
                    status=beat.status,
                    current_task=beat.current_task,
                    uptime_s=beat.uptime_s,
                    gpu_utilization_pct=beat.gpu_utilization_pct,
                    gpu_memory_used_gb=beat.gpu_memory_used_gb,
                    cpu_percent=beat.cpu_percent,
                    ram_used_gb=beat.ram_used_gb,
                    gpus=gpus,
                )
            )
        return True

    def list_agents(self) -> list[Agent]:
        with self.sessions() as s:
            return list(s.scalars(select(Agent).order_by(Agent.name)))

    def find(self, id_or_name: str) -> Agent | None:
        with self.sessions() as s:
            query = select(Agent).where(or_(Agent.id == id_or_name, Agent.name == id_or_name))
            return s.scalars(query).first()

    def delete(self, agent_id: str) -> bool:
        with self.sessions.begin() as s:
            s.execute(delete(HeartbeatSample).where(HeartbeatSample.agent_id == agent_id))
            return s.execute(delete(Agent).where(Agent.id == agent_id)).rowcount > 0  # type: ignore[attr-defined,no-any-return]

    def heartbeats(
        self, agent_id: str, since: datetime | None, limit: int
    ) -> list[HeartbeatSample]:
        """The newest ``limit`` samples (after ``since``), returned oldest first."""
        query = select(HeartbeatSample).where(HeartbeatSample.agent_id == agent_id)
        if since is not None:
            query = query.where(HeartbeatSample.ts > since)
        query = query.order_by(HeartbeatSample.ts.desc(), HeartbeatSample.id.desc()).limit(limit)
        with self.sessions() as s:
            return list(reversed(list(s.scalars(query))))

    def mark_offline(self, cutoff: datetime) -> list[str]:
        """Agents online but silent since before ``cutoff`` go offline; returns their names."""
        with self.sessions.begin() as s:
            names = list(
                s.scalars(
                    select(Agent.name).where(Agent.online.is_(True), Agent.last_seen_at < cutoff)
                )
            )
            if names:
                s.execute(
                    update(Agent)
                    .where(Agent.online.is_(True), Agent.last_seen_at < cutoff)
                    .values(online=False)
                )
            return names

    def prune_heartbeats(self, older_than: datetime) -> int:
        with self.engine.begin() as conn:
            return conn.execute(delete(_HEARTBEAT).where(_HEARTBEAT.c.ts < older_than)).rowcount
