"""The agent's OpenAPI 3.1 document: the small API the server (and curious users) call.

Kept beside the agent's Flask app so that a route change and its description travel
together; ``tests/test_openapi_fuzz.py`` fuzzes a live agent against this document.
"""

from __future__ import annotations

from kitt import __version__
from kitt.openapi import (
    EVENT_STREAM,
    JsonSchema,
    Operation,
    Ref,
    Reply,
    bearer_scheme,
    build_document,
    error,
    event_stream,
    header_param,
    obj,
    openapi_operation,
    path_param,
    query_param,
    sse_event,
)
from kitt.protocol import (
    MAX_SEQ,
    AgentStatusReport,
    Command,
    CommandAccepted,
    Health,
    RunTestPayload,
)

PUSH_KEY = "serverPushKey"
SECURITY_SCHEMES: dict[str, JsonSchema] = {
    PUSH_KEY: bearer_scheme(
        "The server's push key for this agent: an HMAC derived from the agent's token "
        "(`kitt.tokens.push_key`), so the agent can check it without storing another secret "
        "and it is useless for talking to the server as the agent. Not required while the "
        "agent has no token (a --no-auth server on loopback). On an HTTPS agent the caller "
        "must also present a certificate with the server role."
    ),
}
SEQ: JsonSchema = {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}
_INT: JsonSchema = {"type": "integer"}
_STR: JsonSchema = {"type": "string"}
# The frames of a command's log stream (app.py).
LOG_EVENTS = event_stream(
    sse_event("log", obj({"command_id": _STR, "seq": _INT, "ts": _STR, "line": _STR}),
              numbered=True),
    sse_event("gap", obj({"command_id": _STR, "first": _INT, "last": _INT, "missed": _INT,
                          "recovered": {"type": "boolean"}})),
    sse_event("end", obj({"command_id": _STR, "status": _STR})),
)  # fmt: skip
# Command.payload is any object on the wire model (a cancel carries none); what a run_test
# needs in it is RunTestPayload, which the agent checks itself. Saying so here gives
# clients the real contract, and a fuzzer's valid cases a chance to get past it.
COMMAND_BODY: JsonSchema = {
    "allOf": [Ref(Command)],
    "oneOf": [
        {
            "properties": {"type": {"const": "run_test"}, "payload": Ref(RunTestPayload)},
            "required": ["type", "payload"],
        },
        {"properties": {"type": {"const": "cancel"}}, "required": ["type"]},
    ],
}


def operations() -> list[Operation]:
    """Every route the agent serves."""
    return [
        Operation(
            "get", "/api/health", "Liveness and version", "getHealth",
            {200: Reply("The agent is up.", Health)},
        ),
        Operation(
            "get", "/api/status", "What the agent is doing (no secrets)", "getStatus",
            {
                200: Reply("The agent's state.", AgentStatusReport),
                403: error("HTTPS agent: the certificate is neither the server's nor this "
                           "agent's own."),
            },
            description="Open on a plain-HTTP agent. On HTTPS the caller presents the "
            "server's certificate, or this agent's own (`kitt agent status`).",
        ),
        openapi_operation(),
        Operation(
            "post", "/api/commands", "Take a command from the server", "postCommand",
            {
                202: Reply("Accepted, or a duplicate command_id (dropped, at-least-once "
                           "delivery).", CommandAccepted),
                400: error("Invalid command or payload, or a benchmark this agent does not "
                           "offer."),
                404: error("`cancel` for a test that is not running on this agent."),
                409: error("Busy with another test, or shutting down."),
            },
            body=COMMAND_BODY, security=((PUSH_KEY,),),
            description="`run_test` starts a benchmark (a subprocess) when the agent is idle; "
            "`cancel` stops the test named by `test_id`.",
        ),
        Operation(
            "get", "/api/logs/{command_id}", "Follow a command's log (SSE)", "followLog",
            {
                200: Reply(
                    "`event: log` frames (`id: <seq>`), `event: gap` when a slow reader missed "
                    "lines, `event: end` with the final status, `: keepalive` comments "
                    "meanwhile. Served from the buffer after the job has ended.",
                    LOG_EVENTS,
                    (EVENT_STREAM,),
                ),
                400: error("Malformed command id or `after` / `Last-Event-ID`."),
                404: error("No log for that command on this agent."),
                503: error("Too many live log streams; retry shortly."),
            },
            params=(
                path_param("command_id", "The command whose log to follow."),
                query_param("after", SEQ, "Resume after this line number."),
                header_param("Last-Event-ID", SEQ,
                             "Resume after this line number (what EventSource sends)."),
            ),
            security=((PUSH_KEY,),),
        ),
    ]  # fmt: skip


def agent_openapi() -> JsonSchema:
    """The agent's OpenAPI 3.1 document (served at ``GET /api/openapi.json``)."""
    return build_document(
        title="KITT agent",
        version=__version__,
        description="The API of a KITT agent daemon: the server pushes commands here and "
        'follows their logs. Every error is `{"error": "message"}` with a 4xx status.',
        operations=operations(),
        security_schemes=SECURITY_SCHEMES,
    )
