"""Endpoints agents call: register and heartbeat."""

from __future__ import annotations

import itertools
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError

from kitt.jsonapi import ApiFailure, check_id, dump, parse_body
from kitt.protocol import (
    Heartbeat,
    HeartbeatResponse,
    LogBatch,
    RegisterRequest,
    RegisterResponse,
    ResultReport,
    TestStatusReport,
)
from kitt.server.dispatcher import Dispatcher
from kitt.server.events import EventHub
from kitt.server.lifecycle import IllegalTransitionError
from kitt.server.settings import ServerSettings
from kitt.server.store.agents import AgentStore, BeatRecord, HeartbeatWriter
from kitt.server.store.group_commit import WriterStoppedError
from kitt.server.store.logs import LogStore
from kitt.server.store.models import TestRun
from kitt.server.store.tests import TestStore

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
    dispatcher: Dispatcher = current_app.extensions["kitt.dispatcher"]
    return dump(
        HeartbeatResponse(
            heartbeat_interval_s=_settings().heartbeat_interval_s,
            commands=dispatcher.for_heartbeat(agent_id, beat.status),
        )
    )


def _own_test(agent_id: str, test_id: str) -> TestRun:
    """The test, if it belongs to this agent: an agent may only report on its own tests."""
    check_id(agent_id, "agent id")
    check_id(test_id, "test id")
    tests: TestStore = current_app.extensions["kitt.tests"]
    test = tests.get(test_id)
    if test is None:
        raise ApiFailure(404, f"no test {test_id!r}")
    if test.agent_id != agent_id:
        raise ApiFailure(403, f"test {test_id} does not belong to agent {agent_id}")
    return test


def _apply(test: TestRun, status: str, **fields: Any) -> tuple[TestRun, bool]:
    tests: TestStore = current_app.extensions["kitt.tests"]
    dispatcher: Dispatcher = current_app.extensions["kitt.dispatcher"]
    try:
        updated, changed = tests.transition(test.id, status, **fields)
    except IllegalTransitionError as exc:
        raise ApiFailure(409, str(exc)) from None
    if changed:
        current_app.logger.info("test %s is %s", test.id, status)
        if test.agent_id:
            dispatcher.refresh(test.agent_id)
    return updated, changed


@bp.post("/<agent_id>/tests/<test_id>/status")
def test_status(agent_id: str, test_id: str) -> Any:
    test = _own_test(agent_id, test_id)
    report = parse_body(TestStatusReport)
    now = datetime.now(timezone.utc)
    fields: dict[str, Any] = {"error": report.error}
    if report.status == "running":
        fields["started_at"] = report.started_at or now
    else:
        fields["finished_at"] = report.finished_at or now
    updated, changed = _apply(test, report.status, **fields)
    return jsonify(ack=True, test_id=test_id, status=updated.status, changed=changed)


@bp.post("/<agent_id>/tests/<test_id>/logs")
def test_logs(agent_id: str, test_id: str) -> Any:
    test = _own_test(agent_id, test_id)
    batch = parse_body(LogBatch)
    seqs = [line.seq for line in batch.lines]
    if any(b <= a for a, b in itertools.pairwise(seqs)):
        raise ApiFailure(400, "log lines in a batch must have strictly increasing seq numbers")
    logs: LogStore = current_app.extensions["kitt.logs"]
    stored = logs.ingest(test.id, [line.model_dump() for line in batch.lines])
    if stored:
        hub: EventHub = current_app.extensions["kitt.events"]
        hub.notify(test.id)
    return jsonify(ack=True, stored=stored, last_seq=seqs[-1])


@bp.post("/<agent_id>/results")
def result(agent_id: str) -> Any:
    check_id(agent_id, "agent id")
    report = parse_body(ResultReport)
    test = _own_test(agent_id, report.test_id)
    if report.command_id != test.command_id:
        raise ApiFailure(
            400, f"command_id {report.command_id!r} is not the command of test {test.id}"
        )
    updated, changed = _apply(
        test,
        report.status,
        result=report.result,
        error=report.error,
        finished_at=report.finished_at or datetime.now(timezone.utc),
    )
    return jsonify(ack=True, test_id=test.id, status=updated.status, changed=changed), 202
