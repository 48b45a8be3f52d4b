"""``GET /metrics`` on a real server, with real agents: the values follow the fleet.

Each scrape is parsed with the official client's own parser, so the format is checked
along with the numbers; the Grafana dashboard's queries are checked against a real scrape.
"""

from __future__ import annotations

import json
import os
import re
import signal
from datetime import datetime
from pathlib import Path

import httpx
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from conftest import Kitt, wait_for
from kitt import __version__

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana" / "kitt-fleet.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(kitt: Kitt) -> Samples:
    response = kitt.api("GET", "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def agents(samples: Samples) -> dict[str, float]:
    found = {state: value(samples, "kitt_agents", state=state)
             for state in ("idle", "running", "error", "offline")}  # fmt: skip
    found["online"] = value(samples, "kitt_agents_online")
    found["registered"] = value(samples, "kitt_agents_registered")
    return found


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def by_status(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["status"]: v for (name, labels), v in samples.items() if name == "kitt_tests"
    }


def test_metrics_follow_agents_tests_and_heartbeats(kitt: Kitt) -> None:
    kitt.start_server("--lost-after", "2")
    empty = scrape(kitt)
    assert value(empty, "kitt_build_info", version=__version__) == 1
    assert agents(empty) == dict.fromkeys(
        ("idle", "running", "error", "offline", "online", "registered"), 0
    )
    assert set(by_status(empty).values()) == {0}
    assert len(by_status(empty)) == 7  # every status, zeros included
    assert value(empty, "kitt_heartbeats_total") == 0
    assert value(empty, "kitt_dispatch_latency_seconds_count") == 0

    kitt.init_agent("gpu-01")
    kitt.add_benchmark("lines", "lines_and_result.py", timeout_s=60)
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("gpu-01").get("status") == "idle", what="agent idle")
    registered = scrape(kitt)
    assert agents(registered) == {"idle": 1, "running": 0, "error": 0, "offline": 0,
                                  "online": 1, "registered": 1}  # fmt: skip
    # The counter is this process's count of accepted heartbeats: it moves with them.
    first = value(registered, "kitt_heartbeats_total")
    assert first >= 1
    wait_for(lambda: value(scrape(kitt), "kitt_heartbeats_total") >= first + 2,
             what="two more heartbeats counted")  # fmt: skip

    # Two tests back to back (the second queues behind the first), and one that fails.
    ok = [kitt.submit("lines", lines=3), kitt.submit("lines", lines=4)]
    for test in ok:
        kitt.wait_status(test["id"], "completed")
    bad = kitt.submit("lines", lines=1, EXIT=3)
    kitt.wait_status(bad["id"], "failed")
    done = scrape(kitt)
    assert by_status(done) == {"queued": 0, "dispatched": 0, "running": 0,
                                     "completed": 2, "failed": 1, "cancelled": 0, "lost": 0}  # fmt: skip
    assert value(done, "kitt_results_total", status="completed") == 2
    assert value(done, "kitt_results_total", status="failed") == 1
    assert value(done, "kitt_dispatch_latency_seconds_count") == 3
    assert value(done, "kitt_dispatch_latency_seconds_bucket", le="+Inf") == 3
    # Every test waited a little; the second also waited for the first to finish, and
    # the histogram's sum is at least that wait.
    first_test, second_test = (kitt.test_info(t["id"]) for t in ok)
    queued_behind = _seconds(second_test["dispatched_at"]) - _seconds(first_test["finished_at"])
    assert queued_behind >= 0
    waited_second = _seconds(second_test["dispatched_at"]) - _seconds(second_test["created_at"])
    assert waited_second <= value(done, "kitt_dispatch_latency_seconds_sum") < 60
    # Each test's log: its numbered lines and one line on stderr.
    assert value(done, "kitt_log_lines_total") == (3 + 1) + (4 + 1) + (1 + 1)

    pid = kitt.pid_of("agent")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    gone = wait_for(
        lambda: (s := scrape(kitt)) and value(s, "kitt_agents_online") == 0 and s,
        what="the reaper to mark the agent offline",
    )
    assert agents(gone) == {"idle": 0, "running": 0, "error": 0, "offline": 1,
                            "online": 0, "registered": 1}  # fmt: skip


def test_push_blocked_dispatch_through_heartbeat_is_timed_once(kitt: Kitt) -> None:
    kitt.start_server()
    kitt.init_agent("natted", "--bind", "127.0.0.2")  # the server pushes to 127.0.0.1: refused
    kitt.add_benchmark("lines", "lines_and_result.py")
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("natted"), what="registration")
    test = kitt.submit("lines", agent="natted", lines=2)
    kitt.wait_status(test["id"], "completed")
    samples = scrape(kitt)
    assert value(samples, "kitt_dispatch_latency_seconds_count") == 1
    assert value(samples, "kitt_dispatch_latency_seconds_sum") > 0
    assert value(samples, "kitt_tests", status="completed") == 1


def test_metrics_need_the_admin_token(kitt: Kitt) -> None:
    kitt.start_server()
    for token in (None, "kitt_adm_wrong"):
        refused = kitt.api("GET", "/metrics", token=token)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Bearer realm="kitt"'
        assert "admin token" in refused.json()["error"]
    # A scraper asking for OpenMetrics gets it, ended by "# EOF".
    open_metrics = kitt.api(
        "GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(open_metrics.text)}
    assert families["kitt_heartbeats"].type == "counter"
    assert families["kitt_agents_registered"].samples[0].value == 0


def test_no_auth_server_serves_metrics_to_loopback(kitt: Kitt) -> None:
    kitt.start_server("--no-auth")
    assert kitt.admin_token == ""
    answer = httpx.get(kitt.server_url + "/metrics", timeout=10)
    assert answer.status_code == 200
    assert value(scrape(kitt), "kitt_agents_online") == 0
    # Not to a page of another site that points its own name at 127.0.0.1.
    rebound = httpx.get(kitt.server_url + "/metrics", headers={"Host": "evil.example"})
    assert rebound.status_code == 403 and "loopback" in rebound.json()["error"]


def test_grafana_dashboard_queries_only_served_metrics(kitt: Kitt) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("online", "offline", "tests", "heartbeats", "dispatch latency", "log lines"):
        assert topic in titles
    assert any("histogram_quantile(0.99" in e for e in exprs)
    used = {m for e in exprs for m in re.findall(r"\b(?:kitt|process)_[a-z0-9_]+", e)}
    assert "kitt_dispatch_latency_seconds_bucket" in used
    kitt.start_server()
    served = {name for name, _labels in scrape(kitt)}
    assert used <= served, f"queried but never served: {sorted(used - served)}"
    variable = dashboard["templating"]["list"][0]
    assert re.findall(r"\bkitt_[a-z_]+", variable["definition"])[0] in served
