"""Serving benchmark results: checking a document, indexing it, and finding it again.

A result is stored whole (the document, as received) beside a copy of the fields that
lists filter and sort by. Copying them out at write time keeps every query on indexed
columns, and keeping the document keeps every nested metric, which a schema of columns
alone would lose.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Select, and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer, sessionmaker

from kitt.errors import KittError
from kitt.protocol import (
    RESULT_SCHEMA_VERSION,
    SERVING_RESULT_KIND,
    SUMMARY_METRICS,
    ResultDocument,
)
from kitt.server.store.models import BenchResult, TestRun


class InvalidResultError(KittError):
    """A result document that is not one the server can store and index."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range for a number")
    return value


def load_document(raw: bytes | str) -> tuple[dict[str, Any], ResultDocument]:
    """The document as a dict (to store as is) and its checked fields (to index).

    Plain JSON only: ``NaN``/``Infinity`` (which Python's parser would take) could be
    stored but never served back as valid JSON.
    """
    try:
        document = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise InvalidResultError(f"the result is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidResultError(
            f"a result document is a JSON object, not {type(document).__name__}"
        )
    version = document.get("schema_version")
    if version != RESULT_SCHEMA_VERSION or isinstance(version, bool):
        raise InvalidResultError(
            f"unsupported schema_version {json.dumps(version)[:40]}: "
            f"this server reads version {RESULT_SCHEMA_VERSION}"
        )
    kind = document.get("kind")
    if kind != SERVING_RESULT_KIND:
        raise InvalidResultError(
            f"kind {json.dumps(kind)[:80]} is not a serving result ({SERVING_RESULT_KIND!r})"
        )
    try:
        parsed = ResultDocument.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'document'}: {err['msg']}"
            for err in exc.errors(include_url=False)[:5]
        )
        raise InvalidResultError(f"invalid result document: {problems}") from None
    return document, parsed


def canonical_id(document: dict[str, Any]) -> str:
    """The id of an imported document: the same content always gets the same id."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "res_" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _when(text: str | None, fallback: datetime) -> datetime:
    """When the benchmark ran: the document's ``started_at`` when it is a readable time."""
    if not text:
        return fallback
    try:
        when = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return fallback


def build_row(
    document: dict[str, Any],
    parsed: ResultDocument,
    *,
    result_id: str,
    source: str,
    now: datetime,
    test: TestRun | None = None,
) -> BenchResult:
    """The row for a checked document; a fleet result falls back on its test's fields."""
    engine = parsed.engine
    hardware = parsed.hardware
    summary = parsed.summary
    agent_name = test.agent_name if test is not None else (hardware and hardware.hostname)
    return BenchResult(
        id=result_id,
        test_id=test.id if test is not None else None,
        source=source,
        agent_name=agent_name or None,
        model=parsed.config.model or (test.model if test is not None else None),
        engine=(engine and engine.name) or (test.engine if test is not None else None),
        engine_version=engine and engine.version,
        gpu_model=hardware and hardware.gpu_model,
        gpu_count=hardware and hardware.gpu_count,
        hardware_fingerprint=hardware and hardware.fingerprint,
        created_at=_when(parsed.started_at, now),
        best_step=summary.best_step,
        document=document,
        **{name: getattr(summary, name) for name in SUMMARY_METRICS},
    )


def fleet_row(test: TestRun, result: dict[str, Any] | None, now: datetime) -> BenchResult | None:
    """The row for what an agent reported, if it is a serving result (other kinds of
    result stay on their test only). Raises InvalidResultError for a broken one."""
    if not isinstance(result, dict) or result.get("kind") != SERVING_RESULT_KIND:
        return None
    document, parsed = load_document(json.dumps(result))
    return build_row(document, parsed, result_id=test.id, source="fleet", now=now, test=test)


def stage(session: Session, row: BenchResult) -> None:
    """Add ``row`` inside a transaction someone else commits (the test's result report).

    A merge, so that a report applied twice cannot fail on the primary key."""
    session.merge(row)


@dataclass(frozen=True)
class ResultFilter:
    agent: str | None = None
    model: str | None = None
    engine: str | None = None
    gpu: str | None = None  # a case-insensitive part of the GPU model
    since: datetime | None = None
    until: datetime | None = None


def _matching(where: ResultFilter) -> Select[BenchResult]:
    """The results ``where`` matches, newest first (ties broken by id, so that every
    order is total and pages never overlap)."""
    query = select(BenchResult)
    if where.agent:
        query = query.where(BenchResult.agent_name == where.agent)
    if where.model:
        query = query.where(BenchResult.model == where.model)
    if where.engine:
        query = query.where(BenchResult.engine == where.engine)
    if where.gpu:
        query = query.where(BenchResult.gpu_model.icontains(where.gpu, autoescape=True))
    if where.since is not None:
        query = query.where(BenchResult.created_at >= where.since)
    if where.until is not None:
        query = query.where(BenchResult.created_at <= where.until)
    return query.order_by(BenchResult.created_at.desc(), BenchResult.id.desc())


class ResultStore:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def add(self, row: BenchResult) -> tuple[BenchResult, bool]:
        """Store ``row`` unless a row with its id exists; returns the stored row and
        whether it is new (an id taken by a racing import counts as existing)."""
        existing = self.get(row.id)
        if existing is not None:
            return existing, False
        try:
            with self.sessions.begin() as s:
                s.add(row)
        except IntegrityError:
            existing = self.get(row.id)
            if existing is None:
                raise
            return existing, False
        return row, True

    def get(self, result_id: str) -> BenchResult | None:
        with self.sessions() as s:
            return s.get(BenchResult, result_id)

    def query(self, where: ResultFilter, limit: int = 50, offset: int = 0) -> list[BenchResult]:
        """Newest first, without the documents (a list never shows them)."""
        query = _matching(where).options(defer(BenchResult.document))
        with self.sessions() as s:
            return list(s.scalars(query.limit(limit).offset(offset)))

    def count(self, where: ResultFilter, at_most: int) -> int:
        """How many results match, counted no further than ``at_most`` (so that asking
        whether a filter matches too many costs ``at_most`` index entries, not the table)."""
        matches = _matching(where).with_only_columns(BenchResult.id).order_by(None).limit(at_most)
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(matches.subquery())) or 0

    def page_after(
        self, where: ResultFilter, after: BenchResult | None, limit: int
    ) -> list[BenchResult]:
        """The next ``limit`` matches, newest first, that sort after ``after`` (the last
        one of the previous page), documents included.

        Keyset paging on ``(created_at, id)``, not OFFSET: a result imported or deleted
        while someone pages through neither repeats a row nor skips one, and each page
        costs the same however deep it is."""
        query = _matching(where)
        if after is not None:
            query = query.where(or_(
                BenchResult.created_at < after.created_at,
                and_(BenchResult.created_at == after.created_at, BenchResult.id < after.id),
            ))  # fmt: skip
        with self.sessions() as s:
            return list(s.scalars(query.limit(limit)))

    def facets(self, limit: int = 500) -> dict[str, list[str]]:
        """The distinct agents, models, engines and GPU models stored (sorted, at most
        ``limit`` each): the dashboard offers them as filter choices, so that a filter
        is picked, not guessed at and mistyped."""
        columns = {
            "agent": BenchResult.agent_name,
            "model": BenchResult.model,
            "engine": BenchResult.engine,
            "gpu": BenchResult.gpu_model,
        }
        with self.sessions() as s:
            return {
                key: list(s.scalars(
                    select(column).where(column.is_not(None)).distinct().order_by(column)
                    .limit(limit)
                ))
                for key, column in columns.items()
            }  # fmt: skip

    def delete(self, result_id: str) -> bool:
        with self.sessions.begin() as s:
            gone = s.execute(delete(BenchResult).where(BenchResult.id == result_id))
        return bool(gone.rowcount)  # type: ignore[attr-defined]
