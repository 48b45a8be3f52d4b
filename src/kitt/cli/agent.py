"""``kitt agent …`` (also installed as ``kitt-agent …``): the daemon on each GPU machine."""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path
from typing import Any

import click
import httpx

from kitt import __version__, pki
from kitt.agent.config import (
    DEFAULT_AGENT_PORT,
    AgentConfig,
    load_config,
    read_raw,
    update_config,
    validate,
)
from kitt.agent.enrollment import enroll, ensure_ca, install_bundle
from kitt.agent.enrollment import renew as renew_certificate
from kitt.agent.preflight import load_context, run_preflight
from kitt.agent.server_client import tls_files
from kitt.cli.common import KittGroup, ago, console, human_duration
from kitt.cli.preflight import preflight, print_report
from kitt.cli.service import service
from kitt.errors import AlreadyRunningError, KittError, NotRunningError
from kitt.fleet_client import FleetClient, resolve_target
from kitt.http import build_client
from kitt.logsetup import setup_logging
from kitt.paths import AgentPaths, agent_paths
from kitt.process import (
    DRAIN_SIGNAL,
    PidFile,
    foreground_argv,
    pid_state,
    spawn_background,
    stop_daemon,
)
from kitt.protocol import AgentStatusReport, TokenCreate
from kitt.urls import validate_server_url


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
@click.option("--server", "server_url", help="Control-plane URL, e.g. https://kitt:8080.")
@click.option("--token", help="Bootstrap token from the operator (kitt server token create).")
@click.option("--name", help="Agent name (default: this machine's short hostname).")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help=f"Port the agent listens on (default {DEFAULT_AGENT_PORT}).",
)
@click.option("--bind", help="Address the agent listens on (default 0.0.0.0).")
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The fleet CA certificate (from `kitt server ca`), for an https:// server.",
)
@click.option(
    "--ca-fingerprint",
    help="SHA-256 fingerprint of the fleet CA: fetch the CA from the server and pin it.",
)
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Offline enrollment: a folder made by `kitt server issue-agent-cert`.",
)
@click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), help="Config file to write."
)
def init(
    server_url: str | None,
    token: str | None,
    name: str | None,
    port: int | None,
    bind: str | None,
    ca_file: Path | None,
    ca_fingerprint: str | None,
    bundle: Path | None,
    config: Path | None,
) -> None:
    """Configure this agent (agent.yaml) and, for an https:// server, enroll it: a key and
    CSR made here, signed by the server after it checks the bootstrap token."""
    path = _config_path(config)
    paths = agent_paths()
    changes: dict[str, Any] = {"port": port, "bind": bind, "name": name}
    if bundle is not None:
        meta = install_bundle(paths, bundle)
        changes.update(server_url=meta["server_url"], name=meta["name"], token=meta["token"])
        changes["tls"] = _tls_paths(paths)
        cfg = update_config(path, changes)
        click.echo(f"installed the bundle for agent '{cfg.name}' (server {cfg.server_url})")
        click.echo(f"wrote {path}; start the agent with: kitt-agent start")
        return
    if server_url is None:
        raise click.UsageError("--server URL is required (or --bundle DIR)")
    try:
        server_url = validate_server_url(server_url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--server") from None
    if name is None and not path.exists():
        changes["name"] = default_agent_name()
    current = read_raw(path) if path.exists() else {}
    agent_name = changes["name"] or current.get("name") or default_agent_name()
    changes["server_url"] = server_url
    # Check the resulting config before enrolling: a refusal after enrollment would
    # spend the bootstrap token and lose the agent token the server issued.
    validate({**current, **{k: v for k, v in changes.items() if v is not None},
              "name": agent_name, "token": "placeholder"}, path)  # fmt: skip
    if server_url.startswith("https://"):
        if ca_file is None and ca_fingerprint is None and not paths.ca.exists():
            ca_file = _local_server_ca(server_url)
        fingerprint = ensure_ca(paths, server_url, ca_file, ca_fingerprint)
        click.echo(f"trusting the fleet CA {paths.ca} (SHA-256 {fingerprint})")
        if token is None and _enrolled(current, server_url, agent_name, paths):
            click.echo(f"already enrolled as '{agent_name}'; keeping this identity")
        else:
            bootstrap = token or _local_bootstrap_token(server_url)
            assert bootstrap is not None  # noqa: S101 - required=True raises instead
            enrolled = enroll(paths, server_url, agent_name, bootstrap)
            changes["token"] = enrolled.token
            changes["tls"] = _tls_paths(paths)
            click.echo(
                f"enrolled as '{enrolled.name}': key {paths.key} (0600, never sent), "
                f"certificate {paths.cert} valid until {enrolled.not_after[:10]}"
            )
    else:
        if ca_file or ca_fingerprint:
            raise click.UsageError("--ca/--ca-fingerprint need an https:// server URL")
        if token is None and not current.get("token"):
            token = _local_bootstrap_token(server_url, required=False)
        changes["token"] = token
    cfg = update_config(path, changes)
    click.echo(f"wrote {path} (agent '{cfg.name}', server {cfg.server_url}, port {cfg.port})")
    click.echo("start the agent with: kitt-agent start")


def _local_server_ca(server_url: str) -> Path | None:
    """On the server's own host, its CA file is right here."""
    ca = resolve_target(server_url, None).ca
    return ca if ca is not None and ca.exists() else None


def _tls_paths(paths: AgentPaths) -> dict[str, str]:
    return {"cert": str(paths.cert), "key": str(paths.key), "ca": str(paths.ca)}


def _enrolled(current: dict[str, Any], server_url: str, name: str, paths: AgentPaths) -> bool:
    """Whether agent.yaml already holds a live identity for this server and name (so a
    re-run of init, e.g. by the installer, keeps it instead of enrolling again)."""
    if current.get("server_url") != server_url or current.get("name") != name:
        return False
    if not current.get("token") or not isinstance(current.get("tls"), dict):
        return False
    try:
        cert = pki.load_cert(paths.cert)
    except pki.PkiError:
        return False
    return cert.not_valid_after_utc > pki.utcnow()


def _local_bootstrap_token(server_url: str, required: bool = True) -> str | None:
    """With no --token, a server running under this same KITT_HOME can mint a single-use
    bootstrap token itself (its admin token is right here): the one-host quick start."""
    target = resolve_target(server_url, None)
    if target.token is not None:
        try:
            with FleetClient(target.url, token=target.token, ca=target.ca) as fleet:
                created = fleet.create_token(
                    TokenCreate(ttl_s=600, uses=1, note="kitt-agent init (local)")
                )
        except KittError as exc:
            if required:
                raise
            click.echo(f"note: could not get a bootstrap token from the local server: {exc}")
            return None
        click.echo(f"using a single-use bootstrap token ({created.id}) from the local server")
        return created.token
    if required:
        raise click.UsageError(
            "--token BOOTSTRAP_TOKEN is required (the operator makes one with "
            "`kitt server token create`)"
        )
    return None


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
@click.option(
    "--preflight",
    "run_checks",
    is_flag=True,
    help="Run kitt-agent preflight first; refuse to start when a required check fails.",
)
def start(
    config: Path | None,
    foreground: bool,
    insecure: bool,
    log_file: Path | None,
    ready_timeout: float,
    run_checks: bool,
) -> None:
    """Start the agent: register, heartbeat, and serve the agent API."""
    path = _config_path(config)
    if run_checks and not print_report(run_preflight(load_context(config_path=path))):
        raise SystemExit(1)
    cfg = load_config(path)
    paths = agent_paths()
    if foreground:
        from kitt.agent.daemon import AgentDaemon
        from kitt.process import run_until_signalled

        setup_logging(log_file, cfg.log_level)
        daemon = AgentDaemon(cfg, paths, insecure=insecure, config_path=path)
        run_until_signalled(daemon, PidFile(paths.pid, "agent"))
        return
    running = pid_state(paths.pid)
    if running.state == "running":
        raise AlreadyRunningError(f"the agent is already running (pid {running.pid})")
    from kitt.agent.daemon import listener_security

    listener_security(cfg, path, insecure)  # refuse an unsafe listener before spawning
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
    """Ask the local agent how it is; with TLS, as itself (its own certificate)."""
    host = "127.0.0.1" if cfg.bind in ("0.0.0.0", "::", "") else cfg.bind
    tls = tls_files(cfg)
    scheme = "https" if tls is not None else "http"
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{cfg.port}"
    try:
        client = build_client(url, tls=tls, timeout=timeout)
    except pki.PkiError:
        return None
    with client:
        try:
            response = client.get("/api/status", extensions={"sni_hostname": cfg.name})
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
    if report.settings:  # in force: pushed by the server (`kitt agents set`), else defaults
        shown = [f"{k}={v:g}" if isinstance(v, int | float) else f"{k}={v}"
                 for k, v in report.settings.items()]  # fmt: skip
        rows.append(("settings", ", ".join(shown)))
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
agent.add_command(preflight)


@agent.command()
@click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), help="agent.yaml to use."
)
@click.option("--insecure", is_flag=True, help="Do not verify the server's TLS certificate.")
def renew(config: Path | None, insecure: bool) -> None:
    """Renew the agent's certificate now (a running agent picks it up without a restart)."""
    cfg = load_config(_config_path(config))
    tls = tls_files(cfg)
    if tls is None or not cfg.server_url.startswith("https://"):
        raise KittError("this agent has no certificate: it talks to a plain-HTTP server")
    issued = renew_certificate(cfg.server_url, cfg.token, tls, cfg.name, insecure=insecure)
    click.echo(f"renewed {tls.cert}: valid until {issued.not_after:%Y-%m-%d %H:%M:%S} UTC")
