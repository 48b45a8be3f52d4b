"""``kitt server backup`` / ``restore``: real server and agent processes, real SQLite files.

The backup is taken while an agent heartbeats into the database; the restore brings back
exactly what was backed up; bad files and a running server change nothing.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from conftest import Kitt, wait_for
from kitt.server.backup import head_revision

NAME = "gpu-01"


@pytest.fixture
def fleet(kitt: Kitt) -> Kitt:
    kitt.start_server()
    kitt.init_agent(NAME)
    kitt.add_benchmark("lines", "lines_and_result.py")
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent(NAME).get("status") == "idle", what="agent idle")
    return kitt


def data_dir(kitt: Kitt) -> Path:
    return kitt.home / "server"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def query(path: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, args))
    finally:
        conn.close()


def beats_in(path: Path) -> int:
    return int(query(path, "SELECT count(*) FROM heartbeats")[0][0])


def run_test(kitt: Kitt, lines: int) -> str:
    test_id = str(kitt.submit("lines", agent=NAME, LINES=lines)["id"])
    kitt.wait_status(test_id, "completed")
    return test_id


def log_text(kitt: Kitt, test_id: str) -> str:
    return kitt.api("GET", f"/api/v1/tests/{test_id}/logs", params={"format": "text"}).text


def test_backup_under_heartbeats_then_restore_brings_back_exactly_that(
    fleet: Kitt, tmp_path: Path
) -> None:
    kitt, live = fleet, data_dir(fleet) / "kitt.db"
    before = run_test(kitt, 3)
    wait_for(lambda: log_text(kitt, before).startswith("line 0"), what="logs of the first test")
    beats_before = beats_in(live)

    # Online backup while the agent keeps heartbeating (every 0.5 s) into the database.
    copy = tmp_path / "backups" / "kitt-backup.db"
    copy.parent.mkdir()
    done = kitt.run("server", "backup", str(copy))
    assert done.returncode == 0, done.stderr
    assert f"backup written: {copy} (" in done.stdout and "integrity ok" in done.stdout
    assert f"schema revision {head_revision()}; agents: 1, tests: 1, results: 0" in done.stdout
    assert mode(copy) == 0o600
    assert not list(copy.parent.glob("*-wal")) and not list(copy.parent.glob(".*"))
    assert query(copy, "PRAGMA integrity_check") == [("ok",)]
    assert query(copy, "PRAGMA journal_mode") == [("delete",)]  # one self-contained file
    assert query(copy, "SELECT version_num FROM alembic_version") == [(head_revision(),)]
    assert query(copy, "SELECT name FROM agents") == [(NAME,)]
    assert query(copy, "SELECT id, status FROM tests") == [(before, "completed")]
    assert query(copy, "SELECT line FROM test_logs WHERE test_id = ? ORDER BY seq", before)[:3] == [
        ("line 0",),
        ("line 1",),
        ("line 2",),
    ]
    in_copy = beats_in(copy)
    assert in_copy > beats_before
    # The writes went on during and after the copy: the live database moved past it.
    wait_for(lambda: beats_in(live) > in_copy, what="heartbeats after the backup")

    # An existing file is never replaced unasked; --force replaces it.
    again = kitt.run("server", "backup", str(copy))
    assert again.returncode == 1
    assert f"error: {copy} exists: name another file, or add --force" in again.stderr
    assert query(copy, "SELECT count(*) FROM heartbeats") == [(in_copy,)]
    forced = tmp_path / "forced.db"
    forced.write_text("old content")
    assert kitt.run("server", "backup", str(forced), "--force").returncode == 0
    assert query(forced, "SELECT id FROM tests") == [(before,)] and mode(forced) == 0o600

    after = run_test(kitt, 2)

    # A running server's database is never replaced.
    refused = kitt.run("server", "restore", str(copy), "--yes")
    assert refused.returncode == 1
    assert "the server is running (pid " in refused.stderr and "stop it first" in refused.stderr
    assert kitt.api("GET", f"/api/v1/tests/{after}").status_code == 200
    assert not list(data_dir(kitt).glob("kitt.db.before-restore-*"))

    kitt.run("server", "stop", check=True)
    # Without --yes it asks; no answer (stdin closed) calls it off.
    unanswered = kitt.run("server", "restore", str(copy))
    assert unanswered.returncode == 1 and "Aborted" in unanswered.stderr
    assert not list(data_dir(kitt).glob("kitt.db.before-restore-*"))

    restored = kitt.run("server", "restore", str(copy), "--yes")
    assert restored.returncode == 0, restored.stderr
    aside = list(data_dir(kitt).glob("kitt.db.before-restore-*"))
    old_db = next(p for p in aside if not p.name.endswith(("-wal", "-shm")))
    assert re.fullmatch(r"kitt\.db\.before-restore-\d{8}T\d{6}Z", old_db.name), aside
    assert f"previous database moved aside: {old_db}" in restored.stdout
    assert f"restored {copy} into {live} (mode 0600)" in restored.stdout
    assert "the schema is current" in restored.stdout
    assert all(mode(p) == 0o600 for p in [live, *aside])
    assert not Path(f"{live}-wal").exists()  # no WAL of the old database beside the new one
    # The old database, set aside, still holds the test made after the backup.
    assert {row[0] for row in query(old_db, "SELECT id FROM tests")} == {before, after}

    kitt.start_server()
    assert kitt.test_info(before)["status"] == "completed"
    assert log_text(kitt, before).startswith("line 0\nline 1\nline 2\n")
    gone = kitt.api("GET", f"/api/v1/tests/{after}")
    assert gone.status_code == 404, gone.text
    assert [a["name"] for a in kitt.agents()] == [NAME]


def test_bad_backups_are_refused_and_nothing_changes(kitt: Kitt, tmp_path: Path) -> None:
    nowhere = kitt.run("server", "backup", str(tmp_path / "x.db"))
    assert nowhere.returncode == 1 and "error: no database at " in nowhere.stderr
    kitt.start_server()
    kitt.run("server", "stop", check=True)
    live = data_dir(kitt) / "kitt.db"
    good = tmp_path / "good.db"
    # The server is stopped: a backup works just the same.
    assert kitt.run("server", "backup", str(good)).returncode == 0

    not_sqlite = tmp_path / "notes.db"
    not_sqlite.write_text("these are not the pages you are looking for\n" * 200)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE songs (title TEXT)")
    conn.close()
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    newer = tmp_path / "newer.db"
    shutil.copyfile(good, newer)
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    conn.close()
    cases = {
        not_sqlite: "is damaged or not a SQLite database: file is not a database",
        foreign: "is a SQLite database but not KITT's (it has no alembic_version table)",
        truncated: "is damaged",
        newer: "has schema revision '9999', which this KITT does not know",
        tmp_path / "missing.db": "no such backup file",
    }
    before = digest(live)
    for path, message in cases.items():
        result = kitt.run("server", "restore", str(path), "--yes")
        assert result.returncode == 1, (path, result.stdout)
        assert result.stderr.startswith(f"error: {path}") and message in result.stderr, (
            result.stderr
        )
        assert digest(live) == before
        assert sorted(p.name for p in data_dir(kitt).iterdir() if "kitt.db" in p.name) == [
            "kitt.db"
        ]
    # A PostgreSQL database is left to its own tools.
    pg = kitt.run("server", "backup", str(tmp_path / "pg.db"), "--database", "postgresql://k@db/k")
    assert pg.returncode == 2 and "pg_dump" in pg.stderr
    assert kitt.run("server", "restore", str(good), "--yes").returncode == 0
    # A new host: nothing to set aside, and the folder is made private.
    fresh = tmp_path / "new-host"
    moved = kitt.run("server", "restore", str(good), "--yes", "--data-dir", str(fresh))
    assert moved.returncode == 0 and "nothing to move aside" in moved.stdout
    assert mode(fresh) == 0o700 and mode(fresh / "kitt.db") == 0o600
    assert sorted(p.name for p in fresh.iterdir()) == ["kitt.db"]
