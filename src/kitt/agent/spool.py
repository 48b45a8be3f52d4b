"""Durable outbound reports: write to disk first, deliver in order, delete on acknowledgement.

Every status change and result goes through here, so a server that is down, a network
cut or an agent restart loses nothing: items are files in ``$KITT_HOME/spool`` (written
atomically, 0600, named by a sequence number), and the sender retries with backoff until
the server answers 2xx. A 4xx means retrying can never succeed (the server no longer
knows the test, the transition is illegal): the item moves to ``spool/rejected/`` for
an operator to inspect instead of blocking everything behind it or vanishing.

A full (or read-only) spool disk must not stop a running test nor lose its reports:
what cannot be written waits in memory, in order, behind what is on disk (it is written
out once the disk has room again, or delivered straight from memory when the server
answers first), and the agent says why in its log and ``last_error``. Memory is capped:
past the cap log batches are dropped (counted in the log), status changes and results
never are.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from kitt.agent.heartbeat import Backoff
from kitt.agent.server_client import ServerClient
from kitt.agent.state import AgentState
from kitt.errors import ApiError, KittError
from kitt.paths import PRIVATE_DIR, ensure_dir, write_private

log = logging.getLogger(__name__)

AGENT_ID = "{agent_id}"
HELD_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Held:
    """A report the disk had no room for: its file name-to-be and its JSON text."""

    name: str
    text: str


class Spool:
    def __init__(
        self,
        directory: Path,
        on_problem: Callable[[str | None], None] | None = None,
        held_max_bytes: int = HELD_MAX_BYTES,
    ) -> None:
        self.directory = ensure_dir(directory, PRIVATE_DIR)
        self.rejected = self.directory / "rejected"
        self._lock = threading.Lock()
        # A crash mid-write leaves a temp file (never an item): free its space.
        for leftover in self.directory.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        existing = [int(p.name.split("-", 1)[0]) for p in self.items()]
        self._seq = max(existing, default=0)
        self.changed = threading.Event()
        self._held: deque[Held] = deque()
        self._held_bytes = 0
        self._held_max = held_max_bytes
        self._dropped = 0
        self._on_problem = on_problem
        self.problem: str | None = None

    def put(self, kind: str, path: str, body: dict[str, Any]) -> None:
        """Persist one report; ``path`` may contain ``{agent_id}``, filled in when sent."""
        text = json.dumps({"path": path, "body": body})
        with self._lock:
            self._seq += 1
            name = f"{self._seq:012d}-{kind}.json"
            # Once anything waits in memory, later reports wait behind it (order matters:
            # a result must never overtake its test's last log lines).
            if self._held or not self._write(name, text, fsync=kind != "logs"):
                self._hold(Held(name, text), kind)
        self.changed.set()

    def _write(self, name: str, text: str, fsync: bool = True) -> bool:
        # Status changes and results are fsynced; log batches (many a second) are not:
        # they survive an agent crash, and a power cut loses at most the last batches.
        try:
            write_private(self.directory / name, text, fsync=fsync)
        except (OSError, KittError) as exc:
            reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
            self._set_problem(
                f"cannot write reports to the spool {self.directory} ({reason}); they wait "
                "in memory until it has room (free space on that disk)"
            )
            return False
        self._set_problem(None)
        return True

    def _hold(self, item: Held, kind: str) -> None:
        if kind == "logs" and self._held_bytes + len(item.text) > self._held_max:
            if not self._dropped:
                log.error("the spool is full and %d bytes of reports wait in memory: log "
                          "batches are dropped until it has room", self._held_bytes)  # fmt: skip
            self._dropped += 1
            return
        self._held.append(item)
        self._held_bytes += len(item.text)

    def _set_problem(self, problem: str | None) -> None:
        if problem == self.problem:
            return
        if problem is not None and self.problem is None:
            log.error("%s", problem)
        elif problem is None:
            dropped = f"; {self._dropped} log batch(es) were dropped" if self._dropped else ""
            level = logging.WARNING if self._dropped else logging.INFO
            log.log(level, "the spool %s is writable again%s", self.directory, dropped)
            self._dropped = 0
        self.problem = problem
        if self._on_problem is not None:
            self._on_problem(problem)

    def write_held(self) -> None:
        """Move what waits in memory to disk, oldest first, as far as there is room."""
        with self._lock:
            while self._held and self._write(self._held[0].name, self._held[0].text):
                self._release_first()

    def first_held(self) -> Held | None:
        with self._lock:
            return self._held[0] if self._held else None

    def release(self, item: Held) -> None:
        """``item`` (the oldest held) was delivered from memory."""
        with self._lock:
            if self._held and self._held[0] is item:
                self._release_first()

    def _release_first(self) -> None:
        self._held_bytes -= len(self._held.popleft().text)

    def held_count(self) -> int:
        with self._lock:
            return len(self._held)

    # The three kinds of report, each to its endpoint (ARCHITECTURE.md §4).

    def put_status(self, test_id: str, body: dict[str, Any]) -> None:
        self.put("status", f"/api/v1/agents/{AGENT_ID}/tests/{test_id}/status", body)

    def put_logs(self, test_id: str, lines: list[dict[str, Any]]) -> None:
        self.put("logs", f"/api/v1/agents/{AGENT_ID}/tests/{test_id}/logs", {"lines": lines})

    def put_result(self, body: dict[str, Any]) -> None:
        self.put("result", f"/api/v1/agents/{AGENT_ID}/results", body)

    def items(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("*.json") if p.name[0].isdigit())

    def _rejected_name(self, name: str) -> Path:
        """A unique name, because sequence numbers restart after a restart."""
        return self.rejected / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}-{name}"

    def reject(self, item: Path) -> None:
        """Set an item aside."""
        ensure_dir(self.rejected, PRIVATE_DIR)
        os.replace(item, self._rejected_name(item.name))

    def reject_held(self, item: Held) -> None:
        """Set a report refused straight from memory aside, if the disk has room for it."""
        try:
            write_private(self._rejected_name(item.name), item.text)
        except (OSError, KittError) as exc:
            log.error("cannot keep the refused report %s in %s: %s", item.name, self.rejected, exc)


class SpoolSender(threading.Thread):
    def __init__(
        self, spool: Spool, client: ServerClient, state: AgentState, backoff_max_s: float
    ) -> None:
        super().__init__(name="spool-sender", daemon=True)
        self._spool = spool
        self._client = client
        self._state = state
        self._backoff = Backoff(base=0.5, cap=backoff_max_s)
        self._stop_event = threading.Event()
        self._failing = False

    def stop(self) -> None:
        self._stop_event.set()
        self._spool.changed.set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._spool.changed.wait(1.0)
            self._spool.changed.clear()
            delay = self.deliver()
            if delay:
                self._stop_event.wait(delay)

    def deliver(self) -> float:
        """Send everything in order; returns a retry delay, or 0 when the spool is empty."""
        self._spool.write_held()
        agent_id = self._state.snapshot().agent_id
        if agent_id is None:
            return 0.5 if self._spool.items() or self._spool.first_held() else 0.0
        while True:
            items = self._spool.items()
            for item in items:
                try:
                    entry = json.loads(item.read_text())
                except (OSError, ValueError) as exc:
                    log.error("unreadable spool item %s (%s); moved aside", item.name, exc)
                    self._spool.reject(item)
                    continue
                delay = self._send(item.name, entry, agent_id, partial(self._spool.reject, item))
                if delay is not None:
                    return delay
                item.unlink(missing_ok=True)
            if items:
                continue  # written meanwhile (older than anything held): those go first
            # What the full disk could not take comes after everything on disk.
            held = self._spool.first_held()
            if held is None:
                return 0.0
            entry = json.loads(held.text)
            delay = self._send(held.name, entry, agent_id, partial(self._spool.reject_held, held))
            if delay is not None:
                return delay
            self._spool.release(held)

    def _send(
        self, name: str, entry: dict[str, Any], agent_id: str, set_aside: Callable[[], None]
    ) -> float | None:
        """Post one report: None once done with it (acknowledged, or refused and set
        aside), else how long to wait before retrying."""
        try:
            self._client.post_json(entry["path"].replace(AGENT_ID, agent_id), entry["body"])
        except ApiError as exc:
            # 401: this agent's token was revoked or the server forgot it; once the
            # operator enrolls it again the reports are still wanted. Keep them.
            if exc.status >= 500 or exc.status == 401:
                return self._retry(name, exc)
            log.warning("server rejected %s (%s); kept in %s", name, exc, self._spool.rejected)
            set_aside()
            self._end_test_without_result(name, entry, exc)
            return None
        except KittError as exc:
            return self._retry(name, exc)
        if self._failing:
            log.info("spooled reports are being delivered again")
            self._failing = False
        self._backoff.reset()
        return None

    def _end_test_without_result(self, name: str, entry: dict[str, Any], exc: ApiError) -> None:
        """A refused result (too large, invalid) must still end its test on the server."""
        if not name.endswith("-result.json") or exc.status in (403, 404, 409):
            return  # not a result, or the server does not want this test's reports at all
        test_id = entry["body"].get("test_id")
        if isinstance(test_id, str):
            self._spool.put_status(
                test_id,
                {"status": "failed", "error": f"the server refused the result: {exc.message}"},
            )

    def _retry(self, name: str, exc: KittError) -> float:
        if not self._failing:
            log.warning("cannot deliver %s yet (%s); will retry", name, exc)
            self._failing = True
        return self._backoff.next()
