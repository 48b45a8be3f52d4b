"""Getting commands to agents: pushed at once, or carried by the next heartbeat response.

A submit wakes a worker that POSTs the command to the agent's ``/api/commands``. When
the agent cannot be reached (down, behind NAT) the test simply stays ``queued``, and the
agent's next idle heartbeat carries it. Delivery is at-least-once; agents drop a
``command_id`` they have already seen. One test at a time per agent is enforced here
too, so an agent is never sent a second test while one is dispatched or running.

The heartbeat handler is the hottest path on the server, so it only consults the
database for agents in :attr:`_pending` (an in-memory set rebuilt at start and kept
current by every change that creates or clears pending work). With several server
instances, a submit on one instance reaches the others' sets through the event hub's
``work:<agent id>`` topic (PostgreSQL NOTIFY), and each instance re-reads the set from the
database every ``resync_every_s`` and after its relay reconnects, in case a notification
was lost. Whichever instance the agent's heartbeat reaches then carries the test; the
dispatch itself is a row-locked compare-and-set (store/tests.py), so two instances never
both record one test as dispatched, nor two tests for one agent. One window remains, as
within one instance: a push is recorded just after the agent accepted it, so a heartbeat
that left the agent while it was still idle, answered in those milliseconds, can carry a
second test; the agent refuses it (one test at a time) and it fails saying so.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from kitt.apiclient import ApiClient
from kitt.errors import ApiError, KittError
from kitt.http import build_client
from kitt.protocol import Command, CommandAccepted, RunTestPayload
from kitt.server.events import WORK_TOPIC_PREFIX, EventHub
from kitt.server.lifecycle import IllegalTransitionError
from kitt.server.store.agents import AgentStore
from kitt.server.store.credentials import CredentialStore
from kitt.server.store.db import describe_error
from kitt.server.store.models import TestRun
from kitt.server.store.tests import TestStore

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 5.0
# A test still "dispatched" this long after it was sent never reached its agent (the
# heartbeat response carrying it was lost): the next idle heartbeat carries it again.
REDELIVER_AFTER_S = 10.0


def cancel_command_id(test: TestRun) -> str:
    return f"{test.command_id}-cancel"


def command_for(test: TestRun) -> Command:
    if test.status in ("dispatched", "running") and test.cancel_requested:
        return Command(command_id=cancel_command_id(test), type="cancel", test_id=test.id)
    payload = RunTestPayload(
        benchmark=test.benchmark, engine=test.engine, model=test.model, params=test.params
    )
    return Command(
        command_id=test.command_id,
        type="run_test",
        test_id=test.id,
        payload=payload.model_dump(mode="json"),
    )


class Dispatcher:
    def __init__(
        self,
        tests: TestStore,
        agents: AgentStore,
        credentials: CredentialStore | None = None,
        push_context: ssl.SSLContext | None = None,
        hub: EventHub | None = None,
        resync_every_s: float | None = None,
    ) -> None:
        """``push_context`` (HTTPS servers) carries the server's certificate as a client
        certificate; agents accept commands only from it. ``hub`` tells other server
        instances of new work (and this one of theirs); ``resync_every_s`` re-reads the
        pending set from the database that often (several instances only)."""
        self._tests = tests
        self._agents = agents
        self._credentials = credentials
        self._push_context = push_context
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._generation: dict[str, int] = {}
        self._wake: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._hub = hub
        self._resync_every_s = resync_every_s
        if hub is not None:
            hub.observe(WORK_TOPIC_PREFIX, self.note_pending)
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        # Told, once per test, how long it waited from submission to delivery (metrics).
        self.on_dispatched: Callable[[float], None] = lambda _seconds: None

    def start(self) -> None:
        with self._lock:
            self._pending = self._tests.agents_with_pending_work()
        self._thread.start()
        for agent_id in list(self._pending):
            self._wake.put(agent_id)

    def stop(self) -> None:
        self._wake.put(None)
        self._thread.join(timeout=PUSH_TIMEOUT_S + 2)

    def wake(self, agent_id: str) -> None:
        """New work for ``agent_id`` (a submit or a cancel): try to push it now."""
        if self._hub is not None:  # its observer (note_pending) runs here too
            self._hub.notify(WORK_TOPIC_PREFIX + agent_id)
        else:
            self.note_pending(agent_id)
        self._wake.put(agent_id)

    def note_pending(self, agent_id: str) -> None:
        """``agent_id`` has work (perhaps submitted on another instance, which pushes
        it): its next heartbeat here looks."""
        with self._lock:
            self._pending.add(agent_id)
            self._generation[agent_id] = self._generation.get(agent_id, 0) + 1

    def resync(self) -> None:
        """Add every agent the database says has pending work (notifications from other
        instances may have been lost); ``refresh`` drops those that have none left."""
        for agent_id in self._tests.agents_with_pending_work():
            self.note_pending(agent_id)

    def refresh(self, agent_id: str) -> None:
        """A test of this agent changed state; drop it from the fast set if nothing is left.

        The query runs outside the lock, so a ``wake`` may land meanwhile: the generation
        counter tells, and then the agent stays (its new work must not be forgotten)."""
        with self._lock:
            seen = self._generation.get(agent_id, 0)
        if not self._tests.pending_for(agent_id):
            with self._lock:
                if self._generation.get(agent_id, 0) == seen:
                    self._pending.discard(agent_id)

    def for_heartbeat(self, agent_id: str, agent_status: str) -> list[dict[str, Any]]:
        """Commands to return in this agent's heartbeat response (usually none, cheaply)."""
        with self._lock:
            if agent_id not in self._pending:
                return []
        commands = []
        now = datetime.now(timezone.utc)
        for test in self._tests.pending_for(agent_id):
            if test.status == "dispatched" and not test.cancel_requested:
                sent = test.dispatched_at or now
                if agent_status == "idle" and (now - sent).total_seconds() > REDELIVER_AFTER_S:
                    log.info("re-sending test %s to %s (never confirmed)", test.id, test.agent_name)
                    commands.append(command_for(test).model_dump(mode="json"))
                continue
            if test.status == "queued":
                if agent_status != "idle" or self._tests.has_active(agent_id):
                    continue
                if not self._mark_dispatched(test, "heartbeat"):
                    continue
            commands.append(command_for(test).model_dump(mode="json"))
            if test.status == "queued":
                break  # one run_test per delivery
        self.refresh(agent_id)
        return commands

    def _mark_dispatched(self, test: TestRun, how: str, sent_at: datetime | None = None) -> bool:
        try:
            _, changed = self._tests.transition(
                test.id, "dispatched", dispatched_at=sent_at or datetime.now(timezone.utc)
            )
        except IllegalTransitionError as exc:
            if how == "push" and exc.current in ("running", "completed", "failed"):
                self._overtaken(test)
            return False  # cancelled or dispatched meanwhile
        except KeyError:
            return False
        if changed:
            log.info("test %s dispatched to %s via %s", test.id, test.agent_name, how)
            self._delivered(test)
        return changed

    def _delivered(self, test: TestRun) -> None:
        waited = (datetime.now(timezone.utc) - test.created_at).total_seconds()
        self.on_dispatched(max(0.0, waited))

    def _overtaken(self, test: TestRun) -> None:
        """The agent's own report landed before this accepted push was recorded: the push
        still delivered it, unless a heartbeat had carried it first (the report's
        transition then found ``dispatched_at`` set, else it set it to the start)."""
        current = self._tests.get(test.id)
        if current is not None and current.dispatched_at in (
            current.started_at,
            current.finished_at,
        ):
            self._delivered(test)

    def _run(self) -> None:
        next_resync = time.monotonic() + (self._resync_every_s or 0.0)
        while True:
            try:
                agent_id = self._wake.get(timeout=self._resync_every_s)
            except queue.Empty:
                agent_id = ""
            if agent_id is None:
                return
            if self._resync_every_s and time.monotonic() >= next_resync:
                next_resync = time.monotonic() + self._resync_every_s
                try:
                    self.resync()
                except Exception as exc:
                    log.warning("cannot re-read pending work (%s); retrying later",
                                describe_error(exc))  # fmt: skip
            if not agent_id:
                continue
            try:
                self._push_pending(agent_id)
            except Exception:
                log.exception(
                    "push to agent %s failed unexpectedly; the heartbeat will carry it", agent_id
                )

    def _push_pending(self, agent_id: str) -> None:
        agent = self._agents.find(agent_id)
        if agent is None or not agent.online or not agent.address:
            return
        host = f"[{agent.address}]" if ":" in agent.address else agent.address
        scheme = "https" if self._push_context is not None else "http"
        key = self._credentials.push_key(agent.name) if self._credentials is not None else None
        with build_client(
            f"{scheme}://{host}:{agent.port}",
            token=key,
            timeout=PUSH_TIMEOUT_S,
            ssl_context=self._push_context,
        ) as http:
            api = ApiClient(http, tls_name=agent.name)
            for test in self._tests.pending_for(agent_id):
                if test.status == "dispatched" and not test.cancel_requested:
                    continue  # already sent; re-sending is the heartbeat's job
                if test.status == "queued" and self._tests.has_active(agent_id):
                    break
                if not self._push(api, test):
                    break
        self.refresh(agent_id)

    def _push(self, api: ApiClient, test: TestRun) -> bool:
        """Push one command; False stops pushing to this agent for now."""
        command = command_for(test)
        sent_at = datetime.now(timezone.utc)
        try:
            api.call("POST", "/api/commands", CommandAccepted, command)
        except ApiError as exc:
            if exc.status == 409:
                log.info("agent %s is busy; test %s stays queued", test.agent_name, test.id)
                return False
            if command.type == "cancel" and exc.status == 404:
                self._cancel_unknown_to_agent(test)
                return True
            log.warning("agent %s refused %s for test %s: %s", test.agent_name, command.type,
                        test.id, exc.message)  # fmt: skip
            return False
        except KittError as exc:
            log.info("cannot push to agent %s (%s); the next heartbeat carries test %s",
                     test.agent_name, exc, test.id)  # fmt: skip
            return False
        if command.type == "run_test":
            self._mark_dispatched(test, "push", sent_at)
        return True

    def _cancel_unknown_to_agent(self, test: TestRun) -> None:
        """The agent never started it (e.g. it restarted): the cancel completes here."""
        with contextlib.suppress(IllegalTransitionError, KeyError):
            self._tests.transition(
                test.id, "cancelled", finished_at=datetime.now(timezone.utc),
                error="cancelled; the agent was not running it",
            )  # fmt: skip
