"""Who may call the agent's own API.

Commands and log streams come only from the server: on HTTPS the TLS handshake already
demands a certificate from the fleet CA, and the app then requires the *server* role
(an agent's certificate, also CA-signed, must not command another agent); with a token
configured, the server must also present the push key derived from this agent's token.
``/api/status`` also accepts this agent's own certificate, so that ``kitt agent status``
works locally with TLS on.
"""

from __future__ import annotations

import threading

from flask import request

from kitt.jsonapi import ApiFailure
from kitt.pki import AGENT_ROLE, SERVER_ROLE
from kitt.tokens import bearer, push_key, same


class AgentAuth:
    def __init__(self, name: str, token: str | None, tls: bool) -> None:
        self.name = name
        self.tls = tls
        self._lock = threading.Lock()
        self._push_key: str | None = None
        self.set_token(token)

    def set_token(self, token: str | None) -> None:
        """A bootstrap token is swapped for the agent token at first registration."""
        with self._lock:
            self._push_key = push_key(token) if token else None

    def require_server(self) -> None:
        if self.tls:
            role = request.environ.get("SSL_CLIENT_S_DN_OU")
            if role != SERVER_ROLE:
                cn = request.environ.get("SSL_CLIENT_S_DN_CN")
                raise ApiFailure(403, f"only the KITT server may call this (certificate {cn!r})")
        with self._lock:
            expected = self._push_key
        if expected is None:
            return  # a --no-auth server on loopback: there is nothing to check against
        presented = bearer(request.headers.get("Authorization"))
        if presented is None or not same(presented, expected):
            raise ApiFailure(401, "missing or wrong server credential")

    def require_server_or_self(self) -> None:
        if not self.tls:
            return
        env = request.environ
        role, cn = env.get("SSL_CLIENT_S_DN_OU"), env.get("SSL_CLIENT_S_DN_CN")
        if role == SERVER_ROLE or (role == AGENT_ROLE and cn == self.name):
            return
        raise ApiFailure(403, f"certificate {cn!r} may not read this agent's status")
