"""Trusting a KITT server: the fleet CA, found locally or pinned by its fingerprint.

Pinning on first use is safe because the fingerprint comes out of band (the operator
copies it from `kitt server start` or `kitt server ca`): the CA fetched over an
unverified connection is checked against it before anything else is trusted, and every
later connection verifies the server against that CA.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from kitt import pki
from kitt.errors import KittError, ServerUnreachableError
from kitt.http import build_client, error_message
from kitt.paths import PUBLIC_FILE, write_private


def fetch_pinned_ca(server_url: str, expected_fingerprint: str) -> bytes:
    """The server's CA certificate, if and only if its SHA-256 matches the pin."""
    expected = pki.normalize_fingerprint(expected_fingerprint)
    with build_client(server_url, insecure=True, timeout=10) as client:
        try:
            response = client.get("/api/v1/ca.pem")
        except httpx.TransportError as exc:
            raise ServerUnreachableError(f"cannot reach {server_url}: {exc}") from exc
    if response.status_code != 200:
        raise KittError(
            f"{server_url} did not hand out its CA ({response.status_code}: "
            f"{error_message(response)})"
        )
    try:
        pem, got = pki.single_ca_pem(response.content)
    except pki.PkiError as exc:
        raise KittError(f"{server_url}/api/v1/ca.pem: {exc}; refusing to trust it") from None
    if got != expected:
        raise KittError(
            f"the CA served by {server_url} has fingerprint {got}, not the expected "
            f"{expected}: refusing to trust it (wrong server, or someone in between)"
        )
    return pem


def save_ca(path: Path, pem: bytes) -> None:
    write_private(path, pem, PUBLIC_FILE)


def check_ca_file(path: Path) -> str:
    """The fingerprint of a CA file the user gave, or a clear error."""
    return pki.fingerprint(pki.load_cert(path))
