"""Deleting old rows in bounded batches.

One ``DELETE`` over a year of heartbeats would hold SQLite's single write lock for as long
as it takes, stalling every heartbeat and log write behind it. Each batch here is its own
short transaction, followed by a pause as long as it, so writers get the lock between
batches however large the backlog.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import ColumnElement, Engine, Table, delete, select, text, tuple_
from sqlalchemy.sql.elements import KeyedColumnElement

BATCH_ROWS = 10_000
MAX_PAUSE_S = 0.1
# One pass deletes for at most this long; the next pass goes on. The reaper, which runs
# the passes, also marks agents offline and tests lost: a backlog of years must not
# hold it up for hours.
PASS_BUDGET_S = 10.0
# The PostgreSQL advisory lock held by the one server instance pruning at a time.
_PRUNE_LOCK = 0x6B697475


@contextmanager
def pruning_turn(engine: Engine) -> Iterator[bool]:
    """True when this server instance may prune now: always on SQLite (one instance), and
    on PostgreSQL when no other instance is pruning. Two instances deleting the same old
    rows would only wait on each other's row locks, doubling the work for nothing."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn:
        key = {"key": _PRUNE_LOCK}
        mine = bool(conn.execute(text("SELECT pg_try_advisory_lock(:key)"), key).scalar())
        conn.commit()
        try:
            yield mine
        finally:
            if mine:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), key)
                conn.commit()


def delete_in_batches(
    engine: Engine,
    table: Table,
    key: Sequence[KeyedColumnElement[object]],
    where: ColumnElement[bool],
    batch: int = BATCH_ROWS,
    budget_s: float = PASS_BUDGET_S,
) -> int:
    """Delete the rows of ``table`` matching ``where``, at most ``batch`` per transaction,
    picked by their primary ``key`` columns, for at most about ``budget_s``; returns how
    many went (what is left goes at the next pass)."""
    target = tuple_(*key) if len(key) > 1 else key[0]
    statement = delete(table).where(target.in_(select(*key).where(where).limit(batch)))
    total = 0
    stop_at = time.monotonic() + budget_s
    while True:
        started = time.monotonic()
        with engine.begin() as conn:
            deleted = max(conn.execute(statement).rowcount, 0)
        total += deleted
        if deleted < batch or time.monotonic() >= stop_at:
            return total
        # Leave the lock free as long as the batch held it: a writer waiting in SQLite's
        # busy handler sleeps in growing steps and would miss a gap of a few microseconds.
        time.sleep(min(time.monotonic() - started, MAX_PAUSE_S))
