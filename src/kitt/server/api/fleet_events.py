"""The fleet, live: one Server-Sent Events stream the dashboard's fleet and agent pages read.

On connect, ``snapshot`` (every agent, as ``GET /api/v1/agents`` lists them); then
``agent`` (one agent's new summary) for each agent whose summary changed, and
``removed`` for each agent that is gone. The EventHub's fleet topic says when to look
again: the agent store notifies it after every committed change (registration, heartbeat
batch, going offline, removal) and revocation notifies it too.

Every open stream is served by the server's one :class:`~kitt.server.fleet_feed.FleetFeed`:
it re-reads the database at most once per :data:`~kitt.server.fleet_feed.COALESCE_S`
for all of them and sends each the same text, so twenty dashboards cost what one does.
"""

from __future__ import annotations

from functools import partial

from flask import Blueprint, Response, current_app
from flask.blueprints import BlueprintSetupState

from kitt import sse
from kitt.server.api.fleet import summaries
from kitt.server.api.tests import KEEPALIVE_S
from kitt.server.auth import Auth, auth, require_admin
from kitt.server.events import FLEET_TOPIC, EventHub
from kitt.server.fleet_feed import FleetFeed
from kitt.server.store.agents import AgentStore

bp = Blueprint("fleet_events", __name__, url_prefix="/api/v1/fleet")
bp.before_request(require_admin)

FEED = "kitt.fleet_feed"  # where the app keeps its FleetFeed (app.extensions)


@bp.record_once
def _wire_the_feed(state: BlueprintSetupState) -> None:
    """The agent store tells the hub about every committed change, and one feed reads
    the fleet for every stream. Wired here, where the app has the store, the hub and the
    credentials (an app made without them, e.g. to list its routes, gets no wiring)."""
    store: AgentStore | None = state.app.extensions.get("kitt.agents")
    hub: EventHub | None = state.app.extensions.get("kitt.events")
    server_auth: Auth | None = state.app.extensions.get("kitt.auth")
    if store is not None and hub is not None:
        store.on_change = partial(hub.notify, FLEET_TOPIC)
        if server_auth is not None:
            read = partial(summaries, store, server_auth.credentials)
            state.app.extensions[FEED] = FleetFeed(read, hub)


@bp.get("/events")
def events() -> Response:
    """SSE: ``snapshot``, then ``agent`` and ``removed`` as the fleet changes."""
    feed: FleetFeed = current_app.extensions[FEED]
    slots: sse.StreamSlots = current_app.extensions["kitt.streams"]
    return slots.stream(auth().signed_in_while(feed.frames(KEEPALIVE_S)))
