"""Offline enrollment: everything an air-gapped agent needs, written to a folder.

Here the key is made on the server host (the agent cannot send a CSR), so the bundle
is a secret: its key and token files are 0600, and the operator carries it over.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from kitt import pki
from kitt.errors import KittError
from kitt.paths import PRIVATE_DIR, PUBLIC_FILE, ServerPaths, ensure_dir, write_private
from kitt.protocol import AGENT_NAME_RE
from kitt.server.certs import ServerCerts
from kitt.server.store.credentials import CredentialError, CredentialStore
from kitt.server.store.db import make_engine, migrate, sqlite_url

BUNDLE_FILE = "bundle.json"


def write_bundle(
    paths: ServerPaths,
    certs: ServerCerts,
    name: str,
    out: Path,
    server_url: str,
    lifetime: timedelta,
    database_url: str | None = None,
) -> list[Path]:
    if not AGENT_NAME_RE.match(name):
        raise KittError(f"{name!r} is not a valid agent name (letters, digits, . _ -)")
    if out.exists() and any(out.iterdir()):
        raise KittError(f"{out} is not empty: give a new folder for the bundle")
    ensure_dir(out, PRIVATE_DIR)
    key = pki.new_key()
    cert = certs.issuer().issue(key.public_key(), name, pki.AGENT_ROLE, lifetime, [name])
    engine = make_engine(database_url or sqlite_url(paths.database))
    try:
        migrate(engine)
        credential = CredentialStore(engine).issue(
            None, name, datetime.now(timezone.utc), pki.cert_record(cert)
        )
    except CredentialError as exc:
        raise KittError(exc.message) from None
    finally:
        engine.dispose()
    files = {
        "ca.pem": (certs.ca.read_bytes(), PUBLIC_FILE),
        "agent.pem": (pki.cert_pem(cert), PUBLIC_FILE),
        "agent-key.pem": (pki.key_pem(key), 0o600),
        BUNDLE_FILE: (
            json.dumps(
                {
                    "name": name,
                    "server_url": server_url,
                    "token": credential.token,
                    "ca_fingerprint": certs.fingerprint(),
                },
                indent=2,
            ).encode(),
            0o600,
        ),
    }
    for filename, (data, mode) in files.items():
        write_private(out / filename, data, mode)
    return [out / f for f in files]
