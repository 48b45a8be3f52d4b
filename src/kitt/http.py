"""The one place that builds HTTP clients and servers.

Every outbound call (agent → server, CLI → server, server → agent) gets its client from
:func:`build_client`, and both Flask apps are served by :class:`WsgiServer`. TLS settles
here: a client gets an SSL context carrying the CA and (for mutual TLS) a certificate,
and a listener gets cheroot's builtin TLS adapter with a context that verifies clients.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cheroot import errors, wsgi
from cheroot.server import HTTPConnection
from cheroot.ssl.builtin import BuiltinSSLAdapter

from kitt import __version__, pki
from kitt.errors import DaemonStartError

log = logging.getLogger(__name__)

USER_AGENT = f"kitt/{__version__}"


@dataclass(frozen=True)
class TlsFiles:
    """Certificate material for one side of a connection (all paths PEM)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def client_context(self, *, verify: bool = True) -> ssl.SSLContext:
        return pki.client_context(self.ca, self.cert, self.key, verify=verify)


@dataclass(frozen=True)
class ListenerTls:
    """HTTPS for a listener: its certificate, and the CA its clients' certificates need."""

    cert: Path
    key: Path
    ca: Path
    require_client_cert: bool


def build_client(
    base_url: str,
    *,
    token: str | None = None,
    tls: TlsFiles | None = None,
    insecure: bool = False,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> httpx.Client:
    """``ssl_context`` reuses a context built once (building one costs ~20 ms)."""
    headers = {"User-Agent": USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    # A plain-HTTP client never uses TLS (redirects are not followed), and building the
    # default SSL context costs ~20 ms: a dispatch push would pay it every time.
    verify: ssl.SSLContext | bool = False
    if base_url.startswith("https://"):
        if insecure:
            # Still present a client certificate: --insecure skips checking the server,
            # it must not silently drop our side of mutual TLS.
            verify = tls.client_context(verify=False) if tls is not None and tls.cert else False
        else:
            verify = ssl_context or (tls or TlsFiles()).client_context()
    return httpx.Client(
        base_url=base_url,
        headers=headers,
        verify=verify,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        limits=httpx.Limits(max_keepalive_connections=4, keepalive_expiry=60),
    )


def error_message(response: httpx.Response) -> str:
    """The ``error`` field of a JSON error body, or a short excerpt of whatever came back."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return str(body)[:200]


HANDSHAKE_TIMEOUT_S = 5.0
PLAIN_HTTP_ON_TLS = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)


class _DeferredHandshakeAdapter(BuiltinSSLAdapter):
    """cheroot's TLS adapter, with the handshake moved off the accept loop.

    cheroot handshakes in the thread that accepts connections, so one client that
    connects and sends nothing stalls every new connection for the socket timeout
    (measured: 30 s). Here ``wrap`` only wraps; the handshake runs in the worker thread
    (:class:`_TlsConnection`), and the TLS environ is computed when a request reads it.
    """

    def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, Mapping[str, Any]]:
        try:
            tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as exc:
            raise errors.FatalSSLAlert(*exc.args) from exc
        return tls, _LazyEnviron(lambda: self.get_environ(tls))  # type: ignore[no-untyped-call]


class _LazyEnviron(Mapping[str, Any]):
    """The connection's TLS variables (verified peer subject…), read after the handshake."""

    def __init__(self, compute: Callable[[], dict[str, Any]]) -> None:
        self._compute = compute
        self._env: dict[str, Any] | None = None

    def _get(self) -> dict[str, Any]:
        if self._env is None:
            try:
                self._env = self._compute()
            except (TypeError, ValueError, OSError):  # no handshake: nothing to tell
                self._env = {}
        return self._env

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


class _TlsConnection(HTTPConnection):
    """Handshake in the worker thread; answer plain HTTP on the TLS port with a clear 400."""

    _handshake_done = False

    def communicate(self) -> bool:
        sock = self.socket
        if isinstance(sock, ssl.SSLSocket) and not self._handshake_done:
            idle_limit = sock.gettimeout()
            try:
                # A client that connects and never finishes its handshake holds a worker:
                # give it seconds, not the 30 s a request may take.
                sock.settimeout(HANDSHAKE_TIMEOUT_S)
                sock.do_handshake()
                sock.settimeout(idle_limit)
            except ssl.SSLError as exc:
                if "http request" in str(exc).lower():
                    _refuse_plain_http(sock)
                else:
                    log.info("TLS handshake with %s failed: %s", _peer(sock), exc)
                return False
            except OSError:
                return False
            self._handshake_done = True
        return bool(super().communicate())  # type: ignore[no-untyped-call]


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "a client"


def _refuse_plain_http(sock: ssl.SSLSocket) -> None:
    """Tell a plain-HTTP client, in plain HTTP, to use https:// (bypassing TLS)."""
    body = b'{"error": "this port speaks HTTPS: use an https:// URL"}'
    try:
        socket.socket.sendall(sock, PLAIN_HTTP_ON_TLS % (len(body), body))
        socket.socket.shutdown(sock, socket.SHUT_WR)
        # Read what is left of the request, or closing would reset the connection and
        # the client would never see the answer.
        sock.settimeout(1.0)
        for _ in range(64):
            if not socket.socket.recv(sock, 4096):
                break
    except OSError:
        pass


class CertFileWatcher:
    """Reload TLS contexts when a certificate file changes on disk, so that a rotated or
    renewed certificate (`kitt server cert rotate`, `kitt-agent renew`, the agent's own
    renewal) is served without a restart."""

    def __init__(self, path: Path, reload: Callable[[], None]) -> None:
        self._path = path
        self._reload = reload
        self._mtime = self._stat()

    def _stat(self) -> float:
        try:
            return self._path.stat().st_mtime
        except OSError:
            return 0.0

    def check(self) -> None:
        mtime = self._stat()
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            self._reload()
        except (OSError, ssl.SSLError) as exc:
            log.error("cannot load the new certificate %s: %s", self._path, exc)
            return
        log.info("certificate %s changed on disk; now serving it", self._path)


# Idle keep-alive connections a listener keeps at most (one per agent between heartbeats).
MAX_KEEP_ALIVE = 20_000
# Descriptors kept free of keep-alive connections: the database, log files, new requests.
_SPARE_FDS = 512


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (as nginx and Go's
    runtime do) and return it: a fleet's agents each hold a keep-alive connection, and the
    usual soft limit of 1,024 would stop a server with a thousand agents accepting any."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit we have
    return soft


def keep_alive_limit(open_files: int) -> int:
    """How many idle keep-alive connections to keep: past it the listener closes a
    connection after its reply (the agent reconnects next time) instead of running out of
    descriptors and failing every accept with "Too many open files"."""
    return max(64, min(MAX_KEEP_ALIVE, open_files - _SPARE_FDS))


class WsgiServer:
    """A cheroot server run on a background thread.

    :meth:`bind` (also done by :meth:`start`) runs on the caller's thread so that "port in
    use" and similar failures surface as :class:`DaemonStartError` before a daemon reports
    ready, and before it has touched anything else.
    """

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        numthreads: int = 32,
        name: str = "kitt",
        tls: ListenerTls | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self._ssl_context: ssl.SSLContext | None = None
        self._server = wsgi.Server(
            (host, port),
            app,
            numthreads=numthreads,
            server_name=name,
            # cheroot's defaults (queue 5, 10 keep-alive connections) collapse under a
            # fleet's heartbeats; these hold thousands of idle keep-alive agents.
            request_queue_size=1024,
            timeout=30,
            shutdown_timeout=5,
            accepted_queue_size=-1,
        )
        self._server.keep_alive_conn_limit = keep_alive_limit(raise_open_files_limit())
        # Flask enforces the 1 MiB body limit (MAX_CONTENT_LENGTH, chunked bodies too) and
        # answers in JSON; cheroot's own limit would answer first, in plain text.
        self._server.max_request_body_size = 0
        setattr(self._server, "error_log", self._error_log)  # noqa: B010 - cheroot's hook
        self._thread: threading.Thread | None = None
        if tls is not None:
            adapter = _DeferredHandshakeAdapter(str(tls.cert), str(tls.key))
            # Our own context: cheroot's default neither verifies client certificates
            # nor lets us reload a renewed certificate into the running listener.
            self._ssl_context = pki.server_context(
                tls.cert, tls.key, tls.ca, require_client=tls.require_client_cert
            )
            adapter.context = self._ssl_context
            self._server.ssl_adapter = adapter
            self._server.ConnectionClass = _TlsConnection

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def reload_cert(self) -> None:
        """Serve a renewed certificate to new connections, without a restart."""
        if self.tls is not None and self._ssl_context is not None:
            self._ssl_context.load_cert_chain(str(self.tls.cert), str(self.tls.key))

    @staticmethod
    def _error_log(msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
        log.log(level, "cheroot: %s", msg, exc_info=traceback)

    @property
    def bound_port(self) -> int:
        return int(self._server.bind_addr[1])

    def set_app(self, app: Any) -> None:
        """Install the WSGI app after :meth:`bind` (the server binds before it opens its DB)."""
        self._server.wsgi_app = app

    def bind(self) -> None:
        if self._server.ready:
            return
        try:
            self._server.prepare()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE or "in use" in str(exc).lower():
                raise DaemonStartError(
                    f"port {self.port} on {self.host} is already in use "
                    "(another KITT process or another program is listening there)"
                ) from exc
            if exc.errno == errno.EACCES:
                raise DaemonStartError(
                    f"not allowed to listen on {self.host}:{self.port} (ports below 1024 need root)"
                ) from exc
            raise DaemonStartError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc

    def start(self) -> None:
        self.bind()
        self._thread = threading.Thread(target=self._serve, name="http-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._server.serve()
        except Exception:
            log.exception("HTTP server stopped on an error")

    def stop(self) -> None:
        self._server.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
