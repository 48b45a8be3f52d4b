"""``kitt server …``: the control plane."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import httpx
from pydantic import ValidationError
from rich.table import Table

from kitt.cli.common import (
    Duration,
    KittGroup,
    console,
    open_fleet,
    print_json_or_nothing,
    server_option,
)
from kitt.errors import AlreadyRunningError, KittError, NotRunningError
from kitt.http import TlsFiles, build_client
from kitt.logsetup import setup_logging
from kitt.paths import PRIVATE_DIR, ServerPaths, ensure_dir
from kitt.pki import load_cert
from kitt.process import PidFile, foreground_argv, pid_state, spawn_background, stop_daemon
from kitt.protocol import DEFAULT_HEARTBEAT_INTERVAL_S, TokenCreate, describe_validation_error
from kitt.server.admin_token import ensure_admin_token
from kitt.server.certs import ServerCerts, san_request, sans
from kitt.server.settings import DEFAULT_SERVER_PORT, ServerSettings
from kitt.urls import is_loopback


@click.group(cls=KittGroup, name="server")
def server() -> None:
    """Run and manage the KITT control-plane server."""


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the database, pid and log files live (default $KITT_HOME/server).",
)


database_option = click.option(
    "--database",
    "database_url",
    envvar="KITT_DATABASE_URL",
    metavar="URL",
    help="Database URL, e.g. postgresql://USER:PASSWORD@HOST:5432/kitt (also "
    "$KITT_DATABASE_URL; default: the SQLite file DATA_DIR/kitt.db).",
)


def _paths(data_dir: Path | None) -> ServerPaths:
    return ServerPaths(data_dir.absolute()) if data_dir else ServerPaths.default()


class RetentionDuration(Duration):
    """A :class:`Duration`, or ``off``/``0`` for "keep forever" (0.0)."""

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if str(value).strip().lower() in ("off", "0", "0.0", "never", "forever"):
            return 0.0
        return super().convert(value, param, ctx)


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
@database_option
@click.option("--foreground", is_flag=True, help="Stay attached; log to stderr.")
@click.option(
    "--tls/--no-tls",
    default=None,
    help="Serve HTTPS with the fleet CA (default: on unless --host is a loopback address).",
)
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    help="DNS name agents use to reach this server (repeatable; goes into its certificate).",
)
@click.option(
    "--ip",
    "ips",
    multiple=True,
    help="IP address agents use to reach this server (repeatable; goes into its certificate).",
)
@click.option(
    "--agent-cert-lifetime",
    type=Duration(),
    default="90d",
    show_default=True,
    help="Validity of agent certificates (agents renew at two thirds of it).",
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="No tokens at all (development only; refused unless --host is a loopback address).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow plain HTTP on a non-loopback address (development only; warns at every start).",
)
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
    "--log-retention",
    type=RetentionDuration(),
    default="off",
    show_default=True,
    help="Delete the log lines of tests finished longer ago than this, e.g. 30d (the tests "
    "and their results stay). 'off' or 0: keep logs forever.",
)
@click.option("--prune-every", type=Duration(), default="5m", hidden=True)
@click.option("--pending-resync", type=Duration(), default="30s", hidden=True)
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
@click.option(
    "--agent-package",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Agent wheel to hand out (default: one built of this server's own code).",
)
@click.option(
    "--wheelhouse",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Dependency wheels for agents without PyPI (default: DATA_DIR/wheelhouse, "
    "filled by `kitt server wheelhouse`).",
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
    database_url: str | None,
    foreground: bool,
    tls: bool | None,
    hostnames: tuple[str, ...],
    ips: tuple[str, ...],
    agent_cert_lifetime: float,
    no_auth: bool,
    insecure: bool,
    heartbeat_interval: float,
    heartbeat_retention: float,
    log_retention: float,
    prune_every: float,
    pending_resync: float,
    lost_after: float,
    agent_package: Path | None,
    wheelhouse: Path | None,
    log_level: str,
    log_file: Path | None,
    ready_timeout: float,
) -> None:
    """Start the server (in the background unless --foreground)."""
    from kitt.server.store.db import parse_url

    paths = _paths(data_dir)
    database_url = database_url or None
    if database_url is not None:
        parse_url(database_url)  # a malformed URL fails here, before anything starts
    ensure_dir(paths.data_dir, PRIVATE_DIR)  # holds the database and the CA key
    loopback = is_loopback(host)
    if tls is None:
        tls = not loopback
    if no_auth and not loopback:
        raise click.UsageError(
            f"--no-auth is refused on {host}: it is only allowed on a loopback address"
        )
    if not tls and not loopback and not insecure:
        raise click.UsageError(
            f"plain HTTP on {host} would send tokens in clear text: drop --no-tls, or add "
            "--insecure for a development setup"
        )
    if foreground:
        from kitt.process import run_until_signalled
        from kitt.server.daemon import ServerDaemon

        settings = ServerSettings(
            paths=paths,
            database_url=database_url,
            host=host,
            port=port,
            heartbeat_interval_s=heartbeat_interval,
            heartbeat_retention_s=heartbeat_retention,
            log_retention_s=log_retention or None,
            prune_every_s=prune_every,
            pending_resync_s=pending_resync,
            lost_after_s=lost_after,
            tls=tls,
            hostnames=list(hostnames),
            ips=list(ips),
            no_auth=no_auth,
            insecure=insecure,
            agent_cert_lifetime=timedelta(seconds=agent_cert_lifetime),
            agent_package=agent_package.absolute() if agent_package else None,
            wheelhouse=wheelhouse.absolute() if wheelhouse else None,
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
        "--log-retention", repr(log_retention),
        "--prune-every", repr(prune_every),
        "--pending-resync", repr(pending_resync),
        "--lost-after", repr(lost_after),
        "--agent-cert-lifetime", repr(agent_cert_lifetime),
        "--log-level", log_level,
        "--log-file", str(paths.log),
        "--tls" if tls else "--no-tls",
    ]  # fmt: skip
    for flag, values in (("--hostname", hostnames), ("--ip", ips)):
        for value in values:
            argv += [flag, value]
    for flag, path in (("--agent-package", agent_package), ("--wheelhouse", wheelhouse)):
        if path is not None:
            argv += [flag, str(path.absolute())]
    argv += [flag for flag, on in (("--no-auth", no_auth), ("--insecure", insecure)) if on]
    new_token = None
    if not no_auth:
        token, created = ensure_admin_token(paths.admin_token)
        new_token = token if created else None
    if database_url is not None:
        # Handed down in the environment, not on the command line: `ps` shows argv, and
        # the URL may carry a password.
        os.environ["KITT_DATABASE_URL"] = database_url
    pid = spawn_background(foreground_argv(argv), paths.log, ready_timeout)
    url = json.loads(paths.endpoint.read_text())["url"]
    click.echo(f"server started (pid {pid}) at {url}; data in {paths.data_dir}; log: {paths.log}")
    public = json.loads(paths.endpoint.read_text()).get("public_url", url)
    sign_in = "no sign-in (--no-auth)" if no_auth else "sign in with the admin token"
    click.echo(f"dashboard: {public}/ ({sign_in})")
    if database_url is not None:
        from kitt.server.store.db import shown

        click.echo(f"database: {shown(database_url)}")
    _print_security(paths, url, tls, no_auth, new_token)


def _print_security(
    paths: ServerPaths, url: str, tls: bool, no_auth: bool, new_token: str | None
) -> None:
    if no_auth:
        console.print(
            "[bold red]WARNING: authentication is OFF (--no-auth)[/]: anyone on this host "
            "can control the server"
        )
    if new_token is not None:
        console.print(
            f"admin token (shown once; kept in {paths.admin_token}, mode 0600):\n  {new_token}",
            highlight=False,
        )
    if tls:
        certs = ServerCerts(paths.certs)
        public = _local_url(paths)
        console.print(
            f"fleet CA {certs.ca}\n  SHA-256 fingerprint {certs.fingerprint()}\n"
            "to enroll an agent: make a bootstrap token here (kitt server token create), "
            "then on the GPU machine:\n"
            f"  kitt-agent init --server {public} --ca-fingerprint {certs.fingerprint()} "
            "--token BOOTSTRAP_TOKEN",
            highlight=False,
        )


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
            endpoint = json.loads(paths.endpoint.read_text())
            url = endpoint["url"]
            ca = Path(endpoint["ca"]) if endpoint.get("ca") else None
            with build_client(url, timeout=3, tls=TlsFiles(ca=ca)) as client:
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


@server.command()
@data_dir_option
@click.option("--fingerprint", "only_fingerprint", is_flag=True, help="Print only the fingerprint.")
def ca(data_dir: Path | None, only_fingerprint: bool) -> None:
    """Print the fleet CA certificate (copy it to agents as ~/.kitt/certs/ca.pem) and its
    SHA-256 fingerprint (for `kitt-agent init --ca-fingerprint`)."""
    certs = _certs(data_dir)
    if only_fingerprint:
        click.echo(certs.fingerprint())
        return
    click.echo(certs.ca.read_text(), nl=False)
    click.echo(f"SHA-256 fingerprint: {certs.fingerprint()}", err=True)


def _certs(data_dir: Path | None) -> ServerCerts:
    certs = ServerCerts(_paths(data_dir).certs)
    if not certs.exists():
        raise KittError(
            f"no fleet CA in {certs.dir}: start the server with TLS first "
            "(kitt server start --tls, or on a non-loopback --host)"
        )
    return certs


@server.group(cls=KittGroup)
def cert() -> None:
    """The server's own TLS certificate."""


@cert.command()
@data_dir_option
@click.option("--hostname", "hostnames", multiple=True, help="DNS name to include (repeatable).")
@click.option("--ip", "ips", multiple=True, help="IP address to include (repeatable).")
def rotate(data_dir: Path | None, hostnames: tuple[str, ...], ips: tuple[str, ...]) -> None:
    """Issue a new server certificate (new key) from the same CA; agents keep working.

    Without --hostname/--ip it keeps the names of the current certificate."""
    certs = _certs(data_dir)
    names, addrs = list(hostnames), list(ips)
    if not names and not addrs and certs.cert.exists():
        old_names, old_ips = sans(load_cert(certs.cert))
        names, addrs = old_names, [str(ip) for ip in old_ips]
    names, addrs = san_request(names, addrs)
    cert_obj = certs.issue_server_cert(names, addrs)
    click.echo(
        f"new server certificate {certs.cert} for {', '.join(names + addrs)} "
        f"(valid until {cert_obj.not_valid_after_utc:%Y-%m-%d})"
    )
    if pid_state(_paths(data_dir).pid).state == "running":
        click.echo("the running server switches to it within seconds (no restart needed)")


@server.group(cls=KittGroup)
def token() -> None:
    """Bootstrap tokens that let new agents enroll."""


@token.command("create")
@server_option
@click.option(
    "--ttl", type=Duration(), default="1h", show_default=True, help="How long it stays valid."
)
@click.option(
    "--uses", type=click.IntRange(1, 100_000), default=1, show_default=True,
    help="How many agents may enroll with it.",
)  # fmt: skip
@click.option("--note", help="A reminder of what it is for (shown by `token list`).")
@click.option("--quiet", "-q", is_flag=True, help="Print only the token (for scripts).")
def token_create(
    server_url: str | None, ttl: float, uses: int, note: str | None, quiet: bool
) -> None:
    """Make a bootstrap token; it is shown once."""
    try:
        request = TokenCreate(ttl_s=ttl, uses=uses, note=note)
    except ValidationError as exc:
        raise click.BadParameter(describe_validation_error(exc)) from None
    with open_fleet(server_url) as fleet:
        created = fleet.create_token(request)
    if quiet:
        click.echo(created.token)
        return
    click.echo(
        f"bootstrap token {created.id}: {created.max_uses} use(s), valid until "
        f"{created.expires_at:%Y-%m-%d %H:%M:%S} UTC (shown once):\n{created.token}"
    )


@token.command("list")
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def token_list(server_url: str | None, as_json: bool) -> None:
    """Bootstrap tokens (never their secret), newest first."""
    with open_fleet(server_url) as fleet:
        items = fleet.tokens()
    if print_json_or_nothing(items, as_json, "no bootstrap tokens"):
        return
    table = Table(box=None, pad_edge=False)
    for col in ("ID", "STATE", "USES", "EXPIRES", "NOTE"):
        table.add_column(col)
    for t in items:
        table.add_row(
            t.id, t.state, f"{t.uses}/{t.max_uses}", f"{t.expires_at:%Y-%m-%d %H:%M}", t.note or ""
        )
    console.print(table)


@token.command("revoke")
@click.argument("token_id")
@server_option
def token_revoke(token_id: str, server_url: str | None) -> None:
    """Revoke a bootstrap token (agents already enrolled with it are not affected)."""
    with open_fleet(server_url) as fleet:
        info = fleet.revoke_token(token_id)
    click.echo(f"bootstrap token {info.id} is {info.state}")


@server.command("issue-agent-cert")
@click.argument("name")
@data_dir_option
@database_option
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write the bundle into (created; must be empty or new).",
)
@click.option("--server-url", help="URL the agent will use (default: this host's running server).")
@click.option(
    "--lifetime", type=Duration(), default="90d", show_default=True, help="Certificate validity."
)
def issue_agent_cert(
    name: str,
    data_dir: Path | None,
    database_url: str | None,
    out: Path,
    server_url: str | None,
    lifetime: float,
) -> None:
    """Enroll an air-gapped agent offline: key, certificate and token in a bundle to carry
    over (then on that host: kitt-agent init --bundle DIR)."""
    from kitt.server.bundle import write_bundle

    paths = _paths(data_dir)
    url = server_url or _local_url(paths)
    written = write_bundle(
        paths, _certs(data_dir), name, out, url, timedelta(seconds=lifetime), database_url
    )
    click.echo(f"wrote {', '.join(p.name for p in written)} to {out} (keep it private)")
    click.echo(f"on the agent host: kitt-agent init --bundle {out}")


@server.command()
@data_dir_option
@click.option(
    "--python-version",
    "python_versions",
    multiple=True,
    help="Python version of the agents, e.g. 3.10 (repeatable; default: this interpreter's).",
)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    help="pip platform tag of the agents, e.g. manylinux2014_x86_64 (repeatable; "
    "default: this machine's).",
)
def wheelhouse(
    data_dir: Path | None, python_versions: tuple[str, ...], platforms: tuple[str, ...]
) -> None:
    """Download the agent's dependencies as wheels (pip download), so that GPU machines
    with no route to PyPI install everything from this server. Restart the server after."""
    from kitt.cli.wheelhouse import fill_wheelhouse

    dest = _paths(data_dir).wheelhouse
    files = fill_wheelhouse(dest, python_versions, platforms, click.echo)
    size = sum(p.stat().st_size for p in files) / 1e6
    click.echo(f"{len(files)} wheels ({size:.1f} MB) in {dest}")
    if pid_state(_paths(data_dir).pid).state == "running":
        click.echo("restart the server to serve them: kitt server stop && kitt server start …")


@server.command("migrate")
@data_dir_option
@database_option
def migrate_command(data_dir: Path | None, database_url: str | None) -> None:
    """Bring the database schema to this KITT's newest revision and print the revision.

    `kitt server start` does the same; run this to migrate ahead of starting the server,
    e.g. to check a PostgreSQL database before an upgrade."""
    from kitt.server.store.db import current_revision, make_engine, migrate, shown, sqlite_url

    paths = _paths(data_dir)
    if not database_url:
        ensure_dir(paths.data_dir, PRIVATE_DIR)
        database_url = sqlite_url(paths.database)
    engine = make_engine(database_url)
    try:
        before = current_revision(engine)
        after = migrate(engine)
    finally:
        engine.dispose()
    if before == after:
        change = "already current"
    elif before is None:
        change = "schema created"
    else:
        change = f"migrated from {before}"
    click.echo(f"database {shown(database_url)}: revision {after} ({change})")


@server.command()
@click.argument("file", type=click.Path(dir_okay=True, path_type=Path))
@data_dir_option
@database_option
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def backup(file: Path, data_dir: Path | None, database_url: str | None, force: bool) -> None:
    """Copy the database to FILE (0600), consistently, while the server runs or not; the
    copy is checked (integrity, KITT schema) before FILE appears."""
    from kitt.server.backup import backup_database, sqlite_file

    paths = _paths(data_dir)
    facts = backup_database(sqlite_file(database_url, paths), file, force=force)
    click.echo(f"backup written: {facts.path} ({_size(facts.size)}, mode 0600, integrity ok)")
    click.echo(facts.summary())


@server.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@data_dir_option
@database_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def restore(file: Path, data_dir: Path | None, database_url: str | None, yes: bool) -> None:
    """Replace the database with the backup FILE (the server must be stopped). The current
    database is kept aside as kitt.db.before-restore-<time>."""
    from kitt.server.backup import (
        DatabaseFacts,
        head_revision,
        restore_database,
        sqlite_file,
    )

    paths = _paths(data_dir)
    database = sqlite_file(database_url, paths)

    def confirm(facts: DatabaseFacts) -> None:
        if not yes:
            click.confirm(
                f"Replace {database} with {file} ({facts.summary()})?", abort=True, err=True
            )

    done = restore_database(paths, database, file, confirm)
    if done.moved_aside:
        click.echo(f"previous database moved aside: {', '.join(str(p) for p in done.moved_aside)}")
    else:
        click.echo(f"there was no database at {database}: nothing to move aside")
    click.echo(f"restored {done.facts.path} into {database} (mode 0600)")
    click.echo(done.facts.summary())
    head = head_revision()
    if done.facts.revision == head:
        click.echo("the schema is current; start the server with `kitt server start`")
    else:
        click.echo(
            f"the next `kitt server start` migrates it from revision {done.facts.revision} "
            f"to {head}"
        )


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _local_url(paths: ServerPaths) -> str:
    """The URL other machines use for the server running here."""
    try:
        endpoint = json.loads(paths.endpoint.read_text())
        return str(endpoint.get("public_url") or endpoint["url"])
    except (OSError, ValueError, KeyError):
        raise KittError(
            "the server is not running here: pass --server-url https://HOST:PORT"
        ) from None
