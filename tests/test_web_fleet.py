"""The fleet and agent pages, and the live fleet stream (SSE) behind them.

Real server and agent processes on loopback (NVML is the stand-in, so GPU readings are
known exactly), Debian's Chromium under Playwright, and httpx-sse for the stream.

Written for a slow, loaded machine: every wait is a deadline (Playwright's expect,
``wait_for``), and where an agent could stall long enough to be called offline for a
moment, the check waits for the state it expects rather than reading it once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import httpx_sse
import pytest
from playwright.sync_api import Locator, expect

from conftest import GIB, H100, Kitt, free_port, two_h100s, wait_for
from dashboard import Dashboard
from kitt import __version__

A100 = "NVIDIA A100-SXM4-40GB"
NONE = "\u2013"  # the dashboard's "no value" (an en dash)


def a100(util: int, mem_gib: int) -> list[dict[str, Any]]:
    return [{"name": A100, "util": util, "mem_total": 40 * GIB, "mem_used": mem_gib * GIB,
             "temp": 50, "power_mw": 200_000}]  # fmt: skip


@pytest.fixture
def box(kitt: Kitt, tmp_path: Path) -> Iterator[Kitt]:
    """A second GPU machine: its own KITT_HOME, agent port and stand-in NVML file, on the
    sandbox's server."""
    home = tmp_path / "box" / "kitt-home"
    home.parent.mkdir()
    other = Kitt(home=home, env={**kitt.env, "KITT_HOME": str(home)},
                 server_port=kitt.server_port, agent_port=free_port())  # fmt: skip
    yield other
    other.cleanup()


def start_agent(kitt: Kitt, name: str, benchmark: str, script: str) -> None:
    kitt.init_agent(name)
    kitt.add_benchmark(benchmark, script, timeout_s=60)
    kitt.run("agent", "start", check=True)


def script_errors(page: Any) -> list[str]:
    """Uncaught errors of the page's scripts and CSP refusals, collected as they happen."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and "Content Security Policy" in msg.text else None)  # fmt: skip
    return errors


def row(page: Any, name: str) -> Locator:
    return page.locator(f'#fleet-table tbody tr[data-name="{name}"]')


def cell(locator: Locator, field: str) -> Locator:
    return locator.locator(f'[data-field="{field}"]')


def chart_rows(page: Any, chart: str) -> Locator:
    return page.locator(f"#chart-{chart} .chart-data tbody tr")


def first_render(kitt: Kitt, board: Dashboard, path: str) -> str:
    """The page as the server renders it (what a browser without JavaScript shows)."""
    cookie = board.cookies()["kitt_session"]["value"]
    answer = httpx.get(kitt.server_url + path, cookies={"kitt_session": cookie}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.text


def hidden_rows(kitt: Kitt, board: Dashboard, path: str) -> dict[str, bool]:
    """Whether the server's first render of ``path`` hides each agent's row, by name
    (the row template the page's JS clones has no name)."""
    tags = re.finditer(
        r'<tr data-id="[^"]*" data-name="([^"]+)"[^>]*>', first_render(kitt, board, path)
    )
    return {tag.group(1): " hidden" in tag.group(0) for tag in tags}


def test_fleet_page_rows_live_filters_and_offline(
    kitt: Kitt, box: Kitt, dashboard: Dashboard
) -> None:
    kitt.fake_gpus(two_h100s())
    kitt.start_server(interval="1")  # heartbeats every second: offline after 3 s of silence
    start_agent(kitt, "gpu-01", "hold", "hold.py")
    wait_for(lambda: kitt.agent("gpu-01").get("gpu_utilization_pct") == 60.0, timeout=60,
             what="GPU beat")  # fmt: skip
    page = dashboard.page
    errors = script_errors(page)
    dashboard.login()
    expect(page.locator("#live")).to_have_text("live")
    first = row(page, "gpu-01")
    expect(cell(first, "gpus")).to_have_text(f"2x {H100}")
    expect(cell(first, "state")).to_have_text("online · idle")
    expect(cell(first, "revoked")).to_be_hidden()
    expect(cell(first, "util")).to_have_text("60 %")  # the mean of 35 and 85
    expect(cell(first, "memory")).to_have_text("40.0 GB")  # 10 + 30
    expect(cell(first, "name")).to_have_attribute("href", "/fleet/gpu-01")
    expect(cell(first, "seen").locator("time")).to_have_text(re.compile(r"^\d+ s ago$"))

    # A test runs: the row names it (a link to its page) until it ends.
    release = kitt.home.parent / "release"
    test = kitt.submit("hold", RELEASE=str(release), PIDS=str(kitt.home.parent / "pids.json"))
    expect(cell(first, "state")).to_have_text("online · running")
    expect(cell(first, "task").locator("a")).to_have_text(test["id"])
    expect(cell(first, "task").locator("a")).to_have_attribute("href", f"/tests/{test['id']}")
    release.touch()
    expect(cell(first, "state")).to_have_text("online · idle")
    expect(cell(first, "task")).to_have_text(NONE)

    # A new machine joins while the page is open: its row appears, then follows its GPUs.
    box.fake_gpus(a100(util=20, mem_gib=5))
    box.run("agent", "init", "--server", kitt.server_url, "--name", "gpu-02", "--port",
            str(box.agent_port), "--bind", "127.0.0.1", "--token", kitt.bootstrap_token(),
            check=True)  # fmt: skip
    box.run("agent", "start", check=True)
    second = row(page, "gpu-02")
    expect(cell(second, "gpus")).to_have_text(f"1x {A100}")
    expect(cell(second, "util")).to_have_text("20 %")
    expect(cell(second, "memory")).to_have_text("5.0 GB")
    expect(page.locator("#fleet-table tbody tr")).to_have_count(2)
    assert page.locator("#fleet-table tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.name)"
    ) == ["gpu-01", "gpu-02"]
    box.fake_gpus(a100(util=90, mem_gib=32))
    expect(cell(second, "util")).to_have_text("90 %")
    expect(cell(second, "memory")).to_have_text("32.0 GB")
    expect(page.locator("#gpu-models option")).to_have_count(2)

    # Filters hide rows in place and go into the URL.
    gpu, status = page.get_by_label("GPU", exact=True), page.get_by_label("Status", exact=True)
    gpu.fill("a100")
    expect(first).to_be_hidden()
    expect(second).to_be_visible()
    expect(page).to_have_url(re.compile(r"/fleet\?gpu=a100$"))
    expect(page.locator("#fleet-count")).to_have_text("Showing 1 of 2 agents")
    gpu.fill("")
    status.select_option("offline")
    expect(page).to_have_url(re.compile(r"/fleet\?status=offline$"))
    expect(first).to_be_hidden()
    expect(second).to_be_hidden()
    expect(page.locator("#fleet-no-match")).to_be_visible()

    # The machine dies without a word (SIGKILL): the reaper calls it offline, and the
    # filtered view shows it as soon as it matches.
    pid = box.pid_of("agent")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    expect(second).to_be_visible()
    expect(cell(second, "state")).to_have_text("offline")
    expect(first).to_be_hidden()
    expect(page.locator("#fleet-no-match")).to_be_hidden()

    # The server applies a shared filter on first render; an unknown status is said so.
    # (gpu-01 is online unless this machine stalled it past its allowance: then ask again.)
    wait_for(lambda: hidden_rows(kitt, dashboard, "/fleet?status=offline")
             == {"gpu-01": True, "gpu-02": False}, what="gpu-02 alone offline")  # fmt: skip
    assert hidden_rows(kitt, dashboard, "/fleet?gpu=H100") == {"gpu-01": False, "gpu-02": True}
    html = first_render(kitt, dashboard, "/fleet?status=bogus")
    assert "Unknown status &#39;bogus&#39;: showing agents in any state." in html
    assert 'aria-invalid="true" aria-describedby="filter-status-error"' in html
    assert hidden_rows(kitt, dashboard, "/fleet?status=bogus") == {"gpu-01": False, "gpu-02": False}

    status.select_option("")
    expect(page).to_have_url(re.compile(r"/fleet$"))
    expect(page.locator("#fleet-count")).to_have_text("Showing 2 of 2 agents")
    dashboard.shot("fleet")

    missing = dashboard.goto("/fleet/no-such-agent")
    assert missing.status == 404
    expect(page.locator("main")).to_contain_text("No agent with id or name 'no-such-agent'")
    assert errors == []


def test_agent_page_facts_history_live_and_actions(kitt: Kitt, dashboard: Dashboard) -> None:
    kitt.fake_gpus(two_h100s(), driver="550.54.15", cuda=12040)
    kitt.start_server(interval="1")
    start_agent(kitt, "gpu-01", "lines", "lines_and_result.py")
    done = kitt.wait_status(kitt.submit("lines")["id"], "completed", timeout=60)
    agent_id = kitt.agent("gpu-01")["id"]
    page = dashboard.page
    errors = script_errors(page)
    dashboard.login()
    cell(row(page, "gpu-01"), "name").click()
    expect(page).to_have_url(re.compile(r"/fleet/gpu-01$"))
    expect(page.locator("#live")).to_have_text("live")

    facts = page.locator("#agent-facts")
    for fact in (socket.gethostname(), f"127.0.0.1:{kitt.agent_port}", __version__,
                 "550.54.15", "12.4", f"2x {H100}", "serving"):  # fmt: skip
        expect(facts).to_contain_text(fact)
    expect(page.locator("#agent-gpus tbody tr")).to_have_count(2)
    expect(page.locator("#agent-gpus tbody tr").first).to_contain_text(f"{H100}80.0 GB")
    expect(page.locator("#agent-state")).to_have_text("online · idle")
    expect(page.locator("#agent-revoked")).to_be_hidden()
    expect(page.locator("#agent-actions a")).to_have_attribute("href", "/tests/new?agent=gpu-01")
    recent = page.locator("#agent-tests tbody tr")
    expect(recent).to_have_count(1)
    expect(recent.locator("th a")).to_have_attribute("href", f"/tests/{done['id']}")
    expect(recent.locator("th, td").nth(0)).to_have_text(done["id"])
    expect(recent.locator("td").nth(0)).to_have_text("lines")
    expect(recent.locator("td").nth(1)).to_have_text(NONE)  # no model
    expect(recent.locator("td").nth(2)).to_have_text("completed")

    # The charts' data tables hold exactly what the stand-in NVML reported, per GPU.
    expect(page.locator("#chart-util .chart-data thead th")).to_have_text(
        ["Time", "GPU 0", "GPU 1"]
    )
    for chart, values in (("util", ["35.0", "85.0"]), ("memory", ["10.0", "30.0"]),
                          ("temperature", ["41.0", "67.0"]), ("power", ["120.5", NONE])):  # fmt: skip
        expect(chart_rows(page, chart).first.locator("td")).to_have_text(values)
    # New readings arrive with the next heartbeats, without a reload.
    kitt.fake_gpus(two_h100s(util0=5, util1=95), driver="550.54.15", cuda=12040)
    expect(chart_rows(page, "util").last.locator("td")).to_have_text(["5.0", "95.0"])
    beats = len(kitt.heartbeats("gpu-01"))
    expect(page.locator("#history-note")).to_have_text(
        re.compile(r"^\d+ heartbeats in the last hour")
    )
    page.get_by_label("Last day").check()
    expect(page.locator("#history-note")).to_have_text(
        re.compile(r"^\d+ heartbeats in the last day")
    )
    expect(chart_rows(page, "util").first.locator("td")).to_have_text(["35.0", "85.0"])
    expect(chart_rows(page, "util").last.locator("td")).to_have_text(["5.0", "95.0"])
    assert chart_rows(page, "util").count() >= beats
    dashboard.shot("agent")

    actions = page.locator("#agent-actions")
    revoke, remove = page.locator("#revoke-dialog"), page.locator("#remove-dialog")
    # Revoke asks first; Cancel changes nothing.
    actions.get_by_role("button", name="Revoke…").click()
    expect(revoke).to_be_visible()
    revoke.get_by_role("button", name="Cancel").click()
    expect(revoke).to_be_hidden()
    assert kitt.agent("gpu-01")["revoked"] is False
    actions.get_by_role("button", name="Revoke…").click()
    with page.expect_request(lambda r: r.method == "POST" and "/agents/" in r.url) as sent:
        revoke.get_by_role("button", name="Revoke").click()
    # By id, never by name: a page left open must not act on a newer agent of that name.
    assert urlparse(sent.value.url).path == f"/api/v1/agents/{agent_id}/revoke"
    expect(page.locator("#flash")).to_have_text(
        "Credential of gpu-01 revoked: it can no longer heartbeat or report."
    )
    assert kitt.agent("gpu-01")["revoked"] is True
    expect(page.locator("#agent-revoked")).to_be_visible()
    # Refused from now on, the agent falls silent and the page shows it offline.
    expect(page.locator("#agent-state")).to_have_text("offline")
    # A refusal shows the server's own message.
    actions.get_by_role("button", name="Revoke…").click()
    revoke.get_by_role("button", name="Revoke").click()
    expect(page.locator("#flash .error")).to_have_text(
        f"no agent '{agent_id}' with a live credential"
    )

    actions.get_by_role("button", name="Remove…").click()
    remove.get_by_role("button", name="Cancel").click()
    expect(remove).to_be_hidden()
    assert kitt.agent("gpu-01")["name"] == "gpu-01"
    actions.get_by_role("button", name="Remove…").click()
    with page.expect_request(lambda r: r.method == "DELETE" and "/agents/" in r.url) as sent:
        remove.get_by_role("button", name="Remove").click()
    assert urlparse(sent.value.url).path == f"/api/v1/agents/{agent_id}"
    expect(page.locator("#flash")).to_have_text("Agent gpu-01 removed.")
    assert kitt.api("GET", "/api/v1/agents/gpu-01").status_code == 404
    expect(page.locator("#agent-state")).to_have_text("removed")
    expect(actions.get_by_role("button", name="Remove…")).to_be_disabled()
    assert errors == []


def next_event(events: Iterator[httpx_sse.ServerSentEvent]) -> tuple[str, Any]:
    for event in events:
        if event.data:
            return event.event, json.loads(event.data)
    pytest.fail("the stream ended")


def test_fleet_stream_needs_the_admin_and_sends_changes_only(kitt: Kitt) -> None:
    # Agents are told to beat every minute: the agent below, which beats only when the
    # test says, is not called offline (an event out of turn) however slow this machine.
    kitt.start_server(interval="60")
    url = kitt.server_url + "/api/v1/fleet/events"
    for headers in ({}, {"Authorization": "Bearer kitt_adm_wrong"}):
        refused = httpx.get(url, headers=headers, timeout=10)
        assert refused.status_code == 401 and "admin token" in refused.json()["error"]
    # An agent that exists only through the API: its heartbeats are ours to write.
    register = {"name": "api-01", "hostname": "h1", "port": 9, "kitt_version": "0",
                "gpu_info": f"1x {A100}", "gpu_count": 1}  # fmt: skip
    answer = kitt.api("POST", "/api/v1/agents/register", token=kitt.bootstrap_token(),
                      json=register)  # fmt: skip
    assert answer.status_code == 201, answer.text
    agent_id, agent_token = answer.json()["agent_id"], answer.json()["token"]

    def beat(pct: float) -> None:
        body = {"status": "running", "current_task": "tst_0123456789abcdef0123", "uptime_s": 5,
                "gpu_utilization_pct": pct, "gpu_memory_used_gb": 7.25}  # fmt: skip
        sent = kitt.api("POST", f"/api/v1/agents/{agent_id}/heartbeat", token=agent_token,
                        json=body)  # fmt: skip
        assert sent.status_code == 200, sent.text

    admin = {"Authorization": f"Bearer {kitt.admin_token}"}
    with httpx.Client(timeout=httpx.Timeout(10, read=20)) as client, \
            httpx_sse.connect_sse(client, "GET", url, headers=admin) as source:  # fmt: skip
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = source.iter_sse()
        name, data = next_event(events)
        assert name == "snapshot"
        assert data == {"agents": kitt.agents()}  # the very dicts GET /api/v1/agents lists
        assert [a["name"] for a in data["agents"]] == ["api-01"]

        beat(42.5)
        name, data = next_event(events)
        assert name == "agent"
        assert (data["id"], data["state"], data["current_task"]) == (
            agent_id, "running", "tst_0123456789abcdef0123")  # fmt: skip
        assert (data["gpu_utilization_pct"], data["gpu_memory_used_gb"]) == (42.5, 7.25)

        # A burst of heartbeats is read in coalesced passes (fewer events than beats, unless
        # every beat took longer than the stream's coalescing window), the newest one last.
        for pct in range(1, 21):
            beat(float(pct))
        seen = []
        while not seen or seen[-1] != 20.0:
            name, data = next_event(events)
            assert name == "agent"
            seen.append(data["gpu_utilization_pct"])
        assert len(seen) < 20 and seen == sorted(seen), seen

        assert kitt.api("DELETE", "/api/v1/agents/api-01").status_code == 200
        assert next_event(events) == ("removed", {"id": agent_id, "name": "api-01"})

        # The server stopping ends the stream (its thread is not held until a timeout).
        kitt.run("server", "stop", check=True)
        assert [e for e in events if e.data] == []
