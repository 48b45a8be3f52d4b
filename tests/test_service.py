"""``kitt agent service``: the generated systemd unit and the install/status/uninstall flow.

The CLI runs as a real subprocess. systemd itself is replaced by a stand-in ``systemctl``
(and ``sudo``) first on PATH that records its arguments, plus ``KITT_SYSTEMD_UNIT_DIR``,
so the flow is checked end to end without touching the machine's systemd.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kitt.agent.service import (
    ServiceUser,
    agent_command,
    privilege_prefix,
    render_unit,
    service_home,
    service_user,
    systemd_quote,
    unit_file_name,
    unit_path,
)
from kitt.errors import ServiceError

AGENT_YAML = "name: gpu-01\nserver_url: http://127.0.0.1:8080\nport: 8090\n"
FORBIDDEN_KEYS = {
    "PrivateDevices",
    "ProtectHome",
    "DevicePolicy",
    "DeviceAllow",
    "MemoryDenyWriteExecute",
    "ProtectClock",
}
FAKE_SYSTEMCTL = """#!/bin/sh
printf '%s\\n' "$*" >> {log}
if [ "$1" = is-system-running ]; then
    state="${{FAKE_SYSTEMD_STATE:-running}}"
    echo "$state"
    [ "$state" = running ] && exit 0
    exit 1
fi
if [ "$1" = "${{FAKE_SYSTEMCTL_FAIL:-}}" ]; then
    echo "$FAKE_SYSTEMCTL_STDERR" >&2
    exit "${{FAKE_SYSTEMCTL_RC:-1}}"
fi
if [ "$1" = status ]; then
    echo "o $2 - KITT agent"
    echo "     Active: inactive (dead)"
    exit 3
fi
exit 0
"""
FAKE_SUDO = """#!/bin/sh
printf '%s\\n' "$*" >> {log}
exec "$@"
"""


# --- helpers ---------------------------------------------------------------------------


def cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kitt", "agent", "service", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def parse_unit(text: str) -> dict[str, list[str]]:
    """Directive → values, ignoring comments and section headers (keys are unique
    across our unit's sections)."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def unquote(value: str) -> list[str]:
    """Undo systemd_quote for the plain paths the tests use."""
    return [w.replace("$$", "$").replace("%%", "%") for w in shlex.split(value)]


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "kitt home"  # a space, so every path in the unit needs quoting right
    h.mkdir()
    cfg = h / "agent.yaml"
    cfg.write_text(AGENT_YAML)
    cfg.chmod(0o600)
    return h


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in {"KITT_HOME", "SUDO_USER", "KITT_SYSTEMD_UNIT_DIR"}
        and not k.startswith("FAKE_")
    }
    e["KITT_HOME"] = str(home)
    return e


class FakeSystemd:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.bin = root / "fakebin"
        self.units = root / "units"
        self.log = root / "systemctl.log"
        self.sudo_log = root / "sudo.log"
        self.bin.mkdir()
        self.units.mkdir()
        for name, body, log in (
            ("systemctl", FAKE_SYSTEMCTL, self.log),
            ("sudo", FAKE_SUDO, self.sudo_log),
        ):
            exe = self.bin / name
            exe.write_text(body.format(log=shlex.quote(str(log))))
            exe.chmod(0o755)
        self.env = {
            **env,
            "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', os.defpath)}",
            "KITT_SYSTEMD_UNIT_DIR": str(self.units),
        }

    @property
    def calls(self) -> list[str]:
        return log_lines(self.log)

    def reset(self) -> None:
        self.log.unlink(missing_ok=True)
        self.sudo_log.unlink(missing_ok=True)


@pytest.fixture
def fake(tmp_path: Path, env: dict[str, str]) -> FakeSystemd:
    return FakeSystemd(tmp_path, env)


def current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


# --- 1. the printed unit ---------------------------------------------------------------


def test_print_unit_contents(home: Path, env: dict[str, str]) -> None:
    r = cli("install", "--print", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    unit = parse_unit(r.stdout)

    argv = unquote(unit["ExecStart"][0])
    program = Path(argv[0])
    assert program.is_absolute()
    assert program.is_file()
    assert os.access(program, os.X_OK)
    config = str(home / "agent.yaml")
    assert argv[-4:] == ["start", "--foreground", "--config", config]
    assert Path(argv[-1]).is_absolute()

    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartSec"] == ["5"]
    assert unit["User"] == [current_user()]
    assert unit["Group"]
    envs = [unquote(v)[0] for v in unit["Environment"]]
    assert f"KITT_HOME={home}" in envs
    assert f"HOME={pwd.getpwuid(os.geteuid()).pw_dir}" in envs
    assert unit["WorkingDirectory"] == [str(home)]
    assert unit["After"][0].split()[0] == "network-online.target"
    assert unit["Wants"] == ["network-online.target"]
    assert unit["TimeoutStopSec"] == ["30"]
    assert unit["KillMode"] == ["mixed"]
    assert unit["LimitNOFILE"] == ["65536"]
    assert unit["WantedBy"] == ["multi-user.target"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["full"]
    assert unit["PrivateTmp"] == ["yes"]
    assert unit["Description"] and unit["Documentation"]
    assert not FORBIDDEN_KEYS & unit.keys()


def test_print_uses_config_option_made_absolute(
    tmp_path: Path, home: Path, env: dict[str, str]
) -> None:
    (tmp_path / "other.yaml").write_text(AGENT_YAML)
    r = cli("install", "--print", "--config", "other.yaml", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    argv = unquote(parse_unit(r.stdout)["ExecStart"][0])
    assert argv[-2:] == ["--config", str(tmp_path / "other.yaml")]
    # KITT_HOME stays the agent's home even when the config lives elsewhere
    assert f"KITT_HOME={home}" in [unquote(v)[0] for v in parse_unit(r.stdout)["Environment"]]


def test_print_without_config_warns_but_prints(home: Path, env: dict[str, str]) -> None:
    (home / "agent.yaml").unlink()
    r = cli("install", "--print", env=env)
    assert r.returncode == 0
    assert "kitt-agent init --server URL" in r.stderr
    assert "ExecStart=" in r.stdout


# --- 2. systemd-analyze verify ---------------------------------------------------------


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        message = "systemd-analyze is not installed (Debian package: systemd)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def verify(analyze: str, unit: Path) -> None:
    r = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr


def test_generated_unit_passes_systemd_analyze_verify(tmp_path: Path, env: dict[str, str]) -> None:
    analyze = systemd_analyze()
    r = cli("install", "--print", env=env)
    assert r.returncode == 0, r.stderr
    unit = tmp_path / "kitt-agent.service"
    unit.write_text(r.stdout)
    verify(analyze, unit)


def test_awkward_paths_survive_systemd_parsing(tmp_path: Path) -> None:
    """systemd-analyze checks that ExecStart's program exists and is executable, so a
    quoting mistake in a path with spaces, % and $ shows up as a verify error."""
    analyze = systemd_analyze()
    odd = tmp_path / "odd dir %h $HOME ;x"
    (odd / "bin").mkdir(parents=True)
    for name in ("kitt-agent", "nvidia-modprobe"):
        exe = odd / "bin" / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    me = pwd.getpwuid(os.geteuid())
    text = render_unit(
        command=[str(odd / "bin" / "kitt-agent")],
        config=odd / "agent.yaml",
        user=ServiceUser(me.pw_name, "root" if me.pw_uid == 0 else str(me.pw_gid), Path(me.pw_dir)),
        home=odd,
        documentation=[odd.as_uri(), "man:systemd.exec(5)"],
        nvidia_modprobe=str(odd / "bin" / "nvidia-modprobe"),
    )
    unit = tmp_path / "kitt-agent.service"
    unit.write_text(text)
    verify(analyze, unit)
    parsed = parse_unit(text)
    assert unquote(parsed["ExecStart"][0])[-1] == str(odd / "agent.yaml")
    assert parsed["ExecStartPre"][0].startswith("-+")


# --- 3. no systemd ---------------------------------------------------------------------


def test_install_without_systemctl(tmp_path: Path, env: dict[str, str]) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    e = {**env, "PATH": str(empty), "KITT_SYSTEMD_UNIT_DIR": str(tmp_path)}
    for args in (["install"], ["status"]):
        r = cli(*args, env=e)
        assert r.returncode == 1, r
        assert r.stderr.strip() == "error: systemd is not available on this machine (no systemctl)"
    assert not (tmp_path / "kitt-agent.service").exists()


@pytest.mark.skipif(
    Path("/run/systemd/system").exists(), reason="systemd runs as PID 1 on this machine"
)
def test_install_when_systemd_is_not_running(tmp_path: Path, env: dict[str, str]) -> None:
    if shutil.which("systemctl", path=env.get("PATH")) is None:
        pytest.skip("no systemctl here (covered by test_install_without_systemctl)")
    e = {**env, "KITT_SYSTEMD_UNIT_DIR": str(tmp_path)}
    r = cli("install", "--no-start", env=e)
    assert r.returncode == 1
    assert r.stderr.startswith("error: systemd is not running on this machine (")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "kitt-agent.service").exists()


def test_install_refuses_offline_state(fake: FakeSystemd) -> None:
    r = cli("install", env={**fake.env, "FAKE_SYSTEMD_STATE": "offline"})
    assert r.returncode == 1
    assert "systemd is not running on this machine" in r.stderr
    assert "offline" in r.stderr
    assert fake.calls == ["is-system-running"]
    assert list(fake.units.iterdir()) == []


def test_install_accepts_degraded_state(fake: FakeSystemd) -> None:
    r = cli("install", env={**fake.env, "FAKE_SYSTEMD_STATE": "degraded"})
    assert r.returncode == 0, r.stderr
    assert (fake.units / "kitt-agent.service").is_file()


# --- 4. install / status / uninstall with a stand-in systemctl -------------------------


def test_install_status_uninstall_flow(fake: FakeSystemd) -> None:
    printed = cli("install", "--print", env=fake.env)
    assert printed.returncode == 0

    r = cli("install", env=fake.env)
    assert r.returncode == 0, r.stderr
    unit = fake.units / "kitt-agent.service"
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert unit.read_text() == printed.stdout
    assert fake.calls == ["is-system-running", "daemon-reload", "enable --now kitt-agent.service"]
    assert f"wrote {unit}" in r.stdout
    assert "enable --now kitt-agent.service" in r.stdout
    assert "journalctl -u kitt-agent -f" in r.stdout
    if os.geteuid() == 0:
        assert log_lines(fake.sudo_log) == []
    else:
        assert log_lines(fake.sudo_log)  # unit file and systemctl changes went through sudo

    fake.reset()
    r = cli("status", env=fake.env)
    assert r.returncode == 3
    assert "Active: inactive (dead)" in r.stdout
    assert fake.calls == ["is-system-running", "status kitt-agent.service --no-pager"]

    fake.reset()
    r = cli("uninstall", env=fake.env)
    assert r.returncode == 0, r.stderr
    assert not unit.exists()
    assert fake.calls == [
        "is-system-running",
        "disable --now kitt-agent.service",
        "daemon-reload",
    ]
    assert f"removed {unit}" in r.stdout

    fake.reset()
    r = cli("uninstall", env=fake.env)
    assert r.returncode == 0
    assert "kitt-agent.service is not installed" in r.stdout
    assert fake.calls == []


def test_install_no_start_only_enables(fake: FakeSystemd) -> None:
    r = cli("install", "--no-start", env=fake.env)
    assert r.returncode == 0, r.stderr
    assert fake.calls == ["is-system-running", "daemon-reload", "enable kitt-agent.service"]
    assert "systemctl start kitt-agent.service" in r.stdout


def test_reinstall_reports_unchanged_unit(fake: FakeSystemd) -> None:
    assert cli("install", env=fake.env).returncode == 0
    r = cli("install", env=fake.env)
    assert r.returncode == 0
    assert "already up to date" in r.stdout


def test_custom_unit_name(fake: FakeSystemd) -> None:
    r = cli("install", "--unit-name", "gpu-agent", env=fake.env)
    assert r.returncode == 0, r.stderr
    unit = fake.units / "gpu-agent.service"
    assert parse_unit(unit.read_text())["SyslogIdentifier"] == ["gpu-agent"]
    assert fake.calls[-1] == "enable --now gpu-agent.service"
    fake.reset()
    assert cli("uninstall", "--unit-name", "gpu-agent.service", env=fake.env).returncode == 0
    assert not unit.exists()


def test_invalid_unit_name(fake: FakeSystemd) -> None:
    r = cli("install", "--unit-name", "kitt@1", env=fake.env)
    assert r.returncode == 1
    assert "invalid unit name 'kitt@1'" in r.stderr
    assert fake.calls == []


def test_systemctl_failure_reports_its_stderr(fake: FakeSystemd) -> None:
    message = "Job for kitt-agent.service failed because the control process exited."
    e = {**fake.env, "FAKE_SYSTEMCTL_FAIL": "enable", "FAKE_SYSTEMCTL_STDERR": message}
    r = cli("install", env=e)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"error: `systemctl enable --now kitt-agent.service` failed (exit 1): {message}"
    )


def test_uninstall_of_a_unit_systemd_never_loaded(fake: FakeSystemd) -> None:
    unit = fake.units / "kitt-agent.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    e = {
        **fake.env,
        "FAKE_SYSTEMCTL_FAIL": "disable",
        "FAKE_SYSTEMCTL_STDERR": (
            "Failed to stop kitt-agent.service: Unit kitt-agent.service not loaded."
        ),
        "FAKE_SYSTEMCTL_RC": "5",
    }
    r = cli("uninstall", env=e)
    assert r.returncode == 0, r.stderr
    assert not unit.exists()
    assert fake.calls[-1] == "daemon-reload"


def test_uninstall_other_systemctl_errors_are_reported(fake: FakeSystemd) -> None:
    unit = fake.units / "kitt-agent.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    e = {
        **fake.env,
        "FAKE_SYSTEMCTL_FAIL": "disable",
        "FAKE_SYSTEMCTL_STDERR": "Access denied",
    }
    r = cli("uninstall", env=e)
    assert r.returncode == 1
    assert "Access denied" in r.stderr
    assert unit.exists()


# --- 5. config missing or broken -------------------------------------------------------


def test_install_without_agent_config(tmp_path: Path, home: Path, env: dict[str, str]) -> None:
    (home / "agent.yaml").unlink()
    r = cli("install", env={**env, "KITT_SYSTEMD_UNIT_DIR": str(tmp_path)})
    assert r.returncode == 2
    assert "run `kitt-agent init --server URL` first" in r.stderr
    assert str(home / "agent.yaml") in r.stderr
    assert not (tmp_path / "kitt-agent.service").exists()


def test_install_with_invalid_agent_config(fake: FakeSystemd, home: Path) -> None:
    (home / "agent.yaml").write_text(AGENT_YAML.replace("8090", "99999"))
    r = cli("install", env=fake.env)
    assert r.returncode == 2
    assert "port" in r.stderr
    assert fake.calls == []


# --- pure functions --------------------------------------------------------------------


def test_privilege_prefix() -> None:
    assert privilege_prefix(0, "/usr/bin/sudo") == []
    assert privilege_prefix(0, None) == []
    assert privilege_prefix(1000, "/usr/bin/sudo") == ["/usr/bin/sudo"]
    with pytest.raises(ServiceError, match="needs root"):
        privilege_prefix(1000, None)


def test_service_user_prefers_sudo_user() -> None:
    others = [p for p in pwd.getpwall() if p.pw_uid != 0]
    if not others:
        pytest.skip("no non-root account in the user database")
    other = others[0]
    user = service_user(0, {"SUDO_USER": other.pw_name})
    assert user.name == other.pw_name
    assert user.home == Path(other.pw_dir)
    # without KITT_HOME the service uses the sudo user's home, not root's
    assert service_home(user, 0, {}) == Path(other.pw_dir) / ".kitt"
    assert service_user(0, {"SUDO_USER": "root"}).name == "root"
    assert service_user(os.geteuid(), {}).name == current_user()
    with pytest.raises(ServiceError, match="no-such-user-kitt"):
        service_user(0, {"SUDO_USER": "no-such-user-kitt"})


def test_agent_command_falls_back_to_module(tmp_path: Path) -> None:
    python = tmp_path / "python3"
    assert agent_command(str(python)) == [str(python), "-m", "kitt", "agent"]
    script = tmp_path / "kitt-agent"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert agent_command(str(python)) == [str(script)]


def test_systemd_quote() -> None:
    assert systemd_quote("/opt/kitt/bin/kitt-agent") == "/opt/kitt/bin/kitt-agent"
    assert systemd_quote("/a b/c") == '"/a b/c"'
    assert systemd_quote("50%") == "50%%"
    assert systemd_quote("$HOME") == "$$HOME"
    assert systemd_quote("HOME=$x", expand_dollar=False) == "HOME=$x"
    assert systemd_quote('a"b\\c') == '"a\\"b\\\\c"'
    assert systemd_quote("") == '""'
    with pytest.raises(ServiceError, match="control character"):
        systemd_quote("a\nb")


def test_unit_names_and_paths(tmp_path: Path) -> None:
    assert unit_file_name("kitt-agent") == "kitt-agent.service"
    assert unit_file_name("kitt-agent.service") == "kitt-agent.service"
    for bad in ("", "a b", "x@y", "../etc", "-x", "a/b"):
        with pytest.raises(ServiceError):
            unit_file_name(bad)
    assert unit_path("kitt-agent", {}) == Path("/etc/systemd/system/kitt-agent.service")
    assert unit_path("x", {"KITT_SYSTEMD_UNIT_DIR": str(tmp_path)}) == tmp_path / "x.service"


def test_program_path_with_quotes_is_refused(tmp_path: Path) -> None:
    me = ServiceUser("root", "root", Path("/root"))
    with pytest.raises(ServiceError, match="quotes and backslashes"):
        render_unit(
            command=['/opt/we"ird/kitt-agent'],
            config=tmp_path / "agent.yaml",
            user=me,
            home=tmp_path,
        )


def test_non_root_changes_go_through_sudo(
    fake: FakeSystemd, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The suite runs as one user (root here), so the sudo branch is driven in-process
    with a non-root euid; the stand-in sudo runs its command as whoever we are."""
    from kitt.agent.service import install_service, uninstall_service

    nobody = next((p for p in pwd.getpwall() if p.pw_uid != 0), None)
    if nobody is None:
        pytest.skip("no non-root account in the user database")
    for key, value in fake.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "geteuid", lambda: nobody.pw_uid)
    said: list[str] = []

    install_service(said.append)
    unit = fake.units / "kitt-agent.service"
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert parse_unit(unit.read_text())["User"] == [nobody.pw_name]
    systemctl = str(fake.bin / "systemctl")
    sudo = log_lines(fake.sudo_log)
    assert sudo[0].startswith("install -m 0644 -- ")
    assert sudo[0].endswith(f" {unit}")
    assert sudo[1:] == [
        f"{systemctl} daemon-reload",
        f"{systemctl} enable --now kitt-agent.service",
    ]
    # the query needs no privileges, so it does not go through sudo
    assert fake.calls == ["is-system-running", "daemon-reload", "enable --now kitt-agent.service"]

    fake.reset()
    uninstall_service(said.append)
    assert not unit.exists()
    assert log_lines(fake.sudo_log) == [
        f"{systemctl} disable --now kitt-agent.service",
        f"rm -f -- {unit}",
        f"{systemctl} daemon-reload",
    ]
