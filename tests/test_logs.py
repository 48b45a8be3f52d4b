"""Live logs: the agent's SSE stream (slow readers get a gap, not a stall), shipping to
the server, the server's SSE and text logs, resume, and the CLI — read by real clients."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import psutil
import pytest

from conftest import Kitt, wait_for


@pytest.fixture
def fleet(kitt: Kitt) -> Kitt:
    kitt.start_server()
    kitt.init_agent("gpu-01")
    cfg = kitt.home / "agent.yaml"
    cfg.write_text(cfg.read_text() + "log_buffer_lines: 200\n")
    kitt.add_benchmark("spew", "spew.py", timeout_s=120)
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("gpu-01").get("status") == "idle", what="agent idle")
    return kitt


def sse_events(
    kitt: Kitt, url: str, headers: dict[str, str] | None = None
) -> list[tuple[str, dict[str, Any], str]]:
    """Read a whole stream with httpx-sse (a third-party SSE client) until its end event."""
    out = []
    headers = {**kitt.auth_for(url), **(headers or {})}
    with httpx.Client(timeout=httpx.Timeout(10, read=60)) as client, \
            httpx_sse.connect_sse(client, "GET", url, headers=headers) as source:  # fmt: skip
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for event in source.iter_sse():
            if not event.data:
                continue
            out.append((event.event, json.loads(event.data), event.id))
            if event.event == "end":
                break
    return out


def lines_of(events: list[tuple[str, dict[str, Any], str]]) -> list[int]:
    return [data["seq"] for name, data, _ in events if name == "log"]


def test_three_agent_subscribers_one_stalled(fleet: Kitt, tmp_path: Path) -> None:
    release = tmp_path / "go"
    count = 20_000
    test = fleet.submit("spew", RELEASE=str(release), LINES=count, WIDTH=400)
    fleet.wait_status(test["id"], "running")
    url = f"{fleet.agent_url}/api/logs/{test['command_id']}"

    # The stalled reader: a raw socket with a tiny receive buffer that reads nothing yet.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", fleet.agent_port))
    auth = fleet.as_server()["Authorization"]
    stalled.sendall(
        f"GET /api/logs/{test['command_id']} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n".encode()
    )
    # curl -N, a second real client, streams to a file.
    curl_out = tmp_path / "curl.txt"
    curl = subprocess.Popen(
        [
            "curl",
            "-sN",
            "--max-time",
            "90",
            "-H",
            f"Authorization: {auth}",
            "-o",
            str(curl_out),
            url,
        ]
    )
    # httpx-sse reads in this thread once the benchmark is released.
    wait_for(curl_out.exists, what="curl connected")
    release.touch()
    events = sse_events(fleet, url)
    assert lines_of(events) == list(range(1, count + 1))
    assert events[-1][0] == "end" and events[-1][1]["status"] == "completed"

    assert curl.wait(timeout=90) == 0
    blocks = curl_out.read_text().split("\n\n")
    curl_seqs = [int(b.split("\n")[0][4:]) for b in blocks if "event: log" in b]
    assert curl_seqs == list(range(1, count + 1))

    # Now the stalled reader drains its stream: it was told what it missed, then got it.
    stalled.settimeout(30)
    raw = b""
    while b"event: end" not in raw:
        chunk = stalled.recv(1 << 20)
        if not chunk:
            break
        raw += chunk
    stalled.close()
    text = raw.decode()
    gaps = [json.loads(b.split("data: ", 1)[1]) for b in text.split("\n\n") if "event: gap" in b]
    assert gaps, "the stalled reader was not told it fell behind"
    assert all(g["missed"] > 0 and g["recovered"] for g in gaps)
    stalled_seqs = [
        int(b.split("id: ")[1].split("\n")[0]) for b in text.split("\n\n") if "event: log" in b
    ]
    assert stalled_seqs == list(range(1, count + 1))  # caught up from disk: nothing lost

    # Every line also reached the server, once and in order.
    server_events = sse_events(fleet, f"{fleet.server_url}/api/v1/tests/{test['id']}/logs")
    assert lines_of(server_events) == list(range(1, count + 1))
    assert server_events[-1][1]["status"] == "completed"


def test_resume_with_last_event_id_and_text_download(fleet: Kitt) -> None:
    test = fleet.submit("spew", LINES=50, ODD="true")
    done = fleet.wait_status(test["id"], "completed")
    assert done["status"] == "completed"
    agent_url = f"{fleet.agent_url}/api/logs/{test['command_id']}"
    server_url = f"{fleet.server_url}/api/v1/tests/{test['id']}/logs"
    for url in (agent_url, server_url):  # still served after the job ended
        resumed = sse_events(fleet, url, {"Last-Event-ID": "40"})
        seqs = lines_of(resumed)
        assert seqs[0] == 41 and seqs == sorted(seqs)
        assert resumed[0][2] == "41"  # the SSE id is the sequence number
    everything = sse_events(fleet, server_url)
    lines = [data["line"] for name, data, _ in everything if name == "log"]
    assert lines[50] == "bad bytes \ufffd\ufffd here"  # invalid UTF-8 replaced, line kept
    assert "".join(lines[51:]) == "L" * 20000 and all(len(x) <= 8192 for x in lines[51:])  # split
    text = httpx.get(
        server_url, params={"format": "text"}, headers=fleet.auth_for(server_url)
    ).text.splitlines()
    assert text == lines

    cli = fleet.run("test", "logs", test["id"])
    assert cli.returncode == 0 and cli.stdout.splitlines()[:2] == [
        "00000000 " + "x" * 20,
        "00000001 " + "x" * 20,
    ]
    follow = fleet.run("test", "logs", test["id"], "--follow")
    assert follow.returncode == 0 and len(follow.stdout.splitlines()) == len(lines)


def test_follow_streams_a_running_test_live(fleet: Kitt, tmp_path: Path) -> None:
    release = tmp_path / "go"
    proc = fleet.popen("test", "run", "--agent", "gpu-01", "--benchmark", "spew",
                       "--param", f"RELEASE={release}", "--param", "LINES=30", "--follow")  # fmt: skip
    wait_for(lambda: any(t["status"] == "running" for t in fleet.api("GET", "/api/v1/tests").json()["tests"]),
             what="test running")  # fmt: skip
    release.touch()
    assert proc.wait(timeout=60) == 0
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert "00000029 " in out and "completed" in out


def test_long_lines_are_batched_under_the_body_limit(fleet: Kitt) -> None:
    test = fleet.submit("spew", LINES=1200, WIDTH=4000)
    fleet.wait_status(test["id"], "completed")
    text = fleet.api("GET", f"/api/v1/tests/{test['id']}/logs", params={"format": "text"}).text
    lines = text.splitlines()
    assert len(lines) == 1200 and lines[-1].startswith("00001199 ")
    assert not (fleet.home / "spool" / "rejected").exists()


def test_log_batches_are_checked_and_idempotent(fleet: Kitt) -> None:
    test = fleet.submit("spew", LINES=3)
    fleet.wait_status(test["id"], "completed")
    agent_id = fleet.agent("gpu-01")["id"]
    token = fleet.agent_config()["token"]
    url = f"/api/v1/agents/{agent_id}/tests/{test['id']}/logs"

    def batch(*seqs: int) -> dict[str, Any]:
        return {
            "lines": [{"seq": s, "ts": "2026-11-27T00:00:00Z", "line": f"dup {s}"} for s in seqs]
        }

    r = fleet.api("POST", url, token=token, json=batch(1, 1))
    assert r.status_code == 400 and "strictly increasing" in r.json()["error"]
    r = fleet.api("POST", url, token=token, json=batch(2, 1))
    assert r.status_code == 400
    r = fleet.api("POST", url, token=token, json={"lines": []})
    assert r.status_code == 400 and "lines" in r.json()["error"]
    r = fleet.api("POST", url, token=token, json=batch(0))
    assert r.status_code == 400 and "seq" in r.json()["error"]
    r = fleet.api("POST", url, token=token, json=batch(1, 2, 3))  # a re-delivery: nothing changes
    assert r.status_code == 200 and r.json()["stored"] == 0
    text = fleet.api("GET", f"/api/v1/tests/{test['id']}/logs", params={"format": "text"}).text
    assert "dup" not in text and len(text.splitlines()) == 3
    other = fleet.api("POST", "/api/v1/agents/register", token=fleet.bootstrap_token(), json={
        "name": "other", "hostname": "h", "port": 1, "kitt_version": "x"}).json()  # fmt: skip
    r = fleet.api("POST", f"/api/v1/agents/{other['agent_id']}/tests/{test['id']}/logs",
                  token=other["token"], json=batch(9))  # fmt: skip
    assert r.status_code == 403
    r = httpx.get(f"{fleet.agent_url}/api/logs/cmd_unknown", headers=fleet.as_server())
    assert r.status_code == 404 and "no log" in r.json()["error"]
    r = fleet.api("GET", f"/api/v1/tests/{test['id']}/logs", headers={"Last-Event-ID": "x"})
    assert r.status_code == 400 and "Last-Event-ID" in r.json()["error"]


def test_open_log_streams_do_not_keep_daemons_alive(fleet: Kitt, tmp_path: Path) -> None:
    release = tmp_path / "never"
    test = fleet.submit("spew", RELEASE=str(release), LINES=10)
    fleet.wait_status(test["id"], "running")
    urls = [
        f"{fleet.server_url}/api/v1/tests/{test['id']}/logs",
        f"{fleet.agent_url}/api/logs/{test['command_id']}",
    ]
    readers = [
        subprocess.Popen(
            [
                "curl",
                "-sN",
                "--max-time",
                "60",
                "-H",
                f"Authorization: {fleet.auth_for(url)['Authorization']}",
                url,
            ],
            stdout=subprocess.DEVNULL,
        )
        for url in urls
    ]
    server_pid = fleet.pid_of("server")
    t0 = time.monotonic()
    assert fleet.run("server", "stop").returncode == 0
    assert time.monotonic() - t0 < 10  # a reader waiting for lines does not hold the server
    assert server_pid is not None
    with contextlib.suppress(psutil.NoSuchProcess):  # gone, or exited and not yet reaped
        assert psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
    t0 = time.monotonic()
    assert fleet.run("agent", "stop").returncode == 0
    assert time.monotonic() - t0 < 20
    for reader in readers:
        assert reader.wait(timeout=10) is not None  # both streams ended with their daemons


def test_follow_survives_a_server_restart(kitt: Kitt, tmp_path: Path) -> None:
    """A stopping server ends every stream with the test still running: `--follow`
    reconnects and resumes, showing every line once, until the test really ends."""
    kitt.start_server()
    kitt.init_agent("gpu-01")
    kitt.add_benchmark("gated", "web_gated.py", timeout_s=120)
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("gpu-01").get("status") == "idle", what="agent idle")
    gates = tmp_path / "gates"
    gates.mkdir()
    proc = kitt.popen("test", "run", "--agent", "gpu-01", "--benchmark", "gated",
                      "--param", f"GATES={gates}", "--param", "ROUNDS=2", "--param", "LINES=5",
                      "--follow")  # fmt: skip
    test = wait_for(lambda: next(iter(kitt.api("GET", "/api/v1/tests").json()["tests"]), None),
                    what="test submitted")  # fmt: skip
    kitt.wait_status(test["id"], "running")
    (gates / "go-0").touch()
    url = f"/api/v1/tests/{test['id']}/logs"
    wait_for(lambda: len(kitt.api("GET", url, params={"format": "text"}).text.splitlines()) == 5,
             what="round 0 stored")  # fmt: skip
    assert kitt.run("server", "stop").returncode == 0
    kitt.start_server()
    assert proc.poll() is None  # still following, not "ended: running"
    (gates / "go-1").touch()
    assert proc.wait(timeout=60) == 0
    out = proc.stdout.read().decode() if proc.stdout else ""
    for r in range(2):
        for i in range(5):
            assert out.count(f"round {r} line {i:02d} ") == 1, out
    assert "completed" in out
