"""The server daemon: database, HTTP listener and reaper, started and stopped as one."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket

from sqlalchemy import Engine

from kitt import __version__, pki
from kitt.errors import KittError
from kitt.http import CertFileWatcher, ListenerTls, WsgiServer
from kitt.paths import ensure_dir, write_private
from kitt.process import run_steps
from kitt.server.admin_token import ensure_admin_token
from kitt.server.api.agent_package import AgentDownloads
from kitt.server.app import create_app
from kitt.server.auth import Auth
from kitt.server.certs import ServerCerts
from kitt.server.dispatcher import Dispatcher
from kitt.server.event_relay import PgEventRelay
from kitt.server.events import EventHub
from kitt.server.package import PackageError, build_wheel, load_wheel
from kitt.server.reaper import Reaper
from kitt.server.settings import ServerSettings
from kitt.server.store.agents import AgentStore, HeartbeatWriter, heartbeat_writer
from kitt.server.store.credentials import CredentialStore
from kitt.server.store.db import is_postgres, make_engine, migrate, sqlite_url
from kitt.server.store.identity import check_ca
from kitt.server.store.logs import LogStore
from kitt.server.store.tests import TestStore
from kitt.server.store.web_sessions import WebSessionStore
from kitt.tokens import token_hash
from kitt.urls import is_loopback

log = logging.getLogger(__name__)


def open_database(settings: ServerSettings) -> Engine:
    """The server's database, migrated to the newest schema: ``settings.database_url``,
    else the SQLite file in the data folder."""
    ensure_dir(settings.paths.data_dir, 0o700)
    try:
        engine = make_engine(settings.database_url or sqlite_url(settings.paths.database))
    except OSError as exc:
        raise KittError(f"cannot open the database: {exc}") from exc
    try:
        migrate(engine)
    except BaseException:
        engine.dispose()
        raise
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
        self._relay: PgEventRelay | None = None

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            # The listener's worker threads already run once it is bound: without this a
            # start that fails later (bad --agent-package, database) would never exit.
            self.stop()
            raise

    def _start(self) -> None:
        settings = self.settings
        certs = self._prepare_certs() if settings.tls else None
        tls = None
        if certs is not None:
            # Client certificates are optional at the handshake (browsers, the CLI and
            # enrollment have none) and required per endpoint by the app.
            tls = ListenerTls(certs.cert, certs.key, certs.ca, require_client_cert=False)
        self._http = WsgiServer(
            None,
            settings.host,
            settings.port,
            numthreads=settings.numthreads,
            name="kitt-server",
            tls=tls,
        )
        self._http.bind()  # a port clash fails the start before the database is touched
        public_url = f"{self._http.scheme}://{_public_host(settings)}:{self._http.bound_port}"
        downloads = self._prepare_downloads(public_url)
        self._engine = open_database(settings)
        if certs is not None and is_postgres(self._engine):
            check_ca(self._engine, certs.fingerprint())
        store = AgentStore(self._engine)
        credentials = CredentialStore(self._engine)
        admin_hash = None
        if not settings.no_auth:
            admin_hash = token_hash(ensure_admin_token(settings.paths.admin_token)[0])
        sessions = WebSessionStore(self._engine)
        auth = Auth(credentials, admin_hash, tls=certs is not None, web_sessions=sessions)
        events = self._events = EventHub()
        tests = TestStore(self._engine, on_change=events.notify)
        self._heartbeats = heartbeat_writer(store)
        self._heartbeats.start()
        push_context = None
        if certs is not None:
            # The server's certificate is also its client certificate toward agents.
            push_context = pki.client_context(certs.ca, certs.cert, certs.key)
        shared = is_postgres(self._engine)  # other server instances may use it too
        self._dispatcher = Dispatcher(
            tests, store, credentials, push_context, hub=events,
            resync_every_s=settings.pending_resync_s if shared else None,
        )  # fmt: skip
        if shared:
            self._relay = _relay(self._engine, events, self._dispatcher)
        self._dispatcher.start()
        self._http.set_app(
            create_app(
                settings, store, self._heartbeats, tests, self._dispatcher,
                LogStore(self._engine), events, auth, certs, downloads,
            )
        )  # fmt: skip
        self._http.start()
        on_tick = None
        if certs is not None and push_context is not None:
            pushes, http = push_context, self._http

            def reload() -> None:
                http.reload_cert()
                pushes.load_cert_chain(str(certs.cert), str(certs.key))

            on_tick = CertFileWatcher(certs.cert, reload).check
        self._reaper = Reaper(store, tests, settings, credentials=credentials, on_tick=on_tick)
        self._reaper.start()
        url = f"{self._http.scheme}://{_url_host(settings.host)}:{self._http.bound_port}"
        endpoint = {"url": url, "pid": os.getpid(), "version": __version__}
        endpoint["public_url"] = public_url
        if certs is not None:
            endpoint["ca"] = str(certs.ca)
        write_private(settings.paths.endpoint, json.dumps(endpoint))
        log.info(
            "kitt server %s listening on %s (database %s, heartbeat %g s, offline after %g s)",
            __version__,
            url,
            self._engine.url.render_as_string(hide_password=True),
            settings.heartbeat_interval_s,
            settings.offline_after_s,
        )
        self._warn_about_exposure()

    def _prepare_downloads(self, public_url: str) -> AgentDownloads | None:
        """The agent wheel (shipped, or built of this very code) and the install script.

        A shipped wheel that is not usable fails the start (the operator asked for it);
        a build that fails only turns the install endpoints off: agents still work.
        """
        settings = self.settings
        if settings.agent_package is not None:
            package = load_wheel(settings.agent_package)
            if package.version != __version__:
                log.warning(
                    "serving agent package %s (version %s) while this server is %s: agents "
                    "will be told to run %s",
                    package.filename, package.version, __version__, package.version,
                )  # fmt: skip
        else:
            try:
                package = build_wheel(settings.paths.packages)
            except (PackageError, OSError) as exc:
                log.warning("not serving the agent installer: cannot build the package: %s", exc)
                return None
        wheelhouse = settings.wheelhouse or settings.paths.wheelhouse
        downloads = AgentDownloads.prepare(package, public_url, wheelhouse)
        log.info(
            "agent package %s (SHA-256 %s)%s; install script at %s/api/v1/agent/install.sh",
            package.filename,
            package.sha256,
            f", {len(downloads.wheels)} dependency wheels" if downloads.wheels else "",
            public_url,
        )
        return downloads

    def _prepare_certs(self) -> ServerCerts:
        certs = ServerCerts(self.settings.paths.certs)
        hostnames, ips = list(self.settings.hostnames), list(self.settings.ips)
        host = self.settings.host.strip("[]")
        if host not in ("0.0.0.0", "::", ""):  # the address it listens on is one agents use
            try:
                ipaddress.ip_address(host)
                ips.append(host)
            except ValueError:
                hostnames.append(host)
        try:
            for line in certs.ensure(hostnames, ips):
                log.info("%s", line)
            log.info("fleet CA %s, SHA-256 fingerprint %s", certs.ca, certs.fingerprint())
        except pki.PkiError as exc:
            raise KittError(f"cannot set up TLS: {exc}") from exc
        return certs

    def _warn_about_exposure(self) -> None:
        s = self.settings
        if s.no_auth:
            log.warning(
                "AUTHENTICATION IS OFF (--no-auth): any local user can control this server "
                "and register agents; never use this outside development"
            )
        if not s.tls and not is_loopback(s.host):
            log.warning(
                "INSECURE (--insecure): listening on %s over plain HTTP; tokens and test data "
                "cross the network in clear text",
                s.host,
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
        if self._relay is not None:  # after the writer's last batch: that is news too
            steps.append(("event relay", self._relay.stop))
        if self._dispatcher is not None:
            steps.append(("dispatcher", self._dispatcher.stop))
        if self._engine is not None:
            steps.append(("database", self._engine.dispose))
        steps.append(
            ("endpoint file", lambda: self.settings.paths.endpoint.unlink(missing_ok=True))
        )
        run_steps(steps)
        log.info("server stopped")


def _relay(engine: Engine, events: EventHub, dispatcher: Dispatcher) -> PgEventRelay:
    """Live events to and from other server instances on this PostgreSQL database,
    listening before the server takes its first request."""

    def resync() -> None:
        events.wake_all()
        dispatcher.resync()

    relay = PgEventRelay(engine, deliver=events.notify_local, on_resync=resync)
    relay.start()
    events.relay = relay.publish
    return relay


def _public_host(settings: ServerSettings) -> str:
    """The address other machines should use: what the operator named, else the address it
    listens on, else this host's name (all of them are in the server certificate)."""
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = (settings.hostnames or settings.ips or [socket.gethostname()])[0]
    return f"[{host}]" if ":" in host else host


def _url_host(host: str) -> str:
    """The address a local client should use to reach a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
