"""In-process wake-ups for live streams: "test X has something new".

Subscribers re-read the database after a wake-up, so the database stays the single
source of truth: a slow subscriber can never lose lines, and a notification carries no
data that could go stale. (Several server instances will fan these out through
PostgreSQL LISTEN/NOTIFY; with one process, a dictionary of events is enough.)
"""

from __future__ import annotations

import threading
from collections import defaultdict

# The topic of "some agent's row may have changed" (test topics are test ids, ``tst_…``).
FLEET_TOPIC = "fleet"


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: defaultdict[str, set[threading.Event]] = defaultdict(set)
        self.closed = False

    def close(self) -> None:
        """Server stopping: wake every subscriber so its stream ends and frees its thread."""
        with self._lock:
            self.closed = True
            subs = [w for ws in self._subscribers.values() for w in ws]
        for wake in subs:
            wake.set()

    def subscribe(self, topic: str) -> threading.Event:
        wake = threading.Event()
        with self._lock:
            self._subscribers[topic].add(wake)
        return wake

    def unsubscribe(self, topic: str, wake: threading.Event) -> None:
        with self._lock:
            subs = self._subscribers.get(topic)
            if subs is not None:
                subs.discard(wake)
                if not subs:
                    del self._subscribers[topic]

    def notify(self, topic: str) -> None:
        with self._lock:
            subs = list(self._subscribers.get(topic, ()))
        for wake in subs:
            wake.set()
