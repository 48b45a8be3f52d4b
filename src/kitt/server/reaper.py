"""Background housekeeping: mark silent agents offline, prune old heartbeat history and
the logs of tests finished long ago (when a log retention is set).

Offline is decided here on a clock, not computed when someone lists agents, so the
stored state (and everything that reads it later: dispatch, metrics, the dashboard)
agrees with what a user sees.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from sqlalchemy.exc import InterfaceError, OperationalError

from kitt.server.lifecycle import IllegalTransitionError
from kitt.server.settings import ServerSettings
from kitt.server.store.agents import AgentStore
from kitt.server.store.credentials import CredentialStore
from kitt.server.store.db import describe_error
from kitt.server.store.logs import LogStore
from kitt.server.store.retention import pruning_turn
from kitt.server.store.tests import TestStore

log = logging.getLogger(__name__)

CERT_CHECK_EVERY_S = 60.0
CERT_WARN_REPEAT_S = 3600.0  # one warning per agent per hour, not one per check


class Reaper(threading.Thread):
    def __init__(
        self,
        store: AgentStore,
        tests: TestStore,
        settings: ServerSettings,
        started: datetime | None = None,
        credentials: CredentialStore | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="reaper", daemon=True)
        self._store = store
        self._tests = tests
        self._logs = LogStore(store.engine)
        self._settings = settings
        self._credentials = credentials
        self._on_tick = on_tick
        self._stop_event = threading.Event()
        # Check often enough that "offline after 3 intervals" is late by at most half an
        # interval, but never spin faster than twice a second.
        self.period_s = max(0.5, min(settings.heartbeat_interval_s / 2, 15.0))
        self._last_prune = 0.0
        self._last_cert_check = float("-inf")
        self._warned: dict[str, float] = {}
        # Silence is only counted from this server's start: after an outage, agents get
        # their full allowance to heartbeat again before being called offline or lost.
        self._counting_from = started or datetime.now(timezone.utc)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        logs = self._settings.log_retention_s
        log.info(
            "retention: heartbeat history %s, test logs %s; pruned every %s",
            timedelta(seconds=self._settings.heartbeat_retention_s),
            f"{timedelta(seconds=logs)} after the test finished" if logs else "kept forever",
            timedelta(seconds=self._settings.prune_every_s),
        )
        while not self._stop_event.wait(self.period_s):
            try:
                self.tick()
            except (OperationalError, InterfaceError) as exc:
                # The database is down or restarting: one line, the next pass retries.
                log.warning("reaper pass skipped: the database did not answer: %s",
                            describe_error(exc))  # fmt: skip
            except Exception:
                log.exception("reaper pass failed; retrying next period")

    def tick(self) -> None:
        if self._on_tick is not None:
            self._on_tick()
        now = datetime.now(timezone.utc)
        # Each agent by its own interval: one told to beat every 300 s is not offline after
        # 3 of the server's default intervals.
        offline = self._store.mark_offline(
            now, self._settings.heartbeat_interval_s, self._counting_from
        )
        for name, allowance in offline:
            log.warning("agent %s is offline (no heartbeat for over %g s)", name, allowance)
        lost_after = self._settings.lost_after_s
        lost_cutoff = now - timedelta(seconds=lost_after)
        gone = self._store.offline_since(lost_cutoff) if lost_cutoff >= self._counting_from else []
        for test in self._tests.active_on_offline_agents(gone):
            with contextlib.suppress(IllegalTransitionError, KeyError):
                self._tests.transition(
                    test.id, "lost", finished_at=now,
                    error=f"agent {test.agent_name} sent no heartbeat for over {lost_after:g} s",
                )  # fmt: skip
                log.warning("test %s is lost: agent %s went offline", test.id, test.agent_name)
        if time.monotonic() - self._last_prune >= self._settings.prune_every_s:
            self._last_prune = time.monotonic()
            with pruning_turn(self._store.engine) as mine:
                if mine:
                    self.prune(now)
        if time.monotonic() - self._last_cert_check >= CERT_CHECK_EVERY_S:
            self._last_cert_check = time.monotonic()
            self.warn_expiring_certs(now)

    def prune(self, now: datetime) -> None:
        """Delete what is past its retention, in short batches (store.retention says why).

        Logs go first, then heartbeats: whoever sees heartbeat history pruned knows the
        logs were considered in the same pass.
        """
        if self._settings.log_retention_s:
            cutoff = now - timedelta(seconds=self._settings.log_retention_s)
            lines, tests = self._logs.prune_finished(cutoff)
            if lines:
                log.info(
                    "pruned %d log lines of %d tests finished before %s",
                    lines, tests, cutoff.isoformat(timespec="seconds"),
                )  # fmt: skip
        horizon = now - timedelta(seconds=self._settings.heartbeat_retention_s)
        pruned = self._store.prune_heartbeats(horizon)
        if pruned:
            log.info("pruned %d heartbeat samples older than %s", pruned, horizon.isoformat())

    def warn_expiring_certs(self, now: datetime) -> list[str]:
        """Name the agents whose certificate expires soon (they renew at 2/3 of the
        lifetime, so one that shows up here has failed to renew)."""
        if self._credentials is None:
            return []
        soon = now + self._settings.cert_warn_before
        names = []
        for cred in self._credentials.all().values():
            expiry = cred.cert_not_after
            if cred.revoked_at is None and expiry is not None and expiry < soon:
                names.append(cred.name)
                last = self._warned.get(cred.name)
                if last is not None and time.monotonic() - last < CERT_WARN_REPEAT_S:
                    continue
                self._warned[cred.name] = time.monotonic()
                left = (expiry - now).total_seconds() / 86400
                log.warning(
                    "agent %s: certificate %s (renew with `kitt-agent renew` on that host)",
                    cred.name,
                    f"expires in {left:.1f} days" if left > 0 else "has EXPIRED",
                )
        return names
