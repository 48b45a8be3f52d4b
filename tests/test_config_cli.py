"""agent.yaml and the operator's mistakes: each gets a clear message and the right exit code."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from conftest import Kitt


def test_init_writes_private_config_atomically(kitt: Kitt) -> None:
    result = kitt.run("agent", "init", "--server", "http://10.0.0.5:8080/", "--token", "s3cret",
                      "--name", "gpu-07", "--port", "9100")  # fmt: skip
    assert result.returncode == 0, result.stderr
    path = kitt.home / "agent.yaml"
    assert path.stat().st_mode & 0o777 == 0o600
    assert kitt.home.stat().st_mode & 0o777 == 0o700
    data = yaml.safe_load(path.read_text())
    assert data == {
        "server_url": "http://10.0.0.5:8080",  # normalised: trailing slash dropped
        "token": "s3cret",
        "port": 9100,
        "name": "gpu-07",
    }
    assert [p.name for p in kitt.home.iterdir()] == ["agent.yaml"]  # no temp file left
    assert "s3cret" not in result.stdout


def test_init_defaults_name_to_hostname_and_port_8090(kitt: Kitt) -> None:
    kitt.run("agent", "init", "--server", "http://kitt.example:8080", check=True)
    data = yaml.safe_load((kitt.home / "agent.yaml").read_text())
    assert data["name"] == socket.gethostname().split(".")[0]
    from kitt.agent.config import load_config

    assert load_config(kitt.home / "agent.yaml").port == 8090


def test_rerunning_init_updates_and_keeps_unrelated_keys(kitt: Kitt) -> None:
    kitt.run("agent", "init", "--server", "http://a:8080", "--name", "n1", check=True)
    path = kitt.home / "agent.yaml"
    data = yaml.safe_load(path.read_text())
    data["benchmarks"] = {"mine": {"command": ["/opt/bench.sh"], "timeout_s": 60}}
    data["log_level"] = "DEBUG"
    path.write_text(yaml.safe_dump(data))
    kitt.run("agent", "init", "--server", "http://b:9090", "--port", "9000", check=True)
    after = yaml.safe_load(path.read_text())
    assert after["server_url"] == "http://b:9090" and after["port"] == 9000
    assert after["name"] == "n1"  # kept: not given this time
    assert after["benchmarks"] == data["benchmarks"] and after["log_level"] == "DEBUG"
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("ftp://server:8080", "must start with http:// or https://"),
        ("server:8080", "must start with http:// or https://"),
        ("http://:8080", "has no host"),
        ("http://server:99999", "invalid port"),
        ("http://server:8080/api/v1", "must not have a path"),
        ("http://user:pw@server:8080", "must not contain credentials"),
    ],
)
def test_init_rejects_bad_server_urls(kitt: Kitt, url: str, needle: str) -> None:
    result = kitt.run("agent", "init", "--server", url, "--name", "x")
    assert result.returncode == 2
    assert needle in result.stderr and "--server" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (kitt.home / "agent.yaml").exists()


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_init_rejects_bad_ports(kitt: Kitt, port: str) -> None:
    result = kitt.run("agent", "init", "--server", "http://s:8080", "--port", port)
    assert result.returncode == 2 and "--port" in result.stderr
    assert not (kitt.home / "agent.yaml").exists()


@pytest.mark.parametrize("command", [("start",), ("start", "--foreground"), ("status",)])
def test_missing_config_says_run_init(kitt: Kitt, command: tuple[str, ...]) -> None:
    result = kitt.run("agent", *command)
    assert result.returncode == 2
    assert "run `kitt-agent init --server URL` first" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("name: a\nserver_url: [unclosed\n", ["invalid YAML at line", "agent.yaml"]),
        ("- just\n- a list\n", ["expected a mapping"]),
        ("name: a\nserver_url: http://s:1\nport: lots\n", ["field 'port'", "valid integer"]),
        ("name: a\nserver_url: http://s:1\nport: 0\n", ["field 'port'"]),
        ("server_url: http://s:1\n", ["field 'name'", "Field required"]),
        ("name: a\nserver_url: http://s:1\nsever_port: 1\n", ["field 'sever_port'", "unknown key"]),
        ("name: a\nserver_url: gopher://s\n", ["field 'server_url'"]),
        ("name: 'bad name'\nserver_url: http://s:1\n", ["field 'name'"]),
    ],
)
def test_bad_config_names_the_problem(kitt: Kitt, content: str, needles: list[str]) -> None:
    kitt.home.mkdir(parents=True)
    (kitt.home / "agent.yaml").write_text(content)
    result = kitt.run("agent", "start")
    assert result.returncode == 2
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (kitt.home / "agent.pid").exists()


def test_unwritable_kitt_home_is_a_clear_error(kitt: Kitt, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a folder should be")
    kitt.env["KITT_HOME"] = str(blocker / "kitt")
    result = kitt.run("agent", "init", "--server", "http://s:8080", "--name", "x")
    assert result.returncode == 1
    assert (
        f"cannot create {blocker / 'kitt'}" in result.stderr and "Not a directory" in result.stderr
    )
    server = kitt.run("server", "start", "--port", str(kitt.server_port))
    assert server.returncode == 1 and "cannot create" in server.stderr
    assert "Traceback" not in result.stderr + server.stderr


def test_port_in_use_is_a_clear_error_for_agent_and_server(kitt: Kitt) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", kitt.agent_port))
        squatter.listen()
        kitt.init_agent("clash")
        result = kitt.run("agent", "start")
        assert result.returncode == 1
        assert f"port {kitt.agent_port} on 127.0.0.1 is already in use" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (kitt.home / "agent.pid").exists()
        foreground = kitt.run("agent", "start", "--foreground")
        assert foreground.returncode == 1 and "already in use" in foreground.stderr

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", kitt.server_port))
        squatter.listen()
        result = kitt.run("server", "start", "--port", str(kitt.server_port))
        assert result.returncode == 1
        assert f"port {kitt.server_port} on 127.0.0.1 is already in use" in result.stderr
        assert not (kitt.home / "server" / "server.pid").exists()
        assert not (kitt.home / "server" / "kitt.db").exists()  # failed before touching it


def test_fleet_client_without_server_is_clear(kitt: Kitt) -> None:
    result = kitt.run("agents", "list")
    assert result.returncode == 1 and "no server given" in result.stderr
    kitt.env["KITT_SERVER"] = f"http://127.0.0.1:{kitt.server_port}"
    unreachable = kitt.run("agents", "list")
    assert unreachable.returncode == 1 and "cannot reach http://127.0.0.1" in unreachable.stderr
    bad = kitt.run("agents", "list", "--server", "nonsense")
    assert bad.returncode == 1 and "must start with http" in bad.stderr
