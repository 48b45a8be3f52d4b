"""Dashboard sessions: opened by the admin token, carried by a cookie, ended by logout.

The cookie holds a random secret and the table only its SHA-256 (like every token the
server keeps). Each session has its own CSRF token, which the pages send back with every
change they ask for.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Engine, Table, delete, select
from sqlalchemy.orm import sessionmaker

from kitt.server.store.models import WebSession
from kitt.tokens import token_hash

SESSION_PREFIX = "kitt_ses_"
_TABLE = cast(Table, WebSession.__table__)


@dataclass(frozen=True, slots=True)
class OpenSession:
    """A valid session, as a request sees it."""

    id_hash: str
    csrf_token: str
    expires_at: datetime


def admin_fingerprint(admin_token_hash: str) -> str:
    return token_hash(admin_token_hash)[:16]


class WebSessionStore:
    def __init__(self, engine: Engine) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def open(self, admin_fp: str, now: datetime, ttl: timedelta) -> tuple[str, OpenSession]:
        """A new session: the cookie value (shown once) and what the server keeps."""
        secret = SESSION_PREFIX + secrets.token_urlsafe(32)
        row = WebSession(
            id_hash=token_hash(secret),
            csrf_token=secrets.token_urlsafe(32),
            admin_fp=admin_fp,
            created_at=now,
            expires_at=now + ttl,
        )
        with self._sessions.begin() as db:
            # Expired rows go whenever someone logs in: no sweeper thread needed.
            db.execute(delete(_TABLE).where(_TABLE.c.expires_at <= now))
            db.add(row)
        return secret, OpenSession(row.id_hash, row.csrf_token, row.expires_at)

    def find(self, secret: str, admin_fp: str, now: datetime) -> OpenSession | None:
        if not secret.startswith(SESSION_PREFIX) or len(secret) > 128:
            return None
        with self._sessions() as db:
            row = db.scalar(select(WebSession).where(WebSession.id_hash == token_hash(secret)))
        # The lookup is by hash (an index probe), so its timing tells nothing of the secret.
        if row is None or row.expires_at <= now or row.admin_fp != admin_fp:
            return None
        return OpenSession(row.id_hash, row.csrf_token, row.expires_at)

    def alive(self, id_hash: str, admin_fp: str, now: datetime) -> bool:
        """Whether the session is still open (not signed out, not expired)."""
        with self._sessions() as db:
            row = db.get(WebSession, id_hash)
        return row is not None and row.expires_at > now and row.admin_fp == admin_fp

    def close(self, id_hash: str) -> None:
        with self._sessions.begin() as db:
            db.execute(delete(_TABLE).where(_TABLE.c.id_hash == id_hash))
