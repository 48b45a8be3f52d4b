"""The operator's path end to end: server, init, daemonized agent, heartbeats, status, stop."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime

import psutil

from conftest import Kitt, wait_for


def test_agent_lifecycle_end_to_end(kitt: Kitt) -> None:
    kitt.start_server()
    assert kitt.run("server", "status").returncode == 0

    kitt.init_agent("gpu-01")
    t_before_start = time.time()
    started = kitt.run("agent", "start", check=True)
    assert "started" in started.stdout
    assert f"registered with {kitt.server_url} as agt_" in started.stdout
    pid = kitt.pid_of("agent")
    assert pid is not None and psutil.pid_exists(pid)
    # The daemon is detached: it is not our child and lives in its own session.
    assert os.getsid(pid) != os.getsid(0)
    assert (kitt.home / "agent.pid").stat().st_mode & 0o777 == 0o644
    assert (kitt.home / "agent.log").stat().st_mode & 0o777 == 0o600

    agent = wait_for(lambda: kitt.agent("gpu-01"), what="registration")
    assert agent["status"] == "idle" and agent["online"] is True
    assert agent["port"] == kitt.agent_port and agent["address"] == "127.0.0.1"

    beats = wait_for(
        lambda: len(kitt.heartbeats("gpu-01")) >= 3 and kitt.heartbeats("gpu-01"),
        what="three heartbeats",
    )
    # uptime_s is the agent process's own uptime: it grows with wall time between
    # heartbeats and never exceeds the time since `kitt agent start` began.
    age_limit = time.time() - t_before_start
    for earlier, later in itertools.pairwise(beats):
        wall = (
            datetime.fromisoformat(later["ts"]) - datetime.fromisoformat(earlier["ts"])
        ).total_seconds()
        assert abs((later["uptime_s"] - earlier["uptime_s"]) - wall) < 0.3
    assert 0 < beats[-1]["uptime_s"] <= age_limit
    # Heartbeats arrive at the server's interval (0.5 s ± jitter), not faster or slower.
    gaps = [
        (datetime.fromisoformat(b["ts"]) - datetime.fromisoformat(a["ts"])).total_seconds()
        for a, b in itertools.pairwise(beats)
    ]
    assert all(0.35 < g < 1.0 for g in gaps), gaps

    status = kitt.run("agent", "status")
    assert status.returncode == 0
    assert "gpu-01" in status.stdout and agent["id"] in status.stdout
    assert kitt.server_url in status.stdout

    again = kitt.run("agent", "start")
    assert again.returncode == 1 and "already running" in again.stderr

    stopped = kitt.run("agent", "stop")
    assert stopped.returncode == 0 and f"pid {pid}" in stopped.stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (kitt.home / "agent.pid").exists()
    assert kitt.run("agent", "status").returncode == 3
    assert "not running" in kitt.run("agent", "stop").stdout

    # The reaper, not a list call, marks it offline: watch the stored state flip.
    last_seen = datetime.fromisoformat(kitt.agent("gpu-01")["last_seen_at"])
    offline = wait_for(
        lambda: (a := kitt.agent("gpu-01")) and not a["online"] and a,
        timeout=10,
        what="agent marked offline",
    )
    assert offline["state"] == "offline"
    flipped_after = (datetime.now(last_seen.tzinfo) - last_seen).total_seconds()
    assert flipped_after >= 1.5  # 3 intervals of 0.5 s

    listing = kitt.run("agents", "list")
    assert listing.returncode == 0 and "gpu-01" in listing.stdout and "offline" in listing.stdout

    assert kitt.run("server", "stop").returncode == 0
    assert kitt.run("server", "status").returncode == 3


def test_sigterm_exits_zero_promptly_in_foreground(kitt: Kitt) -> None:
    kitt.start_server()
    kitt.init_agent("fg")
    proc = kitt.popen("agent", "start", "--foreground")
    wait_for(lambda: kitt.agent("fg"), what="foreground agent registered")
    assert kitt.pid_of("agent") == proc.pid
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 10
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert "received SIGTERM" in output
    assert not (kitt.home / "agent.pid").exists()


def test_stale_pid_file_is_replaced(kitt: Kitt) -> None:
    kitt.start_server()
    kitt.init_agent("stale")
    dead = psutil.Popen(["true"])
    dead.wait()
    (kitt.home / "agent.pid").write_text(f"{dead.pid}\n")
    status = kitt.run("agent", "status")
    assert status.returncode == 3 and "stale pid file" in status.stdout
    kitt.run("agent", "start", check=True)
    assert kitt.pid_of("agent") not in (None, dead.pid)
    wait_for(lambda: kitt.agent("stale"), what="registration after stale pid file")
    stop = kitt.run("agent", "stop")
    assert stop.returncode == 0


def test_stop_with_stale_pid_file_says_so(kitt: Kitt) -> None:
    kitt.init_agent("stale2")
    (kitt.home / "agent.pid").write_text("999999\n")
    result = kitt.run("agent", "stop")
    assert result.returncode == 0
    assert "stale pid file naming pid 999999" in result.stdout
    assert not (kitt.home / "agent.pid").exists()


def test_server_daemon_status_and_second_start(kitt: Kitt) -> None:
    kitt.start_server()
    pid = kitt.pid_of("server")
    assert pid is not None
    data = kitt.home / "server"
    assert data.stat().st_mode & 0o777 == 0o700
    assert (data / "kitt.db").stat().st_mode & 0o777 == 0o600
    health = kitt.api("GET", "/api/v1/health").json()
    assert health["status"] == "ok" and health["version"]
    second = kitt.run("server", "start", "--port", str(kitt.server_port))
    assert second.returncode == 1 and f"already running (pid {pid})" in second.stderr
    stop = kitt.run("server", "stop")
    assert stop.returncode == 0 and f"pid {pid}" in stop.stdout
    status = kitt.run("server", "status")
    assert status.returncode == 3 and "not running" in status.stdout


def test_version_and_kitt_agent_alias(kitt: Kitt) -> None:
    from kitt import __version__

    out = kitt.run("--version", check=True).stdout
    assert __version__ in out
    script = shutil.which("kitt-agent", path=os.path.dirname(sys.executable))
    assert script, "the kitt-agent console script is installed next to python"
    via_alias = subprocess.run(
        [script, "--help"], check=False, capture_output=True, text=True, env=kitt.env
    )
    via_kitt = kitt.run("agent", "--help")
    assert via_alias.returncode == 0

    def norm(text: str) -> str:
        return text.replace("kitt-agent", "X").replace("kitt agent", "X")

    assert norm(via_alias.stdout) == norm(via_kitt.stdout)
    assert "init" in via_alias.stdout and "status" in via_alias.stdout
