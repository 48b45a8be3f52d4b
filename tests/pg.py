"""A throwaway PostgreSQL cluster for the tests: ``initdb`` + ``pg_ctl`` in a temporary
folder, listening only on a unix socket in that folder (nothing on the network, trust
authentication is then harmless), with durability off (a test database is never worth
an fsync). One cluster per test session; each sandbox gets a fresh database in it.

PostgreSQL refuses to run as root, so under root the cluster runs as the ``postgres``
account (the one Debian's packages create), else as ``nobody``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ports import free_port

SUPERUSER = "kitt"
# Enough for several servers (pool of up to 32 each) at once plus the tests' own.
MAX_CONNECTIONS = 400


def find_bindir() -> Path | None:
    """Where initdb/pg_ctl live: $KITT_PG_BINDIR, Debian's newest version, else PATH."""
    named = os.environ.get("KITT_PG_BINDIR")
    candidates = [Path(named)] if named else []
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: -int(p.name))]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _run_as() -> pwd.struct_passwd | None:
    """The account the cluster runs as (None: this one, which is not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and there is no 'postgres' or 'nobody' account")


@dataclass
class PgCluster:
    bindir: Path
    root: Path
    port: int
    account: pwd.struct_passwd | None
    databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    def url(self, database: str, password: str | None = None) -> str:
        """A URL for ``database`` (a password, when given, is accepted and ignored)."""
        secret = f":{password}" if password else ""
        return (
            f"postgresql://{SUPERUSER}{secret}@/{database}?host={self.socket_dir}&port={self.port}"
        )

    def _tool(self, *argv: str) -> subprocess.CompletedProcess[str]:
        user = self.account.pw_uid if self.account else None
        group = self.account.pw_gid if self.account else None
        proc = subprocess.run(
            argv, user=user, group=group, capture_output=True, text=True, timeout=120,
            stdin=subprocess.DEVNULL, cwd=self.root, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            log = self.root / "postgres.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout}{proc.stderr}\n{tail}")
        return proc

    def start(self) -> None:
        self._tool(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses='' "
            f"-c max_connections={MAX_CONNECTIONS} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c shared_buffers=64MB"
        )
        self._tool(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "postgres.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip

    def restart(self) -> None:
        """Stop and start the server (data kept): what a database failover looks like."""
        # -l: the restarted server must not keep this process's output pipe open.
        log = str(self.root / "postgres.log")
        self._tool(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", log,
                   "-m", "fast", "-w", "restart")  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, OSError, subprocess.SubprocessError):
            self._tool(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                       "-w", "stop")  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)

    def admin(self, sql: str) -> None:
        """Run ``sql`` outside a transaction in the maintenance database."""
        import psycopg

        with psycopg.connect(
            host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname="postgres",
            autocommit=True,
        ) as conn:  # fmt: skip
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self) -> str:
        """A new, empty database; returns its name."""
        name = f"kitt_{uuid.uuid4().hex[:12]}"
        self.admin(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return name

    def drop_database(self, name: str) -> None:
        """Drop it even if a killed server's connections linger (they are cut)."""
        with contextlib.suppress(Exception):
            self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_cluster() -> Iterator[PgCluster]:
    """Start a cluster, yield it, and remove it whatever happens."""
    bindir = find_bindir()
    if bindir is None:
        raise FileNotFoundError("no PostgreSQL server binaries (initdb, pg_ctl, postgres)")
    account = _run_as()
    # Short and in /tmp: a unix socket path must stay under ~100 bytes.
    root = Path(tempfile.mkdtemp(prefix="kitt-pg-", dir="/tmp"))
    if account is not None:
        os.chown(root, account.pw_uid, account.pw_gid)
    cluster = PgCluster(bindir=bindir, root=root, port=free_port(), account=account)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
