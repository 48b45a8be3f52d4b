"""Tests dispatched to real agents: run, result, busy, cancel, heartbeat delivery, failures."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from conftest import Kitt, wait_for


@pytest.fixture
def fleet(kitt: Kitt) -> Kitt:
    """A server and one agent offering the test benchmarks, registered and idle."""
    kitt.start_server("--lost-after", "2")
    kitt.init_agent("gpu-01")
    kitt.add_benchmark("lines", "lines_and_result.py", timeout_s=60)
    kitt.add_benchmark("hold", "hold.py", timeout_s=120)
    kitt.add_benchmark("slow", "hold.py", timeout_s=1)
    kitt.add_benchmark("spew", "spew.py", timeout_s=60)
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("gpu-01").get("status") == "idle", what="agent idle")
    return kitt


def hold_params(kitt: Kitt, tag: str) -> tuple[dict[str, Any], Path, Path]:
    release = kitt.home.parent / f"release-{tag}"
    pids = kitt.home.parent / f"pids-{tag}.json"
    return {"RELEASE": str(release), "PIDS": str(pids)}, release, pids


def job_dir(kitt: Kitt, test: dict[str, Any]) -> Path:
    return kitt.home / "jobs" / test["command_id"]


def test_custom_benchmark_runs_and_its_result_is_stored(fleet: Kitt) -> None:
    agent = fleet.agent("gpu-01")
    assert agent["capabilities"] == ["hold", "lines", "serving", "slow", "spew"]
    result = fleet.run("test", "run", "--agent", "gpu-01", "--benchmark", "lines",
                       "--param", "lines=7", "--param", "label=h100 run", "--follow")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    test_id = result.stdout.split()[1]
    test = fleet.test_info(test_id)
    assert test["status"] == "completed" and test["error"] is None
    assert test["result"] == {
        "lines": 7,
        "params": {"lines": 7, "label": "h100 run"},
        "model": None,
    }
    assert test["created_at"] <= test["dispatched_at"] <= test["started_at"] <= test["finished_at"]
    text = fleet.api("GET", f"/api/v1/tests/{test_id}/logs", params={"format": "text"}).text
    assert text.splitlines() == [f"line {i}" for i in range(7)] + ["to stderr"]
    on_agent = [
        json.loads(x) for x in (job_dir(fleet, test) / "log.jsonl").read_text().splitlines()
    ]
    assert [x["seq"] for x in on_agent] == list(range(1, 9))
    shown = fleet.run("test", "show", test_id)
    assert "completed" in shown.stdout and '"lines": 7' in shown.stdout
    listed = fleet.run("test", "list", "--status", "completed")
    assert test_id in listed.stdout
    assert not list((fleet.home / "spool").glob("*.json"))  # every report acknowledged


def test_failing_benchmark_and_timeout_end_failed(fleet: Kitt) -> None:
    failed = fleet.submit("lines", EXIT=3)
    done = fleet.wait_status(failed["id"], "failed")
    assert done["error"] == "benchmark exited with status 3"
    params, _release, _pids = hold_params(fleet, "slow")
    slow = fleet.submit("slow", **params)
    done = fleet.wait_status(slow["id"], "failed")
    assert done["error"] == "timed out after 1 s"


def test_running_state_busy_agent_and_queued_follow_up(fleet: Kitt) -> None:
    params, release, _pids = hold_params(fleet, "busy")
    first = fleet.submit("hold", **params)
    fleet.wait_status(first["id"], "running")
    wait_for(lambda: (a := fleet.agent("gpu-01"))["status"] == "running"
             and a["current_task"] == first["id"], what="heartbeat showing the running test")  # fmt: skip
    status = fleet.agent_status()
    assert status["status"] == "running" and status["current_task"] == first["id"]

    # The agent itself refuses a second run_test while busy, naming the running test.
    direct = httpx.post(fleet.agent_url + "/api/commands", headers=fleet.as_server(), json={
        "command_id": "cmd_direct", "type": "run_test", "test_id": "tst_direct",
        "payload": {"benchmark": "lines"}})  # fmt: skip
    assert direct.status_code == 409 and first["id"] in direct.json()["error"]

    # The server keeps a second test queued and dispatches it once the agent is idle.
    second = fleet.submit("lines")
    assert fleet.test_info(second["id"])["status"] == "queued"
    release.touch()
    assert fleet.wait_status(first["id"], "completed")["result"] == {"released": True}
    fleet.wait_status(second["id"], "completed")


def test_cancel_kills_the_whole_process_group(fleet: Kitt) -> None:
    params, _release, pids_file = hold_params(fleet, "cancel")
    test = fleet.submit("hold", **params)
    fleet.wait_status(test["id"], "running")
    pids = wait_for(lambda: pids_file.exists() and json.loads(pids_file.read_text()), what="pids")
    assert all(psutil.pid_exists(p) for p in pids.values())
    result = fleet.run("test", "cancel", test["id"])
    assert result.returncode == 0 and "cancel requested" in result.stdout
    done = fleet.wait_status(test["id"], "cancelled")
    assert done["error"] == "cancelled by request"

    wait_for(lambda: all(_gone(p) for p in pids.values()), timeout=15, what="grandchild killed too")
    again = fleet.run("test", "cancel", test["id"])
    assert again.returncode == 1 and "has already ended (cancelled)" in again.stderr


def test_cancelling_a_queued_test_never_dispatches_it(fleet: Kitt) -> None:
    params, release, _pids = hold_params(fleet, "q")
    first = fleet.submit("hold", **params)
    fleet.wait_status(first["id"], "running")
    queued = fleet.submit("lines")
    cancelled = fleet.api("POST", f"/api/v1/tests/{queued['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    release.touch()
    fleet.wait_status(first["id"], "completed")
    # Another test afterwards runs, proving the agent is idle and was never sent the cancelled one.
    after = fleet.submit("lines")
    fleet.wait_status(after["id"], "completed")
    assert not job_dir(fleet, queued).exists()
    assert fleet.test_info(queued["id"])["dispatched_at"] is None


def test_submit_errors_are_clear(fleet: Kitt) -> None:
    def post(body: dict[str, Any]) -> httpx.Response:
        return fleet.api("POST", "/api/v1/tests", json=body)

    r = post({"agent": "nobody", "benchmark": "lines"})
    assert r.status_code == 404 and "nobody" in r.json()["error"]
    r = post({"agent": "gpu-01", "benchmark": "nope"})
    assert (
        r.status_code == 400 and "it offers: hold, lines, serving, slow, spew" in r.json()["error"]
    )
    r = post({"agent": "any", "benchmark": "lines", "gpu": "B200"})
    assert r.status_code == 409 and "B200" in r.json()["error"]
    r = post({"agent": "gpu-01", "benchmark": "bad name!"})
    assert r.status_code == 400 and "benchmark" in r.json()["error"]
    r = post({"agent": "gpu-01", "benchmark": "lines", "params": {"x": [1, 2]}})
    assert r.status_code == 400 and "params.x" in r.json()["error"]
    assert fleet.api("GET", "/api/v1/tests").json()["tests"] == []
    cli = fleet.run("test", "run", "--agent", "gpu-01", "--benchmark", "nope")
    assert cli.returncode == 1 and "has no benchmark 'nope'" in cli.stderr
    ok = post({"agent": "any", "benchmark": "lines"})
    assert ok.status_code == 202 and ok.json()["agent_name"] == "gpu-01"


def test_agent_command_endpoint_rejects_bad_commands(fleet: Kitt) -> None:
    url = fleet.agent_url + "/api/commands"
    base = {
        "command_id": "cmd_x1",
        "type": "run_test",
        "test_id": "tst_x1",
        "payload": {"benchmark": "lines"},
    }

    def err(body: Any, status: int, needle: str) -> None:
        r = httpx.post(url, json=body, headers=fleet.as_server())
        assert r.status_code == status, r.text
        assert needle in r.json()["error"]

    err({**base, "type": "reboot"}, 400, "type")
    err({k: v for k, v in base.items() if k != "test_id"}, 400, "test_id")
    err({**base, "command_id": "bad id with spaces"}, 400, "command_id")
    err({**base, "payload": {"benchmark": "unknown"}}, 400, "unknown benchmark 'unknown'")
    err({**base, "payload": {}}, 400, "benchmark")
    err({**base, "type": "cancel", "test_id": "tst_none"}, 404, "not running on this agent")
    err("[]", 400, "JSON object")
    # The same command twice: accepted both times, run once.
    assert httpx.post(url, json=base, headers=fleet.as_server()).status_code == 202
    assert httpx.post(url, json=base, headers=fleet.as_server()).status_code == 202
    wait_for(lambda: (fleet.home / "jobs" / "cmd_x1" / "state.json").exists()
             and json.loads((fleet.home / "jobs" / "cmd_x1" / "state.json").read_text())["status"] != "running",
             what="direct job finished")  # fmt: skip
    assert len(list((fleet.home / "jobs").iterdir())) == 1


def test_agent_reports_are_checked_by_the_server(fleet: Kitt) -> None:
    test = fleet.submit("lines")
    done = fleet.wait_status(test["id"], "completed")
    agent_id = fleet.agent("gpu-01")["id"]
    token = fleet.agent_config()["token"]
    intruder = fleet.api("POST", "/api/v1/agents/register", token=fleet.bootstrap_token(), json={
        "name": "intruder", "hostname": "h", "port": 1, "kitt_version": "x"}).json()  # fmt: skip
    other = intruder["agent_id"]
    body = {
        "command_id": test["command_id"],
        "test_id": test["id"],
        "status": "failed",
        "result": None,
    }
    r = fleet.api("POST", f"/api/v1/agents/{other}/results", token=intruder["token"], json=body)
    assert r.status_code == 403 and "does not belong" in r.json()["error"]
    # Nor can it speak as gpu-01 with its own token.
    r = fleet.api("POST", f"/api/v1/agents/{agent_id}/results", token=intruder["token"], json=body)
    assert r.status_code == 403 and "belongs to agent 'intruder'" in r.json()["error"]
    r = fleet.api(
        "POST",
        f"/api/v1/agents/{agent_id}/results",
        token=token,
        json={**body, "test_id": "tst_missing"},
    )
    assert r.status_code == 404
    r = fleet.api(
        "POST",
        f"/api/v1/agents/{agent_id}/results",
        token=token,
        json={**body, "command_id": "cmd_other"},
    )
    assert r.status_code == 400 and "not the command" in r.json()["error"]
    r = fleet.api("POST", f"/api/v1/agents/{agent_id}/results", token=token, json=body)
    assert r.status_code == 409 and "is completed; it cannot become failed" in r.json()["error"]
    r = fleet.api("POST", f"/api/v1/agents/{agent_id}/tests/{test['id']}/status", token=token,
                  json={"status": "running"})  # fmt: skip
    assert r.status_code == 409
    # A repeat of what already happened is acknowledged (at-least-once delivery).
    repeat = {**body, "status": "completed", "result": done["result"]}
    r = fleet.api("POST", f"/api/v1/agents/{agent_id}/results", token=token, json=repeat)
    assert r.status_code == 202 and r.json()["changed"] is False
    assert fleet.test_info(test["id"])["status"] == "completed"


def test_push_blocked_delivers_through_heartbeat(kitt: Kitt) -> None:
    kitt.start_server()
    kitt.init_agent("natted", "--bind", "127.0.0.2")  # the server pushes to 127.0.0.1: refused
    kitt.add_benchmark("lines", "lines_and_result.py")
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("natted"), what="registration")
    test = kitt.submit("lines", agent="natted")
    done = kitt.wait_status(test["id"], "completed")
    assert done["result"]["lines"] == 5
    assert "via heartbeat" in (kitt.home / "server" / "server.log").read_text()


def test_result_survives_server_outage(fleet: Kitt) -> None:
    params, release, _pids = hold_params(fleet, "outage")
    test = fleet.submit("hold", **params)
    fleet.wait_status(test["id"], "running")
    fleet.run("server", "stop", check=True)
    release.touch()
    wait_for(lambda: list((fleet.home / "spool").glob("*-result.json")), what="result spooled")
    fleet.start_server("--lost-after", "2")
    done = fleet.wait_status(test["id"], "completed")
    assert done["result"] == {"released": True}
    wait_for(lambda: not list((fleet.home / "spool").glob("*.json")), what="spool drained")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_agent_killed_mid_test_is_lost_then_reported_failed_on_restart(fleet: Kitt) -> None:
    params, _release, pids_file = hold_params(fleet, "kill9")
    test = fleet.submit("hold", **params)
    fleet.wait_status(test["id"], "running")
    pids = wait_for(lambda: pids_file.exists() and json.loads(pids_file.read_text()), what="pids")
    pid = fleet.pid_of("agent")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    lost = fleet.wait_status(test["id"], "lost", timeout=20)
    assert "sent no heartbeat for over 2 s" in lost["error"]
    assert not any(_gone(p) for p in pids.values())  # the benchmark outlived its agent
    fleet.run("agent", "start", check=True)
    failed = fleet.wait_status(test["id"], "failed")
    assert "agent restarted while the test was running" in failed["error"]
    # The restarted agent ended the orphaned benchmark and its child.
    wait_for(lambda: all(_gone(p) for p in pids.values()), what="orphaned benchmark killed")
    assert fleet.agent("gpu-01")["status"] == "idle"


def test_removing_an_agent_closes_its_open_tests(fleet: Kitt) -> None:
    params, release, _pids = hold_params(fleet, "rm")
    running = fleet.submit("hold", **params)
    fleet.wait_status(running["id"], "running")
    queued = fleet.submit("lines")
    removed = fleet.run("agents", "remove", "gpu-01", "--yes")
    assert removed.returncode == 0
    assert fleet.test_info(running["id"])["status"] == "lost"
    assert fleet.test_info(queued["id"])["status"] == "cancelled"
    assert fleet.test_info(queued["id"])["error"] == "its agent was removed"
    release.touch()


def test_cli_rejects_bad_parameters_without_a_traceback(fleet: Kitt) -> None:
    bad_key = fleet.run(
        "test", "run", "--agent", "gpu-01", "--benchmark", "lines", "--param", "9bad=1"
    )
    assert bad_key.returncode == 2 and "params.9bad" in bad_key.stderr
    bad_name = fleet.run("test", "run", "--agent", "gpu-01", "--benchmark", "no/slash")
    assert bad_name.returncode == 2 and "benchmark" in bad_name.stderr
    no_eq = fleet.run(
        "test", "run", "--agent", "gpu-01", "--benchmark", "lines", "--param", "novalue"
    )
    assert no_eq.returncode == 2 and "KEY=VALUE" in no_eq.stderr
    for result in (bad_key, bad_name, no_eq):
        assert "Traceback" not in result.stderr
    nan = fleet.run("test", "run", "--agent", "gpu-01", "--benchmark", "lines", "--param", "x=NaN",
                    "--json")  # fmt: skip
    assert json.loads(nan.stdout)["params"] == {"x": "NaN"}


def test_agent_stop_cancels_the_running_test_and_reports_it(fleet: Kitt) -> None:
    params, _release, _pids = hold_params(fleet, "stop")
    test = fleet.submit("hold", **params)
    fleet.wait_status(test["id"], "running")
    t0 = time.monotonic()
    stopped = fleet.run("agent", "stop")
    assert stopped.returncode == 0 and time.monotonic() - t0 < 20
    done = fleet.wait_status(test["id"], "cancelled")
    assert done["error"] == "cancelled: the agent was stopped"
    text = fleet.api("GET", f"/api/v1/tests/{test['id']}/logs", params={"format": "text"}).text
    assert text.splitlines() == ["holding"]  # its log was shipped before the agent exited


def test_agent_stop_drain_lets_the_test_finish_and_takes_no_new_one(fleet: Kitt) -> None:
    params, release, _pids = hold_params(fleet, "drain")
    test = fleet.submit("hold", **params)
    fleet.wait_status(test["id"], "running")
    stopper = fleet.popen("agent", "stop", "--drain")
    wait_for(lambda: "shutting down after running work finishes" in (fleet.home / "agent.log").read_text(),
             what="agent draining")  # fmt: skip
    follow_up = fleet.submit("lines")
    refused = httpx.post(fleet.agent_url + "/api/commands", headers=fleet.as_server(), json={
        "command_id": "cmd_late", "type": "run_test", "test_id": "tst_late",
        "payload": {"benchmark": "lines"}})  # fmt: skip
    assert refused.status_code == 409 and "shutting down" in refused.json()["error"]
    assert stopper.poll() is None  # still waiting for the test
    release.touch()
    assert stopper.wait(timeout=30) == 0
    assert fleet.test_info(test["id"])["status"] == "completed"
    assert fleet.test_info(follow_up["id"])["status"] == "queued"  # kept for later, not lost
    fleet.run("agent", "start", check=True)
    fleet.wait_status(follow_up["id"], "completed")


def test_server_killed_mid_test_gets_every_line_and_the_result_once(fleet: Kitt) -> None:
    release = fleet.home.parent / "spew-go"
    test = fleet.submit("spew", RELEASE=str(release), LINES=5000)
    fleet.wait_status(test["id"], "running")
    server_pid = fleet.pid_of("server")
    assert server_pid is not None
    os.kill(server_pid, signal.SIGKILL)
    release.touch()
    wait_for(lambda: list((fleet.home / "spool").glob("*-result.json")), what="result spooled")
    fleet.start_server("--lost-after", "2")
    done = fleet.wait_status(test["id"], "completed")
    assert done["status"] == "completed"
    text = fleet.api("GET", f"/api/v1/tests/{test['id']}/logs", params={"format": "text"}).text
    lines = text.splitlines()
    assert len(lines) == 5000 and lines == [f"{i:08d} " + "x" * 20 for i in range(5000)]


def test_result_too_large_for_the_wire_fails_the_test_instead_of_hanging(fleet: Kitt) -> None:
    test = fleet.submit("lines", BIG=True)
    done = fleet.wait_status(test["id"], "failed")
    assert "bytes as JSON; the limit is" in done["error"]
    assert not (fleet.home / "spool" / "rejected").exists()


def test_reports_with_out_of_range_values_are_400(fleet: Kitt) -> None:
    test = fleet.submit("lines")
    fleet.wait_status(test["id"], "completed")
    agent_id = fleet.agent("gpu-01")["id"]
    token = fleet.agent_config()["token"]
    base = f"/api/v1/agents/{agent_id}/tests/{test['id']}"
    r = fleet.api("POST", f"{base}/logs", token=token,
                  json={"lines": [{"seq": 10**20, "ts": "t", "line": "x"}]})  # fmt: skip
    assert r.status_code == 400 and "seq" in r.json()["error"]
    r = fleet.api("POST", f"{base}/status", token=token,
                  json={"status": "running", "started_at": "2026-11-27T10:00:00"})  # fmt: skip
    assert r.status_code == 400 and "started_at" in r.json()["error"]
    r = fleet.api("GET", f"/api/v1/tests/{test['id']}/logs", headers={"Last-Event-ID": str(10**20)})
    assert r.status_code == 400


def test_log_streams_cannot_take_every_agent_thread(fleet: Kitt) -> None:
    import socket as socketlib

    release = fleet.home.parent / "streams-go"
    test = fleet.submit("spew", RELEASE=str(release), LINES=50_000, WIDTH=200)
    fleet.wait_status(test["id"], "running")
    path = f"/api/logs/{test['command_id']}"
    held = []
    for _ in range(10):  # the agent's stream limit
        s = socketlib.create_connection(("127.0.0.1", fleet.agent_port))
        auth = fleet.as_server()["Authorization"]
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n".encode())
        assert b"200 OK" in s.recv(4096)
        held.append(s)
    over = httpx.get(fleet.agent_url + path, timeout=5, headers=fleet.as_server())
    assert over.status_code == 503 and "too many live log streams" in over.json()["error"]
    assert fleet.agent_status()["current_task"] == test["id"]  # the agent still answers
    for s in held:
        s.close()
    release.touch()  # output flows; the streams notice their clients left and free the slots

    def stream_opens() -> bool:
        with httpx.stream(
            "GET", fleet.agent_url + path, timeout=10, headers=fleet.as_server()
        ) as r:
            return r.status_code == 200

    wait_for(stream_opens, what="a stream slot freed")


def test_a_stop_during_a_drain_stops_now(fleet: Kitt) -> None:
    params, _release, _pids = hold_params(fleet, "hurry")
    test = fleet.submit("hold", **params)
    fleet.wait_status(test["id"], "running")
    drainer = fleet.popen("agent", "stop", "--drain")
    wait_for(lambda: "draining: waiting for test" in (fleet.home / "agent.log").read_text(),
             what="agent draining")  # fmt: skip
    stopped = fleet.run("agent", "stop")
    assert stopped.returncode == 0
    assert drainer.wait(timeout=30) == 0
    done = fleet.wait_status(test["id"], "cancelled")
    assert done["error"] == "cancelled: the agent was stopped"
