"""Server settings, from ``kitt server start`` flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from kitt.paths import ServerPaths
from kitt.pki import DEFAULT_AGENT_CERT_LIFETIME
from kitt.protocol import DEFAULT_HEARTBEAT_INTERVAL_S, MISSED_HEARTBEATS_OFFLINE

DEFAULT_SERVER_PORT = 8080


@dataclass(frozen=True)
class ServerSettings:
    paths: ServerPaths
    # Where the control plane's state lives: None for the SQLite file in the data folder,
    # else a database URL (postgresql://USER:PASSWORD@HOST:PORT/DB; see store/db.py).
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_SERVER_PORT
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    heartbeat_retention_s: float = 2 * 24 * 3600.0
    # Log lines of tests finished longer ago than this are deleted (the tests and their
    # results stay); None keeps logs forever.
    log_retention_s: float | None = None
    # How often the reaper prunes history (tests shorten it to see pruning happen).
    prune_every_s: float = 300.0
    # On PostgreSQL, how often each instance re-reads which agents have pending work, in
    # case another instance's notification was lost (tests lengthen it to prove NOTIFY).
    pending_resync_s: float = 30.0
    numthreads: int = 64
    # A dispatched or running test whose agent stays offline this long is "lost".
    lost_after_s: float = 300.0
    # Security (ARCHITECTURE.md §6): HTTPS with the fleet CA, and tokens unless no_auth.
    tls: bool = False
    hostnames: list[str] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)
    no_auth: bool = False
    insecure: bool = False
    agent_cert_lifetime: timedelta = DEFAULT_AGENT_CERT_LIFETIME
    # Agent certificates expiring sooner than this are named in the log.
    cert_warn_before: timedelta = timedelta(days=14)
    # The agent software handed out: a shipped wheel, else one built of the running code;
    # dependency wheels from the wheelhouse folder when it has any.
    agent_package: Path | None = None
    wheelhouse: Path | None = None

    @property
    def offline_after_s(self) -> float:
        return MISSED_HEARTBEATS_OFFLINE * self.heartbeat_interval_s
