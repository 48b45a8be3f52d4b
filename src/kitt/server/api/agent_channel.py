"""Endpoints agents call: enroll, register, heartbeat, renew, and reports on their tests.

Each one authenticates the caller first (:mod:`kitt.server.auth`), before it parses the
body or writes anything.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from cryptography import x509
from flask import Blueprint, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from kitt import pki
from kitt.jsonapi import ApiFailure, check_id, dump, parse_body
from kitt.protocol import (
    CertificateIssued,
    EnrollRequest,
    EnrollResponse,
    Heartbeat,
    HeartbeatResponse,
    LogBatch,
    RegisterRequest,
    RegisterResponse,
    RenewRequest,
    ResultReport,
    TestStatusReport,
)
from kitt.server.auth import auth
from kitt.server.certs import ServerCerts
from kitt.server.dispatcher import Dispatcher
from kitt.server.events import EventHub
from kitt.server.lifecycle import IllegalTransitionError
from kitt.server.metrics import metrics
from kitt.server.settings import ServerSettings
from kitt.server.store.agents import AgentStore, BeatRecord, HeartbeatWriter
from kitt.server.store.credentials import CredentialError, CredentialStore, Issued
from kitt.server.store.db import describe_error
from kitt.server.store.group_commit import WriterStoppedError
from kitt.server.store.logs import LogStore
from kitt.server.store.models import TestRun
from kitt.server.store.results import InvalidResultError, fleet_row, stage
from kitt.server.store.tests import TestStore

bp = Blueprint("agent_channel", __name__, url_prefix="/api/v1/agents")


def _store() -> AgentStore:
    return current_app.extensions["kitt.agents"]  # type: ignore[no-any-return]


def _settings() -> ServerSettings:
    return current_app.extensions["kitt.settings"]  # type: ignore[no-any-return]


def _credentials() -> CredentialStore:
    return auth().credentials


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _certs() -> ServerCerts:
    certs: ServerCerts | None = current_app.extensions["kitt.certs"]
    if certs is None:
        raise ApiFailure(
            400,
            "this server runs plain HTTP and issues no certificates: agents register with "
            "their bootstrap token directly (or start the server with --tls)",
        )
    return certs


def _sign(csr_pem: str, name: str) -> x509.Certificate:
    """Sign the CSR (after checking it) or answer 400. Nothing is recorded here: a
    certificate only counts once its credential is stored, and is only handed out then."""
    try:
        return _certs().issuer().sign_agent_csr(csr_pem, name, _settings().agent_cert_lifetime)
    except pki.PkiError as exc:
        raise ApiFailure(400, f"certificate request refused: {exc}") from None


@bp.post("/enroll")
def enroll() -> Any:
    """A new agent's first call: a bootstrap token and a CSR in, its cert and token out."""
    certs = _certs()
    bootstrap = auth().presented_token()
    if bootstrap is None:
        raise ApiFailure(401, "enrollment needs a bootstrap token (kitt server token create)")
    req = parse_body(EnrollRequest)
    cert = _sign(req.csr_pem, req.name)  # a bad CSR is refused before the token is spent
    try:
        issued = _credentials().issue(bootstrap, req.name, _now(), pki.cert_record(cert))
    except CredentialError as exc:
        raise ApiFailure(exc.status, exc.message) from None
    current_app.logger.info("agent %s enrolled (%s)", req.name, request.remote_addr)
    return dump(
        EnrollResponse(
            name=req.name,
            token=issued.token,
            cert_pem=pki.cert_pem(cert).decode(),
            ca_pem=certs.ca.read_text(),
            not_after=cert.not_valid_after_utc,
        ),
        201,
    )


@bp.post("/renew")
def renew() -> Any:
    """A fresh certificate for the calling agent, authenticated by its current one."""
    certs = _certs()
    identity = auth().require_agent()
    if identity is None:
        raise ApiFailure(400, "renewal needs an agent token; this server runs with --no-auth")
    req = parse_body(RenewRequest)
    cert = _sign(req.csr_pem, identity.name)
    serial, not_after = pki.cert_record(cert)
    _credentials().record_cert(identity.name, serial, not_after)
    current_app.logger.info("agent %s renewed its certificate (until %s)", identity.name, not_after)
    return dump(
        CertificateIssued(
            cert_pem=pki.cert_pem(cert).decode(), ca_pem=certs.ca.read_text(), not_after=not_after
        )
    )


def _registration_identity(name: str) -> Issued | None:
    """Check who is registering; a bootstrap token (plain HTTP only) issues a token."""
    policy = auth()
    if not policy.enabled:
        return None
    token = policy.presented_token()
    if token is None:
        raise ApiFailure(401, "registration needs a bootstrap or agent token")
    identity = policy.credentials.identify(token)
    if identity is not None:
        if identity.name != name:
            raise ApiFailure(403, f"this token belongs to agent {identity.name!r}, not {name!r}")
        policy.require_agent_cert(name)
        return None
    if policy.tls:
        raise ApiFailure(
            401,
            "agent token not accepted; on an HTTPS server a new agent enrolls first: "
            "kitt-agent init --server https://… --token BOOTSTRAP_TOKEN",
        )
    try:
        return policy.credentials.issue(token, name, _now())
    except CredentialError as exc:
        raise ApiFailure(exc.status, exc.message) from None


@bp.post("/register")
def register() -> Any:
    req = parse_body(RegisterRequest)
    issued = _registration_identity(req.name)
    agent_id, created = _store().register(req, request.remote_addr, _now())
    current_app.logger.info(
        "agent %s %s (id %s, %s, %d GPU)",
        req.name,
        "registered" if created else "re-registered",
        agent_id,
        request.remote_addr,
        req.gpu_count,
    )
    # A restarting agent applies its pushed settings at once, not a heartbeat later.
    pushed = _store().settings_of(agent_id) or {}
    return dump(
        RegisterResponse(
            agent_id=agent_id,
            heartbeat_interval_s=_interval(pushed),
            token=issued.token if issued is not None else None,
            settings=pushed,
        ),
        201,
    )


def _interval(pushed: dict[str, Any]) -> float:
    """The agent's own heartbeat interval when one was pushed, else the server's."""
    interval = pushed.get("heartbeat_interval_s")
    return float(interval) if interval else _settings().heartbeat_interval_s


@bp.post("/<agent_id>/heartbeat")
def heartbeat(agent_id: str) -> Any:
    check_id(agent_id, "agent id")
    auth().require_agent(agent_id)
    beat = parse_body(Heartbeat)
    writer: HeartbeatWriter = current_app.extensions["kitt.heartbeats"]
    try:
        pushed = writer.submit(BeatRecord(agent_id, datetime.now(timezone.utc), beat))
    except (WriterStoppedError, TimeoutError, SQLAlchemyError) as exc:
        # The agent retries at its next interval; nothing it needs is lost meanwhile.
        # The cause goes to the server's log, not to the agent: a database error's text
        # carries SQL and other agents' values.
        current_app.logger.warning("heartbeat of %s not stored: %s", agent_id, describe_error(exc))
        raise ApiFailure(503, "heartbeat not stored (the server is busy); try again") from exc
    if pushed is None:
        raise ApiFailure(404, f"unknown agent id {agent_id!r}: register again")
    metrics().heartbeats.inc()
    dispatcher: Dispatcher = current_app.extensions["kitt.dispatcher"]
    return dump(
        HeartbeatResponse(
            heartbeat_interval_s=_interval(pushed),
            commands=dispatcher.for_heartbeat(agent_id, beat.status),
            settings=pushed,
        )
    )


def _own_test(agent_id: str, test_id: str) -> TestRun:
    """The test, if it belongs to this agent: an agent may only report on its own tests."""
    check_id(agent_id, "agent id")
    check_id(test_id, "test id")
    auth().require_agent(agent_id)
    tests: TestStore = current_app.extensions["kitt.tests"]
    test = tests.get(test_id)
    if test is None:
        raise ApiFailure(404, f"no test {test_id!r}")
    if test.agent_id != agent_id:
        raise ApiFailure(403, f"test {test_id} does not belong to agent {agent_id}")
    return test


def _apply(
    test: TestRun, status: str, within: Callable[[Session], None] | None = None, **fields: Any
) -> tuple[TestRun, bool]:
    tests: TestStore = current_app.extensions["kitt.tests"]
    dispatcher: Dispatcher = current_app.extensions["kitt.dispatcher"]
    try:
        updated, changed = tests.transition(test.id, status, within=within, **fields)
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
        metrics().log_lines.inc(stored)
        hub: EventHub = current_app.extensions["kitt.events"]
        hub.notify(test.id)
    return jsonify(ack=True, stored=stored, last_seq=seqs[-1])


@bp.post("/<agent_id>/results")
def result(agent_id: str) -> Any:
    check_id(agent_id, "agent id")
    auth().require_agent(agent_id)
    report = parse_body(ResultReport)
    test = _own_test(agent_id, report.test_id)
    if report.command_id != test.command_id:
        raise ApiFailure(
            400, f"command_id {report.command_id!r} is not the command of test {test.id}"
        )
    updated, changed = _apply(
        test,
        report.status,
        _result_index(test, report),
        result=report.result,
        error=report.error,
        finished_at=report.finished_at or datetime.now(timezone.utc),
    )
    if changed:
        metrics().results.labels(report.status).inc()
    return jsonify(ack=True, test_id=test.id, status=updated.status, changed=changed), 202


def _result_index(test: TestRun, report: ResultReport) -> Callable[[Session], None] | None:
    """What stores a completed serving result in ``bench_results``, in the transaction
    that completes its test. A broken document stays on the test only, with a warning."""
    if report.status != "completed":
        return None
    try:
        row = fleet_row(test, report.result, datetime.now(timezone.utc))
    except InvalidResultError as exc:
        current_app.logger.warning("test %s: result not indexed: %s", test.id, exc)
        return None
    return None if row is None else lambda session: stage(session, row)
