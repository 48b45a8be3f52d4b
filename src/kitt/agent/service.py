"""Run the agent as a systemd service: render the unit, install it, ask systemctl about it.

Rendering is pure (every input is a parameter) so the unit can be printed, verified with
``systemd-analyze`` and unit-tested without systemd. Everything that touches the machine
goes through :class:`Systemctl` or the small install/uninstall functions below, which
take the privilege prefix (``sudo`` or nothing) as data instead of deciding it inline.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kitt import __version__
from kitt.agent.config import load_config
from kitt.errors import ServiceError
from kitt.paths import AgentPaths, kitt_home

DEFAULT_UNIT_NAME = "kitt-agent"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
#: Overrides :data:`DEFAULT_UNIT_DIR`, for tests and for packagers staging a unit.
UNIT_DIR_ENV = "KITT_SYSTEMD_UNIT_DIR"
UNIT_MODE = 0o644

#: ``systemctl is-system-running`` states in which the manager accepts unit changes.
#: ``offline`` (no systemd as PID 1) and ``unknown`` (could not be asked) are refused.
_USABLE_STATES = frozenset(
    {"initializing", "starting", "running", "degraded", "maintenance", "stopping"}
)
_SYSTEMCTL_QUERY_TIMEOUT_S = 30

# Characters systemd takes literally in an unquoted ExecStart word; anything else is
# quoted so a path with spaces or quotes stays one argument.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./$-]+")
_UNIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.\-]*")
_MAX_UNIT_NAME = 255
# What systemctl prints when the unit it is asked to stop/disable is already gone; an
# uninstall that meets these has nothing left to undo.
_ALREADY_GONE = ("not loaded", "does not exist", "not found", "No such file")

Echo = Callable[[str], None]


# --- naming and locations ---------------------------------------------------------------


def unit_file_name(name: str) -> str:
    """``kitt-agent`` or ``kitt-agent.service`` → ``kitt-agent.service``.

    Template names (``@``) and anything systemd would reject are refused here, so a typo
    fails before sudo is asked for a password.
    """
    base = name.removesuffix(".service")
    if (
        not _UNIT_NAME.fullmatch(base)
        or len(base) + len(".service") > _MAX_UNIT_NAME
        or base.endswith(".")
    ):
        raise ServiceError(
            f"invalid unit name {name!r}: use letters, digits and ':_.-' (no '@'), e.g. kitt-agent"
        )
    return f"{base}.service"


def unit_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    override = env.get(UNIT_DIR_ENV)
    return Path(override).expanduser().absolute() if override else DEFAULT_UNIT_DIR


def unit_path(name: str, environ: Mapping[str, str] | None = None) -> Path:
    return unit_dir(environ) / unit_file_name(name)


# --- who and what the service runs -----------------------------------------------------


@dataclass(frozen=True)
class ServiceUser:
    """The account the agent runs as: the person installing, not root-by-sudo."""

    name: str
    group: str
    home: Path


def service_user(euid: int, environ: Mapping[str, str]) -> ServiceUser:
    """Pick ``SUDO_USER`` under sudo, otherwise the effective user.

    ``sudo kitt-agent service install`` is how most people will run this; a unit that then
    ran the agent as root would own its files as root and bypass the user's config.
    """
    sudo_user = environ.get("SUDO_USER")
    try:
        if euid == 0 and sudo_user and sudo_user != "root":
            entry = pwd.getpwnam(sudo_user)
        else:
            entry = pwd.getpwuid(euid)
    except KeyError:
        who = sudo_user if euid == 0 and sudo_user else f"uid {euid}"
        raise ServiceError(f"cannot find the account for {who} in the user database") from None
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)  # systemd accepts a numeric GID too
    return ServiceUser(name=entry.pw_name, group=group, home=Path(entry.pw_dir))


def service_home(user: ServiceUser, euid: int, environ: Mapping[str, str]) -> Path:
    """KITT_HOME for the unit: the explicit one, else the *service user's* ``~/.kitt``.

    Under sudo ``Path.home()`` is root's home, which is not where the user ran
    ``kitt-agent init``; outside sudo this is exactly :func:`kitt.paths.kitt_home`.
    """
    if environ.get("KITT_HOME"):
        return kitt_home()
    if euid == 0 and user.name != "root":
        return user.home / ".kitt"
    return kitt_home()


def agent_command(executable: str | None = None) -> list[str]:
    """The argv prefix that runs *this installation's* agent CLI.

    The ``kitt-agent`` script next to the interpreter pins the unit to the venv the
    installer ran from; a ``kitt-agent`` found on PATH might be another version. Symlinks
    are deliberately not resolved: a venv's python is a symlink out of the venv.
    """
    python = Path(os.path.abspath(executable or sys.executable))
    script = python.parent / "kitt-agent"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [str(python), "-m", "kitt", "agent"]


def installed_command(command: list[str], paths: AgentPaths) -> list[str]:
    """The ``agent-venv`` link's ``kitt-agent`` when ``command`` runs from the venv the link
    points at: an install-script agent then keeps its unit across updates, which only move
    the link (see :mod:`kitt.agent.upgrade`)."""
    script = paths.venv_link / "bin" / "kitt-agent"
    if not paths.venv_link.is_symlink() or not script.exists():
        return command
    venv = Path(command[0]).parent.parent
    if venv.exists() and os.path.samefile(venv, paths.venv_link):
        return [str(script), *command[1:]]
    return command


def documentation_uris() -> list[str]:
    """KITT's service guide when this is a source checkout, and the systemd.exec manual
    that explains the hardening directives in the unit."""
    uris = []
    guide = Path(__file__).resolve().parents[3] / "docs" / "service.md"
    if guide.is_file():
        uris.append(guide.as_uri())
    uris.append("man:systemd.exec(5)")
    return uris


# --- systemd syntax --------------------------------------------------------------------


def _check_value(value: str, what: str) -> None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ServiceError(
            f"cannot put {what} {value!r} in a systemd unit: it has a control character"
        )


def systemd_quote(word: str, *, expand_dollar: bool = True) -> str:
    """Quote one word for ExecStart= arguments (``expand_dollar=False``: Environment=).

    systemd expands ``%`` specifiers everywhere and ``$VAR`` in ExecStart, so both are
    doubled; spaces, quotes and backslashes go inside a C-escaped double-quoted string.
    """
    _check_value(word, "value")
    if word == ";":
        return "\\;"  # a bare ; would end the command line
    escaped = word.replace("%", "%%")
    if expand_dollar:
        escaped = escaped.replace("$", "$$")
    if escaped and _PLAIN_WORD.fullmatch(escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _executable_word(path: str) -> str:
    """Quote the program of an Exec line. Unlike its arguments, it is not ``$``-expanded,
    and systemd rejects quotes and backslashes in it outright, so those are refused here
    with the real reason rather than by a unit that fails to load."""
    if any(c in path for c in "\"'\\"):
        raise ServiceError(
            f"cannot run {path!r} from a systemd unit: systemd refuses quotes and "
            "backslashes in a program path; install KITT in a plainer path"
        )
    return systemd_quote(path, expand_dollar=False)


def _path_value(path: Path, what: str) -> str:
    """A path for directives systemd reads verbatim (WorkingDirectory=): no quoting is
    possible there, so refuse the few paths that cannot be written at all."""
    text = str(path)
    _check_value(text, what)
    if text != text.strip() or text.endswith("\\"):
        raise ServiceError(
            f"cannot put {what} {text!r} in a systemd unit: it ends with a space or backslash"
        )
    return text.replace("%", "%%")


# --- the unit --------------------------------------------------------------------------

_HARDENING = """\
# Hardening. Kept to what cannot break GPU work: NVML and CUDA open /dev/nvidia*,
# engines write caches under $HOME and /tmp, use the network, shared memory, JIT
# compilers and many threads. Deliberately NOT set, because each breaks that:
#   PrivateDevices= / DevicePolicy=closed / DeviceAllow= / ProtectClock= (hide or
#     block /dev/nvidia*), ProtectHome=yes (the venv, KITT_HOME and model caches
#     usually live in /home), MemoryDenyWriteExecute= (CUDA/Triton/PyTorch JIT),
#   PrivateNetwork= / RestrictAddressFamilies= / SystemCallFilter= /
#     RestrictNamespaces= (engines, NCCL and container runtimes need them).
NoNewPrivileges=yes
ProtectSystem=full
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictRealtime=yes
PrivateTmp=yes
"""

_MODPROBE_NOTE = """\
# NoNewPrivileges= stops the setuid nvidia-modprobe that CUDA runs on first use, and
# ProtectKernelModules= stops module loading, so load nvidia-uvm and create its device
# node up front, outside the sandbox ('+'); '-' because a host may not need it.
"""


UNIT_MARK = "Written by `kitt-agent service install`"


def is_kitt_unit(unit: str) -> bool:
    """Whether the installed unit of that name is one KITT wrote (safe to restart)."""
    try:
        return UNIT_MARK in unit_path(unit).read_text(encoding="utf-8")
    except OSError:
        return False


def render_unit(
    *,
    command: Sequence[str],
    config: Path,
    user: ServiceUser,
    home: Path,
    unit_name: str = DEFAULT_UNIT_NAME,
    documentation: Sequence[str] = ("man:systemd.exec(5)",),
    nvidia_modprobe: str | None = None,
) -> str:
    """The unit file text. Pure: the same inputs give byte-identical output, so a
    reinstall can tell whether anything changed."""
    base = unit_file_name(unit_name).removesuffix(".service")
    for p, what in ((config, "config path"), (home, "KITT_HOME")):
        if not p.is_absolute():
            raise ServiceError(f"{what} {p} must be absolute in a systemd unit")
    argv = [*command, "start", "--foreground", "--config", str(config)]
    exec_start = " ".join([_executable_word(argv[0]), *(systemd_quote(w) for w in argv[1:])])
    env_lines = "".join(
        f"Environment={systemd_quote(f'{k}={v}', expand_dollar=False)}\n"
        for k, v in (("HOME", str(user.home)), ("KITT_HOME", str(home)))
    )
    docs = " ".join(d.replace("%", "%%") for d in documentation)
    pre = ""
    if nvidia_modprobe:
        pre = _MODPROBE_NOTE + f"ExecStartPre=-+{_executable_word(nvidia_modprobe)} -u -c=0\n"
    return (
        f"# {UNIT_MARK} (KITT {__version__}).\n"
        "# Re-run the install to change it: edits here are overwritten.\n"
        "[Unit]\n"
        "Description=KITT agent (runs LLM inference benchmarks on this GPU machine)\n"
        f"Documentation={docs}\n"
        "# The agent registers with the server at start; wait for a configured network.\n"
        "# nvidia-persistenced, where installed, creates the /dev/nvidia* nodes at boot.\n"
        "After=network-online.target nvidia-persistenced.service\n"
        "Wants=network-online.target\n"
        "\n"
        "[Service]\n"
        "# The agent sends READY=1 once it is listening, so `systemctl start` waits for it\n"
        "# and reports a failed start (port in use, bad config) instead of 'started'.\n"
        "Type=notify\n"
        "NotifyAccess=main\n"
        f"User={user.name}\n"
        f"Group={user.group}\n"
        f"{env_lines}"
        f"WorkingDirectory={_path_value(home, 'KITT_HOME')}\n"
        f"{pre}"
        f"ExecStart={exec_start}\n"
        f"SyslogIdentifier={base}\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "TimeoutStopSec=30\n"
        "# SIGTERM goes to the agent alone so it can stop its benchmark process group in\n"
        "# order; whatever is still left in the unit's cgroup after it exits gets SIGKILL.\n"
        "KillMode=mixed\n"
        "LimitNOFILE=65536\n"
        "# Inference engines start hundreds of threads; the default task cap is too low.\n"
        "TasksMax=infinity\n"
        "\n"
        f"{_HARDENING}"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def build_unit(
    unit_name: str = DEFAULT_UNIT_NAME,
    config: Path | None = None,
    *,
    euid: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[str, Path]:
    """Render the unit for this machine and installation; returns ``(text, config)``."""
    uid = os.geteuid() if euid is None else euid
    env = os.environ if environ is None else environ
    user = service_user(uid, env)
    home = service_home(user, uid, env)
    cfg = Path(os.path.abspath(config.expanduser())) if config else AgentPaths(home).config
    text = render_unit(
        command=installed_command(agent_command(), AgentPaths(home)),
        config=cfg,
        user=user,
        home=home,
        unit_name=unit_name,
        documentation=documentation_uris(),
        nvidia_modprobe=shutil.which("nvidia-modprobe"),
    )
    return text, cfg


# --- talking to systemd ----------------------------------------------------------------


def privilege_prefix(euid: int, sudo: str | None) -> list[str]:
    """``[]`` for root, ``[sudo]`` otherwise: unit files and systemctl changes need root.

    Kept pure (``sudo`` is the path ``shutil.which`` found, or None) so both branches are
    testable by a suite that always runs as one user.
    """
    if euid == 0:
        return []
    if sudo is None:
        raise ServiceError(
            "installing a system service needs root: run this as root (sudo is not installed)"
        )
    return [sudo]


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _run(argv: Sequence[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ServiceError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    if proc.returncode != 0:
        detail = _one_line(proc.stderr) or _one_line(proc.stdout) or "no message"
        raise ServiceError(f"`{what}` failed (exit {proc.returncode}): {detail}")
    return proc


class Systemctl:
    """``systemctl`` with the privilege prefix, turning every failure into ServiceError."""

    def __init__(self, executable: str, prefix: Sequence[str] = ()) -> None:
        self.executable = executable
        self.prefix = list(prefix)

    @classmethod
    def locate(cls, prefix: Sequence[str] = ()) -> Systemctl:
        found = shutil.which("systemctl")
        if found is None:
            raise ServiceError("systemd is not available on this machine (no systemctl)")
        return cls(found, prefix)

    def require_running(self) -> str:
        """Refuse early with the real reason instead of a D-Bus error from a later call.

        Containers and WSL often ship systemctl without systemd as PID 1; there every
        ``enable`` would fail with "Failed to connect to bus".
        """
        try:
            proc = subprocess.run(
                [self.executable, "is-system-running"],
                capture_output=True,
                text=True,
                check=False,
                timeout=_SYSTEMCTL_QUERY_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise ServiceError(
                "systemd is not running on this machine "
                "(systemctl is-system-running did not answer)"
            ) from None
        except OSError as exc:
            raise ServiceError(f"cannot run {self.executable}: {exc.strerror or exc}") from exc
        state = proc.stdout.strip()
        if state in _USABLE_STATES:
            return state
        detail = state or _one_line(proc.stderr) or f"exit {proc.returncode}"
        raise ServiceError(
            f"systemd is not running on this machine (systemctl is-system-running: {detail})"
        )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run([*self.prefix, self.executable, *args], f"systemctl {' '.join(args)}")

    def passthrough(self, *args: str) -> int:
        """Run with the terminal's stdout/stderr and return systemctl's own exit code."""
        try:
            return subprocess.run([self.executable, *args], check=False).returncode
        except OSError as exc:
            raise ServiceError(f"cannot run {self.executable}: {exc.strerror or exc}") from exc


def write_unit_file(dest: Path, text: str, prefix: Sequence[str]) -> None:
    """Put the unit in place with mode 0644 in one step (no half-written unit is ever
    visible to a concurrent ``daemon-reload``)."""
    if not dest.parent.is_dir():
        raise ServiceError(f"unit directory {dest.parent} does not exist")
    if prefix:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, UNIT_MODE)
            _run([*prefix, "install", "-m", "0644", "--", tmp, str(dest)], f"install {dest}")
        finally:
            Path(tmp).unlink(missing_ok=True)
        return
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    except OSError as exc:
        raise ServiceError(f"cannot write in {dest.parent}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, UNIT_MODE)
        os.replace(tmp, dest)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ServiceError(f"cannot write {dest}: {exc.strerror or exc}") from exc


def remove_unit_file(dest: Path, prefix: Sequence[str]) -> None:
    if prefix:
        _run([*prefix, "rm", "-f", "--", str(dest)], f"rm {dest}")
        return
    try:
        dest.unlink(missing_ok=True)
    except OSError as exc:
        raise ServiceError(f"cannot remove {dest}: {exc.strerror or exc}") from exc


def _prefix() -> list[str]:
    euid = os.geteuid()
    return privilege_prefix(euid, shutil.which("sudo") if euid else None)


# --- the three commands ----------------------------------------------------------------


def install_service(
    echo: Echo,
    *,
    unit_name: str = DEFAULT_UNIT_NAME,
    config: Path | None = None,
    start: bool = True,
) -> None:
    """Write the unit, reload systemd, enable (and start) it; ``echo`` each step done."""
    name = unit_file_name(unit_name)
    text, cfg = build_unit(name, config)
    load_config(cfg)  # missing → NotConfiguredError with the `init` hint; invalid → names the field
    dest = unit_path(name)
    systemctl = Systemctl.locate()
    systemctl.require_running()
    prefix = systemctl.prefix = _prefix()

    previous = None
    with contextlib.suppress(OSError):
        previous = dest.read_text(encoding="utf-8")
    write_unit_file(dest, text, prefix)
    if previous is None:
        echo(f"wrote {dest}")
    elif previous == text:
        echo(f"{dest} is already up to date")
    else:
        echo(f"updated {dest}")
    systemctl.run("daemon-reload")
    echo("ran systemctl daemon-reload")
    enable = ["enable", "--now", name] if start else ["enable", name]
    systemctl.run(*enable)
    echo(f"ran systemctl {' '.join(enable)}")
    if not start:
        echo(f"{name} is enabled and starts at boot; start it now with: systemctl start {name}")
        return
    echo(f"{name} is enabled and running; logs: journalctl -u {name.removesuffix('.service')} -f")
    if previous is not None and previous != text:
        echo(f"an already running agent keeps the old unit until: systemctl restart {name}")


def service_status(unit_name: str = DEFAULT_UNIT_NAME) -> int:
    """``systemctl status`` verbatim; its exit code (3 = inactive, 4 = unknown unit) is
    the answer scripts want, so it is returned rather than interpreted."""
    name = unit_file_name(unit_name)
    systemctl = Systemctl.locate()
    systemctl.require_running()
    return systemctl.passthrough("status", name, "--no-pager")


def uninstall_service(echo: Echo, *, unit_name: str = DEFAULT_UNIT_NAME) -> None:
    """Stop, disable and remove the unit; a unit that is not installed is not an error."""
    name = unit_file_name(unit_name)
    dest = unit_path(name)
    if not dest.exists():
        echo(f"{name} is not installed (no {dest}); nothing to do")
        return
    systemctl = Systemctl.locate()
    systemctl.require_running()
    prefix = systemctl.prefix = _prefix()
    try:
        systemctl.run("disable", "--now", name)
        echo(f"ran systemctl disable --now {name}")
    except ServiceError as exc:
        if not any(marker in str(exc) for marker in _ALREADY_GONE):
            raise
        echo(f"{name} was not loaded by systemd; nothing to stop")
    remove_unit_file(dest, prefix)
    echo(f"removed {dest}")
    systemctl.run("daemon-reload")
    echo("ran systemctl daemon-reload")
