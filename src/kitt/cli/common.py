"""CLI plumbing: typed errors become one clear line, durations parse, times print."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic import BaseModel
from rich.console import Console

from kitt.errors import KittError
from kitt.fleet_client import FleetClient, connect

F = TypeVar("F", bound=Callable[..., Any])

# soft_wrap: a long value (an error, a URL) stays on one line when output is piped.
console = Console(soft_wrap=True)


class KittGroup(click.Group):
    """A click group that reports :class:`KittError` as ``error: …`` with its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KittError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


if TYPE_CHECKING:  # click >= 8.2 types ParamType as generic; older releases do not
    _FloatParam = click.ParamType[float]
else:
    _FloatParam = click.ParamType


class Duration(_FloatParam):
    """``30``, ``30s``, ``5m``, ``24h``, ``7d`` → seconds (float)."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        m = _DURATION.match(str(value))
        if not m or float(m.group(1)) <= 0:
            self.fail(f"{value!r} is not a positive duration like 30s, 5m, 24h or 7d", param, ctx)
        return float(m.group(1)) * _UNIT_S[m.group(2)]


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def ago(ts: datetime | str | None) -> str:
    if ts is None:
        return "never"
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    delta = (datetime.now(timezone.utc) - ts).total_seconds()
    return f"{human_duration(max(delta, 0))} ago"


def print_json_or_nothing(items: Sequence[BaseModel], as_json: bool, empty: str) -> bool:
    """The shared start of every listing: JSON when asked, a note when empty.

    Returns True when that already said everything (the caller prints no table)."""
    if as_json:
        click.echo(json.dumps([i.model_dump(mode="json") for i in items], indent=2))
        return True
    if not items:
        console.print(empty)
        return True
    return False


def _remember_token(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta["kitt.token"] = value


def server_option(func: F) -> F:
    """``--server`` and ``--token`` for every command that talks to the server."""
    func = click.option(
        "--token",
        expose_value=False,
        callback=_remember_token,
        help="Admin token (default: $KITT_TOKEN, the local server's, or `kitt login`'s).",
    )(func)
    return click.option(
        "--server",
        "server_url",
        help="Server URL (default: $KITT_SERVER, the local server, or `kitt login`'s).",
    )(func)


def open_fleet(server_url: str | None) -> FleetClient:
    ctx = click.get_current_context(silent=True)
    token = ctx.meta.get("kitt.token") if ctx is not None else None
    return connect(server_url, token)
