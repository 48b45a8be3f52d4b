"""Queries about tests: creation, state changes under the state machine, listing."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from kitt.server.lifecycle import IllegalTransitionError, check
from kitt.server.store.models import TestRun

ACTIVE = ("dispatched", "running")


def new_test_id() -> str:
    return f"tst_{uuid.uuid4().hex[:20]}"


def new_command_id() -> str:
    return f"cmd_{uuid.uuid4().hex[:20]}"


class TestStore:
    __test__ = False

    def __init__(self, engine: Engine, on_change: Callable[[str], None] | None = None) -> None:
        self.sessions = sessionmaker(engine, expire_on_commit=False)
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

    def transition(self, test_id: str, wanted: str, **fields: Any) -> tuple[TestRun, bool]:
        """Move a test to ``wanted`` (checked), setting ``fields`` only when it changes.

        Returns the test and whether anything changed. The row is re-read inside the
        transaction so two racing reports cannot both apply.
        """
        with self.sessions.begin() as s:
            test = _locked(s, test_id)
            if test is None:
                raise KeyError(test_id)
            changed = check(test_id, test.status, wanted)
            if changed:
                if test.status == "queued" and wanted not in ("dispatched", "cancelled"):
                    # The agent's report overtook the dispatcher's record of the push.
                    test.dispatched_at = fields.get("started_at") or fields.get("finished_at")
                test.status = wanted
                for key, value in fields.items():
                    if value is not None:
                        setattr(test, key, value)
        if changed:
            self._on_change(test_id)
        return test, changed

    def request_cancel(self, test_id: str, now: datetime) -> TestRun:
        """Cancel a queued test outright; flag an active one for its agent to stop."""
        with self.sessions.begin() as s:
            test = _locked(s, test_id)
            if test is None:
                raise KeyError(test_id)
            if test.status == "queued":
                check(test_id, test.status, "cancelled")
                test.status = "cancelled"
                test.finished_at = now
                test.error = "cancelled before it was dispatched"
            elif test.status in ACTIVE:
                test.cancel_requested = True
            else:  # it has already ended, cancelled included
                raise IllegalTransitionError(test_id, test.status, "cancelled")
        self._on_change(test_id)
        return test

    def pending_for(self, agent_id: str) -> list[TestRun]:
        """Work for one agent: queued tests (oldest first) and active tests to cancel."""
        query = (
            select(TestRun)
            .where(TestRun.agent_id == agent_id)
            .where(
                (TestRun.status == "queued")
                | (TestRun.status.in_(ACTIVE) & TestRun.cancel_requested.is_(True))
            )
            .order_by(TestRun.created_at)
        )
        with self.sessions() as s:
            return list(s.scalars(query))

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
        query = select(TestRun.agent_id).where(
            (TestRun.status == "queued")
            | (TestRun.status.in_(ACTIVE) & TestRun.cancel_requested.is_(True))
        )
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


def _locked(s: Session, test_id: str) -> TestRun | None:
    return s.scalars(select(TestRun).where(TestRun.id == test_id).with_for_update()).first()
