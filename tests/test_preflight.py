"""``kitt-agent preflight`` and ``kitt agent start --preflight``, run as real processes.

The server, the agent daemon, the sockets holding ports and the processes "on the GPU" are
real; only NVML is the stand-in (tests/fake_nvml), and a PATH without systemctl stands in
for a host without systemd.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from conftest import Kitt, free_port, wait_for
from kitt import __version__, pki

GIB = 1024**3
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-40GB"


def preflight(kitt: Kitt, *args: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """Run ``kitt agent preflight --json``: the exit code and the checks by name."""
    proc = kitt.run("agent", "preflight", "--json", *args)
    assert "Traceback" not in proc.stderr, proc.stderr
    checks = json.loads(proc.stdout)
    assert all(set(c) == {"name", "required", "status", "detail"} for c in checks)
    assert all(c["status"] in {"ok", "warn", "fail", "skip"} for c in checks)
    return proc.returncode, {c["name"]: c for c in checks}


def gpu(name: str, processes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"name": name, "util": 0, "mem_total": 80 * GIB, "mem_used": GIB, "temp": 40,
            "power_mw": 100_000, "processes": processes or []}  # fmt: skip


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real process that is not the agent: what NVML lists as a foreign GPU user."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture
def held_port() -> Iterator[tuple[socket.socket, int]]:
    """A port another program listens on (this test process)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock, sock.getsockname()[1]
    sock.close()


def test_without_config_and_without_nvml(kitt: Kitt) -> None:
    kitt.fake_gpus(None)  # nvmlInit fails as on a GPU-less host
    port = free_port()
    code, checks = preflight(kitt, "--port", str(port))
    assert code == 0
    assert checks["python"]["status"] == "ok" and checks["python"]["required"] is True
    assert f"Python {sys.version_info[0]}.{sys.version_info[1]}" in checks["python"]["detail"]
    assert checks["config"] == {"name": "config", "required": False, "status": "skip",
                                "detail": f"no {kitt.home / 'agent.yaml'} yet (run kitt-agent init)"}  # fmt: skip
    assert checks["nvml"]["status"] == "warn" and checks["nvml"]["required"] is False
    assert "NVML unavailable (NVML Shared Library Not Found)" in checks["nvml"]["detail"]
    assert checks["gpu processes"]["status"] == "skip"
    assert checks["server"]["status"] == "skip" and "--server" in checks["server"]["detail"]
    assert checks["version"]["status"] == "skip"
    assert checks["port"] == {"name": "port", "required": True, "status": "ok",
                              "detail": f"port {port} on 0.0.0.0 is free"}  # fmt: skip
    assert checks["disk"]["status"] == "ok" and "GiB free under" in checks["disk"]["detail"]
    assert checks["models_dir"]["status"] == "skip"
    assert checks["shipped engines"]["required"] is False
    assert "llama.cpp" in checks["shipped engines"]["detail"]

    table = kitt.run("agent", "preflight", "--port", str(port))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "┃", "STATUS", "┃", "KIND", "┃", "DETAIL"]
    nvml_row = next(line for line in lines if line.startswith("nvml "))
    assert [cell.strip() for cell in nvml_row.split("│")[:3]] == ["nvml", "warn", "advisory"]
    assert lines[-1].startswith("preflight passed; ") and lines[-1].endswith(" warnings")

    # A broken agent.yaml is a required failure that names the problem.
    (kitt.home / "agent.yaml").parent.mkdir(parents=True, exist_ok=True)
    (kitt.home / "agent.yaml").write_text("name: [\n")
    code, checks = preflight(kitt, "--port", str(port))
    assert code == 1
    assert checks["config"]["status"] == "fail" and checks["config"]["required"] is True
    assert "invalid YAML" in checks["config"]["detail"]


def test_gpus_through_the_nvml_stand_in(kitt: Kitt, sleeper: subprocess.Popen[bytes]) -> None:
    foreign = {"pid": sleeper.pid, "used_memory": 2 * GIB, "type": "compute"}
    kitt.fake_gpus([gpu(H100, [foreign]), gpu(A100)], driver="550.54.15", cuda=12040)
    code, checks = preflight(kitt, "--port", str(free_port()))
    assert code == 0  # GPUs in use by others is advisory
    assert checks["nvml"] == {
        "name": "nvml", "required": False, "status": "ok",
        "detail": f"2 GPU(s) (0: {H100}, 1: {A100}); driver 550.54.15, CUDA 12.4",
    }  # fmt: skip
    name = psutil.Process(sleeper.pid).name()
    assert checks["gpu processes"]["status"] == "warn"
    assert checks["gpu processes"]["detail"].startswith(
        f"GPU 0: pid {sleeper.pid} {name} (2.0 GiB):"
    )

    # The same process on GPU 1 as a graphics client, and nothing else: still listed.
    graphics = {"pid": sleeper.pid, "used_memory": 300 * 1024**2, "type": "graphics"}
    kitt.fake_gpus([gpu(H100), gpu(A100, [graphics])], driver="550.54.15", cuda=12040)
    _, checks = preflight(kitt, "--port", str(free_port()))
    assert checks["gpu processes"]["detail"].startswith(
        f"GPU 1: pid {sleeper.pid} {name} (300 MiB):"
    )

    kitt.fake_gpus([gpu(H100), gpu(A100)], driver="550.54.15", cuda=12040)
    _, checks = preflight(kitt, "--port", str(free_port()))
    assert checks["gpu processes"]["status"] == "ok"
    assert checks["gpu processes"]["detail"] == "no other processes on the 2 GPU(s)"


def write_engine_script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    path.chmod(0o755)
    return path


def add_engines(kitt: Kitt, engines: dict[str, dict[str, Any]]) -> None:
    cfg = kitt.home / "agent.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["engines"] = engines
    cfg.write_text(yaml.safe_dump(data))


def test_plain_server_and_configured_engines(kitt: Kitt, tmp_path: Path) -> None:
    kitt.start_server()
    kitt.init_agent()
    good = write_engine_script(
        tmp_path / "mine-server", "print('mine-server version 1.2.3', file=sys.stderr)"
    )
    add_engines(kitt, {"mine": {"binary": str(good), "argv": ["{binary}", "--port", "{port}"],
                                "version_command": ["{binary}", "--version"],
                                "version_regex": r"version (\S+)"}})  # fmt: skip
    code, checks = preflight(kitt)
    assert code == 0, checks
    assert checks["config"]["status"] == "ok" and "agent 'gpu-01'" in checks["config"]["detail"]
    assert checks["server"] == {"name": "server", "required": True, "status": "ok",
                                "detail": f"{kitt.server_url} reachable, KITT {__version__}"}  # fmt: skip
    assert checks["version"]["status"] == "ok" and __version__ in checks["version"]["detail"]
    assert checks["port"]["detail"] == f"port {kitt.agent_port} on 127.0.0.1 is free"
    assert checks["engine mine"] == {"name": "engine mine", "required": True, "status": "ok",
                                     "detail": f"{good}, version 1.2.3"}  # fmt: skip
    assert checks["certificate"]["status"] == "skip"  # plain HTTP: no agent certificate
    assert "mine" not in checks["shipped engines"]["detail"]

    # An engine whose binary is missing, and one whose version command fails.
    broken = write_engine_script(tmp_path / "broken", "print('no CUDA device'); sys.exit(3)")
    add_engines(kitt, {
        "mine": {"binary": str(good), "argv": ["{binary}"]},
        "ghost": {"binary": str(tmp_path / "missing" / "ghost-server"), "argv": ["{binary}"],
                  "version_command": ["{binary}", "--version"]},
        "broken": {"binary": str(broken), "argv": ["{binary}"],
                   "version_command": ["{binary}", "--version"]},
        "llama.cpp": {"binary": "no-such-llama-server-here"},  # override of a shipped one
    })  # fmt: skip
    code, checks = preflight(kitt)
    assert code == 1
    assert checks["engine mine"]["status"] == "ok"  # no version command: found is enough
    ghost = checks["engine ghost"]
    assert (ghost["required"], ghost["status"]) == (True, "fail")
    assert ghost["detail"] == f"binary {tmp_path / 'missing' / 'ghost-server'} is not an executable file"  # fmt: skip
    assert checks["engine broken"]["status"] == "fail"
    assert checks["engine broken"]["detail"] == f"`{broken} --version` exited 3: no CUDA device"
    assert checks["engine llama.cpp"]["detail"] == "binary no-such-llama-server-here is not on PATH"
    assert "llama.cpp" not in checks["shipped engines"]["detail"]

    table = kitt.run("agent", "preflight")
    assert table.returncode == 1
    assert table.stdout.splitlines()[-1].startswith(
        "preflight failed: 3 required checks failed (engine broken, engine ghost, engine llama.cpp)"
    )


def test_tls_server_trust(kitt: Kitt, tmp_path: Path) -> None:
    kitt.start_server("--tls")
    port = str(free_port())
    # Another machine (its own KITT_HOME) before kitt-agent init: only --server to go on.
    box = Kitt(home=tmp_path / "gpu-box", env={**kitt.env, "KITT_HOME": str(tmp_path / "gpu-box")})
    (box.home / "certs").mkdir(parents=True)
    other_ca, _ = pki.create_ca("some other fleet")
    (box.home / "certs" / "ca.pem").write_bytes(pki.cert_pem(other_ca))
    code, checks = preflight(box, "--server", kitt.tls_url, "--port", port)
    assert code == 1
    server = checks["server"]
    assert (server["required"], server["status"]) == (True, "fail")
    assert server["detail"].startswith(f"certificate not trusted: {kitt.tls_url} (")
    assert f"trusting {box.home / 'certs' / 'ca.pem'}" in server["detail"]
    assert "--ca FILE or --ca-fingerprint" in server["detail"]
    assert checks["version"]["status"] == "skip"

    (box.home / "certs" / "ca.pem").unlink()  # system trust knows nothing of the fleet CA
    code, checks = preflight(box, "--server", kitt.tls_url, "--port", port)
    assert code == 1 and "certificate not trusted" in checks["server"]["detail"]
    assert "system trust store" in checks["server"]["detail"]

    server_ca = kitt.home / "server" / "certs" / "ca.pem"
    (box.home / "certs" / "ca.pem").write_bytes(server_ca.read_bytes())
    code, checks = preflight(box, "--server", kitt.tls_url, "--port", port)
    assert code == 0, checks
    assert checks["server"]["detail"] == (
        f"{kitt.tls_url} reachable, KITT {__version__}, trusting {box.home / 'certs' / 'ca.pem'}"
    )

    nobody = f"https://127.0.0.1:{free_port()}"
    code, checks = preflight(box, "--server", nobody, "--port", port)
    assert code == 1
    assert checks["server"]["status"] == "fail"
    assert checks["server"]["detail"].startswith(f"unreachable: {nobody} (")
    assert "Connection refused" in checks["server"]["detail"]

    # Enrolled on the server's own host: agent.yaml's tls.ca and certificate are used.
    kitt.run("agent", "init", "--server", kitt.tls_url, "--name", "gpu-01",
             "--port", str(kitt.agent_port), "--bind", "127.0.0.1", check=True)  # fmt: skip
    code, checks = preflight(kitt)
    assert code == 0, checks
    assert checks["server"]["detail"].endswith(f"trusting {kitt.home / 'certs' / 'ca.pem'}")
    cert = checks["certificate"]
    assert (cert["required"], cert["status"]) == (True, "ok")
    assert cert["detail"].startswith(f"{kitt.home / 'certs' / 'agent.pem'} valid until ")


def test_port_taken_by_another_program(kitt: Kitt, held_port: tuple[socket.socket, int]) -> None:
    _, port = held_port
    code, checks = preflight(kitt, "--port", str(port))
    assert code == 1
    assert checks["port"]["status"] == "fail"
    name = psutil.Process(os.getpid()).name()
    assert checks["port"]["detail"] == (
        f"port {port} on 0.0.0.0 is in use by pid {os.getpid()} ({name}): stop it, "
        "or give the agent another port (kitt-agent init --port P)"
    )


def test_service_needs_systemd(kitt: Kitt, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    kitt.env["PATH"] = str(empty)  # no systemctl (and no engines) on this host
    port = str(free_port())
    code, checks = preflight(kitt, "--port", port)
    assert code == 0
    assert checks["systemd"]["required"] is False and checks["systemd"]["status"] == "warn"
    assert checks["systemd"]["detail"].startswith("no systemctl on PATH")
    assert checks["shipped engines"]["status"] == "warn"
    assert "not installed: llama.cpp, ollama, sglang, vllm" in checks["shipped engines"]["detail"]

    code, checks = preflight(kitt, "--port", port, "--service")
    assert code == 1
    assert checks["systemd"] == {
        "name": "systemd", "required": True, "status": "fail",
        "detail": "no systemctl on PATH: cannot install the service; use kitt-agent start",
    }  # fmt: skip


def test_start_with_preflight(kitt: Kitt, sleeper: subprocess.Popen[bytes], tmp_path: Path) -> None:
    kitt.fake_gpus([gpu(H100)], driver="550.54.15", cuda=12040)
    kitt.start_server()
    kitt.init_agent()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", kitt.agent_port))
        blocker.listen()
        refused = kitt.run("agent", "start", "--preflight")
        assert refused.returncode == 1
        assert "Traceback" not in refused.stderr
        assert refused.stdout.splitlines()[-1].startswith(
            "preflight failed: 1 required check failed (port); "
        )
        assert not (kitt.home / "agent.pid").exists()
        assert not (kitt.home / "agent.log").exists()  # no daemon was ever spawned

    started = kitt.run("agent", "start", "--preflight")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "preflight passed" in started.stdout and "agent 'gpu-01' started" in started.stdout
    wait_for(lambda: kitt.agent("gpu-01").get("online"), what="agent online")
    agent_pid = kitt.pid_of("agent")
    assert agent_pid is not None

    # Its own daemon holds the port: fine. Its own processes on the GPU are not foreign.
    own = {"pid": agent_pid, "used_memory": 4 * GIB}
    other = {"pid": sleeper.pid, "used_memory": GIB}
    kitt.fake_gpus([gpu(H100, [own, other])], driver="550.54.15", cuda=12040)
    code, checks = preflight(kitt)
    assert code == 0, checks
    assert checks["port"] == {
        "name": "port", "required": True, "status": "ok",
        "detail": f"port {kitt.agent_port} on 127.0.0.1 in use by this agent, pid {agent_pid}",
    }  # fmt: skip
    detail = checks["gpu processes"]["detail"]
    assert f"pid {sleeper.pid} " in detail and f"pid {agent_pid} " not in detail


def agent_cert(path: Path, not_after: dt.datetime) -> Path:
    """A self-signed agent certificate ending at ``not_after`` (preflight reads its dates)."""
    key = pki.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpu-01")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=90)).not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    path.write_bytes(pki.cert_pem(cert))
    return path


def test_agent_certificate_expiry(kitt: Kitt, tmp_path: Path) -> None:
    kitt.start_server()
    kitt.init_agent()
    now = dt.datetime.now(dt.timezone.utc)
    cfg = kitt.home / "agent.yaml"
    data = yaml.safe_load(cfg.read_text())
    for days, status, code in ((200, "ok", 0), (5, "warn", 0), (-1, "fail", 1)):
        cert = agent_cert(tmp_path / f"agent-{days}.pem", now + dt.timedelta(days=days, hours=1))
        cfg.write_text(yaml.safe_dump({**data, "tls": {"cert": str(cert)}}))
        got, checks = preflight(kitt)
        assert (got, checks["certificate"]["status"]) == (code, status), checks["certificate"]
        assert checks["certificate"]["required"] is True
        assert checks["certificate"]["detail"].startswith(str(cert))
    assert "expired on" in checks["certificate"]["detail"]
    assert "kitt-agent init --server URL --token TOKEN" in checks["certificate"]["detail"]
    assert [name for name, c in checks.items() if c["status"] == "fail"] == ["certificate"]
