"""Daemon life cycle shared by the agent and the server: pid file, background start, stop.

The pid file is *locked* (``flock``) by the running daemon for its whole life, so
"is it running?" never depends on guessing whether a recycled PID is still ours: a pid
file nobody holds a lock on is stale, whatever PID it names.

Backgrounding is a re-exec of the same command with ``--foreground`` in a new session,
plus a readiness pipe: the parent returns only when the child says it is listening, or
prints the child's own reason for failing. The same ready signal goes to systemd
(``sd_notify``) when the daemon runs under a ``Type=notify`` unit.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import psutil

from kitt.errors import (
    AlreadyRunningError,
    DaemonStartError,
    HomeNotWritableError,
    KittError,
    NotRunningError,
)
from kitt.paths import ensure_dir

log = logging.getLogger(__name__)

READY_FD_ENV = "KITT_READY_FD"
DRAIN_SIGNAL = signal.SIGUSR1


class PidFile:
    """An exclusively locked pid file, held for the daemon's lifetime."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        ensure_dir(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise HomeNotWritableError(f"cannot write {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = _read_pid(self.path)
            os.close(fd)
            raise AlreadyRunningError(
                f"the {self.what} is already running (pid {other}, pid file {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _read_pid(self.path) == os.getpid():
                self.path.unlink()
        os.close(self._fd)
        self._fd = None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class PidState:
    state: Literal["running", "stale", "missing"]
    pid: int | None


def pid_state(path: Path) -> PidState:
    """Whether a daemon holds ``path``; a file nobody has locked is ``stale``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return PidState("missing", None)
    except OSError:
        return PidState("stale", _read_pid(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return PidState("running", _read_pid(path))
    finally:
        os.close(fd)
    return PidState("stale", _read_pid(path))


def stop_daemon(path: Path, what: str, timeout: float | None, sig: int = signal.SIGTERM) -> int:
    """Signal the daemon holding ``path`` and wait for it to exit (``timeout=None``: as long
    as it takes). Returns its PID."""
    st = pid_state(path)
    if st.state == "missing":
        raise NotRunningError(f"the {what} is not running (no pid file at {path})")
    if st.state == "stale" or st.pid is None:
        with contextlib.suppress(OSError):
            path.unlink()
        raise NotRunningError(
            f"the {what} is not running (removed a stale pid file naming pid {st.pid})"
        )
    try:
        os.kill(st.pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(OSError):
            path.unlink()
        raise NotRunningError(f"the {what} is not running (pid {st.pid} is gone)") from None
    except PermissionError:
        raise KittError(
            f"not allowed to signal the {what} (pid {st.pid}); it runs as another user"
        ) from None
    deadline = time.monotonic() + timeout if timeout is not None else float("inf")
    while time.monotonic() < deadline:
        # Done when the process is gone, not merely when it let go of the pid file: a
        # caller that starts a new daemon right after must find the port free.
        if not _alive(st.pid):
            with contextlib.suppress(FileNotFoundError):
                if pid_state(path).state != "running":
                    path.unlink()
            return st.pid
        time.sleep(0.05)
    raise KittError(
        f"the {what} (pid {st.pid}) did not exit within {timeout or 0:g} s; it is still running"
    )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def spawn_background(argv: Sequence[str], output: Path, ready_timeout: float) -> int:
    """Start ``argv`` detached and wait for its readiness message. Returns the child's PID."""
    ensure_dir(output.parent)
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(write_fd)})
    try:
        out = open(output, "ab")  # noqa: SIM115 - handed to the child, closed below
    except OSError as exc:
        raise HomeNotWritableError(f"cannot write {output}: {exc.strerror}") from exc
    os.chmod(output, 0o600)
    with out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            pass_fds=(write_fd,),
            env=env,
        )
    os.close(write_fd)
    try:
        message = _read_ready(read_fd, ready_timeout)
    finally:
        os.close(read_fd)
    if message == "ready":
        return proc.pid
    if message.startswith("error:"):
        _reap(proc)
        raise DaemonStartError(message.removeprefix("error:").strip())
    code = _reap(proc)
    if code is None:
        raise DaemonStartError(
            f"not ready after {ready_timeout:g} s (pid {proc.pid} still starting); see {output}"
        )
    raise DaemonStartError(f"exited with status {code} before it was ready; see {output}")


def _read_ready(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return ""
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            return ""
        data = os.read(fd, 4096)
        if not data:
            return b"".join(chunks).decode(errors="replace").strip()
        chunks.append(data)


def _reap(proc: subprocess.Popen[bytes]) -> int | None:
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None


def notify_ready(error: str | None = None) -> None:
    """Tell whoever started us (``spawn_background`` or systemd) that we are up or why not."""
    fd_text = os.environ.pop(READY_FD_ENV, None)
    if fd_text:
        with contextlib.suppress(OSError, ValueError):
            fd = int(fd_text)
            os.write(fd, (f"error: {error}" if error else "ready").encode())
            os.close(fd)
    if error is None:
        _sd_notify(b"READY=1")


def _sd_notify(message: bytes) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message)


class Service(Protocol):
    def start(self) -> None: ...

    def stop(self, drain: bool = False) -> None:
        """``drain``: let running work finish instead of interrupting it (SIGUSR1)."""

    def hurry(self) -> None:
        """A stop signal arrived while draining: stop interrupting work after all."""


def run_until_signalled(service: Service, pidfile: PidFile) -> None:
    """Run a daemon in the foreground: lock the pid file, start, wait for a signal.

    SIGTERM and SIGINT stop it now; SIGUSR1 stops it once running work has finished.

    Any failure before ready is reported through :func:`notify_ready` and re-raised, so
    ``kitt … start`` prints the daemon's own reason instead of "it died".
    """
    stop = threading.Event()
    drain = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal drain
        if stop.is_set():
            if drain and signum != DRAIN_SIGNAL:
                log.info("received %s while draining: stopping now", signal.Signals(signum).name)
                service.hurry()
            return
        drain = signum == DRAIN_SIGNAL
        how = "after running work finishes" if drain else "now"
        log.info("received %s, shutting down %s", signal.Signals(signum).name, how)
        stop.set()

    try:
        pidfile.acquire()
    except KittError as exc:
        notify_ready(str(exc))
        raise
    try:
        signals = (signal.SIGTERM, signal.SIGINT, DRAIN_SIGNAL)
        previous = {s: signal.signal(s, _on_signal) for s in signals}
        try:
            service.start()
        except Exception as exc:
            notify_ready(str(exc))
            raise
        notify_ready()
        while not stop.wait(1.0):
            pass
        _sd_notify(b"STOPPING=1")
        try:
            service.stop(drain=drain)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        exit_if_stuck()
    finally:
        pidfile.release()


def run_steps(steps: Sequence[tuple[str, Callable[[], object]]]) -> None:
    """Run shutdown steps in order; a failing step is logged and the rest still run."""
    for name, step in steps:
        try:
            step()
        except Exception:
            log.exception("stopping the %s failed; carrying on with the shutdown", name)


def exit_if_stuck(grace_s: float = 5.0) -> None:
    """Called once a daemon has stopped: if a stray non-daemon thread still holds the
    interpreter after ``grace_s`` (a library that did not let go), exit anyway, so a stop
    always ends the process."""

    def _force() -> None:
        time.sleep(grace_s)
        names = [t.name for t in threading.enumerate() if not t.daemon and t.is_alive()]
        log.error("threads still running after the stop (%s); exiting anyway", ", ".join(names))
        logging.shutdown()
        os._exit(0)

    threading.Thread(target=_force, name="exit-watchdog", daemon=True).start()


def foreground_argv(module_args: Sequence[str]) -> list[str]:
    """The command that re-runs this installation of KITT with ``module_args``."""
    return [sys.executable, "-m", "kitt", *module_args]
