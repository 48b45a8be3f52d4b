"""The server's OpenAPI 3.1 document: every route of ARCHITECTURE.md §4, described once.

Kept beside the blueprints so that whoever changes a route sees its description in the
same folder; ``tests/test_openapi_fuzz.py`` fuzzes a live server against this document,
so a description that no longer matches the code fails the suite.
"""

from __future__ import annotations

from kitt import __version__
from kitt.openapi import (
    EVENT_STREAM,
    ID_OR_NAME_PATTERN,
    PEM,
    TEXT,
    JsonSchema,
    Operation,
    Reply,
    array_of,
    bearer_scheme,
    build_document,
    error,
    event_stream,
    header_param,
    mutual_tls_scheme,
    obj,
    openapi_operation,
    path_param,
    query_param,
    sse_event,
    text,
)
from kitt.protocol import (
    MAX_SEQ,
    SETTING_RANGES,
    AgentDetail,
    AgentPackageInfo,
    AgentSettingsView,
    AgentSummary,
    CertificateIssued,
    EnrollRequest,
    EnrollResponse,
    Health,
    Heartbeat,
    HeartbeatRecord,
    HeartbeatResponse,
    LogBatch,
    RegisterRequest,
    RegisterResponse,
    RenewRequest,
    ResultDetail,
    ResultDocument,
    ResultImported,
    ResultReport,
    ResultRow,
    TestInfo,
    TestRequest,
    TestStatusReport,
    TokenCreate,
    TokenCreated,
    TokenInfo,
)

ADMIN = "adminToken"
AGENT = "agentToken"
BOOTSTRAP = "bootstrapToken"
CLIENT_CERT = "agentCertificate"

AS_ADMIN: tuple[tuple[str, ...], ...] = ((ADMIN,),)
AS_AGENT: tuple[tuple[str, ...], ...] = ((AGENT,),)

SECURITY_SCHEMES: dict[str, JsonSchema] = {
    ADMIN: bearer_scheme(
        "The admin token: `$KITT_HOME/server/admin-token`, created on the server's first start. "
        "For users, the CLI and the dashboard."
    ),
    AGENT: bearer_scheme(
        "A per-agent token, returned once at enrollment or first registration and stored "
        "server-side only as a hash. On an HTTPS server the agent also presents its client "
        "certificate (CN = agent name)."
    ),
    BOOTSTRAP: bearer_scheme(
        "A bootstrap token (`kitt server token create`, or `POST /api/v1/tokens`): limited "
        "uses and lifetime, only for enrolling or first registering an agent."
    ),
    CLIENT_CERT: mutual_tls_scheme(
        "The agent's client certificate, issued by this server's CA (HTTPS servers only)."
    ),
}

TAGS = {
    "meta": "Health, CA certificate and this document: open to anyone.",
    "agent-channel": "What agents call: enrollment, registration, heartbeats, test reports.",
    "fleet": "What users call about agents.",
    "tests": "What users call about tests.",
    "tokens": "Bootstrap tokens for enrolling agents.",
    "results": "Serving benchmark results: stored whole, listed by their main fields.",
    "install": "The agent software for new machines: open to anyone, holds no secrets.",
    "metrics": "Prometheus metrics: fleet gauges and this server process's counters.",
}
OPENMETRICS = "application/openmetrics-text"
SHELL = "text/x-shellscript"
BINARY = "application/octet-stream"
HTML = "text/html"
WHEEL_NAME = path_param("filename", "A wheel's file name, as listed by the wheelhouse index.")

AGENT_ID = path_param("agent_id", "The agent's id, as returned by registration.")
TEST_ID = path_param("test_id", "A test id.")
ID_OR_NAME = path_param(
    "id_or_name", "An agent's id or its name (e.g. `gpu-01.lab`).", ID_OR_NAME_PATTERN
)
TOKEN_ID = path_param("token_id", "A bootstrap token's id (not the token itself).")
RESULT_ID = path_param("result_id", "A result id (a test id, or `res_…` for an import).")
TEST_STATUSES = ["queued", "dispatched", "running", "completed", "failed", "cancelled", "lost"]
SEQ: JsonSchema = {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}


_STR: JsonSchema = {"type": "string"}
_BOOL: JsonSchema = {"type": "boolean"}
_INT: JsonSchema = {"type": "integer"}
_NULLABLE_STR: JsonSchema = {"type": ["string", "null"]}
_NULLABLE_TIME: JsonSchema = {"type": ["string", "null"], "format": "date-time"}
# The frames of a test's log stream (tests.py): ``status`` when the test's state changes
# while the stream is open.
TEST_LOG_EVENTS = event_stream(
    sse_event(
        "log",
        obj({"test_id": _STR, "seq": {"type": "integer", "minimum": 1}, "ts": _STR,
             "line": _STR}),
        numbered=True,
    ),
    sse_event(
        "status",
        obj({"test_id": _STR, "status": {"enum": TEST_STATUSES}, "cancel_requested": _BOOL,
             "error": _NULLABLE_STR, "dispatched_at": _NULLABLE_TIME,
             "started_at": _NULLABLE_TIME, "finished_at": _NULLABLE_TIME}),
    ),
    sse_event(
        "end",
        obj({"test_id": _STR, "status": {"enum": [*TEST_STATUSES, "deleted"]},
             "last_seq": {"type": "integer", "minimum": 0}}),
    ),
)  # fmt: skip
# The frames of the live fleet stream (fleet_events.py).
FLEET_EVENTS = event_stream(
    sse_event("snapshot", obj({"agents": array_of(AgentSummary)})),
    sse_event("agent", AgentSummary),
    sse_event("removed", obj({"id": _STR, "name": _STR})),
)


def _setting_schema(name: str, kind: str = "number") -> JsonSchema:
    low, high = SETTING_RANGES[name]
    return {"anyOf": [{"type": kind, "minimum": low, "maximum": high}, {"type": "null"}]}


# PATCH …/settings: protocol.AgentSettings, flat. Engine keys
# (`engines.<engine>.startup_timeout_s`) are valid only for engines the agent advertises,
# which no schema can say: they are described, not listed.
SETTINGS_PATCH: JsonSchema = {
    "type": "object",
    "properties": {
        "heartbeat_interval_s": _setting_schema("heartbeat_interval_s"),
        "log_batch_lines": _setting_schema("log_batch_lines", "integer"),
        "telemetry_interval_s": _setting_schema("telemetry_interval_s"),
    },
    "additionalProperties": False,
}
# The small envelopes the views build with jsonify(); see protocol.py for the models.
TEST_ACK = obj({"ack": _BOOL, "test_id": _STR, "status": {"enum": TEST_STATUSES}, "changed": _BOOL})


def operations() -> list[Operation]:
    """Every route the server serves, in the order a reader meets them."""
    return [
        # --- meta -------------------------------------------------------------------------
        Operation(
            "get", "/api/v1/health", "Liveness and version", "getHealth",
            {200: Reply("The server is up.", Health)}, tags=("meta",),
        ),
        Operation(
            "get", "/api/v1/ca.pem", "The server's CA certificate", "getCaCertificate",
            {
                200: text("The CA certificate, PEM.", PEM, TEXT),
                404: error("This server runs plain HTTP: it has no CA."),
            },
            tags=("meta",),
            description="Public by nature: `kitt-agent init --ca-fingerprint` fetches it and "
            "checks it against the fingerprint the operator gave out of band.",
        ),
        openapi_operation(tags=("meta",)),
        # --- agent software (issue 6) -------------------------------------------------------
        Operation(
            "get", "/api/v1/agent/install.sh", "The agent install script", "getInstallScript",
            {200: text("A bash script; this server's URL is its default --server.", SHELL)},
            tags=("install",),
            description="Static: no secrets in it, and fetching it changes nothing. "
            "`kitt agents add` prints the line that runs it.",
        ),
        Operation(
            "get", "/api/v1/agent/package.json", "What the agent package is", "getAgentPackageInfo",
            {200: Reply("Version, file name and SHA-256 of the agent wheel.", AgentPackageInfo),
             404: error("This server could not build the agent package.")},
            tags=("install",),
        ),
        Operation(
            "get", "/api/v1/agent/package", "The agent wheel", "getAgentPackage",
            {200: text("The wheel (`X-Kitt-Sha256` header: its SHA-256).", BINARY),
             404: error("This server could not build the agent package.")},
            tags=("install",),
        ),
        Operation(
            "get", "/api/v1/agent/wheels/", "The wheelhouse index", "getWheelhouse",
            {200: text("A pip --find-links page: one link per dependency wheel.", HTML)},
            tags=("install",),
        ),
        Operation(
            "get", "/api/v1/agent/wheels/{filename}", "One dependency wheel", "getWheel",
            {200: text("The wheel.", BINARY), 404: error("No such wheel in the wheelhouse.")},
            tags=("install",), params=(WHEEL_NAME,),
        ),
        # --- agent channel ------------------------------------------------------------------
        Operation(
            "post", "/api/v1/agents/enroll", "Enroll an agent: sign its CSR", "enrollAgent",
            {
                201: Reply("The signed certificate and the agent's own token.", EnrollResponse),
                400: error("Invalid body or CSR, or this server runs plain HTTP (no CA)."),
                401: error("No bootstrap token, or one that is unknown, used up or expired."),
                409: error("An agent of that name is already enrolled."),
            },
            tags=("agent-channel",), body=EnrollRequest, security=((BOOTSTRAP,),),
            description="HTTPS servers only. The token in the reply is returned once.",
        ),
        Operation(
            "post", "/api/v1/agents/register", "Register (or re-register) an agent",
            "registerAgent",
            {
                201: Reply("Registered; `token` is set only when a bootstrap token was used.",
                           RegisterResponse),
                409: error("The name was enrolled by another agent meanwhile."),
            },
            tags=("agent-channel",), body=RegisterRequest, security=((AGENT,), (BOOTSTRAP,)),
        ),
        Operation(
            "post", "/api/v1/agents/renew", "Renew the calling agent's certificate",
            "renewCertificate",
            {
                200: Reply("The new certificate.", CertificateIssued),
                400: error("Invalid body or CSR, or this server runs plain HTTP (no CA)."),
                403: error("No agent client certificate, or one for another agent."),
            },
            tags=("agent-channel",), body=RenewRequest, security=((AGENT, CLIENT_CERT),),
        ),
        Operation(
            "post", "/api/v1/agents/{agent_id}/heartbeat", "Report status and telemetry",
            "heartbeat",
            {
                200: Reply("Acknowledged, with any queued commands.", HeartbeatResponse),
                404: error("Unknown agent id: register again."),
                503: error("The heartbeat could not be stored now; retry next interval."),
            },
            tags=("agent-channel",), params=(AGENT_ID,), body=Heartbeat, security=AS_AGENT,
        ),
        Operation(
            "post", "/api/v1/agents/{agent_id}/tests/{test_id}/status",
            "Report a test's status (idempotent)", "reportTestStatus",
            {
                200: Reply("Applied, or already so (`changed` false).", TEST_ACK),
                403: error("The test is not this agent's, or the token may not do this."),
                404: error("No such test, or unknown agent id."),
                409: error("Illegal transition (e.g. the test has already ended)."),
            },
            tags=("agent-channel",), params=(AGENT_ID, TEST_ID), body=TestStatusReport,
            security=AS_AGENT,
        ),
        Operation(
            "post", "/api/v1/agents/{agent_id}/tests/{test_id}/logs",
            "Ship a batch of log lines (idempotent by seq)", "shipTestLogs",
            {
                200: Reply("Stored (lines already stored are skipped).",
                           obj({"ack": _BOOL, "stored": _INT, "last_seq": _INT})),
                400: error("Invalid body, or seq numbers that do not increase."),
                403: error("The test is not this agent's, or the token may not do this."),
                404: error("No such test, or unknown agent id."),
            },
            tags=("agent-channel",), params=(AGENT_ID, TEST_ID), body=LogBatch,
            security=AS_AGENT,
        ),
        Operation(
            "post", "/api/v1/agents/{agent_id}/results", "Report a test's result",
            "reportResult",
            {
                202: Reply("Accepted (idempotent by command_id).", TEST_ACK),
                400: error("Invalid body, or `command_id` is not the test's command."),
                403: error("The test is not this agent's, or the token may not do this."),
                404: error("No such test, or unknown agent id."),
                409: error("Illegal transition (e.g. the test has already ended)."),
            },
            tags=("agent-channel",), params=(AGENT_ID,), body=ResultReport, security=AS_AGENT,
        ),
        # --- fleet --------------------------------------------------------------------------
        Operation(
            "get", "/api/v1/agents", "List agents", "listAgents",
            {200: Reply("Every registered agent.", obj({"agents": array_of(AgentSummary)}))},
            tags=("fleet",), security=AS_ADMIN,
        ),
        Operation(
            "get", "/api/v1/agents/{id_or_name}", "Show one agent (never its token)",
            "showAgent",
            {200: Reply("The agent.", AgentDetail), 404: error("No such agent.")},
            tags=("fleet",), params=(ID_OR_NAME,), security=AS_ADMIN,
        ),
        Operation(
            "get", "/api/v1/agents/{id_or_name}/heartbeats", "An agent's heartbeat history",
            "agentHeartbeats",
            {
                200: Reply(
                    "The newest `limit` heartbeats, oldest first.",
                    obj({"agent_id": _STR, "heartbeats": array_of(HeartbeatRecord)}),
                ),
                400: error("`since` or `limit` is malformed."),
                404: error("No such agent."),
            },
            tags=("fleet",),
            params=(
                ID_OR_NAME,
                query_param("since", {"anyOf": [{"type": "string", "format": "date-time"},
                                                {"const": ""}]},
                            "Only heartbeats after this time (ISO 8601, with a zone); "
                            "empty: no limit."),
                query_param("limit", {"type": "integer", "minimum": 1, "maximum": 10_000,
                                      "default": 1000}, "At most this many, the newest."),
            ),
            security=AS_ADMIN,
        ),
        Operation(
            "get", "/api/v1/agents/{id_or_name}/settings", "An agent's pushed settings",
            "agentSettings",
            {
                200: Reply("`settings`: those set on the server; `effective`: every value in "
                           "force, defaults filled in.", AgentSettingsView),
                404: error("No such agent."),
            },
            tags=("fleet",), params=(ID_OR_NAME,), security=AS_ADMIN,
        ),
        Operation(
            "patch", "/api/v1/agents/{id_or_name}/settings", "Change an agent's settings",
            "setAgentSettings",
            {
                200: Reply("Stored; the agent applies them at its next heartbeat.",
                           AgentSettingsView),
                400: error("Malformed body, an unknown key, a key local to the agent "
                           "(set in its agent.yaml), a wrong type or a value out of range; "
                           "nothing is stored."),
                404: error("No such agent."),
            },
            tags=("fleet",), params=(ID_OR_NAME,), body=SETTINGS_PATCH, security=AS_ADMIN,
            description="`{key: value}` sets, `{key: null}` resets to the default. Keys: "
            "`heartbeat_interval_s` (5-300), `log_batch_lines` (1-5000), "
            "`telemetry_interval_s` (0.1-60), and `engines.<engine>.startup_timeout_s` "
            "(1-7200) for an engine the agent advertises (`engine:<name>`). Paths, "
            "binaries, endpoints and the like are the agent's own (agent.yaml): never "
            "pushable.",
        ),
        Operation(
            "delete", "/api/v1/agents/{id_or_name}", "Remove an agent", "removeAgent",
            {
                200: Reply("Removed; `closed_tests`: its unfinished tests, now closed.",
                           obj({"deleted": _STR, "name": _STR,
                               "closed_tests": {"type": "array", "items": _STR}})),
                404: error("No such agent."),
            },
            tags=("fleet",), params=(ID_OR_NAME,), security=AS_ADMIN,
        ),
        Operation(
            "post", "/api/v1/agents/{id_or_name}/revoke",
            "Revoke an agent's token (and certificate)", "revokeAgent",
            {
                200: Reply("Revoked.", obj({"revoked": {"const": True}, "name": _STR})),
                404: error("No such agent."),
            },
            tags=("fleet",), params=(ID_OR_NAME,), security=AS_ADMIN,
        ),
        Operation(
            "get", "/api/v1/fleet/events", "The fleet, live (SSE)", "fleetEvents",
            {
                200: Reply(
                    "`text/event-stream`: `event: snapshot` (every agent, as listed by "
                    "`GET /api/v1/agents`) on connect, then `event: agent` with an agent's "
                    "new summary whenever it changes and `event: removed` when one is "
                    "removed; at most two reads of the fleet a second; `: keepalive` "
                    "comments meanwhile. Ends when the server stops.",
                    bodies={EVENT_STREAM: FLEET_EVENTS},
                ),
                503: error("Too many live streams; retry shortly."),
            },
            tags=("fleet",), security=AS_ADMIN,
        ),
        # --- tests --------------------------------------------------------------------------
        Operation(
            "post", "/api/v1/tests", "Submit a test", "submitTest",
            {
                202: Reply("Queued; it is dispatched to the agent at once.", TestInfo),
                404: error("No such agent."),
                409: error("`agent: any` and no idle online agent offers the benchmark."),
            },
            tags=("tests",), body=TestRequest, security=AS_ADMIN,
            description="`agent` is a name, an id, or `any`. A named agent that does not "
            "offer the benchmark is a 400.",
        ),
        Operation(
            "get", "/api/v1/tests", "List tests, newest first", "listTests",
            {
                200: Reply("The tests.", obj({"tests": array_of(TestInfo)})),
                400: error("`status` or `limit` is malformed."),
            },
            tags=("tests",),
            params=(
                query_param("status", {"enum": [*TEST_STATUSES, ""]},
                            "Only tests in this state; empty: any."),
                query_param("agent", {"type": "string"},
                            "Only tests of this agent (id or name)."),
                query_param("limit", {"type": "integer", "minimum": 1, "maximum": 1000,
                                      "default": 50}, "At most this many."),
            ),
            security=AS_ADMIN,
        ),
        Operation(
            "get", "/api/v1/tests/{test_id}", "Show a test (with its result)", "showTest",
            {200: Reply("The test.", TestInfo), 404: error("No such test.")},
            tags=("tests",), params=(TEST_ID,), security=AS_ADMIN,
        ),
        Operation(
            "get", "/api/v1/tests/{test_id}/logs", "A test's log: SSE, or plain text",
            "testLogs",
            {
                200: Reply(
                    "`text/event-stream`: stored lines (`event: log`, `id: <seq>`), then live "
                    "ones, then `event: end`; `: keepalive` comments meanwhile, and "
                    "`event: status` (no id) whenever the test's status or cancel request "
                    "changes while the stream is open. "
                    "`text/plain` with `?format=text`: the stored lines, then the reply ends.",
                    bodies={EVENT_STREAM: TEST_LOG_EVENTS, TEXT: {"type": "string"}},
                ),
                400: error("`after` / `Last-Event-ID` is not a line number, or an unknown "
                           "`format`."),
                404: error("No such test."),
                503: error("Too many live log streams; retry shortly."),
            },
            tags=("tests",),
            params=(
                TEST_ID,
                query_param("format", {"enum": ["text"]},
                            "`text` for a plain-text dump; left out: SSE."),
                query_param("after", SEQ, "Resume after this line number."),
                header_param("Last-Event-ID", SEQ,
                             "Resume after this line number (what EventSource sends)."),
            ),
            security=AS_ADMIN,
        ),
        Operation(
            "post", "/api/v1/tests/{test_id}/cancel", "Cancel a test", "cancelTest",
            {
                202: Reply("Cancelled, or the agent is being told to stop it.", TestInfo),
                404: error("No such test."),
                409: error("The test has already ended."),
            },
            tags=("tests",), params=(TEST_ID,), security=AS_ADMIN,
        ),
        *result_operations(),
        # --- metrics (docs/metrics-prometheus.md) -------------------------------------------
        Operation(
            "get", "/metrics", "Prometheus metrics", "getMetrics",
            {
                200: text("The Prometheus text format (OpenMetrics when `Accept` asks for "
                          "it): `kitt_agents{state}`, `kitt_tests{status}`, "
                          "`kitt_heartbeats_total`, `kitt_dispatch_latency_seconds`, …",
                          TEXT, OPENMETRICS),
                503: error("The database did not answer; scrape again."),
            },
            tags=("metrics",), security=AS_ADMIN,
            description="Fleet gauges are read from the database at each scrape (the same on "
            "every server instance); counters and the histogram are this process's own.",
        ),
        # --- tokens -------------------------------------------------------------------------
        Operation(
            "post", "/api/v1/tokens", "Create a bootstrap token", "createToken",
            {201: Reply("The token (shown once) and its details.", TokenCreated)},
            tags=("tokens",), body=TokenCreate, security=AS_ADMIN,
        ),
        Operation(
            "get", "/api/v1/tokens", "List bootstrap tokens (never the secrets)", "listTokens",
            {200: Reply("Every bootstrap token.", obj({"tokens": array_of(TokenInfo)}))},
            tags=("tokens",), security=AS_ADMIN,
        ),
        Operation(
            "delete", "/api/v1/tokens/{token_id}", "Revoke a bootstrap token", "revokeToken",
            {200: Reply("Revoked.", TokenInfo), 404: error("No such token.")},
            tags=("tokens",), params=(TOKEN_ID,), security=AS_ADMIN,
        ),
    ]  # fmt: skip


# --- results --------------------------------------------------------------------------------

_TIME_OR_EMPTY: JsonSchema = {"anyOf": [{"type": "string", "format": "date-time"}, {"const": ""}]}


def result_operations() -> list[Operation]:
    """The results endpoints (api/results.py)."""
    text_filter = "exact match; empty: any."
    return [
        Operation(
            "get", "/api/v1/results", "List results, newest first (no documents)",
            "listResults",
            {
                200: Reply("The results' indexed fields.",
                           obj({"results": array_of(ResultRow)})),
                400: error("`since`, `until`, `limit` or `offset` is malformed."),
            },
            tags=("results",),
            params=(
                query_param("agent", {"type": "string"}, f"Agent name ({text_filter})"),
                query_param("model", {"type": "string"}, f"Model ({text_filter})"),
                query_param("engine", {"type": "string"}, f"Engine name ({text_filter})"),
                query_param("gpu", {"type": "string"},
                            "Part of the GPU model, any case (e.g. `h100`); empty: any."),
                query_param("since", _TIME_OR_EMPTY,
                            "Only results that ran at or after this time (ISO 8601, with "
                            "a zone); empty: no limit."),
                query_param("until", _TIME_OR_EMPTY,
                            "Only results that ran at or before this time; empty: no limit."),
                query_param("limit", {"type": "integer", "minimum": 1, "maximum": 1000,
                                      "default": 50}, "At most this many."),
                query_param("offset", {"type": "integer", "minimum": 0,
                                       "maximum": 1_000_000_000, "default": 0},
                            "Skip this many (paging)."),
            ),
            security=AS_ADMIN,
        ),
        Operation(
            "get", "/api/v1/results/{result_id}", "Show a result with its whole document",
            "showResult",
            {200: Reply("The result.", ResultDetail), 404: error("No such result.")},
            tags=("results",), params=(RESULT_ID,), security=AS_ADMIN,
        ),
        Operation(
            "post", "/api/v1/results", "Import a result document", "importResult",
            {
                201: Reply("Stored; its id is derived from the document's content.",
                           ResultImported),
                200: Reply("That very document is already stored: its id, `created` false.",
                           ResultImported),
                400: error("Not JSON, or not a serving result of a supported "
                           "`schema_version`, or a field of the wrong type."),
            },
            tags=("results",), body=ResultDocument, security=AS_ADMIN,
            description="The body is what `kitt bench serve --output FILE` writes; it is "
            "stored as sent, every field kept. Only `schema_version`, `kind` and `summary` "
            "are required.",
        ),
        Operation(
            "delete", "/api/v1/results/{result_id}", "Delete a result", "deleteResult",
            {
                200: Reply("Deleted (a fleet result's test keeps its copy).",
                           obj({"deleted": _STR})),
                404: error("No such result."),
            },
            tags=("results",), params=(RESULT_ID,), security=AS_ADMIN,
        ),
    ]  # fmt: skip


def server_openapi() -> JsonSchema:
    """The server's OpenAPI 3.1 document (served at ``GET /api/openapi.json``)."""
    return build_document(
        title="KITT server",
        version=__version__,
        description="The KITT control plane: agents enroll, register, heartbeat and report; "
        "users manage agents, tests and bootstrap tokens. Every error is "
        '`{"error": "message"}` with a 4xx status; bodies over 1 MiB are refused with 413.',
        operations=operations(),
        security_schemes=SECURITY_SCHEMES,
        tags=TAGS,
    )
