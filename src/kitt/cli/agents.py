"""``kitt agents …``: the fleet as the server sees it."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from kitt.cli.common import (
    KittGroup,
    ago,
    console,
    human_duration,
    open_fleet,
    print_json_or_nothing,
    server_option,
)
from kitt.errors import KittError
from kitt.fleet_client import FleetClient, resolve_server_url
from kitt.protocol import (
    AGENT_NAME_RE,
    ENGINE_SETTING_FIELDS,
    ID_RE,
    SETTING_KEYS,
    AgentSettingsView,
    split_engine_key,
)

STATE_STYLE = {"offline": "red", "idle": "green", "running": "cyan", "error": "yellow"}


def _fmt(value: float | None, unit: str, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _name(value: str) -> str:
    if not (ID_RE.match(value) or AGENT_NAME_RE.match(value)):
        raise click.BadParameter(f"{value!r} is not an agent name or id")
    return value


@click.group(cls=KittGroup, name="agents")
def agents() -> None:
    """List, inspect and remove the agents registered with a server."""


@agents.command("list")
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_agents(server_url: str | None, as_json: bool) -> None:
    """Every agent with its state, GPUs, utilisation and last heartbeat."""
    with open_fleet(server_url) as fleet:
        items = fleet.agents()
        wanted = _wanted_version(fleet) if items and not as_json else None
    if print_json_or_nothing(items, as_json, "no agents registered yet"):
        return
    table = Table(box=None, pad_edge=False)
    cols = ("NAME", "STATE", "TASK", "GPUS", "GPU UTIL", "GPU MEM", "ADDRESS", "LAST SEEN", "CERT",
            "VERSION")  # fmt: skip
    for col in cols:
        table.add_column(col)
    for a in items:
        style = STATE_STYLE.get(a.state, "")
        table.add_row(
            a.name,
            "[red]revoked[/]" if a.revoked else f"[{style}]{a.state}[/]",
            escape(a.current_task or "-"),
            escape(a.gpu_info or "none"),
            _fmt(a.gpu_utilization_pct, "%"),
            _fmt(a.gpu_memory_used_gb, " GB"),
            f"{a.address}:{a.port}" if a.address else "-",
            ago(a.last_seen_at),
            cert_expiry(a.cert_expires_at),
            _version(a.kitt_version, wanted),
        )
    console.print(table)
    behind = [a.name for a in items if wanted and a.kitt_version != wanted and not a.revoked]
    if behind:
        console.print(
            f"[yellow]{len(behind)} agent(s) do not run {wanted}, the version this server hands "
            "out[/]: run `kitt-agent update --restart` on them (or re-run their install line)",
            highlight=False,
        )


def _wanted_version(fleet: FleetClient) -> str | None:
    """The version agents should run: the one the server's installer hands out."""
    try:
        return fleet.agent_package().version
    except KittError:
        return None  # an older server, or one that cannot build its package


def _version(have: str, wanted: str | None) -> str:
    if wanted is None or have == wanted:
        return escape(have)
    return f"[yellow]{escape(have)} ≠ {escape(wanted)}[/]"


def cert_expiry(expires: datetime | None) -> str:
    """Days left on an agent's certificate, in yellow under 14 days, red once expired."""
    if expires is None:
        return "-"
    days = (expires - datetime.now(timezone.utc)).total_seconds() / 86400
    if days <= 0:
        return "[red]expired[/]"
    text = f"{days:.0f}d" if days >= 1 else f"{days * 24:.1f}h"
    return f"[yellow]{text}[/]" if days < 14 else text


@agents.command()
@click.argument("name", callback=lambda _c, _p, v: _name(v))
@server_option
@click.option(
    "--history",
    type=click.IntRange(0, 10_000),
    default=10,
    show_default=True,
    help="How many recent heartbeats to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(name: str, server_url: str | None, history: int, as_json: bool) -> None:
    """One agent: hardware, live telemetry per GPU, and recent heartbeats."""
    with open_fleet(server_url) as fleet:
        detail = fleet.agent(name)
        beats = fleet.heartbeats(detail.id, history) if history else []
        wanted = None if as_json else _wanted_version(fleet)
    if as_json:
        out = detail.model_dump(mode="json")
        out["heartbeats"] = [b.model_dump(mode="json") for b in beats]
        click.echo(json.dumps(out, indent=2))
        return
    hw = detail.hardware
    style = STATE_STYLE.get(detail.state, "")
    for key, value in (
        ("name", detail.name),
        ("id", detail.id),
        ("state", f"[{style}]{detail.state}[/]"),
        ("current task", escape(detail.current_task or "-")),
        ("host", escape(f"{detail.hostname} ({detail.address}:{detail.port})")),
        ("kitt", _version(detail.kitt_version, wanted)),
        ("cpu", escape(detail.cpu_info or "-")),
        ("ram", f"{_fmt(detail.ram_used_gb, '')} / {_fmt(detail.ram_gb, ' GB')}"),
        ("gpus", escape(detail.gpu_info or "none")),
        ("driver / cuda", escape(f"{hw.gpu_driver_version or '-'} / {hw.cuda_version or '-'}")),
        ("uptime", human_duration(detail.uptime_s)),
        ("registered", ago(detail.registered_at)),
        ("last seen", ago(detail.last_seen_at)),
    ):
        console.print(f"{key:>14}: {value}", highlight=False)
    if detail.gpus:
        table = Table(title="GPUs", box=None, pad_edge=False)
        for col in ("#", "NAME", "UTIL", "MEMORY", "TEMP", "POWER"):
            table.add_column(col)
        for g in detail.gpus:
            table.add_row(
                str(g.index),
                escape(g.name or "-"),
                _fmt(g.utilization_pct, "%"),
                f"{_fmt(g.memory_used_gb, '')} / {_fmt(g.memory_total_gb, ' GB')}",
                _fmt(g.temperature_c, " °C", 0),
                _fmt(g.power_w, " W", 0),
            )
        console.print(table)
    if beats:
        table = Table(title="recent heartbeats", box=None, pad_edge=False)
        for col in ("TIME", "STATUS", "GPU UTIL", "GPU MEM", "CPU", "UPTIME"):
            table.add_column(col)
        for b in beats:
            table.add_row(
                b.ts.strftime("%Y-%m-%d %H:%M:%S"),
                b.status,
                _fmt(b.gpu_utilization_pct, "%"),
                _fmt(b.gpu_memory_used_gb, " GB"),
                _fmt(b.cpu_percent, "%"),
                human_duration(b.uptime_s),
            )
        console.print(table)


def _confirmed(action: str, name: str, server_url: str | None, yes: bool) -> str:
    """The server's URL, once the user agreed to ``action`` (or passed --yes)."""
    url = resolve_server_url(server_url)
    if not yes:
        click.confirm(f"{action} agent {name!r} on {url}?", abort=True)
    return url


@agents.command()
@click.argument("name", callback=lambda _c, _p, v: _name(v))
@server_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def remove(name: str, server_url: str | None, yes: bool) -> None:
    """Forget an agent, its heartbeat history and its credential."""
    with open_fleet(_confirmed("remove", name, server_url, yes)) as fleet:
        body = fleet.remove(name)
    click.echo(
        f"removed agent {body['name']} (id {body['deleted']}); its credential is gone too: "
        "to bring it back, enroll it again with a new bootstrap token"
    )


@agents.command()
@click.argument("name", callback=lambda _c, _p, v: _name(v))
@server_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def revoke(name: str, server_url: str | None, yes: bool) -> None:
    """Revoke an agent's token now: every call it makes is refused until it enrolls again."""
    with open_fleet(_confirmed("revoke", name, server_url, yes)) as fleet:
        body = fleet.revoke(name)
    click.echo(f"revoked agent {body['name']}: its token no longer works")


# --- settings pushed by the server -------------------------------------------------------


def parse_assignments(items: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` → ``{KEY: number}``; ``KEY=`` → ``{KEY: None}`` (back to the default).

    Values of the pushable keys must be numbers; any other key is sent as given, so that
    the server, which owns the rules, names it (unknown, or set in the agent's agent.yaml).
    """
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise KittError(f"{item!r}: expected KEY=VALUE (KEY= resets the key to its default)")
        if key in changes:
            raise KittError(f"{key} is given twice")
        numeric = key in SETTING_KEYS or (
            (engine_key := split_engine_key(key)) is not None
            and engine_key[1] in ENGINE_SETTING_FIELDS
        )
        if not text:
            changes[key] = None
        elif numeric:
            changes[key] = _number(key, text)
        else:
            changes[key] = text
    return changes


def _number(key: str, text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise KittError(f"{key}={text}: not a number") from None
    if not math.isfinite(value):
        raise KittError(f"{key}={text}: not a finite number")
    return value


def _print_settings(name: str, view: AgentSettingsView, as_json: bool) -> None:
    if as_json:
        click.echo(view.model_dump_json(indent=2))
        return
    console.print(f"settings of agent {escape(name)}:", highlight=False)
    table = Table(box=None, pad_edge=False)
    for col in ("KEY", "VALUE", "SOURCE"):
        table.add_column(col)
    for key, value in view.effective.items():
        source = "set on the server" if key in view.settings else "default"
        if key == "heartbeat_interval_s" and key not in view.settings:
            source = "default (the server's --heartbeat-interval)"
        shown = f"{value:g}" if isinstance(value, int | float) else str(value)
        table.add_row(escape(key), shown, source)
    console.print(table)


@agents.command("set")
@click.argument("name", callback=lambda _c, _p, v: _name(v))
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def set_settings(
    name: str, assignments: tuple[str, ...], server_url: str | None, as_json: bool
) -> None:
    """Push settings to an agent; it applies them at its next heartbeat, no restart.

    KEY=VALUE sets a key, KEY= puts it back to its default. Keys: heartbeat_interval_s
    (5-300 s), log_batch_lines (1-5000 lines per log report), telemetry_interval_s
    (0.1-60 s, for serving tests that do not set their own), and
    engines.ENGINE.startup_timeout_s (1-7200 s, for an engine the agent has). Paths,
    binaries and endpoints are the agent's own: set them in its agent.yaml.
    """
    changes = parse_assignments(assignments)
    with open_fleet(server_url) as fleet:
        view = fleet.set_agent_settings(name, changes)
    _print_settings(name, view, as_json)


@agents.command("settings")
@click.argument("name", callback=lambda _c, _p, v: _name(v))
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {settings, effective}.")
def show_settings(name: str, server_url: str | None, as_json: bool) -> None:
    """An agent's settings: those set on the server (`kitt agents set`) and the defaults."""
    with open_fleet(server_url) as fleet:
        view = fleet.agent_settings(name)
    _print_settings(name, view, as_json)
