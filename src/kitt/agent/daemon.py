"""The agent daemon: its HTTP listener plus the heartbeat thread, started and stopped as one."""

from __future__ import annotations

import logging

from kitt import __version__
from kitt.agent.app import create_agent_app
from kitt.agent.config import AgentConfig
from kitt.agent.hardware import registration
from kitt.agent.heartbeat import HeartbeatThread
from kitt.agent.server_client import ServerClient
from kitt.agent.state import AgentState
from kitt.agent.telemetry import GpuTelemetry
from kitt.http import WsgiServer

log = logging.getLogger(__name__)

# How long a start waits for the first registration attempt before reporting ready; the
# agent is usable either way (it keeps retrying), this only makes the start message true.
FIRST_REGISTRATION_WAIT_S = 5.0


class AgentDaemon:
    def __init__(self, config: AgentConfig, *, insecure: bool = False) -> None:
        self.config = config
        self.state = AgentState()
        self._insecure = insecure
        self._telemetry: GpuTelemetry | None = None
        self._client: ServerClient | None = None
        self._heartbeat: HeartbeatThread | None = None
        self._http = WsgiServer(
            create_agent_app(config, self.state),
            config.bind,
            config.port,
            numthreads=16,
            name="kitt-agent",
        )

    def start(self) -> None:
        # Listen first: a port clash must fail the start before anything talks to the server.
        self._http.start()
        log.info(
            "kitt-agent %s '%s' listening on %s:%d, server %s",
            __version__,
            self.config.name,
            self.config.bind,
            self._http.bound_port,
            self.config.server_url,
        )
        self._telemetry = GpuTelemetry()
        self._client = ServerClient(self.config, insecure=self._insecure)
        self._heartbeat = HeartbeatThread(
            self._client,
            self.state,
            self._telemetry,
            registration(self.config.name, self.config.port, self._telemetry),
            backoff_max_s=self.config.backoff_max_s,
        )
        self._heartbeat.start()
        self._heartbeat.first_attempt_done.wait(FIRST_REGISTRATION_WAIT_S)

    def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat.join(timeout=5)
        self._http.stop()
        if self._client is not None:
            self._client.close()
        if self._telemetry is not None:
            self._telemetry.close()
        log.info("agent stopped")
