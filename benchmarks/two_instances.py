"""Two server instances on one PostgreSQL: dispatch latency, and failover time.

    python benchmarks/two_instances.py [--tests 100] [--agents 3] [--kills 3]

A throwaway PostgreSQL cluster (tests/pg.py), instances A and B (each its own KITT_HOME;
B has A's admin token, as docs/multi-instance.md tells operators), a TCP balancer in
front of them (tests/tcp_balancer.py, round robin, skipping an instance that refuses
connections, like HAProxy with health checks), and real agents (heartbeat every 1 s)
that reach the servers only through the balancer.

1. **Dispatch latency**, from the servers' stored timestamps (``created_at`` → submit
   accepted, ``dispatched_at`` → the command was sent; same host, same clock), for a
   no-op benchmark run one test after another, submitted alternately on A and B:
   - *push*: the submitting instance pushes to the agent;
   - *heartbeat, across instances*: the agents cannot be reached (their recorded ports
     lead nowhere, as behind NAT), so the test waits for an agent's heartbeat, which
     the balancer may hand to the other instance: it learnt of the test through NOTIFY.
2. **Failover**: instance A is SIGKILLed (and restarted between rounds); the time from
   the kill until (a) every agent's heartbeat is stored again, and (b) a submission
   through the balancer is accepted and its test dispatched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import yaml
from _harness import Sandbox, percentile, server_sandbox

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pg import start_cluster
from ports import free_port
from tcp_balancer import TcpBalancer


@contextmanager
def postgres() -> Any:
    cluster = start_cluster()
    try:
        yield next(cluster)
    finally:
        cluster.close()


def client(url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def start_agents(box: Any, url: str, count: int, token: str) -> list[tuple[str, Path]]:
    """``count`` real agents (own KITT_HOME each) offering a no-op benchmark via ``url``."""
    agents = []
    true_bin = shutil.which("true") or "/bin/true"
    for i in range(count):
        home = box.home.parent / f"agent-{i}"
        env = dict(box.env, KITT_HOME=str(home))
        name = f"gpu-{i:02}"
        with client(box.url, token) as c:
            r = c.post("/api/v1/tokens", json={"uses": 1, "ttl_s": 600})
            r.raise_for_status()
            bootstrap = r.json()["token"]
        run = [sys.executable, "-m", "kitt", "agent"]
        subprocess.run([*run, "init", "--server", url, "--name", name, "--token", bootstrap,
                        "--port", str(free_port()), "--bind", "127.0.0.1"],
                       env=env, check=True, capture_output=True)  # fmt: skip
        cfg = home / "agent.yaml"
        data = yaml.safe_load(cfg.read_text())
        data["benchmarks"] = {"noop": {"command": [true_bin], "timeout_s": 30}}
        data["backoff_max_s"] = 1
        cfg.write_text(yaml.safe_dump(data))
        started = subprocess.run(
            [*run, "start"], env=env, capture_output=True, text=True, check=False
        )
        if started.returncode:
            raise SystemExit(f"agent {name} did not start: {started.stdout}{started.stderr}")
        agents.append((name, home))
    return agents


def wait(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


def run_tests(clients: list[httpx.Client], agents: list[str], count: int) -> list[float]:
    """Submit ``count`` no-op tests one after another, alternating instances and agents;
    returns each one's submit → dispatched seconds."""
    waited = []
    for i in range(count):
        c = clients[i % len(clients)]
        r = c.post("/api/v1/tests", json={"agent": agents[i % len(agents)], "benchmark": "noop"})
        r.raise_for_status()
        test_id = r.json()["id"]
        t = wait(partial(_ended, c, test_id), 60, f"test {test_id}")
        if t["status"] != "completed":
            raise SystemExit(f"test {test_id} ended {t['status']}: {t['error']}")
        waited.append((_ts(t["dispatched_at"]) - _ts(t["created_at"])).total_seconds())
    return waited


def _ended(c: httpx.Client, test_id: str) -> dict[str, Any] | None:
    t: dict[str, Any] = c.get(f"/api/v1/tests/{test_id}").json()
    return t if t["status"] in ("completed", "failed", "cancelled", "lost") else None


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def summary(values: list[float]) -> str:
    values = sorted(values)
    return (f"p50 {percentile(values, 50) * 1000:7.1f} ms, p99 {percentile(values, 99) * 1000:7.1f} ms, "
            f"mean {statistics.fmean(values) * 1000:7.1f} ms, max {values[-1] * 1000:7.1f} ms "
            f"({len(values)} tests)")  # fmt: skip


def failover(
    a: Any, b: Any, balancer: TcpBalancer, agents: list[str], token: str
) -> tuple[float, float]:
    """Kill A; seconds until every agent's heartbeat is stored again, and until a test
    submitted through the balancer is dispatched."""
    with client(b.url, token) as cb, client(balancer.url, token) as lb:
        os.kill(a.server_pid(), signal.SIGKILL)
        killed = time.monotonic()
        killed_at = datetime.now(timezone.utc).replace(tzinfo=None)

        def all_beating() -> bool:
            return all(_ts(cb.get(f"/api/v1/agents/{n}").json()["last_seen_at"]).replace(tzinfo=None) > killed_at
                       for n in agents)  # fmt: skip

        wait(all_beating, 60, "every agent's heartbeat after the kill")
        beats = time.monotonic() - killed

        def submitted() -> str | None:
            try:
                r = lb.post("/api/v1/tests", json={"agent": agents[0], "benchmark": "noop"})
            except httpx.HTTPError:
                return None
            return r.json()["id"] if r.status_code == 202 else None

        test_id = wait(submitted, 60, "a submission through the balancer")
        wait(lambda: cb.get(f"/api/v1/tests/{test_id}").json()["dispatched_at"], 60, "dispatch")
        return beats, time.monotonic() - killed


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tests", type=int, default=100)
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--kills", type=int, default=3)
    args = ap.parse_args()
    with ExitStack() as stack:
        cluster = stack.enter_context(postgres())
        os.environ["KITT_DATABASE_URL"] = cluster.url(cluster.create_database())
        a = stack.enter_context(server_sandbox("--heartbeat-interval", "1"))
        (a.home.parent / "b" / "server").mkdir(parents=True, mode=0o700)
        shutil.copy2(a.home / "server" / "admin-token", a.home.parent / "b" / "server")
        b = Sandbox(
            a.home.parent / "b", dict(a.env, KITT_HOME=str(a.home.parent / "b")), free_port()
        )
        b.kitt(
            "server",
            "start",
            "--port",
            str(b.port),
            "--log-level",
            "WARNING",
            "--heartbeat-interval",
            "1",
        )
        stack.callback(lambda: subprocess.run([sys.executable, "-m", "kitt", "server", "stop"],
                                              env=b.env, check=False, capture_output=True))  # fmt: skip
        token = a.admin_token()
        balancer = stack.enter_context(TcpBalancer([("127.0.0.1", a.port), ("127.0.0.1", b.port)]))
        agents = start_agents(a, balancer.url, args.agents, token)
        for _, home in agents:
            stack.callback(lambda h=home: subprocess.run(
                [sys.executable, "-m", "kitt", "agent", "stop"], env=dict(a.env, KITT_HOME=str(h)),
                check=False, capture_output=True))  # fmt: skip
        names = [n for n, _ in agents]
        with client(a.url, token) as ca, client(b.url, token) as cb:
            wait(lambda: all(ca.get(f"/api/v1/agents/{n}").json().get("status") == "idle" for n in names),
                 60, "agents idle")  # fmt: skip
            pushed = run_tests([ca, cb], names, args.tests)
            # Behind NAT: the instances' pushes fail; heartbeats (via the balancer, to
            # either instance) carry every test.
            import psycopg

            with psycopg.connect(os.environ["KITT_DATABASE_URL"]) as conn:
                conn.execute("UPDATE agents SET port = %s", (free_port(),))
            carried = run_tests([ca, cb], names, max(10, args.tests // 4))
        print(
            f"two instances, {args.agents} agents (heartbeat 1 s) behind a TCP balancer, PostgreSQL"
        )
        print(f"  dispatch, push by the submitting instance:     {summary(pushed)}")
        print(f"  dispatch, carried by a heartbeat (any instance): {summary(carried)}")
        for round_ in range(args.kills):
            beats, dispatch = failover(a, b, balancer, names, token)
            print(
                f"  failover {round_ + 1}: A SIGKILLed; every agent's heartbeat stored again after "
                f"{beats:5.2f} s, a test submitted through the balancer dispatched after {dispatch:5.2f} s"
            )
            a.kitt(
                "server",
                "start",
                "--port",
                str(a.port),
                "--log-level",
                "WARNING",
                "--heartbeat-interval",
                "1",
            )
        print(f"  balancer connections per instance: {dict(balancer.connections)}")


if __name__ == "__main__":
    main()
