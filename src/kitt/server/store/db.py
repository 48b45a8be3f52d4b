"""Engine creation and schema migration.

SQLite is the embedded default: WAL so readers never block the heartbeat writer,
``synchronous=NORMAL`` (durable across process crashes; a power cut may lose the last
few heartbeats, never corrupt the file), foreign keys on, and a busy timeout so the
reaper and request threads queue instead of failing with "database is locked".

PostgreSQL (``postgresql://USER:PASSWORD@HOST:PORT/DB``) is for fleets past what one
SQLite file does well, and for several server instances on one database (live events
cross between them through server/event_relay.py). Its URLs are driven by psycopg 3
whatever driver they name, and never shown with their password.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as SATimeoutError

from kitt.errors import KittError

MIGRATIONS = Path(__file__).parent / "migrations"
# Held (per transaction) while migrating PostgreSQL, so that server instances starting
# together on one database do not both create the same tables.
_MIGRATION_LOCK = 0x6B697474  # "kitt"
# How long a PostgreSQL connection attempt may take before the start fails: long enough
# for a database across a slow link, short enough that a wrong host fails the start
# within the CLI's readiness wait.
CONNECT_TIMEOUT_S = 10


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def parse_url(url: str) -> URL:
    """``url`` checked and normalised: SQLite, or PostgreSQL driven by psycopg 3 (a bare
    ``postgresql://`` would make SQLAlchemy look for psycopg2, which KITT does not ship)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # a port that is not a number is a ValueError
        raise KittError(
            "the database URL is not one KITT can read: use postgresql://USER:PASSWORD@HOST"
            ":PORT/DATABASE or sqlite:///PATH"
        ) from None
    if parsed.host and "@" in parsed.host:
        # "kitt:se@cret@db": the host would be "cret@db", and part of the secret shown.
        raise KittError(
            "the database URL has an '@' in its password or host: percent-encode it "
            "(%40), or leave the password out and use PGPASSWORD or ~/.pgpass"
        )
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and parsed.drivername == "sqlite":
        return parsed
    raise KittError(
        f"unsupported database {parsed.drivername!r}: KITT runs on SQLite (the default) "
        "or PostgreSQL (postgresql://USER:PASSWORD@HOST:PORT/DATABASE)"
    )


def shown(url: str | URL) -> str:
    """The URL as it may be printed or logged: the password masked."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return "(an unreadable database URL)"
    if parsed.host and "@" in parsed.host:
        return "(a database URL with an unescaped '@')"
    # libpq also takes secrets as query parameters.
    query = {k: ("***" if "password" in k.lower() else v) for k, v in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=True)


def is_postgres(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "postgresql"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            # Create it 0600 ourselves: sqlite3 would honour the umask (often 0644).
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=16
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    parsed = parse_url(url)
    if parsed.drivername == "sqlite":
        raise KittError("an SQLite database URL names its file: sqlite:///PATH")
    engine = create_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=16,
        max_overflow=16,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "kitt-server"},
    )
    event.listen(engine, "connect", _postgres_adapters)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _postgres_adapters(dbapi_conn: Any, _record: Any) -> None:
    """PostgreSQL text cannot hold NUL characters, which SQLite stores as is; a log line
    of a benchmark's binary output may have one. Refusing it would fail the whole batch
    again at every retry of the agent's spool, so NUL is stored as U+FFFD instead."""
    from psycopg.types.string import StrBinaryDumper, StrDumperUnknown

    class NulSafeText(StrDumperUnknown):  # psycopg's default for str parameters
        def dump(self, obj: str) -> Any:
            return super().dump(obj.replace("\x00", "\ufffd"))

    class NulSafeBinary(StrBinaryDumper):
        def dump(self, obj: str) -> Any:
            return super().dump(obj.replace("\x00", "\ufffd"))

    dbapi_conn.adapters.register_dumper(str, NulSafeText)
    dbapi_conn.adapters.register_dumper(str, NulSafeBinary)


def describe_error(exc: BaseException) -> str:
    """One line saying what went wrong with the database: the driver's own words (which
    never carry the password), without SQLAlchemy's statement dump and help link."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return " ".join(str(cause).split()) or type(cause).__name__


# SQLSTATE classes of a database that is away, not of a wrong statement: connection
# exceptions, operator intervention (shutdown, restart), too many connections.
_UNAVAILABLE_SQLSTATES = ("08", "57P", "53300")


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is down, restarting or busy (retry shortly), as
    opposed to a bug in a statement, which must stay a loud 500."""
    if isinstance(exc, SATimeoutError):  # no pooled connection came free in time
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    cause = exc.orig
    state = getattr(cause, "sqlstate", None)
    if state is not None:
        return bool(str(state).startswith(_UNAVAILABLE_SQLSTATES))
    text = str(cause).lower()
    # psycopg's failures to connect or to keep a connection carry no SQLSTATE; SQLite's
    # only transient error is a lock held past the busy timeout.
    return isinstance(exc, (OperationalError, InterfaceError)) and (
        "database is locked" in text or type(cause).__module__.startswith("psycopg")
    )


def _connect(engine: Engine) -> Connection:
    try:
        return engine.connect()
    except SQLAlchemyError as exc:
        raise KittError(
            f"cannot connect to the database {shown(engine.url)}: {describe_error(exc)}"
        ) from exc


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None: not a KITT database yet)."""
    with _connect(engine) as conn:
        try:
            return MigrationContext.configure(conn).get_current_revision()
        except SQLAlchemyError as exc:
            raise KittError(
                f"cannot read the database {shown(engine.url)}: {describe_error(exc)}"
            ) from exc


def migrate(engine: Engine) -> str | None:
    """Bring the schema to the newest revision (a no-op when it already is); returns it."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    conn = _connect(engine)
    try:
        with conn, conn.begin():
            if is_postgres(conn):
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            return MigrationContext.configure(conn).get_current_revision()
    except Exception as exc:
        raise KittError(
            f"cannot migrate the database {shown(engine.url)}: {describe_error(exc)}"
        ) from exc
