"""``kitt-agent service …``: the agent as a systemd service (see docs/service.md).

A thin layer over :mod:`kitt.agent.service`; it only parses flags and prints, so the
same behaviour is reachable as ``kitt agent service`` and ``kitt-agent service``.
"""

from __future__ import annotations

from pathlib import Path

import click

from kitt.agent.service import (
    DEFAULT_UNIT_NAME,
    build_unit,
    install_service,
    service_status,
    uninstall_service,
)
from kitt.cli.common import KittGroup

_UNIT_NAME_OPTION = click.option(
    "--unit-name",
    default=DEFAULT_UNIT_NAME,
    show_default=True,
    help='systemd unit name (".service" is added); lets several agents share a host.',
)


@click.group(cls=KittGroup, name="service")
def service() -> None:
    """Run the KITT agent as a systemd service that starts at boot and restarts on failure."""


@service.command()
@_UNIT_NAME_OPTION
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="agent.yaml the service uses [default: $KITT_HOME/agent.yaml].",
)
@click.option("--no-start", is_flag=True, help="Enable at boot but do not start it now.")
@click.option(
    "--print",
    "print_only",
    is_flag=True,
    help="Print the unit file and change nothing (works without systemd).",
)
def install(unit_name: str, config: Path | None, no_start: bool, print_only: bool) -> None:
    """Install, enable and start the systemd unit (uses sudo when not root)."""
    if print_only:
        text, cfg = build_unit(unit_name, config)
        if not cfg.is_file():
            click.echo(
                f"warning: {cfg} does not exist yet: run `kitt-agent init --server URL` "
                "before installing",
                err=True,
            )
        click.echo(text, nl=False)
        return
    install_service(click.echo, unit_name=unit_name, config=config, start=not no_start)


@service.command()
@_UNIT_NAME_OPTION
@click.pass_context
def status(ctx: click.Context, unit_name: str) -> None:
    """Show `systemctl status`; exits with its code (3 when the agent is not running)."""
    ctx.exit(service_status(unit_name))


@service.command()
@_UNIT_NAME_OPTION
def uninstall(unit_name: str) -> None:
    """Stop and disable the agent service and remove its unit file."""
    uninstall_service(click.echo, unit_name=unit_name)
