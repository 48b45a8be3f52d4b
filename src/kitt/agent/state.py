"""The agent's live state, read by the status endpoint and the heartbeat."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from kitt.protocol import AgentRunState


@dataclass(frozen=True)
class Snapshot:
    agent_id: str | None
    status: AgentRunState
    current_task: str | None
    last_heartbeat_ok: datetime | None
    last_error: str | None
    uptime_s: float
    closing: bool = False
    # Why reports cannot be written to the spool (its disk is full), None when they can.
    spool_error: str | None = None

    @property
    def problems(self) -> str | None:
        """Everything wrong now, for ``last_error``: the spool, then the server link."""
        return "; ".join(p for p in (self.spool_error, self.last_error) if p) or None


class AgentState:
    """Thread-safe; every reader gets a consistent :class:`Snapshot`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.pid = os.getpid()
        self._snap = Snapshot(None, "idle", None, None, None, 0.0)

    def _update(self, **changes: object) -> None:
        with self._lock:
            self._snap = replace(self._snap, **changes)  # type: ignore[arg-type]

    def snapshot(self) -> Snapshot:
        with self._lock:
            return replace(self._snap, uptime_s=round(time.monotonic() - self._started, 3))

    def registered(self, agent_id: str) -> None:
        self._update(agent_id=agent_id, last_error=None)

    def forget_registration(self) -> None:
        self._update(agent_id=None)

    def heartbeat_ok(self) -> None:
        self._update(last_heartbeat_ok=datetime.now(timezone.utc), last_error=None)

    def server_error(self, message: str) -> None:
        self._update(last_error=message)

    def spool_problem(self, message: str | None) -> None:
        self._update(spool_error=message)

    def set_task(self, status: AgentRunState, current_task: str | None) -> None:
        self._update(status=status, current_task=current_task)

    def set_closing(self) -> None:
        """The agent is stopping: it takes no new work and must not look available."""
        self._update(closing=True)
