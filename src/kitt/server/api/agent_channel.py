"""Endpoints agents call: register and heartbeat."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, current_app, request
from sqlalchemy.exc import SQLAlchemyError

from kitt.jsonapi import ApiFailure, check_id, dump, parse_body
from kitt.protocol import Heartbeat, HeartbeatResponse, RegisterRequest, RegisterResponse
from kitt.server.settings import ServerSettings
from kitt.server.store.agents import AgentStore, BeatRecord, HeartbeatWriter
from kitt.server.store.group_commit import WriterStoppedError

bp = Blueprint("agent_channel", __name__, url_prefix="/api/v1/agents")


def _store() -> AgentStore:
    return current_app.extensions["kitt.agents"]  # type: ignore[no-any-return]


def _settings() -> ServerSettings:
    return current_app.extensions["kitt.settings"]  # type: ignore[no-any-return]


@bp.post("/register")
def register() -> Any:
    req = parse_body(RegisterRequest)
    agent_id, created = _store().register(req, request.remote_addr, datetime.now(timezone.utc))
    current_app.logger.info(
        "agent %s %s (id %s, %s, %d GPU)",
        req.name,
        "registered" if created else "re-registered",
        agent_id,
        request.remote_addr,
        req.gpu_count,
    )
    return dump(
        RegisterResponse(agent_id=agent_id, heartbeat_interval_s=_settings().heartbeat_interval_s),
        201,
    )


@bp.post("/<agent_id>/heartbeat")
def heartbeat(agent_id: str) -> Any:
    check_id(agent_id, "agent id")
    beat = parse_body(Heartbeat)
    writer: HeartbeatWriter = current_app.extensions["kitt.heartbeats"]
    try:
        known = writer.submit(BeatRecord(agent_id, datetime.now(timezone.utc), beat))
    except (WriterStoppedError, TimeoutError, SQLAlchemyError) as exc:
        # The agent retries at its next interval; nothing it needs is lost meanwhile.
        raise ApiFailure(503, f"heartbeat not stored, try again: {exc}") from exc
    if not known:
        raise ApiFailure(404, f"unknown agent id {agent_id!r}: register again")
    return dump(HeartbeatResponse(heartbeat_interval_s=_settings().heartbeat_interval_s))
