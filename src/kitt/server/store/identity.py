"""The fleet's identity in the database: the CA every server instance must share."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert

from kitt.errors import KittError
from kitt.server.store.models import FleetIdentity

CA_FINGERPRINT = "ca_fingerprint"


class ForeignCaError(KittError):
    """This instance's CA is not the one the fleet on this database was built with."""


def check_ca(engine: Engine, fingerprint: str) -> None:
    """Record the CA on the first start; refuse a start with another one.

    Only where several instances can share the database (PostgreSQL): an SQLite file sits
    beside its one server's CA, so a new CA there is the operator's own doing."""
    now = datetime.now(timezone.utc)
    first = insert(FleetIdentity).values(name=CA_FINGERPRINT, value=fingerprint, recorded_at=now)
    with engine.begin() as conn:
        # Two instances starting together on a new database: the first insert wins.
        conn.execute(first.on_conflict_do_nothing(index_elements=[FleetIdentity.name]))
        known = conn.scalar(select(FleetIdentity.value).where(FleetIdentity.name == CA_FINGERPRINT))
    if known != fingerprint:
        raise ForeignCaError(
            f"this database belongs to a fleet whose CA has fingerprint {known}, but this "
            f"server's CA is {fingerprint}: agents would fail TLS whenever they reach this "
            "instance. Copy server/certs/ (ca.pem, ca-key.pem, server.pem, server-key.pem) "
            "and server/admin-token from an existing instance into this KITT_HOME, then "
            "start again (docs/multi-instance.md)"
        )
