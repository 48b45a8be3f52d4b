"""Bearer tokens: how they are made, stored and compared (ARCHITECTURE.md §6).

Tokens are 256-bit random strings with a readable prefix (``kitt_adm_``, ``kitt_boot_``,
``kitt_agt_``) so that secret scanners and humans can tell what leaked. The server keeps
only their SHA-256: a random 256-bit secret needs no slow hash, and a database dump holds
no credential for the server. It does hold each agent's push key (what the server shows
an agent when it pushes a command): on HTTPS the agent also demands the server's
certificate, so that matters only for agents on loopback or started with --insecure.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

ADMIN_PREFIX = "kitt_adm_"
BOOTSTRAP_PREFIX = "kitt_boot_"
AGENT_PREFIX = "kitt_agt_"
MAX_TOKEN_LENGTH = 256


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def push_key(agent_token: str) -> str:
    """What the server presents to an agent when it pushes a command.

    Derived from the agent's token, so the agent can check it without storing anything
    else, and useless for talking to the server as that agent (it is not the token).
    """
    return hmac.new(agent_token.encode(), b"kitt server push v1", hashlib.sha256).hexdigest()


def same(a: str, b: str) -> bool:
    """Constant-time equality, so response timing tells an attacker nothing."""
    return hmac.compare_digest(a.encode(), b.encode())


def bearer(header: str | None) -> str | None:
    """The token in an ``Authorization: Bearer …`` header, if well-formed."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > MAX_TOKEN_LENGTH:
        return None
    return value
