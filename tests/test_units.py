"""In-process tests of small pieces whose edge cases are cheaper to reach directly."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
import pytest

from kitt.agent.heartbeat import Backoff
from kitt.cli.common import Duration
from kitt.paths import ServerPaths
from kitt.protocol import Heartbeat, RegisterRequest
from kitt.server.reaper import Reaper
from kitt.server.settings import ServerSettings
from kitt.server.store.agents import AgentStore, BeatRecord
from kitt.server.store.db import make_engine, migrate, sqlite_url
from kitt.server.store.group_commit import GroupCommit, WriterStoppedError
from kitt.server.store.models import TestRun
from kitt.server.store.tests import TestStore
from kitt.urls import validate_server_url


def test_backoff_grows_to_cap_with_jitter_and_resets() -> None:
    b = Backoff(base=1.0, cap=8.0)
    delays = [b.next() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 8, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    b.reset()
    assert b.next() <= 1.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("30s", 30.0), ("0.5", 0.5), ("5m", 300.0), ("24h", 86400.0), ("2d", 172800.0),
     ("250ms", 0.25)],
)  # fmt: skip
def test_duration_parsing(text: str, seconds: float) -> None:
    assert Duration().convert(text, None, None) == seconds


@pytest.mark.parametrize("text", ["", "-5s", "0", "5 weeks", "abc"])
def test_duration_rejects_nonsense(text: str) -> None:
    with pytest.raises(click.BadParameter, match="positive duration"):
        Duration().convert(text, None, None)


def test_server_url_normalisation() -> None:
    assert validate_server_url(" https://Kitt.example:8443/ ") == "https://Kitt.example:8443"
    assert validate_server_url("http://[::1]:8080") == "http://[::1]:8080"


def test_group_commit_returns_each_result_and_batches_concurrent_items() -> None:
    seen: list[int] = []
    release = threading.Event()

    def write(items: Sequence[int]) -> list[int]:
        release.wait(5)  # hold the first batch so the others pile up behind it
        seen.append(len(items))
        return [i * 10 for i in items]

    gc: GroupCommit[int, int] = GroupCommit(write, name="t", linger_s=0)
    gc.start()
    results: dict[int, int] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, gc.submit(i))) for i in range(20)
    ]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(10)
    gc.stop()
    assert results == {i: i * 10 for i in range(20)}
    assert sum(seen) == 20 and len(seen) < 20  # some items shared a transaction


def test_group_commit_failure_reaches_every_waiter_and_stop_refuses_new_work() -> None:
    def write(items: Sequence[int]) -> list[int]:
        raise OSError("disk full")

    gc: GroupCommit[int, int] = GroupCommit(write, name="t")
    gc.start()
    with pytest.raises(OSError, match="disk full"):
        gc.submit(1)
    gc.stop()
    with pytest.raises(WriterStoppedError):
        gc.submit(2)


def _store(tmp_path: Path) -> AgentStore:
    engine = make_engine(sqlite_url(tmp_path / "kitt.db"))
    migrate(engine)
    migrate(engine)  # a second start finds the schema current: no-op
    return AgentStore(engine)


def test_reaper_marks_silent_agents_offline_and_prunes_old_history(tmp_path: Path) -> None:
    store = _store(tmp_path)
    now = datetime.now(timezone.utc)
    old, _ = store.register(
        RegisterRequest(name="old", hostname="h", port=1, kitt_version="x"), None, now
    )
    fresh, _ = store.register(
        RegisterRequest(name="fresh", hostname="h", port=1, kitt_version="x"), None, now
    )
    beat = Heartbeat(status="idle", uptime_s=1)
    store.record_beats([
        BeatRecord(old, now - timedelta(hours=30), beat),
        BeatRecord(old, now - timedelta(seconds=100), beat),
        BeatRecord(fresh, now, beat),
    ])  # fmt: skip
    settings = ServerSettings(
        paths=ServerPaths(tmp_path), heartbeat_interval_s=30, heartbeat_retention_s=24 * 3600
    )
    Reaper(store, TestStore(store.engine), settings, started=now - timedelta(days=1)).tick()
    states = {a.name: a.online for a in store.list_agents()}
    assert states == {"old": False, "fresh": True}  # 100 s > 3 x 30 s of silence
    history = store.heartbeats(old, None, 100)
    assert len(history) == 1 and history[0].ts == now - timedelta(seconds=100)
    assert len(store.heartbeats(fresh, None, 100)) == 1


def test_unknown_agent_in_a_batch_does_not_sink_the_others(tmp_path: Path) -> None:
    store = _store(tmp_path)
    now = datetime.now(timezone.utc)
    known, _ = store.register(
        RegisterRequest(name="k", hostname="h", port=1, kitt_version="x"), None, now
    )
    beat = Heartbeat(status="running", current_task="t1", uptime_s=5)
    assert store.record_beats(
        [BeatRecord("agt_gone", now, beat), BeatRecord(known, now, beat)]
    ) == [None, {}]  # unknown: None; known: its (empty) pushed settings
    agent = store.find("k")
    assert agent is not None and agent.status == "running" and agent.current_task == "t1"


def test_reaper_gives_agents_their_allowance_after_a_server_restart(tmp_path: Path) -> None:
    store = _store(tmp_path)
    now = datetime.now(timezone.utc)
    agent, _ = store.register(
        RegisterRequest(name="a", hostname="h", port=1, kitt_version="x"),
        None,
        now - timedelta(hours=1),
    )
    store.record_beats(
        [BeatRecord(agent, now - timedelta(hours=1), Heartbeat(status="idle", uptime_s=1))]
    )
    settings = ServerSettings(paths=ServerPaths(tmp_path), heartbeat_interval_s=30)
    Reaper(store, TestStore(store.engine), settings, started=now).tick()  # the server just started
    assert [a.online for a in store.list_agents()] == [True]
    Reaper(store, TestStore(store.engine), settings, started=now - timedelta(hours=1)).tick()
    assert [a.online for a in store.list_agents()] == [False]


def test_unconfirmed_dispatch_is_sent_again_on_an_idle_heartbeat(tmp_path: Path) -> None:
    from kitt.server.dispatcher import REDELIVER_AFTER_S, Dispatcher

    store = _store(tmp_path)
    tests = TestStore(store.engine)
    now = datetime.now(timezone.utc)
    agent, _ = store.register(
        RegisterRequest(name="a", hostname="h", port=1, kitt_version="x", capabilities=["b"]),
        None,
        now,
    )
    test = tests.create(
        agent_id=agent,
        agent_name="a",
        benchmark="b",
        engine=None,
        model=None,
        params={},
        created_at=now,
    )
    dispatcher = Dispatcher(tests, store)
    dispatcher.wake(agent)  # as a submit would (the worker thread is not started here)
    first = dispatcher.for_heartbeat(agent, "idle")
    assert [(c["type"], c["command_id"]) for c in first] == [("run_test", test.command_id)]
    assert dispatcher.for_heartbeat(agent, "idle") == []  # just sent: not yet
    with tests.sessions.begin() as s:  # as if it had been sent a while ago
        row = s.get(TestRun, test.id)
        assert row is not None and row.status == "dispatched"
        row.dispatched_at = now - timedelta(seconds=REDELIVER_AFTER_S + 1)
    again = dispatcher.for_heartbeat(agent, "idle")
    assert [c["command_id"] for c in again] == [test.command_id]  # the response was lost: resend
    assert dispatcher.for_heartbeat(agent, "running") == []  # never to a busy agent
    tests.transition(test.id, "running", started_at=now)
    assert dispatcher.for_heartbeat(agent, "idle") == []


def test_slow_reader_gets_one_gap_then_every_line_once(tmp_path: Path) -> None:
    from kitt.agent.log_streamer import End, Gap, JobLog

    log = JobLog(tmp_path / "log.jsonl", buffer_lines=100)
    for i in range(2000):  # a multiple of the disk catch-up chunk size, on purpose
        log.append(f"line {i}\n".encode())
    log.finish("completed")
    items = list(log.follow(after=0, keepalive_s=0.1))
    gaps = [i for i in items if isinstance(i, Gap)]
    seqs = [line.seq for item in items if isinstance(item, list) for line in item]
    assert [(g.first, g.last, g.recovered) for g in gaps] == [(1, 1900, True)]
    assert seqs == list(range(1, 2001))
    assert isinstance(items[-1], End) and items[-1].status == "completed"
    assert (tmp_path / "log.jsonl").stat().st_mode & 0o777 == 0o600


def test_refresh_never_forgets_work_woken_during_its_query(tmp_path: Path) -> None:
    from kitt.server.dispatcher import Dispatcher

    store = _store(tmp_path)
    now = datetime.now(timezone.utc)
    agent, _ = store.register(
        RegisterRequest(name="a", hostname="h", port=1, kitt_version="x"), None, now
    )
    tests = TestStore(store.engine)

    class Racing(Dispatcher):
        """Submits a test at the worst moment: while refresh() is querying."""

        raced = False

        def refresh(self, agent_id: str) -> None:
            original = self._tests.pending_for

            def pending_for(aid: str) -> list[TestRun]:
                found = original(aid)
                if not self.raced:
                    self.raced = True
                    tests.create(agent_id=aid, agent_name="a", benchmark="b", engine=None,
                                 model=None, params={}, created_at=now)  # fmt: skip
                    self.wake(aid)
                return found

            self._tests.pending_for = pending_for  # type: ignore[method-assign]
            try:
                super().refresh(agent_id)
            finally:
                self._tests.pending_for = original  # type: ignore[method-assign]

    dispatcher = Racing(tests, store)
    dispatcher.refresh(agent)  # nothing pending when it queries; a submit lands meanwhile
    commands = dispatcher.for_heartbeat(agent, "idle")
    assert [c["type"] for c in commands] == ["run_test"]


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("0::/system.slice/kitt-agent.service\n", "kitt-agent.service"),
        ("12:pids:/system.slice/kitt-agent@gpu1.service\n", "kitt-agent@gpu1.service"),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope\n", None),
        ("0::/user.slice/user-1000.slice/user@1000.service\n", None),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
        ("0::/\n", None),
    ],
)
def test_systemd_unit_from_cgroup(text: str, unit: str | None) -> None:
    from kitt.agent.upgrade import unit_in_cgroup

    assert unit_in_cgroup(text) == unit


def test_listeners_raise_their_open_files_limit_and_keep_spare_descriptors() -> None:
    import resource

    from kitt.http import keep_alive_limit, raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = raise_open_files_limit()
    assert raised >= soft
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
    if hard != resource.RLIM_INFINITY:
        assert raised == hard
    # Idle keep-alive connections never take the descriptors the server needs for itself.
    assert keep_alive_limit(1024) == 512
    assert keep_alive_limit(20_000) == 19_488
    assert keep_alive_limit(1 << 20) == 20_000
    assert keep_alive_limit(100) == 64
