"""Server settings, from ``kitt server start`` flags."""

from __future__ import annotations

from dataclasses import dataclass

from kitt.paths import ServerPaths
from kitt.protocol import DEFAULT_HEARTBEAT_INTERVAL_S, MISSED_HEARTBEATS_OFFLINE

DEFAULT_SERVER_PORT = 8080


@dataclass(frozen=True)
class ServerSettings:
    paths: ServerPaths
    host: str = "127.0.0.1"
    port: int = DEFAULT_SERVER_PORT
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    heartbeat_retention_s: float = 2 * 24 * 3600.0
    numthreads: int = 64
    # A dispatched or running test whose agent stays offline this long is "lost".
    lost_after_s: float = 300.0

    @property
    def offline_after_s(self) -> float:
        return MISSED_HEARTBEATS_OFFLINE * self.heartbeat_interval_s
