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
from dataclasses import dataclass
from pathlib import Path

import click

from kitt import __version__
from kitt.agent.config import read_raw
from kitt.agent.service import (
    DEFAULT_UNIT_NAME,
    Systemctl,
    install_service,
    privilege_prefix,
    unit_file_name,
    unit_path,
)
from kitt.agent.upgrade import (
    Snapshot,
    UpgradeError,
    build_venv,
    download_package,
    installed_sha,
    link_target,
    prune_venvs,
    staging_dir,
    switch_link,
    systemd_unit_of,
    venv_dir,
)
from kitt.cli.agent import _config_path, _enrolled, default_agent_name, init, probe_status
from kitt.errors import KittError
from kitt.paths import AgentPaths, agent_paths
from kitt.process import pid_state, stop_daemon

_SERVICE_MARK = "Written by `kitt-agent service install`"
TOKEN_ENV = "KITT_BOOTSTRAP_TOKEN"  # noqa: S105 - the name of a variable, not a secret
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Running:
    """How the agent ran before the switch: not at all, as a daemon, or under systemd."""

    pid: int | None
    unit: str | None


def _running(paths: AgentPaths) -> Running:
    st = pid_state(paths.pid)
    if st.state != "running" or st.pid is None:
        return Running(None, None)
    unit = systemd_unit_of(st.pid)
    if unit is not None and _SERVICE_MARK not in _read(unit_path(unit)):
        # Restarting a unit KITT did not write could restart something else entirely
        # (a CI runner that started the agent); stopping it would leave systemd's control.
        raise UpgradeError(
            f"the agent (pid {st.pid}) runs inside systemd unit {unit}, which KITT did not "
            "install: run `kitt-agent update` without --restart, then restart that unit"
        )
    return Running(st.pid, unit)


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
    paths = agent_paths()
    cfg = _config_path(config)
    venv = Path(os.path.abspath(venv))
    previous = link_target(paths)
    snapshot = Snapshot.take(paths, cfg)
    before = Running(None, None) if no_start else _running(paths)
    unit = unit_file_name(unit_name) if service else before.unit
    stopped = False
    try:
        current = read_raw(cfg) if cfg.exists() else {}
        agent_name = name or current.get("name") or default_agent_name()
        token = os.environ.get(TOKEN_ENV) or None
        if token and _enrolled(current, server_url, agent_name, paths):
            click.echo(f"'{agent_name}' is enrolled already; the bootstrap token was not used")
            token = None
        ctx.invoke(
            init, server_url=server_url, token=token, name=name, port=port, bind=bind,
            ca_file=ca_file, ca_fingerprint=None, bundle=None, config=config,
        )  # fmt: skip
        preflight = [sys.executable, "-m", "kitt", "agent", "preflight", "--config", str(cfg)]
        _check(
            [*preflight, *(["--service"] if service else [])], "a required preflight check failed"
        )
        if no_start:
            switch_link(paths, venv)
            click.echo(f"{paths.venv_link} -> {venv}; the running agent (if any) keeps the "
                       "old version until it restarts")  # fmt: skip
        elif unit is not None:
            switch_link(paths, venv)
            install_service(click.echo, unit_name=unit, config=cfg, start=True)
            if before.unit == unit:
                _systemctl().run("restart", unit)
                click.echo(f"ran systemctl restart {unit}")
        else:
            if before.pid is not None:
                stop_daemon(paths.pid, "agent", STOP_TIMEOUT_S)
                stopped = True
                click.echo(f"stopped the previous agent (pid {before.pid})")
            switch_link(paths, venv)
            _check([_kitt_agent(paths), "start", "--config", str(cfg)], "the agent did not start")
    except BaseException:
        click.echo("undoing: restoring the previous config, certificates and venv", err=True)
        snapshot.restore(paths)
        if stopped:
            with _quietly():
                _check([_kitt_agent(paths), "start", "--config", str(cfg)], "restart")
                click.echo("restarted the previous agent", err=True)
        elif before.unit is not None and unit == before.unit and not no_start:
            with _quietly():
                _systemctl().run("restart", before.unit)
        raise
    prune_venvs(paths, {venv, *([previous] if previous else [])}, click.echo)
    click.echo(f"kitt {__version__} is active: {paths.venv_link} -> {venv}")


class _quietly:
    """Best effort while undoing: a second failure must not hide the first one."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        if exc[1] is not None and isinstance(exc[1], (KittError, OSError)):
            click.echo(f"could not put the previous agent back: {exc[1]}", err=True)
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
@click.option("--force", is_flag=True, help="Reinstall even when the server has nothing newer.")
def update(config: Path | None, restart: bool, force: bool) -> None:
    """Install the agent version the server hands out (checked by its SHA-256) next to this
    one and switch to it; with --restart, restart the agent on it now."""
    from kitt.agent.config import load_config

    path = _config_path(config)
    cfg = load_config(path)
    paths = agent_paths()
    https = cfg.server_url.startswith("https://")
    ca = (cfg.tls.ca if cfg.tls and cfg.tls.ca else paths.ca) if https else None
    if link_target(paths) is None:
        raise KittError(
            f"this agent was not installed by the install script (no {paths.venv_link} "
            "link), so update does not know where to install: re-run the install line from "
            "`kitt agents add`, or upgrade its venv with pip"
        )
    with staging_dir() as tmp:
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
