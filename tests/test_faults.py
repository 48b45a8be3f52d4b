"""Fault injection on real processes (issue 8): an agent killed with reports in its spool,
a 60 s network cut between agent and server, PostgreSQL restarted under load, and a full
spool disk. Each fault is real: a network namespace joined by a veth pair whose link the
test takes down, a PostgreSQL cluster stopped and started, a tmpfs filled to the last
byte. They need root (CI runs as root); where a capability is missing the test says
which and is skipped.

Covered in test_jobs.py, not repeated here: the server SIGKILLed mid-test, and an agent
SIGKILLed mid-test with the server up (lost, then failed on restart).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ON_POSTGRES, Kitt, wait_for
from kitt.agent.spool import Spool
from pg import PgCluster
from test_prometheus import scrape, value

CUT_S = 60.0  # the network cut


def _root_tool(*argv: str, what: str) -> None:
    """Run a root-only tool the test needs; skip the test, saying why, when it cannot."""
    if os.geteuid() != 0 or shutil.which(argv[0]) is None:
        pytest.skip(f"{what} needs root and `{argv[0]}`")
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"{what}: `{' '.join(argv)}` failed: {proc.stderr.strip()}")


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], capture_output=True, check=True, timeout=30)


def log_lines(kitt: Kitt, test_id: str) -> list[str]:
    response = kitt.api("GET", f"/api/v1/tests/{test_id}/logs", params={"format": "text"})
    assert response.status_code == 200, response.text
    return response.text.splitlines()


def spooled(kitt: Kitt, kind: str) -> list[dict[str, Any]]:
    """The bodies of the ``kind`` reports waiting in the agent's spool, oldest first."""
    bodies = []
    for item in sorted((kitt.home / "spool").glob(f"*-{kind}.json")):
        with contextlib.suppress(FileNotFoundError):  # delivered meanwhile
            bodies.append(json.loads(item.read_text())["body"])
    return bodies


def spooled_lines(kitt: Kitt) -> list[str]:
    return [line["line"] for body in spooled(kitt, "logs") for line in body["lines"]]


def completions_logged(kitt: Kitt, test_id: str) -> int:
    """How often the server applied a final state to the test (each change is logged)."""
    text = (kitt.home / "server" / "server.log").read_text()
    return text.count(f"test {test_id} is completed") + text.count(f"test {test_id} is failed")


def start_agent(kitt: Kitt, name: str, *benchmarks: tuple[str, str]) -> None:
    """Configure and start the sandbox's agent with ``benchmarks`` (name, script)."""
    kitt.init_agent(name)
    for bench, script in benchmarks:
        kitt.add_benchmark(bench, script, timeout_s=600)
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent(name).get("status") == "idle", what=f"agent {name} idle")


# -- agent SIGKILLed with reports in its spool ---------------------------------------------


def test_agent_killed_with_reports_spooled_delivers_them_after_restart(kitt: Kitt) -> None:
    """The issue's "agent restart reports and delivers its spool": lines spooled while the
    server was down survive a SIGKILL of the agent and arrive, once and in order, after
    the restart, followed by the test's end (lost while the agent was dead, then failed)."""
    kitt.start_server("--lost-after", "2")
    start_agent(kitt, "gpu-01", ("gated", "web_gated.py"))
    gates = kitt.home.parent / "gates"
    gates.mkdir()
    test = kitt.submit("gated", GATES=str(gates), ROUNDS=2, LINES=10)
    kitt.wait_status(test["id"], "running")
    kitt.run("server", "stop", check=True)
    (gates / "go-0").touch()
    expected = [f"round 0 line {i:02d} {'WARN slow step' if i % 5 == 0 else 'ok'}"
                for i in range(10)]  # fmt: skip
    wait_for(lambda: spooled_lines(kitt) == expected, what="round 0 spooled, server down")
    pid = kitt.pid_of("agent")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # mid-test, round 1 still to come

    kitt.start_server("--lost-after", "2")
    lost = kitt.wait_status(test["id"], "lost", timeout=20)
    assert "sent no heartbeat for over 2 s" in lost["error"]
    assert log_lines(kitt, test["id"]) == []  # the lines are still on the dead agent's disk
    assert spooled_lines(kitt) == expected

    kitt.run("agent", "start", check=True)
    failed = kitt.wait_status(test["id"], "failed")
    assert "agent restarted while the test was running" in failed["error"]
    wait_for(lambda: not list((kitt.home / "spool").glob("*.json")), what="spool drained")
    assert log_lines(kitt, test["id"]) == expected
    assert completions_logged(kitt, test["id"]) == 1
    assert not (kitt.home / "spool" / "rejected").exists()
    wait_for(lambda: kitt.agent("gpu-01").get("status") == "idle", what="agent idle again")


# -- network cut ---------------------------------------------------------------------------


@dataclass
class Netns:
    """The agent's host: a network namespace joined to this one by a veth pair."""

    name: str
    host_if: str
    host_ip: str
    agent_ip: str

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def link(self, up: bool) -> None:
        _ip("link", "set", self.host_if, "up" if up else "down")


def _free_subnet() -> tuple[str, str]:
    """Two addresses of a /30 in 10.213.0.0/16 that no interface here uses."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True,
                          check=False).stdout  # fmt: skip
    for _ in range(100):
        third, fourth = uuid.uuid4().int % 256, (uuid.uuid4().int % 64) * 4
        host, agent = f"10.213.{third}.{fourth + 1}", f"10.213.{third}.{fourth + 2}"
        if f" {host}/" not in used and f" {agent}/" not in used:
            return host, agent
    pytest.skip("no free /30 in 10.213.0.0/16 for the test's veth pair")


@pytest.fixture
def netns(kitt: Kitt) -> Iterator[Netns]:
    """A namespace with a veth pair, removed (after the sandbox's agent is killed) even
    when the test fails."""
    tag = uuid.uuid4().hex[:8]
    host_ip, agent_ip = _free_subnet()
    ns = Netns(f"kitt-fault-{tag}", f"kfh{tag}", host_ip, agent_ip)
    _root_tool("ip", "netns", "add", ns.name, what="the network-cut test")
    try:
        _root_tool("ip", "link", "add", ns.host_if, "type", "veth", "peer", "name", f"kfn{tag}",
                   "netns", ns.name, what="the network-cut test (veth pair)")  # fmt: skip
        _ip("addr", "add", f"{host_ip}/30", "dev", ns.host_if)
        _ip("link", "set", ns.host_if, "up")
        _ip("-n", ns.name, "addr", "add", f"{agent_ip}/30", "dev", f"kfn{tag}")
        _ip("-n", ns.name, "link", "set", f"kfn{tag}", "up")
        _ip("-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        kitt.cleanup()  # the agent dies before its namespace goes
        for argv in (["link", "del", ns.host_if], ["netns", "del", ns.name]):
            with contextlib.suppress(subprocess.SubprocessError):
                _ip(*argv)


@pytest.mark.timeout(300)
def test_network_cut_of_60_s_mid_test_loses_nothing(kitt: Kitt, netns: Netns) -> None:
    """The agent, in its own namespace, loses its link to the server for 60 s while a
    test runs: the test keeps running, the agent spools, and once the link is back every
    line arrives once and in order, the result once, and the agent is online again."""
    # Plain HTTP on all addresses: the agent reaches it through the veth pair, the test
    # on 127.0.0.1.
    kitt.start_server("--host", "0.0.0.0", "--no-tls", "--insecure")
    kitt.init_agent("gpu-01")
    kitt.add_benchmark("tick", "tick.py", timeout_s=600)
    cfg = kitt.home / "agent.yaml"
    cfg.write_text(
        cfg.read_text().replace(kitt.server_url, f"http://{netns.host_ip}:{kitt.server_port}")
    )
    started = subprocess.run(netns.cmd(sys.executable, "-m", "kitt", "agent", "start"),
                             env=kitt.env, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    agent_pid = kitt.pid_of("agent")
    wait_for(lambda: kitt.agent("gpu-01").get("status") == "idle", what="agent idle")

    def agent_status() -> dict[str, Any]:
        """The agent's own status, asked from inside its namespace."""
        out = subprocess.run(netns.cmd(sys.executable, "-m", "kitt", "agent", "status", "--json"),
                             env=kitt.env, capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    release = kitt.home.parent / "release-cut"
    test = kitt.submit("tick", RELEASE=str(release), INTERVAL=0.1)
    kitt.wait_status(test["id"], "running")
    wait_for(lambda: len(log_lines(kitt, test["id"])) >= 10, what="lines flowing before the cut")
    agent_log = kitt.home / "jobs" / test["command_id"] / "log.jsonl"

    netns.link(up=False)
    cut_at = time.monotonic()
    try:
        status = wait_for(lambda: (s := agent_status())["last_error"] and s, timeout=30,
                          interval=1, what="the agent noticing the cut")  # fmt: skip
        assert f"cannot reach http://{netns.host_ip}:" in status["last_error"]
        assert status["current_task"] == test["id"] and status["status"] == "running"
        wait_for(
            lambda: not kitt.agent("gpu-01")["online"], what="server marking the agent offline"
        )
        on_server = len(log_lines(kitt, test["id"]))
        at_cut = len(agent_log.read_text().splitlines())
        # The cut lasts CUT_S; meanwhile the benchmark keeps printing and the agent spools.
        wait_for(lambda: time.monotonic() - cut_at >= CUT_S and len(spooled(kitt, "logs")) > 100,
                 timeout=CUT_S + 30, interval=1, what=f"{CUT_S:g} s of cut with lines spooled")  # fmt: skip
        assert len(log_lines(kitt, test["id"])) == on_server  # really cut: nothing got through
        assert kitt.test_info(test["id"])["status"] == "running"  # not lost: within the grace
        assert len(agent_log.read_text().splitlines()) >= at_cut + 400  # ~10 lines/s for 60 s
        release.touch()
        wait_for(lambda: spooled(kitt, "result"), what="result spooled during the cut")
    finally:
        netns.link(up=True)

    done = kitt.wait_status(test["id"], "completed", timeout=60)
    ticks = done["result"]["ticks"]
    assert done["result"]["released"] is True and ticks >= 400
    assert log_lines(kitt, test["id"]) == [f"tick {i:06d}" for i in range(ticks)]
    on_agent = [json.loads(x)["line"] for x in agent_log.read_text().splitlines()]
    assert on_agent == [f"tick {i:06d}" for i in range(ticks)]
    assert completions_logged(kitt, test["id"]) == 1
    assert value(scrape(kitt), "kitt_results_total", status="completed") == 1
    wait_for(lambda: kitt.agent("gpu-01")["online"], what="agent online again")
    wait_for(lambda: agent_status()["last_error"] is None, interval=1, what="agent error cleared")
    wait_for(lambda: not list((kitt.home / "spool").glob("*.json")), what="spool drained")
    assert kitt.pid_of("agent") == agent_pid  # the same process rode it out


# -- PostgreSQL restarted under load -------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    """A cluster of the test's own: stopping it must not disturb anyone else's. Ask for
    it before ``kitt`` so that it outlives the sandbox's server."""
    from pg import find_bindir, start_cluster

    if find_bindir() is None:
        reason = "PostgreSQL server binaries not found (apt-get install postgresql-15)"
        if os.environ.get("KITT_REQUIRE_POSTGRES") or ON_POSTGRES:
            pytest.fail(reason)
        pytest.skip(reason)
    yield from start_cluster()


def pg_ctl(cluster: PgCluster, action: str) -> None:
    """Stop (fast: sessions are cut) or start the cluster, keeping its data. Starting is
    ``restart``, which reuses the options of the last start (port, socket folder)."""
    log = str(cluster.root / "postgres.log")
    cluster._tool(str(cluster.bindir / "pg_ctl"), "-D", str(cluster.data), "-l", log,
                  "-m", "fast", "-w", action)  # fmt: skip


@dataclass
class Sample:
    at: float
    probe: str
    status: int  # 0: no HTTP answer at all
    body: str


@dataclass
class Load:
    """Clients calling the server in a loop, every answer recorded."""

    probes: dict[str, Callable[[], httpx.Response]]
    samples: list[Sample] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            for probe, call in self.probes.items():
                try:
                    response = call()
                    sample = Sample(time.monotonic(), probe, response.status_code, response.text)
                except httpx.HTTPError as exc:
                    sample = Sample(time.monotonic(), probe, 0, repr(exc))
                self.samples.append(sample)
            self.stop.wait(0.05)

    def ok_since(self, since: float) -> dict[str, float]:
        """The first success of each probe after ``since``."""
        first: dict[str, float] = {}
        for s in list(self.samples):
            if s.at > since and s.status < 400:
                first.setdefault(s.probe, s.at)
        return first


def test_postgresql_restart_under_load_is_a_503_window_then_business_as_usual(
    cluster: PgCluster, kitt: Kitt
) -> None:
    """PostgreSQL stopped and started under a real agent and polling clients: every
    answer meanwhile is recorded; a 5xx is allowed only from the stop to each probe's
    first success after the start, and must be a 503 saying why in JSON. The server
    reconnects by itself, keeps every agent and test, and runs a test afterwards."""
    database = cluster.create_database()
    kitt.env.pop("KITT_DATABASE_URL", None)
    kitt.start_server("--database", cluster.url(database))
    server_pid = kitt.pid_of("server")
    start_agent(kitt, "gpu-01", ("lines", "lines_and_result.py"))
    before = kitt.submit("lines")
    kitt.wait_status(before["id"], "completed")
    sim = kitt.api("POST", "/api/v1/agents/register", token=kitt.bootstrap_token(), json={
        "name": "sim-01", "hostname": "sim", "port": 1, "kitt_version": "x"}).json()  # fmt: skip
    beat = {"status": "idle", "uptime_s": 1.0}
    load = Load({
        "heartbeat": lambda: kitt.api("POST", f"/api/v1/agents/{sim['agent_id']}/heartbeat",
                                      token=sim["token"], json=beat),
        "agents": lambda: kitt.api("GET", "/api/v1/agents"),
        "tests": lambda: kitt.api("GET", "/api/v1/tests"),
        "agent": lambda: kitt.api("GET", "/api/v1/agents/gpu-01"),
    })  # fmt: skip
    ids = {a["name"]: a["id"] for a in kitt.agents()}
    worker = threading.Thread(target=load.run, daemon=True)
    worker.start()
    try:
        wait_for(lambda: len(load.ok_since(0)) == len(load.probes), what="load running")
        stopped_at = time.monotonic()
        pg_ctl(cluster, "stop")
        wait_for(lambda: {s.probe for s in load.samples if s.at > stopped_at + 1} == set(load.probes),
                 what="every probe answered during the outage")  # fmt: skip
        started_at = time.monotonic()
        pg_ctl(cluster, "restart")
        recovered = wait_for(lambda: (r := load.ok_since(started_at)).keys() == load.probes.keys() and r,
                             timeout=30, what="every probe succeeding again")  # fmt: skip
        back = max(recovered.values())
        wait_for(lambda: sum(s.at > back for s in load.samples) >= 40, what="load after recovery")
    finally:
        load.stop.set()
        worker.join(timeout=30)

    errors = [s for s in load.samples if s.status >= 400 or s.status == 0]
    outage = [s for s in errors if stopped_at <= s.at <= recovered[s.probe]]
    assert errors == outage, f"errors outside the outage window: {errors[-5:]}"
    assert outage, "the outage was never seen: the probes did not reach the database"
    for s in outage:
        assert s.status == 503, f"{s.probe}: {s.status} {s.body[:300]}"
        error = json.loads(s.body)["error"]
        assert error and "SELECT" not in error and "psycopg" not in error, error
    print(f"outage seen {len(outage)} times; recovered {back - started_at:.2f} s after the start")

    assert kitt.pid_of("server") == server_pid  # reconnected by itself, not restarted
    assert {a["name"]: a["id"] for a in kitt.agents()} == ids
    assert kitt.test_info(before["id"])["status"] == "completed"
    beats = len(kitt.heartbeats("gpu-01"))
    wait_for(lambda: len(kitt.heartbeats("gpu-01")) > beats, what="real agent's heartbeats")
    wait_for(lambda: kitt.agent("gpu-01")["online"], what="real agent online")
    after = kitt.submit("lines", LINES=3)
    assert kitt.wait_status(after["id"], "completed")["result"]["lines"] == 3
    assert log_lines(kitt, after["id"]) == ["line 0", "line 1", "line 2", "to stderr"]
    assert "Traceback" not in (kitt.home / "server" / "server.log").read_text()


# -- disk full in the agent spool ----------------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path) -> Iterator[Path]:
    """``folder`` on a 256 KiB tmpfs of its own, unmounted whatever happens."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _root_tool("mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(folder),
               what="the disk-full tests (a tmpfs)")  # fmt: skip
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False, timeout=30)


@pytest.fixture
def tiny_spool(kitt: Kitt) -> Iterator[Path]:
    """The agent's spool folder on a tiny tmpfs (unmounted after the agent is killed)."""
    with tmpfs(kitt.home / "spool") as spool:
        try:
            yield spool
        finally:
            kitt.cleanup()


def fill(folder: Path) -> Path:
    """Write a file into ``folder`` until its disk is full."""
    filler = folder / "zz-filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while fh.write(b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_full_spool_disk_is_reported_and_loses_nothing(kitt: Kitt, tiny_spool: Path) -> None:
    """With the server down the agent must spool, and the spool's disk is full: the test
    still ends, the agent says why (log, status), keeps what it could not write in
    memory, and delivers all of it, in order, once the server is back."""
    kitt.start_server("--lost-after", "10m")
    start_agent(kitt, "gpu-01", ("gated", "web_gated.py"), ("lines", "lines_and_result.py"))
    agent_pid = kitt.pid_of("agent")
    gates = kitt.home.parent / "gates"
    gates.mkdir()
    test = kitt.submit("gated", GATES=str(gates), ROUNDS=2, LINES=10)
    kitt.wait_status(test["id"], "running")
    kitt.run("server", "stop", check=True)  # the agent has to keep everything
    (gates / "go-0").touch()
    expected = [f"round {r} line {i:02d} {'WARN slow step' if i % 5 == 0 else 'ok'}"
                for r in range(2) for i in range(10)]  # fmt: skip
    wait_for(lambda: spooled_lines(kitt) == expected[:10], what="round 0 in the spool")
    on_disk = sorted(p.name for p in tiny_spool.iterdir())

    filler = fill(tiny_spool)
    (gates / "go-1").touch()  # round 1 and the result: no room on the disk for them
    job_state = kitt.home / "jobs" / test["command_id"] / "state.json"
    wait_for(lambda: json.loads(job_state.read_text())["status"] == "completed",
             what="the test ending on the agent")  # fmt: skip
    status = wait_for(lambda: "No space left" in ((s := kitt.agent_status())["last_error"] or "")
                      and s, what="the agent saying the disk is full")  # fmt: skip
    assert f"cannot write reports to the spool {tiny_spool}" in status["last_error"]
    cli = kitt.run("agent", "status")
    assert cli.returncode == 0 and "No space left on device" in " ".join(cli.stdout.split())
    # Nothing half-written: the spool holds exactly what it held, each item whole.
    assert sorted(p.name for p in tiny_spool.iterdir()) == [*on_disk, filler.name]
    assert spooled_lines(kitt) == expected[:10]

    # The server comes back while the disk is still full: what waited in memory arrives
    # after what was on disk, every line once, in order, and the result once.
    kitt.start_server("--lost-after", "10m")
    done = kitt.wait_status(test["id"], "completed")
    assert done["result"] == {"rounds": 2, "lines": 20}
    assert log_lines(kitt, test["id"]) == expected
    assert completions_logged(kitt, test["id"]) == 1
    wait_for(lambda: not spooled(kitt, "logs"), what="the on-disk reports acknowledged")

    # Room again: the next test's reports go through the disk, and the error clears.
    filler.unlink()
    after = kitt.submit("lines", LINES=2)
    kitt.wait_status(after["id"], "completed")
    wait_for(lambda: kitt.agent_status()["last_error"] is None, what="the error cleared")
    assert kitt.pid_of("agent") == agent_pid and kitt.agent("gpu-01")["online"]
    log = (kitt.home / "agent.log").read_text()
    # Said when the disk fills, not per report (twice at most: a retry that refills the
    # room freed by the delivery may find it full once more).
    assert 1 <= log.count("cannot write reports to the spool") <= 2
    assert "No space left on device" in log and "is writable again" in log
    assert "Traceback" not in log
    assert not (tiny_spool / "rejected").exists()


def test_spool_on_a_full_disk_keeps_order_and_caps_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The memory behind a full disk is capped for log batches only (a result is never
    dropped), and once there is room what waited is written out in its order."""
    caplog.set_level(logging.INFO, logger="kitt.agent.spool")
    with tmpfs(tmp_path / "spool") as folder:
        problems: list[str | None] = []
        spool = Spool(folder, on_problem=problems.append, held_max_bytes=2000)
        spool.put_status("tst_1", {"status": "running"})
        filler = fill(folder)
        for seq in range(1, 21):
            spool.put_logs("tst_1", [{"seq": seq, "ts": "t", "line": "x" * 100}])
        spool.put_result({"test_id": "tst_1", "status": "completed"})
        assert [p.name for p in spool.items()] == ["000000000001-status.json"]
        assert len(problems) == 1 and "No space left on device" in str(problems[0])
        kept = spool.held_count() - 1  # the log batches within the cap, then the result
        assert 0 < kept < 20

        filler.unlink()
        spool.write_held()
        assert spool.held_count() == 0 and problems[-1] is None
        names = [p.name for p in spool.items()]
        assert names == sorted(names) and names[-1].endswith("-result.json")
        seqs = [json.loads(p.read_text())["body"]["lines"][0]["seq"]
                for p in spool.items() if p.name.endswith("-logs.json")]  # fmt: skip
        assert seqs == list(range(1, kept + 1))
        assert f"{20 - kept} log batch(es) were dropped" in caplog.text
