"""Settings the server pushes to this agent (``kitt agents set``), applied while it runs.

Every register and heartbeat response carries the whole set of keys set on the server, so
a key removed there simply goes back to its default here, and an agent that restarts
has them again from its registration. The server checks what it stores, and the agent
checks again (defence in depth: the server is not trusted with agent.yaml's paths,
binaries or endpoints): an unknown, local-only or out-of-range value is skipped with one
warning, never a crash and never a refused heartbeat.

Who uses what, each reading it when it next needs it (no restart, no callbacks):

* the heartbeat thread: its interval (``apply`` returns it);
* ``LogShipper``: the lines per log report, from its next batch;
* ``serving_job``: the telemetry interval and the engine's startup timeout, as default
  parameters of serving tests accepted afterwards. They go into the test's parameters
  only where the test did not set them, so ``kitt bench serve`` needs no new input and
  the result document records the values the run used.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from kitt.protocol import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_LOG_BATCH_LINES,
    DEFAULT_TELEMETRY_INTERVAL_S,
    ENGINE_SETTING_PREFIX,
    AgentSettings,
    parse_settings_leniently,
)

log = logging.getLogger(__name__)


class PushedSettings:
    """The settings in force on this agent; thread-safe (the heartbeat thread writes, job
    and request threads read)."""

    def __init__(self, engine_timeouts: Mapping[str, float] | None = None) -> None:
        """``engine_timeouts``: the engines this agent has, with their own startup timeout
        (agent.yaml or shipped); engine settings for any other engine are ignored."""
        self._lock = threading.Lock()
        self._engines = dict(engine_timeouts or {})
        self._settings = AgentSettings()
        self._received: dict[str, Any] | None = None
        self._server_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S

    def set_engines(self, engine_timeouts: Mapping[str, float]) -> None:
        """The engines found at start (binaries are looked for then, not at construction)."""
        with self._lock:
            self._engines = dict(engine_timeouts)
            if self._received is not None:
                self._adopt(self._received)

    def apply(self, pushed: Mapping[str, Any], server_interval_s: float) -> float:
        """Adopt what the server sent; returns the heartbeat interval to use from now on
        (the pushed one, else the server's)."""
        with self._lock:
            if server_interval_s > 0:
                self._server_interval_s = server_interval_s
            if self._received is None or dict(pushed) != self._received:
                # The same set arrives with every heartbeat: only a change is worked on
                # (and warned about) again.
                self._received = dict(pushed)
                self._adopt(self._received)
            return self._heartbeat_interval_s()

    def _adopt(self, pushed: dict[str, Any]) -> None:
        settings, problems = parse_settings_leniently(pushed)
        for engine in sorted(set(settings.engines) - set(self._engines)):
            problems.append(
                f"{ENGINE_SETTING_PREFIX}{engine}.*: this agent has no engine {engine!r}"
            )
            del settings.engines[engine]
        if problems:
            log.warning("ignoring settings from the server: %s", "; ".join(problems))
        before, after = self._settings.flat(), settings.flat()
        for key in sorted(before.keys() | after.keys()):
            if key not in after:
                log.info("setting %s is back to its default (the server reset it)", key)
            elif before.get(key) != after[key]:
                log.info("setting %s = %g (pushed by the server)", key, after[key])
        self._settings = settings

    def _heartbeat_interval_s(self) -> float:
        return self._settings.heartbeat_interval_s or self._server_interval_s

    def log_batch_lines(self) -> int:
        """Lines per log report (``LogShipper``), read at every batch."""
        with self._lock:
            return self._settings.log_batch_lines or DEFAULT_LOG_BATCH_LINES

    def serving_defaults(self, engine: str | None) -> dict[str, Any]:
        """Parameters a serving test gets unless it sets them itself: only pushed values
        (without any, a test runs exactly as it would have)."""
        with self._lock:
            out: dict[str, Any] = {}
            if self._settings.telemetry_interval_s is not None:
                out["telemetry_interval_s"] = self._settings.telemetry_interval_s
            pushed = self._settings.engines.get(engine) if engine is not None else None
            if pushed is not None and pushed.startup_timeout_s is not None:
                out["engine_timeout_s"] = pushed.startup_timeout_s
            return out

    def effective(self) -> dict[str, Any]:
        """Every value in force, flat as ``kitt agents set`` names them (for the status)."""
        with self._lock:
            s = self._settings
            out: dict[str, Any] = {
                "heartbeat_interval_s": self._heartbeat_interval_s(),
                "log_batch_lines": s.log_batch_lines or DEFAULT_LOG_BATCH_LINES,
                "telemetry_interval_s": s.telemetry_interval_s or DEFAULT_TELEMETRY_INTERVAL_S,
            }
            for engine, own in sorted(self._engines.items()):
                pushed = s.engines.get(engine)
                timeout = pushed.startup_timeout_s if pushed is not None else None
                out[f"{ENGINE_SETTING_PREFIX}{engine}.startup_timeout_s"] = timeout or own
            return out
