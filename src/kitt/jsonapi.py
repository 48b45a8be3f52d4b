"""JSON API plumbing shared by the server's and the agent's Flask apps.

Both apps must answer every bad request with ``{"error": "..."}`` and a 4xx, never an
HTML page or a 500 (ARCHITECTURE.md §4); this module is where that rule lives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from flask import Flask, Response, jsonify, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException

from kitt.protocol import ID_RE, MAX_BODY_BYTES, describe_validation_error

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class ApiFailure(Exception):
    """Raised by a view to answer ``status`` with a JSON error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str) -> tuple[Response, int]:
    return jsonify(error=message), status


def read_body() -> bytes:
    """The raw body, at most 1 MiB, for sized and chunked requests alike.

    Flask rejects an oversized Content-Length itself, but for a chunked body werkzeug
    only truncates at the limit, which would surface as a baffling "invalid JSON".
    """
    too_large = ApiFailure(413, f"request body too large: the limit is {MAX_BODY_BYTES} bytes")
    if request.content_length is not None:
        if request.content_length > MAX_BODY_BYTES:
            raise too_large
        return request.get_data(cache=True)
    raw: bytes = request.environ["wsgi.input"].read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise too_large
    return raw


def parse_body(model: type[M]) -> M:
    """Validate the body against ``model`` (one parse, in pydantic) or raise a clear 400."""
    try:
        # Strict: JSON types are checked as sent (``true`` or ``"1"`` is not a number, ``1.0``
        # is not an integer), so the OpenAPI document's promises are what is enforced.
        return model.model_validate_json(read_body(), strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise ApiFailure(400, "request body must be valid JSON") from exc
        if first["type"] == "model_type" and not first["loc"]:
            raise ApiFailure(400, "request body must be a JSON object") from exc
        raise ApiFailure(400, describe_validation_error(exc)) from exc


def check_id(value: str, what: str = "id") -> str:
    if not ID_RE.match(value):
        raise ApiFailure(400, f"invalid {what} {value[:80]!r}: expected 1-64 of [A-Za-z0-9_-]")
    return value


def int_arg(name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter in [low, high]; absent: ``default``; anything else
    (empty included, as the OpenAPI schemas say integer) is a 400 naming it."""
    if name not in request.args:
        return default
    text = request.args[name]
    try:
        value = int(text)
    except ValueError:
        raise ApiFailure(400, f"'{name}' must be an integer, got {text[:40]!r}") from None
    if not low <= value <= high:
        raise ApiFailure(400, f"'{name}' must be between {low} and {high}")
    return value


def dump(model: BaseModel, status: int = 200) -> tuple[Response, int]:
    return Response(model.model_dump_json(), mimetype="application/json"), status


PageErrorRenderer = Callable[[int, str], Any]
PAGE_ERRORS = "kitt.page_errors"


def _page_error(app: Flask, status: int, message: str) -> Any:
    """An error on a dashboard page (not under /api/) is a page, not JSON."""
    render: PageErrorRenderer | None = app.extensions.get(PAGE_ERRORS)
    if render is None or request.path.startswith("/api/"):
        return None
    return render(status, message)


def install_json_errors(app: Flask) -> None:
    """Make every error JSON, cap bodies at 1 MiB, and log (not leak) unexpected bugs."""
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]

    @app.errorhandler(ApiFailure)
    def _api_failure(exc: ApiFailure) -> Any:
        page = _page_error(app, exc.status, exc.message)
        if page is not None:
            return page
        body, status = error(exc.status, exc.message)
        if status == 401:
            body.headers["WWW-Authenticate"] = 'Bearer realm="kitt"'
        return body, status

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Any:
        code = exc.code or 500
        page = _page_error(app, code, exc.description or exc.name)
        if page is not None:
            return page
        if code == 413:
            return error(413, f"request body too large: the limit is {MAX_BODY_BYTES} bytes")
        if code == 404:
            return error(404, f"no such endpoint: {request.method} {request.path}")
        if code == 405:
            body, status = error(405, f"method {request.method} not allowed on {request.path}")
            allowed = getattr(exc, "valid_methods", None)
            if allowed:
                body.headers["Allow"] = ", ".join(allowed)
            return body, status
        return error(code, exc.description or exc.name)

    app.register_error_handler(Exception, partial(unexpected_error, app))


def unexpected_error(app: Flask, exc: Exception) -> Any:
    """A bug: logged with its traceback, answered with a 500 that leaks nothing."""
    log.exception("unhandled error on %s %s", request.method, request.path)
    message = "internal server error (this is a bug; the log has details)"
    return _page_error(app, 500, message) or error(500, message)
