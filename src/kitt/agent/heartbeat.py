"""Registration and heartbeats: one thread that keeps the agent known to the server.

The agent never exits because the server is down. Until registration succeeds it
retries with capped exponential backoff and full jitter (so a fleet restarting after
an outage does not stampede the server); a heartbeat answered with 404 means the
server lost its database, and the agent simply registers again.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kitt import __version__
from kitt.agent.hardware import HostLoad
from kitt.agent.server_client import AgentUnknownError, ServerClient
from kitt.agent.settings import PushedSettings
from kitt.agent.state import AgentState
from kitt.agent.telemetry import GpuTelemetry, aggregate
from kitt.errors import KittError
from kitt.protocol import DEFAULT_HEARTBEAT_INTERVAL_S, Heartbeat, RegisterRequest

log = logging.getLogger(__name__)

JITTER = 0.1  # ±10 % on the heartbeat interval so agents started together drift apart


class Backoff:
    """Exponential backoff with "equal jitter": uniform(c/2, c), c = min(cap, base·2^n).

    Half the delay is kept so retries never bunch up at zero; the random half spreads a
    fleet that lost its server at the same moment.
    """

    def __init__(self, base: float = 1.0, cap: float = 60.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 32)
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto

    def reset(self) -> None:
        self.attempt = 0


class HeartbeatThread(threading.Thread):
    def __init__(
        self,
        client: ServerClient,
        state: AgentState,
        telemetry: GpuTelemetry,
        registration: RegisterRequest,
        backoff_max_s: float,
        on_commands: Callable[[list[dict[str, Any]]], None] | None = None,
        on_token: Callable[[str], None] | None = None,
        settings: PushedSettings | None = None,
    ) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self._client = client
        self._state = state
        self._telemetry = telemetry
        self._registration = registration
        self._on_commands = on_commands
        self._on_token = on_token
        self._settings = settings
        self._stop_event = threading.Event()
        self._backoff = Backoff(cap=backoff_max_s)
        self._load = HostLoad()
        self.interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self._failing = False
        # Set once the first registration attempt is over, whatever its outcome, so that
        # `kitt agent start` can say "registered" or "server unreachable" truthfully.
        self.first_attempt_done = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def set_interval(self, interval_s: float) -> bool:
        """Beat every ``interval_s`` from the next beat on; True when that is a change.

        Settings only arrive in this thread's own responses, so the wait that follows a
        response already uses the new interval: nothing needs waking.
        """
        if interval_s <= 0 or interval_s == self.interval_s:
            return False
        self.interval_s = interval_s
        return True

    def run(self) -> None:
        while not self._stop_event.is_set():
            registered = self._state.snapshot().agent_id is not None
            try:
                delay = self._beat() if registered else self._register()
            except Exception as exc:  # a bug must not silently end the agent's heartbeat
                log.exception("unexpected error in the heartbeat loop")
                self._state.server_error(f"internal error: {exc}")
                delay = self._backoff.next()
            if delay > 0:
                self._stop_event.wait(delay)

    def _register(self) -> float:
        try:
            resp = self._client.register(self._registration)
        except KittError as exc:
            return self._failed("registration", exc)
        finally:
            self.first_attempt_done.set()
        if resp.token and self._on_token is not None:
            self._on_token(resp.token)
        self._state.registered(resp.agent_id)
        self._adopt_settings(resp.settings, resp.heartbeat_interval_s)
        self._recovered()
        log.info(
            "registered as %s with id %s (heartbeat every %g s)",
            self._registration.name,
            resp.agent_id,
            self.interval_s,
        )
        return 0.0

    def _beat(self) -> float:
        snap = self._state.snapshot()
        assert snap.agent_id is not None  # noqa: S101 - run() only calls us when registered
        if snap.closing and snap.status == "idle":
            # Stopping: an "idle" heartbeat would invite the server to send a new test.
            return self._jittered()
        gpus = self._telemetry.sample()
        util, mem = aggregate(gpus)
        cpu, ram = self._load.sample()
        beat = Heartbeat(
            status=snap.status,
            current_task=snap.current_task,
            gpu_utilization_pct=util,
            gpu_memory_used_gb=mem,
            uptime_s=snap.uptime_s,
            gpus=gpus,
            cpu_percent=cpu,
            ram_used_gb=ram,
            kitt_version=__version__,
        )
        try:
            resp = self._client.heartbeat(snap.agent_id, beat)
        except AgentUnknownError:
            log.warning("the server no longer knows agent id %s; registering again", snap.agent_id)
            self._state.forget_registration()
            return 0.0
        except KittError as exc:
            return min(self._failed("heartbeat", exc), self._jittered())
        self._state.heartbeat_ok()
        self._recovered()
        if resp.commands and self._on_commands is not None:
            self._on_commands(resp.commands)
        if self._adopt_settings(resp.settings, resp.heartbeat_interval_s):
            log.info("heartbeat interval is now %g s", self.interval_s)
        return self._jittered()

    def _adopt_settings(self, pushed: Mapping[str, Any], server_interval_s: float) -> bool:
        """Apply the settings a response carried; True when the interval changed."""
        interval = server_interval_s
        if self._settings is not None:
            interval = self._settings.apply(pushed, server_interval_s)
        return self.set_interval(interval)

    def _jittered(self) -> float:
        return self.interval_s * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311

    def _failed(self, what: str, exc: KittError) -> float:
        self._state.server_error(str(exc))
        delay = self._backoff.next()
        # Log the first failure and then stay quiet until it recovers: an agent left
        # running through a long server outage must not fill its disk with one line.
        if not self._failing:
            log.warning(
                "%s failed: %s (retrying with backoff up to %g s)", what, exc, self._backoff.cap
            )
            self._failing = True
        else:
            log.debug("%s failed again: %s; next try in %.1f s", what, exc, delay)
        return delay

    def _recovered(self) -> None:
        if self._failing:
            log.info("server reachable again")
        self._failing = False
        self._backoff.reset()
