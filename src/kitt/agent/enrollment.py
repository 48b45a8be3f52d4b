"""Getting and keeping an agent's identity: enrollment by CSR, renewal, offline bundles.

The agent's private key is made here and never leaves the host: only the CSR (public
key + name) travels, and the server builds the certificate's subject itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kitt import pki
from kitt.apiclient import ApiClient
from kitt.errors import ApiError, ConfigError, KittError
from kitt.http import TlsFiles, build_client
from kitt.paths import PUBLIC_FILE, AgentPaths, write_private
from kitt.protocol import CertificateIssued, EnrollRequest, EnrollResponse, RenewRequest
from kitt.trust import fetch_pinned_ca, save_ca

BUNDLE_FILE = "bundle.json"


@dataclass(frozen=True)
class Enrolled:
    name: str
    token: str
    not_after: str


def ensure_ca(paths: AgentPaths, server_url: str, ca_file: Path | None, pin: str | None) -> str:
    """Put the fleet CA at ``certs/ca.pem`` (from a file, or fetched and pinned); return
    its fingerprint. Without either, an existing ``certs/ca.pem`` is used."""
    if ca_file is not None:
        try:
            pem = ca_file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --ca {ca_file}: {exc.strerror}") from exc
        try:
            pem, got = pki.single_ca_pem(pem)
        except pki.PkiError as exc:
            raise ConfigError(f"--ca {ca_file}: {exc}") from None
        if pin is not None and got != pki.normalize_fingerprint(pin):
            raise ConfigError(f"--ca {ca_file} has fingerprint {got}, not {pin}")
        save_ca(paths.ca, pem)
        return got
    if pin is not None:
        if paths.ca.exists():
            have = pki.fingerprint(pki.load_cert(paths.ca))
            if have == pki.normalize_fingerprint(pin):
                return have
        save_ca(paths.ca, fetch_pinned_ca(server_url, pin))
        return pki.normalize_fingerprint(pin)
    if paths.ca.exists():
        return pki.fingerprint(pki.load_cert(paths.ca))
    raise ConfigError(
        f"{server_url} is HTTPS, and this agent does not know the fleet CA yet. Either copy "
        f"it here as {paths.ca} (on the server: `kitt server ca > ca.pem`), or pass "
        "--ca-fingerprint with the fingerprint `kitt server start` printed (also shown by "
        "`kitt server ca --fingerprint`)"
    )


def enroll(paths: AgentPaths, server_url: str, name: str, bootstrap_token: str) -> Enrolled:
    """Make a key and CSR, have the server sign it, and store key, cert and CA."""
    key = pki.new_key()
    request = EnrollRequest(name=name, csr_pem=pki.make_csr(key, name))
    client = build_client(server_url, token=bootstrap_token, tls=TlsFiles(ca=paths.ca))
    with client:
        try:
            resp = ApiClient(client).call("POST", "/api/v1/agents/enroll", EnrollResponse, request)
        except ApiError as exc:
            raise KittError(f"enrollment refused by {server_url}: {exc.message}") from exc
    write_private(paths.key, pki.key_pem(key))
    write_private(paths.cert, resp.cert_pem.encode(), PUBLIC_FILE)
    save_ca(paths.ca, resp.ca_pem.encode())
    return Enrolled(name=resp.name, token=resp.token, not_after=resp.not_after.isoformat())


def renew(
    server_url: str, token: str | None, tls: TlsFiles, name: str, insecure: bool = False
) -> CertificateIssued:
    """A new certificate for the same key, authenticated by the current certificate.

    The key is kept so that the one file that changes (the certificate) is replaced
    atomically: a crash mid-renewal never leaves a key that does not match its cert.
    """
    if tls.key is None or tls.cert is None:
        raise ConfigError("this agent has no certificate to renew (it is not enrolled on HTTPS)")
    key = pki.load_key(tls.key)
    request = RenewRequest(csr_pem=pki.make_csr(key, name))
    with build_client(server_url, token=token, tls=tls, insecure=insecure) as client:
        issued = ApiClient(client).call("POST", "/api/v1/agents/renew", CertificateIssued, request)
    write_private(tls.cert, issued.cert_pem.encode(), PUBLIC_FILE)
    return issued


def install_bundle(paths: AgentPaths, bundle: Path) -> dict[str, Any]:
    """Copy an offline bundle (``kitt server issue-agent-cert``) into place; return its
    ``bundle.json`` (name, server_url, token)."""
    try:
        meta: dict[str, Any] = json.loads((bundle / BUNDLE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{bundle} is not a KITT agent bundle: {exc}") from exc
    if not isinstance(meta, dict):
        raise ConfigError(f"{bundle / BUNDLE_FILE} is not a JSON object")
    for required in ("name", "server_url", "token"):
        if not isinstance(meta.get(required), str):
            raise ConfigError(f"{bundle / BUNDLE_FILE} lacks {required!r}")
    for src, dst, mode in (
        ("ca.pem", paths.ca, PUBLIC_FILE),
        ("agent.pem", paths.cert, PUBLIC_FILE),
        ("agent-key.pem", paths.key, 0o600),
    ):
        try:
            write_private(dst, (bundle / src).read_bytes(), mode)
        except FileNotFoundError:
            raise ConfigError(f"the bundle {bundle} has no {src}") from None
    return meta
