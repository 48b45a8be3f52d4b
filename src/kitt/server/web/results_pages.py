"""Results list, comparison view and exports.

Every view is a GET whose URL holds all its state (filters, paging, the ids compared), so
a URL is the link to share: it opens the same view for anyone signed in. The numbers are
computed here, in ``kitt.results_compare`` (the same code as ``kitt results compare`` and
``export``); the page's JS only draws them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, redirect, render_template, request, url_for

from kitt.jsonapi import ApiFailure, int_arg
from kitt.protocol import ID_RE, ResultDetail
from kitt.results_compare import (
    LATENCY_PERCENTILES,
    LOAD_AXES,
    Comparison,
    best_step,
    csv_chunks,
    delta_text,
    fmt,
    fmt_rate,
    json_chunks,
    key_comparisons,
    latency_percentiles,
    load_curves,
    step_names,
    unchanged,
)
from kitt.server.api.results import MAX_OFFSET, detail
from kitt.server.store.models import BenchResult
from kitt.server.store.results import ResultFilter, ResultStore
from kitt.server.web.pages import page_guard

bp = Blueprint("results_pages", __name__)
bp.before_request(page_guard)

PAGE_SIZE = 50
EXPORT_PAGE = 500
MIN_COMPARE, MAX_COMPARE = 2, 10
MAX_EXPORT_IDS = 100
# An export's results at most: beyond it, a filtered export is refused (narrow the
# filters) rather than holding a server thread while the whole table streams out.
MAX_EXPORT = 10_000
TEXT_FILTERS = ("model", "engine", "agent", "gpu")
DATE_FILTERS = {"since": "From", "until": "To"}
LIST_TARGET = "results-list"  # the element htmx replaces when the filters change


def _store() -> ResultStore:
    return current_app.extensions["kitt.results"]  # type: ignore[no-any-return]


@bp.errorhandler(ApiFailure)
def _failure(exc: ApiFailure) -> Any:
    """Bad input on these pages: a page that says what is wrong and leads back."""
    return render_template("results_error.html", status=exc.status, message=exc.message), (
        exc.status
    )


# --- filters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """The list's filters as typed (to show them again and to build links), the query
    they make, and what is wrong with them (field -> message)."""

    values: dict[str, str]
    where: ResultFilter
    errors: dict[str, str]

    def args(self) -> dict[str, str]:
        """The filters that are set: what a link to the same view carries."""
        return {key: value for key, value in self.values.items() if value}


def _day(field: str, text: str, end: bool, errors: dict[str, str]) -> datetime | None:
    """A date input's value (YYYY-MM-DD, a UTC day) as the first or last instant of it."""
    if not text:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        errors[field] = f"{DATE_FILTERS[field]} must be a date like 2026-11-27, not {text[:40]!r}."
        return None
    return datetime.combine(day, time.max if end else time.min, tzinfo=timezone.utc)


def read_filters() -> Filters:
    values = {key: request.args.get(key, "").strip() for key in (*TEXT_FILTERS, *DATE_FILTERS)}
    errors: dict[str, str] = {}
    since = _day("since", values["since"], False, errors)
    until = _day("until", values["until"], True, errors)
    if since and until and since > until:
        errors["until"] = "To is before From: no result can match."
    where = ResultFilter(
        **{key: values[key] or None for key in TEXT_FILTERS}, since=since, until=until
    )
    return Filters(values, where, errors)


# --- the list ---------------------------------------------------------------------------------


@bp.get("/results")
def results() -> Any:
    filters = read_filters()
    offset = int_arg("offset", 0, 0, MAX_OFFSET)
    rows: list[BenchResult] = []
    if not filters.errors:
        rows = _store().query(filters.where, limit=PAGE_SIZE + 1, offset=offset)
    here = list_url(filters.args())
    context = {
        "filters": filters,
        "rows": rows[:PAGE_SIZE],
        "offset": offset,
        "newer": _page_url(filters, offset - PAGE_SIZE) if offset > 0 else None,
        "older": _page_url(filters, offset + PAGE_SIZE) if len(rows) > PAGE_SIZE else None,
        "share_url": _external(here),
        "export_query": urlencode(filters.args()),
        "fmt": fmt,
        "fmt_rate": fmt_rate,
        "when": when,
    }
    restoring = request.headers.get("HX-History-Restore-Request")  # wants the whole page
    if request.headers.get("HX-Target") == LIST_TARGET and not restoring:
        # htmx swaps only 2xx answers: a bad filter is said inside the list, with 200.
        response = Response(render_template("results_list.html", **context))
        response.headers["HX-Push-Url"] = here  # the clean URL (no empty fields)
        return response
    context["facets"] = _facets(filters)
    return render_template("results.html", **context), 400 if filters.errors else 200


def list_url(args: dict[str, str]) -> str:
    path = url_for("results_pages.results")
    return f"{path}?{urlencode(args)}" if args else path


def _page_url(filters: Filters, offset: int) -> str:
    return list_url({**filters.args(), **({"offset": str(offset)} if offset > 0 else {})})


def _facets(filters: Filters) -> dict[str, list[str]]:
    """The values seen, plus the one in the URL when it is not among them (so that a
    select shows the filter that is applied, not "any")."""
    facets = _store().facets()
    for key, seen in facets.items():
        value = filters.values[key]
        if value and value not in seen and key != "gpu":
            seen.insert(0, value)
    return facets


def _external(path: str) -> str:
    return request.host_url.rstrip("/") + path


def when(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --- the comparison ---------------------------------------------------------------------------


def read_ids(low: int, high: int) -> list[str]:
    """The ids of ``?ids=a,b,c`` (or ``ids=a&ids=b``, as the list's form sends them)."""
    ids = [part.strip() for value in request.args.getlist("ids") for part in value.split(",")]
    ids = [i for i in ids if i]
    for result_id in ids:
        if not ID_RE.match(result_id):
            raise ApiFailure(400, f"{result_id[:80]!r} is not a result id (ids are 1-64 of "
                                  "the letters A-Z and a-z, digits, _ and -).")  # fmt: skip
    if len(ids) < low:
        raise ApiFailure(400, f"Choose at least {low} results to compare: this link names "
                              f"{len(ids)}.")  # fmt: skip
    if len(ids) > high:
        raise ApiFailure(400, f"At most {high} results at a time: this link names {len(ids)}.")
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ApiFailure(400, f"Result {', '.join(twice)} is named more than once.")
    return ids


def fetch(ids: Sequence[str]) -> list[BenchResult]:
    store = _store()
    found = {i: store.get(i) for i in ids}
    missing = [i for i, r in found.items() if r is None]
    if missing:
        raise ApiFailure(404, f"No result {', '.join(missing)}: it may have been deleted, or "
                              "the link is mistyped.")  # fmt: skip
    return [r for r in found.values() if r is not None]


def compare_url(ids: Sequence[str], external: bool = False) -> str:
    """The comparison's own URL (ids are [A-Za-z0-9_-]: nothing to escape)."""
    path = url_for("results_pages.compare") + "?ids=" + ",".join(ids)
    return _external(path) if external else path


@bp.get("/results/compare")
def compare() -> Any:
    ids = read_ids(MIN_COMPARE, MAX_COMPARE)
    found = fetch(ids)
    if len(request.args.getlist("ids")) > 1:
        # Sent by the list's form: the oldest run becomes the baseline, and the address
        # becomes the short one to share.
        found.sort(key=lambda r: (r.created_at, r.id))
        return redirect(compare_url([r.id for r in found]), 303)
    documents = [r.document for r in found]
    labels = [series_label(i, r) for i, r in enumerate(found)]
    return render_template(
        "compare.html",
        results=found,
        labels=labels,
        ids=ids,
        deltas=[delta_row(row) for row in key_comparisons(documents)],
        charts=chart_data(documents, labels),
        baseline_urls=[compare_url([i, *(j for j in ids if j != i)]) for i in ids],
        share_url=compare_url(ids, external=True),
        export_query=urlencode({"ids": ",".join(ids)}),
        when=when,
    )


def series_label(index: int, result: BenchResult) -> str:
    """Unique by its number; says which engine on which machine (the usual question)."""
    engine = " ".join(x for x in (result.engine, result.engine_version) if x)
    what = " · ".join(x for x in (engine, result.agent_name) if x) or result.id
    return f"#{index + 1} {what}"


def delta_row(row: Comparison) -> dict[str, Any]:
    """A metric's cells: the baseline's value, then each result's value, change and
    verdict in words (colour only repeats what the words say)."""
    cells = [{"value": fmt(row.values[0]), "delta": None, "verdict": "baseline"}]
    for value, delta, exceeds in zip(
        row.values[1:], row.deltas_pct[1:], row.exceeds_noise[1:], strict=True
    ):
        if value is None or delta is None:
            verdict = "no value" if value is None else "not comparable"
            cells.append({"value": fmt(value), "delta": None, "verdict": verdict})
            continue
        if unchanged(delta):  # decided on the value shown: +0.03 % reads "+0.0 % no change"
            verdict = "no change"
        elif exceeds is False:
            verdict = "within noise"
        else:
            verdict = "better" if (delta > 0) == (row.better == "higher") else "worse"
        cells.append({"value": fmt(value), "delta": f"{delta_text(delta)} %", "verdict": verdict})
    return {
        "metric": row.metric,
        "label": row.label,
        "better": "higher is better" if row.better == "higher" else "lower is better",
        "cells": cells,
    }


def chart_data(documents: Sequence[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """What compare.js draws, every number computed here."""
    curves = []
    for curve in load_curves(documents):
        axis = LOAD_AXES[curve.mode]
        curves.append({
            "mode": curve.mode, "x_label": axis, "x": curve.x,
            "throughput": {"title": f"Output throughput vs {axis}", "values": curve.throughput},
            "energy": {"title": f"Output tokens per joule vs {axis}",
                       "values": curve.tokens_per_joule} if curve.has_energy else None,
        })  # fmt: skip
    scopes = []
    for key, label, steps in latency_scopes(documents):
        scopes.append({
            "key": key, "label": label,
            "ttft": latency_percentiles(documents, "ttft_ms", steps),
            "tpot": latency_percentiles(documents, "tpot_ms", steps),
        })  # fmt: skip
    return {
        "labels": labels,
        "curves": curves,
        "latency": {
            "x": [q for _, q in LATENCY_PERCENTILES],
            "percentiles": [name for name, _ in LATENCY_PERCENTILES],
            "scopes": scopes,
        },
    }


def latency_scopes(
    documents: Sequence[dict[str, Any]],
) -> Iterator[tuple[str, str, list[str | None]]]:
    """Where latency is compared: each result's best step (what the summary reports),
    then each step of the baseline that another result also ran (by name, as the CLI)."""
    yield "best", "each result's best step", [best_step(d) for d in documents]
    others = [set(step_names(d)) for d in documents[1:]]
    for name in step_names(documents[0]):
        if any(name in names for names in others):
            yield (
                f"step:{name}",
                f"step {name}",
                [name if name in step_names(d) else None for d in documents],
            )


# --- exports ----------------------------------------------------------------------------------


@bp.get("/results/export.<any(csv, json):kind>")
def export(kind: str) -> Response:
    """The comparison's results (``ids=``) or every result the list's filters match,
    as ``kitt results export`` writes them, streamed a result at a time."""
    if request.args.get("ids", "").strip():
        results: Iterator[ResultDetail] = iter(
            [detail(r) for r in fetch(read_ids(1, MAX_EXPORT_IDS))]
        )
    else:
        filters = read_filters()
        if filters.errors:
            raise ApiFailure(400, " ".join(filters.errors.values()))
        store = _store()
        if store.count(filters.where, at_most=MAX_EXPORT + 1) > MAX_EXPORT:
            raise ApiFailure(400, f"More than {MAX_EXPORT:,} results match these filters: "
                                  "an export holds at most that many. Narrow the filters "
                                  "(a model, an engine, an agent, or fewer days) and export "
                                  "each part.")  # fmt: skip
        results = matching(store, filters.where)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    chunks = csv_chunks(results) if kind == "csv" else json_chunks(results)
    mimetype = "text/csv" if kind == "csv" else "application/json"
    return Response(
        chunks,
        mimetype=mimetype,
        headers={"Content-Disposition": f'attachment; filename="kitt-results-{stamp}.{kind}"'},
    )


def matching(
    store: ResultStore, where: ResultFilter, page: int = EXPORT_PAGE, most: int = MAX_EXPORT
) -> Iterator[ResultDetail]:
    """Every match, newest first, a page at a time, each page one query that brings the
    documents along. Paged by key: a result imported meanwhile is not sent twice, nor
    one skipped when another is deleted. ``most`` bounds the stream even when imports
    made after the count pushed the matches past it."""
    last: BenchResult | None = None
    while most > 0:
        rows = store.page_after(where, last, min(page, most))
        yield from (detail(r) for r in rows)
        if len(rows) < min(page, most):
            return
        most -= len(rows)
        last = rows[-1]
