"""One reader of the fleet for every open dashboard.

Each ``/api/v1/fleet/events`` stream used to read and serialise the whole fleet on its
own, up to twice a second: with a thousand agents and twenty dashboards open, that took a
whole core from the heartbeats. A :class:`FleetFeed` reads the fleet once for all of them
and hands every stream the same, already serialised SSE text.

Its reader thread runs only while some stream is open. It wakes on the EventHub's fleet
topic (at most one read per ``coalesce_s``, however often agents beat), diffs the fleet
against its previous read and publishes a new *version*: the ``agent`` and ``removed``
frames of what changed, kept for the last few versions. A stream takes the ``snapshot``
frame of the current version on connect (built at most once per version, and only when
someone connects), then the frames of every later version in order; one that fell
further behind than the kept history (a stalled reader) gets a fresh snapshot instead,
which tells it everything the dropped versions would have.

The database stays the single source of truth, as with the log streams: a wake-up only
says "read again", so a reader that misses one still reads the newest state next time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kitt import sse
from kitt.server.events import FLEET_TOPIC, EventHub

log = logging.getLogger(__name__)

Summary = dict[str, Any]

# Reads of the fleet at most this often, however often agents beat.
COALESCE_S = 0.5
# Versions of changes kept for streams that fell behind; one further back gets a snapshot.
HISTORY_VERSIONS = 64
# ...and at most this much of their text: past it, a snapshot is the cheaper catch-up.
HISTORY_BYTES = 4 * 2**20
# After a failed read (the database busy or gone), the reader tries again this late.
RETRY_S = 5.0


class FleetFeed:
    """The fleet's live state, read once per change for every stream (see the module
    docstring). ``read`` returns every agent's summary, ordered as snapshots list them."""

    def __init__(
        self,
        read: Callable[[], list[Summary]],
        hub: EventHub,
        *,
        coalesce_s: float = COALESCE_S,
        history_versions: int = HISTORY_VERSIONS,
        history_bytes: int = HISTORY_BYTES,
    ) -> None:
        self._read = read
        self._hub = hub
        self._coalesce_s = coalesce_s
        self._history_versions = history_versions
        self._history_bytes = history_bytes
        self._cond = threading.Condition()
        # Guarded by _cond:
        self._streams = 0
        self._reader: threading.Thread | None = None
        self._wake: threading.Event | None = None  # the reader's hub subscription
        self._fresh = False  # read since the reader (re)started: no change went unseen
        self._version = 0
        self._agents: dict[str, Summary] = {}  # replaced, never changed in place
        self._changes: deque[tuple[int, str]] = deque()  # (version, its frames)
        self._kept_bytes = 0
        self._snapshot: tuple[int, str] | None = None
        self._snapshot_lock = threading.Lock()  # one build per version, however many wait
        self.reads = 0  # reads of the fleet so far (for metrics, and tests)

    @property
    def closed(self) -> bool:
        return self._hub.closed

    @property
    def running(self) -> bool:
        """Whether the reader thread runs (it does while any stream is open)."""
        with self._cond:
            return self._reader is not None

    # --- streams ------------------------------------------------------------------------

    def frames(self, keepalive_s: float) -> Iterator[str]:
        """One stream: ``snapshot``, then the changes of each new version, with
        ``: keepalive`` after ``keepalive_s`` of quiet; ends when the hub closes."""
        with self._joined():
            seen: int | None = None
            while True:
                got = self._after(seen, keepalive_s)
                if self.closed:
                    return
                if got is None:
                    yield sse.KEEPALIVE
                    continue
                seen, text = got
                yield text

    @contextmanager
    def _joined(self) -> Iterator[None]:
        """Counted as a stream while inside; the first one starts the reader, and the
        reader stops once the last one has left (it is woken to notice)."""
        with self._cond:
            self._streams += 1
            if self._reader is None:
                self._fresh = False  # what was read before may be stale by now
                self._reader = threading.Thread(target=self._run, name="fleet-feed", daemon=True)
                self._reader.start()
        try:
            yield
        finally:
            with self._cond:
                self._streams -= 1
                if self._streams == 0 and self._wake is not None:
                    self._wake.set()

    def _after(self, seen: int | None, timeout: float) -> tuple[int, str] | None:
        """The next text for a stream that has everything up to version ``seen`` (None:
        nothing yet), and the version it brings that stream to; None after ``timeout``
        with nothing new (or when the hub closed)."""
        with self._cond:
            if not self._cond.wait_for(
                lambda: self.closed or (self._fresh and (seen is None or self._version > seen)),
                timeout,
            ):
                return None
            if self.closed:
                return None
            version = self._version
            if seen is not None and self._changes and self._changes[0][0] <= seen + 1:
                return version, "".join(text for v, text in self._changes if v > seen)
        return self._snapshot_frame()

    def _snapshot_frame(self) -> tuple[int, str]:
        """The current version's ``snapshot`` frame, built once for everyone connecting."""
        with self._snapshot_lock:
            with self._cond:
                version, agents, cached = self._version, self._agents, self._snapshot
            if cached is not None and cached[0] == version:
                return cached
            # Outside _cond: the reader publishes meanwhile; ``agents`` is never mutated.
            text = sse.event("snapshot", {"agents": list(agents.values())})
            self._snapshot = (version, text)
            return version, text

    # --- the reader ---------------------------------------------------------------------

    def _run(self) -> None:
        wake = self._hub.subscribe(FLEET_TOPIC)  # before the first read: nothing slips by
        with self._cond:
            self._wake = wake
        failed = False
        try:
            while True:
                with self._cond:
                    if self._streams == 0 or self.closed:
                        self._reader = self._wake = None
                        self._cond.notify_all()  # a closed hub ends the waiting streams
                        return
                wake.clear()
                read_at = time.monotonic()
                try:
                    self._refresh()
                    failed = False
                except Exception:
                    log.exception("reading the fleet for live streams failed; trying again")
                    failed = True
                wake.wait(RETRY_S if failed else None)
                # Let the wake-ups of this moment pile up, then read once for all of them.
                rest = self._coalesce_s - (time.monotonic() - read_at)
                if rest > 0 and not self.closed:
                    time.sleep(rest)
        finally:
            self._hub.unsubscribe(FLEET_TOPIC, wake)

    def _refresh(self) -> None:
        """Read the fleet and publish what changed as a new version."""
        now = {a["id"]: a for a in self._read()}
        self.reads += 1
        with self._cond:
            before, fresh = self._agents, self._fresh
        changed = [a for i, a in now.items() if before.get(i) != a]
        removed = [a for i, a in before.items() if i not in now]
        log.debug("fleet read %d: %d agents, %d changed, %d removed",
                  self.reads, len(now), len(changed), len(removed))  # fmt: skip
        if fresh and not changed and not removed:
            return
        # No stream can be behind the first read of a (re)started reader: none has a
        # version yet, so its changes would be built for nobody.
        text = "" if not fresh else "".join(
            [sse.event("agent", a) for a in changed]
            + [sse.event("removed", {"id": a["id"], "name": a["name"]}) for a in removed]
        )  # fmt: skip
        with self._cond:
            self._version += 1
            self._agents = now
            if fresh:
                self._keep(self._version, text)
            else:
                self._changes.clear()
                self._kept_bytes = 0
                self._fresh = True
            self._cond.notify_all()

    def _keep(self, version: int, text: str) -> None:
        """Append to the bounded history (caller holds _cond)."""
        self._changes.append((version, text))
        self._kept_bytes += len(text)
        while len(self._changes) > 1 and (
            len(self._changes) > self._history_versions or self._kept_bytes > self._history_bytes
        ):
            self._kept_bytes -= len(self._changes.popleft()[1])
