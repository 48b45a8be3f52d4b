"""Test log lines: idempotent ingestion by sequence number, reads in order, and pruning
of the logs of tests finished long ago."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Engine, Row, Select, Table, bindparam, exists, select
from sqlalchemy.dialects import postgresql, sqlite

from kitt.server.lifecycle import ALLOWED
from kitt.server.store.models import TestLogLine, TestRun
from kitt.server.store.retention import delete_in_batches

_LOGS = cast(Table, TestLogLine.__table__)
_TESTS = cast(Table, TestRun.__table__)
_READ = (
    select(_LOGS.c.seq, _LOGS.c.ts, _LOGS.c.line)
    .where(_LOGS.c.test_id == bindparam("test_id"), _LOGS.c.seq > bindparam("after"))
    .order_by(_LOGS.c.seq)
    .limit(bindparam("limit"))
)


class LogStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        dialect = postgresql if self._postgres else sqlite
        # Re-delivered batches (the agent sends at least once) hit existing keys: skip them.
        self._insert = dialect.insert(_LOGS).on_conflict_do_nothing()
        # psycopg reports no row count for a many-row INSERT: the new rows are counted by
        # what they return instead (one multi-row INSERT ... RETURNING per batch).
        self._insert_returning = self._insert.returning(_LOGS.c.seq)

    def ingest(self, test_id: str, lines: Sequence[dict[str, Any]]) -> int:
        """Store lines; returns how many were new."""
        if not lines:
            return 0
        rows = [{"test_id": test_id, **line} for line in lines]
        with self.engine.begin() as conn:
            if self._postgres:
                return len(conn.execute(self._insert_returning, rows).all())
            result = conn.execute(self._insert, rows)
        return max(result.rowcount, 0)

    def read(self, test_id: str, after: int, limit: int = 1000) -> list[Row[tuple[int, str, str]]]:
        """(seq, ts, line) rows after ``after``; plain rows, since building ORM objects
        for every line cost more than the query (it halved the stream's line rate)."""
        with self.engine.connect() as conn:
            return list(conn.execute(_READ, {"test_id": test_id, "after": after, "limit": limit}))

    def prune_finished(self, finished_before: datetime) -> tuple[int, int]:
        """Delete the log lines of tests in a final state that finished before
        ``finished_before``; the tests and their results stay. Returns (lines, tests).

        A test still queued, dispatched or running has no ``finished_at``, and a lost one
        may yet come back: both keep their logs whatever their age.
        """
        with self.engine.connect() as conn:
            has_lines = exists().where(_LOGS.c.test_id == _TESTS.c.id)
            tests = len(conn.execute(_finished(finished_before).where(has_lines)).all())
        if not tests:
            return 0, 0
        lines = delete_in_batches(
            self.engine,
            _LOGS,
            [_LOGS.c.test_id, _LOGS.c.seq],
            _LOGS.c.test_id.in_(_finished(finished_before)),
        )
        return lines, tests


# States no test leaves. (A "lost" test is not one: its agent may come back, still
# running it, and ship the rest of its log.)
FINAL_STATUSES = sorted(state for state, onward in ALLOWED.items() if not onward)


def _finished(before: datetime) -> Select[tuple[str]]:
    """Ids of the tests in a final state that finished before ``before``."""
    return select(_TESTS.c.id).where(
        _TESTS.c.status.in_(FINAL_STATUSES), _TESTS.c.finished_at < before
    )
