"""Retention: the reaper deletes old heartbeat history and (when asked) the logs of tests
finished long ago, in short batches; running tests, test rows and results are kept.

Real server and agent processes; the hidden ``--prune-every`` makes the reaper prune
every half second instead of every 5 minutes.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import event

from conftest import Kitt, wait_for
from kitt.protocol import Heartbeat, RegisterRequest
from kitt.server.store.agents import AgentStore, BeatRecord
from kitt.server.store.db import make_engine, migrate, sqlite_url
from kitt.server.store.models import HeartbeatSample
from kitt.server.store.retention import delete_in_batches

NAME = "gpu-01"


def start_fleet(kitt: Kitt, *retention: str) -> None:
    kitt.start_server("--prune-every", "0.5s", *retention)
    kitt.init_agent(NAME)
    kitt.add_benchmark("lines", "lines_and_result.py")
    kitt.add_benchmark("hold", "hold.py")
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent(NAME).get("status") == "idle", what="agent idle")


def log_text(kitt: Kitt, test_id: str) -> str:
    response = kitt.api("GET", f"/api/v1/tests/{test_id}/logs", params={"format": "text"})
    assert response.status_code == 200, response.text
    return response.text


def oldest_beat(kitt: Kitt) -> datetime:
    beats = kitt.heartbeats(NAME, limit=1000)
    return min(datetime.fromisoformat(b["ts"].replace("Z", "+00:00")) for b in beats)


def wait_for_heartbeat_pruning_past(kitt: Kitt, moment: datetime) -> None:
    """Until every heartbeat up to ``moment`` has been pruned: proof that a prune pass ran
    after ``moment`` + the heartbeat retention (logs are pruned first in each pass)."""
    wait_for(lambda: oldest_beat(kitt) > moment, timeout=30, what=f"no heartbeat before {moment}")


def server_log(kitt: Kitt) -> str:
    return (kitt.home / "server" / "server.log").read_text()


def test_old_logs_of_finished_tests_go_running_ones_stay(kitt: Kitt, tmp_path: Path) -> None:
    start_fleet(kitt, "--log-retention", "2s", "--heartbeat-retention", "3s")
    assert "test logs 0:00:02 after the test finished" in server_log(kitt)
    done = kitt.submit("lines", agent=NAME, LINES=3)["id"]
    kitt.wait_status(done, "completed")
    lines = log_text(kitt, done).splitlines()
    assert lines[:3] == ["line 0", "line 1", "line 2"], lines

    release = tmp_path / "release"
    held = kitt.submit("hold", agent=NAME, RELEASE=str(release), PIDS=str(tmp_path / "pids"))
    kitt.wait_status(held["id"], "running")
    wait_for(lambda: log_text(kitt, held["id"]) == "holding\n", what="the running test's log")
    logged = datetime.now(timezone.utc)

    wait_for(lambda: log_text(kitt, done) == "", what="the finished test's logs pruned")
    pruned = re.findall(r"INFO +kitt\.server\.reaper: pruned (\d+) log lines of (\d+) tests",
                        server_log(kitt))  # fmt: skip
    assert pruned == [(str(len(lines)), "1")]
    # The test itself and its result stay.
    info = kitt.test_info(done)
    assert info["status"] == "completed" and info["result"]["lines"] == 3

    # A pass that ran well past the running test's lines' age still kept them.
    wait_for_heartbeat_pruning_past(kitt, logged)
    assert log_text(kitt, held["id"]) == "holding\n"
    assert kitt.test_info(held["id"])["status"] == "running"
    # Heartbeat retention: only the last ~3 s (+ a prune period) of history is left.
    assert oldest_beat(kitt) > datetime.now(timezone.utc) - timedelta(seconds=10)

    # Once it finishes, its log ages out like any other.
    release.touch()
    kitt.wait_status(held["id"], "completed")
    wait_for(lambda: log_text(kitt, held["id"]) == "", what="the second test's logs pruned")
    assert kitt.test_info(held["id"])["result"] == {"released": True}


def test_logs_are_kept_forever_by_default(kitt: Kitt) -> None:
    start_fleet(kitt, "--heartbeat-retention", "1s")
    assert "test logs kept forever" in server_log(kitt)
    done = kitt.submit("lines", agent=NAME, LINES=2)["id"]
    kitt.wait_status(done, "completed")
    finished = datetime.now(timezone.utc)
    text = log_text(kitt, done)
    assert text.startswith("line 0\nline 1\n")

    wait_for_heartbeat_pruning_past(kitt, finished + timedelta(seconds=2))
    assert log_text(kitt, done) == text
    assert "log lines" not in server_log(kitt)
    assert re.search(r"pruned \d+ heartbeat samples older than", server_log(kitt))


def test_deletes_go_in_bounded_transactions(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "kitt.db"))
    migrate(engine)
    store = AgentStore(engine)
    now = datetime.now(timezone.utc)
    agent, _ = store.register(
        RegisterRequest(name="a", hostname="h", port=1, kitt_version="x"), None, now
    )
    beat = Heartbeat(status="idle", uptime_s=1)
    old = [BeatRecord(agent, now - timedelta(hours=1, seconds=i), beat) for i in range(10)]
    store.record_beats([*old, BeatRecord(agent, now, beat)])
    commits: list[int] = []
    event.listen(engine, "commit", lambda conn: commits.append(1))

    table = HeartbeatSample.__table__
    deleted = delete_in_batches(
        engine, table, [table.c.id], table.c.ts < now - timedelta(minutes=1), batch=3
    )
    assert deleted == 10
    assert len(commits) == 4  # 3 + 3 + 3 + 1 rows, each batch its own transaction
    assert [b.ts for b in store.heartbeats(agent, None, 100)] == [now]

    # A pass stops when its time is up (the reaper has other work); the next goes on.
    store.record_beats(old)
    cutoff = table.c.ts < now - timedelta(minutes=1)
    assert delete_in_batches(engine, table, [table.c.id], cutoff, batch=3, budget_s=0) == 3
    assert delete_in_batches(engine, table, [table.c.id], cutoff, batch=3, budget_s=60) == 7
