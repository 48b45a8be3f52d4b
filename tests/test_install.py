"""The one-line install, re-install/upgrade and ``kitt-agent update``, end to end.

A real TLS server on loopback hands out its agent wheel, install script and a
wheelhouse (made by ``kitt server wheelhouse``). The line ``kitt agents add`` prints
runs in bash with a temp HOME, so a fresh venv is built from the server's files only
(pip runs with --no-index: nothing comes from PyPI), and the agent it starts is the
installed one, not this checkout (no PYTHONPATH reaches it).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Kitt, free_port, wait_for

pytestmark = pytest.mark.timeout(600)

SYSTEM_PATH = os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir())


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent's dependencies as wheels, fetched once with the real command."""
    data = tmp_path_factory.mktemp("wheelhouse-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KITT_")}
    proc = subprocess.run(
        [sys.executable, "-m", "kitt", "server", "wheelhouse", "--data-dir", str(data)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = sorted(p.name for p in (data / "wheelhouse").iterdir())
    assert any(n.startswith("pydantic_core-") for n in wheels), wheels
    assert not any(n.startswith("kitt_fleet-") for n in wheels)  # the server serves its own
    return data / "wheelhouse"


def _python_with_venv() -> str:
    """A system Python >= 3.10 that can make venvs (what a GPU box has)."""
    base = getattr(sys, "_base_executable", sys.executable)
    return shutil.which("python3", path=SYSTEM_PATH) or base


class Box:
    """A new GPU machine: its own HOME, a system PATH, none of this checkout's env."""

    def __init__(self, root: Path, kitt: Kitt) -> None:
        self.home = root / "gpu-home"
        self.home.mkdir()
        self.kitt = kitt
        self.port = free_port()
        self.wheelhouse: Path | None = None
        self.env = {
            "HOME": str(self.home),
            "PATH": SYSTEM_PATH,
            "LANG": "C.UTF-8",
            "NO_COLOR": "1",
            "KITT_PYTHON": _python_with_venv(),
            "TMPDIR": str(root),
        }
        if "KITT_FAKE_NVML" in kitt.env:
            self.env["KITT_FAKE_NVML"] = kitt.env["KITT_FAKE_NVML"]

    @property
    def kitt_home(self) -> Path:
        return self.home / ".kitt"

    def sh(self, line: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", line], env=self.env, cwd=self.home, capture_output=True, text=True,
            timeout=timeout, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def agent(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        exe = self.kitt_home / "agent-venv" / "bin" / "kitt-agent"
        return subprocess.run(
            [str(exe), *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def pid(self) -> int | None:
        try:
            return int((self.kitt_home / "agent.pid").read_text())
        except (OSError, ValueError):
            return None

    def leftovers(self) -> list[str]:
        """Everything an install left in HOME but pip's download cache (sorted paths)."""
        return sorted(
            str(p.relative_to(self.home))
            for p in self.home.rglob("*")
            if p.relative_to(self.home).parts[0] != ".cache"
        )

    def kill(self) -> None:
        pid = self.pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fleet(kitt: Kitt, wheelhouse: Path, tmp_path: Path) -> Iterator[tuple[Kitt, Box]]:
    kitt.start_server("--tls", "--wheelhouse", str(wheelhouse))
    box = Box(tmp_path, kitt)
    box.wheelhouse = wheelhouse
    yield kitt, box
    box.kill()


def add_lines(kitt: Kitt, *args: str) -> dict[str, Any]:
    out = kitt.run("agents", "add", "--json", *args, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def cacert_line(kitt: Kitt, box: Box, *args: str) -> str:
    """`kitt agents add`'s --cacert line, with the CA copied to the box as ca.pem."""
    shutil.copy(kitt.home / "server" / "certs" / "ca.pem", box.home / "ca.pem")
    line = add_lines(kitt, "--name", "gpu-07", "--port", str(box.port), *args)["cacert"]
    return f"{line} --bind 127.0.0.1"


def bumped_wheel(wheel: Path, version: str, dest: Path) -> Path:
    """The server's wheel relabelled as another version (what a release would change)."""
    old = re.match(r"kitt_fleet-([^-]+)-", wheel.name)
    assert old is not None
    old_version = old.group(1)
    out = dest / wheel.name.replace(old_version, version)
    records = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = item.filename.replace(
                f"kitt_fleet-{old_version}.dist-info", f"kitt_fleet-{version}.dist-info"
            )
            if name.endswith("RECORD"):
                record_name = name
                continue
            data = src.read(item)
            if name == "kitt/__init__.py" or name.endswith("METADATA"):
                data = data.replace(old_version.encode(), version.encode())
            dst.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{name},sha256={digest},{len(data)}")
        dst.writestr(record_name, "\n".join([*records, f"{record_name},,"]) + "\n")
    return out


def restart_server(kitt: Kitt, *extra: str) -> None:
    kitt.run("server", "stop", check=True)
    kitt.start_server("--tls", *extra)


def online(kitt: Kitt, name: str) -> dict[str, Any]:
    return wait_for(
        lambda: (a := kitt.agent(name)) and a.get("state") == "idle" and a,
        timeout=60, what=f"agent {name} to be online",
    )  # fmt: skip


# --- the happy path --------------------------------------------------------------------


def test_install_rerun_upgrade_and_update_restart(fleet: tuple[Kitt, Box], tmp_path: Path) -> None:
    kitt, box = fleet
    line = cacert_line(kitt, box)
    assert "KITT_BOOTSTRAP_TOKEN=" in line and "--token" not in line and "ca.pem" in line
    first = box.sh(line)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "trusting the fleet CA with SHA-256 fingerprint" in first.stderr
    assert "from https://127.0.0.1" in first.stderr  # the wheelhouse: no PyPI
    agent = online(kitt, "gpu-07")
    assert agent["kitt_version"] == "0.1.0"
    link = box.kitt_home / "agent-venv"
    assert link.is_symlink()
    venv = Path(os.path.realpath(link))
    assert venv.parent == box.kitt_home / "agent-venvs"
    # The daemon runs the installed code, not this checkout.
    pid = box.pid()
    assert pid is not None
    exe = Path(os.readlink(f"/proc/{pid}/exe"))
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0].decode().startswith(str(box.kitt_home / "agent-venvs")), cmdline
    assert not str(exe).startswith(str(Path(sys.prefix)))
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"KITT_BOOTSTRAP_TOKEN" not in environ  # read once, never inherited
    imported = box.sh(f"{venv}/bin/python -c 'import kitt; print(kitt.__file__)'").stdout
    assert imported.startswith(str(venv)), imported
    unit = box.agent("service", "install", "--print").stdout
    exec_start = f"ExecStart={box.kitt_home}/agent-venv/bin/kitt-agent start --foreground"
    assert exec_start in unit  # the link, not the versioned venv: updates only restart it
    cert = (box.kitt_home / "certs" / "agent.pem").read_bytes()
    assert oct((box.kitt_home / "agent.yaml").stat().st_mode & 0o777) == "0o600"
    assert oct((box.kitt_home / "certs" / "agent-key.pem").stat().st_mode & 0o777) == "0o600"

    # Re-run of the same line (its token now spent) against a server that hands out a
    # newer version: upgraded in place, same identity, new daemon on the new code.
    wheel = next((kitt.home / "server" / "packages").glob("*.whl"))
    v2 = bumped_wheel(wheel, "0.1.0.post2", tmp_path)
    restart_server(kitt, "--wheelhouse", str(box.wheelhouse), "--agent-package", str(v2))
    online(kitt, "gpu-07")
    listing = kitt.run("agents", "list", check=True).stdout
    assert "0.1.0 ≠ 0.1.0.post2" in listing
    assert "1 agent(s) do not run 0.1.0.post2" in listing
    assert "0.1.0 ≠ 0.1.0.post2" in kitt.run("agents", "show", "gpu-07", check=True).stdout
    second = box.sh(line)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "is enrolled already: keeping its identity" in second.stdout
    upgraded = wait_for(
        lambda: (a := kitt.agent("gpu-07")) and a.get("kitt_version") == "0.1.0.post2" and a,
        timeout=60, what="the agent to report 0.1.0.post2",
    )  # fmt: skip
    assert upgraded["id"] == agent["id"]
    assert (box.kitt_home / "certs" / "agent.pem").read_bytes() == cert
    assert box.pid() != pid
    assert Path(os.path.realpath(link)).name.startswith("0.1.0.post2-")
    assert venv.exists()  # the previous venv is kept to go back to

    # kitt-agent update --restart: a third version replaces the running daemon.
    # kitt-agent update without --restart: the new venv is installed and linked, the
    # running daemon is left alone, and the venv it runs from is never pruned.
    pid2 = box.pid()
    for version in ("0.1.0.post3", "0.1.0.post4"):
        served = bumped_wheel(wheel, version, tmp_path)
        restart_server(kitt, "--wheelhouse", str(box.wheelhouse), "--agent-package", str(served))
        update = box.agent("update")
        assert update.returncode == 0, update.stdout + update.stderr
        assert Path(os.path.realpath(link)).name.startswith(f"{version}-")
        assert box.pid() == pid2
        assert json.loads(box.agent("status", "--json").stdout)["version"] == "0.1.0.post2"
    assert venv_versions(box) == ["0.1.0.post2", "0.1.0.post3", "0.1.0.post4"]

    # update --restart: nothing to download, but the daemon still runs 0.1.0.post2.
    update = box.agent("update", "--restart")
    assert update.returncode == 0, update.stdout + update.stderr
    assert "the agent still runs 0.1.0.post2" in update.stdout
    wait_for(
        lambda: kitt.agent("gpu-07").get("kitt_version") == "0.1.0.post4",
        timeout=60, what="the agent to report 0.1.0.post4",
    )  # fmt: skip
    assert box.pid() not in (None, pid2)
    assert json.loads(box.agent("status", "--json").stdout)["version"] == "0.1.0.post4"
    assert venv_versions(box) == ["0.1.0.post2", "0.1.0.post4"]
    again = box.agent("update")
    assert again.returncode == 0 and "already up to date" in again.stdout

    # Revoked on the server, then added again with a fresh line: a new identity.
    kitt.run("agents", "revoke", "gpu-07", "--yes", check=True)
    fresh = cacert_line(kitt, box)
    third = box.sh(fresh)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "enrolled as 'gpu-07'" in third.stdout
    assert (box.kitt_home / "certs" / "agent.pem").read_bytes() != cert
    agent = online(kitt, "gpu-07")
    assert agent["revoked"] is False

    # A running test is never cut short by an update: --restart refuses until it is idle.
    config = box.kitt_home / "agent.yaml"
    config.write_text(config.read_text() + "benchmarks:\n  nap:\n    command: [sleep, '60']\n")
    assert box.agent("stop").returncode == 0
    assert box.agent("start").returncode == 0
    online(kitt, "gpu-07")
    test = kitt.submit("nap", agent="gpu-07")
    kitt.wait_status(test["id"], "running")
    busy = box.agent("update", "--restart", "--force")
    assert busy.returncode == 1
    assert f"the agent is running test {test['id']}: try again once it is idle" in busy.stderr
    assert kitt.test_info(test["id"])["status"] == "running"
    kitt.api("POST", f"/api/v1/tests/{test['id']}/cancel")
    kitt.wait_status(test["id"], "cancelled")


def venv_versions(box: Box) -> list[str]:
    return sorted(p.name.split("-")[0] for p in (box.kitt_home / "agent-venvs").iterdir())


# --- failures leave nothing behind -----------------------------------------------------


def assert_untouched(kitt: Kitt, box: Box, *allowed: str) -> None:
    """Nothing of the failed install is left: no KITT_HOME, no daemon, no agent."""
    assert box.leftovers() == sorted(allowed)
    assert box.pid() is None
    assert kitt.agents() == []


def test_wrong_token_fails_cleanly_after_trusting_by_fingerprint(fleet: tuple[Kitt, Box]) -> None:
    kitt, box = fleet
    lines = add_lines(kitt, "--name", "gpu-08", "--port", str(box.port))
    line = lines["fingerprint"].replace(lines["token"], "kitt_bt_" + "x" * 40)
    r = box.sh(f"{line} --bind 127.0.0.1")
    assert r.returncode != 0
    assert "trusting the fleet CA with SHA-256 fingerprint " + lines["ca_fingerprint"] in r.stderr
    assert "enrollment refused" in r.stderr + r.stdout, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert_untouched(kitt, box, "kitt-install.sh")
    # The genuine token was not spent by the failure: it still installs.
    ok = box.sh(f"{lines['fingerprint']} --bind 127.0.0.1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    online(kitt, "gpu-08")


def test_wrong_ca_fingerprint_is_refused_before_anything_is_fetched(
    fleet: tuple[Kitt, Box],
) -> None:
    kitt, box = fleet
    lines = add_lines(kitt, "--name", "gpu-09")
    wrong = "AA:" * 31 + "AA"
    r = box.sh(lines["fingerprint"].replace(lines["ca_fingerprint"], wrong))
    assert r.returncode == 1
    assert f"has fingerprint {lines['ca_fingerprint']}, not the expected {wrong}" in r.stderr
    assert "refusing to trust it" in r.stderr
    assert_untouched(kitt, box, "kitt-install.sh")


def test_tampered_wheel_is_refused(fleet: tuple[Kitt, Box]) -> None:
    kitt, box = fleet
    line = cacert_line(kitt, box)
    wheel = next((kitt.home / "server" / "packages").glob("*.whl"))
    announced = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with wheel.open("ab") as fh:  # what a proxy or a bad disk could do to the bytes
        fh.write(b"\0evil")
    r = box.sh(line)
    assert r.returncode == 1
    assert f"not the {announced} the server announced: refusing to install it" in r.stderr
    assert_untouched(kitt, box, "ca.pem")


def test_python_too_old_is_refused(fleet: tuple[Kitt, Box]) -> None:
    kitt, box = fleet
    line = cacert_line(kitt, box)
    old = box.home.parent / "python3.8"
    real = box.env["KITT_PYTHON"]
    # A stand-in for an old interpreter: the real one, told it is 3.8.
    old.write_text(
        "#!/bin/sh\n"
        f'exec {real} -c \'import sys; sys.version_info = (3, 8, 10, "final", 0); '
        'code = sys.argv[1]; sys.argv = sys.argv[1:]; exec(code)\' "$2" "$@"\n'
    )
    old.chmod(0o755)
    r = box.sh(f"export KITT_PYTHON={old}; {line}")
    assert r.returncode == 1
    assert f"KITT needs Python 3.10 or newer, and {old} is 3.8.10" in r.stderr
    assert_untouched(kitt, box, "ca.pem")


def test_failed_preflight_changes_nothing_here_or_on_the_server(fleet: tuple[Kitt, Box]) -> None:
    import socket

    kitt, box = fleet
    # A venv made by hand where the installer keeps its link: put back untouched.
    manual = box.kitt_home / "agent-venv"
    manual.mkdir(parents=True)
    (manual / "mine").write_text("by hand")
    line = cacert_line(kitt, box)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", box.port))
        taken.listen()
        r = box.sh(line)
    assert r.returncode == 1
    assert f"port {box.port} on 127.0.0.1" in r.stdout  # the preflight table names it
    assert "a required preflight check failed" in r.stderr
    assert "undoing" in r.stderr
    assert box.leftovers() == [".kitt", ".kitt/agent-venv", ".kitt/agent-venv/mine", "ca.pem"]
    assert box.pid() is None
    # The checks ran before enrollment: the name is free, the token unspent.
    assert kitt.agents() == []
    ok = box.sh(line)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    online(kitt, "gpu-07")
    assert manual.is_symlink()
    aside = [p for p in (box.kitt_home / "agent-venvs").iterdir() if p.name.startswith("manual-")]
    assert [(p / "mine").read_text() for p in aside] == ["by hand"]  # kept to go back to


def test_a_second_certificate_beside_the_pinned_ca_is_refused(fleet: tuple[Kitt, Box]) -> None:
    """The pin covers one certificate: a second one in the file would be trusted unchecked."""
    from kitt import pki

    kitt, box = fleet
    lines = add_lines(kitt, "--name", "gpu-11")
    evil, _ = pki.create_ca("someone in between")
    served = kitt.home / "server" / "certs" / "ca.pem"
    served.write_bytes(served.read_bytes() + pki.cert_pem(evil))
    r = box.sh(lines["fingerprint"])
    assert r.returncode == 1
    assert "refusing the fleet CA: it is a file with 2 certificates" in r.stderr
    assert_untouched(kitt, box, "kitt-install.sh")
    init = kitt.run("agent", "init", "--server", kitt.tls_url, "--name", "gpu-11",
                    "--ca-fingerprint", lines["ca_fingerprint"], "--token", lines["token"])  # fmt: skip
    assert init.returncode == 1
    assert "expected one CA certificate, got a file with 2; refusing to trust it" in init.stderr
    assert not (kitt.home / "certs" / "ca.pem").exists()


def test_unknown_option_and_missing_value(fleet: tuple[Kitt, Box]) -> None:
    kitt, box = fleet
    script = kitt.api("GET", "/api/v1/agent/install.sh", token=None)
    assert script.status_code == 200
    (box.home / "install.sh").write_bytes(script.content)
    r = box.sh("bash install.sh --tokn x")
    assert r.returncode == 1 and "unknown option '--tokn'" in r.stderr
    r = box.sh("bash install.sh --token")
    assert r.returncode == 1 and "--token needs a value" in r.stderr
    r = box.sh("bash install.sh --token x")
    assert r.returncode == 1 and "pass --cacert ca.pem" in r.stderr
    assert sorted(box.leftovers()) == ["install.sh"]


# --- as a systemd service ----------------------------------------------------------------


def test_service_install_rerun_and_undo(fleet: tuple[Kitt, Box], tmp_path: Path) -> None:
    """--service end to end, with a stand-in systemctl (tests/fake_systemctl.py) that runs
    the unit's ExecStart the way systemd would."""
    kitt, box = fleet
    tools = tmp_path / "tools"
    tools.mkdir()
    fake = tools / "systemctl"
    fake.write_text(
        f'#!/bin/sh\nexec {sys.executable} {Path(__file__).parent / "fake_systemctl.py"} "$@"\n'
    )
    fake.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    log = tmp_path / "systemctl.log"
    box.env.update(
        PATH=f"{tools}{os.pathsep}{SYSTEM_PATH}",
        KITT_SYSTEMD_UNIT_DIR=str(units),
        FAKE_SYSTEMCTL_LOG=str(log),
    )
    unit_file = units / "kitt-agent.service"
    main_pid = units / "kitt-agent.service.main-pid"
    line = cacert_line(kitt, box, "--service")
    first = box.sh(line)
    assert first.returncode == 0, first.stdout + first.stderr
    online(kitt, "gpu-07")
    assert (
        f"ExecStart={box.kitt_home}/agent-venv/bin/kitt-agent start --foreground"
        in unit_file.read_text()
    )
    calls = log.read_text().splitlines()
    assert "daemon-reload" in calls and "enable --now kitt-agent.service" in calls
    pid = box.pid()
    assert pid is not None and main_pid.read_text() == str(pid)  # systemd's own process

    # Re-run: the unit stays in charge and is restarted (not a plain daemon beside it).
    log.write_text("")
    second = box.sh(line)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "restart kitt-agent.service" in log.read_text().splitlines()
    online(kitt, "gpu-07")
    assert box.pid() not in (None, pid) and main_pid.read_text() == str(box.pid())

    # A failing restart is undone: unit file as it was, the previous agent running again.
    unit_before = unit_file.read_text()
    pid2 = box.pid()
    wheel = next((kitt.home / "server" / "packages").glob("*.whl"))
    served = bumped_wheel(wheel, "0.1.0.post9", tmp_path)
    restart_server(kitt, "--wheelhouse", str(box.wheelhouse), "--agent-package", str(served))
    link_before = os.path.realpath(box.kitt_home / "agent-venv")
    box.env["FAKE_SYSTEMCTL_FAIL"] = "restart"
    failed = box.sh(line)
    del box.env["FAKE_SYSTEMCTL_FAIL"]
    assert failed.returncode == 1
    assert "`systemctl restart kitt-agent.service` failed" in failed.stderr + failed.stdout
    assert unit_file.read_text() == unit_before
    assert os.path.realpath(box.kitt_home / "agent-venv") == link_before
    assert not any(
        p.name.startswith("0.1.0.post9") for p in (box.kitt_home / "agent-venvs").iterdir()
    )
    assert box.pid() == pid2  # restart failed, so the previous agent was never stopped
    assert online(kitt, "gpu-07")["kitt_version"] == "0.1.0"
