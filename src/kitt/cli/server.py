"""``kitt server …``: the control plane."""

from __future__ import annotations

import json
from pathlib import Path

import click
import httpx

from kitt.cli.common import Duration, KittGroup, console
from kitt.errors import AlreadyRunningError, NotRunningError
from kitt.http import build_client
from kitt.logsetup import setup_logging
from kitt.paths import PRIVATE_DIR, ServerPaths, ensure_dir
from kitt.process import PidFile, foreground_argv, pid_state, spawn_background, stop_daemon
from kitt.protocol import DEFAULT_HEARTBEAT_INTERVAL_S
from kitt.server.settings import DEFAULT_SERVER_PORT, ServerSettings


@click.group(cls=KittGroup, name="server")
def server() -> None:
    """Run and manage the KITT control-plane server."""


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the database, pid and log files live (default $KITT_HOME/server).",
)


def _paths(data_dir: Path | None) -> ServerPaths:
    return ServerPaths(data_dir.absolute()) if data_dir else ServerPaths.default()


@server.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_SERVER_PORT,
    show_default=True,
    help="Port to listen on (0 picks a free one).",
)
@data_dir_option
@click.option("--foreground", is_flag=True, help="Stay attached; log to stderr.")
@click.option(
    "--heartbeat-interval",
    type=Duration(),
    default=DEFAULT_HEARTBEAT_INTERVAL_S,
    show_default=True,
    help="Interval agents are told to heartbeat at (offline after 3 missed).",
)
@click.option(
    "--heartbeat-retention",
    type=Duration(),
    default="2d",
    show_default=True,
    help="How long heartbeat history is kept.",
)
@click.option(
    "--lost-after",
    type=Duration(),
    default="5m",
    show_default=True,
    help="A dispatched or running test whose agent sends no heartbeat this long is 'lost'.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), hidden=True)
@click.option(
    "--ready-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds to wait for a background start to report ready.",
)
def start(
    host: str,
    port: int,
    data_dir: Path | None,
    foreground: bool,
    heartbeat_interval: float,
    heartbeat_retention: float,
    lost_after: float,
    log_level: str,
    log_file: Path | None,
    ready_timeout: float,
) -> None:
    """Start the server (in the background unless --foreground)."""
    paths = _paths(data_dir)
    ensure_dir(paths.data_dir, PRIVATE_DIR)  # holds the database and, later, the CA key
    if foreground:
        from kitt.process import run_until_signalled
        from kitt.server.daemon import ServerDaemon

        settings = ServerSettings(
            paths=paths,
            host=host,
            port=port,
            heartbeat_interval_s=heartbeat_interval,
            heartbeat_retention_s=heartbeat_retention,
            lost_after_s=lost_after,
        )
        setup_logging(log_file, log_level)
        run_until_signalled(ServerDaemon(settings), PidFile(paths.pid, "server"))
        return
    running = pid_state(paths.pid)
    if running.state == "running":
        raise AlreadyRunningError(f"the server is already running (pid {running.pid})")
    argv = [
        "server", "start", "--foreground",
        "--host", host,
        "--port", str(port),
        "--data-dir", str(paths.data_dir),
        "--heartbeat-interval", repr(heartbeat_interval),
        "--heartbeat-retention", repr(heartbeat_retention),
        "--lost-after", repr(lost_after),
        "--log-level", log_level,
        "--log-file", str(paths.log),
    ]  # fmt: skip
    pid = spawn_background(foreground_argv(argv), paths.log, ready_timeout)
    url = json.loads(paths.endpoint.read_text())["url"]
    click.echo(f"server started (pid {pid}) at {url}; data in {paths.data_dir}; log: {paths.log}")


@server.command()
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(data_dir: Path | None, as_json: bool) -> None:
    """Show whether the local server runs. Exit 0 running, 3 not running."""
    paths = _paths(data_dir)
    st = pid_state(paths.pid)
    health = None
    url = None
    if st.state == "running":
        try:
            url = json.loads(paths.endpoint.read_text())["url"]
            with build_client(url, timeout=3) as client:
                health = client.get("/api/v1/health").json()
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            health = None
    if as_json:
        click.echo(
            json.dumps({"running": health is not None, "pid": st.pid, "url": url, "health": health})
        )
    elif health is not None:
        console.print(
            f"server: [green]running[/] (pid {st.pid}) at {url}, version {health['version']}"
        )
    elif st.state == "running":
        console.print(f"server: [yellow]not answering[/] (pid {st.pid} holds {paths.pid})")
    else:
        stale = f" (stale pid file naming pid {st.pid})" if st.state == "stale" else ""
        console.print(f"server: [bold red]not running[/]{stale}")
    if health is None:
        raise SystemExit(3)


@server.command()
@data_dir_option
@click.option(
    "--timeout",
    type=float,
    default=15.0,
    show_default=True,
    help="Seconds to wait for the server to exit.",
)
def stop(data_dir: Path | None, timeout: float) -> None:
    """Stop the server started by `kitt server start`."""
    try:
        pid = stop_daemon(_paths(data_dir).pid, "server", timeout)
    except NotRunningError as exc:
        click.echo(str(exc))
        return
    click.echo(f"server stopped (pid {pid})")
