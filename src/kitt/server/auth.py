"""Who may call what on the server (ARCHITECTURE.md §6).

* Users (CLI, REST, dashboard) present the **admin token**.
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

from dataclasses import dataclass

from flask import current_app, request

from kitt.jsonapi import ApiFailure
from kitt.pki import AGENT_ROLE
from kitt.server.store.credentials import CredentialStore, Identity
from kitt.tokens import bearer, same, token_hash

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

    @property
    def enabled(self) -> bool:
        return self.admin_token_hash is not None

    def require_admin(self) -> None:
        if self.admin_token_hash is None:
            return
        token = bearer(request.headers.get("Authorization"))
        if token is None:
            raise ApiFailure(401, f"this endpoint needs the admin token: {ADMIN_HINT}")
        if not same(token_hash(token), self.admin_token_hash):
            raise ApiFailure(401, f"admin token not accepted: {ADMIN_HINT}")

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


def auth() -> Auth:
    return current_app.extensions["kitt.auth"]  # type: ignore[no-any-return]


def require_admin() -> None:
    """A ``before_request`` hook for every user-facing blueprint."""
    auth().require_admin()
