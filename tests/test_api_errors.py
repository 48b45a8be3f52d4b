"""Hostile and broken input on every endpoint: always a 4xx JSON error, never a 5xx."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import Kitt, wait_for

REGISTER = {
    "name": "probe",
    "hostname": "probe-host",
    "port": 8090,
    "kitt_version": "0.1.0",
    "gpu_count": 0,
}
BEAT = {"status": "idle", "uptime_s": 1.0}
TWO_MIB = b"{" + b" " * (2 * 1024 * 1024) + b"}"


@pytest.fixture
def server(kitt: Kitt) -> Iterator[Kitt]:
    kitt.start_server(interval="30")
    yield kitt


def _registered(kitt: Kitt) -> tuple[str, str]:
    """Register "probe" as an agent would (bootstrap token); return its id and own token."""
    response = kitt.api(
        "POST", "/api/v1/agents/register", token=kitt.bootstrap_token(), json=REGISTER
    )
    assert response.status_code == 201, response.text
    return str(response.json()["agent_id"]), str(response.json()["token"])


def _assert_error(response: httpx.Response, status: int, *needles: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and message
    for needle in needles:
        assert needle in message, message
    return message


def _post_raw(kitt: Kitt, path: str, body: bytes, token: str) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    return kitt.api("POST", path, token=token, content=body, headers=headers)


@pytest.mark.parametrize("path", ["/api/v1/agents/register", "/api/v1/agents/{id}/heartbeat"])
def test_malformed_bodies_are_400(server: Kitt, path: str) -> None:
    agent_id, token = _registered(server)
    path = path.format(id=agent_id)
    _assert_error(_post_raw(server, path, b"{not json", token), 400, "valid JSON")
    _assert_error(_post_raw(server, path, b"", token), 400, "valid JSON")
    _assert_error(_post_raw(server, path, b"[1, 2]", token), 400, "JSON object")
    _assert_error(_post_raw(server, path, b'"text"', token), 400, "JSON object")
    _assert_error(_post_raw(server, path, "\udcff".encode("utf-8", "surrogatepass"), token), 400)


def test_register_wrong_types_and_missing_fields_name_the_field(server: Kitt) -> None:
    url = "/api/v1/agents/register"
    _assert_error(server.api("POST", url, json={**REGISTER, "port": "eighty"}), 400, "port")
    _assert_error(server.api("POST", url, json={**REGISTER, "port": 70000}), 400, "port")
    _assert_error(server.api("POST", url, json={**REGISTER, "gpu_count": -1}), 400, "gpu_count")
    _assert_error(server.api("POST", url, json={**REGISTER, "name": "bad name/../x"}), 400, "name")
    missing = {k: v for k, v in REGISTER.items() if k != "hostname"}
    _assert_error(server.api("POST", url, json=missing), 400, "hostname", "Field required")
    _assert_error(server.api("POST", url, json={**REGISTER, "hardware": {"gpus": [{"index": "x"}]}}),
                  400, "hardware.gpus.0.index")  # fmt: skip
    assert server.agents() == []  # nothing half-registered


def test_heartbeat_wrong_types_missing_fields_and_unknown_agent(server: Kitt) -> None:
    agent_id, token = _registered(server)
    url = f"/api/v1/agents/{agent_id}/heartbeat"

    def beat(body: Any, path: str = url) -> httpx.Response:
        return server.api("POST", path, token=token, json=body)

    _assert_error(beat({**BEAT, "status": "sleeping"}), 400, "status")
    _assert_error(beat({"status": "idle"}), 400, "uptime_s")
    _assert_error(beat({**BEAT, "gpus": [{"index": 0, "utilization_pct": 250}]}),
                  400, "gpus.0.utilization_pct")  # fmt: skip
    _assert_error(beat({**BEAT, "gpus": "all"}), 400, "gpus")
    # Another agent's id with this agent's token: refused, not "register again".
    _assert_error(beat(BEAT, "/api/v1/agents/agt_nope/heartbeat"), 403, "belongs to agent 'probe'")
    _assert_error(beat(BEAT, f"/api/v1/agents/{'a' * 65}/heartbeat"), 400, "agent id")
    _assert_error(beat(BEAT, "/api/v1/agents/bad.id!/heartbeat"), 400, "agent id")
    assert server.heartbeats("probe") == []  # no rejected beat was stored
    assert beat(BEAT).status_code == 200


@pytest.mark.parametrize("path", ["/api/v1/agents/register", "/api/v1/agents/{id}/heartbeat"])
def test_oversized_body_is_413_and_server_stays_up(server: Kitt, path: str) -> None:
    agent_id, token = _registered(server)
    path = path.format(id=agent_id)
    _assert_error(_post_raw(server, path, TWO_MIB, token), 413, "too large")
    # curl, a second real client, sends the same body chunked (no Content-Length).
    proc = subprocess.run(
        ["curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json",
         "-H", f"Authorization: Bearer {token}",
         "-H", "Transfer-Encoding: chunked", "--data-binary", "@-",
         "-w", "\n%{http_code}", server.server_url + path],
        input=TWO_MIB, capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    body, _, code = proc.stdout.decode().rpartition("\n")
    assert code == "413", proc.stdout[-300:]
    assert "too large" in json.loads(body)["error"]
    assert server.api("GET", "/api/v1/health").status_code == 200


def test_fleet_endpoints_bad_input(server: Kitt) -> None:
    _registered(server)
    _assert_error(server.api("GET", "/api/v1/agents/nobody"), 404, "nobody")
    _assert_error(server.api("DELETE", "/api/v1/agents/nobody"), 404, "nobody")
    _assert_error(
        server.api("GET", "/api/v1/agents/probe/heartbeats", params={"limit": "x"}), 400, "limit"
    )
    _assert_error(
        server.api("GET", "/api/v1/agents/probe/heartbeats", params={"limit": 0}), 400, "limit"
    )
    _assert_error(server.api("GET", "/api/v1/agents/probe/heartbeats", params={"since": "yesterday"}),
                  400, "since")  # fmt: skip
    _assert_error(server.api("GET", "/api/v1/agents/probe/heartbeats",
                             params={"since": "2026-01-01T00:00:00"}), 400, "time zone")  # fmt: skip
    _assert_error(server.api("GET", "/api/v1/nothing-here"), 404, "no such endpoint")
    _assert_error(server.api("PUT", "/api/v1/agents/register", json=REGISTER), 405, "not allowed")
    _assert_error(server.api("GET", "/api/v1/agents/register"), 404)


def test_delete_agent_removes_it_and_its_history(server: Kitt) -> None:
    agent_id, token = _registered(server)
    url = f"/api/v1/agents/{agent_id}/heartbeat"
    for _ in range(3):
        assert server.api("POST", url, token=token, json=BEAT).status_code == 200
    assert len(server.heartbeats("probe")) == 3
    result = server.run("agents", "remove", "probe", "--yes")
    assert result.returncode == 0 and agent_id in result.stdout
    assert server.agents() == []
    # Its credential went with it: the old token no longer works at all.
    _assert_error(server.api("POST", url, token=token, json=BEAT), 401, "not accepted")
    missing = server.run("agents", "remove", "probe", "--yes")
    assert missing.returncode == 1 and "no agent with id or name 'probe'" in missing.stderr


def test_register_is_idempotent_by_name(server: Kitt) -> None:
    first, token = _registered(server)
    again = server.api(
        "POST", "/api/v1/agents/register", token=token, json={**REGISTER, "port": 9999}
    )
    assert again.status_code == 201 and again.json()["agent_id"] == first
    assert again.json()["token"] is None  # the agent token is handed out once only
    assert again.json()["heartbeat_interval_s"] == 30.0
    agents = server.agents()
    assert len(agents) == 1 and agents[0]["port"] == 9999


def test_agent_api_errors_are_json(kitt: Kitt) -> None:
    kitt.init_agent("solo")  # server never started: the agent API must still answer
    kitt.run("agent", "start", check=True)
    health = httpx.get(kitt.agent_url + "/api/health").json()
    assert health["status"] == "ok"

    def check(response: httpx.Response, status: int) -> Any:
        return _assert_error(response, status)

    check(httpx.get(kitt.agent_url + "/api/nope"), 404)
    check(httpx.post(kitt.agent_url + "/api/status", json={}), 405)
    check(httpx.post(kitt.agent_url + "/api/status", content=TWO_MIB), 405)
    status = wait_for(kitt.agent_status, what="status after bad requests")
    assert status["name"] == "solo" and "token" not in json.dumps(status)


def test_deep_json_and_markup_in_agent_strings_are_harmless(server: Kitt) -> None:
    """Nesting is capped by the JSON parser (400, not a stack overflow), and strings an
    agent controls are printed as text, never as terminal markup."""
    agent_id, token = _registered(server)
    deep = b'{"status": "idle", "uptime_s": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _assert_error(_post_raw(server, f"/api/v1/agents/{agent_id}/heartbeat", deep, token), 400)
    evil = {**REGISTER, "gpu_info": "[red]8x H100[/red] [link=http://x]y[/link]"}
    response = server.api("POST", "/api/v1/agents/register", token=token, json=evil)
    assert response.status_code == 201
    listing = server.run("agents", "list", check=True).stdout
    assert "[red]8x H100[/red]" in listing
    shown = server.run("agents", "show", "probe", check=True).stdout
    assert "[link=http://x]y[/link]" in shown


def test_non_finite_readings_are_stored_as_no_reading(server: Kitt) -> None:
    """Infinity/NaN from a glitching driver (or a forged beat) must not reach the
    database, nor the JSON every dashboard parses: they become null."""
    agent_id, token = _registered(server)
    body = (b'{"status": "idle", "uptime_s": 1.0, "gpu_memory_used_gb": Infinity, '
            b'"gpus": [{"index": 0, "utilization_pct": NaN, "power_w": Infinity, '
            b'"temperature_c": 51.0}]}')  # fmt: skip
    assert _post_raw(server, f"/api/v1/agents/{agent_id}/heartbeat", body, token).status_code == 200
    listed = server.api("GET", "/api/v1/agents")
    assert "Infinity" not in listed.text and "NaN" not in listed.text
    agent = server.agent("probe")
    assert agent["gpu_memory_used_gb"] is None
    assert agent["gpus"][0]["power_w"] is None and agent["gpus"][0]["utilization_pct"] is None
    assert agent["gpus"][0]["temperature_c"] == 51.0  # the good reading is kept
    beats = server.api("GET", "/api/v1/agents/probe/heartbeats")
    assert "Infinity" not in beats.text and "NaN" not in beats.text
    json.loads(beats.text, parse_constant=lambda c: pytest.fail(f"{c} in the history"))
    # A required reading that is not a number is refused, with its name.
    bad = b'{"status": "idle", "uptime_s": Infinity}'
    _assert_error(_post_raw(server, f"/api/v1/agents/{agent_id}/heartbeat", bad, token), 400,
                  "uptime_s")  # fmt: skip
