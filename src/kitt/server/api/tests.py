"""Endpoints users call about tests: submit, list, show, cancel."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from kitt import sse
from kitt.jsonapi import ApiFailure, check_id, dump, int_arg, parse_body
from kitt.protocol import ANY_AGENT, SERVING_BENCHMARK, TERMINAL_STATUSES, TestInfo, TestRequest
from kitt.server.auth import auth, require_admin
from kitt.server.dispatcher import Dispatcher
from kitt.server.events import EventHub
from kitt.server.lifecycle import IllegalTransitionError
from kitt.server.store.agents import AgentStore
from kitt.server.store.logs import LogStore
from kitt.server.store.models import Agent, TestRun
from kitt.server.store.tests import TestStore
from kitt.sse import resume_after

bp = Blueprint("tests", __name__, url_prefix="/api/v1/tests")
bp.before_request(require_admin)

PAGE = 1000
KEEPALIVE_S = 15.0
STATUSES = ("queued", "dispatched", "running", "completed", "failed", "cancelled", "lost")


def _tests() -> TestStore:
    return current_app.extensions["kitt.tests"]  # type: ignore[no-any-return]


def _agents() -> AgentStore:
    return current_app.extensions["kitt.agents"]  # type: ignore[no-any-return]


def _dispatcher() -> Dispatcher:
    return current_app.extensions["kitt.dispatcher"]  # type: ignore[no-any-return]


def info(test: TestRun) -> TestInfo:
    return TestInfo.model_validate(test, from_attributes=True)


def _offers(agent: Agent, benchmark: str, engine: str | None = None) -> bool:
    """The agent advertises the benchmark, and for the built-in ``serving`` benchmark the
    engine it must start: agents list those as ``engine:<name>`` capabilities. (A custom
    benchmark gets ``engine`` as a plain label, as before.)"""
    if benchmark not in agent.capabilities:
        return False
    if engine is None or benchmark != SERVING_BENCHMARK:
        return True
    return f"engine:{engine}" in agent.capabilities


def _engines(agent: Agent) -> str:
    names = [c.removeprefix("engine:") for c in agent.capabilities if c.startswith("engine:")]
    return ", ".join(names) or "none"


class AgentChoiceError(ApiFailure):
    """No agent named by the request can run it. ``field`` is the request field at fault,
    so the dashboard's form shows the message beside it (the API sends the message)."""

    def __init__(self, status: int, message: str, field: str) -> None:
        super().__init__(status, message)
        self.field = field


def pick_agent(req: TestRequest) -> Agent:
    """The agent that will run ``req``: the one it names, if that agent offers the
    benchmark and engine, or with ``any`` an idle online one that does. One rule for the
    REST API and the dashboard's form."""
    if req.agent != ANY_AGENT:
        agent = _agents().find(req.agent)
        if agent is None:
            raise AgentChoiceError(404, f"no agent with id or name {req.agent!r}", "agent")
        if not _offers(agent, req.benchmark):
            offered = ", ".join(c for c in agent.capabilities if ":" not in c) or "none"
            raise AgentChoiceError(
                400,
                f"agent {agent.name} has no benchmark {req.benchmark!r} (it offers: {offered})",
                "benchmark",
            )
        if not _offers(agent, req.benchmark, req.engine):
            raise AgentChoiceError(
                400,
                f"agent {agent.name} cannot start engine {req.engine!r} "
                f"(engines found on it: {_engines(agent)})",
                "engine",
            )
        return agent
    gpu = (req.gpu or "").lower()
    candidates = [
        a
        for a in _agents().list_agents()
        if a.online
        and a.status == "idle"
        and _offers(a, req.benchmark, req.engine)
        and gpu in (a.gpu_info or "").lower()
        and not _tests().has_active(a.id)
    ]
    if not candidates:
        gpu_note = f" with a GPU matching {req.gpu!r}" if req.gpu else ""
        engine_note = f" with engine {req.engine!r}" if req.engine else ""
        raise AgentChoiceError(
            409,
            f"no idle online agent{gpu_note} offers benchmark {req.benchmark!r}{engine_note}; "
            "try later",
            "agent",
        )
    # The agent given a test least recently (or never) spreads work across the fleet.
    last = _tests().last_assigned()
    never = datetime.min.replace(tzinfo=timezone.utc)
    return min(candidates, key=lambda a: (last.get(a.id, never), a.name))


def queue_test(req: TestRequest, agent: Agent) -> TestRun:
    """Store the test for ``agent`` (from :func:`pick_agent`) and wake its dispatcher."""
    test = _tests().create(
        agent_id=agent.id,
        agent_name=agent.name,
        benchmark=req.benchmark,
        engine=req.engine,
        model=req.model,
        params=dict(req.params),
        created_at=datetime.now(timezone.utc),
    )
    current_app.logger.info("test %s queued for %s: %s", test.id, agent.name, req.benchmark)
    _dispatcher().wake(agent.id)
    return test


@bp.post("")
def submit() -> Any:
    req = parse_body(TestRequest)
    return dump(info(queue_test(req, pick_agent(req))), 202)


@bp.get("")
def list_tests() -> Response:
    status = request.args.get("status")
    if status and status not in STATUSES:
        raise ApiFailure(400, f"'status' must be one of {', '.join(STATUSES)}")
    limit = int_arg("limit", 50, 1, 1000)
    tests = _tests().query(status=status, agent=request.args.get("agent"), limit=limit)
    return jsonify(tests=[info(t).model_dump(mode="json") for t in tests])


def find_test(test_id: str) -> TestRun:
    check_id(test_id, "test id")
    test = _tests().get(test_id)
    if test is None:
        raise ApiFailure(404, f"no test {test_id!r}")
    return test


@bp.get("/<test_id>")
def show(test_id: str) -> Any:
    return dump(info(find_test(test_id)))


@bp.get("/<test_id>/logs")
def logs(test_id: str) -> Any:
    """SSE (stored lines, then live; ``Last-Event-ID`` resumes; ``status`` events when the
    test's state changes), or ``?format=text``."""
    test = find_test(test_id)
    store: LogStore = current_app.extensions["kitt.logs"]
    form = request.args.get("format")
    if form == "text":
        return Response(_text(store, test.id), mimetype="text/plain; charset=utf-8")
    if form is not None:
        raise ApiFailure(400, f"format must be 'text' (or left out for SSE), got {form[:40]!r}")
    after = resume_after()
    hub: EventHub = current_app.extensions["kitt.events"]
    slots: sse.StreamSlots = current_app.extensions["kitt.streams"]
    return slots.stream(auth().signed_in_while(_log_frames(store, _tests(), hub, test.id, after)))


def _text(store: LogStore, test_id: str) -> Iterator[str]:
    after = 0
    while rows := store.read(test_id, after, PAGE):
        yield "".join(f"{r.line}\n" for r in rows)
        after = rows[-1].seq


STATUS_FIELDS = {"status", "cancel_requested", "error", "dispatched_at", "started_at",
                 "finished_at"}  # fmt: skip


def _status_data(test: TestRun) -> dict[str, Any]:
    return {"test_id": test.id, **info(test).model_dump(mode="json", include=STATUS_FIELDS)}


def _log_frames(
    store: LogStore, tests: TestStore, hub: EventHub, test_id: str, after: int
) -> Iterator[str]:
    wake = hub.subscribe(test_id)  # before the first read: nothing can slip in between
    seen: tuple[str, bool] | None = None
    try:
        while True:
            wake.clear()
            # Status before rows: if it had ended already, every line is stored by now
            # (agents ship lines before the final report), so an empty read means the end.
            test = tests.get(test_id)
            ended = test is None or test.status in TERMINAL_STATUSES
            if test is not None:
                # The hub wakes this topic on status changes too: a page following the
                # log learns of them at once. Only changes after connecting (a client
                # reads the state it starts from), and without an id (ids are lines).
                state = (test.status, test.cancel_requested)
                if seen is not None and state != seen:
                    yield sse.event("status", _status_data(test))
                seen = state
            rows = store.read(test_id, after, PAGE)
            if rows:
                # One write per page, not per line: a chunked write per line caps the stream
                # at a few thousand lines/s.
                yield "".join(
                    sse.event("log", {"test_id": test_id, "seq": r.seq, "ts": r.ts, "line": r.line},
                              r.seq)
                    for r in rows
                )  # fmt: skip
                after = rows[-1].seq
                continue
            if ended or hub.closed:
                status = test.status if test else "deleted"
                yield sse.event("end", {"test_id": test_id, "status": status, "last_seq": after})
                return
            if not wake.wait(KEEPALIVE_S):
                yield sse.KEEPALIVE
    finally:
        hub.unsubscribe(test_id, wake)


@bp.post("/<test_id>/cancel")
def cancel(test_id: str) -> Any:
    test = find_test(test_id)
    try:
        test = _tests().request_cancel(test.id, datetime.now(timezone.utc))
    except IllegalTransitionError as exc:
        raise ApiFailure(409, f"test {test_id} has already ended ({exc.current})") from None
    if test.agent_id:
        if test.status == "cancelled":
            _dispatcher().refresh(test.agent_id)
        else:
            _dispatcher().wake(test.agent_id)
    return dump(info(test), 202)
