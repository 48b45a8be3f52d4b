"""Durable outbound reports: write to disk first, deliver in order, delete on acknowledgement.

Every status change and result goes through here, so a server that is down, a network
cut or an agent restart loses nothing: items are files in ``$KITT_HOME/spool`` (written
atomically, 0600, named by a sequence number), and the sender retries with backoff until
the server answers 2xx. A 4xx means retrying can never succeed (the server no longer
knows the test, the transition is illegal): the item moves to ``spool/rejected/`` for
an operator to inspect instead of blocking everything behind it or vanishing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from kitt.agent.heartbeat import Backoff
from kitt.agent.server_client import ServerClient
from kitt.agent.state import AgentState
from kitt.errors import ApiError, KittError
from kitt.paths import PRIVATE_DIR, ensure_dir, write_private

log = logging.getLogger(__name__)

AGENT_ID = "{agent_id}"


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = ensure_dir(directory, PRIVATE_DIR)
        self.rejected = self.directory / "rejected"
        self._lock = threading.Lock()
        existing = [int(p.name.split("-", 1)[0]) for p in self.items()]
        self._seq = max(existing, default=0)
        self.changed = threading.Event()

    def put(self, kind: str, path: str, body: dict[str, Any]) -> Path:
        """Persist one report; ``path`` may contain ``{agent_id}``, filled in when sent."""
        with self._lock:
            self._seq += 1
            target = self.directory / f"{self._seq:012d}-{kind}.json"
            # Status changes and results are fsynced; log batches (many a second) are not:
            # they survive an agent crash, and a power cut loses at most the last batches.
            write_private(target, json.dumps({"path": path, "body": body}), fsync=kind != "logs")
        self.changed.set()
        return target

    # The three kinds of report, each to its endpoint (ARCHITECTURE.md §4).

    def put_status(self, test_id: str, body: dict[str, Any]) -> None:
        self.put("status", f"/api/v1/agents/{AGENT_ID}/tests/{test_id}/status", body)

    def put_logs(self, test_id: str, lines: list[dict[str, Any]]) -> None:
        self.put("logs", f"/api/v1/agents/{AGENT_ID}/tests/{test_id}/logs", {"lines": lines})

    def put_result(self, body: dict[str, Any]) -> None:
        self.put("result", f"/api/v1/agents/{AGENT_ID}/results", body)

    def items(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("*.json") if p.name[0].isdigit())

    def reject(self, item: Path) -> None:
        """Set an item aside; a unique name, because sequence numbers restart after a restart."""
        ensure_dir(self.rejected, PRIVATE_DIR)
        os.replace(
            item,
            self.rejected / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}-{item.name}",
        )


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
        agent_id = self._state.snapshot().agent_id
        if agent_id is None:
            return 0.5 if self._spool.items() else 0.0
        for item in self._spool.items():
            try:
                entry = json.loads(item.read_text())
            except (OSError, ValueError) as exc:
                log.error("unreadable spool item %s (%s); moved aside", item.name, exc)
                self._spool.reject(item)
                continue
            try:
                self._client.post_json(entry["path"].replace(AGENT_ID, agent_id), entry["body"])
            except ApiError as exc:
                # 401: this agent's token was revoked or the server forgot it; once the
                # operator enrolls it again the reports are still wanted. Keep them.
                if exc.status >= 500 or exc.status == 401:
                    return self._retry(item, exc)
                log.warning(
                    "server rejected %s (%s); kept in %s", item.name, exc, self._spool.rejected
                )
                self._spool.reject(item)
                self._end_test_without_result(item, entry, exc)
                continue
            except KittError as exc:
                return self._retry(item, exc)
            item.unlink(missing_ok=True)
            if self._failing:
                log.info("spooled reports are being delivered again")
                self._failing = False
            self._backoff.reset()
        return 0.0

    def _end_test_without_result(self, item: Path, entry: dict[str, Any], exc: ApiError) -> None:
        """A refused result (too large, invalid) must still end its test on the server."""
        if not item.name.endswith("-result.json") or exc.status in (403, 404, 409):
            return  # not a result, or the server does not want this test's reports at all
        test_id = entry["body"].get("test_id")
        if isinstance(test_id, str):
            self._spool.put_status(
                test_id,
                {"status": "failed", "error": f"the server refused the result: {exc.message}"},
            )

    def _retry(self, item: Path, exc: KittError) -> float:
        if not self._failing:
            log.warning("cannot deliver %s yet (%s); will retry", item.name, exc)
            self._failing = True
        return self._backoff.next()
