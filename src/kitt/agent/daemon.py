"""The agent daemon: HTTP listener, heartbeat, job runner and spool, started and stopped as one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kitt import __version__
from kitt.agent.app import AGENT_THREADS, create_agent_app
from kitt.agent.auth import AgentAuth
from kitt.agent.config import AgentConfig, update_config
from kitt.agent.hardware import registration
from kitt.agent.heartbeat import HeartbeatThread
from kitt.agent.jobs import CommandError, JobManager, spool_result
from kitt.agent.renewal import CertRenewer
from kitt.agent.server_client import ServerClient, tls_files
from kitt.agent.settings import PushedSettings
from kitt.agent.spool import Spool, SpoolSender
from kitt.agent.state import AgentState
from kitt.agent.telemetry import GpuTelemetry
from kitt.bench.engines import available_engines, load_engines
from kitt.errors import ConfigError, KittError
from kitt.http import ListenerTls, WsgiServer
from kitt.paths import AgentPaths
from kitt.process import run_steps
from kitt.protocol import SERVING_BENCHMARK, Command
from kitt.urls import is_loopback

log = logging.getLogger(__name__)

# How long a start waits for the first registration attempt before reporting ready; the
# agent is usable either way (it keeps retrying), this only makes the start message true.
FIRST_REGISTRATION_WAIT_S = 5.0
# On SIGTERM a running test is cancelled (SIGTERM, 10 s grace, SIGKILL) and its result
# gets this long to reach the server before the agent exits; what is left stays spooled.
STOP_JOB_TIMEOUT_S = 12.0
STOP_DELIVERY_S = 3.0


class AgentDaemon:
    def __init__(
        self,
        config: AgentConfig,
        paths: AgentPaths,
        *,
        insecure: bool = False,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path or paths.config
        self.state = AgentState()
        self._insecure = insecure
        self._token = config.token
        listener_tls = listener_security(config, self.config_path, insecure)
        self.auth = AgentAuth(config.name, config.token, tls=listener_tls is not None)
        self._renewer: CertRenewer | None = None
        self._spool = Spool(paths.spool, on_problem=self.state.spool_problem)
        # Settings pushed by the server (kitt agents set): the heartbeat adopts them, jobs
        # and the status read them.
        self.settings = PushedSettings()
        self.jobs = JobManager(
            config, paths.jobs, self.state, self._spool, self.config_path, self.settings
        )
        self._telemetry: GpuTelemetry | None = None
        self._client: ServerClient | None = None
        self._heartbeat: HeartbeatThread | None = None
        self._sender: SpoolSender | None = None
        self._http = WsgiServer(
            create_agent_app(config, self.state, self.jobs, self.auth),
            config.bind,
            config.port,
            numthreads=AGENT_THREADS,
            name="kitt-agent",
            tls=listener_tls,
        )

    def start(self) -> None:
        if self._insecure:
            log.warning(
                "INSECURE (--insecure): the server's certificate is not verified%s",
                "" if self._http.tls or is_loopback(self.config.bind)
                else f" and commands are accepted over plain HTTP on {self.config.bind}",
            )  # fmt: skip
        # Listen first: a port clash must fail the start before anything talks to the server.
        self._http.start()
        # Engines whose binary is installed here: what `serving` tests may ask this agent
        # to start (advertised as engine:<name> capabilities).
        specs = load_engines(self.config.engines)
        engines = available_engines(specs)
        self.settings.set_engines({name: specs[name].startup_timeout_s for name in engines})
        log.info(
            "kitt-agent %s '%s' listening on %s:%d, server %s, benchmarks: %s, engines: %s",
            __version__,
            self.config.name,
            self.config.bind,
            self._http.bound_port,
            self.config.server_url,
            ", ".join(sorted({*self.config.benchmarks, SERVING_BENCHMARK})),
            ", ".join(engines) or "none found",
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
                self.config.name,
                self.config.port,
                self._telemetry,
                list(self.config.benchmarks),
                engines,
            ),
            backoff_max_s=self.config.backoff_max_s,
            on_commands=self._commands_from_heartbeat,
            on_token=self._adopt_token,
            settings=self.settings,
        )
        self._heartbeat.start()
        tls = self._client.tls
        if self._http.tls is not None and tls is not None:
            self._renewer = CertRenewer(
                self.config.server_url, self.config.name, tls, lambda: self._token,
                self._reload_cert, insecure=self._insecure,
            )  # fmt: skip
            self._renewer.start()
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

    def _adopt_token(self, token: str) -> None:
        """The server swapped the bootstrap token for this agent's own: keep it (agent.yaml
        first, so a crash right after cannot leave the agent with a spent token)."""
        try:
            update_config(self.config_path, {"token": token})
        except KittError as exc:
            log.error("cannot save the agent token in %s: %s", self.config_path, exc)
        self._token = token
        self.auth.set_token(token)
        if self._client is not None:
            self._client.set_token(token)
        log.info("received this agent's own token; saved in %s", self.config_path)

    def _reload_cert(self) -> None:
        self._http.reload_cert()
        if self._client is not None:
            self._client.reload_cert()

    def hurry(self) -> None:
        self.jobs.hurry()

    def stop(self, drain: bool = False) -> None:
        # Every step runs even if one fails: a half-stopped agent never exits.
        job_timeout = None if drain else STOP_JOB_TIMEOUT_S
        run_steps([
            ("running test", lambda: self.jobs.shutdown(job_timeout, drain=drain)),
            ("heartbeat", self._stop_heartbeat),
            ("certificate renewal", lambda: self._renewer.stop() if self._renewer else None),
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
            self._spool.write_held()  # room may have come back since the sender last tried
            if self._spool.items():
                log.info("%d report(s) stay spooled for the next start", len(self._spool.items()))
            if self._spool.held_count():
                log.error("%d report(s) that the full spool disk could not take are lost",
                          self._spool.held_count())  # fmt: skip


def listener_security(config: AgentConfig, path: Path, insecure: bool) -> ListenerTls | None:
    """HTTPS for the agent's listener when it is enrolled; plain HTTP only on loopback
    (or with --insecure)."""
    tls = tls_files(config)
    if tls is not None:
        if tls.cert is None or tls.key is None or tls.ca is None:
            raise ConfigError(f"{path}: tls needs cert, key and ca (run kitt-agent init again)")
        return ListenerTls(tls.cert, tls.key, tls.ca, require_client_cert=True)
    if not is_loopback(config.bind) and not insecure:
        raise ConfigError(
            f"the agent would serve plain HTTP on {config.bind}: enroll with an HTTPS "
            "server (kitt-agent init --server https://…), listen on 127.0.0.1 "
            "(kitt-agent init --bind 127.0.0.1), or pass --insecure (development only)"
        )
    return None
