"""Endpoints users call about serving benchmark results: list, show, import, delete."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from kitt.jsonapi import ApiFailure, check_id, dump, int_arg, read_body
from kitt.protocol import ResultDetail, ResultImported, ResultRow
from kitt.server.auth import require_admin
from kitt.server.store.models import BenchResult
from kitt.server.store.results import (
    InvalidResultError,
    ResultFilter,
    ResultStore,
    build_row,
    canonical_id,
    load_document,
)

bp = Blueprint("results", __name__, url_prefix="/api/v1/results")
bp.before_request(require_admin)

MAX_LIMIT = 1000
MAX_OFFSET = 1_000_000_000  # beyond any real table; keeps the value a 64-bit integer
FILTERS = ("agent", "model", "engine", "gpu")


def _results() -> ResultStore:
    return current_app.extensions["kitt.results"]  # type: ignore[no-any-return]


def row(result: BenchResult) -> ResultRow:
    return ResultRow.model_validate(result, from_attributes=True)


def _time_arg(name: str) -> datetime | None:
    text = request.args.get(name, "")
    if text == "":
        return None  # documented: an empty time is no limit
    example = "e.g. 2026-11-27T09:00:00Z"
    try:
        when = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError:
        raise ApiFailure(400, f"'{name}' must be an ISO 8601 time ({example}), got "
                              f"{text[:40]!r}") from None  # fmt: skip
    if when.tzinfo is None:
        raise ApiFailure(400, f"'{name}' must carry a time zone ({example})")
    try:
        return when.astimezone(timezone.utc)
    except OverflowError:
        raise ApiFailure(400, f"'{name}' is out of range") from None


@bp.get("")
def list_results() -> Response:
    where = ResultFilter(
        **{key: request.args.get(key) or None for key in FILTERS},
        since=_time_arg("since"),
        until=_time_arg("until"),
    )
    limit = int_arg("limit", 50, 1, MAX_LIMIT)
    offset = int_arg("offset", 0, 0, MAX_OFFSET)
    found = _results().query(where, limit=limit, offset=offset)
    return jsonify(results=[row(r).model_dump(mode="json") for r in found])


def _get(result_id: str) -> BenchResult:
    check_id(result_id, "result id")
    found = _results().get(result_id)
    if found is None:
        raise ApiFailure(404, f"no result {result_id!r}")
    return found


def detail(result: BenchResult) -> ResultDetail:
    return ResultDetail(**row(result).model_dump(), document=result.document)


@bp.get("/<result_id>")
def show(result_id: str) -> Any:
    return dump(detail(_get(result_id)))


@bp.post("")
def import_result() -> Any:
    """Store a document made by ``kitt bench serve --output`` anywhere. Its id is a hash
    of its content, so importing it again answers 200 with the same id, not a copy."""
    try:
        document, parsed = load_document(read_body())
    except InvalidResultError as exc:
        raise ApiFailure(400, str(exc)) from None
    result = build_row(
        document,
        parsed,
        result_id=canonical_id(document),
        source="import",
        now=datetime.now(timezone.utc),
    )
    stored, created = _results().add(result)
    if created:
        current_app.logger.info("result %s imported (%s)", stored.id, stored.model)
    return dump(ResultImported(id=stored.id, created=created), 201 if created else 200)


@bp.delete("/<result_id>")
def remove(result_id: str) -> Any:
    check_id(result_id, "result id")
    if not _results().delete(result_id):
        raise ApiFailure(404, f"no result {result_id!r}")
    current_app.logger.info("result %s deleted", result_id)
    return jsonify(deleted=result_id)
