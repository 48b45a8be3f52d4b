"""Endpoints users call about the fleet: list, show, heartbeat history, settings, remove."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, cast

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import Row, Table, select

from kitt.jsonapi import ApiFailure, dump, int_arg, parse_body
from kitt.protocol import (
    AgentDetail,
    AgentSettingsView,
    AgentSummary,
    GpuSample,
    Hardware,
    HeartbeatRecord,
    SettingsError,
    SettingsPatch,
    parse_settings,
    parse_settings_leniently,
    setting_key_problem,
    split_engine_key,
)
from kitt.server.auth import auth, require_admin
from kitt.server.events import FLEET_TOPIC, EventHub
from kitt.server.settings import ServerSettings
from kitt.server.store.agents import AgentStore
from kitt.server.store.credentials import CredentialStore
from kitt.server.store.models import Agent, AgentCredential
from kitt.server.store.tests import TestStore

if TYPE_CHECKING:
    from typing_extensions import Unpack

    # A row of a Core select, read by column name like the ORM object it stands in for.
    AnyRow = Row[Unpack[tuple[Any, ...]]]

bp = Blueprint("fleet", __name__, url_prefix="/api/v1/agents")
bp.before_request(require_admin)

MAX_HISTORY = 10_000


def _store() -> AgentStore:
    return current_app.extensions["kitt.agents"]  # type: ignore[no-any-return]


# The agent's columns a summary shows as they are (the rest is derived, below).
SUMMARY_COLUMNS = (
    "id", "name", "hostname", "address", "port", "status", "online", "current_task",
    "kitt_version", "gpu_info", "gpu_count", "gpu_utilization_pct", "gpu_memory_used_gb",
    "registered_at", "last_seen_at",
)  # fmt: skip


def summary_fields(agent: Agent | AnyRow, cred: AgentCredential | AnyRow | None) -> dict[str, Any]:
    """An agent's summary fields, from its ORM object or a row of :data:`_SUMMARY_AGENTS`
    (a row's own dict: reading its columns one by one costs more than the rest of a
    summary), and from its credential (object or row of :data:`_SUMMARY_CREDENTIALS`)."""
    if isinstance(agent, Row):
        fields = agent._asdict()
    else:
        fields = {column: getattr(agent, column) for column in SUMMARY_COLUMNS}
    fields["state"] = fields["status"] if fields["online"] else "offline"
    fields["cert_expires_at"] = cred.cert_not_after if cred is not None else None
    fields["revoked"] = cred is not None and cred.revoked_at is not None
    return fields


# What summary_fields reads, as plain Core selects: the live fleet feed reads the whole
# fleet up to twice a second, and ORM objects (with every credential's) cost about twice
# as much as these rows for the same summaries.
_AGENTS = cast(Table, Agent.__table__)
_CREDENTIALS = cast(Table, AgentCredential.__table__)
_SUMMARY_AGENTS = select(*(_AGENTS.c[c] for c in SUMMARY_COLUMNS)).order_by(_AGENTS.c.name)
_SUMMARY_CREDENTIALS = select(
    _CREDENTIALS.c.name, _CREDENTIALS.c.cert_not_after, _CREDENTIALS.c.revoked_at
)


def summaries(store: AgentStore, credentials: CredentialStore) -> list[dict[str, Any]]:
    """Every agent as ``GET /api/v1/agents`` lists it, by name (the dashboard's fleet
    stream and page send the very same dicts)."""
    with credentials.engine.connect() as conn:
        creds = {c.name: c for c in conn.execute(_SUMMARY_CREDENTIALS)}
    with store.engine.connect() as conn:
        agents = conn.execute(_SUMMARY_AGENTS).all()
    return [
        AgentSummary(**summary_fields(a, creds.get(a.name))).model_dump(mode="json") for a in agents
    ]


def agent_detail(agent: Agent) -> AgentDetail:
    """One agent as ``GET /api/v1/agents/<id>`` shows it (and the dashboard's agent page)."""
    return AgentDetail(
        **summary_fields(agent, auth().credentials.get(agent.name)),
        cpu_info=agent.cpu_info,
        ram_gb=agent.ram_gb,
        hardware=Hardware.model_validate(agent.hardware),
        capabilities=agent.capabilities,
        uptime_s=agent.uptime_s,
        cpu_percent=agent.cpu_percent,
        ram_used_gb=agent.ram_used_gb,
        gpus=[GpuSample.model_validate(g) for g in agent.gpus],
    )


def _get(id_or_name: str) -> Agent:
    agent = _store().find(id_or_name)
    if agent is None:
        raise ApiFailure(404, f"no agent with id or name {id_or_name[:80]!r}")
    return agent


@bp.get("")
def list_agents() -> Response:
    return jsonify(agents=summaries(_store(), auth().credentials))


@bp.get("/<id_or_name>")
def show(id_or_name: str) -> Any:
    return dump(agent_detail(_get(id_or_name)))


@bp.get("/<id_or_name>/heartbeats")
def history(id_or_name: str) -> Response:
    agent = _get(id_or_name)
    since_text = request.args.get("since")
    since = None
    if since_text:
        try:
            since = datetime.fromisoformat(since_text.replace("Z", "+00:00"))
        except ValueError:
            raise ApiFailure(
                400, f"'since' must be an ISO 8601 time, got {since_text[:40]!r}"
            ) from None
        if since.tzinfo is None:
            raise ApiFailure(400, "'since' must carry a time zone (e.g. 2026-11-27T09:00:00Z)")
    limit = int_arg("limit", 1000, 1, MAX_HISTORY)
    rows = _store().heartbeats(agent.id, since, limit)
    records = [HeartbeatRecord.model_validate(r, from_attributes=True).model_dump(mode="json")
               for r in rows]  # fmt: skip
    return jsonify(agent_id=agent.id, heartbeats=records)


def _settings_view(pushed: dict[str, Any]) -> AgentSettingsView:
    server: ServerSettings = current_app.extensions["kitt.settings"]
    return AgentSettingsView(
        settings=pushed,
        # Leniently: a value stored under other rules (an older release) must not break
        # reading the agent's settings; it is left out of `effective`, as the agent does.
        effective=parse_settings_leniently(pushed)[0].effective(server.heartbeat_interval_s),
    )


@bp.get("/<id_or_name>/settings")
def get_settings(id_or_name: str) -> Any:
    """The settings pushed to this agent, and every value in force (defaults filled in)."""
    return dump(_settings_view(_get(id_or_name).settings or {}))


def _check_engines(agent: Agent, keys: list[str]) -> None:
    """Engine settings only for engines the agent has (it advertises ``engine:<name>``)."""
    have = sorted(c.removeprefix("engine:") for c in agent.capabilities if c.startswith("engine:"))
    for key in keys:
        engine_key = split_engine_key(key)
        if engine_key is not None and engine_key[0] not in have:
            engines = f"its engines: {', '.join(have)}" if have else "it advertises none"
            raise ApiFailure(
                400, f"{key}: agent {agent.name} has no engine {engine_key[0]!r} ({engines})"
            )


@bp.patch("/<id_or_name>/settings")
def patch_settings(id_or_name: str) -> Any:
    """Set (a value) or reset (``null``) some of the agent's settings; it applies them at
    its next heartbeat. Nothing is stored unless every key and value is valid."""
    agent = _get(id_or_name)
    patch = parse_body(SettingsPatch).model_extra or {}
    problems = [p for p in (setting_key_problem(k) for k in patch) if p is not None]
    if problems:
        raise ApiFailure(400, "; ".join(problems))
    resets = [k for k, v in patch.items() if v is None]
    try:
        values = parse_settings({k: v for k, v in patch.items() if v is not None}).flat()
    except SettingsError as exc:
        raise ApiFailure(400, str(exc)) from None
    _check_engines(agent, list(values))

    def change(current: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in current.items() if k not in resets}, **values}

    pushed = _store().update_settings(agent.id, change)
    if pushed is None:
        raise ApiFailure(404, f"no agent with id or name {id_or_name[:80]!r}")
    if patch:
        current_app.logger.info(
            "agent %s: settings %s",
            agent.name,
            ", ".join(f"{k}={v:g}" if v is not None else f"{k} reset" for k, v in
                      {**dict.fromkeys(resets), **values}.items()),
        )  # fmt: skip
    return dump(_settings_view(pushed))


@bp.delete("/<id_or_name>")
def remove(id_or_name: str) -> Any:
    agent = _get(id_or_name)
    tests: TestStore = current_app.extensions["kitt.tests"]
    closed = tests.close_for_agent(agent.id, datetime.now(timezone.utc))
    _store().delete(agent.id)
    auth().credentials.delete(agent.name)  # a removed agent must enroll again to return
    current_app.logger.info("agent %s (id %s) removed", agent.name, agent.id)
    return jsonify(deleted=agent.id, name=agent.name, closed_tests=closed), 200


@bp.post("/<id_or_name>/revoke")
def revoke(id_or_name: str) -> Any:
    """Kill the agent's token at once; the agent stays listed, marked revoked."""
    agent = _store().find(id_or_name)
    name = agent.name if agent is not None else id_or_name
    if not auth().credentials.revoke(name, datetime.now(timezone.utc)):
        raise ApiFailure(404, f"no agent {id_or_name[:80]!r} with a live credential")
    current_app.logger.warning("agent %s: credential revoked", name)
    hub: EventHub = current_app.extensions["kitt.events"]
    hub.notify(FLEET_TOPIC)  # the agent's own store writes stop now: nothing else would tell
    return jsonify(revoked=True, name=name)
