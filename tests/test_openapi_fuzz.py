"""Property-based fuzzing of the real server and agent against their own OpenAPI documents.

Both daemons run as processes (the ``kitt`` fixture); schemathesis loads each one's live
``/api/openapi.json`` and generates requests from it, positive (valid per the document)
and negative (invalid), for every operation: over 1,000 per app, derandomized, so a
failure reproduces. Every response must be non-5xx (ARCHITECTURE.md §4: "a 5xx is a
bug") and pass every schemathesis check: status code, content type, headers and body
against the document (SSE frames included), valid input accepted, invalid input
refused, and auth enforced (``ignored_auth`` replays each 2xx without and with a bad
token). The few failures a document cannot prevent are tolerated one by one, each with
its reason, and printed; nothing else is.

The admin token goes to user endpoints, a probe agent's token to the agent channel, and
the agent's push key to the agent, so that cases reach the handlers, not just the auth
check. The agent is fuzzed first; on the server, cases that change state (submitting
tests, revoking tokens, removing or revoking agents) come after the others.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import flask
import httpx
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.errors import FailureGroup

from conftest import Kitt, wait_for
from kitt.agent.openapi_spec import agent_openapi
from kitt.openapi import Operation, Reply, build_document, install_openapi
from kitt.protocol import TestRequest
from kitt.server.api.openapi_spec import server_openapi
from kitt.tokens import push_key

# At least this many generated cases per app; the budgets below add up to a little more,
# because Hypothesis may stop early on an operation whose input space it has exhausted.
MIN_CASES = 1000
REQUEST_TIMEOUT_S = 10
CONFIG = {
    "seed": 20261127,
    "request-timeout": REQUEST_TIMEOUT_S,
    # A live log stream never ends by itself; a few events prove it is an event stream.
    "max-stream-events": 3,
    "checks": {
        # 413 (body over 1 MiB) is a refusal too: a too-long string can make the body so.
        "negative_data_rejection": {
            "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429],
        },
    },
    "generation": {
        # Both apps ignore query parameters and body fields they do not know, on purpose
        # (protocol.py: a newer agent must be able to talk to an older server), so an
        # extra one is not invalid input and need not be refused.
        "allow-extra-parameters": False,
        # The tokens are ours to send (see the test); schemathesis must not generate or
        # drop the Authorization header, or our header would undo its negative case.
        # The ignored_auth check still probes every 2xx without and with a bad token.
        "with-security-parameters": False,
    },
}
# Every check schemathesis has, except those named here with the reason.
EXCLUDED_CHECKS: dict[str, str] = {}
# What jsonapi's catch-all handlers say when no route matched the path, or its method.
UNROUTED = re.compile(r'"error":\s*"(no such endpoint|method \w+ not allowed on) ')
# Failure classes of the checks that tolerances name, for schemathesis < 4.31.
FAILURE_CHECKS = {
    "RejectedPositiveData": "positive_data_acceptance",
    "AcceptedNegativeData": "negative_data_rejection",
}
LOG_STREAMS = ("GET /api/v1/tests/{test_id}/logs", "GET /api/logs/{command_id}")
# Operations that change or remove what other operations read: fuzzed last, in this order.
LAST = (
    "POST /api/v1/tests",
    "POST /api/v1/tests/{test_id}/cancel",
    "DELETE /api/v1/tokens/{token_id}",
    "POST /api/v1/agents/{id_or_name}/revoke",
    "DELETE /api/v1/agents/{id_or_name}",
)


@dataclass
class Budget:
    """Hypothesis ``max_examples`` per operation and generation mode."""

    positive: int
    negative: int


@dataclass
class Report:
    """What was sent and what went wrong, kept whole so one run reports every problem."""

    app: str
    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    # The first request that got each (operation, status): what to replay by hand.
    examples: dict[tuple[str, int], str] = field(default_factory=dict)
    server_errors: dict[tuple[str, int], str] = field(default_factory=dict)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)
    # Operations in the document, and those the app routed at least once (a documented
    # route the app lacks answers every case with the catch-all 404 or a 405).
    operations: list[str] = field(default_factory=list)
    routed: set[str] = field(default_factory=set)
    # (check, operation, reason) -> how many failures of that check were let through.
    tolerated: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def summary(self) -> str:
        lines = [f"{self.app}: {self.total} generated cases in {self.seconds:.1f} s"]
        for label, count in self.sent.items():
            codes = sorted((s, n) for (lbl, s), n in self.statuses.items() if lbl == label)
            lines.append(f"  {count:5d}  {label:55s} " + " ".join(f"{s}x{n}" for s, n in codes))
        return "\n".join(lines)


@dataclass
class Target:
    """One live app to fuzz, with how many cases each operation gets and what to send."""

    name: str
    base_url: str
    default: Budget
    budgets: dict[str, Budget] = field(default_factory=dict)
    # Authorization header per operation (by its schemathesis APIOperation).
    headers_for: Callable[[Any], dict[str, str]] = lambda operation: {}
    # Variants of fixed inputs (``as_strategy`` keyword arguments, e.g. path_parameters);
    # the operation's budget is shared among them. ``{}``: everything generated.
    fixed_for: Callable[[Any], list[dict[str, Any]]] = lambda operation: [{}]
    # Why a check's failure on this case and response is expected, or None: a failure.
    tolerate: Callable[[str, Any, int, str], str | None] = lambda check, case, status, body: None
    # Sees every case and its answer, after the checks (for tolerances that need history).
    observe: Callable[[Any, int], None] = lambda case, status: None


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _read_admin_token(kitt: Kitt) -> str | None:
    path = kitt.home / "server" / "admin-token"
    return path.read_text().strip() or None if path.exists() else None


def _agent_token(kitt: Kitt) -> str | None:
    path = kitt.home / "agent.yaml"
    if not path.exists():
        return None
    token = (yaml.safe_load(path.read_text()) or {}).get("token")
    return str(token) if token else None


@dataclass
class Probe:
    """Objects of our own on the server, so that some cases name things that exist.

    Random ids almost never match anything, so without these every case on
    ``/agents/{id}`` or ``/tests/{id}`` would end at 404: no handler past its lookup and
    no real AgentDetail, TestInfo or TokenInfo checked against the document. The probe
    agent also gives an agent token, without which every agent-channel case stops at 401.
    """

    name: str = "fuzz-probe"
    token: str | None = None
    agent_id: str | None = None
    test_id: str | None = None  # queued, for the agent channel to move along
    ended_test_id: str | None = None  # failed, with two log lines: its SSE stream ends
    token_id: str | None = None

    def path_parameters(self) -> dict[str, str]:
        known = {
            "agent_id": self.agent_id,
            "test_id": self.test_id,
            "token_id": self.token_id,
            "id_or_name": self.name if self.agent_id else None,
        }
        return {key: value for key, value in known.items() if value}


def _make_probe(kitt: Kitt, admin: str | None) -> Probe:
    """Register the probe agent with a bootstrap token and queue it a test, as far as the
    server lets us (mid-change, or with auth off, some steps may not exist)."""
    probe = Probe()
    if admin is None:
        return probe
    auth = _bearer(admin)
    created = kitt.api("POST", "/api/v1/tokens", json={"uses": 2, "note": "fuzz"}, headers=auth)
    if created.status_code != 201:
        return probe
    probe.token_id = str(created.json()["id"])
    register = {
        "name": probe.name,
        "hostname": probe.name,
        "port": 9,  # discard: pushes to it fail at once, so its test stays queued
        "kitt_version": "0",
        "capabilities": ["fuzz-bench"],
    }
    registered = kitt.api(
        "POST", "/api/v1/agents/register", json=register,
        headers=_bearer(str(created.json()["token"])),
    )  # fmt: skip
    if registered.status_code != 201 or not registered.json().get("token"):
        return probe
    probe.token = str(registered.json()["token"])
    probe.agent_id = str(registered.json()["agent_id"])
    test = {"agent": probe.name, "benchmark": "fuzz-bench"}
    ids = []
    for _ in range(2):
        submitted = kitt.api("POST", "/api/v1/tests", json=test, headers=auth)
        if submitted.status_code != 202:
            return probe
        ids.append(str(submitted.json()["id"]))
    probe.test_id = ids[0]
    as_probe = _bearer(probe.token)
    channel = f"/api/v1/agents/{probe.agent_id}/tests/{ids[1]}"
    lines = [{"seq": n, "ts": "2026-01-01T00:00:00Z", "line": f"line {n}"} for n in (1, 2)]
    shipped = kitt.api("POST", f"{channel}/logs", json={"lines": lines}, headers=as_probe)
    ended = kitt.api("POST", f"{channel}/status", json={"status": "failed"}, headers=as_probe)
    if shipped.status_code == ended.status_code == 200:
        probe.ended_test_id = ids[1]
    return probe


def _security(operation: Any) -> set[str]:
    return {name for alt in operation.definition.raw.get("security", []) for name in alt}


def _ordered(schema: Any) -> list[Any]:
    """Read-only operations first, then the ones that change state, the destructive last."""
    ops = [result.ok() for result in schema.get_all_operations()]

    def rank(op: Any) -> tuple[int, int]:
        if op.label in LAST:
            return (2, LAST.index(op.label))
        return (0 if op.method.upper() == "GET" else 1, 0)

    return sorted(ops, key=rank)


def _negatable(operation: Any, fixed: dict[str, Any]) -> bool:
    """Whether anything is left to make invalid once ``fixed`` inputs are set."""
    raw = operation.definition.raw
    if raw.get("requestBody"):
        return True
    free = [p for p in raw.get("parameters", []) if p["in"] != "path"]
    pinned = fixed.get("path_parameters") or {}
    path = [p for p in raw.get("parameters", []) if p["in"] == "path" and p["name"] not in pinned]
    return bool(free or path)


def _fuzz(target: Target) -> Report:
    """Every operation of ``target``'s live document, positive then negative cases."""
    url = f"{target.base_url}/api/openapi.json"
    served = httpx.get(url, timeout=REQUEST_TIMEOUT_S)
    assert served.status_code == 200, (
        f"the {target.name} does not serve its OpenAPI document ({served.status_code} from "
        f"{url}): its app factory must call kitt.openapi.install_openapi"
    )
    schema = schemathesis.openapi.from_url(
        url, config=schemathesis.Config.from_dict(CONFIG), timeout=REQUEST_TIMEOUT_S
    )
    report = Report(target.name)
    started = time.monotonic()
    with requests.Session() as session:
        for operation in _ordered(schema):
            report.operations.append(operation.label)
            plan = target.budgets.get(operation.label, target.default)
            variants = target.fixed_for(operation)
            for mode, examples in (
                (GenerationMode.POSITIVE, plan.positive),
                (GenerationMode.NEGATIVE, plan.negative),
            ):
                for fixed in variants:
                    if examples <= 0 or (mode.is_negative and not _negatable(operation, fixed)):
                        continue
                    _run_cases(
                        report,
                        target,
                        operation.as_strategy(generation_mode=mode, **fixed),
                        max(1, examples // len(variants)),
                        session,
                        target.headers_for(operation),
                    )
    report.seconds = time.monotonic() - started
    return report


def _check_name(failure: Any) -> str:
    """The check that reported ``failure`` (4.30 failures do not name it: map the class)."""
    checks = getattr(failure, "checks", ())
    if checks:
        return ",".join(checks)
    return FAILURE_CHECKS.get(type(failure).__name__, type(failure).__name__)


def _shorten(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _run_cases(
    report: Report,
    target: Target,
    strategy: Any,
    examples: int,
    session: requests.Session,
    headers: dict[str, str],
) -> None:
    """Send up to ``examples`` cases drawn from ``strategy``; record, never raise, problems.

    Recording instead of raising keeps Hypothesis from shrinking (more requests, more
    time) and lets one run list every distinct problem, not just the first.
    """
    excluded = [getattr(schemathesis.checks, name) for name in EXCLUDED_CHECKS]
    base_url = target.base_url

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=strategy)
    def one(case: Any) -> None:
        label = case.operation.label
        response = case.call(base_url=base_url, session=session, headers=headers)
        status = response.status_code
        report.sent[label] += 1
        report.statuses[(label, status)] += 1
        curl = _shorten(case.as_curl_command(headers=headers, base_url=base_url))
        # Some replies are binary (the agent wheel): read every body leniently.
        text = response.content.decode("utf-8", "replace")
        report.examples.setdefault((label, status), f"{curl}\n      -> {text[:300]}")
        if not UNROUTED.search(text):
            report.routed.add(label)
        if status >= 500:
            report.server_errors.setdefault((label, status), f"{curl}\n  -> {text[:500]}")
        try:
            case.validate_response(
                response,
                excluded_checks=excluded,
                headers=headers,
                transport_kwargs={"base_url": base_url, "session": session, "headers": headers},
            )
        except FailureGroup as group:
            for failure in group.exceptions:
                check = _check_name(failure)
                reason = target.tolerate(check, case, status, text)
                if reason is not None:
                    report.tolerated[(check, label, reason)] += 1
                    continue
                report.failures.setdefault(
                    (check, label),
                    f"{failure.title}: {failure.message[:800]}\n  {status} to: {curl}",
                )
        target.observe(case, status)

    one()


def _server_tolerance(check: str, case: Any, status: int, body: str) -> str | None:
    """Check failures that the document cannot prevent, each with why."""
    label = case.operation.label
    if check == "negative_data_rejection" and status == 200 and label in LOG_STREAMS:
        if (case.query or {}).get("format") == "text":
            return "?format=text dumps the whole log: `after`/Last-Event-ID are not read"
        if "Last-Event-ID" in (case.headers or {}):
            return "a valid Last-Event-ID wins: `after` is not read (sse.resume_after)"
    if check != "positive_data_acceptance" or status != 400:
        return None
    if label == "POST /api/v1/agents/{agent_id}/tests/{test_id}/logs" and "increasing" in body:
        return "seq numbers must increase within a batch: beyond JSON Schema"
    if label in ("POST /api/v1/agents/enroll", "POST /api/v1/agents/renew"):
        if "plain HTTP" in body:
            return "the fixture's server runs plain HTTP: no CA, so a documented 400"
        if "certificate request refused" in body:
            return "a schema-valid string is not a CSR: PEM content is beyond JSON Schema"
    if label == "POST /api/v1/tests" and "has no benchmark" in body:
        return "the named agent does not offer that benchmark (its configuration): a 400"
    return None


class CommandLedger:
    """What the fuzz has told the agent so far, to tell expected 202s from bugs.

    The agent acknowledges and drops, without reading the payload, a ``run_test`` whose
    command_id it already took or whose test it was told to cancel (at-least-once
    delivery, ``JobManager.handle``); so a bad payload in such a command rightly gets 202.
    """

    def __init__(self) -> None:
        self.commands: set[str] = set()
        self.cancelled: set[str] = set()

    @staticmethod
    def _body(case: Any) -> dict[str, Any]:
        if case.operation.label == "POST /api/commands" and isinstance(case.body, dict):
            return case.body
        return {}

    def observe(self, case: Any, status: int) -> None:
        body = self._body(case)
        if body.get("type") == "cancel" and status in (202, 404):
            self.cancelled.add(str(body.get("test_id")))
        if body.get("type") == "run_test" and status == 202:
            self.commands.add(str(body.get("command_id")))

    def tolerate(self, check: str, case: Any, status: int, text: str) -> str | None:
        body = self._body(case)
        if not body:
            return None
        if check == "positive_data_acceptance" and status == 400 and "unknown benchmark" in text:
            return "the benchmarks an agent offers are its configuration: a documented 400"
        dropped = (
            str(body.get("test_id")) in self.cancelled
            or str(body.get("command_id")) in self.commands
        )
        if check == "negative_data_rejection" and status == 202 and dropped:
            return "run_test for a cancelled test or a known command_id: dropped unread"
        return None


def _verdict(*reports: Report) -> None:
    """Print everything first, then fail on the first app with a problem."""
    for report in reports:
        print("\n" + report.summary())
        for (label, status), example in sorted(report.examples.items()):
            print(f"  first {status} on {label}: {example}")
        for (check, label, reason), count in report.tolerated.items():
            print(f"  tolerated {count}x {check} on {label}: {reason}")
        for (label, status), example in report.server_errors.items():
            print(f"  5xx {status} on {label}:\n    {example}")
        for (check, label), example in report.failures.items():
            print(f"  check {check} failed on {label}:\n    {example}")
    for report in reports:
        assert report.total >= MIN_CASES, f"{report.app}: only {report.total} cases were sent"
        assert not report.server_errors, f"{report.app}: 5xx: {sorted(report.server_errors)}"
        assert not report.failures, f"{report.app}: check failures: {sorted(report.failures)}"
        unrouted = [label for label in report.operations if label not in report.routed]
        assert not unrouted, f"{report.app}: documented but not served: {unrouted}"


@pytest.fixture
def fleet(kitt: Kitt) -> Iterator[Kitt]:
    """A running server and agent (the agent registered, if the server let it)."""
    kitt.start_server()
    kitt.init_agent()
    kitt.run("agent", "start", check=True)
    wait_for(lambda: httpx.get(kitt.agent_url + "/api/health", timeout=2).status_code == 200,
             what="the agent's API")  # fmt: skip
    with contextlib.suppress(pytest.fail.Exception):
        wait_for(lambda: kitt.agent_status()["registered"], timeout=10, what="registration")
    yield kitt


# About 45 s on 2 cores with schemathesis 4.32 (90 s with 4.30, what Python 3.10 gets).
@pytest.mark.timeout(240)
def test_fuzz_agent_and_server_against_their_openapi(fleet: Kitt) -> None:
    admin = _read_admin_token(fleet)
    agent_token = _agent_token(fleet)
    # The agent takes only the push key derived from its token (what the server sends);
    # with no token of its own it checks nothing (then the admin token, if any, is sent).
    agent_key = push_key(agent_token) if agent_token else admin
    ledger = CommandLedger()
    agent = _fuzz(
        Target(
            "agent",
            fleet.agent_url,
            default=Budget(1, 0),
            budgets={
                "POST /api/commands": Budget(positive=450, negative=300),
                "GET /api/logs/{command_id}": Budget(positive=300, negative=150),
            },
            headers_for=lambda operation: _bearer(agent_key),
            tolerate=ledger.tolerate,
            observe=ledger.observe,
        )
    )
    # The agent goes first: the server's destructive cases could remove or revoke it.
    probe = _make_probe(fleet, admin)

    def server_headers(operation: Any) -> dict[str, str]:
        security = _security(operation)
        if "agentToken" in security and "adminToken" not in security and probe.token:
            return _bearer(probe.token)
        return _bearer(admin)

    def server_fixed(operation: Any) -> list[dict[str, Any]]:
        # Half the cases of an operation with ids in its path name the probe's objects,
        # the other half generated ids. A live log stream never ends, so the queued
        # test's log is read as plain text, and the ended test's as an event stream.
        names = {p["name"] for p in operation.definition.raw.get("parameters", [])
                 if p["in"] == "path"}  # fmt: skip
        known = {k: v for k, v in probe.path_parameters().items() if k in names}
        if not names or set(known) != names:
            return [{}]
        if operation.label != "GET /api/v1/tests/{test_id}/logs":
            return [{}, {"path_parameters": known}]
        variants: list[dict[str, Any]] = [
            {},
            {"path_parameters": known, "query": {"format": "text"}},
        ]
        if probe.ended_test_id:
            variants.append({"path_parameters": {"test_id": probe.ended_test_id}})
        return variants

    server = _fuzz(
        Target(
            "server",
            fleet.server_url,
            default=Budget(positive=50, negative=30),
            budgets={
                label: Budget(1, 0)
                for label in (
                    "GET /api/v1/health",
                    "GET /api/v1/ca.pem",
                    "GET /api/openapi.json",
                    "GET /api/v1/agents",
                    "GET /api/v1/tokens",
                )
            },
            headers_for=server_headers,
            fixed_for=server_fixed,
            tolerate=_server_tolerance,
        )
    )
    _verdict(agent, server)


# --- the documents themselves, without processes ------------------------------------------


@pytest.mark.parametrize("build", [server_openapi, agent_openapi], ids=["server", "agent"])
def test_documents_are_valid_openapi_31(build: Callable[[], dict[str, Any]]) -> None:
    document = build()
    validate(document)  # the OpenAPI 3.1 meta-schema, and every $ref resolves
    assert document["openapi"] == "3.1.0"
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            # Every operation states its security, even if open: no inherited default.
            assert "security" in operation, f"{method} {path}"
            for status, reply in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = reply["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, f"{method} {path}"


def test_document_says_what_pydantic_enforces_on_dict_keys() -> None:
    # pydantic renders dict[ParamKey, ...] as patternProperties only, which would let any
    # other key through on paper; the validator refuses it, so the document must too.
    params = server_openapi()["components"]["schemas"]["TestRequest"]["properties"]["params"]
    assert params["additionalProperties"] is False
    with pytest.raises(ValidationError):
        TestRequest.model_validate({"agent": "a", "benchmark": "b", "params": {"1bad": 1}})


def test_builder_refuses_spec_mistakes() -> None:
    ok = {200: Reply("ok")}

    def build(*operations: Operation) -> None:
        build_document(title="t", version="1", description="d", operations=operations)

    with pytest.raises(ValueError, match="duplicate operation"):
        build(Operation("get", "/a", "s", "one", ok), Operation("get", "/a", "s", "two", ok))
    with pytest.raises(ValueError, match="path parameters"):
        build(Operation("get", "/a/{x}", "s", "one", ok))
    with pytest.raises(ValueError, match="undefined security scheme"):
        build(Operation("get", "/a", "s", "one", ok, security=(("nope",),)))


def test_install_openapi_serves_the_document_once_built() -> None:
    calls: list[int] = []

    def document() -> dict[str, Any]:
        calls.append(1)
        return agent_openapi()

    app = flask.Flask("probe")
    install_openapi(app, document)
    client = app.test_client()
    first, second = client.get("/api/openapi.json"), client.get("/api/openapi.json")
    assert first.status_code == second.status_code == 200
    assert first.mimetype == "application/json"
    assert first.get_json()["info"]["title"] == "KITT agent"
    assert len(calls) == 1
