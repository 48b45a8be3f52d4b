"""The fleet's private PKI: a CA on the server, certificates for the server and agents.

Everything is ECDSA P-256: signatures and handshakes are an order of magnitude cheaper
than RSA-2048, which matters when thousands of agents reconnect after an outage.

A certificate's *role* travels in its subject's OU (``kitt-server`` or ``kitt-agent``).
The server builds every subject itself (a CSR contributes only its public key), so an
agent can never obtain a certificate that lets it pose as the server or as another agent.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kitt.errors import KittError

SERVER_ROLE = "kitt-server"
AGENT_ROLE = "kitt-agent"
ORGANIZATION = "KITT"
CA_LIFETIME = dt.timedelta(days=3650)
SERVER_CERT_LIFETIME = dt.timedelta(days=397)
DEFAULT_AGENT_CERT_LIFETIME = dt.timedelta(days=90)
# Backdating covers clocks that run a little behind the server's; a tenth of the
# lifetime at most, so that short test lifetimes stay meaningful.
MAX_BACKDATE = dt.timedelta(minutes=5)


class PkiError(KittError):
    """A certificate, key or CSR that cannot be used (the message says why)."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"certificate {path} does not exist") from None
    except OSError as exc:
        raise PkiError(f"cannot read certificate {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate: {exc}") from exc


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(f"private key {path} does not exist") from None
    except OSError as exc:
        raise PkiError(f"cannot read private key {path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: expected an EC private key")
    return key


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, as ``AB:CD:…`` (what ``openssl x509 -fingerprint`` shows)."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def fingerprint_of_pem(pem: bytes) -> str:
    return fingerprint(x509.load_pem_x509_certificate(pem))


def single_ca_pem(pem: bytes) -> tuple[bytes, str]:
    """One CA certificate, re-encoded from its parsed form, and its fingerprint.

    Pinning checks a fingerprint, and a PEM parser reads only the first certificate of a
    file: a second one riding along would be trusted unchecked. So a file must hold
    exactly one, and what is saved is that certificate alone.
    """
    count = pem.count(b"-----BEGIN CERTIFICATE-----")
    if count != 1:
        raise PkiError(f"expected one CA certificate, got a file with {count}")
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise PkiError("not a PEM certificate") from None
    return cert_pem(cert), fingerprint(cert)


def normalize_fingerprint(text: str) -> str:
    """Accept ``SHA256:ab:cd…``, ``sha256/ABCD…`` or bare hex; return the ``AB:CD:…`` form."""
    hexdigits = re.sub(r"[^0-9a-fA-F]", "", re.sub(r"(?i)^sha-?256[:/=]?", "", text.strip()))
    if len(hexdigits) != 64:
        raise PkiError(
            f"{text!r} is not a SHA-256 fingerprint (expected 64 hex digits, e.g. from "
            "`kitt server ca`)"
        )
    return ":".join(hexdigits[i : i + 2].upper() for i in range(0, 64, 2))


def subject_field(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(oid)
    return str(attrs[0].value) if attrs else None


def _name(common_name: str, role: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if role:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _validity(lifetime: dt.timedelta) -> tuple[dt.datetime, dt.datetime]:
    now = utcnow()
    return now - min(MAX_BACKDATE, lifetime / 10), now + lifetime


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates; a leaf (EC key) signs handshakes and agrees keys."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def create_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = new_key()
    name = _name(common_name, None)
    not_before, not_after = _validity(CA_LIFETIME)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


@dataclass(frozen=True)
class Issuer:
    """The CA as a signer. Only the server ever holds one."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        common_name: str,
        role: str,
        lifetime: dt.timedelta,
        dns_names: Sequence[str],
        ips: Sequence[str] = (),
    ) -> x509.Certificate:
        not_before, not_after = _validity(lifetime)
        not_after = min(not_after, self.cert.not_valid_after_utc)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, role))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def sign_agent_csr(self, csr_pem: str, name: str, lifetime: dt.timedelta) -> x509.Certificate:
        """Sign an agent's CSR after checking it; the subject is rebuilt from ``name``."""
        public_key = check_csr(csr_pem, name)
        return self.issue(public_key, name, AGENT_ROLE, lifetime, [name])


def check_csr(csr_pem: str, name: str) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The CSR's public key, once its signature, key strength and CN are acceptable."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError:
        raise PkiError("csr_pem is not a PEM certificate signing request") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature):
        valid = False
    if not valid:
        raise PkiError("the CSR's signature does not verify (was it made with this key?)")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.key_size < 256:
            raise PkiError(f"EC keys must be at least 256 bits, not {key.curve.key_size}")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise PkiError(f"RSA keys must be at least 2048 bits, not {key.key_size}")
    else:
        raise PkiError("only EC (P-256 or larger) and RSA (2048+) keys are accepted")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != name:
        got = cns[0].value if cns else "none"
        raise PkiError(f"the CSR's common name ({got!r}) must be the agent name {name!r}")
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def cert_record(cert: x509.Certificate) -> tuple[str, dt.datetime]:
    """What the server keeps of a certificate it issued: serial (hex) and expiry."""
    return f"{cert.serial_number:x}", cert.not_valid_after_utc


def renewal_due(cert: x509.Certificate) -> dt.datetime:
    """When a certificate should be renewed: two thirds into its lifetime."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * 2 / 3


# --- SSL contexts -------------------------------------------------------------------------


def server_context(cert: Path, key: Path, ca: Path, *, require_client: bool) -> ssl.SSLContext:
    """A listener's context: verify client certs against the CA (required, or if presented).

    With ``CERT_OPTIONAL`` a client that presents a bad certificate (expired, another CA,
    self-signed) is refused in the handshake; one that presents none gets through, and
    the app then decides per endpoint.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
    # No TLS 1.3 session tickets: no KITT client resumes sessions, and issuing two per
    # handshake cost ~0.4 ms of the ~1.3 ms a full mTLS handshake takes (measured).
    ctx.num_tickets = 0
    return ctx


def client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None, *, verify: bool = True
) -> ssl.SSLContext:
    """A client's context. ``verify="ca.pem"`` plus ``cert=(crt, key)`` makes httpx send
    NO client certificate; a context carrying both is the only way (ARCHITECTURE.md §7)."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not verify:  # --insecure: still present our certificate (mTLS), trust anything
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert and key:
            ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise PkiError(f"cannot load TLS files ({ca}, {cert}, {key}): {exc}") from exc
    return ctx
