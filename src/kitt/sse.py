"""Server-Sent Events framing shared by the agent's and the server's log streams."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Response, request

from kitt.jsonapi import ApiFailure

KEEPALIVE = ": keepalive\n\n"


def event(name: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def resume_after() -> int:
    """The last sequence number the client already has (``Last-Event-ID`` or ``?after=``)."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("after") or "0"
    try:
        value = int(raw)
    except ValueError:
        raise ApiFailure(
            400, f"Last-Event-ID / after must be a line number, got {raw[:40]!r}"
        ) from None
    if value < 0:
        raise ApiFailure(400, "Last-Event-ID / after must not be negative")
    return value


def stream(frames: Iterable[str]) -> Response:
    def body() -> Iterator[bytes]:
        # A retry hint first: browsers' EventSource reconnects after 2 s with Last-Event-ID.
        yield b"retry: 2000\n\n"
        for frame in frames:
            yield frame.encode()

    return Response(
        body(),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
