"""The agent daemon: HTTP listener, heartbeat, job runner and spool, started and stopped as one."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from kitt import __version__
from kitt.agent.app import AGENT_THREADS, create_agent_app
from kitt.agent.config import AgentConfig
from kitt.agent.hardware import registration
from kitt.agent.heartbeat import HeartbeatThread
from kitt.agent.jobs import CommandError, JobManager, spool_result
from kitt.agent.server_client import ServerClient
from kitt.agent.spool import Spool, SpoolSender
from kitt.agent.state import AgentState
from kitt.agent.telemetry import GpuTelemetry
from kitt.http import WsgiServer
from kitt.paths import AgentPaths
from kitt.process import run_steps
from kitt.protocol import Command

log = logging.getLogger(__name__)

# How long a start waits for the first registration attempt before reporting ready; the
# agent is usable either way (it keeps retrying), this only makes the start message true.
FIRST_REGISTRATION_WAIT_S = 5.0
# On SIGTERM a running test is cancelled (SIGTERM, 10 s grace, SIGKILL) and its result
# gets this long to reach the server before the agent exits; what is left stays spooled.
STOP_JOB_TIMEOUT_S = 12.0
STOP_DELIVERY_S = 3.0


class AgentDaemon:
    def __init__(self, config: AgentConfig, paths: AgentPaths, *, insecure: bool = False) -> None:
        self.config = config
        self.state = AgentState()
        self._insecure = insecure
        self._spool = Spool(paths.spool)
        self.jobs = JobManager(config, paths.jobs, self.state, self._spool)
        self._telemetry: GpuTelemetry | None = None
        self._client: ServerClient | None = None
        self._heartbeat: HeartbeatThread | None = None
        self._sender: SpoolSender | None = None
        self._http = WsgiServer(
            create_agent_app(config, self.state, self.jobs),
            config.bind,
            config.port,
            numthreads=AGENT_THREADS,
            name="kitt-agent",
        )

    def start(self) -> None:
        # Listen first: a port clash must fail the start before anything talks to the server.
        self._http.start()
        log.info(
            "kitt-agent %s '%s' listening on %s:%d, server %s, benchmarks: %s",
            __version__,
            self.config.name,
            self.config.bind,
            self._http.bound_port,
            self.config.server_url,
            ", ".join(sorted(self.config.benchmarks)) or "none",
        )
        self.jobs.recover()
        self._telemetry = GpuTelemetry()
        self._client = ServerClient(self.config, insecure=self._insecure)
        self._sender = SpoolSender(self._spool, self._client, self.state, self.config.backoff_max_s)
        self._sender.start()
        self._heartbeat = HeartbeatThread(
            self._client,
            self.state,
            self._telemetry,
            registration(
                self.config.name, self.config.port, self._telemetry, list(self.config.benchmarks)
            ),
            backoff_max_s=self.config.backoff_max_s,
            on_commands=self._commands_from_heartbeat,
        )
        self._heartbeat.start()
        self._heartbeat.first_attempt_done.wait(FIRST_REGISTRATION_WAIT_S)

    def _commands_from_heartbeat(self, commands: list[dict[str, Any]]) -> None:
        """Commands that rode a heartbeat response: there is no HTTP answer to refuse with,
        so a run_test the agent cannot take is reported as a failed test instead."""
        for raw in commands:
            try:
                command = Command.model_validate(raw)
            except ValidationError as exc:
                log.warning("ignoring an invalid command from the server: %s", exc)
                continue
            try:
                self.jobs.handle(command)
            except CommandError as exc:
                if command.type != "run_test":
                    # The test never reached this agent (its run_test was lost): say it
                    # is cancelled, or the server would wait for it forever.
                    log.info("cancel of test %s: %s; reporting it cancelled", command.test_id, exc)
                    self._spool.put_status(
                        command.test_id,
                        {"status": "cancelled", "error": "cancelled before it reached the agent"},
                    )
                    continue
                log.warning("cannot run test %s: %s", command.test_id, exc)
                spool_result(
                    self._spool, command.command_id, command.test_id, "failed",
                    f"agent refused it: {exc}",
                )  # fmt: skip

    def hurry(self) -> None:
        self.jobs.hurry()

    def stop(self, drain: bool = False) -> None:
        # Every step runs even if one fails: a half-stopped agent never exits.
        job_timeout = None if drain else STOP_JOB_TIMEOUT_S
        run_steps([
            ("running test", lambda: self.jobs.shutdown(job_timeout, drain=drain)),
            ("heartbeat", self._stop_heartbeat),
            ("report delivery", self._stop_sender),
            ("live log readers", self.jobs.logs.close_readers),
            ("listener", self._http.stop),
            ("server client", lambda: self._client.close() if self._client else None),
            ("GPU telemetry", lambda: self._telemetry.close() if self._telemetry else None),
        ])  # fmt: skip
        log.info("agent stopped")

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat.join(timeout=5)

    def _stop_sender(self) -> None:
        if self._sender is not None:
            self._sender.stop()
            self._sender.join(timeout=STOP_DELIVERY_S)
            if self._spool.items():
                log.info("%d report(s) stay spooled for the next start", len(self._spool.items()))
