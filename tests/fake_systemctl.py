"""A stand-in for ``systemctl`` on a machine without systemd (this one, CI's).

Installed as ``systemctl`` first on PATH by tests/test_install.py. It logs every call to
``$FAKE_SYSTEMCTL_LOG`` and does for units in ``$KITT_SYSTEMD_UNIT_DIR`` what systemd
would: ``enable --now``/``start``/``restart`` run the unit's ``ExecStart`` with its
``Environment=`` and return once the service is up (what ``Type=notify`` waits for: here,
the agent logging that it registered), failing if it exits first; ``stop``/``disable
--now`` stop it; ``show --property MainPID --value`` reports its pid.
``FAKE_SYSTEMCTL_FAIL=<verb>`` makes that verb fail. Standard library only.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

READY_MARK = b"registered as"
START_TIMEOUT_S = 60.0


def _units() -> Path:
    return Path(os.environ["KITT_SYSTEMD_UNIT_DIR"])


def _pid_file(unit: str) -> Path:
    return _units() / f"{unit}.main-pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[-1].startswith("Z"))


def stop(unit: str) -> None:
    path = _pid_file(unit)
    if not path.exists():
        return
    pid = int(path.read_text())
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    path.unlink()


def start(unit: str) -> int:
    text = (_units() / unit).read_text()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    argv: list[str] = []
    for line in text.splitlines():
        if line.startswith("Environment="):
            key, _, value = shlex.split(line.removeprefix("Environment="))[0].partition("=")
            env[key] = value
        elif line.startswith("ExecStart="):
            argv = shlex.split(line.removeprefix("ExecStart="))
    journal = _units() / f"{unit}.journal"
    with journal.open("ab") as out:
        offset = out.tell()
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip
    _pid_file(unit).write_text(str(proc.pid))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if READY_MARK in journal.read_bytes()[offset:]:
            return 0
        if proc.poll() is not None:
            print(f"Job for {unit} failed: the service exited", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"Job for {unit} timed out", file=sys.stderr)
    return 1


def main(args: list[str]) -> int:
    with Path(os.environ["FAKE_SYSTEMCTL_LOG"]).open("a") as log:
        log.write(" ".join(args) + "\n")
    verb, unit = args[0], args[-1]
    if verb == os.environ.get("FAKE_SYSTEMCTL_FAIL"):
        print(f"Failed to {verb} {unit}: injected failure", file=sys.stderr)
        return 1
    if verb == "is-system-running":
        print("running")
        return 0
    if verb == "show":
        path = _pid_file(unit)
        print(path.read_text() if path.exists() else "0")
        return 0
    if verb == "restart":
        stop(unit)
        return start(unit)
    if verb == "start" or (verb == "enable" and "--now" in args):
        path = _pid_file(unit)
        if path.exists() and _alive(int(path.read_text())):
            return 0  # already active: starting it again changes nothing
        return start(unit)
    if verb == "stop" or (verb == "disable" and "--now" in args):
        stop(unit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
