"""The server's Flask application factory."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from kitt import __version__
from kitt.jsonapi import ApiFailure, dump, install_json_errors, unexpected_error
from kitt.openapi import install_openapi
from kitt.protocol import Health
from kitt.server.api import agent_channel, agent_package, fleet, fleet_events, results, tokens
from kitt.server.api import tests as tests_api
from kitt.server.api.agent_package import AgentDownloads
from kitt.server.api.openapi_spec import server_openapi
from kitt.server.auth import Auth
from kitt.server.certs import ServerCerts
from kitt.server.dispatcher import Dispatcher
from kitt.server.events import EventHub
from kitt.server.metrics import install_metrics
from kitt.server.settings import ServerSettings
from kitt.server.store.agents import AgentStore, HeartbeatWriter
from kitt.server.store.db import describe_error, is_unavailable
from kitt.server.store.logs import LogStore
from kitt.server.store.results import ResultStore
from kitt.server.store.tests import TestStore
from kitt.server.web import install_web
from kitt.sse import StreamSlots


def create_app(
    settings: ServerSettings,
    agents: AgentStore,
    heartbeats: HeartbeatWriter,
    tests: TestStore,
    dispatcher: Dispatcher,
    logs: LogStore,
    events: EventHub,
    auth: Auth,
    certs: ServerCerts | None = None,
    downloads: AgentDownloads | None = None,
) -> Flask:
    # static_folder=None: the dashboard blueprint serves /static (the app's own rule would win).
    app = Flask("kitt.server", static_folder=None)
    install_json_errors(app)
    install_openapi(app, server_openapi)

    @app.errorhandler(DBAPIError)
    @app.errorhandler(PoolTimeoutError)
    def _database_error(exc: Exception) -> Any:
        """The database is down or restarting (the pool reconnects by itself once it is
        back): a retryable 503 saying so, not a 500 "bug" with a traceback in the log. A
        statement the database refused is a bug, and stays one."""
        if not is_unavailable(exc):
            return unexpected_error(app, exc)
        app.logger.warning("%s %s: the database did not answer: %s", request.method,
                           request.path, describe_error(exc))  # fmt: skip
        response = app.make_response(
            app.handle_user_exception(
                ApiFailure(503, "the database is unavailable; try again shortly")
            )
        )
        response.headers["Retry-After"] = "1"
        return response

    app.extensions["kitt.settings"] = settings
    app.extensions["kitt.agents"] = agents
    app.extensions["kitt.heartbeats"] = heartbeats
    app.extensions["kitt.tests"] = tests
    app.extensions["kitt.dispatcher"] = dispatcher
    app.extensions["kitt.logs"] = logs
    app.extensions["kitt.events"] = events
    app.extensions["kitt.auth"] = auth
    app.extensions["kitt.certs"] = certs
    app.extensions["kitt.downloads"] = downloads
    app.extensions["kitt.results"] = ResultStore(tests.sessions)
    # Three quarters of the workers at most for log streams; the rest serve agents.
    app.extensions["kitt.streams"] = StreamSlots(max(1, settings.numthreads * 3 // 4))

    @app.get("/api/v1/health")
    def health() -> Any:
        return dump(Health(version=__version__))

    @app.get("/api/v1/ca.pem")
    def ca_pem() -> Any:
        """The fleet CA, public by nature: `kitt-agent init --ca-fingerprint` fetches it
        and checks it against the fingerprint the operator gave out of band."""
        if certs is None:
            raise ApiFailure(404, "this server runs plain HTTP and has no CA")
        return Response(certs.ca.read_bytes(), mimetype="application/x-pem-file")

    app.register_blueprint(agent_channel.bp)
    app.register_blueprint(agent_package.bp)
    app.register_blueprint(fleet.bp)
    app.register_blueprint(fleet_events.bp)
    app.register_blueprint(tests_api.bp)
    app.register_blueprint(results.bp)
    app.register_blueprint(tokens.bp)
    install_web(app)
    install_metrics(app)
    return app
