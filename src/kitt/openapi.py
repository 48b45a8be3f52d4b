"""OpenAPI 3.1 documents built from the wire models, and the route that serves them.

The wire contract lives in :mod:`kitt.protocol` (pydantic models) and in the Flask views;
a hand-written YAML description of it would drift from both the day after it was
written. So each app lists its operations declaratively (method, path, parameters, body
model, reply models, security) next to its blueprints, and this module turns that list
into a document whose schemas are generated from the very models the views validate
with. Fuzzers (schemathesis, in ``tests/test_openapi_fuzz.py``) and client generators
then test and talk to what the code does, not to what someone once wrote down.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flask import Flask, Response
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from kitt.protocol import AGENT_NAME_PATTERN, ID_PATTERN

OPENAPI_VERSION = "3.1.0"
OPENAPI_PATH = "/api/openapi.json"
REF_TEMPLATE = "#/components/schemas/{model}"

JSON = "application/json"
EVENT_STREAM = "text/event-stream"
PEM = "application/x-pem-file"
TEXT = "text/plain"

Method = Literal["get", "post", "put", "patch", "delete"]
Location = Literal["path", "query", "header"]
JsonSchema = dict[str, Any]


@dataclass(frozen=True)
class Ref:
    """A wire model used inside an inline schema, e.g. ``{"agents": array_of(AgentSummary)}``.

    The builder swaps it for a ``$ref`` and puts the model in ``components/schemas``, in
    the mode the surrounding body needs (validation for requests, serialization for
    replies), so small envelopes need no model of their own.
    """

    model: type[BaseModel]


# A body or reply: a wire model (its schema goes to components/schemas and is referenced),
# or an inline JSON schema (which may hold Refs) for the small envelopes the views build.
Shape = type[BaseModel] | JsonSchema


def array_of(model: type[BaseModel]) -> JsonSchema:
    return {"type": "array", "items": Ref(model)}


def obj(required: Mapping[str, Any], **optional: Any) -> JsonSchema:
    """An inline object schema: ``required`` properties first, then optional ones."""
    return {
        "type": "object",
        "properties": {**required, **optional},
        "required": list(required),
    }


ERROR_SCHEMA_NAME = "Error"
ERROR_SCHEMA: JsonSchema = {
    "type": "object",
    "title": "Error",
    "description": "Every error either app answers: a 4xx (or 503) with one clear message.",
    "properties": {"error": {"type": "string", "minLength": 1}},
    "required": ["error"],
}
ERROR_REF: JsonSchema = {"$ref": REF_TEMPLATE.format(model=ERROR_SCHEMA_NAME)}

# One regex for "an agent id or an agent name": the fleet endpoints look agents up by either.
ID_OR_NAME_PATTERN = "^(?:" + ID_PATTERN.strip("^$") + "|" + AGENT_NAME_PATTERN.strip("^$") + ")$"


@dataclass(frozen=True)
class Param:
    """One path, query or header parameter.

    Path parameters carry the id pattern the view enforces, so that a fuzzer's positive
    cases reach the handler and its negative cases probe the 400 branch.
    """

    name: str
    location: Location
    schema: JsonSchema
    description: str
    required: bool = False

    def as_openapi(self) -> JsonSchema:
        return {
            "name": self.name,
            "in": self.location,
            "description": self.description,
            # OpenAPI requires ``required: true`` on every path parameter.
            "required": self.required or self.location == "path",
            "schema": self.schema,
        }


def path_param(name: str, description: str, pattern: str = ID_PATTERN) -> Param:
    """A path segment constrained to ``pattern`` (the id alphabet unless told)."""
    return Param(name, "path", {"type": "string", "pattern": pattern}, description, True)


def query_param(name: str, schema: JsonSchema, description: str) -> Param:
    return Param(name, "query", schema, description)


def header_param(name: str, schema: JsonSchema, description: str) -> Param:
    return Param(name, "header", schema, description)


@dataclass(frozen=True)
class Reply:
    """One documented response: a description and, optionally, a body per content type.

    ``body`` is used for every content type in ``content_types``; ``None`` means the
    response has no documented body. ``bodies`` instead gives each content type its own
    (a log as an event stream, or as plain text). JSON error replies use ERROR_SCHEMA.
    """

    description: str
    body: Shape | None = None
    content_types: tuple[str, ...] = (JSON,)
    bodies: Mapping[str, Shape] | None = None

    def content(self) -> dict[str, Shape]:
        if self.bodies is not None:
            return dict(self.bodies)
        if self.body is None:
            return {}
        return dict.fromkeys(self.content_types, self.body)


def error(description: str) -> Reply:
    """An error reply: ``{"error": "message"}``, the only error shape either app sends."""
    return Reply(description, ERROR_SCHEMA)


def text(description: str, *content_types: str) -> Reply:
    """A non-JSON reply whose body is plain text (PEM, a log)."""
    return Reply(description, {"type": "string"}, content_types or (TEXT,))


def json_text(schema: Shape) -> JsonSchema:
    """A string holding JSON that matches ``schema`` (JSON Schema's content vocabulary)."""
    return {"type": "string", "contentMediaType": JSON, "contentSchema": schema}


def sse_event(name: str, data: Shape, *, numbered: bool = False) -> JsonSchema:
    """One kind of Server-Sent Event: ``event: <name>`` with JSON ``data``.

    The schema of a ``text/event-stream`` body describes each event as parsed, an object
    of strings ``event``, ``data``, ``id`` and ``retry`` (the reading OpenAPI 3.2 made
    official with ``itemSchema``, and schemathesis applies), so clients learn the frames
    and a fuzzer checks every one. ``numbered`` events carry ``id: <seq>``, what a client
    sends back as ``Last-Event-ID`` to resume.
    """
    event: JsonSchema = {
        "type": "object",
        "properties": {"event": {"const": name}, "data": json_text(data)},
        "required": ["event", "data"],
    }
    if numbered:
        event["properties"]["id"] = {"type": "string", "pattern": "^[0-9]+$"}
        event["required"].append("id")
    return event


def event_stream(*events: JsonSchema) -> JsonSchema:
    """Each event of a stream is one of ``events`` (comments, e.g. keepalives, aside)."""
    return {"oneOf": list(events)}


@dataclass(frozen=True)
class Operation:
    """One route: everything a client needs to call it and a fuzzer needs to test it.

    ``security`` lists alternatives; each alternative names security schemes that must
    all be satisfied (OpenAPI's own semantics). An empty tuple documents an open endpoint
    explicitly (``security: []``), rather than inheriting a default.
    """

    method: Method
    path: str
    summary: str
    operation_id: str
    replies: Mapping[int, Reply]
    tags: tuple[str, ...] = ()
    description: str = ""
    params: tuple[Param, ...] = ()
    body: Shape | None = None
    security: tuple[tuple[str, ...], ...] = ()
    # Replies every operation of a kind can give, added unless ``replies`` names them.
    auto_errors: bool = True

    def all_replies(self) -> dict[int, Reply]:
        """``replies`` plus the errors the shared plumbing can produce for this operation.

        :mod:`kitt.jsonapi` answers a bad or oversized body with 400/413 and the auth layer
        answers 401 on any protected route; listing them here keeps each spec file short
        and makes it impossible to forget one.
        """
        replies = dict(self.replies)
        if not self.auto_errors:
            return replies
        if self.body is not None:
            replies.setdefault(400, error("The body is not valid JSON or fails validation."))
            replies.setdefault(413, error("The body is larger than 1 MiB."))
        if any(self.params_in("path")):
            replies.setdefault(400, error("A path parameter is malformed."))
        if self.security:
            replies.setdefault(401, error("No bearer token, or one this server does not know."))
            replies.setdefault(403, error("The token is valid but may not do this."))
        return dict(sorted(replies.items()))

    def params_in(self, location: Location) -> Iterable[Param]:
        return (p for p in self.params if p.location == location)


@dataclass
class _Schemas:
    """Collects models, then renders them once so shared sub-models get one entry each.

    Request bodies use pydantic's validation-mode schema (what the view accepts) and
    replies its serialization-mode schema (what the view sends); pydantic names the two
    ``X-Input``/``X-Output`` only where they differ.
    """

    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = field(default_factory=dict)

    def want(self, model: type[BaseModel], mode: JsonSchemaMode) -> None:
        self.wanted[(model, mode)] = None

    def render(self) -> tuple[Mapping[Any, JsonSchema], JsonSchema]:
        """The ``$ref`` of each wanted (model, mode), and the components/schemas section."""
        refs, top = models_json_schema(list(self.wanted), ref_template=REF_TEMPLATE)
        components: JsonSchema = _close_pattern_properties(dict(top.get("$defs", {})))
        components[ERROR_SCHEMA_NAME] = ERROR_SCHEMA
        return refs, dict(sorted(components.items()))


def _close_pattern_properties(schema: Any) -> Any:
    """Add ``additionalProperties: false`` beside every ``patternProperties``.

    Pydantic renders ``dict[ConstrainedKey, V]`` (e.g. a test's ``params``) as
    ``patternProperties`` alone, which in JSON Schema lets a key that misses the pattern
    through with any value; pydantic's validator rejects such a key. Without this, the
    document promises clients that the server accepts what it answers 400 to.
    """
    if isinstance(schema, dict):
        out = {key: _close_pattern_properties(value) for key, value in schema.items()}
        if "patternProperties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_close_pattern_properties(value) for value in schema]
    return schema


def _shape(shape: Any, mode: JsonSchemaMode, refs: Mapping[Any, JsonSchema]) -> Any:
    """``shape`` with every model and Ref replaced by its ``$ref``."""
    if shape is ERROR_SCHEMA:
        return ERROR_REF
    if isinstance(shape, Ref):
        return refs[(shape.model, mode)]
    if isinstance(shape, type) and issubclass(shape, BaseModel):
        return refs[(shape, mode)]
    if isinstance(shape, dict):
        return {key: _shape(value, mode, refs) for key, value in shape.items()}
    if isinstance(shape, list):
        return [_shape(value, mode, refs) for value in shape]
    return shape


def _collect(shape: Any, mode: JsonSchemaMode, schemas: _Schemas) -> None:
    """Note every model ``shape`` uses, however deep in an inline schema."""
    if isinstance(shape, Ref):
        schemas.want(shape.model, mode)
    elif isinstance(shape, type) and issubclass(shape, BaseModel):
        schemas.want(shape, mode)
    elif isinstance(shape, dict) and shape is not ERROR_SCHEMA:
        for value in shape.values():
            _collect(value, mode, schemas)
    elif isinstance(shape, list):
        for value in shape:
            _collect(value, mode, schemas)


def _operation(op: Operation, refs: Mapping[Any, JsonSchema]) -> JsonSchema:
    out: JsonSchema = {"operationId": op.operation_id, "summary": op.summary}
    if op.description:
        out["description"] = op.description
    if op.tags:
        out["tags"] = list(op.tags)
    if op.params:
        out["parameters"] = [p.as_openapi() for p in op.params]
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {JSON: {"schema": _shape(op.body, "validation", refs)}},
        }
    responses: JsonSchema = {}
    for status, reply in op.all_replies().items():
        entry: JsonSchema = {"description": reply.description}
        content = reply.content()
        if content:
            entry["content"] = {
                ct: {"schema": _shape(body, "serialization", refs)} for ct, body in content.items()
            }
        responses[str(status)] = entry
    out["responses"] = responses
    out["security"] = [{name: [] for name in alternative} for alternative in op.security]
    return out


def build_document(
    *,
    title: str,
    version: str,
    description: str,
    operations: Iterable[Operation],
    security_schemes: Mapping[str, JsonSchema] | None = None,
    tags: Mapping[str, str] | None = None,
) -> JsonSchema:
    """Render ``operations`` into an OpenAPI 3.1 document (a plain, JSON-ready dict).

    Raises ``ValueError`` on a spec mistake that a validator would only report later and
    less clearly: a duplicate route or operationId, a path parameter that is declared
    but not in the path (or the reverse), or a security scheme that is not defined.
    """
    ops = list(operations)
    schemes = dict(security_schemes or {})
    _check(ops, schemes)
    schemas = _Schemas()
    for op in ops:
        _collect(op.body, "validation", schemas)
        for reply in op.all_replies().values():
            for body in reply.content().values():
                _collect(body, "serialization", schemas)
    refs, components = schemas.render()
    paths: JsonSchema = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method] = _operation(op, refs)
    doc: JsonSchema = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
    }
    if tags:
        doc["tags"] = [{"name": name, "description": text_} for name, text_ in tags.items()]
    doc["paths"] = paths
    doc["components"] = {"schemas": components}
    if schemes:
        doc["components"]["securitySchemes"] = schemes
    return doc


def _check(ops: list[Operation], schemes: Mapping[str, JsonSchema]) -> None:
    seen_routes: set[tuple[str, str]] = set()
    seen_ids: set[str] = set()
    for op in ops:
        route = (op.method, op.path)
        if route in seen_routes:
            raise ValueError(f"duplicate operation {op.method.upper()} {op.path}")
        if op.operation_id in seen_ids:
            raise ValueError(f"duplicate operationId {op.operation_id!r}")
        seen_routes.add(route)
        seen_ids.add(op.operation_id)
        in_path = {part[1:-1] for part in op.path.split("/") if part.startswith("{")}
        declared = {p.name for p in op.params_in("path")}
        if in_path != declared:
            raise ValueError(
                f"{op.path}: path parameters {sorted(in_path)} but declared {sorted(declared)}"
            )
        for alternative in op.security:
            for name in alternative:
                if name not in schemes:
                    raise ValueError(f"{op.path}: undefined security scheme {name!r}")


def bearer_scheme(description: str) -> JsonSchema:
    """An ``Authorization: Bearer <token>`` scheme; KITT tokens are opaque, not JWTs."""
    return {"type": "http", "scheme": "bearer", "description": description}


def mutual_tls_scheme(description: str) -> JsonSchema:
    """A client-certificate requirement (OpenAPI 3.1's ``mutualTLS`` scheme type)."""
    return {"type": "mutualTLS", "description": description}


def install_openapi(app: Flask, document: Callable[[], JsonSchema]) -> None:
    """Serve ``document()`` at ``GET /api/openapi.json``, without authentication.

    The document describes the API, not any data in it, so it is as public as the
    health check; clients and fuzzers need it before they hold a token. It is built on
    the first request (not at app creation, so a spec mistake cannot stop a daemon
    from starting) and cached: it only changes with the code.
    """
    lock = threading.Lock()
    cache: list[bytes] = []

    def openapi_document() -> Response:
        if not cache:
            with lock:
                if not cache:
                    cache.append(json.dumps(document(), separators=(",", ":")).encode())
        return Response(cache[0], mimetype=JSON)

    app.add_url_rule(OPENAPI_PATH, "openapi_document", openapi_document, methods=["GET"])


def openapi_operation(tags: tuple[str, ...] = ()) -> Operation:
    """The description of :func:`install_openapi`'s own route, for each app's spec."""
    return Operation(
        "get",
        OPENAPI_PATH,
        "This OpenAPI 3.1 document",
        "getOpenApiDocument",
        {200: Reply("The document.", {"type": "object"})},
        tags=tags,
    )
