"""Queries about tests: creation, state changes under the state machine, listing."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from kitt.server.lifecycle import IllegalTransitionError, check
from kitt.server.store.db import is_postgres
from kitt.server.store.models import Agent, TestRun

ACTIVE = ("dispatched", "running")
_PENDING = TestRun.status.in_(("queued", "dispatched")) | (
    (TestRun.status == "running") & TestRun.cancel_requested.is_(True)
)


def new_test_id() -> str:
    return f"tst_{uuid.uuid4().hex[:20]}"


def new_command_id() -> str:
    return f"cmd_{uuid.uuid4().hex[:20]}"


class TestStore:
    __test__ = False

    def __init__(self, engine: Engine, on_change: Callable[[str], None] | None = None) -> None:
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self._postgres = is_postgres(engine)
        # Told the test id after every committed state change (live streams wake on it).
        self._on_change = on_change or (lambda _test_id: None)

    def create(self, **fields: Any) -> TestRun:
        test = TestRun(id=new_test_id(), command_id=new_command_id(), status="queued", **fields)
        with self.sessions.begin() as s:
            s.add(test)
        return test

    def get(self, test_id: str) -> TestRun | None:
        with self.sessions() as s:
            return s.get(TestRun, test_id)

    def query(
        self, *, status: str | None = None, agent: str | None = None, limit: int = 50
    ) -> list[TestRun]:
        query = select(TestRun).order_by(TestRun.created_at.desc()).limit(limit)
        if status:
            query = query.where(TestRun.status == status)
        if agent:
            query = query.where((TestRun.agent_name == agent) | (TestRun.agent_id == agent))
        with self.sessions() as s:
            return list(s.scalars(query))

    def transition(
        self,
        test_id: str,
        wanted: str,
        *,
        within: Callable[[Session], None] | None = None,
        **fields: Any,
    ) -> tuple[TestRun, bool]:
        """Move a test to ``wanted`` (checked), setting ``fields`` only when it changes.
        Returns the test and whether anything changed. ``within`` writes more in the same
        transaction, only when the test changes (a result's index row, once)."""

        def decide(current: TestRun) -> dict[str, Any] | None:
            if not check(test_id, current.status, wanted):
                return None
            values = {k: v for k, v in fields.items() if v is not None}
            values["status"] = wanted
            if current.status == "queued" and wanted not in ("dispatched", "cancelled"):
                # The agent's report overtook the dispatcher's record of the push.
                values.setdefault(
                    "dispatched_at", fields.get("started_at") or fields.get("finished_at")
                )
            return values

        return self._change(test_id, wanted, decide, within)

    def request_cancel(self, test_id: str, now: datetime) -> TestRun:
        """Cancel a queued test outright; flag an active one for its agent to stop."""

        def decide(current: TestRun) -> dict[str, Any]:
            if current.status == "queued":
                return {"status": "cancelled", "finished_at": now,
                        "error": "cancelled before it was dispatched"}  # fmt: skip
            if current.status in ACTIVE:
                return {"cancel_requested": True}
            # It has already ended, cancelled included.
            raise IllegalTransitionError(test_id, current.status, "cancelled")

        return self._change(test_id, "cancelled", decide)[0]

    def _change(
        self,
        test_id: str,
        wanted: str,
        decide: Callable[[TestRun], dict[str, Any] | None],
        within: Callable[[Session], None] | None = None,
    ) -> tuple[TestRun, bool]:
        """Read, ``decide`` what to write (None: nothing), write it as a compare-and-set on
        the status that was read (``UPDATE … WHERE status = <seen>``), retry if it moved.

        SQLite has no row locks and its driver reads outside the write transaction, so a
        plain read-check-write would let two racing reports both apply.
        """
        for _ in range(10):
            current = self.get(test_id)
            if current is None:
                raise KeyError(test_id)
            values = decide(current)
            if values is None:
                return current, False
            with self.sessions.begin() as s:
                claiming = wanted == "dispatched" and current.status == "queued"
                if self._postgres and claiming and not self._claim(s, current):
                    if s.scalar(select(TestRun.status).where(TestRun.id == test_id)) == "queued":
                        return current, False  # another transaction holds it: give way
                    continue  # it moved on: decide again on what it is now
                result = s.execute(
                    update(TestRun)
                    .where(TestRun.id == test_id, TestRun.status == current.status)
                    .values(values)
                )
                if result.rowcount and within is not None:  # type: ignore[attr-defined]
                    within(s)
            if result.rowcount:  # type: ignore[attr-defined]
                self._on_change(test_id)
                updated = self.get(test_id)
                assert updated is not None  # noqa: S101 - tests are never deleted alone
                return updated, True
        raise IllegalTransitionError(test_id, "changing", wanted)

    @staticmethod
    def _claim(s: Session, test: TestRun) -> bool:
        """PostgreSQL: lock the queued test being dispatched for this transaction; False
        when it is no longer queued, another transaction holds it (SKIP LOCKED), or its
        agent already has an active test.

        The agent's row is locked first (waiting, briefly, for a heartbeat's update or
        another dispatch to the same agent), so that two dispatches of different tests
        to one agent, perhaps on two server instances, are serialised: the second sees
        the first's committed ``dispatched`` and gives way. A test held by another
        transaction (a dispatch, a report or a cancel) decides its own fate, and this
        dispatch gives way at once instead of queueing behind it.

        ``NO KEY``: log lines inserted for the test (a foreign key share lock) are no claim.
        """
        if test.agent_id is not None:
            s.execute(
                select(Agent.id).where(Agent.id == test.agent_id).with_for_update(key_share=True)
            )
            busy = s.execute(
                select(TestRun.id)
                .where(TestRun.agent_id == test.agent_id, TestRun.status.in_(ACTIVE))
                .limit(1)
            ).first()
            if busy is not None:
                return False
        locked = s.execute(
            select(TestRun.id)
            .where(TestRun.id == test.id, TestRun.status == "queued")
            .with_for_update(skip_locked=True, key_share=True)
        ).first()
        return locked is not None

    def pending_for(self, agent_id: str) -> list[TestRun]:
        """Work for one agent, oldest first: queued tests, dispatched tests the agent has not
        confirmed yet (a lost heartbeat response may have carried them), active tests to
        cancel."""
        query = select(TestRun).where(_PENDING, TestRun.agent_id == agent_id)
        query = query.order_by(TestRun.created_at)
        with self.sessions() as s:
            return list(s.scalars(query))

    def close_for_agent(self, agent_id: str, now: datetime) -> list[str]:
        """An agent is being removed: its queued tests are cancelled, its active ones lost."""
        query = select(TestRun.id, TestRun.status).where(
            TestRun.agent_id == agent_id, TestRun.status.in_(("queued", *ACTIVE))
        )
        with self.sessions() as s:
            open_tests = list(s.execute(query))
        for test_id, status in open_tests:
            wanted = "cancelled" if status == "queued" else "lost"
            with contextlib.suppress(IllegalTransitionError, KeyError):
                self.transition(test_id, wanted, finished_at=now, error="its agent was removed")
        return [test_id for test_id, _ in open_tests]

    def last_assigned(self) -> dict[str, datetime]:
        """When each agent was last given a test (to spread ``--agent any`` work)."""
        query = select(TestRun.agent_id, func.max(TestRun.created_at)).group_by(TestRun.agent_id)
        with self.sessions() as s:
            return {agent_id: ts for agent_id, ts in s.execute(query) if agent_id}

    def has_active(self, agent_id: str) -> bool:
        """One test at a time per agent: no dispatch while one is dispatched or running."""
        query = (
            select(TestRun.id)
            .where(TestRun.agent_id == agent_id, TestRun.status.in_(ACTIVE))
            .limit(1)
        )
        with self.sessions() as s:
            return s.scalars(query).first() is not None

    def agents_with_pending_work(self) -> set[str]:
        query = select(TestRun.agent_id).where(_PENDING)
        with self.sessions() as s:
            return {a for a in s.scalars(query.distinct()) if a}

    def active_on_offline_agents(self, agent_ids: Sequence[str]) -> list[TestRun]:
        if not agent_ids:
            return []
        query = select(TestRun).where(
            TestRun.agent_id.in_(list(agent_ids)), TestRun.status.in_(ACTIVE)
        )
        with self.sessions() as s:
            return list(s.scalars(query))
