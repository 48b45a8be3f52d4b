"""Backup and restore of the server's SQLite database.

A backup is taken online through SQLite's backup API in one step: it copies one consistent
snapshot while the server goes on writing (WAL readers never block the writer), so there
is no need to stop the server. Copying ``kitt.db`` with ``cp`` instead can tear a page
mid-write and leaves out whatever still sits in ``kitt.db-wal``.

A restore replaces the database file, so it refuses while a server has it open, and holds
the server's pid-file lock meanwhile so that no server starts half-way. Every file is
checked before anything is touched, and the database it replaces is moved aside, never
deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from kitt.errors import AlreadyRunningError, KittError
from kitt.paths import PRIVATE_DIR, PRIVATE_FILE, ServerPaths, ensure_dir
from kitt.process import PidFile, pid_state

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

# What a backup or restore reports (table, label, query); tables a database of an old
# revision lacks are left out.
COUNTS = (
    ("agents", "agents", "SELECT count(*) FROM agents"),
    ("tests", "tests", "SELECT count(*) FROM tests"),
    ("bench_results", "results", "SELECT count(*) FROM bench_results"),
)
SQLITE_SIDE_FILES = ("-wal", "-shm")


class BackupError(KittError):
    """A backup or restore could not be made; nothing was changed."""


class NotSqliteError(KittError):
    """The database is not SQLite: its own tools do this (exit 2: the operator must act)."""

    exit_code = 2


@dataclass(frozen=True)
class DatabaseFacts:
    """What a checked database holds: its schema revision and row counts."""

    path: Path
    size: int
    revision: str
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        counted = ", ".join(f"{what}: {n}" for what, n in self.counts.items())
        return f"schema revision {self.revision}; {counted}"


@dataclass(frozen=True)
class RestoreOutcome:
    facts: DatabaseFacts
    database: Path
    # Where the replaced database (and its -wal/-shm) went; empty when there was none.
    moved_aside: list[Path]


def sqlite_file(database_url: str | None, paths: ServerPaths) -> Path:
    """The SQLite file behind ``database_url`` (None: the data folder's ``kitt.db``)."""
    if not database_url:
        return paths.database
    if database_url.startswith("sqlite:///"):
        return Path(database_url.removeprefix("sqlite:///")).absolute()
    scheme = database_url.split(":", 1)[0]
    hint = ""
    if scheme.startswith("postgres"):
        hint = (
            ": back a PostgreSQL database up with its own tools, e.g. "
            "`pg_dump --format=custom --file=kitt.dump DATABASE_URL`, and restore it with "
            "`pg_restore --clean --dbname=DATABASE_URL kitt.dump` while the servers are stopped"
        )
    raise NotSqliteError(
        f"kitt server backup/restore handle SQLite only, not a {scheme!r} database{hint}"
    )


def _migrations() -> ScriptDirectory:
    # Imported here: Alembic takes half a second to import, which a backup never needs.
    from alembic.script import ScriptDirectory

    from kitt.server.store.db import MIGRATIONS

    return ScriptDirectory(str(MIGRATIONS))


def head_revision() -> str:
    """The newest schema revision this KITT's migrations know."""
    head = _migrations().get_current_head()
    if head is None:
        raise KittError("this KITT has no schema revisions: its installation is incomplete")
    return head


def known_revisions() -> set[str]:
    return {script.revision for script in _migrations().walk_revisions()}


def inspect_database(path: Path, name: Path | None = None) -> DatabaseFacts:
    """Check that ``path`` is an undamaged KITT database; say what it holds.

    Raises :class:`BackupError` naming what is wrong: not SQLite, damaged (the result of
    ``PRAGMA integrity_check``), or SQLite but not KITT's (no Alembic version). Messages
    and the facts call the file ``name`` (the user's file when ``path`` is a copy of it).
    """
    size = path.stat().st_size
    shown = name or path
    if size == 0:
        raise BackupError(f"{shown} is empty, not a KITT database")
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open {shown}: {exc}") from exc
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise BackupError(f"{shown} is damaged (integrity check: {'; '.join(problems)})")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if "alembic_version" not in tables:
            raise BackupError(
                f"{shown} is a SQLite database but not KITT's (it has no alembic_version table)"
            )
        versions = [row[0] for row in conn.execute("SELECT version_num FROM alembic_version")]
        if len(versions) != 1:
            raise BackupError(f"{shown} names {len(versions)} schema revisions, not one")
        counts = {
            label: int(conn.execute(query).fetchone()[0])
            for table, label, query in COUNTS
            if table in tables
        }
    except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed", ...
        raise BackupError(f"{shown} is damaged or not a SQLite database: {exc}") from exc
    finally:
        conn.close()
    return DatabaseFacts(shown, size, str(versions[0]), counts)


def backup_database(database: Path, dest: Path, *, force: bool = False) -> DatabaseFacts:
    """Copy ``database`` to ``dest`` (0600) while a server may be writing to it, and check
    the copy. ``dest`` appears only once the copy is complete and checked."""
    dest = dest.absolute()
    if not database.is_file():
        raise BackupError(
            f"no database at {database}: has a server been started with this --data-dir?"
        )
    if dest.is_dir():
        raise BackupError(f"{dest} is a folder: name the backup file, e.g. {dest}/kitt.db")
    if dest.exists() and dest.resolve() == database.resolve():
        raise BackupError(f"{dest} is the live database itself: name another file")
    if dest.exists() and not force:
        raise BackupError(f"{dest} exists: name another file, or add --force to replace it")
    if not dest.parent.is_dir():
        raise BackupError(f"folder {dest.parent} does not exist")
    tmp = _private_temp(dest)
    try:
        _copy_online(database, tmp)
        facts = inspect_database(tmp, dest)
        _fsync(tmp)
        _publish(tmp, dest, force)
        _fsync(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return facts


def _private_temp(near: Path) -> Path:
    """An empty 0600 file in ``near``'s folder (same file system, so a rename publishes it)."""
    try:
        fd, name = tempfile.mkstemp(dir=near.parent, prefix=f".{near.name}.", suffix=".tmp")
    except OSError as exc:
        raise BackupError(f"cannot write in {near.parent}: {exc.strerror or exc}") from exc
    os.close(fd)
    return Path(name)


def _copy_online(database: Path, dest: Path) -> None:
    try:
        # mode=rw: never create an empty database where the live one should be.
        source = sqlite3.connect(f"{database.absolute().as_uri()}?mode=rw", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open the database {database}: {exc}") from exc
    try:
        target = sqlite3.connect(dest)
        try:
            # All pages in one step: stepwise copying restarts whenever another connection
            # writes, which under a steady heartbeat load could never finish.
            source.backup(target)
            # A self-contained file: no -wal beside the backup to lose when it is moved.
            target.execute("PRAGMA journal_mode=DELETE")
        finally:
            target.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy the database {database}: {exc}") from exc
    finally:
        source.close()


def _publish(tmp: Path, dest: Path, force: bool) -> None:
    try:
        if force:
            os.replace(tmp, dest)
        else:
            os.link(tmp, dest)  # fails if dest appeared meanwhile: never replaced unasked
    except FileExistsError:
        raise BackupError(f"{dest} exists: name another file, or add --force") from None
    except OSError as exc:
        raise BackupError(f"cannot write {dest}: {exc.strerror or exc}") from exc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore_database(
    paths: ServerPaths,
    database: Path,
    backup: Path,
    confirm: Callable[[DatabaseFacts], None] | None = None,
) -> RestoreOutcome:
    """Put ``backup`` in place of ``database`` while no server runs.

    The backup is copied next to the database and checked first (a full disk or a bad file
    stops here, with nothing touched); then the current database and its -wal/-shm are
    renamed aside and the checked copy renamed in. ``confirm`` sees what is about to be
    restored and may raise to call it off.
    """
    backup = backup.absolute()
    if not backup.is_file():
        raise BackupError(f"{backup}: no such backup file")
    if database.exists() and backup.resolve() == database.resolve():
        raise BackupError(f"{backup} is the live database itself")
    _refuse_if_running(paths)
    ensure_dir(database.parent, PRIVATE_DIR)
    lock = PidFile(paths.pid, "server")
    try:
        lock.acquire()  # a server started now fails instead of opening a half-swapped file
    except AlreadyRunningError:
        _refuse_if_running(paths)
        raise
    try:
        staged = _private_temp(database)
        try:
            try:
                shutil.copyfile(backup, staged)
            except OSError as exc:
                raise BackupError(f"cannot copy {backup}: {exc.strerror or exc}") from exc
            facts = inspect_database(staged, backup)
            _check_revision(backup, facts.revision)
            if confirm is not None:
                confirm(facts)
            _fsync(staged)
            moved = _move_aside(database)
            try:
                os.replace(staged, database)
                os.chmod(database, PRIVATE_FILE)
                _fsync(database.parent)
            except OSError as exc:
                _put_back(moved, database)
                raise BackupError(f"cannot put the backup in place: {exc}") from exc
        finally:
            staged.unlink(missing_ok=True)
    finally:
        lock.release()
    return RestoreOutcome(facts, database, moved)


def _refuse_if_running(paths: ServerPaths) -> None:
    state = pid_state(paths.pid)
    if state.state == "running":
        raise BackupError(
            f"the server is running (pid {state.pid}): stop it first with "
            "`kitt server stop`, then restore"
        )


def _check_revision(backup: Path, revision: str) -> None:
    if revision not in known_revisions():
        raise BackupError(
            f"{backup} has schema revision {revision!r}, which this KITT does not know (its "
            f"newest is {head_revision()}): it was made by a newer KITT; restore it with "
            "that version"
        )


def _move_aside(database: Path) -> list[Path]:
    """Rename the database and its -wal/-shm to ``kitt.db.before-restore-<UTC time>``
    (+ the same suffixes, so SQLite still pairs them). Returns the new names."""
    if not database.exists():
        return []
    with contextlib.suppress(sqlite3.Error):
        # Fold the WAL into the file so the set-aside database is one self-contained file;
        # a damaged database (perhaps why it is being replaced) keeps its WAL beside it.
        conn = sqlite3.connect(f"{database.absolute().as_uri()}?mode=rw", uri=True, timeout=5)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = database.with_name(f"{database.name}.before-restore-{stamp}")
    n = 1
    while any(Path(f"{aside}{s}").exists() for s in ("", *SQLITE_SIDE_FILES)):
        n += 1
        aside = database.with_name(f"{database.name}.before-restore-{stamp}-{n}")
    moved: list[Path] = []
    try:
        for suffix in ("", *SQLITE_SIDE_FILES):
            src = Path(f"{database}{suffix}")
            if src.exists():
                dst = Path(f"{aside}{suffix}")
                os.replace(src, dst)
                moved.append(dst)
                os.chmod(dst, PRIVATE_FILE)
    except OSError as exc:
        _put_back(moved, database)
        raise BackupError(f"cannot move {database} aside: {exc}") from exc
    return moved


def _put_back(moved: list[Path], database: Path) -> None:
    """Undo :func:`_move_aside` (the first path moved is the database itself)."""
    if not moved:
        return
    aside = moved[0]
    for path in moved:
        suffix = str(path).removeprefix(str(aside))
        with contextlib.suppress(OSError):
            os.replace(path, Path(f"{database}{suffix}"))
