"""``kitt test …``: submit benchmark runs to the fleet, follow, inspect and cancel them."""

from __future__ import annotations

import json
import time

import click
from pydantic import ValidationError
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
from kitt.fleet_client import FleetClient
from kitt.protocol import (
    TERMINAL_STATUSES,
    ParamValue,
    TestInfo,
    TestRequest,
    describe_validation_error,
    param_value,
)

STATUS_STYLE = {
    "queued": "white", "dispatched": "blue", "running": "cyan", "completed": "green",
    "failed": "red", "cancelled": "yellow", "lost": "magenta",
}  # fmt: skip
EXIT_BY_STATUS = {"completed": 0, "cancelled": 4, "lost": 5}


def parse_param(text: str) -> tuple[str, ParamValue]:
    """``k=v``, the value typed by :func:`kitt.protocol.param_value`."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE")
    return key, param_value(raw)


def _duration(test: TestInfo) -> str:
    if test.started_at is None:
        return "-"
    end = test.finished_at or None
    seconds = (
        (end or time.time()) if end is None else end.timestamp()
    ) - test.started_at.timestamp()
    return human_duration(max(seconds, 0))


@click.group(cls=KittGroup, name="test")
def test_group() -> None:
    """Run benchmarks on agents and follow them."""


@test_group.command()
@click.option("--agent", required=True, help="Agent name or id, or 'any' for an idle online agent.")
@click.option("--benchmark", required=True, help="Benchmark name the agent offers.")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Benchmark parameter (repeatable).",
)
@click.option("--gpu", help="With --agent any: only agents whose GPU description contains this.")
@click.option("--engine", help="Inference engine name (agent-side configuration).")
@click.option("--model", help="Model name or path.")
@click.option("--follow", is_flag=True, help="Wait and show progress until the test ends.")
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print the test as JSON.")
def run(
    agent: str,
    benchmark: str,
    params: tuple[str, ...],
    gpu: str | None,
    engine: str | None,
    model: str | None,
    follow: bool,
    server_url: str | None,
    as_json: bool,
) -> None:
    """Submit a test. With --follow, exit 0 completed, 1 failed, 4 cancelled, 5 lost."""
    try:
        request = TestRequest(
            agent=agent, benchmark=benchmark, engine=engine, model=model, gpu=gpu,
            params=dict(parse_param(p) for p in params),
        )  # fmt: skip
    except ValidationError as exc:
        raise click.UsageError(describe_validation_error(exc)) from None
    with open_fleet(server_url) as fleet:
        test = fleet.submit(request)
        if not as_json:
            console.print(f"test {test.id} queued on agent {test.agent_name} ({test.benchmark})")
        if follow:
            test = _follow(fleet, test, quiet=as_json)
    if as_json:
        click.echo(test.model_dump_json(indent=2))
    if follow:
        raise SystemExit(EXIT_BY_STATUS.get(test.status, 1))


def _follow(fleet: FleetClient, test: TestInfo, quiet: bool) -> TestInfo:
    """Stream the log live (a spinner shows state and elapsed time) until the test ends."""
    start = time.monotonic()
    with console.status(f"{test.id}: {test.status}", spinner="dots") as spinner:
        for name, data in fleet.log_events(test.id):
            if name == "log" and not quiet:
                console.out(data["line"], highlight=False)
            spinner.update(f"{test.id}: running, {human_duration(time.monotonic() - start)}")
    test = fleet.test(test.id)
    if not quiet:
        _print_outcome(test)
    return test


def _print_outcome(test: TestInfo) -> None:
    style = STATUS_STYLE.get(test.status, "")
    console.print(
        f"test {test.id} [{style}]{test.status}[/] after {_duration(test)}", highlight=False
    )
    if test.error:
        console.print(f"error: {escape(test.error)}", highlight=False)
    if test.result is not None and test.result.get("kind") == "kitt.serving":
        from kitt.bench.report import summary_table

        console.print(summary_table(test.result, console.width))
        console.print(f"full result: kitt results show {test.id}")
    elif test.result is not None:
        console.print_json(json.dumps(test.result))


@test_group.command("list")
@click.option("--status", type=click.Choice(sorted(STATUS_STYLE)), help="Only tests in this state.")
@click.option("--agent", help="Only tests of this agent (name or id).")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_tests(status: str | None, agent: str | None, limit: int, server_url: str | None,
               as_json: bool) -> None:  # fmt: skip
    """Recent tests, newest first."""
    with open_fleet(server_url) as fleet:
        tests = fleet.tests(status, agent, limit)
    if print_json_or_nothing(tests, as_json, "no tests"):
        return
    table = Table(box=None, pad_edge=False)
    for col in ("ID", "AGENT", "BENCHMARK", "STATUS", "SUBMITTED", "DURATION", "ERROR"):
        table.add_column(col)
    for t in tests:
        style = STATUS_STYLE.get(t.status, "")
        table.add_row(t.id, t.agent_name, t.benchmark, f"[{style}]{t.status}[/]", ago(t.created_at),
                      _duration(t), escape((t.error or "")[:60]))  # fmt: skip
    console.print(table)


@test_group.command()
@click.argument("test_id")
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(test_id: str, server_url: str | None, as_json: bool) -> None:
    """One test: status, timings, parameters, error and result."""
    with open_fleet(server_url) as fleet:
        test = fleet.test(test_id)
    if as_json:
        click.echo(test.model_dump_json(indent=2))
        return
    style = STATUS_STYLE.get(test.status, "")
    status = f"[{style}]{test.status}[/]"
    if test.cancel_requested and test.status not in TERMINAL_STATUSES:
        status += " (cancel requested)"
    for key, value in (
        ("id", test.id),
        ("agent", test.agent_name),
        ("benchmark", test.benchmark),
        ("status", status),
        ("params", escape(json.dumps(test.params)) if test.params else "-"),
        ("submitted", ago(test.created_at)),
        ("dispatched", ago(test.dispatched_at) if test.dispatched_at else "-"),
        ("started", ago(test.started_at) if test.started_at else "-"),
        ("finished", ago(test.finished_at) if test.finished_at else "-"),
        ("duration", _duration(test)),
        ("error", escape(test.error or "-")),
    ):  # fmt: skip
        console.print(f"{key:>11}: {value}", highlight=False)
    if test.result is not None:
        console.print("     result:")
        console.print_json(json.dumps(test.result))


@test_group.command()
@click.argument("test_id")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the test ends.")
@server_option
def logs(test_id: str, follow: bool, server_url: str | None) -> None:
    """Print a test's log (stored lines; with --follow, live until the test ends)."""
    with open_fleet(server_url) as fleet:
        if not follow:
            for line in fleet.log_text(test_id):
                click.echo(line)
            return
        status = "unknown"
        for name, data in fleet.log_events(test_id):
            if name == "log":
                click.echo(data["line"])
            elif name == "end":
                status = data["status"]
    raise SystemExit(EXIT_BY_STATUS.get(status, 1))


@test_group.command()
@click.argument("test_id")
@server_option
def cancel(test_id: str, server_url: str | None) -> None:
    """Cancel a test: a queued one never runs; a running one is stopped on its agent."""
    with open_fleet(server_url) as fleet:
        test = fleet.cancel(test_id)
    if test.status == "cancelled":
        click.echo(f"test {test.id} cancelled")
    else:
        click.echo(f"cancel requested: agent {test.agent_name} is stopping test {test.id}")
