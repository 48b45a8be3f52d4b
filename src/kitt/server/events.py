"""In-process wake-ups for live streams: "test X has something new".

Subscribers re-read the database after a wake-up, so the database stays the single
source of truth: a slow subscriber can never lose lines, and a notification carries no
data that could go stale. With several server instances on one PostgreSQL database, a
relay (server/event_relay.py) carries every topic to the other instances too.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

# The topic of "some agent's row may have changed" (test topics are test ids, ``tst_…``).
FLEET_TOPIC = "fleet"
# "Agent X has new work" (a submit or a cancel): other instances' dispatchers then look at
# X's pending tests when its heartbeat reaches them.
WORK_TOPIC_PREFIX = "work:"


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: defaultdict[str, set[threading.Event]] = defaultdict(set)
        self._observers: list[tuple[str, Callable[[str], None]]] = []
        self.closed = False
        # Set when other server instances share the database: told every local topic.
        self.relay: Callable[[str], None] | None = None

    def observe(self, prefix: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(rest of the topic)`` for every topic starting with ``prefix``,
        local or from another instance (set up before the server serves requests)."""
        self._observers.append((prefix, callback))

    def close(self) -> None:
        """Server stopping: wake every subscriber so its stream ends and frees its thread."""
        self.closed = True
        self.wake_all()

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
        """Something about ``topic`` has committed: wake its followers here and on every
        other instance."""
        self.notify_local(topic)
        if self.relay is not None:
            self.relay(topic)

    def notify_local(self, topic: str) -> None:
        with self._lock:
            subs = list(self._subscribers.get(topic, ()))
        for wake in subs:
            wake.set()
        for prefix, callback in self._observers:
            if topic.startswith(prefix):
                callback(topic[len(prefix) :])

    def wake_all(self) -> None:
        """Every follower re-reads (wake-ups from other instances may have been missed)."""
        with self._lock:
            subs = [w for ws in self._subscribers.values() for w in ws]
        for wake in subs:
            wake.set()
