"""Fleet and agent pages.

Both are rendered whole on the server (they work, and are tested, without JavaScript);
``static/fleet.js`` and ``static/agent.js`` then keep them current from the fleet's SSE
stream (``GET /api/v1/fleet/events``), never by polling.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, current_app, render_template, request

from kitt.jsonapi import ApiFailure
from kitt.server.api.fleet import agent_detail, summaries
from kitt.server.api.tests import info
from kitt.server.auth import auth
from kitt.server.store.agents import AgentStore
from kitt.server.store.tests import TestStore
from kitt.server.web.pages import page_guard

bp = Blueprint("fleet_pages", __name__)
bp.before_request(page_guard)

# The status filter's choices; fleet.js knows the same words (statusMatches).
STATUSES = ("online", "idle", "running", "error", "offline")
RECENT_TESTS = 20
_COUNT_PREFIX = re.compile(r"^\d+x ")


def _agents() -> AgentStore:
    return current_app.extensions["kitt.agents"]  # type: ignore[no-any-return]


def status_matches(agent: dict[str, Any], wanted: str) -> bool:
    """``online`` is any state but offline (idle, running, error); the rest name a state."""
    state: str = agent["state"]
    if wanted == "online":
        return state != "offline"
    return not wanted or state == wanted


def gpu_matches(agent: dict[str, Any], wanted: str) -> bool:
    """A case-insensitive part of the GPU summary, as ``--gpu`` matches when a test is
    submitted to ``any`` agent."""
    return wanted.lower() in (agent["gpu_info"] or "").lower()


def gpu_models(agents: list[dict[str, Any]]) -> list[str]:
    """The GPU models in the fleet, from summaries like ``"2x A, 1x B"``."""
    found = {
        _COUNT_PREFIX.sub("", part)
        for a in agents
        for part in (a["gpu_info"] or "").split(", ")
        if part
    }
    return sorted(found)


@bp.get("/fleet")
def fleet() -> str:
    agents = summaries(_agents(), auth().credentials)
    status = request.args.get("status", "")
    status_error = None
    if status not in ("", *STATUSES):
        status_error = f"Unknown status {status[:40]!r}: showing agents in any state."
        status = ""
    gpu = request.args.get("gpu", "").strip()[:100]
    shown = {a["id"] for a in agents if status_matches(a, status) and gpu_matches(a, gpu)}
    return render_template(
        "fleet.html",
        agents=agents,
        shown=shown,
        status=status,
        status_error=status_error,
        statuses=STATUSES,
        gpu=gpu,
        models=gpu_models(agents),
    )


@bp.get("/fleet/<id_or_name>")
def agent(id_or_name: str) -> str:
    found = _agents().find(id_or_name)
    if found is None:
        raise ApiFailure(404, f"No agent with id or name {id_or_name[:80]!r}.")
    tests: TestStore = current_app.extensions["kitt.tests"]
    recent = [info(t) for t in tests.query(agent=found.name, limit=RECENT_TESTS)]
    detail = agent_detail(found)
    caps = detail.capabilities
    return render_template(
        "agent.html",
        # As the API shows it (times in ISO 8601), so the page's macros are the fleet's.
        agent=detail.model_dump(mode="json"),
        recent=recent,
        benchmarks=[c for c in caps if ":" not in c],
        engines=[c.removeprefix("engine:") for c in caps if c.startswith("engine:")],
        page_data={"id": detail.id, "name": detail.name},
    )
