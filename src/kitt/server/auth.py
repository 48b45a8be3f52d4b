"""Who may call what on the server (ARCHITECTURE.md §6).

* Users (CLI, REST) present the **admin token**. The dashboard trades it once for a
  session cookie (HttpOnly, SameSite=Strict, Secure on HTTPS); a request carrying only
  the cookie must also carry the session's CSRF token to change anything.
* Agents present their **agent token**; on an HTTPS server also a client certificate
  signed by the fleet CA whose CN is the agent's name and whose role (OU) is agent. A
  token alone never suffices on HTTPS, and a certificate alone never suffices anywhere,
  so one leaked credential lets no one act as that agent, let alone another.
* A new agent presents a **bootstrap token** exactly once (enroll, or the first
  registration on a plain-HTTP server).

Every check runs before anything is written (registration parses its body first: the
name in it is what the credential is checked against).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit

from flask import current_app, g, request

from kitt.jsonapi import ApiFailure
from kitt.pki import AGENT_ROLE
from kitt.server.store.credentials import CredentialStore, Identity
from kitt.server.store.web_sessions import OpenSession, WebSessionStore, admin_fingerprint
from kitt.tokens import bearer, same, token_hash
from kitt.urls import is_loopback

ADMIN_HINT = (
    "pass --token, set KITT_TOKEN, or run `kitt login URL` (the token is in the server's "
    "admin-token file)"
)


@dataclass
class Auth:
    """The server's authentication policy, built once at start."""

    credentials: CredentialStore
    admin_token_hash: str | None  # None: --no-auth (loopback only)
    tls: bool
    web_sessions: WebSessionStore | None = None
    # The CSRF token of a --no-auth server's pages (there is no session to hold one):
    # a page of another site cannot read it, so it cannot forge a change either.
    anonymous_csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @property
    def enabled(self) -> bool:
        return self.admin_token_hash is not None

    @property
    def cookie_name(self) -> str:
        # __Host-: the browser keeps it only if Secure, host-only and Path=/ (HTTPS).
        return "__Host-kitt_session" if self.tls else "kitt_session"

    @property
    def admin_fp(self) -> str:
        return admin_fingerprint(self.admin_token_hash or "")

    def admin_token_ok(self, token: str) -> bool:
        return self.admin_token_hash is None or same(token_hash(token), self.admin_token_hash)

    def require_admin(self) -> None:
        """The admin token, or a dashboard session (with its CSRF token for a change)."""
        if self.admin_token_hash is None:
            self.open_server_guard()
            if _from_a_browser():
                self.require_csrf()
            return
        token = bearer(request.headers.get("Authorization"))
        if token is None:
            if self.web_session() is not None:
                self.require_csrf()
                return
            raise ApiFailure(401, f"this endpoint needs the admin token: {ADMIN_HINT}")
        if not same(token_hash(token), self.admin_token_hash):
            raise ApiFailure(401, f"admin token not accepted: {ADMIN_HINT}")

    def open_server_guard(self) -> None:
        """A --no-auth server (loopback only) answers only to loopback names, so a page of
        another site cannot reach it through DNS rebinding (its name pointed at
        127.0.0.1) and read the fleet, or the pages' CSRF token."""
        if self.enabled or self.open_to_this_host():
            return
        host = urlsplit(f"//{request.host}").hostname or ""
        raise ApiFailure(
            403, f"this --no-auth server answers only to loopback names, not {host[:80]!r}"
        )

    def open_to_this_host(self) -> bool:
        """A --no-auth server, asked for under a loopback name: anyone may look."""
        return not self.enabled and is_loopback(urlsplit(f"//{request.host}").hostname or "")

    def session_alive(self, session: OpenSession) -> bool:
        """Whether a session a long-lived stream was opened with is still signed in."""
        if self.web_sessions is None:
            return False
        return self.web_sessions.alive(session.id_hash, self.admin_fp, datetime.now(timezone.utc))

    def signed_in_while(self, frames: Iterator[str]) -> Iterator[str]:
        """A live stream opened with a dashboard session ends when the session does
        (signed out, expired): it is checked again every few seconds of the stream."""
        if not self.enabled or self.presented_token() is not None:
            return frames
        session = self.web_session()
        if session is None:
            return frames
        return self._while_alive(frames, session)

    def _while_alive(self, frames: Iterator[str], session: OpenSession) -> Iterator[str]:
        checked = time.monotonic()
        try:
            for frame in frames:
                now = time.monotonic()
                if now - checked >= SESSION_RECHECK_S:
                    checked = now
                    if not self.session_alive(session):
                        return
                yield frame
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()  # the inner stream's own clean-up (unsubscribing) runs now

    def web_session(self) -> OpenSession | None:
        """The request's valid dashboard session, looked up once per request."""
        if "kitt_session" not in g:
            secret = request.cookies.get(self.cookie_name)
            found = None
            if secret and self.web_sessions is not None and self.enabled:
                found = self.web_sessions.find(secret, self.admin_fp, datetime.now(timezone.utc))
            g.kitt_session = found
        return g.kitt_session  # type: ignore[no-any-return]

    def csrf_token(self) -> str:
        session = self.web_session()
        return session.csrf_token if session is not None else self.anonymous_csrf

    def require_csrf(self) -> None:
        """A change asked for by a browser must come from our own pages.

        The token is in a header (pages' scripts and htmx) or a form field (plain forms);
        an ``Origin`` that is not this server is refused too, as a second line.
        """
        if request.method in SAFE_METHODS:
            return
        origin = request.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.host:
            raise ApiFailure(403, "cross-site request refused (Origin is not this server)")
        sent = request.headers.get(CSRF_HEADER) or _form_token()
        if not sent or not same(sent, self.csrf_token()):
            raise ApiFailure(403, "CSRF token missing or wrong: reload the page and try again")

    def presented_token(self) -> str | None:
        return bearer(request.headers.get("Authorization"))

    def require_agent(self, agent_id: str | None = None) -> Identity | None:
        """The calling agent, checked against its token, its certificate and ``agent_id``.

        Returns None only on a --no-auth server (which trusts the path).
        """
        if not self.enabled:
            return None
        token = self.presented_token()
        if token is None:
            raise ApiFailure(401, "agent calls need the agent's token (Authorization: Bearer)")
        identity = self.credentials.identify(token)
        if identity is None:
            raise ApiFailure(
                401,
                "agent token not accepted (revoked, or issued by another server): enroll "
                "again with `kitt-agent init --server URL --token NEW_BOOTSTRAP_TOKEN`, then "
                "restart the agent",
            )
        self.require_agent_cert(identity.name)
        if agent_id is not None and identity.agent_id != agent_id:
            if identity.agent_id is None:
                raise ApiFailure(404, f"unknown agent id {agent_id!r}: register again")
            raise ApiFailure(
                403, f"this token belongs to agent {identity.name!r}, not agent id {agent_id!r}"
            )
        return identity

    def require_agent_cert(self, name: str) -> None:
        """On HTTPS, the client certificate must be an agent certificate for ``name``.

        The handshake already refused certificates the CA did not sign, or expired ones;
        cheroot puts the verified subject in the WSGI environ.
        """
        if not self.tls:
            return
        env = request.environ
        if env.get("SSL_CLIENT_VERIFY") != "SUCCESS":
            raise ApiFailure(
                403,
                "agent calls need the agent's client certificate (enroll with "
                "`kitt-agent init --server https://…`)",
            )
        role = env.get("SSL_CLIENT_S_DN_OU")
        cn = env.get("SSL_CLIENT_S_DN_CN")
        if role != AGENT_ROLE:
            raise ApiFailure(403, f"the client certificate ({cn!r}) is not an agent certificate")
        if cn != name:
            raise ApiFailure(
                403, f"the client certificate is for agent {cn!r}, but the token is {name!r}'s"
            )


# How often a session-opened stream checks that its session is still signed in (streams
# send at least a keepalive every 15 s, so it ends within ~20 s of signing out).
SESSION_RECHECK_S = 5.0
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"


def _from_a_browser() -> bool:
    """Browsers send these; the CLI and agents do not. (A change from a page must carry
    the page's CSRF token even on a --no-auth server: any site could post to it.)"""
    headers = request.headers
    return any(h in headers for h in ("Origin", "Sec-Fetch-Site", "Cookie"))


def _form_token() -> str | None:
    if request.mimetype not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return None
    return request.form.get(CSRF_FIELD)


def auth() -> Auth:
    return current_app.extensions["kitt.auth"]  # type: ignore[no-any-return]


def require_admin() -> None:
    """A ``before_request`` hook for every user-facing blueprint."""
    auth().require_admin()
