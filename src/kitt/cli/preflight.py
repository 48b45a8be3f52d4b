"""``kitt-agent preflight``: the checks of :mod:`kitt.agent.preflight` as a table (or JSON)
and an exit code the installer and ``kitt-agent start --preflight`` act on."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from kitt.agent.preflight import Check, failures, load_context, run_preflight
from kitt.cli.common import console
from kitt.urls import validate_server_url

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def print_report(checks: list[Check]) -> bool:
    """Print the table and the verdict; True when no required check failed."""
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("CHECK", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("KIND", no_wrap=True)
    table.add_column("DETAIL", overflow="fold")
    for check in checks:
        style = _STYLE[check.status]
        kind = "required" if check.required else "advisory"
        table.add_row(check.name, f"[{style}]{check.status}[/]", kind, check.detail)
    console.print(table, highlight=False)
    failed = failures(checks)
    warnings = sum(c.status == "warn" for c in checks)
    noted = f"; {warnings} warning{'s' * (warnings != 1)}" if warnings else ""
    if failed:
        names = ", ".join(c.name for c in failed)
        count = f"{len(failed)} required check{'s' * (len(failed) != 1)}"
        console.print(f"[bold red]preflight failed[/]: {count} failed ({names}){noted}")
        return False
    console.print(f"[green]preflight passed[/]{noted}")
    return True


def _server(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return validate_server_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="agent.yaml to check [default: $KITT_HOME/agent.yaml, if it exists].",
)
@click.option(
    "--server",
    "server_url",
    callback=_server,
    help="Server URL to check (default: agent.yaml's); works before kitt-agent init.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Agent port to check (default: agent.yaml's, else 8090).",
)
@click.option("--bind", help="Address the agent will listen on (default: agent.yaml's).")
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Fleet CA to check the server with (default: the agent's).",
)
@click.option("--service", is_flag=True, help="Require systemd (before service install).")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as a JSON list.")
def preflight(
    config: Path | None,
    server_url: str | None,
    port: int | None,
    bind: str | None,
    ca: Path | None,
    service: bool,
    as_json: bool,
) -> None:
    """Check that this machine can run the agent: Python, GPUs (NVML) and what else runs
    on them, disk space, server reachable and trusted, agent port free, engines, systemd.
    Exit 1 when a required check fails; advisory problems only warn."""
    ctx = load_context(
        config_path=config.absolute() if config else None,
        server_url=server_url,
        port=port,
        bind=bind,
        ca=ca.absolute() if ca else None,
        service=service,
    )
    checks = run_preflight(ctx)
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in checks], indent=2))
        ok = not failures(checks)
    else:
        ok = print_report(checks)
    if not ok:
        raise SystemExit(1)
