"""The agent's own HTTP API (Flask): status, health, and the commands the server pushes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Flask

from kitt import __version__, sse
from kitt.agent.auth import AgentAuth
from kitt.agent.config import AgentConfig
from kitt.agent.jobs import CommandError, JobManager
from kitt.agent.log_streamer import End, Gap, LogLine
from kitt.agent.openapi_spec import agent_openapi
from kitt.agent.state import AgentState
from kitt.jsonapi import ApiFailure, check_id, dump, install_json_errors, parse_body
from kitt.openapi import install_openapi
from kitt.protocol import AgentStatusReport, Command, CommandAccepted, Health
from kitt.sse import resume_after

AGENT_THREADS = 16
AGENT_STREAMS = 10  # of AGENT_THREADS; the rest stay free for commands and status


def _frames(command_id: str, items: Iterator[list[LogLine] | Gap | End | None]) -> Iterator[str]:
    for item in items:
        if item is None:
            yield sse.KEEPALIVE
        elif isinstance(item, list):
            yield "".join(
                sse.event("log", {"command_id": command_id, **line.as_dict()}, line.seq)
                for line in item
            )
        elif isinstance(item, Gap):
            yield sse.event("gap", {"command_id": command_id, "first": item.first,
                                    "last": item.last, "missed": item.last - item.first + 1,
                                    "recovered": item.recovered})  # fmt: skip
        else:
            yield sse.event("end", {"command_id": command_id, "status": item.status})


def create_agent_app(
    config: AgentConfig, state: AgentState, jobs: JobManager, auth: AgentAuth
) -> Flask:
    app = Flask("kitt.agent")
    install_json_errors(app)
    install_openapi(app, agent_openapi)
    streams = sse.StreamSlots(AGENT_STREAMS)

    @app.post("/api/commands")
    def commands() -> Any:
        auth.require_server()
        command = parse_body(Command)
        try:
            jobs.handle(command)
        except CommandError as exc:
            raise ApiFailure(exc.status, str(exc)) from None
        return dump(CommandAccepted(command_id=command.command_id), 202)

    @app.get("/api/logs/<command_id>")
    def logs(command_id: str) -> Any:
        auth.require_server()
        check_id(command_id, "command id")
        log = jobs.logs.get(command_id)
        if log is None:
            raise ApiFailure(404, f"no log for command {command_id!r} on this agent")
        after = resume_after()
        return streams.stream(_frames(command_id, log.follow(after)))

    @app.get("/api/health")
    def health() -> Any:
        return dump(Health(version=__version__))

    @app.get("/api/status")
    def status() -> Any:
        auth.require_server_or_self()
        snap = state.snapshot()
        return dump(
            AgentStatusReport(
                name=config.name,
                agent_id=snap.agent_id,
                status=snap.status,
                running=snap.status == "running",
                current_task=snap.current_task,
                uptime_s=snap.uptime_s,
                version=__version__,
                server_url=config.server_url,
                registered=snap.agent_id is not None,
                last_heartbeat_ok=snap.last_heartbeat_ok,
                last_error=snap.problems,
                pid=state.pid,
                # Settings in force: pushed by the server, else the defaults.
                settings=jobs.settings.effective(),
            )
        )

    return app
