"""Bootstrap tokens and agent credentials.

Every check that gates a write is a compare-and-set in the same transaction as the write
(a bootstrap token's use count, a name being free), so two agents racing for the last
use of a token or for the same name cannot both win.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Engine, Table, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kitt.protocol import TokenInfo, TokenState
from kitt.server.store.models import Agent, AgentCredential, BootstrapToken
from kitt.tokens import AGENT_PREFIX, BOOTSTRAP_PREFIX, new_token, push_key, token_hash

_CRED = cast(Table, AgentCredential.__table__)
_BOOT = cast(Table, BootstrapToken.__table__)
# How long a token → agent lookup is trusted without asking the database again. It must
# outlast the heartbeat interval (30 s by default), or every heartbeat pays a query. A
# revocation made through this server applies at once (its entries are dropped); one
# made by another server instance on the same database applies within this bound.
IDENTITY_CACHE_S = 60.0


class CredentialError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


BOOTSTRAP_REJECTED = "bootstrap token unknown, expired, used up or revoked (make a new one with `kitt server token create`)"  # noqa: E501


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a valid agent token belongs to (``agent_id`` is None until it registers)."""

    name: str
    agent_id: str | None


@dataclass(frozen=True)
class Issued:
    """What enrolling or a first registration hands the agent, once."""

    name: str
    token: str


def token_state(row: BootstrapToken, now: datetime) -> TokenState:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at <= now:
        return "expired"
    if row.uses >= row.max_uses:
        return "used"
    return "active"


def token_info(row: BootstrapToken, now: datetime) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        state=token_state(row, now),
        created_at=row.created_at,
        expires_at=row.expires_at,
        max_uses=row.max_uses,
        uses=row.uses,
        note=row.note,
    )


class CredentialStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self._cache: dict[str, tuple[Identity, float]] = {}
        self._lock = threading.Lock()

    # --- bootstrap tokens -----------------------------------------------------------

    def create_bootstrap(
        self, ttl: timedelta, uses: int, note: str | None, now: datetime
    ) -> tuple[BootstrapToken, str]:
        token = new_token(BOOTSTRAP_PREFIX)
        row = BootstrapToken(
            id=f"tok_{uuid.uuid4().hex[:12]}",
            token_hash=token_hash(token),
            created_at=now,
            expires_at=now + ttl,
            max_uses=uses,
            uses=0,
            note=note,
        )
        with self.sessions.begin() as s:
            s.add(row)
        return row, token

    def list_bootstrap(self) -> list[BootstrapToken]:
        with self.sessions() as s:
            query = select(BootstrapToken).order_by(BootstrapToken.created_at.desc())
            return list(s.scalars(query))

    def revoke_bootstrap(self, token_id: str, now: datetime) -> BootstrapToken | None:
        with self.sessions.begin() as s:
            row = s.get(BootstrapToken, token_id)
            if row is not None and row.revoked_at is None:
                row.revoked_at = now
            return row

    def _consume(self, s: Session, token: str, now: datetime) -> None:
        """Use the bootstrap token once, or raise 401. A conditional UPDATE, so the last
        use cannot be spent twice."""
        used = s.execute(
            update(_BOOT)
            .where(
                _BOOT.c.token_hash == token_hash(token),
                _BOOT.c.revoked_at.is_(None),
                _BOOT.c.expires_at > now,
                _BOOT.c.uses < _BOOT.c.max_uses,
            )
            .values(uses=_BOOT.c.uses + 1)
        )
        if used.rowcount != 1:  # type: ignore[attr-defined]
            raise CredentialError(401, BOOTSTRAP_REJECTED)

    def bootstrap_valid(self, token: str, now: datetime) -> bool:
        with self.sessions() as s:
            row = s.scalars(
                select(BootstrapToken).where(BootstrapToken.token_hash == token_hash(token))
            ).one_or_none()
        return row is not None and token_state(row, now) == "active"

    # --- agent credentials ----------------------------------------------------------

    def issue(
        self,
        bootstrap: str | None,
        name: str,
        now: datetime,
        cert: tuple[str, datetime] | None = None,
    ) -> Issued:
        """Give ``name`` a fresh agent token, spending one use of ``bootstrap``.

        ``bootstrap=None`` is the server operator acting locally (``issue-agent-cert``).
        ``cert`` is the (serial, not_after) of the certificate signed for it, recorded with
        the token; the caller hands the certificate out only once this succeeded.
        A name whose credential is live is refused: taking over an enrolled agent's
        identity needs ``kitt agents revoke`` first.
        """
        token = new_token(AGENT_PREFIX)
        values = {
            "token_hash": token_hash(token),
            "push_key": push_key(token),
            "issued_at": now,
            "revoked_at": None,
            "cert_serial": cert[0] if cert else None,
            "cert_not_after": cert[1] if cert else None,
        }
        try:
            with self.sessions.begin() as s:
                if bootstrap is not None and not self.bootstrap_valid(bootstrap, now):
                    raise CredentialError(401, BOOTSTRAP_REJECTED)
                existing = s.get(AgentCredential, name)
                if existing is not None and existing.revoked_at is None:
                    raise CredentialError(
                        409,
                        f"an agent named {name!r} is already enrolled; revoke it first "
                        f"(kitt agents revoke {name}) or choose another name",
                    )
                if bootstrap is not None:
                    self._consume(s, bootstrap, now)
                if existing is None:
                    s.add(AgentCredential(name=name, **values))
                else:
                    taken = s.execute(
                        update(_CRED)
                        .where(_CRED.c.name == name, _CRED.c.revoked_at.is_not(None))
                        .values(**values)
                    )
                    if taken.rowcount != 1:  # type: ignore[attr-defined]
                        raise CredentialError(409, f"agent {name!r} was enrolled meanwhile")
        except IntegrityError:
            raise CredentialError(409, f"agent {name!r} was enrolled meanwhile") from None
        return Issued(name=name, token=token)  # a new token: nothing cached to drop

    def identify(self, token: str) -> Identity | None:
        """The live credential a token belongs to (cached briefly: the hot path)."""
        digest = token_hash(token)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        query = (
            select(AgentCredential.name, Agent.id)
            .outerjoin(Agent, Agent.name == AgentCredential.name)
            .where(AgentCredential.token_hash == digest, AgentCredential.revoked_at.is_(None))
        )
        with self.sessions() as s:
            row = s.execute(query).one_or_none()
        if row is None:
            return None
        identity = Identity(name=row[0], agent_id=row[1])
        if identity.agent_id is not None:
            with self._lock:
                if len(self._cache) > 100_000:
                    self._cache.clear()
                self._cache[digest] = (identity, now + IDENTITY_CACHE_S)
        return identity

    def _forget(self, name: str) -> None:
        """Drop the cached lookups of ``name``'s tokens (after a revoke or delete)."""
        with self._lock:
            for digest in [d for d, (ident, _) in self._cache.items() if ident.name == name]:
                del self._cache[digest]

    def get(self, name: str) -> AgentCredential | None:
        with self.sessions() as s:
            return s.get(AgentCredential, name)

    def push_key(self, name: str) -> str | None:
        cred = self.get(name)
        return cred.push_key if cred is not None and cred.revoked_at is None else None

    def record_cert(self, name: str, serial: str, not_after: datetime) -> None:
        with self.sessions.begin() as s:
            s.execute(
                update(_CRED)
                .where(_CRED.c.name == name)
                .values(cert_serial=serial, cert_not_after=not_after)
            )

    def revoke(self, name: str, now: datetime) -> bool:
        """Kill the agent's token at once. False if it had no live credential."""
        with self.sessions.begin() as s:
            done = s.execute(
                update(_CRED)
                .where(_CRED.c.name == name, _CRED.c.revoked_at.is_(None))
                .values(revoked_at=now, token_hash=None, push_key=None)
            )
        self._forget(name)
        return bool(done.rowcount)  # type: ignore[attr-defined]

    def delete(self, name: str) -> None:
        with self.sessions.begin() as s:
            s.execute(delete(_CRED).where(_CRED.c.name == name))
        self._forget(name)

    def all(self) -> dict[str, AgentCredential]:
        with self.sessions() as s:
            return {c.name: c for c in s.scalars(select(AgentCredential))}
