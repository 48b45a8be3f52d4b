"""``kitt results …``: list, show, compare, export and import serving benchmark results.

Documents come from agents and from files anyone made, so everything read from one is
treated as untrusted: numbers are taken only when they are numbers, and every string is
escaped before rich renders it (a model named ``[red]x`` prints as is). Reading,
comparing and exporting documents lives in ``kitt.results_compare``, shared with the
dashboard.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.table import Table

from kitt.cli.common import Duration, KittGroup, console, open_fleet, server_option
from kitt.errors import ApiError, KittError
from kitt.fleet_client import FleetClient
from kitt.protocol import ID_RE, MAX_BODY_BYTES, ResultDetail, ResultRow
from kitt.results_compare import (
    NOISE_RULE,
    Comparison,
    compare,
    delta_text,
    dig,
    fmt,
    fmt_rate,
    number,
    step_metric,
    step_names,
    steps_of,
    to_csv,
    to_json,
    unchanged,
)

PAGE = 1000


# --- formatting -------------------------------------------------------------------------


def count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def text(value: Any) -> str:
    """Any document value as escaped markup; nested values as compact JSON."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return escape(value)
    return escape(json.dumps(value, separators=(", ", ": ")))


def date(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")


def gpu_text(count: int | None, model: str | None) -> str:
    if not model:
        return "-"
    return escape(f"{count}x {model}" if count and count > 1 else model)


def load_text(load: Any, fallback: str = "-") -> str:
    if not isinstance(load, dict):
        return fallback
    mode = load.get("mode")
    if mode == "concurrency" and number(load.get("concurrency")) is not None:
        return f"concurrency {count(number(load['concurrency']))}"
    if mode == "rate" and number(load.get("rate")) is not None:
        arrival = f" {load['arrival']}" if isinstance(load.get("arrival"), str) else ""
        return escape(f"rate {fmt(number(load['rate']))}/s{arrival}")
    return escape(str(mode)) if isinstance(mode, str) else fallback


# --- the commands -----------------------------------------------------------------------


if TYPE_CHECKING:  # click >= 8.2 types ParamType as generic; older releases do not
    _DateParam = click.ParamType[datetime]
else:
    _DateParam = click.ParamType


class When(_DateParam):
    """``7d``/``24h`` (that long ago) or an ISO 8601 time (local time when it has no zone)."""

    name = "when"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            ago = Duration().convert(value, param, ctx)
        except click.BadParameter:
            pass
        else:
            return datetime.now(timezone.utc) - timedelta(seconds=ago)
        try:
            when = datetime.fromisoformat(str(value).strip().upper().replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"{value!r} is neither a duration (7d, 24h) nor an ISO 8601 time", param, ctx)
        return when if when.tzinfo is not None else when.astimezone()


def _check_id(result_id: str) -> str:
    if not ID_RE.match(result_id):
        raise KittError(f"no result {result_id} (ids are 1-64 of [A-Za-z0-9_-])")
    return result_id


def _fetch(fleet: FleetClient, result_id: str) -> ResultDetail:
    try:
        return fleet.result(_check_id(result_id))
    except ApiError as exc:
        if exc.status == 404:
            raise KittError(f"no result {result_id}") from None
        raise


def filter_options(func: Any) -> Any:
    for option in reversed((
        click.option("--agent", help="Only results of this agent (exact name)."),
        click.option("--model", help="Only results of this model (exact)."),
        click.option("--engine", help="Only results of this engine (exact name)."),
        click.option("--gpu", help="Only results whose GPU model contains this (any case)."),
        click.option("--since", type=When(),
                     help="Only results run since: a duration ago (7d, 24h) or a time."),
        click.option("--until", type=When(),
                     help="Only results run until: a duration ago or a time."),
    )):  # fmt: skip
        func = option(func)
    return func


@dataclass(frozen=True)
class Filters:
    agent: str | None
    model: str | None
    engine: str | None
    gpu: str | None
    since: datetime | None
    until: datetime | None

    def query(self) -> dict[str, Any]:
        return {"agent": self.agent, "model": self.model, "engine": self.engine,
                "gpu": self.gpu, "since": self.since, "until": self.until}  # fmt: skip


def _rows(fleet: FleetClient, filters: Filters, limit: int | None) -> Iterator[ResultRow]:
    """Every matching row, newest first, a page at a time (up to ``limit``)."""
    query = filters.query()
    offset = 0
    while limit is None or offset < limit:
        size = PAGE if limit is None else min(PAGE, limit - offset)
        page = fleet.results(**query, limit=size, offset=offset)
        yield from page
        if len(page) < size:
            return
        offset += len(page)


@click.group(cls=KittGroup, name="results")
def results_group() -> None:
    """Serving benchmark results stored on the server: list, show, compare, export."""


@results_group.command("list")
@filter_options
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_results(agent: str | None, model: str | None, engine: str | None, gpu: str | None,
                 since: datetime | None, until: datetime | None, limit: int,
                 server_url: str | None,
                 as_json: bool) -> None:  # fmt: skip
    """Stored results, newest first."""
    filters = Filters(agent, model, engine, gpu, since, until)
    with open_fleet(server_url) as fleet:
        rows = list(_rows(fleet, filters, limit))
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    if not rows:
        console.print("no results")
        return
    table = Table(box=None, pad_edge=False)
    # Ids and dates are what users copy and sort by: never wrapped or cut short.
    table.add_column("ID", no_wrap=True, min_width=max(len(r.id) for r in rows))
    table.add_column("DATE", no_wrap=True, min_width=16)
    for col in ("AGENT", "GPU", "ENGINE", "MODEL"):
        table.add_column(col)
    for col in ("BEST OUT TOK/S", "TTFT P50 MS", "TTFT P99 MS", "TPOT P50 MS", "ERRORS"):
        table.add_column(col, justify="right")
    for r in rows:
        engine_text = " ".join(x for x in (r.engine, r.engine_version) if x) or "-"
        table.add_row(
            r.id, date(r.created_at), text(r.agent_name), gpu_text(r.gpu_count, r.gpu_model),
            escape(engine_text), text(r.model), fmt(r.best_output_token_throughput),
            fmt(r.ttft_ms_p50), fmt(r.ttft_ms_p99), fmt(r.tpot_ms_p50), fmt_rate(r.error_rate),
        )  # fmt: skip
    console.print(table, highlight=False)


@results_group.command()
@click.argument("result_id")
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print the result and its document.")
def show(result_id: str, server_url: str | None, as_json: bool) -> None:
    """One result: configuration, engine, hardware, steps, telemetry and warnings."""
    with open_fleet(server_url) as fleet:
        result = _fetch(fleet, result_id)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
        return
    doc = result.document
    where = f"test {result.test_id}" if result.test_id else "imported"
    console.print(
        f"[bold]result {escape(result.id)}[/] ({where}, agent {text(result.agent_name)}, "
        f"ran {date(result.created_at)} UTC, kitt {text(doc.get('kitt_version'))})",
        highlight=False,
    )
    for title, section in (("config", "config"), ("engine", "engine"), ("hardware", "hardware")):
        _print_section(title, doc.get(section))
    _print_steps(doc)
    _print_repeats(doc)
    _print_telemetry(doc)
    warnings = doc.get("warnings")
    if isinstance(warnings, list) and warnings:
        console.print("[bold]warnings[/]")
        for warning in warnings:
            console.print(f"  - {text(warning)}", highlight=False)


def _print_section(title: str, values: Any) -> None:
    console.print(f"[bold]{title}[/]")
    if not isinstance(values, dict) or not values:
        console.print("  -")
        return
    width = max(len(str(k)) for k in values)
    for key, value in values.items():
        console.print(f"  {escape(str(key)):>{width}}: {text(value)}", highlight=False)


def _print_steps(doc: dict[str, Any]) -> None:
    steps = steps_of(doc)
    if not steps:
        console.print("[bold]steps[/]: none")
        return
    repeated = len(steps) > len(step_names(doc))
    table = Table(title="steps", title_justify="left", box=None, pad_edge=False)
    headers = ("STEP", "LOAD", "REQ/S", "OUT TOK/S", "TTFT P50", "TTFT P99", "TPOT P50",
               "TPOT P99", "ITL P50", "E2E P50", "GOODPUT", "ERRORS")  # fmt: skip
    for col in headers:
        table.add_column(col, justify="left" if col in ("STEP", "LOAD") else "right")
    for step in steps:
        name = _step_label(step, repeated)
        metrics = [step_metric(step, key) for key in ("request_throughput",
                   "output_token_throughput", "ttft_ms.p50", "ttft_ms.p99", "tpot_ms.p50",
                   "tpot_ms.p99", "itl_ms.p50", "e2e_ms.p50", "goodput")]  # fmt: skip
        errors, requests = step_metric(step, "errors"), step_metric(step, "requests")
        error_text = count(errors) if requests is None else f"{count(errors)}/{count(requests)}"
        table.add_row(name, load_text(step.get("load")), *map(fmt, metrics), error_text)
    console.print(table, highlight=False)


def _step_label(step: dict[str, Any], repeated: bool) -> str:
    """The step's name, and which run of it (1-based, as `kitt bench serve` prints it) when
    the document has several."""
    name = text(step.get("name"))
    index = number(step.get("repeat_index"))
    return f"{name} #{index + 1:.0f}" if repeated and index is not None else name


def _print_repeats(doc: dict[str, Any]) -> None:
    repeats = doc.get("repeats")
    if not isinstance(repeats, list) or not repeats:
        return
    table = Table(title="repeats (across runs)", title_justify="left", box=None, pad_edge=False)
    for col in ("STEP", "RUNS", "METRIC", "MEAN", "STD", "CV"):
        table.add_column(col, justify="left" if col in ("STEP", "METRIC") else "right")
    for entry in repeats:
        metrics = dig(entry, "metrics")
        if not isinstance(metrics, dict):
            continue
        for key, stats in metrics.items():
            cv = number(dig(stats, "cv"))
            table.add_row(text(dig(entry, "name")), count(number(dig(entry, "runs"))), text(key),
                          fmt(number(dig(stats, "mean"))), fmt(number(dig(stats, "std"))),
                          "-" if cv is None else f"{cv * 100:.1f}%")  # fmt: skip
    console.print(table, highlight=False)


def _print_telemetry(doc: dict[str, Any]) -> None:
    telemetry = doc.get("telemetry")
    if not isinstance(telemetry, dict) or telemetry.get("available") is not True:
        reason = dig(telemetry, "reason")
        console.print(f"[bold]telemetry[/]: not available ({text(reason or 'no reason given')})",
                      highlight=False)  # fmt: skip
        return
    table = Table(title="GPU telemetry per step", title_justify="left", box=None, pad_edge=False)
    for col in ("STEP", "GPU", "UTIL MEAN %", "UTIL MAX %", "MEM MAX GB", "POWER MEAN W",
                "POWER MAX W", "TEMP MAX C", "ENERGY J", "J/OUT TOK"):  # fmt: skip
        table.add_column(col, justify="left" if col == "STEP" else "right")
    repeated = len(steps_of(doc)) > len(step_names(doc))
    for step in steps_of(doc):
        gpus = dig(step, "telemetry", "gpus")
        per_token = number(dig(step, "telemetry", "energy_per_output_token_j"))
        for gpu in gpus if isinstance(gpus, list) else []:
            table.add_row(
                _step_label(step, repeated), count(number(dig(gpu, "index"))),
                *(fmt(number(dig(gpu, *path))) for path in (
                    ("utilization_pct", "mean"), ("utilization_pct", "max"),
                    ("memory_used_gb", "max"), ("power_w", "mean"), ("power_w", "max"),
                    ("temperature_c", "max"), ("energy_j",))),
                fmt(per_token),
            )  # fmt: skip
    interval = number(telemetry.get("interval_s"))
    console.print(table, highlight=False)
    if interval is not None:
        console.print(f"  sampled every {fmt(interval)} s", highlight=False)


@results_group.command("compare")
@click.argument("result_ids", nargs=-1, required=True)
@server_option
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def compare_results(result_ids: tuple[str, ...], server_url: str | None, as_json: bool) -> None:
    """Side by side, with % change against the first result (the baseline)."""
    if len(result_ids) < 2:
        raise click.UsageError("compare needs at least two result ids")
    with open_fleet(server_url) as fleet:
        results = [_fetch(fleet, rid) for rid in result_ids]
    rows = compare([r.document for r in results])
    noise_known = any(v is not None for row in rows for v in row.exceeds_noise)
    if as_json:
        click.echo(json.dumps({"baseline": results[0].id, "results": [r.id for r in results],
                               "noise_rule": NOISE_RULE, "noise_known": noise_known,
                               "rows": [row.as_json() for row in rows]}, indent=2))  # fmt: skip
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("STEP")
    table.add_column("METRIC")
    for i, r in enumerate(results):
        engine = " ".join(x for x in (r.engine, r.engine_version) if x) or "-"
        what = f"{gpu_text(r.gpu_count, r.gpu_model)} {escape(engine)}"
        table.add_column(f"{escape(r.id)}{' (baseline)' if i == 0 else ''}\n{what}",
                         justify="right")  # fmt: skip
    last_scope = None
    for row in rows:
        if last_scope is not None and row.scope != last_scope:
            table.add_section()
        cells = [row.show(row.values[0])]
        cells += [_delta_cell(row, i) for i in range(1, len(results))]
        scope = text(row.scope) if row.scope != last_scope else ""
        arrow = "↑" if row.better == "higher" else "↓"
        table.add_row(scope, f"{row.label} {arrow}", *cells)
        last_scope = row.scope
    console.print(table, highlight=False)
    console.print(
        "↑ higher is better, ↓ lower is better; * exceeds run-to-run noise, ~ within noise, "
        f"? noise unknown ({NOISE_RULE}, std from each result's repeats)",
        highlight=False,
    )
    if not noise_known:
        console.print("noise: unknown (no result has repeats: run with --repeat N)")


def _delta_cell(row: Comparison, i: int) -> str:
    value, delta, exceeds = row.values[i], row.deltas_pct[i], row.exceeds_noise[i]
    if value is None:
        return "-"
    if delta is None:
        return f"{row.show(value)} (n/a)"
    mark = "?" if exceeds is None else ("*" if exceeds else "~")
    cell = f"{row.show(value)} ({delta_text(delta)}%{mark})"
    if unchanged(delta) or exceeds is False:
        return f"[dim]{cell}[/]" if exceeds is False else cell
    improved = (delta > 0) == (row.better == "higher")
    return f"[{'green' if improved else 'red'}]{cell}[/]"


@results_group.command("export")
@filter_options
@click.option("--limit", type=click.IntRange(1), help="At most this many results (newest).")
@click.option("--format", "fmt_", type=click.Choice(["csv", "json"]), default="csv",
              show_default=True, help="csv: one row per step; json: whole results.")  # fmt: skip
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here instead of standard output.")  # fmt: skip
@server_option
def export(agent: str | None, model: str | None, engine: str | None, gpu: str | None,
           since: datetime | None, until: datetime | None, limit: int | None, fmt_: str,
           output: Path | None, server_url: str | None) -> None:  # fmt: skip
    """Matching results, newest first: CSV (one row per step) or JSON (whole documents)."""
    filters = Filters(agent, model, engine, gpu, since, until)
    with open_fleet(server_url) as fleet:
        details = [_fetch(fleet, r.id) for r in list(_rows(fleet, filters, limit))]
    body = to_json(details) if fmt_ == "json" else to_csv(details)
    if output is None:
        sys.stdout.write(body)
        return
    try:
        output.write_text(body, encoding="utf-8")
    except OSError as exc:
        raise KittError(f"cannot write {output}: {exc.strerror or exc}") from None
    click.echo(f"{len(details)} results written to {output}", err=True)


@results_group.command("import")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))  # fmt: skip
@server_option
def import_results(files: tuple[Path, ...], server_url: str | None) -> None:
    """Store result files written by `kitt bench serve --output` (on any machine)."""
    failed = 0
    with open_fleet(server_url) as fleet:
        for path in files:
            try:
                imported = fleet.import_result(_read_document(path))
            except KittError as exc:
                if len(files) == 1:
                    raise
                click.echo(f"error: {path}: {exc}", err=True)
                failed += 1
                continue
            how = "imported as" if imported.created else "already stored as"
            click.echo(f"{path}: {how} {imported.id}")
    if failed:
        raise SystemExit(1)


def _read_document(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KittError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BODY_BYTES:
        raise KittError(
            f"{path} is {len(raw)} bytes; the server takes at most {MAX_BODY_BYTES} "
            "(import the result .json, not its .requests.jsonl)"
        )
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise KittError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise KittError(f"{path} holds a JSON {type(document).__name__}, not a result document")
    return document


@results_group.command()
@click.argument("result_id")
@server_option
def delete(result_id: str, server_url: str | None) -> None:
    """Delete a stored result (a fleet result's test keeps its copy)."""
    with open_fleet(server_url) as fleet:
        try:
            fleet.delete_result(_check_id(result_id))
        except ApiError as exc:
            if exc.status == 404:
                raise KittError(f"no result {result_id}") from None
            raise
    click.echo(f"result {result_id} deleted")
