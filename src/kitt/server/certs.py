"""The server's certificate files: the fleet CA and the server's own certificate.

Layout (ARCHITECTURE.md §3): ``server/certs/ca.pem`` (0644), ``ca-key.pem`` (0600, never
leaves this host), ``server.pem`` (0644) and ``server-key.pem`` (0600). The server
certificate doubles as the server's client certificate when it pushes to agents.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from kitt import pki
from kitt.paths import PRIVATE_DIR, PUBLIC_FILE, ensure_dir, write_private

log = logging.getLogger(__name__)

# Reissued at start when fewer days than this remain, so a server left running for a
# year never greets its agents with an expired certificate after a restart.
SERVER_CERT_RENEW_BEFORE = dt.timedelta(days=30)
LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class ServerCerts:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca-key.pem"

    @property
    def cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def key(self) -> Path:
        return self.dir / "server-key.pem"

    def exists(self) -> bool:
        return self.ca.exists() and self.ca_key.exists()

    def issuer(self) -> pki.Issuer:
        return pki.Issuer(pki.load_cert(self.ca), pki.load_key(self.ca_key))

    def ensure(self, hostnames: list[str], ips: list[str]) -> list[str]:
        """Create what is missing (CA, server cert) and reissue a server certificate that
        lacks a requested name or nears expiry. Returns what was done, for the operator."""
        ensure_dir(self.dir, PRIVATE_DIR)
        done = []
        if not self.exists():
            cert, key = pki.create_ca(f"KITT fleet CA ({socket.gethostname()})")
            write_private(self.ca_key, pki.key_pem(key))
            write_private(self.ca, pki.cert_pem(cert), PUBLIC_FILE)
            self.cert.unlink(missing_ok=True)
            done.append(f"created the fleet CA {self.ca}")
        names, addrs = san_request(hostnames, ips)
        reason = self._reissue_reason(names, addrs)
        if reason:
            if self.cert.exists():  # keep the names agents already use
                old_names, old_ips = sans(pki.load_cert(self.cert))
                names = list(dict.fromkeys([*names, *old_names]))
                addrs = list(dict.fromkeys([*addrs, *(str(ip) for ip in old_ips)]))
            self.issue_server_cert(names, addrs)
            done.append(f"issued the server certificate {self.cert} ({reason})")
        return done

    def _reissue_reason(self, names: list[str], addrs: list[str]) -> str | None:
        if not self.cert.exists() or not self.key.exists():
            return "new"
        cert = pki.load_cert(self.cert)
        have_names, have_ips = sans(cert)
        missing = [n for n in names if n not in have_names]
        missing += [a for a in addrs if ipaddress.ip_address(a) not in have_ips]
        if missing:
            return "adds " + ", ".join(missing)
        if cert.not_valid_after_utc - pki.utcnow() < SERVER_CERT_RENEW_BEFORE:
            return "the old one expires soon"
        return None

    def issue_server_cert(self, names: list[str], addrs: list[str]) -> x509.Certificate:
        issuer = self.issuer()
        key = pki.new_key()
        cert = issuer.issue(
            key.public_key(), names[0], pki.SERVER_ROLE, pki.SERVER_CERT_LIFETIME, names, addrs
        )
        write_private(self.key, pki.key_pem(key))
        write_private(self.cert, pki.cert_pem(cert), PUBLIC_FILE)
        return cert

    def fingerprint(self) -> str:
        return pki.fingerprint(pki.load_cert(self.ca))


def san_request(hostnames: list[str], ips: list[str]) -> tuple[list[str], list[str]]:
    """The names a server certificate should carry: the operator's, this host's name, and
    the loopback names (so local CLI calls verify too)."""
    names = list(dict.fromkeys([*hostnames, socket.gethostname(), *LOCAL_NAMES]))
    addrs = []
    for ip in [*ips, *LOCAL_IPS]:
        try:
            addrs.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            raise pki.PkiError(f"--ip {ip!r} is not an IP address") from None
    return names, list(dict.fromkeys(addrs))


def sans(
    cert: x509.Certificate,
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    ips = [ip for ip in ext.get_values_for_type(x509.IPAddress)
           if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address))]  # fmt: skip
    return ext.get_values_for_type(x509.DNSName), ips
