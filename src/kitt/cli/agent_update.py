"""``kitt-agent update`` and ``kitt-agent activate``: new agent versions from the server.

``activate`` is the second half of the install script, run by the *new* version's own
``kitt-agent`` (so the newer code decides how it is switched on): enrollment, preflight,
the venv link, and the daemon or systemd service. ``update`` is the whole install from a
running agent: download, check, build the venv, then the new version's ``activate``.
Every step that fails puts back what was there before.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

from kitt import __version__
from kitt.agent.config import load_config, read_raw
from kitt.agent.service import (
    DEFAULT_UNIT_NAME,
    Systemctl,
    install_service,
    is_kitt_unit,
    privilege_prefix,
    uninstall_service,
    unit_file_name,
    unit_path,
    write_unit_file,
)
from kitt.agent.upgrade import (
    Snapshot,
    UpgradeError,
    build_venv,
    download_package,
    installed_sha,
    link_target,
    prune_venvs,
    switch_link,
    systemd_unit_of,
    venv_dir,
)
from kitt.cli.agent import _config_path, _enrolled, default_agent_name, init, probe_status
from kitt.errors import ApiError, KittError
from kitt.paths import AgentPaths, agent_paths
from kitt.process import pid_state, stop_daemon

TOKEN_ENV = "KITT_BOOTSTRAP_TOKEN"  # noqa: S105 - the name of a variable, not a secret
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Running:
    """How the agent ran before the switch: not at all, as a daemon, or under systemd."""

    pid: int | None
    unit: str | None


def _running(paths: AgentPaths, unit_name: str) -> Running:
    st = pid_state(paths.pid)
    if st.state != "running" or st.pid is None:
        return Running(None, None)
    unit = systemd_unit_of(st.pid) or _main_pid_of(unit_file_name(unit_name), st.pid)
    if unit is not None and not is_kitt_unit(unit):
        # Restarting a unit KITT did not write could restart something else entirely
        # (a CI runner that started the agent); stopping it would leave systemd's control.
        raise UpgradeError(
            f"the agent (pid {st.pid}) runs inside systemd unit {unit}, which KITT did not "
            "install: run `kitt-agent update` without --restart, then restart that unit"
        )
    return Running(st.pid, unit)


def _main_pid_of(unit: str, pid: int) -> str | None:
    """``unit`` if the KITT unit of that name is what runs ``pid`` (systemd's MainPID):
    the cgroup says so on a normal host, this also where cgroups are not visible."""
    if not is_kitt_unit(unit):
        return None
    try:
        shown = _systemctl().run("show", "--property", "MainPID", "--value", unit).stdout
    except KittError:
        return None
    return unit if shown.strip() == str(pid) else None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _systemctl() -> Systemctl:
    euid = os.geteuid()
    return Systemctl.locate(privilege_prefix(euid, shutil.which("sudo") if euid else None))


def _kitt_agent(paths: AgentPaths) -> str:
    return str(paths.venv_link / "bin" / "kitt-agent")


def _check(argv: list[str], what: str) -> None:
    """Run a step of the new version, its output going straight to the user."""
    try:
        rc = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL).returncode
    except OSError as exc:
        raise UpgradeError(f"{what}: {exc}") from exc
    if rc != 0:
        raise UpgradeError(f"{what} (exit {rc})")


def _identity(ctx: click.Context, token: str | None, enrolled: bool, **init_args: object) -> None:
    """Run ``init``: enroll with the token, or keep the identity this agent has.

    With both a token and an identity, the server decides: an identity it revoked is
    replaced (the token enrolls again), a live one is kept (the server refuses the token
    with 409 and does not spend it), and a spent token (a re-run of the same line) keeps
    it too.
    """
    if enrolled and token:
        try:
            ctx.invoke(init, token=token, **init_args)
            return
        except KittError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, ApiError) and cause.status in (401, 409)):
                raise
        click.echo(f"'{init_args['name'] or 'this agent'}' is enrolled already: keeping its "
                   "identity")  # fmt: skip
    ctx.invoke(init, token=None if enrolled else token, **init_args)


def _registered(cfg_path: Path) -> None:
    """An agent that runs but is not registered is not installed: say why it is not."""
    report = probe_status(load_config(cfg_path))
    if report is None or not report.registered:
        reason = report.last_error if report is not None else "it does not answer"
        raise UpgradeError(f"the agent started but is not registered with the server: {reason}")


def _running_venv(paths: AgentPaths) -> Path | None:
    """The venv the running daemon was started from (kept: it still runs from it)."""
    st = pid_state(paths.pid)
    if st.state != "running" or st.pid is None:
        return None
    try:
        argv0 = Path(f"/proc/{st.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, UnicodeDecodeError):
        return None
    venv = Path(argv0).parent.parent
    return venv if venv.parent == paths.venvs else None


@dataclass
class _Undo:
    """What an activation changed beyond the files in the Snapshot, to put back."""

    stopped: bool = False
    unit: str | None = None
    unit_text: str = ""  # the unit file before ("" if there was none)
    unit_touched: bool = False


@click.command(hidden=True)
@click.option("--venv", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--server", "server_url", required=True)
@click.option("--ca", "ca_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name")
@click.option("--port", type=click.IntRange(1, 65535))
@click.option("--bind")
@click.option("--service", is_flag=True, help="Run the agent as a systemd service.")
@click.option("--unit-name", default=DEFAULT_UNIT_NAME, show_default=True)
@click.option("--no-start", is_flag=True, help="Switch to the new venv but restart nothing.")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def activate(
    ctx: click.Context,
    venv: Path,
    server_url: str,
    ca_file: Path | None,
    name: str | None,
    port: int | None,
    bind: str | None,
    service: bool,
    unit_name: str,
    no_start: bool,
    config: Path | None,
) -> None:
    """Switch this machine's agent to the venv this command runs from (installer use)."""
    # Read once and dropped: the daemon and its benchmarks must not inherit it.
    token = os.environ.pop(TOKEN_ENV, None) or None
    paths = agent_paths()
    cfg = _config_path(config)
    venv = Path(os.path.abspath(venv))
    previous = link_target(paths)
    keep = {venv, *(v for v in (previous, _running_venv(paths)) if v is not None)}
    before = Running(None, None) if no_start else _running(paths, unit_name)
    undo = _Undo()
    if not no_start:
        ours = unit_file_name(unit_name)
        # An installed KITT unit stays in charge even while stopped: a plain daemon next to
        # it would be outside systemd's control.
        if service or before.unit or is_kitt_unit(ours):
            undo.unit = before.unit or ours
        if before.pid is not None:
            report = probe_status(load_config(cfg))
            if report is not None and report.running:
                raise UpgradeError(
                    f"the agent is running test {report.current_task}: try again once it is "
                    "idle (kitt-agent stop --drain stops it after the test)"
                )
    snapshot = Snapshot.take(paths, cfg)
    if undo.unit is not None:
        undo.unit_text = _read(unit_path(undo.unit))
    try:
        # Checks first, so that a machine that cannot run the agent is never enrolled.
        check = [sys.executable, "-m", "kitt", "agent", "preflight", "--server", server_url]
        check += ["--config", str(cfg)] if cfg.exists() else []
        check += ["--port", str(port)] if port else []
        check += ["--bind", bind] if bind else []
        check += ["--ca", str(ca_file)] if ca_file else []
        check += ["--service"] if undo.unit else []
        _check(check, "a required preflight check failed")
        current = read_raw(cfg) if cfg.exists() else {}
        agent_name = name or current.get("name") or default_agent_name()
        _identity(
            ctx, token, _enrolled(current, server_url, agent_name, paths),
            server_url=server_url, name=name, port=port, bind=bind, ca_file=ca_file,
            ca_fingerprint=None, bundle=None, config=config,
        )  # fmt: skip
        if no_start:
            snapshot.moved = switch_link(paths, venv)
            click.echo(f"{paths.venv_link} -> {venv}; the running agent (if any) keeps the "
                       "old version until it restarts")  # fmt: skip
        else:
            if before.pid is not None and before.unit is None:
                stop_daemon(paths.pid, "agent", STOP_TIMEOUT_S)
                undo.stopped = True
                click.echo(f"stopped the previous agent (pid {before.pid})")
            snapshot.moved = switch_link(paths, venv)
            if undo.unit is not None:
                undo.unit_touched = True
                install_service(click.echo, unit_name=undo.unit, config=cfg, start=True)
                if before.unit == undo.unit:
                    _systemctl().run("restart", undo.unit)
                    click.echo(f"ran systemctl restart {undo.unit}")
            else:
                _check([_kitt_agent(paths), "start", "--config", str(cfg)],
                       "the agent did not start")  # fmt: skip
            _registered(cfg)
    except BaseException:
        click.echo("undoing: putting back the previous agent, config, certificates and venv",
                   err=True)  # fmt: skip
        _undo(paths, cfg, snapshot, before, undo)
        raise
    prune_venvs(paths, keep | ({snapshot.moved} if snapshot.moved else set()), click.echo)
    click.echo(f"kitt {__version__} is active: {paths.venv_link} -> {venv}")


def _undo(paths: AgentPaths, cfg: Path, snapshot: Snapshot, before: Running, undo: _Undo) -> None:
    """Put everything back; each step best effort, so one failure does not stop the rest."""
    with _quietly():
        st = pid_state(paths.pid)
        if st.state == "running" and st.pid != before.pid and before.unit is None:
            stop_daemon(paths.pid, "agent", STOP_TIMEOUT_S)  # a new daemon that came up late
    if undo.unit is not None and undo.unit_touched:
        with _quietly():
            if not undo.unit_text:
                uninstall_service(click.echo, unit_name=undo.unit)
            else:
                systemctl = _systemctl()
                write_unit_file(unit_path(undo.unit), undo.unit_text, systemctl.prefix)
                systemctl.run("daemon-reload")
    with _quietly():
        snapshot.restore(paths)
    if undo.stopped:
        with _quietly():
            _check([_kitt_agent(paths), "start", "--config", str(cfg)], "restart")
            click.echo("restarted the previous agent", err=True)
    elif before.unit is not None and undo.unit_touched:  # untouched: it still runs as it was
        with _quietly():
            _systemctl().run("restart", before.unit)
            click.echo(f"restarted {before.unit}", err=True)


class _quietly:
    """Best effort while undoing: a second failure must not hide the first one."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        if exc[1] is not None and isinstance(exc[1], (KittError, OSError)):
            click.echo(f"could not put the previous state back: {exc[1]}", err=True)
            return True
        return False


@click.command()
@click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), help="agent.yaml to use."
)
@click.option(
    "--restart",
    is_flag=True,
    help="Restart the agent (or its systemd service) on the new version at once.",
)
@click.option(
    "--force", is_flag=True, help="Activate again even when the server has nothing newer."
)
@click.option(
    "--allow-http",
    is_flag=True,
    help="Accept a package over plain HTTP (nothing then proves where it came from).",
)
def update(config: Path | None, restart: bool, force: bool, allow_http: bool) -> None:
    """Install the agent version the server hands out (checked by its SHA-256) next to this
    one and switch to it; with --restart, restart the agent on it now."""
    path = _config_path(config)
    cfg = load_config(path)
    paths = agent_paths()
    https = cfg.server_url.startswith("https://")
    if not https and not allow_http:
        # The SHA-256 would travel over the same unauthenticated channel as the wheel.
        raise UpgradeError(
            f"{cfg.server_url} is plain HTTP: anyone on the path could hand this agent code "
            "to run. Use an HTTPS server, or pass --allow-http on a network you trust"
        )
    ca = (cfg.tls.ca if cfg.tls and cfg.tls.ca else paths.ca) if https else None
    if link_target(paths) is None:
        raise KittError(
            f"this agent was not installed by the install script (no {paths.venv_link} "
            "link), so update does not know where to install: re-run the install line from "
            "`kitt agents add`, or upgrade its venv with pip"
        )
    with tempfile.TemporaryDirectory(prefix="kitt-update-") as tmp:
        download = download_package(cfg.server_url, ca, Path(tmp))
        info = download.info
        active = link_target(paths)
        if not force and active is not None and installed_sha(active) == info.sha256:
            report = probe_status(cfg)
            if not (restart and report is not None and report.version != info.version):
                click.echo(f"already up to date: kitt {info.version} (SHA-256 {info.sha256[:12]}…)")
                return
            click.echo(f"kitt {info.version} is installed; the agent still runs {report.version}")
            _activate(paths, active, cfg.server_url, path, restart=True, created=False)
            return
        click.echo(f"server hands out kitt {info.version} (this agent: {__version__})")
        venv = venv_dir(paths, info)
        created = build_venv(venv, download, cfg.server_url, ca, click.echo)
    _activate(paths, venv, cfg.server_url, path, restart=restart, created=created)
    if not restart:
        click.echo("the running agent keeps the old version until it restarts: "
                   "kitt-agent update --restart (or systemctl restart for a service)")  # fmt: skip


def _activate(
    paths: AgentPaths, venv: Path, server_url: str, config: Path, *, restart: bool, created: bool
) -> None:
    """Run the new version's own ``activate``; undo the venv if it refused."""
    argv = [str(venv / "bin" / "kitt-agent"), "activate", "--venv", str(venv),
            "--server", server_url, "--config", str(config)]  # fmt: skip
    if not restart:
        argv.append("--no-start")
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    rc = subprocess.run(argv, check=False, env=env, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        if created:
            shutil.rmtree(venv, ignore_errors=True)
        raise UpgradeError(f"the new version was not activated (exit {rc}); nothing changed")
