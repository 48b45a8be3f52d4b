"""The server daemon: database, HTTP listener and reaper, started and stopped as one."""

from __future__ import annotations

import json
import logging
import os

from sqlalchemy import Engine

from kitt import __version__
from kitt.errors import KittError
from kitt.http import WsgiServer
from kitt.paths import ensure_dir, write_private
from kitt.process import run_steps
from kitt.server.app import create_app
from kitt.server.dispatcher import Dispatcher
from kitt.server.events import EventHub
from kitt.server.reaper import Reaper
from kitt.server.settings import ServerSettings
from kitt.server.store.agents import AgentStore, HeartbeatWriter, heartbeat_writer
from kitt.server.store.db import make_engine, migrate, sqlite_url
from kitt.server.store.logs import LogStore
from kitt.server.store.tests import TestStore

log = logging.getLogger(__name__)


def open_database(settings: ServerSettings) -> Engine:
    ensure_dir(settings.paths.data_dir, 0o700)
    try:
        engine = make_engine(sqlite_url(settings.paths.database))
    except OSError as exc:
        raise KittError(f"cannot open the database: {exc}") from exc
    migrate(engine)
    return engine


class ServerDaemon:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._http: WsgiServer | None = None
        self._reaper: Reaper | None = None
        self._heartbeats: HeartbeatWriter | None = None
        self._dispatcher: Dispatcher | None = None
        self._events: EventHub | None = None

    def start(self) -> None:
        self._http = WsgiServer(
            None,
            self.settings.host,
            self.settings.port,
            numthreads=self.settings.numthreads,
            name="kitt-server",
        )
        self._http.bind()  # a port clash fails the start before the database is touched
        self._engine = open_database(self.settings)
        store = AgentStore(self._engine)
        events = self._events = EventHub()
        tests = TestStore(self._engine, on_change=events.notify)
        self._heartbeats = heartbeat_writer(store)
        self._heartbeats.start()
        self._dispatcher = Dispatcher(tests, store)
        self._dispatcher.start()
        self._http.set_app(
            create_app(
                self.settings,
                store,
                self._heartbeats,
                tests,
                self._dispatcher,
                LogStore(self._engine),
                events,
            )
        )
        self._http.start()
        self._reaper = Reaper(store, tests, self.settings)
        self._reaper.start()
        url = f"http://{_url_host(self.settings.host)}:{self._http.bound_port}"
        write_private(
            self.settings.paths.endpoint,
            json.dumps({"url": url, "pid": os.getpid(), "version": __version__}),
        )
        log.info(
            "kitt server %s listening on %s (database %s, heartbeat %g s, offline after %g s)",
            __version__,
            url,
            self._engine.url.render_as_string(hide_password=True),
            self.settings.heartbeat_interval_s,
            self.settings.offline_after_s,
        )
        if self.settings.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "listening on %s without TLS or authentication: anyone who can reach this "
                "port can register agents and read the fleet",
                self.settings.host,
            )

    def hurry(self) -> None:
        """Nothing to hurry: the server's stop never waits on long-running work."""

    def stop(self, drain: bool = False) -> None:
        # Every step runs even if one fails: a half-stopped server never exits.
        steps = []
        if self._reaper is not None:
            steps.append(("reaper", self._reaper.stop))
        if self._events is not None:
            steps.append(("live streams", self._events.close))  # frees their threads
        if self._http is not None:
            steps.append(("listener", self._http.stop))
        if self._heartbeats is not None:
            steps.append(("heartbeat writer", self._heartbeats.stop))
        if self._dispatcher is not None:
            steps.append(("dispatcher", self._dispatcher.stop))
        if self._engine is not None:
            steps.append(("database", self._engine.dispose))
        steps.append(
            ("endpoint file", lambda: self.settings.paths.endpoint.unlink(missing_ok=True))
        )
        run_steps(steps)
        log.info("server stopped")


def _url_host(host: str) -> str:
    """The address a local client should use to reach a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
