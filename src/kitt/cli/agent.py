"""``kitt agent …`` (also installed as ``kitt-agent …``): the daemon on each GPU machine."""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import click
import httpx

from kitt import __version__
from kitt.agent.config import DEFAULT_AGENT_PORT, AgentConfig, load_config, update_config
from kitt.cli.common import KittGroup, ago, console, human_duration
from kitt.cli.service import service
from kitt.errors import AlreadyRunningError, NotRunningError
from kitt.http import build_client
from kitt.logsetup import setup_logging
from kitt.paths import agent_paths
from kitt.process import (
    DRAIN_SIGNAL,
    PidFile,
    foreground_argv,
    pid_state,
    spawn_background,
    stop_daemon,
)
from kitt.protocol import AgentStatusReport


@click.group(cls=KittGroup, name="agent")
@click.version_option(__version__, "--version", "-V", prog_name="kitt-agent")
def agent() -> None:
    """Run and manage the KITT agent daemon on this machine."""


def _config_path(config: Path | None) -> Path:
    return (config or agent_paths().config).absolute()


def default_agent_name() -> str:
    """The short hostname, reduced to the characters an agent name may hold."""
    short = socket.gethostname().split(".")[0]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", short).strip("-.")[:64]
    return name or "agent"


@agent.command()
@click.option(
    "--server", "server_url", required=True, help="Control-plane URL, e.g. https://kitt:8080."
)
@click.option("--token", help="Bootstrap or agent token given by the server operator.")
@click.option("--name", help="Agent name (default: this machine's short hostname).")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help=f"Port the agent listens on (default {DEFAULT_AGENT_PORT}).",
)
@click.option("--bind", help="Address the agent listens on (default 0.0.0.0).")
@click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), help="Config file to write."
)
def init(
    server_url: str,
    token: str | None,
    name: str | None,
    port: int | None,
    bind: str | None,
    config: Path | None,
) -> None:
    """Write (or update) agent.yaml with the server URL, token, name and port."""
    path = _config_path(config)
    if name is None and not path.exists():
        name = default_agent_name()
    changes = {"server_url": server_url, "token": token, "port": port, "bind": bind, "name": name}
    cfg = update_config(path, changes)
    click.echo(f"wrote {path} (agent '{cfg.name}', server {cfg.server_url}, port {cfg.port})")
    click.echo("start the agent with: kitt-agent start")


@agent.command()
@click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), help="agent.yaml to use."
)
@click.option("--foreground", is_flag=True, help="Stay attached; log to stderr (for systemd).")
@click.option("--insecure", is_flag=True, help="Do not verify the server's TLS certificate.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), hidden=True)
@click.option(
    "--ready-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait for a background start to report ready.",
)
def start(
    config: Path | None,
    foreground: bool,
    insecure: bool,
    log_file: Path | None,
    ready_timeout: float,
) -> None:
    """Start the agent: register, heartbeat, and serve the agent API."""
    path = _config_path(config)
    cfg = load_config(path)
    paths = agent_paths()
    if foreground:
        from kitt.agent.daemon import AgentDaemon
        from kitt.process import run_until_signalled

        setup_logging(log_file, cfg.log_level)
        run_until_signalled(AgentDaemon(cfg, paths, insecure=insecure), PidFile(paths.pid, "agent"))
        return
    running = pid_state(paths.pid)
    if running.state == "running":
        raise AlreadyRunningError(f"the agent is already running (pid {running.pid})")
    argv = ["agent", "start", "--foreground", "--config", str(path), "--log-file", str(paths.log)]
    if insecure:
        argv.append("--insecure")
    pid = spawn_background(foreground_argv(argv), paths.log, ready_timeout)
    click.echo(f"agent '{cfg.name}' started (pid {pid}), listening on {cfg.bind}:{cfg.port}")
    report = probe_status(cfg)
    if report is not None and report.registered:
        click.echo(f"registered with {cfg.server_url} as {report.agent_id}")
    else:
        reason = report.last_error if report is not None else "unknown"
        click.echo(
            f"not registered yet ({reason}); the agent keeps retrying in the background. "
            "Check with: kitt-agent status"
        )
    click.echo(f"log: {paths.log}")


def probe_status(cfg: AgentConfig, timeout: float = 3.0) -> AgentStatusReport | None:
    host = "127.0.0.1" if cfg.bind in ("0.0.0.0", "::", "") else cfg.bind
    url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.port}"
    with build_client(url, timeout=timeout) as client:
        try:
            response = client.get("/api/status")
        except httpx.TransportError:
            return None
    if response.status_code != 200:
        return None
    try:
        return AgentStatusReport.model_validate_json(response.content)
    except ValueError:
        return None


@agent.command()
@click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), help="agent.yaml to use."
)
@click.option("--json", "as_json", is_flag=True, help="Print the agent's status as JSON.")
def status(config: Path | None, as_json: bool) -> None:
    """Show whether the local agent runs. Exit 0 running, 3 not running, 2 not configured."""
    cfg = load_config(_config_path(config))
    report = probe_status(cfg)
    if report is None:
        st = pid_state(agent_paths().pid)
        if as_json:
            click.echo(
                json.dumps({"name": cfg.name, "daemon_running": False, "pid_file": st.state})
            )
        else:
            note = {
                "missing": "",
                "stale": f" (stale pid file naming pid {st.pid})",
                "running": f" (pid {st.pid} holds the pid file but port {cfg.port} is silent)",
            }[st.state]
            console.print(f"agent '{cfg.name}': [bold red]not running[/]{note}")
        raise SystemExit(3)
    if as_json:
        click.echo(report.model_dump_json(indent=2))
        return
    rows = [
        ("name", report.name),
        ("state", f"[green]running[/] (pid {report.pid}), {report.status}"),
        ("agent id", report.agent_id or "[yellow]not registered yet[/]"),
        ("server", report.server_url),
        ("current task", report.current_task or "-"),
        ("uptime", human_duration(report.uptime_s)),
        ("last heartbeat", ago(report.last_heartbeat_ok)),
        ("version", report.version),
    ]
    if report.last_error:
        rows.append(("last error", f"[yellow]{report.last_error}[/]"))
    for key, value in rows:
        console.print(f"{key:>15}: {value}", highlight=False)


@agent.command()
@click.option(
    "--drain",
    is_flag=True,
    help="Let a running test finish first (no new tests start meanwhile).",
)
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Seconds to wait for the agent to exit (default 30; with --drain, no limit).",
)
def stop(drain: bool, timeout: float | None) -> None:
    """Stop the agent daemon. A running test is cancelled (its logs and result are still
    delivered), or with --drain allowed to finish."""
    if timeout is None and not drain:
        timeout = 30.0
    if drain and pid_state(agent_paths().pid).state == "running":
        click.echo("waiting for the running test (if any) to finish before the agent stops")
    try:
        pid = stop_daemon(
            agent_paths().pid, "agent", timeout, DRAIN_SIGNAL if drain else signal.SIGTERM
        )
    except NotRunningError as exc:
        click.echo(str(exc))
        return
    click.echo(f"agent stopped (pid {pid})")


agent.add_command(service)
