"""Server-Sent Events framing shared by the agent's and the server's log streams."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response, request

from kitt.jsonapi import ApiFailure
from kitt.protocol import MAX_SEQ

KEEPALIVE = ": keepalive\n\n"


def event(name: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def resume_after() -> int:
    """The last sequence number the client already has (``Last-Event-ID`` or ``?after=``)."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("after")
    if raw is None:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ApiFailure(
            400, f"Last-Event-ID / after must be a line number, got {raw[:40]!r}"
        ) from None
    if not 0 <= value <= MAX_SEQ:
        raise ApiFailure(400, f"Last-Event-ID / after must be between 0 and {MAX_SEQ}")
    return value


class _Released:
    """A response body that gives its stream slot back exactly once, when the server
    closes it (client gone or stream ended), even if it was never iterated."""

    def __init__(self, frames: Iterable[str], release: Callable[[], None]) -> None:
        self._frames = frames
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        # A retry hint first: browsers' EventSource reconnects after 2 s with Last-Event-ID.
        yield b"retry: 2000\n\n"
        for frame in self._frames:
            yield frame.encode()

    def close(self) -> None:
        close = getattr(self._frames, "close", None)
        if close is not None:
            close()
        if self._release is not None:
            self._release()
            self._release = None


class StreamSlots:
    """At most ``limit`` live streams at once. Each holds a server thread until its client
    goes away, so without a cap, idle log readers could take every worker thread from the
    heartbeats and reports the service exists for."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sem = threading.BoundedSemaphore(limit)

    def stream(self, frames: Iterable[str]) -> Response:
        if not self._sem.acquire(blocking=False):
            raise ApiFailure(503, f"too many live log streams (limit {self.limit}); retry shortly")
        return Response(
            _Released(frames, self._sem.release),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
