"""The dashboard's run-a-test form, tests list and test page, in a real browser.

A real server and a real agent on loopback run real tests: a custom benchmark that prints
its log in rounds, each released by a file the test creates (tests/bench_scripts/
web_gated.py), and the built-in serving benchmark against the simulator, started by the
agent as an engine. GPUs are the NVML stand-in. Nothing waits by sleeping: Playwright's
expect and wait_for are deadlines.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import pytest
import yaml
from playwright.sync_api import Page, expect

from conftest import Kitt, wait_for
from dashboard import TIMEOUT_MS, Dashboard
from kitt.server.web.test_pages import average_down, result_charts

NAME = "gpu-01"
GIB = 1024**3
ONE_GPU = [{"name": "NVIDIA H100 80GB HBM3", "util": 35, "mem_total": 80 * GIB,
            "mem_used": 12 * GIB, "temp": 50, "power_mw": 250_000}]  # fmt: skip
# The simulator as an engine the agent starts (model_kind name: nothing checked on disk).
SIM_ENGINE = {
    "binary": sys.executable, "model_kind": "name", "startup_timeout_s": 30,
    "argv": ["{binary}", "-m", "kitt.bench.simulator", "--host", "{host}", "--port", "{port}",
             "--model", "{model_name}", "--ttft-ms", "5", "--itl-ms", "1"],
}  # fmt: skip


@pytest.fixture
def fleet(kitt: Kitt) -> Kitt:
    """Server, and one agent with the gated benchmark, the simulator engine and a GPU."""
    kitt.fake_gpus(ONE_GPU)
    kitt.start_server()
    kitt.init_agent(NAME)
    kitt.add_benchmark("gated", "web_gated.py", timeout_s=180)
    cfg = kitt.home / "agent.yaml"
    cfg.write_text(
        yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "engines": {"sim": SIM_ENGINE}})
    )
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent(NAME).get("status") == "idle", what="the agent registered")
    return kitt


def queued_tests(kitt: Kitt) -> list[dict[str, Any]]:
    return kitt.api("GET", "/api/v1/tests").json()["tests"]  # type: ignore[no-any-return]


def gated_lines(rounds: range, count: int) -> list[str]:
    return [f"round {r} line {i:02d} " + ("WARN slow step" if i % 5 == 0 else "ok")
            for r in rounds for i in range(count)]  # fmt: skip


def opened_test_id(page: Page) -> str:
    expect(page).to_have_url(re.compile(r"/tests/(?!new$)[A-Za-z0-9_-]+$"))
    return page.url.rsplit("/", 1)[1]


def invalid(page: Page, field: str, message: str) -> None:
    """The field is marked invalid and described by its message."""
    box = page.locator(f"#{field}")
    expect(box).to_have_attribute("aria-invalid", "true")
    expect(box).to_have_attribute("aria-describedby", re.compile(rf"\b{field}-error\b"))
    expect(page.locator(f"#{field}-error")).to_have_text(message)


# --- (1) the form refuses bad input beside the fields -----------------------------------


@pytest.fixture
def no_script_page(browser: Any, fleet: Kitt) -> Iterator[Page]:
    """A browser without JavaScript, signed in: the plain form post and its 422."""
    context = browser.new_context(
        java_script_enabled=False, viewport={"width": 1440, "height": 900}
    )
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(fleet.server_url + "/login")
    page.get_by_label("Admin token").fill(fleet.admin_token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/fleet$"))
    yield page
    context.close()


def test_form_refuses_bad_input_beside_the_fields(
    fleet: Kitt, dashboard: Dashboard, no_script_page: Page
) -> None:
    # A second agent that offers vllm, which gpu-01 lacks (registered, never started).
    other = fleet.api("POST", "/api/v1/agents/register", token=fleet.bootstrap_token(), json={
        "name": "cpu-box", "hostname": "cpu-box", "port": 1, "kitt_version": "x",
        "capabilities": ["serving", "engine:vllm"]})  # fmt: skip
    assert other.status_code == 201, other.text
    wait_for(lambda: fleet.agent("cpu-box")["online"] is False, what="cpu-box to go offline")
    dashboard.login()
    page = dashboard.page

    dashboard.goto(f"/tests/new?agent={NAME}")
    expect(page.get_by_label("Agent")).to_have_value(NAME)
    # The script narrows the engines to the chosen agent's; any idle agent: all of them.
    expect(page.locator('#engine option[value="vllm"]')).to_be_disabled()
    expect(page.locator('#engine option[value="sim"]')).to_be_enabled()
    page.get_by_label("Agent").select_option("any")
    expect(page.locator('#engine option[value="vllm"]')).to_be_enabled()
    page.get_by_label("Agent").select_option(NAME)
    page.get_by_label("Engine").select_option("sim")
    page.get_by_label("Concurrency levels").fill("4,-1")
    page.get_by_label("Time to first token limit (ms)").fill("fast")
    page.get_by_label("Parameters, one KEY=VALUE per line").fill("num_prompt=5\nnot a pair")
    page.get_by_role("button", name="Queue the test").click()

    invalid(page, "model", "give the model: a name, path or tag the engine loads")
    invalid(page, "concurrency", "'-1' must be > 0")
    invalid(page, "slo_ttft_ms", "SLO ttft_ms: 'fast' is not a number")
    invalid(page, "params", "line 2: 'not a pair' is not KEY=VALUE")
    expect(page.get_by_role("alert")).to_contain_text("The test was not queued")
    expect(page.locator("#model")).to_be_focused()  # the first refused field
    expect(page.get_by_label("Concurrency levels")).to_have_value("4,-1")  # kept as typed
    expect(page.get_by_label("Agent")).to_have_value(NAME)
    expect(page.get_by_label("Engine")).to_have_value("sim")
    expect(page.locator("#engine")).not_to_have_attribute("aria-invalid", "true")
    expect(page).to_have_url(re.compile(r"/tests/new\?agent="))
    dashboard.shot("test-new")

    # Fixed but for a misspelt parameter: ServeParams names it, as the agent would.
    page.get_by_label("Model").fill("sim")
    page.get_by_label("Concurrency levels").fill("1,2")
    page.get_by_label("Time to first token limit (ms)").fill("")
    page.get_by_label("Parameters, one KEY=VALUE per line").fill("num_prompt=5")
    page.get_by_role("button", name="Queue the test").click()
    invalid(page, "params", "num_prompt: unknown parameter (misspelt?)")
    expect(page.locator("#model")).not_to_have_attribute("aria-invalid", "true")
    expect(page.locator("#params")).to_be_focused()

    # An over-long field is refused beside it, kept whole (never cut short and queued).
    long_params = "note=" + "x" * 10_000
    page.get_by_label("Parameters, one KEY=VALUE per line").fill(long_params)
    page.get_by_role("button", name="Queue the test").click()
    invalid(page, "params", "too long: 10,005 characters (at most 10,000)")
    expect(page.get_by_label("Parameters, one KEY=VALUE per line")).to_have_value(long_params)

    # Without a script: every engine is offered; the server's agent check (the same
    # function as POST /api/v1/tests) answers 422 with the message at the engine.
    plain = no_script_page
    plain.goto(fleet.server_url + "/tests/new")
    plain.get_by_label("Agent").select_option(NAME)
    plain.get_by_label("Engine").select_option("vllm")
    plain.get_by_label("Model").fill("llama")
    with plain.expect_response(lambda r: r.request.method == "POST") as answer:
        plain.get_by_role("button", name="Queue the test").click()
    assert answer.value.status == 422
    invalid(plain, "engine", f"agent {NAME} cannot start engine 'vllm' (engines found on it: sim)")
    expect(plain.locator("#engine")).to_have_attribute("autofocus", "")
    expect(plain.get_by_label("Engine")).to_have_value("vllm")
    expect(plain.get_by_label("Model")).to_have_value("llama")
    # Any idle agent with vllm: none is (cpu-box is offline).
    plain.get_by_label("Agent").select_option("any")
    with plain.expect_response(lambda r: r.request.method == "POST") as answer:
        plain.get_by_role("button", name="Queue the test").click()
    assert answer.value.status == 422
    invalid(plain, "agent", "no idle online agent offers benchmark 'serving' with engine 'vllm'; "
                            "try later")  # fmt: skip

    assert queued_tests(fleet) == []  # nothing was queued by any of it


# --- (2), (3), (4) launch, live log, resume after a server restart, search, scrolling ----


def at_bottom(page: Page) -> bool:
    return bool(page.locator("#log").evaluate(
        "el => el.scrollHeight - el.scrollTop - el.clientHeight < 4"))  # fmt: skip


def test_launch_follow_resume_search_and_scroll(
    fleet: Kitt, dashboard: Dashboard, tmp_path: Path
) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    dashboard.login()
    page = dashboard.page
    dashboard.goto(f"/tests/new?agent={NAME}")
    page.get_by_label("Benchmark").select_option("gated")
    expect(page.get_by_role("group", name="Load (serving benchmark)")).to_be_hidden()
    page.get_by_label("Parameters, one KEY=VALUE per line").fill(
        f"GATES={gates}\nROUNDS=4\nLINES=40"
    )
    page.get_by_role("button", name="Queue the test").click()
    test_id = opened_test_id(page)
    submitted = fleet.test_info(test_id)
    assert (submitted["agent_name"], submitted["benchmark"]) == (NAME, "gated")
    assert submitted["params"] == {"GATES": str(gates), "ROUNDS": 4, "LINES": 40}

    # Status arrives by the stream's status events. The page is live before the test
    # has any line (its script waits for the gate): the lines below come over the live
    # stream, not in the replay a (re)connection starts with.
    expect(page.locator("#test-status")).to_have_text("running", timeout=30_000)
    expect(page.locator("#log-state")).to_contain_text("Live")
    logged = fleet.api("GET", f"/api/v1/tests/{test_id}/logs", params={"format": "text"})
    assert (logged.status_code, logged.text) == (200, "")
    lines = page.locator("#log .line")
    assert lines.count() == 0
    (gates / "go-0").touch()
    expect(lines).to_have_count(40)
    assert lines.all_inner_texts() == gated_lines(range(1), 40)
    assert at_bottom(page)  # following the newest line
    dashboard.shot("test-live")

    # Search: only the matching lines, the text marked, and how many.
    page.get_by_label("Search the log").fill("warn")
    expect(page.locator("#log-matches")).to_have_text("8 lines match (of 40)")
    expect(page.locator("#log .line:not(.hidden)")).to_have_count(8)
    expect(page.locator("#log mark")).to_have_count(8)
    assert set(page.locator("#log mark").all_inner_texts()) == {"WARN"}
    page.get_by_label("Search the log").fill("")
    expect(page.locator("#log .line:not(.hidden)")).to_have_count(40)
    expect(page.locator("#log-matches")).to_have_text("")

    # Scrolled up: new lines do not move the view; "Jump to latest" goes back and resumes.
    page.locator("#log").evaluate("el => { el.scrollTop = 0; }")
    jump = page.get_by_role("button", name="Jump to latest")
    expect(jump).to_be_visible()
    (gates / "go-1").touch()
    expect(lines).to_have_count(80)
    assert page.locator("#log").evaluate("el => el.scrollTop") == 0
    jump.click()
    expect(jump).to_be_hidden()
    page.wait_for_function("() => { const el = document.getElementById('log'); "
                           "return el.scrollHeight - el.scrollTop - el.clientHeight < 4; }")  # fmt: skip

    # A network blip: the server goes away (lines keep coming, spooled by the agent) and
    # comes back on the same port and database; the page resumes where it was.
    assert fleet.run("server", "stop").returncode == 0
    expect(page.locator("#log-state")).to_contain_text("Connection lost")
    (gates / "go-2").touch()
    fleet.start_server()
    expect(lines).to_have_count(120, timeout=30_000)
    expect(page.locator("#log-state")).to_contain_text("Live")
    (gates / "go-3").touch()
    expect(page.locator("#test-status")).to_have_text("completed", timeout=30_000)
    expect(page.locator("#log-state")).to_have_text("Ended: the test is completed.")
    expect(lines).to_have_count(160)
    seqs = page.locator("#log .line").evaluate_all("els => els.map(e => Number(e.dataset.seq))")
    assert seqs == list(range(1, 161))  # each line once, in order
    assert lines.all_inner_texts() == gated_lines(range(4), 40)
    assert at_bottom(page)  # following again since the jump
    # The facts followed too: timings of the run, the cancel button off.
    done = fleet.test_info(test_id)
    assert done["status"] == "completed"
    expect(page.locator("#test-times")).to_contain_text("Ran for")
    expect(page.get_by_role("button", name="Cancel test")).to_be_disabled()
    expect(page.locator("#result-json")).to_contain_text('"lines": 160')


# --- (5) cancel ------------------------------------------------------------------------


def test_cancel_from_the_page(fleet: Kitt, dashboard: Dashboard, tmp_path: Path) -> None:
    (tmp_path / "go-0").touch()  # round 0 prints at once; round 1 is never released
    test = fleet.submit("gated", GATES=str(tmp_path), ROUNDS=2, LINES=3)
    fleet.wait_status(test["id"], "running")
    # A second reader of the same stream, to see the status events themselves.
    url = f"{fleet.server_url}/api/v1/tests/{test['id']}/logs"
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=30), headers=fleet.auth_for(url)) as client,
        httpx_sse.connect_sse(client, "GET", url) as source,
    ):
        events = (e for e in source.iter_sse() if e.data)
        assert [next(events).event for _ in range(3)] == ["log"] * 3  # the stream is live

        dashboard.login()
        page = dashboard.page
        dashboard.goto(f"/tests/{test['id']}")
        expect(page.locator("#test-status")).to_have_text("running")
        expect(page.locator("#log .line")).to_have_count(3)
        cancel = page.get_by_role("button", name="Cancel test")
        expect(cancel).to_be_enabled()
        cancel.click()
        expect(page.locator("#test-status")).to_have_text("cancelled", timeout=30_000)
        after = []
        for event in events:
            after.append((event.event, json.loads(event.data)))
            if event.event == "end":
                break
    expect(page.locator("#log-state")).to_have_text("Ended: the test is cancelled.")
    expect(page.get_by_role("button", name="Cancel test")).to_be_disabled()
    expect(page.locator("#flash")).to_contain_text(f"Cancel requested for test {test['id']}")
    assert fleet.test_info(test["id"])["status"] == "cancelled"
    expect(page.locator("#no-result")).to_have_text("This test left no result (cancelled).")
    # The wire: a status event per change (the cancel request, then the end), then end.
    statuses = [data for name, data in after if name == "status"]
    assert statuses and all(d["cancel_requested"] and d["test_id"] == test["id"] for d in statuses)
    assert statuses[-1]["status"] == "cancelled" and statuses[-1]["finished_at"]
    assert after[-1] == ("end", {"test_id": test["id"], "status": "cancelled", "last_seq": 3})

    # A test that does not exist: a page saying so, not a traceback.
    answer = dashboard.goto("/tests/tst_nosuch")
    assert answer.status == 404
    expect(page.get_by_role("alert")).to_have_text("no test 'tst_nosuch'")


# --- (6) a finished serving test: summary and charts -------------------------------------


def chart_rows(page: Page, title: str) -> list[list[str]]:
    """The data table under the chart called ``title``: [x label, value, …] per row."""
    chart = page.locator(".chart-slot").filter(has=page.get_by_text(title, exact=True))
    expect(chart.locator("details.chart-data table")).to_have_count(1)
    rows = chart.locator("details.chart-data tbody tr")
    return [[c.strip() for c in r.locator("th, td").all_text_contents()] for r in rows.all()]


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_finished_serving_test_shows_summary_and_charts(fleet: Kitt, dashboard: Dashboard) -> None:
    dashboard.login()
    page = dashboard.page
    dashboard.goto("/tests/new")
    page.get_by_label("Engine").select_option("sim")
    page.get_by_label("Model").fill("sim")
    page.get_by_label("Concurrency levels").fill("1,2")
    page.get_by_label("Duration per step (s)").fill("0.6")  # GPU samples inside each step
    page.get_by_label("Input tokens").fill("8")
    page.get_by_label("Output tokens").fill("4")
    page.get_by_label("Time to first token limit (ms)").fill("500")
    page.get_by_label("Parameters, one KEY=VALUE per line").fill(
        "calibrate=false\ntelemetry_interval_s=0.1"
    )
    page.get_by_role("button", name="Queue the test").click()
    test_id = opened_test_id(page)
    assert fleet.test_info(test_id)["params"] == {
        "concurrency": "1,2", "duration_s": 0.6, "input_len": 8, "output_len": 4,
        "slo": "ttft_ms=500", "calibrate": False, "telemetry_interval_s": 0.1,
    }  # fmt: skip
    expect(page.locator("#test-status")).to_have_text("completed", timeout=90_000)
    expect(page.locator("#result-summary")).to_be_visible()
    result = fleet.api("GET", f"/api/v1/results/{test_id}").json()
    doc = result["document"]
    assert doc["config"]["slo"]["ttft_ms"] == 500

    rows = page.locator("#result-summary tr")
    summary = {r.locator("th").inner_text(): r.locator("td").inner_text() for r in rows.all()}
    best = doc["summary"]
    assert number(summary["Output throughput (tokens/s)"]) == pytest.approx(
        best["best_output_token_throughput"], abs=0.051)  # fmt: skip
    assert number(summary["Time to first token p50 (ms)"]) == pytest.approx(
        best["ttft_ms_p50"], abs=0.051
    )
    assert number(summary["Time per output token p99 (ms)"]) == pytest.approx(
        best["tpot_ms_p99"], abs=0.0051
    )
    expect(page.locator("#result-summary caption")).to_contain_text(best["best_step"])

    steps = sorted(doc["steps"], key=lambda s: s["load"]["concurrency"])
    assert [s["load"]["concurrency"] for s in steps] == [1, 2]
    ttft = chart_rows(page, "Time to first token")
    tpot = chart_rows(page, "Time per output token")
    tput = chart_rows(page, "Output throughput")
    for row_ttft, row_tpot, row_tput, step in zip(ttft, tpot, tput, steps, strict=True):
        m = step["metrics"]
        assert row_ttft[0] == row_tpot[0] == row_tput[0] == str(step["load"]["concurrency"])
        assert [number(v) for v in row_ttft[1:]] == pytest.approx(
            [m["ttft_ms"]["p50"], m["ttft_ms"]["p99"]], abs=0.051)  # fmt: skip
        assert [number(v) for v in row_tpot[1:]] == pytest.approx(
            [m["tpot_ms"]["p50"], m["tpot_ms"]["p99"]], abs=0.0051)  # fmt: skip
        assert number(row_tput[1]) == pytest.approx(m["output_token_throughput"], abs=0.051)

    # GPU telemetry: per step (the document) and over the run (the agent's heartbeats).
    per_step = chart_rows(page, "GPU utilisation per step (mean)")
    assert [number(r[1]) for r in per_step] == [
        s["telemetry"]["gpus"][0]["utilization_pct"]["mean"] for s in steps] == [35.0, 35.0]  # fmt: skip
    over_run = chart_rows(page, "GPU utilisation over the run")
    test = fleet.test_info(test_id)
    start, end = (datetime.fromisoformat(test[k]) for k in ("started_at", "finished_at"))
    beats = [b for b in fleet.heartbeats(NAME) if start < datetime.fromisoformat(b["ts"]) <= end]
    assert len(over_run) == len(beats) >= 1
    assert [number(r[1]) for r in over_run] == [b["gpus"][0]["utilization_pct"] for b in beats]
    memory = chart_rows(page, "GPU memory used over the run")
    assert {number(r[1]) for r in memory} == {12.0}
    expect(page.locator("#telemetry-note")).to_have_text(
        f"GPUs over the run: {len(beats)} heartbeats."
    )

    # Heartbeats after the end are not the run's: once there are some, the page (read
    # again) still charts the run's alone.
    wait_for(lambda: datetime.fromisoformat(fleet.heartbeats(NAME)[-1]["ts"]) > end,
             what="a heartbeat after the test ended")  # fmt: skip
    dashboard.goto(f"/tests/{test_id}")
    assert len(chart_rows(page, "GPU utilisation over the run")) == len(beats)
    expect(page.locator("#telemetry-note")).to_have_text(
        f"GPUs over the run: {len(beats)} heartbeats."
    )

    # The list links to it.
    dashboard.goto("/tests?status=completed")
    link = page.get_by_role("link", name=test_id)
    expect(link).to_be_visible()
    row = page.locator("#tests-table tbody tr", has=link)
    expect(row).to_contain_text("serving")
    expect(row).to_contain_text("completed")
    dashboard.goto("/tests?status=failed")
    expect(page.locator("#no-tests")).to_have_text("No tests with status failed yet.")
    link_back = page.get_by_role("link", name="Run a test").first
    expect(link_back).to_be_visible()


# --- the server side of the charts -------------------------------------------------------


def test_long_runs_are_averaged_down_like_the_agent_page() -> None:
    """Buckets of ceil(n / 720) samples: the last sample's time, the mean of the known
    values (agent.js's rule)."""
    x = [float(i) for i in range(1500)]  # 1500 samples: buckets of 3, 500 points
    values: list[float | None] = [float(i % 3) for i in range(1500)]
    values[3:6] = [None, None, 9.0]
    shown, (averaged,) = average_down(x, [values])
    assert len(shown) == len(averaged) == 500
    assert shown[:3] == [2.0, 5.0, 8.0] and shown[-1] == 1499.0
    assert averaged[:3] == [1.0, 9.0, 1.0]
    # 721 samples: buckets of 2, the last one alone; 720 or fewer: as they are.
    shown, (averaged,) = average_down(x[:721], [values[:721]])
    assert len(shown) == 361 and shown[-1] == 720.0 and averaged[-1] == values[720]
    assert average_down(x[:720], [values[:720]]) == (x[:720], [values[:720]])


def test_chart_specs_leave_out_numbers_json_cannot_carry() -> None:
    """Infinity or NaN in a result document would break the page's JSON.parse: such a
    value is charted as missing."""
    step = {"name": "c1", "load": {"concurrency": 1},
            "metrics": {"ttft_ms": {"p50": float("inf"), "p99": 12.5}, "tpot_ms": {},
                        "output_token_throughput": float("nan")},
            "telemetry": {"gpus": [{"utilization_pct": {"mean": float("inf")},
                                    "power_w": {"mean": 250.0}}]}}  # fmt: skip
    charts = {c["title"]: c for c in result_charts({"steps": [step]})}
    json.dumps(charts, allow_nan=False)  # raises on a non-finite number
    assert charts["Time to first token"]["series"][0]["values"] == [None]
    assert charts["Time to first token"]["series"][1]["values"] == [12.5]
    assert charts["Output throughput"]["series"][0]["values"] == [None]
    assert "GPU utilisation per step (mean)" not in charts  # nothing known to draw
    assert charts["GPU power per step (mean)"]["series"][0]["values"] == [250.0]
