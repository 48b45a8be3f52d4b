"""KITT on PostgreSQL, whatever KITT_TEST_DATABASE says: the migrate command, a server
started with --database running a real agent's test, data kept across a restart, clear
one-line errors for a bad or unreachable database, and passwords never shown. Then the
store's PostgreSQL-only paths under real concurrency: racing dispatchers and reapers on
separate engines (as several server instances would be).

Skipped where PostgreSQL is not installed, unless KITT_REQUIRE_POSTGRES is set.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from conftest import Kitt, free_port, wait_for
from kitt.protocol import MAX_SEQ, Heartbeat, RegisterRequest
from kitt.server.backup import head_revision
from kitt.server.store.agents import AgentStore, BeatRecord
from kitt.server.store.db import make_engine, migrate
from kitt.server.store.logs import LogStore
from kitt.server.store.tests import TestStore
from pg import PgCluster

SECRET = "s3cret-Pa55word"


@pytest.fixture
def database(postgres: PgCluster) -> Iterator[str]:
    """A fresh database of the session's cluster (its name)."""
    name = postgres.create_database()
    yield name
    postgres.drop_database(name)


@pytest.fixture
def pg_kitt(kitt: Kitt, postgres: PgCluster, database: str) -> tuple[Kitt, str]:
    """A sandbox and a URL (with a password, which trust authentication ignores) that
    the tests name with --database: the environment does not carry one here."""
    kitt.env.pop("KITT_DATABASE_URL", None)
    return kitt, postgres.url(database, password=SECRET)


def query(postgres: PgCluster, database: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows straight from PostgreSQL (what the server wrote, not what its API says)."""
    with psycopg.connect(
        host=str(postgres.socket_dir), port=postgres.port, user="kitt", dbname=database
    ) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def printed(proc: Any) -> str:
    return str(proc.stdout) + str(proc.stderr)


def test_migrate_creates_the_schema_and_reports_the_revision(
    pg_kitt: tuple[Kitt, str], postgres: PgCluster, database: str
) -> None:
    kitt, url = pg_kitt
    head = head_revision()
    first = kitt.run("server", "migrate", "--database", url, check=True)
    assert f"revision {head} (schema created)" in first.stdout
    assert "kitt:***@" in first.stdout and SECRET not in printed(first)
    again = kitt.run("server", "migrate", "--database", url, check=True)
    assert f"revision {head} (already current)" in again.stdout
    assert query(postgres, database, "SELECT version_num FROM alembic_version") == [(head,)]
    types = dict(query(postgres, database, """
        SELECT table_name || '.' || column_name, data_type FROM information_schema.columns
        WHERE (table_name, column_name) IN (('heartbeats', 'id'), ('test_logs', 'seq'),
                                            ('agents', 'online'), ('tests', 'created_at'))
    """))  # fmt: skip
    assert types == {
        "heartbeats.id": "bigint",
        "test_logs.seq": "bigint",
        "agents.online": "boolean",
        "tests.created_at": "timestamp without time zone",
    }
    assert not (kitt.home / "server" / "kitt.db").exists()


def test_server_on_postgres_runs_a_test_and_keeps_everything_across_a_restart(
    pg_kitt: tuple[Kitt, str], postgres: PgCluster, database: str
) -> None:
    kitt, url = pg_kitt
    started = kitt.run(
        "server", "start", "--port", str(kitt.server_port), "--heartbeat-interval", "0.5",
        "--database", url, check=True,
    )  # fmt: skip
    assert "database: postgresql://kitt:***@/kitt_" in started.stdout
    kitt.init_agent("gpu-01")
    kitt.add_benchmark("lines", "lines_and_result.py", timeout_s=60)
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("gpu-01").get("status") == "idle", what="agent idle")
    test = kitt.submit("lines", lines=5)
    done = kitt.wait_status(test["id"], "completed")
    assert done["result"] == {"lines": 5, "params": {"lines": 5}, "model": None}
    wait_for(lambda: len(kitt.heartbeats("gpu-01")) >= 3, what="3 heartbeats stored")

    # It is all in PostgreSQL, and nothing went to an SQLite file.
    rows = query(
        postgres, database, "SELECT status, agent_name FROM tests WHERE id = %s", test["id"]
    )
    assert rows == [("completed", "gpu-01")]
    logged = query(
        postgres,
        database,
        "SELECT seq, line FROM test_logs WHERE test_id = %s ORDER BY seq",
        test["id"],
    )
    assert logged == [(i + 1, f"line {i}") for i in range(5)] + [(6, "to stderr")]
    (beats,) = query(postgres, database, "SELECT count(*) FROM heartbeats")[0]
    assert beats >= 3
    assert not (kitt.home / "server" / "kitt.db").exists()

    assert kitt.run("server", "stop", check=True).returncode == 0
    kitt.run(
        "server", "start", "--port", str(kitt.server_port), "--heartbeat-interval", "0.5",
        "--database", url, check=True,
    )  # fmt: skip
    again = kitt.test_info(test["id"])
    assert again["status"] == "completed" and again["result"] == done["result"]
    text = kitt.api("GET", f"/api/v1/tests/{test['id']}/logs", params={"format": "text"}).text
    assert text.splitlines() == [f"line {i}" for i in range(5)] + ["to stderr"]
    # The agent carries on with the restarted server: new heartbeats land.
    before = len(kitt.heartbeats("gpu-01"))
    wait_for(lambda: len(kitt.heartbeats("gpu-01")) > before, what="heartbeats after restart")
    second = kitt.submit("lines", lines=2)
    assert kitt.wait_status(second["id"], "completed")["result"]["lines"] == 2

    log = (kitt.home / "server" / "server.log").read_text()
    assert "kitt:***@" in log and SECRET not in log
    kitt.run("agent", "stop")
    kitt.run("server", "stop")


@pytest.mark.parametrize(
    ("make_url", "says"),
    [
        (
            lambda pg, port: f"postgresql://kitt:{SECRET}@127.0.0.1:{port}/kitt",
            "cannot connect to the database postgresql+psycopg://kitt:***@127.0.0.1:{port}/kitt",
        ),
        (
            lambda pg, port: pg.url("no_such_db", password=SECRET),
            'database "no_such_db" does not exist',
        ),
        (lambda pg, port: f"mysql://kitt:{SECRET}@db/kitt", "unsupported database 'mysql'"),
        (lambda pg, port: "not a database url", "is not one KITT can read"),
        (
            lambda pg, port: f"postgresql://kitt:{SECRET}@127.0.0.1:nope/kitt",
            "is not one KITT can read",
        ),
        # An unescaped '@' would make the password's tail the host, printed in errors.
        (
            lambda pg, port: f"postgresql://kitt:{SECRET}@x@127.0.0.1:{port}/kitt",
            "percent-encode it",
        ),
        (
            lambda pg, port: f"postgresql://kitt@127.0.0.1:{port}/kitt?password={SECRET}",
            "cannot connect to the database postgresql+psycopg://kitt@127.0.0.1:{port}/kitt?password=%2A%2A%2A",  # "***", URL-encoded
        ),
    ],
    ids=[
        "unreachable",
        "no-such-database",
        "other-engine",
        "malformed",
        "bad-port",
        "bare-at",
        "password-in-query",
    ],
)
def test_a_bad_or_unreachable_database_fails_with_one_clear_line(
    kitt: Kitt, postgres: PgCluster, make_url: Callable[[PgCluster, int], str], says: str
) -> None:
    port = free_port()  # nothing listens there
    url = make_url(postgres, port)
    expected = says.format(port=port)
    kitt.env.pop("KITT_DATABASE_URL", None)
    for argv in (
        ("server", "start", "--port", str(kitt.server_port), "--database", url),
        ("server", "migrate", "--database", url),
    ):
        proc = kitt.run(*argv, timeout=60)
        assert proc.returncode != 0, printed(proc)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], printed(proc)
        assert "Traceback" not in printed(proc) and SECRET not in printed(proc)
    assert kitt.run("server", "status").returncode == 3
    log = kitt.home / "server" / "server.log"
    assert not log.exists() or SECRET not in log.read_text()


# --- the store's PostgreSQL-only paths, on separate engines (as separate instances) -----


def run_together(workers: list[Callable[[], Any]]) -> list[Any]:
    """Run the callables in threads released at once; their results, in order."""
    gate = threading.Barrier(len(workers))
    results: list[Any] = [None] * len(workers)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        gate.wait()
        try:
            results[i] = workers[i]()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def instances(postgres: PgCluster, database: str, n: int) -> list[Any]:
    engines = [make_engine(postgres.url(database)) for _ in range(n)]
    migrate(engines[0])
    return engines


def test_racing_dispatchers_on_separate_engines_dispatch_each_test_once_one_per_agent(
    postgres: PgCluster, database: str
) -> None:
    engines = instances(postgres, database, 4)
    now = datetime.now(timezone.utc)
    agents = AgentStore(engines[0])
    stores = [TestStore(e) for e in engines]
    tests = []
    for i in range(8):
        name = f"gpu-{i:02}"
        agent_id, _ = agents.register(
            RegisterRequest(name=name, hostname="h", port=1, kitt_version="x"), None, now
        )
        tests += [
            stores[0].create(agent_id=agent_id, agent_name=name, benchmark="b", created_at=now)
            for _ in range(3)
        ]

    def dispatcher(store: TestStore) -> list[str]:
        won = []
        for test in tests:
            _, changed = store.transition(test.id, "dispatched", dispatched_at=now)
            if changed:
                won.append(test.id)
        return won

    # Two dispatcher threads per engine, eight in all, each trying every test: each test
    # goes at most once, and each agent gets exactly one (one test at a time per agent).
    wins = run_together([lambda s=s: dispatcher(s) for s in stores * 2])
    counts = Counter(test_id for won in wins for test_id in won)
    assert set(counts.values()) == {1}
    dispatched = [t for t in tests if stores[1].get(t.id).status == "dispatched"]  # type: ignore[union-attr]
    assert sorted(counts) == sorted(t.id for t in dispatched)
    assert sorted(t.agent_name for t in dispatched) == [f"gpu-{i:02}" for i in range(8)]
    for e in engines:
        e.dispose()


def test_racing_reapers_report_each_silent_agent_once(postgres: PgCluster, database: str) -> None:
    engines = instances(postgres, database, 3)
    stores = [AgentStore(e) for e in engines]
    now = datetime.now(timezone.utc)
    long_ago = now - timedelta(minutes=10)
    for i in range(10):
        stores[0].register(
            RegisterRequest(name=f"gpu-{i:02}", hostname="h", port=1, kitt_version="x"),
            None,
            long_ago,
        )
    silent = run_together(
        [lambda s=s: s.mark_offline(now, 1.0, now - timedelta(days=1)) for s in stores * 2]
    )
    reported = Counter(name for found in silent for name, _ in found)
    assert reported == Counter({f"gpu-{i:02}": 1 for i in range(10)})
    assert {a.online for a in stores[2].list_agents()} == {False}
    for e in engines:
        e.dispose()


def test_text_and_numbers_postgres_would_refuse_are_stored(
    postgres: PgCluster, database: str
) -> None:
    """NUL in a log line or heartbeat (PostgreSQL text cannot hold it) is stored as
    U+FFFD instead of failing the agent's batch at every retry; sequence numbers up to
    protocol.MAX_SEQ fit; a re-delivered batch adds nothing."""
    (engine,) = instances(postgres, database, 1)
    now = datetime.now(timezone.utc)
    agents = AgentStore(engine)
    agent_id, _ = agents.register(
        RegisterRequest(name="gpu-01", hostname="h\x00x", port=1, kitt_version="x"), None, now
    )
    agents.record_beats([BeatRecord(agent_id, now, Heartbeat(status="running",
                                                             current_task="a\x00b", uptime_s=1))])  # fmt: skip
    agent = agents.find("gpu-01")
    assert agent is not None and agent.hostname == "h\ufffdx" and agent.current_task == "a\ufffdb"
    test = TestStore(engine).create(
        agent_id=agent_id, agent_name="gpu-01", benchmark="b", created_at=now
    )
    logs = LogStore(engine)
    batch = [
        {"seq": 1, "ts": "t", "line": "bin\x00ary"},
        {"seq": MAX_SEQ, "ts": "t", "line": "last"},
    ]
    assert logs.ingest(test.id, batch) == 2
    assert logs.ingest(test.id, batch) == 0
    assert [tuple(r) for r in logs.read(test.id, 0)] == [
        (1, "t", "bin\ufffdary"),
        (MAX_SEQ, "t", "last"),
    ]
    engine.dispose()
