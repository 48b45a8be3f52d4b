"""The fleet, live: one Server-Sent Events stream the dashboard's fleet and agent pages read.

On connect, ``snapshot`` (every agent, as ``GET /api/v1/agents`` lists them); then
``agent`` (one agent's new summary) for each agent whose summary changed, and
``removed`` for each agent that is gone. The stream wakes on the EventHub's fleet topic,
which the agent store notifies after every committed change (registration, heartbeat
batch, going offline, removal) and revocation notifies too; like the log streams, it
then re-reads the database, so a notification never carries data that could go stale.

With a thousand agents beating, wake-ups come many times a second: the stream reads at
most once per :data:`COALESCE_S` and sends only what differs from what it last sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from typing import Any

from flask import Blueprint, Response, current_app
from flask.blueprints import BlueprintSetupState

from kitt import sse
from kitt.server.api.fleet import summaries
from kitt.server.api.tests import KEEPALIVE_S
from kitt.server.auth import auth, require_admin
from kitt.server.events import FLEET_TOPIC, EventHub
from kitt.server.store.agents import AgentStore
from kitt.server.store.credentials import CredentialStore

bp = Blueprint("fleet_events", __name__, url_prefix="/api/v1/fleet")
bp.before_request(require_admin)

# Reads of the fleet at most this often per stream, however often agents beat.
COALESCE_S = 0.5


@bp.record_once
def _wake_on_agent_changes(state: BlueprintSetupState) -> None:
    """The agent store tells the hub about every committed change. Wired here, where the
    app has both (an app made without them, e.g. to list its routes, gets no wiring)."""
    store: AgentStore | None = state.app.extensions.get("kitt.agents")
    hub: EventHub | None = state.app.extensions.get("kitt.events")
    if store is not None and hub is not None:
        store.on_change = partial(hub.notify, FLEET_TOPIC)


@bp.get("/events")
def events() -> Response:
    """SSE: ``snapshot``, then ``agent`` and ``removed`` as the fleet changes."""
    store: AgentStore = current_app.extensions["kitt.agents"]
    hub: EventHub = current_app.extensions["kitt.events"]
    slots: sse.StreamSlots = current_app.extensions["kitt.streams"]
    a = auth()
    return slots.stream(a.signed_in_while(fleet_frames(store, a.credentials, hub)))


def fleet_frames(
    store: AgentStore, credentials: CredentialStore, hub: EventHub, coalesce_s: float = COALESCE_S
) -> Iterator[str]:
    wake = hub.subscribe(FLEET_TOPIC)  # before the first read: no change slips in between
    try:
        sent: dict[str, dict[str, Any]] | None = None
        while not hub.closed:
            wake.clear()
            read_at = time.monotonic()
            now = {a["id"]: a for a in summaries(store, credentials)}
            if sent is None:
                yield sse.event("snapshot", {"agents": list(now.values())})
            else:
                frames = [sse.event("agent", a) for i, a in now.items() if sent.get(i) != a]
                frames += [sse.event("removed", {"id": i, "name": a["name"]})
                           for i, a in sent.items() if i not in now]  # fmt: skip
                if frames:
                    yield "".join(frames)  # one write for the whole batch
            sent = now
            if not wake.wait(KEEPALIVE_S):
                yield sse.KEEPALIVE
                continue
            # Let the wake-ups of this moment pile up, then read once for all of them.
            rest = coalesce_s - (time.monotonic() - read_at)
            if rest > 0 and not hub.closed:
                time.sleep(rest)
    finally:
        hub.unsubscribe(FLEET_TOPIC, wake)
