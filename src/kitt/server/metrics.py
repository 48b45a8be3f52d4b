"""Prometheus metrics at ``GET /metrics``: the fleet's state and the server's throughput.

Two kinds of numbers, kept apart on purpose:

* **Fleet gauges** (agents by state, tests by status) are read from the database at
  scrape time by :class:`FleetCollector`, two aggregate queries. They describe the whole
  fleet, so every server instance on one database reports the same values, and nothing
  has to keep them in step with the reaper or the API.
* **Counters and the dispatch-latency histogram** are this process's own, updated where
  the work happens (heartbeats, log lines, results, dispatches). Several instances each
  count what they handled: sum them in PromQL.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` (never the global
one): a test process starts many apps, a server process one.

The endpoint takes the admin token like the API (Prometheus: ``authorization:
{credentials_file: …}``); a ``--no-auth`` server serves it to loopback callers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, get_args

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from kitt import __version__
from kitt.jsonapi import ApiFailure, error
from kitt.protocol import FleetState, ResultReport
from kitt.server.auth import require_admin
from kitt.server.lifecycle import ALLOWED
from kitt.server.store.models import Agent, TestRun

# Every state is reported, zeros included: a series that vanishes reads as "no data"
# in Grafana, not as 0, and alerts on it would never fire.
AGENT_STATES: tuple[FleetState, ...] = ("idle", "running", "error", "offline")
TEST_STATUSES = tuple(ALLOWED)
# From a test's submission to its delivery: milliseconds when its agent is idle and
# reachable, a heartbeat interval behind NAT, the length of the previous test when the
# agent is busy (tests queue per agent). Hence buckets from 10 ms to an hour.
DISPATCH_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip


class FleetCollector(Collector):
    """The fleet gauges, computed from the database at each scrape.

    Takes the stores' ``sessionmaker`` lazily (a callable) so that building an app does
    not touch the database; a scrape costs two ``GROUP BY`` queries.
    """

    def __init__(self, sessions: Callable[[], sessionmaker[Session]]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterable[Metric]:
        with self._sessions()() as s:
            agent_rows = s.execute(
                select(Agent.online, Agent.status, func.count()).group_by(
                    Agent.online, Agent.status
                )
            ).all()
            test_rows = s.execute(
                select(TestRun.status, func.count()).group_by(TestRun.status)
            ).all()
        agents: dict[str, int] = dict.fromkeys(AGENT_STATES, 0)
        for is_online, status, count in agent_rows:
            state = status if is_online else "offline"
            agents[state] = agents.get(state, 0) + count
        by_state = GaugeMetricFamily(
            "kitt_agents",
            "Registered agents by state (offline: the reaper found them silent; the "
            "others are online).",
            labels=["state"],
        )
        for state, count in agents.items():
            by_state.add_metric([state], count)
        online = sum(n for state, n in agents.items() if state != "offline")
        yield by_state
        yield GaugeMetricFamily("kitt_agents_online", "Agents online (any state but offline).",
                                value=online)  # fmt: skip
        yield GaugeMetricFamily("kitt_agents_registered", "Agents registered, online or not.",
                                value=sum(agents.values()))  # fmt: skip
        tests: dict[str, int] = dict.fromkeys(TEST_STATUSES, 0)
        tests.update({status: count for status, count in test_rows})
        by_status = GaugeMetricFamily("kitt_tests", "Tests by status.", labels=["status"])
        for status, count in tests.items():
            by_status.add_metric([status], count)
        yield by_status


class ServerMetrics:
    """One app's registry and the instruments its request handlers update."""

    def __init__(self, app: Flask) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(lambda: app.extensions["kitt.tests"].sessions))
        ProcessCollector(registry=self.registry)  # CPU seconds, RSS, open files
        Gauge("kitt_build_info", "The server's version (the value is always 1).",
              ["version"], registry=self.registry).labels(__version__).set(1)  # fmt: skip
        self.heartbeats = Counter(
            "kitt_heartbeats", "Agent heartbeats accepted by this server process.",
            registry=self.registry,
        )  # fmt: skip
        self.log_lines = Counter(
            "kitt_log_lines", "Test log lines stored by this server process (re-delivered "
            "lines it already had are not counted).", registry=self.registry,
        )  # fmt: skip
        self.results = Counter(
            "kitt_results", "Tests ended by their agent's result report, by final status.",
            ["status"], registry=self.registry,
        )  # fmt: skip
        for status in get_args(ResultReport.model_fields["status"].annotation):
            self.results.labels(status)  # every final status reported, from 0
        self.dispatch_latency = Histogram(
            "kitt_dispatch_latency_seconds",
            "From a test's submission to its delivery to the agent (the push accepted, or "
            "the heartbeat response carrying it); includes waiting for the agent's "
            "previous test.",
            buckets=DISPATCH_BUCKETS, registry=self.registry,
        )  # fmt: skip


def metrics() -> ServerMetrics:
    return current_app.extensions["kitt.metrics"]  # type: ignore[no-any-return]


bp = Blueprint("metrics", __name__)
bp.before_request(require_admin)


@bp.errorhandler(ApiFailure)
def _refused(exc: ApiFailure) -> Any:
    """JSON like the API's errors, not a dashboard error page: the caller is a scraper."""
    body, status = error(exc.status, exc.message)
    if status == 401:
        body.headers["WWW-Authenticate"] = 'Bearer realm="kitt"'
    return body, status


@bp.get("/metrics")
def scrape() -> Any:
    """The Prometheus text format, or OpenMetrics when the scraper asks for it."""
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    try:
        body = encode(metrics().registry)
    except SQLAlchemyError as exc:
        message = f"the database did not answer ({type(exc).__name__}); scrape again"
        raise ApiFailure(503, message) from exc
    return Response(body, content_type=content_type)


def install_metrics(app: Flask) -> None:
    """Serve ``/metrics`` and let the dispatcher report dispatch latencies (when the app
    has one: route-listing tests build apps without)."""
    server_metrics = ServerMetrics(app)
    app.extensions["kitt.metrics"] = server_metrics
    dispatcher = app.extensions.get("kitt.dispatcher")
    if dispatcher is not None:
        dispatcher.on_dispatched = server_metrics.dispatch_latency.observe
    app.register_blueprint(bp)
