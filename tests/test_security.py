"""Security, tested like an attacker would: a real HTTPS server and agent, real certificates.

Every rejection below names the protection it proves; each test also shows the same
request succeeding with the right credential, so removing the protection fails it.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from conftest import Kitt, wait_for
from kitt import pki
from kitt.tokens import push_key, token_hash

BEAT = {"status": "idle", "uptime_s": 1.0}


@dataclass
class Creds:
    """One agent's identity as files and its token."""

    name: str
    cert: Path
    key: Path
    token: str
    agent_id: str = ""


def context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    return pki.client_context(ca, cert, key)


def client(kitt: Kitt, creds: Creds | None = None, **kw: Any) -> httpx.Client:
    ca = kitt.home / "server" / "certs" / "ca.pem"
    ctx = context(ca, creds.cert, creds.key) if creds else context(ca)
    return httpx.Client(base_url=kitt.tls_url, verify=ctx, timeout=10, **kw)


def enroll_via_api(kitt: Kitt, name: str, where: Path) -> Creds:
    """Enroll like kitt-agent init does, straight through the API."""
    key = pki.new_key()
    where.mkdir(parents=True, exist_ok=True)
    with client(kitt) as c:
        r = c.post(
            "/api/v1/agents/enroll",
            json={"name": name, "csr_pem": pki.make_csr(key, name)},
            headers={"Authorization": f"Bearer {kitt.bootstrap_token()}"},
        )
    assert r.status_code == 201, r.text
    (where / "cert.pem").write_text(r.json()["cert_pem"])
    (where / "key.pem").write_bytes(pki.key_pem(key))
    creds = Creds(name, where / "cert.pem", where / "key.pem", r.json()["token"])
    with client(kitt, creds) as c:
        reg = c.post("/api/v1/agents/register", headers=bearer(creds.token),
                     json={"name": name, "hostname": "h", "port": 1, "kitt_version": "x"})  # fmt: skip
    assert reg.status_code == 201, reg.text
    creds.agent_id = reg.json()["agent_id"]
    return creds


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def forge(
    where: Path,
    name: str,
    *,
    issuer: tuple[x509.Certificate, Any] | None = None,
    expired: bool = False,
    role: str = pki.AGENT_ROLE,
) -> tuple[Path, Path]:
    """A certificate for ``name``: self-signed, or signed by ``issuer``, maybe expired."""
    key = pki.new_key()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])  # fmt: skip
    now = dt.datetime.now(dt.timezone.utc)
    start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired else (
        now - dt.timedelta(minutes=1), now + dt.timedelta(days=1))  # fmt: skip
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(signing_key, hashes.SHA256())
    )
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{name}.pem").write_bytes(pki.cert_pem(cert))
    (where / f"{name}-key.pem").write_bytes(pki.key_pem(key))
    return where / f"{name}.pem", where / f"{name}-key.pem"


def heartbeat_count(kitt: Kitt, name: str) -> int:
    return len(kitt.heartbeats(name))


@pytest.fixture
def tls(kitt: Kitt) -> Iterator[Kitt]:
    """An HTTPS server (fleet CA made on first start) with agent gpu-01 enrolled and running."""
    started = kitt.run("server", "start", "--port", str(kitt.server_port), "--tls",
                       "--heartbeat-interval", "0.5", check=True)  # fmt: skip
    assert "admin token (shown once" in started.stdout and "SHA-256 fingerprint" in started.stdout
    fingerprint = kitt.run("server", "ca", "--fingerprint", check=True).stdout.strip()
    kitt.run("agent", "init", "--server", kitt.tls_url, "--name", "gpu-01",
             "--port", str(kitt.agent_port), "--bind", "127.0.0.1",
             "--ca-fingerprint", fingerprint, "--token", kitt.bootstrap_token(), check=True)  # fmt: skip
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("gpu-01").get("online"), what="gpu-01 registered over mTLS")
    yield kitt


def test_enrollment_writes_a_private_key_and_a_ca_signed_cert(tls: Kitt) -> None:
    cfg = tls.agent_config()
    certs = tls.home / "certs"
    assert cfg["tls"] == {"cert": str(certs / "agent.pem"), "key": str(certs / "agent-key.pem"),
                          "ca": str(certs / "ca.pem")}  # fmt: skip
    assert (certs / "agent-key.pem").stat().st_mode & 0o777 == 0o600
    assert (tls.home / "server" / "certs" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert (tls.home / "server" / "admin-token").stat().st_mode & 0o777 == 0o600
    cert = pki.load_cert(certs / "agent.pem")
    ca = pki.load_cert(tls.home / "server" / "certs" / "ca.pem")
    cert.verify_directly_issued_by(ca)
    assert pki.subject_field(cert, NameOID.COMMON_NAME) == "gpu-01"
    assert pki.subject_field(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == pki.AGENT_ROLE
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=89) < lifetime < dt.timedelta(days=91)
    # The server stores the agent token only as a hash; nothing else in its database
    # or its log authenticates anyone.
    token = cfg["token"]
    assert token.startswith("kitt_agt_")
    db = (tls.home / "server" / "kitt.db").read_bytes() + (
        tls.home / "server" / "kitt.db-wal"
    ).read_bytes()
    assert token.encode() not in db and token_hash(token).encode() in db
    assert tls.admin_token.encode() not in db
    assert token not in (tls.home / "server" / "server.log").read_text()
    # The agent's list entry shows days to certificate expiry.
    listing = tls.run("agents", "list", check=True).stdout
    assert "gpu-01" in listing and ("89d" in listing or "90d" in listing)
    # Re-running init keeps the identity instead of enrolling again.
    again = tls.run("agent", "init", "--server", tls.tls_url, check=True)
    assert "already enrolled as 'gpu-01'" in again.stdout
    assert tls.agent_config()["token"] == token


def test_the_agent_key_never_travels(
    tls: Kitt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enroll in this process, recording every request body the client sends."""
    from kitt.agent import enrollment
    from kitt.paths import AgentPaths

    sent: list[bytes] = []
    real_send = httpx.Client.send

    def spy(self: httpx.Client, request: httpx.Request, **kw: Any) -> httpx.Response:
        sent.append(request.read())
        return real_send(self, request, **kw)

    monkeypatch.setattr(httpx.Client, "send", spy)
    paths = AgentPaths(tmp_path / "spy-home")
    enrollment.ensure_ca(paths, tls.tls_url, tls.home / "server" / "certs" / "ca.pem", None)
    enrolled = enrollment.enroll(paths, tls.tls_url, "spy", tls.bootstrap_token())
    key_pem = paths.key.read_bytes()
    private = pki.load_key(paths.key).private_numbers().private_value
    assert enrolled.name == "spy" and sent
    for body in sent:
        assert b"PRIVATE KEY" not in body and key_pem not in body
        assert f"{private:x}".encode() not in body and str(private).encode() not in body
    assert any(b"CERTIFICATE REQUEST" in body for body in sent)


def test_attack_matrix_on_the_server(tls: Kitt, tmp_path: Path) -> None:
    tls.run("agent", "stop", check=True)  # its credentials stay; only this test talks now
    cfg = tls.agent_config()
    me = Creds("gpu-01", Path(cfg["tls"]["cert"]), Path(cfg["tls"]["key"]), cfg["token"],
               tls.agent("gpu-01")["id"])  # fmt: skip
    other = enroll_via_api(tls, "gpu-02", tmp_path / "gpu-02")
    ca_files = tls.home / "server" / "certs"
    real_ca = (pki.load_cert(ca_files / "ca.pem"), pki.load_key(ca_files / "ca-key.pem"))
    foreign_ca = pki.create_ca("someone else's CA")
    url = f"/api/v1/agents/{me.agent_id}/heartbeat"
    before = heartbeat_count(tls, "gpu-01")

    def rejected_at_handshake(cert: Path, key: Path) -> str:
        with (
            pytest.raises(httpx.TransportError) as info,
            client(tls, Creds("x", cert, key, me.token)) as c,
        ):
            c.post(url, json=BEAT, headers=bearer(me.token))
        return str(info.value)

    def status(creds: Creds | None, token: str | None, path: str = url) -> tuple[int, str]:
        with client(tls, creds) as c:
            r = c.post(path, json=BEAT, headers=bearer(token) if token else {})
        return r.status_code, r.json().get("error", "") if r.status_code != 200 else ""

    # No client certificate, a valid token: refused (a token alone is not enough).
    code, msg = status(None, me.token)
    assert code == 403 and "client certificate" in msg
    # Certificates the CA did not sign, or no longer valid: refused in the handshake.
    for forged in (
        forge(tmp_path / "self", "gpu-01"),
        forge(tmp_path / "foreign", "gpu-01", issuer=foreign_ca),
        forge(tmp_path / "expired", "gpu-01", issuer=real_ca, expired=True),
    ):
        assert "alert" in rejected_at_handshake(*forged).lower()
    # A certificate from the CA with another agent's name, and the right token: refused.
    code, msg = status(other, me.token)
    assert code == 403 and "certificate is for agent 'gpu-02'" in msg
    # The right certificate with another agent's token: refused.
    code, msg = status(me, other.token)
    assert code == 403 and "certificate is for agent 'gpu-01'" in msg
    # Another agent's certificate and token against this agent's id: refused.
    code, msg = status(other, other.token)
    assert code == 403 and "belongs to agent 'gpu-02'" in msg
    # A CA-signed certificate without the agent role (e.g. a server-role cert): refused.
    code, msg = status(Creds("srv", ca_files / "server.pem", ca_files / "server-key.pem", ""),
                       me.token)  # fmt: skip
    assert code == 403 and "not an agent certificate" in msg
    # Wrong or missing tokens.
    assert status(me, None)[0] == 401
    code, msg = status(me, "kitt_agt_" + "x" * 43)
    assert code == 401 and "agent token not accepted" in msg
    # The admin token is not an agent credential either.
    assert status(me, tls.admin_token)[0] == 401
    assert heartbeat_count(tls, "gpu-01") == before  # nothing was written
    assert status(me, me.token) == (200, "")  # the right pair works
    assert heartbeat_count(tls, "gpu-01") == before + 1

    # Revoking an agent kills its token at once.
    revoked = tls.run("agents", "revoke", "gpu-02", "--yes", check=True)
    assert "revoked agent gpu-02" in revoked.stdout
    other_url = f"/api/v1/agents/{other.agent_id}/heartbeat"
    code, msg = status(other, other.token, other_url)
    assert code == 401 and "not accepted" in msg
    assert any(a["name"] == "gpu-02" and a["revoked"] for a in tls.agents())
    with client(tls, other) as c:  # nor can it renew its way back
        r = c.post("/api/v1/agents/renew", headers=bearer(other.token),
                   json={"csr_pem": pki.make_csr(pki.load_key(other.key), "gpu-02")})  # fmt: skip
    assert r.status_code == 401


def test_bootstrap_and_admin_tokens(tls: Kitt, tmp_path: Path) -> None:
    key = pki.new_key()

    def enroll(name: str, token: str) -> httpx.Response:
        with client(tls) as c:
            return c.post("/api/v1/agents/enroll", headers=bearer(token),
                          json={"name": name, "csr_pem": pki.make_csr(key, name)})  # fmt: skip

    once = tls.bootstrap_token(uses=1)
    assert enroll("a1", once).status_code == 201
    used = enroll("a2", once)
    assert used.status_code == 401 and "used up" in used.json()["error"]
    short = tls.bootstrap_token(ttl="1s")
    wait_for(lambda: any(t["state"] == "expired" for t in json.loads(
        tls.run("server", "token", "list", "--json", check=True).stdout)), what="token expiry")  # fmt: skip
    assert enroll("a3", short).status_code == 401
    revoked = tls.run("server", "token", "create", check=True).stdout
    token_id = revoked.split()[2].rstrip(":")
    token = revoked.strip().splitlines()[-1]
    assert (
        tls.run("server", "token", "revoke", token_id, check=True)
        .stdout.strip()
        .endswith("revoked")
    )
    assert enroll("a4", token).status_code == 401
    # A name already enrolled cannot be taken over with a fresh bootstrap token.
    taken = enroll("gpu-01", tls.bootstrap_token())
    assert taken.status_code == 409 and "already enrolled" in taken.json()["error"]
    # A CSR whose name is not the agent name, or garbage: 400, and the token is not spent.
    spare = tls.bootstrap_token()
    with client(tls) as c:
        bad = c.post("/api/v1/agents/enroll", headers=bearer(spare),
                     json={"name": "a5", "csr_pem": pki.make_csr(key, "someone-else")})  # fmt: skip
        assert bad.status_code == 400 and "common name" in bad.json()["error"]
        garbage = c.post("/api/v1/agents/enroll", headers=bearer(spare),
                         json={"name": "a5", "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----"})  # fmt: skip
        assert garbage.status_code == 400
    assert enroll("a5", spare).status_code == 201
    listing = tls.run("server", "token", "list", check=True).stdout
    assert "used" in listing and "expired" in listing and "revoked" in listing
    assert "kitt_boot_" not in listing  # secrets are never shown again
    # Admin endpoints: wrong token, missing token, an agent's token.
    for headers in ({}, bearer("kitt_adm_wrong"), bearer(tls.agent_config()["token"])):
        with client(tls) as c:
            r = c.get("/api/v1/agents", headers=headers)
        assert r.status_code == 401 and "admin token" in r.json()["error"]
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = tls.run("agents", "list", "--token", "kitt_adm_wrong")
    assert wrong.returncode == 1 and "admin token not accepted" in wrong.stderr
    # Plain HTTP to the HTTPS port: a clear answer, not a reset.
    plain = httpx.get(f"http://127.0.0.1:{tls.server_port}/api/v1/health")
    assert plain.status_code == 400 and "https://" in plain.json()["error"]
    # Health and the CA stay public (the CA is what --ca-fingerprint pins).
    with client(tls) as c:
        assert c.get("/api/v1/health").status_code == 200
        assert (
            c.get("/api/v1/ca.pem").text == (tls.home / "server" / "certs" / "ca.pem").read_text()
        )


def test_agent_listener_takes_commands_only_from_the_server(tls: Kitt, tmp_path: Path) -> None:
    certs = tls.home / "server" / "certs"
    agent_url = f"https://127.0.0.1:{tls.agent_port}"
    server_creds = (certs / "server.pem", certs / "server-key.pem")
    cfg = tls.agent_config()
    command = {"command_id": "cmd_sec", "type": "run_test", "test_id": "tst_sec",
               "payload": {"benchmark": "nope"}}  # fmt: skip

    def post(cert: tuple[Path, Path] | None, headers: dict[str, str]) -> httpx.Response:
        ctx = context(certs / "ca.pem", *(cert or (None, None)))
        with httpx.Client(verify=ctx, timeout=10) as c:
            return c.post(agent_url + "/api/commands", json=command, headers=headers,
                          extensions={"sni_hostname": "gpu-01"})  # fmt: skip

    with pytest.raises(httpx.TransportError):  # no client certificate: no TLS session
        post(None, {})
    other = enroll_via_api(tls, "gpu-02", tmp_path / "gpu-02")
    as_agent = post((other.cert, other.key), bearer(push_key(other.token)))
    assert as_agent.status_code == 403 and "only the KITT server" in as_agent.json()["error"]
    no_key = post(server_creds, {})
    assert no_key.status_code == 401
    wrong_key = post(server_creds, bearer(push_key(other.token)))
    assert wrong_key.status_code == 401
    ok = post(server_creds, bearer(push_key(cfg["token"])))
    assert ok.status_code == 400 and "unknown benchmark 'nope'" in ok.json()["error"]
    # `kitt agent status` talks to the listener as the agent itself.
    status = tls.run("agent", "status", "--json", check=True)
    assert json.loads(status.stdout)["name"] == "gpu-01"
    with httpx.Client(verify=context(certs / "ca.pem", other.cert, other.key)) as c:
        peer = c.get(agent_url + "/api/status", extensions={"sni_hostname": "gpu-01"})
    assert peer.status_code == 403  # another agent may not read it


def test_renewal_with_a_short_lifetime_and_forced_renew(kitt: Kitt) -> None:
    kitt.run("server", "start", "--port", str(kitt.server_port), "--tls",
             "--heartbeat-interval", "0.5", "--agent-cert-lifetime", "12s", check=True)  # fmt: skip
    fingerprint = kitt.run("server", "ca", "--fingerprint", check=True).stdout.strip()
    kitt.run("agent", "init", "--server", kitt.tls_url, "--name", "short",
             "--port", str(kitt.agent_port), "--bind", "127.0.0.1",
             "--ca-fingerprint", fingerprint, "--token", kitt.bootstrap_token(), check=True)  # fmt: skip
    cert_path = kitt.home / "certs" / "agent.pem"
    first = pki.load_cert(cert_path)
    assert first.not_valid_after_utc - first.not_valid_before_utc < dt.timedelta(seconds=15)
    kitt.run("agent", "start", check=True)
    renewed = wait_for(lambda: (c := pki.load_cert(cert_path)).serial_number != first.serial_number and c,
                       timeout=20, what="automatic renewal at 2/3 of the lifetime")  # fmt: skip
    assert renewed.not_valid_after_utc > first.not_valid_after_utc
    # Past the first certificate's expiry the same process still heartbeats and serves
    # its new certificate to new connections.
    pid = kitt.pid_of("agent")
    wait_for(lambda: dt.datetime.now(dt.timezone.utc) > first.not_valid_after_utc + dt.timedelta(seconds=1),
             timeout=20, what="first certificate expired")  # fmt: skip
    seen = kitt.agent("short")["last_seen_at"]
    wait_for(lambda: kitt.agent("short")["last_seen_at"] != seen, what="heartbeat after expiry")
    served = ssl.get_server_certificate(("127.0.0.1", kitt.agent_port))
    assert x509.load_pem_x509_certificate(served.encode()).serial_number != first.serial_number
    assert kitt.pid_of("agent") == pid
    assert "certificate renewed" in (kitt.home / "agent.log").read_text()
    forced = kitt.run("agent", "renew", check=True)
    assert "renewed" in forced.stdout
    assert pki.load_cert(cert_path).serial_number not in (
        first.serial_number,
        renewed.serial_number,
    )
    # The server recorded the certificate it issued last (what `agents list` shows).
    expiry = dt.datetime.fromisoformat(
        kitt.agent("short")["cert_expires_at"].replace("Z", "+00:00")
    )
    assert expiry == pki.load_cert(cert_path).not_valid_after_utc
    # The server names certificates that expire within 14 days in its log (checked at
    # start, then every minute).
    kitt.run("server", "stop", check=True)
    kitt.run("server", "start", "--port", str(kitt.server_port), "--tls",
             "--agent-cert-lifetime", "12s", check=True)  # fmt: skip
    wait_for(lambda: "agent short: certificate " in
             (kitt.home / "server" / "server.log").read_text(), what="expiry warning")  # fmt: skip


def test_ca_pinning_and_missing_ca_are_clear(kitt: Kitt, tmp_path: Path) -> None:
    kitt.run("server", "start", "--port", str(kitt.server_port), "--tls", check=True)
    # Another machine: its own KITT_HOME, which knows nothing of this server's files.
    box = Kitt(home=tmp_path / "gpu-box", env={**kitt.env, "KITT_HOME": str(tmp_path / "gpu-box")})
    token = kitt.bootstrap_token()
    missing = box.run("agent", "init", "--server", kitt.tls_url, "--token", token)
    assert missing.returncode == 2 and "does not know the fleet CA" in missing.stderr
    assert "kitt server ca" in missing.stderr and "--ca-fingerprint" in missing.stderr
    wrong = box.run("agent", "init", "--server", kitt.tls_url, "--token", token,
                    "--ca-fingerprint", "AB" * 32)  # fmt: skip
    assert wrong.returncode == 1 and "refusing to trust it" in wrong.stderr
    assert not (box.home / "agent.yaml").exists()
    assert not (box.home / "certs" / "agent-key.pem").exists()
    bad = box.run("agent", "init", "--server", kitt.tls_url, "--ca-fingerprint", "xyz")
    assert bad.returncode == 1 and "not a SHA-256 fingerprint" in bad.stderr
    assert "Traceback" not in missing.stderr + wrong.stderr + bad.stderr
    # The token was not spent by the failed attempts; any fingerprint spelling works.
    fingerprint = kitt.run("server", "ca", "--fingerprint", check=True).stdout.strip()
    box.run("agent", "init", "--server", kitt.tls_url, "--token", token, "--name", "pinned",
            "--ca-fingerprint", fingerprint.lower().replace(":", ""), check=True)  # fmt: skip
    assert (box.home / "certs" / "ca.pem").read_bytes() == (
        kitt.home / "server" / "certs" / "ca.pem"
    ).read_bytes()
    assert (box.home).stat().st_mode & 0o777 == 0o700
    # On the server's own host, init finds the CA (and a token) by itself.
    local = kitt.run("agent", "init", "--server", kitt.tls_url, "--name", "local", check=True)
    assert "enrolled as 'local'" in local.stdout
    # A bad name is refused before anything is enrolled.
    other = Kitt(home=tmp_path / "box2", env={**kitt.env, "KITT_HOME": str(tmp_path / "box2")})
    named = other.run("agent", "init", "--server", kitt.tls_url, "--token", kitt.bootstrap_token(),
                      "--name", "bad name!", "--ca-fingerprint", fingerprint)  # fmt: skip
    assert named.returncode == 2 and "name" in named.stderr and "Traceback" not in named.stderr
    assert not (tmp_path / "box2" / "certs" / "agent.pem").exists()


def test_offline_bundle_and_remote_login(kitt: Kitt, tmp_path: Path) -> None:
    kitt.run("server", "start", "--port", str(kitt.server_port), "--tls",
             "--heartbeat-interval", "0.5", check=True)  # fmt: skip
    bundle = tmp_path / "bundle"
    made = kitt.run("server", "issue-agent-cert", "airgap", "--out", str(bundle), check=True)
    assert "kitt-agent init --bundle" in made.stdout
    assert (bundle / "agent-key.pem").stat().st_mode & 0o777 == 0o600
    assert (bundle / "bundle.json").stat().st_mode & 0o777 == 0o600
    again = kitt.run("server", "issue-agent-cert", "airgap", "--out", str(tmp_path / "b2"))
    assert again.returncode == 1 and "already enrolled" in again.stderr
    kitt.run("agent", "init", "--bundle", str(bundle), check=True)
    data = yaml.safe_load((kitt.home / "agent.yaml").read_text())
    data.update(port=kitt.agent_port, bind="127.0.0.1")
    (kitt.home / "agent.yaml").write_text(yaml.safe_dump(data))
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("airgap").get("online"), what="bundle agent registered")

    # A user on another machine (another KITT_HOME) logs in with the fingerprint.
    remote = Kitt(home=tmp_path / "laptop", env={**kitt.env, "KITT_HOME": str(tmp_path / "laptop")})
    fingerprint = kitt.run("server", "ca", "--fingerprint", check=True).stdout.strip()
    refused = remote.run(
        "login", kitt.tls_url, "--token", "kitt_adm_nope", "--ca-fingerprint", fingerprint
    )
    assert refused.returncode == 1 and "did not accept this admin token" in refused.stderr
    untrusted = remote.run("agents", "list", "--server", kitt.tls_url)  # no CA known yet
    assert untrusted.returncode == 1 and "certificate" in untrusted.stderr.lower()
    remote.run("login", kitt.tls_url, "--token", kitt.admin_token, "--ca-fingerprint", fingerprint,
               check=True)  # fmt: skip
    assert (tmp_path / "laptop" / "login.json").stat().st_mode & 0o777 == 0o600
    listing = remote.run("agents", "list", check=True)
    assert "airgap" in listing.stdout
    remote.run("logout", check=True)
    after = remote.run("agents", "list", "--server", kitt.tls_url)
    assert after.returncode == 1


def test_unsafe_modes_are_refused_or_loud(kitt: Kitt) -> None:
    no_auth = kitt.run(
        "server", "start", "--port", str(kitt.server_port), "--host", "0.0.0.0", "--no-auth"
    )
    assert no_auth.returncode == 2 and "only allowed on a loopback address" in no_auth.stderr
    plain = kitt.run(
        "server", "start", "--port", str(kitt.server_port), "--host", "0.0.0.0", "--no-tls"
    )
    assert plain.returncode == 2 and "--insecure" in plain.stderr
    loud = kitt.run("server", "start", "--port", str(kitt.server_port), "--no-auth", check=True)
    assert "authentication is OFF" in loud.stdout
    assert "AUTHENTICATION IS OFF" in (kitt.home / "server" / "server.log").read_text()
    kitt.run("server", "stop", check=True)
    kitt.run("server", "start", "--port", str(kitt.server_port), check=True)
    kitt.run(
        "agent", "init", "--server", kitt.server_url, "--port", str(kitt.agent_port), check=True
    )
    exposed = kitt.run("agent", "start")  # plain HTTP on 0.0.0.0
    assert exposed.returncode == 2 and "would serve plain HTTP on 0.0.0.0" in exposed.stderr
    insecure = kitt.run("agent", "start", "--insecure", check=True)
    assert "registered with" in insecure.stdout
    wait_for(lambda: "INSECURE" in (kitt.home / "agent.log").read_text(), what="insecure warning")


def test_server_cert_rotation_is_served_without_restart(tls: Kitt) -> None:
    before = x509.load_pem_x509_certificate(
        ssl.get_server_certificate(("127.0.0.1", tls.server_port)).encode()
    )
    pid = tls.pid_of("server")
    rotated = tls.run("server", "cert", "rotate", "--hostname", "kitt.lab.example", check=True)
    assert "kitt.lab.example" in rotated.stdout and "no restart needed" in rotated.stdout

    def served() -> x509.Certificate | None:
        pem = ssl.get_server_certificate(("127.0.0.1", tls.server_port))
        cert = x509.load_pem_x509_certificate(pem.encode())
        return cert if cert.serial_number != before.serial_number else None

    new = wait_for(served, what="the rotated certificate served")
    names = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kitt.lab.example" in names.get_values_for_type(x509.DNSName)
    assert tls.pid_of("server") == pid
    # Agents keep heartbeating (they trust the CA, which did not change), and pushes work.
    seen = tls.agent("gpu-01")["last_seen_at"]
    wait_for(lambda: tls.agent("gpu-01")["last_seen_at"] != seen, what="heartbeat after rotation")
