"""Fan EventHub wake-ups out to every server instance on one PostgreSQL database.

With several instances behind a load balancer, an agent may post its log lines to one
instance while a dashboard follows them on another. Each instance's hub tells the others
through PostgreSQL ``NOTIFY`` and hears them through ``LISTEN``: no broker to run, and a
notification is sent only after the change it announces has committed, so whoever wakes
reads it.

A notification carries only a topic (a test id, ``fleet``, ``work:<agent id>``), never
data: subscribers re-read the database, which stays the single source of truth. That is
also why losing notifications is survivable. While the listening connection is down
(PostgreSQL restarting, a network cut) notifications are lost, so after reconnecting the
relay wakes every local subscriber and calls ``on_resync``: each re-reads what it follows,
and the dispatcher re-reads which agents have pending work.

Sending is coalesced: topics published while a send is in flight go together in the next
one, each topic once, so a burst of heartbeats costs a handful of ``NOTIFY`` statements.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text

from kitt.server.store.db import CONNECT_TIMEOUT_S, describe_error

log = logging.getLogger(__name__)

CHANNEL = "kitt_events"
# How long the listener blocks before checking whether it should stop.
POLL_S = 1.0
# Reconnect delays after the database went away: quick at first, then every few seconds.
RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)
# A send that failed is not retried (the database is down: what it announced may not
# even have committed); one warning per this many seconds at most.
WARN_EVERY_S = 30.0
# libpq's TCP keepalives and timeout on the listening connection.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3, "tcp_user_timeout": 15_000}  # fmt: skip
_SEND = text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p")


class PgEventRelay:
    """``publish`` sends a topic to the other instances; ``deliver`` is called with each
    topic another instance published (on the relay's listener thread)."""

    def __init__(
        self,
        engine: Engine,
        deliver: Callable[[str], None],
        on_resync: Callable[[], None],
    ) -> None:
        self._engine = engine
        self._deliver = deliver
        self._on_resync = on_resync
        # Tells this instance's own notifications apart (it has woken its subscribers
        # already); random, so a restarted instance is a new one.
        self.instance = secrets.token_hex(6)
        self._cond = threading.Condition()
        self._outbox: dict[str, None] = {}  # ordered set of topics to send
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._last_warning = float("-inf")
        self._sender = threading.Thread(target=self._send_loop, name="relay-send", daemon=True)
        self._listener = threading.Thread(target=self._listen_loop, name="relay-listen",
                                          daemon=True)  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        """Start both threads; wait until the listener is listening, so that nothing
        another instance publishes after the start returns goes unheard."""
        self._listener.start()
        self._sender.start()
        if not self._listening.wait(timeout):
            log.warning("event relay: not listening yet; live events from other server "
                        "instances will arrive once the database answers")  # fmt: skip

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._sender.join(timeout=5)
        self._listener.join(timeout=POLL_S + 5)

    def publish(self, topic: str) -> None:
        with self._cond:
            self._outbox[topic] = None
            self._cond.notify()

    def _send_loop(self) -> None:
        """Send what was published, until stopped; what is left then goes out once more
        (the server's last writes, flushed while it stopped, are news to the others)."""
        while True:
            with self._cond:
                while not self._outbox and not self._stopping.is_set():
                    self._cond.wait()
                stopping = self._stopping.is_set()
                topics, self._outbox = list(self._outbox), {}
            if topics:
                self._send(topics)
            if stopping:
                return

    def _send(self, topics: list[str]) -> None:
        payloads = [f"{self.instance} {topic}" for topic in topics]
        try:
            with self._engine.begin() as conn:
                conn.execute(_SEND, {"channel": CHANNEL, "payloads": payloads})
        except Exception as exc:  # the thread must outlive any error: it is the only sender
            self._warn(f"cannot tell other server instances of {len(topics)} changes "
                       f"({describe_error(exc)}); they catch up when it answers")  # fmt: skip

    def _listen_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                conn = self._connect()
            except Exception as exc:  # SQLAlchemy's and the driver's own errors alike
                self._warn(f"cannot listen for other server instances' events: "
                           f"{describe_error(exc)}; retrying")  # fmt: skip
                self._stopping.wait(RETRY_S[min(failures, len(RETRY_S) - 1)])
                failures += 1
                continue
            try:
                if failures:
                    self._warn("listening again; every live stream re-reads")
                    self._resync()
                failures = 0
                self._listening.set()
                self._drain(conn)
            except Exception as exc:  # the driver's own errors (connection lost) included
                if self._stopping.is_set():
                    break
                self._warn(f"lost the database connection that hears other server "
                           f"instances ({describe_error(exc)}); reconnecting")  # fmt: skip
                failures = 1
                # Never a tight loop, whatever broke (a database refusing LISTEN, say).
                self._stopping.wait(RETRY_S[0])
            finally:
                _close_quietly(conn)

    def _connect(self) -> Any:
        """A connection of its own, outside the pool (it stays in LISTEN for good), made
        from the engine's own connection arguments (never a URL string: a password with
        a space would be refused, and quoted in the error). Keepalives: a silently cut
        network shows as an error within seconds, not after the kernel's 15 minutes."""
        import psycopg

        args, kwargs = self._engine.dialect.create_connect_args(self._engine.url)
        kwargs.update(
            autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
            application_name="kitt-server-events", **KEEPALIVES,
        )  # fmt: skip
        conn = psycopg.connect(*args, **kwargs)
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            _close_quietly(conn)
            raise
        return conn

    def _drain(self, conn: Any) -> None:
        prefix = f"{self.instance} "
        while not self._stopping.is_set():
            for note in conn.notifies(timeout=POLL_S):
                if note.payload.startswith(prefix):
                    continue
                _, _, topic = note.payload.partition(" ")
                if topic:
                    self._deliver(topic)
            # A connection that died quietly raises here rather than waiting forever.
            conn.execute("SELECT 1")

    def _resync(self) -> None:
        try:
            self._on_resync()
        except Exception as exc:
            self._warn(f"re-reading after a reconnect failed ({describe_error(exc)})")

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            log.warning("event relay: %s", message)


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):  # closing a connection that is already broken
        conn.close()
