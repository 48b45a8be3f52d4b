"""The dashboard's results: the filtered list, the comparison (charts and the table of
changes) and the exports, in a real browser against a real server.

The documents are those of tests/test_results.py (whose numbers are known), with GPU
energy per step set here, one without telemetry (C) and one run at request rates (D).
Every expected number is computed from the documents, not copied from the page.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import re
import statistics
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page, expect
from sqlalchemy.orm import Session, sessionmaker

from conftest import Kitt
from dashboard import Dashboard
from kitt.results_compare import Comparison
from kitt.server.store.db import make_engine, migrate, sqlite_url
from kitt.server.store.models import BenchResult
from kitt.server.store.results import ResultFilter, ResultStore, build_row, load_document
from kitt.server.web.results_pages import MAX_EXPORT, delta_row, matching
from test_results import DOC_A, DOC_B, DOC_C, make_document, metrics

ENERGY_A = {"c=1": 2.0, "c=4": 1.0, "c=16": 0.5}  # J per output token
ENERGY_B = {"c=1": 1.6, "c=4": 0.8, "c=16": 0.4}


def with_energy(document: dict[str, Any], per_token: dict[str, float] | None) -> dict[str, Any]:
    doc = copy.deepcopy(document)
    for step in doc["steps"]:
        if per_token is None:
            del step["telemetry"]
        else:
            step["telemetry"]["energy_per_output_token_j"] = per_token[step["name"]]
    return doc


def rate_document() -> dict[str, Any]:
    """An open-loop run (steps at 2 and 4 req/s), without telemetry."""
    doc = make_document(
        model="tiny-llama", engine="llama.cpp", version="b6100", gpu="NVIDIA L4", gpu_count=1,
        hostname="edge-box", started_at="2026-11-04T10:00:00+00:00", telemetry=False,
        steps={"rate=2": (0, metrics(120, 2.0, (30, 70), (15, 22), 15, 900, 1.9, 0.0)),
               "rate=4": (0, metrics(220, 3.9, (45, 120), (18, 30), 18, 1200, 3.5, 0.01))},
    )  # fmt: skip
    for step in doc["steps"]:
        del step["telemetry"]
        step["load"] = {"mode": "rate", "concurrency": None, "arrival": "poisson",
                        "rate": float(step["name"].split("=")[1]), "max_concurrency": None}  # fmt: skip
    doc["config"]["load"] = {"mode": "rate", "levels": [2.0, 4.0]}
    return doc


A = with_energy(DOC_A, ENERGY_A)  # vllm 0.6.0 on gpu-a, 2026-11-01
B = with_energy(DOC_B, ENERGY_B)  # vllm 0.7.0 on gpu-b, 2026-11-02
C = with_energy(DOC_C, None)  # llama.cpp on cpu-box, 2 x A100, 2026-11-03
D = rate_document()  # llama.cpp on edge-box, L4, 2026-11-04


def import_all(kitt: Kitt) -> dict[str, str]:
    ids = {}
    for name, doc in (("A", A), ("B", B), ("C", C), ("D", D)):
        answer = kitt.api("POST", "/api/v1/results", json=doc)
        assert answer.status_code == 201, answer.text
        ids[name] = answer.json()["id"]
    return ids


# --- what the documents say, computed independently of the server --------------------------


def mean_by_level(doc: dict[str, Any], read: Any) -> dict[float, float]:
    """``read(step)`` averaged over the runs at each load level."""
    groups: dict[float, list[float]] = defaultdict(list)
    for step in doc["steps"]:
        load = step["load"]
        groups[load[load["mode"]]].append(read(step))
    return {level: statistics.mean(values) for level, values in groups.items()}


def throughput(doc: dict[str, Any]) -> dict[float, float]:
    return mean_by_level(doc, lambda s: s["metrics"]["output_token_throughput"])


def tokens_per_joule(doc: dict[str, Any]) -> dict[float, float]:
    per_token = mean_by_level(doc, lambda s: s["telemetry"]["energy_per_output_token_j"])
    return {level: 1 / j for level, j in per_token.items()}


def percentiles(doc: dict[str, Any], metric: str, step: str) -> list[float]:
    runs = [s for s in doc["steps"] if s["name"] == step]
    return [statistics.mean(s["metrics"][metric][p] for s in runs) for p in ("p50", "p90", "p99")]


def best_tokens_per_joule(doc: dict[str, Any]) -> float:
    best = doc["summary"]["best_step"]
    level = next(s["load"]["concurrency"] for s in doc["steps"] if s["name"] == best)
    return tokens_per_joule(doc)[level]


KEY_METRICS = ("best_output_token_throughput", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50",
               "tpot_ms_p99", "goodput", "tokens_per_joule")  # fmt: skip


def key_value(doc: dict[str, Any], metric: str) -> float:
    return best_tokens_per_joule(doc) if metric == "tokens_per_joule" else doc["summary"][metric]


# --- reading the page ----------------------------------------------------------------------


NONE = "\u2013"  # the en dash a chart's table shows for a missing value
TIMES = "\u00d7"


def number(cell: str) -> float | None:
    return None if cell.strip() in (NONE, "-") else float(cell.replace(",", ""))


def chart_table(page: Page, title: str) -> list[list[str]]:
    """The data table under a chart (header row first), as the browser shows it."""
    table = page.locator("details.chart-data").filter(
        has=page.get_by_text(f"Data: {title}", exact=True)
    )
    expect(table).to_have_count(1)
    rows: list[list[str]] = table.locator("table").evaluate(
        "t => [...t.rows].map(r => [...r.cells].map(c => c.textContent.trim()))"
    )
    return rows


def listed_ids(page: Page) -> list[str]:
    return page.locator("table.results tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.id)"
    )


def expect_listed(page: Page, ids: list[str]) -> None:
    rows = page.locator("table.results tbody tr")
    expect(rows).to_have_count(len(ids))
    assert listed_ids(page) == ids


def session(dashboard: Dashboard) -> httpx.Client:
    cookies = {name: c["value"] for name, c in dashboard.cookies().items()}
    return httpx.Client(base_url=dashboard.base_url, cookies=cookies, timeout=10)


# --- the tests -----------------------------------------------------------------------------


def test_list_filters_and_exports(kitt: Kitt, dashboard: Dashboard, tmp_path: Path) -> None:
    kitt.start_server()
    ids = import_all(kitt)
    dashboard.login()
    page = dashboard.page
    dashboard.goto("/results")
    expect_listed(page, [ids["D"], ids["C"], ids["B"], ids["A"]])
    row_b = page.locator(f'tr[data-id="{ids["B"]}"] > *')
    expect(row_b).to_have_text([
        re.compile(r"Select llama-3-8b, vllm 0\.7\.0 on gpu-b, 2026-11-02 10:00 UTC"),
        f"2026-11-02 10:00 UTC{ids['B']}", "llama-3-8b", "vllm 0.7.0", "gpu-b",
        f"1 {TIMES} NVIDIA H100 80GB HBM3", "1200", "82.0", "190", "12.0", "18.0", "13.5", "0.50%",
    ])  # fmt: skip
    # The filter choices are the values stored.
    expect(page.locator("#filter-engine option")).to_have_text(["any", "llama.cpp", "vllm"])
    expect(page.locator("#filter-agent option")).to_have_count(5)

    # Filters narrow the list in place (htmx), and the address carries them.
    page.get_by_label("Model").select_option("llama-3-8b")
    expect(page).to_have_url(re.compile(r"/results\?model=llama-3-8b$"))
    expect_listed(page, [ids["B"], ids["A"]])
    page.get_by_label("From (UTC day)").fill("2026-11-02")
    expect(page).to_have_url(re.compile(r"/results\?model=llama-3-8b&since=2026-11-02$"))
    expect_listed(page, [ids["B"]])
    dashboard.shot("results")
    page.reload()  # the address is the view: the same list, the same filters shown
    expect_listed(page, [ids["B"]])
    expect(page.get_by_label("Model")).to_have_value("llama-3-8b")
    expect(page.get_by_label("From (UTC day)")).to_have_value("2026-11-02")
    expect(page.get_by_label("Link to this list")).to_have_value(page.url)
    for query, expected in (
        ("gpu=a100", ["C"]), ("gpu=H100&until=2026-11-01", ["A"]),
        ("engine=llama.cpp&agent=edge-box", ["D"]), ("since=2026-11-03&until=2026-11-03", ["C"]),
        ("engine=sglang", []),
    ):  # fmt: skip
        dashboard.goto(f"/results?{query}")
        expect_listed(page, [ids[k] for k in expected])
    expect(page.locator("#result-count")).to_have_text("No result matches these filters.")

    # A bad filter: said by the field, not a 500.
    response = dashboard.goto("/results?since=yesterday")
    assert response.status == 400
    expect(page.get_by_role("alert")).to_have_text(
        "From must be a date like 2026-11-27, not 'yesterday'."
    )
    expect(page.get_by_label("From (UTC day)")).to_have_attribute("aria-invalid", "true")
    dashboard.goto("/results?model=llama-3-8b")
    page.get_by_label("From (UTC day)").fill("2026-11-05")
    page.get_by_label("To (UTC day)").fill("2026-11-01")
    expect(page.get_by_role("alert")).to_have_text("To is before From: no result can match.")
    expect(page.get_by_label("To (UTC day)")).to_have_attribute("aria-invalid", "true")

    # Export of the filtered list: a download, one CSV row per step run.
    dashboard.goto("/results?gpu=h100")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Export CSV").click()
    download = download_info.value
    assert re.fullmatch(r"kitt-results-\d{8}T\d{6}Z\.csv", download.suggested_filename)
    rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
    assert [r["result_id"] for r in rows] == [ids["B"]] * 9 + [ids["A"]] * 9
    b16 = [r for r in rows if r["result_id"] == ids["B"] and r["step"] == "c=16"]
    assert [r["output_token_throughput"] for r in b16] == ["1190", "1200", "1210"]
    assert {r["energy_per_output_token_j"] for r in b16} == {"0.4"}
    assert {r["gpu_model"] for r in rows} == {"NVIDIA H100 80GB HBM3"}

    with session(dashboard) as http:
        answer = http.get("/results/export.json", params={"engine": "llama.cpp"})
        assert answer.status_code == 200
        assert answer.headers["content-disposition"].startswith("attachment; filename=")
        assert [(r["id"], r["document"]) for r in answer.json()] == [(ids["D"], D), (ids["C"], C)]
        assert http.get("/results/export.json", params={"engine": "sglang"}).json() == []
        bad = http.get("/results/export.csv", params={"until": "2026-13-01"})
        assert bad.status_code == 400 and "To must be a date like" in bad.text
        # Without a session: to the login page, never the data.
        anonymous = httpx.get(dashboard.url("/results/export.csv"), timeout=10)
        assert anonymous.status_code == 302 and "/login" in anonymous.headers["location"]


def test_compare_charts_deltas_and_links(kitt: Kitt, dashboard: Dashboard) -> None:
    kitt.start_server()
    ids = import_all(kitt)
    dashboard.login()
    page = dashboard.page

    # The list's selection: fewer than two is refused in place; two open the comparison,
    # the oldest as the baseline, at a short address.
    dashboard.goto("/results?model=llama-3-8b")
    page.locator(f"#pick-{ids['B']}").check()
    page.get_by_role("button", name="Compare selected").click()
    expect(page.locator("#compare-hint")).to_have_text(
        "Select at least 2 results to compare (1 selected)."
    )
    expect(page).to_have_url(re.compile(r"/results\?model=llama-3-8b$"))
    page.get_by_label(re.compile(r"^Select llama-3-8b, vllm 0\.6\.0 on gpu-a")).check()
    expect(page.locator("#compare-hint")).to_have_text("2 selected")
    page.get_by_role("button", name="Compare selected").click()
    compare_url = dashboard.url(f"/results/compare?ids={ids['A']},{ids['B']}")
    expect(page).to_have_url(compare_url)
    labels = ["#1 vllm 0.6.0 · gpu-a", "#2 vllm 0.7.0 · gpu-b"]

    def check_comparison() -> None:
        expect(page.get_by_label("Link to this comparison")).to_have_value(compare_url)
        # Throughput and tokens per joule at each concurrency: the documents' means.
        for title, expected, digits in (
            ("Output throughput vs concurrency", [throughput(A), throughput(B)], 1),
            ("Output tokens per joule vs concurrency",
             [tokens_per_joule(A), tokens_per_joule(B)], 3),
        ):  # fmt: skip
            table = chart_table(page, title)
            assert table[0] == ["concurrency", *labels]
            assert [number(r[0]) for r in table[1:]] == [1, 4, 16]
            for row in table[1:]:
                level = float(row[0])
                assert [number(c) for c in row[1:]] == [round(e[level], digits) for e in expected]
        # TTFT and TPOT percentiles at each result's best step (c=16).
        for title, metric in (("TTFT percentiles (ms)", "ttft_ms"), ("TPOT percentiles (ms)", "tpot_ms")):  # fmt: skip
            table = chart_table(page, title)
            assert table[0] == ["percentile", *labels]
            assert [r[0] for r in table[1:]] == ["p50", "p90", "p99"]
            columns = [percentiles(doc, metric, "c=16") for doc in (A, B)]
            for i, row in enumerate(table[1:]):
                assert [number(c) for c in row[1:]] == [round(col[i], 1) for col in columns]
        # The changes against the baseline, in numbers and in words.
        verdicts = {"best_output_token_throughput": "better", "ttft_ms_p50": "within noise",
                    "ttft_ms_p99": "better", "tpot_ms_p50": "better", "tpot_ms_p99": "better",
                    "goodput": "better", "tokens_per_joule": "better"}  # fmt: skip
        for metric in KEY_METRICS:
            base, value = key_value(A, metric), key_value(B, metric)
            delta = (value - base) / abs(base) * 100
            cells = page.locator(f'#deltas tr[data-metric="{metric}"] td')
            expect(cells.nth(0).locator(".value")).to_have_text(re.compile(r"[\d.]+"))
            assert number(cells.nth(0).locator(".value").inner_text()) == round(base, 2)
            assert number(cells.nth(1).locator(".value").inner_text()) == round(value, 2)
            expect(cells.nth(1).locator(".delta")).to_have_text(f"{delta:+.1f} %")
            expect(cells.nth(1).locator(".verdict")).to_have_text(verdicts[metric])
        expect(page.locator('#deltas tr[data-metric="ttft_ms_p50"] th')).to_have_text(
            "TTFT p50 (ms) (lower is better)"
        )

    check_comparison()
    dashboard.shot("compare")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_role("button", name="Copy link").click()
    expect(page.locator("#flash")).to_have_text("Link copied.")
    assert page.evaluate("navigator.clipboard.readText()") == compare_url
    page.reload()  # the link is the view
    check_comparison()

    # Latency at another step the two share.
    page.get_by_label("Latency at").select_option(label="step c=4")
    expected = [round(v, 1) for v in percentiles(B, "ttft_ms", "c=4")]
    expect(page.locator("details.chart-data").filter(has_text="Data: TTFT percentiles")
           .locator("tbody td:nth-child(3)")).to_have_text([f"{v:.1f}" for v in expected])  # fmt: skip

    # Another baseline: the other way round, the changes read "worse".
    page.get_by_role("link", name="Use as baseline (#2 vllm 0.7.0 · gpu-b)").click()
    expect(page).to_have_url(re.compile(rf"/results/compare\?ids={ids['B']},{ids['A']}$"))
    throughput_cells = page.locator('#deltas tr[data-metric="best_output_token_throughput"] td')
    expect(throughput_cells.nth(1)).to_have_text(re.compile(r"1000\s+-16\.7 %\s+worse"))

    # The comparison's exports hold exactly its results, in its order.
    with session(dashboard) as http:
        whole = http.get("/results/export.json", params={"ids": f"{ids['B']},{ids['A']}"})
        assert whole.status_code == 200 and "attachment" in whole.headers["content-disposition"]
        assert [(r["id"], r["document"]) for r in whole.json()] == [(ids["B"], B), (ids["A"], A)]
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Export CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(download_info.value.path()).read_text())))
    assert [r["result_id"] for r in rows] == [ids["B"]] * 9 + [ids["A"]] * 9


def test_compare_rate_steps_no_energy_and_bad_links(kitt: Kitt, dashboard: Dashboard) -> None:
    kitt.start_server()
    ids = import_all(kitt)
    dashboard.login()
    page = dashboard.page

    # C ran at concurrencies, D at request rates: a curve for each, nothing mixed.
    dashboard.goto(f"/results/compare?ids={ids['C']},{ids['D']}")
    labels = ["#1 llama.cpp b6000 · cpu-box", "#2 llama.cpp b6100 · edge-box"]
    table = chart_table(page, "Output throughput vs concurrency")
    c = throughput(C)
    assert table == [
        ["concurrency", *labels],
        ["1", f"{c[1]:.1f}", NONE],
        ["8", f"{c[8]:.1f}", NONE],
    ]
    table = chart_table(page, "Output throughput vs request rate (req/s)")
    d = throughput(D)
    assert table == [["request rate (req/s)", *labels],
                     ["2", NONE, f"{d[2.0]:.1f}"], ["4", NONE, f"{d[4.0]:.1f}"]]  # fmt: skip
    # Neither has GPU telemetry: said in words, no empty chart.
    expect(page.locator(".no-energy")).to_have_count(2)
    expect(page.locator(".no-energy").first).to_contain_text("No energy data")
    expect(page.locator("details.chart-data").filter(has_text="per joule")).to_have_count(0)
    tokens_j = page.locator('#deltas tr[data-metric="tokens_per_joule"] td')
    expect(tokens_j).to_have_text(["-", re.compile(r"^\s*-\s+no value\s*$")])
    # Different steps: latency only at each one's best step.
    expect(page.locator("#latency-step option")).to_have_text(["each result's best step"])

    for query, status, message in (
        ("", 400, "Choose at least 2 results to compare: this link names 0."),
        (f"?ids={ids['A']}", 400, "Choose at least 2 results to compare: this link names 1."),
        (f"?ids={ids['A']},nope", 404, "No result nope: it may have been deleted, or the link is mistyped."),
        (f"?ids={ids['A']},a.b", 400, "'a.b' is not a result id"),
        (f"?ids={ids['A']},{ids['A']}", 400, f"Result {ids['A']} is named more than once."),
        ("?ids=" + ",".join(f"r{i}" for i in range(11)), 400, "At most 10 results at a time: this link names 11."),
    ):  # fmt: skip
        response = dashboard.goto(f"/results/compare{query}")
        assert response.status == status, query
        expect(page.get_by_role("alert")).to_contain_text(message)
        expect(page.get_by_role("link", name="Back to the results")).to_be_visible()
    assert dashboard.goto("/results?offset=-1").status == 400
    expect(page.get_by_role("alert")).to_have_text("'offset' must be between 0 and 1000000000")
    with session(dashboard) as http:
        missing = http.get("/results/export.csv", params={"ids": "nope"})
        assert missing.status_code == 404 and "No result nope" in missing.text


# --- exports of many results, and the verdict of a tiny change ------------------------------

SMALL = make_document(
    model="bulk", engine="vllm", version="1", gpu="NVIDIA L4", gpu_count=1, hostname="bulk",
    started_at="2026-10-01T10:00:00+00:00", telemetry=False,
    steps={"c=1": (1, metrics(100, 1.5, (20, 40), (10, 12), 10, 650, 1.5, 0.0))},
)  # fmt: skip
T0 = datetime(2026, 10, 1, tzinfo=timezone.utc)


def bulk_rows(count: int, **fields: Any) -> list[BenchResult]:
    """``count`` results of one small document, seven to a second (so that pages end
    inside a run of equal times) and ids in no particular order (hashes)."""
    document, parsed = load_document(json.dumps(SMALL))
    rows = []
    for i in range(count):
        digest = hashlib.sha256(f"{fields}{i}".encode()).hexdigest()[:16]
        row = build_row(document, parsed, result_id=f"res_{digest}", source="import", now=T0)
        row.created_at = T0 - timedelta(seconds=i // 7)
        for name, value in fields.items():
            setattr(row, name, value(i) if callable(value) else value)
        rows.append(row)
    return rows


def newest_first(rows: list[BenchResult]) -> list[str]:
    return [r.id for r in sorted(rows, key=lambda r: (r.created_at, r.id), reverse=True)]


def open_store(url: str) -> ResultStore:
    engine = make_engine(url)
    migrate(engine)  # a no-op on the server's database
    return ResultStore(sessionmaker(engine, expire_on_commit=False))


def add_all(sessions: sessionmaker[Session], rows: list[BenchResult]) -> None:
    with sessions.begin() as s:
        s.add_all(rows)


def test_export_pages_by_key_while_results_come_and_go(tmp_path: Path) -> None:
    """A result imported or deleted during an export neither repeats a row nor skips one
    (paging by OFFSET did both), and ``most`` bounds what one export sends."""
    store = open_store(sqlite_url(tmp_path / "kitt.db"))
    rows = bulk_rows(9)
    add_all(store.sessions, rows)
    expected = newest_first(rows)
    export = matching(store, ResultFilter(), page=2)
    sent = [next(export).id for _ in range(3)]  # the third is the first of page two
    assert store.delete(sent[0])  # one already sent goes (OFFSET would skip one)...
    sent += [next(export).id for _ in range(2)]  # ...page three is read...
    (newer,) = bulk_rows(1, created_at=T0 + timedelta(hours=1))
    add_all(store.sessions, [newer])  # ...and a newer one comes (OFFSET would repeat one)
    sent += [r.id for r in export]
    assert sent == expected
    assert [d.document for d in matching(store, ResultFilter(), page=4)][:2] == [SMALL] * 2
    assert len(list(matching(store, ResultFilter(), page=3, most=7))) == 7
    assert store.count(ResultFilter(), at_most=5) == 5
    assert store.count(ResultFilter(model="bulk"), at_most=100) == 9  # 9 - 1 + 1
    assert store.count(ResultFilter(model="other"), at_most=100) == 0


def test_export_is_capped_and_exact(kitt: Kitt, dashboard: Dashboard) -> None:
    """More than MAX_EXPORT matches: refused with a message saying what to do; up to it,
    every match exactly once, in order, across many pages. The rows are written straight
    into the server's database (importing 10,001 documents over HTTP would take minutes)."""
    kitt.start_server()
    # The sandbox's database: its SQLite file, or the PostgreSQL one a run on it hands out.
    url = kitt.env.get("KITT_DATABASE_URL") or sqlite_url(kitt.home / "server" / "kitt.db")
    store = open_store(url)
    rows = bulk_rows(
        MAX_EXPORT + 1,
        agent_name=lambda i: "bulk-a" if i < MAX_EXPORT else "bulk-b",
        engine=lambda i: "vllm" if i % 8 == 0 else "sglang",
    )
    add_all(store.sessions, rows)
    dashboard.login()
    refused = f"More than {MAX_EXPORT:,} results match these filters: an export holds at most"
    with session(dashboard) as http:
        for kind in ("csv", "json"):
            answer = http.get(f"/results/export.{kind}", params={"model": "bulk"})
            assert answer.status_code == 400 and refused in answer.text, answer.text[:300]
            assert "Narrow the filters" in answer.text
        # Exactly the cap: allowed, every row once (one CSV row per result: one step each).
        answer = http.get("/results/export.csv", params={"agent": "bulk-a"}, timeout=60)
        assert answer.status_code == 200, answer.text[:300]
        listed = [r["result_id"] for r in csv.DictReader(io.StringIO(answer.text))]
        assert listed == newest_first([r for r in rows if r.agent_name == "bulk-a"])
        # Whole documents, across pages that end inside runs of equal times.
        answer = http.get("/results/export.json", params={"engine": "vllm"}, timeout=60)
        assert answer.status_code == 200, answer.text[:300]
        exported = answer.json()
        assert [r["id"] for r in exported] == newest_first([r for r in rows if r.engine == "vllm"])
        assert len(exported) == 1251 and all(r["document"] == SMALL for r in exported)
    # In the browser, the refusal is a page that says it (not a broken download).
    response = dashboard.goto("/results/export.csv?model=bulk")
    assert response.status == 400
    expect(dashboard.page.get_by_role("alert")).to_contain_text(refused)


def test_a_change_too_small_to_show_is_no_change() -> None:
    """The verdict follows the number shown: +0.03 % reads "+0.0 % no change", not better."""
    row = Comparison("summary", "goodput", "goodput", "higher",
                     [100.0, 100.03, 99.97, 100.06, 99.94, 100.0], [None] * 6)  # fmt: skip
    cells = [(c["delta"], c["verdict"]) for c in delta_row(row)["cells"]]
    assert cells == [(None, "baseline"), ("+0.0 %", "no change"), ("+0.0 %", "no change"),
                     ("+0.1 %", "better"), ("-0.1 %", "worse"), ("+0.0 %", "no change")]  # fmt: skip
    lower = Comparison("summary", "ttft_ms_p50", "TTFT", "lower", [100.0, 100.04, 100.2],
                       [1.0, 1.0, 0.01])  # fmt: skip
    assert [c["verdict"] for c in delta_row(lower)["cells"]] == [
        "baseline",
        "no change",
        "within noise",
    ]
