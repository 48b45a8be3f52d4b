"""Two server instances on one PostgreSQL database, as behind a load balancer: any
instance serves any agent, submission and stream; live events cross instances (LISTEN /
NOTIFY); work submitted on one is carried by a heartbeat to the other; and killing one
instance mid-test loses nothing when the agent reaches them through a TCP balancer.

Always on PostgreSQL (skipped where it is not installed, unless KITT_REQUIRE_POSTGRES).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import httpx_sse
import psycopg
import pytest

from conftest import Kitt, free_port, wait_for
from pg import PgCluster
from tcp_balancer import TcpBalancer

SPEW_LINES = 3000


def spew_line(i: int) -> str:
    return f"{i:08d} " + "x" * 20


@pytest.fixture
def pair(kitt: Kitt, postgres: PgCluster, tmp_path: Path) -> Iterator[tuple[Kitt, Kitt, str]]:
    """Instances A (the ``kitt`` sandbox, which also holds the agent) and B (its own
    KITT_HOME and port) on one database. B gets A's admin token, as an operator copies
    it (docs/operations.md): the same token works on either."""
    database = postgres.create_database()
    url = postgres.url(database)
    a = kitt
    a.env["KITT_DATABASE_URL"] = url
    b = replace(a, home=tmp_path / "home-b", env={**a.env, "KITT_HOME": str(tmp_path / "home-b")},
                server_port=free_port(), agent_port=free_port(), children=[])  # fmt: skip
    # No periodic re-read of pending work: work must cross instances by NOTIFY alone.
    a.start_server("--lost-after", "30", "--pending-resync", "1h")
    (b.home / "server").mkdir(parents=True, mode=0o700)
    shutil.copy2(a.home / "server" / "admin-token", b.home / "server" / "admin-token")
    b.start_server("--lost-after", "30", "--pending-resync", "1h")
    yield a, b, database
    b.cleanup()
    a.cleanup()
    a.env.pop("KITT_DATABASE_URL")
    postgres.drop_database(database)


def start_agent(kitt: Kitt, server_url: str) -> None:
    kitt.run(
        "agent", "init", "--server", server_url, "--name", "gpu-01", "--token",
        kitt.bootstrap_token(), "--port", str(kitt.agent_port), "--bind", "127.0.0.1",
        check=True,
    )  # fmt: skip
    cfg = kitt.home / "agent.yaml"
    cfg.write_text(cfg.read_text() + "backoff_max_s: 1\n")
    kitt.add_benchmark("spew", "spew.py", timeout_s=120)
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("gpu-01").get("status") == "idle", what="agent idle")


def read_log_stream(
    server: Kitt, test_id: str, on_open: Callable[[], None]
) -> tuple[list[int], list[str]]:
    """Follow a test's log on ``server`` with httpx-sse until its end, calling ``on_open``
    once the stream is open: the seqs of the lines and the statuses announced."""
    url = f"{server.server_url}/api/v1/tests/{test_id}/logs"
    seqs, statuses = [], []
    with httpx.Client(timeout=httpx.Timeout(10, read=60)) as client, httpx_sse.connect_sse(
        client, "GET", url, headers=server.auth_for(url)
    ) as source:  # fmt: skip
        assert source.response.status_code == 200
        on_open()
        for event in source.iter_sse():
            if event.event == "log":
                seqs.append(json.loads(event.data)["seq"])
            elif event.event == "status":
                statuses.append(json.loads(event.data)["status"])
            elif event.event == "end":
                break
    return seqs, statuses


def test_instances_share_agents_and_stream_each_others_events(
    pair: tuple[Kitt, Kitt, str],
) -> None:
    a, b, _ = pair
    start_agent(a, a.server_url)  # registers and heartbeats on A only
    assert b.agent("gpu-01")["status"] == "idle"  # ...and B lists it from the database
    release = a.home.parent / "go"
    test = b.submit("spew", RELEASE=str(release), LINES=SPEW_LINES)  # submitted on B
    b.wait_status(test["id"], "running")  # B pushed it to the agent

    # The agent posts its lines and status to A; a follower on B gets them all, live.
    with httpx.Client(timeout=httpx.Timeout(10, read=30)) as client:
        url = b.server_url + "/api/v1/fleet/events"
        admin = {"Authorization": f"Bearer {b.admin_token}"}
        with httpx_sse.connect_sse(client, "GET", url, headers=admin) as fleet:
            events = (e for e in fleet.iter_sse() if e.data)
            first = next(events)
            assert first.event == "snapshot"
            seen = {a["name"]: a["last_seen_at"] for a in json.loads(first.data)["agents"]}
            # A heartbeat to A shows on B's fleet stream (NOTIFY, not a reload).
            changed = next(e for e in events if e.event == "agent")
            agent = json.loads(changed.data)
            assert agent["name"] == "gpu-01" and agent["last_seen_at"] > seen["gpu-01"]
    seqs, statuses = read_log_stream(b, test["id"], on_open=release.touch)
    assert seqs == list(range(1, SPEW_LINES + 1))
    assert statuses == ["completed"]  # the only change after the stream opened
    text = a.api("GET", f"/api/v1/tests/{test['id']}/logs", params={"format": "text"}).text
    assert text.splitlines() == [spew_line(i) for i in range(SPEW_LINES)]


def test_work_submitted_on_one_instance_rides_a_heartbeat_to_the_other(
    pair: tuple[Kitt, Kitt, str], postgres: PgCluster
) -> None:
    a, b, database = pair
    start_agent(a, a.server_url)
    # The agent cannot be reached (behind NAT, say): only its heartbeats, which go to A,
    # can carry a test. Its recorded port now leads nowhere.
    with psycopg.connect(
        host=str(postgres.socket_dir), port=postgres.port, user="kitt", dbname=database
    ) as conn:
        conn.execute("UPDATE agents SET port = %s WHERE name = 'gpu-01'", (free_port(),))
    test = b.submit("spew", LINES=5)  # B's push fails; B has no heartbeat from the agent
    # A heard of it through NOTIFY (it re-reads pending work only hourly here).
    b.wait_status(test["id"], "completed", timeout=20)
    text = b.api("GET", f"/api/v1/tests/{test['id']}/logs", params={"format": "text"}).text
    assert text.splitlines() == [spew_line(i) for i in range(5)]
    server_log = (a.home / "server" / "server.log").read_text()
    assert f"test {test['id']} dispatched to gpu-01 via heartbeat" in server_log


def test_killing_one_instance_behind_a_balancer_loses_nothing(
    pair: tuple[Kitt, Kitt, str],
) -> None:
    a, b, _ = pair
    backends = [("127.0.0.1", a.server_port), ("127.0.0.1", b.server_port)]
    with TcpBalancer(backends) as balancer:
        start_agent(a, balancer.url)
        release = a.home.parent / "go"
        test = b.submit("spew", RELEASE=str(release), LINES=SPEW_LINES)
        b.wait_status(test["id"], "running")
        pid = a.pid_of("server")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # instance A dies mid-test
        release.touch()
        done = b.wait_status(test["id"], "completed", timeout=60)
        assert done["status"] == "completed"
        text = b.api("GET", f"/api/v1/tests/{test['id']}/logs", params={"format": "text"}).text
        assert text.splitlines() == [spew_line(i) for i in range(SPEW_LINES)]
        # The agent carries on through B alone: heartbeats keep landing.
        before = b.agent("gpu-01")["last_seen_at"]
        wait_for(lambda: b.agent("gpu-01")["last_seen_at"] > before, what="beats via B")
        assert b.agent("gpu-01")["online"] is True
        assert balancer.connections[b.server_port] > 0


def test_an_instance_with_another_ca_is_refused_until_the_identity_is_copied(
    kitt: Kitt, postgres: PgCluster, tmp_path: Path
) -> None:
    database = postgres.create_database()
    kitt.env["KITT_DATABASE_URL"] = postgres.url(database)
    home_b = tmp_path / "home-b"
    b = replace(kitt, home=home_b, env={**kitt.env, "KITT_HOME": str(home_b)},
                server_port=free_port(), agent_port=free_port(), children=[])  # fmt: skip
    try:
        kitt.start_server("--tls")
        refused = b.run("server", "start", "--port", str(b.server_port), "--tls")
        assert refused.returncode != 0
        message = refused.stderr.strip()
        assert "Traceback" not in refused.stdout + refused.stderr
        a_ca = kitt.run("server", "ca", "--fingerprint", check=True).stdout.strip()
        assert f"belongs to a fleet whose CA has fingerprint {a_ca}" in message, message
        assert "docs/multi-instance.md" in message and b.run("server", "status").returncode == 3
        shutil.rmtree(home_b / "server" / "certs")
        shutil.copytree(kitt.home / "server" / "certs", home_b / "server" / "certs")
        shutil.copy2(kitt.home / "server" / "admin-token", home_b / "server" / "admin-token")
        b.start_server("--tls")
        assert b.api("GET", "/api/v1/agents").status_code == 200  # A's CA, A's admin token
    finally:
        b.cleanup()
        kitt.cleanup()
        kitt.env.pop("KITT_DATABASE_URL")
        postgres.drop_database(database)
