"""The server's Flask application factory."""

from __future__ import annotations

from typing import Any

from flask import Flask

from kitt import __version__
from kitt.jsonapi import dump, install_json_errors
from kitt.protocol import Health
from kitt.server.api import agent_channel, fleet
from kitt.server.settings import ServerSettings
from kitt.server.store.agents import AgentStore, HeartbeatWriter


def create_app(settings: ServerSettings, agents: AgentStore, heartbeats: HeartbeatWriter) -> Flask:
    app = Flask("kitt.server")
    install_json_errors(app)
    app.extensions["kitt.settings"] = settings
    app.extensions["kitt.agents"] = agents
    app.extensions["kitt.heartbeats"] = heartbeats

    @app.get("/api/v1/health")
    def health() -> Any:
        return dump(Health(version=__version__))

    app.register_blueprint(agent_channel.bp)
    app.register_blueprint(fleet.bp)
    return app
