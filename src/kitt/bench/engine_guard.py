"""The guard between a benchmark and the inference engine it starts.

``engines.EngineProcess`` runs this file (by path, ``python -I``: standard library only,
nothing from the package, so it starts in tens of milliseconds) in a new session; the
guard starts the engine in a session of its own and outlives the benchmark by design:

* The benchmark holds the write end of a *lifeline* pipe. However the benchmark ends —
  an orderly ``stop()``, an exception, SIGTERM, or SIGKILL that runs no code at all — the
  kernel closes that end, the guard reads EOF and stops the engine.
* The agent's job runner signals the benchmark's process group on cancel (SIGTERM, then
  SIGKILL). The guard is not in that group, so the SIGKILL cannot take it down before it
  has stopped the engine; the engine is not in that group either, so it is stopped in
  order (SIGTERM, grace, SIGKILL) rather than killed mid-write.
* The engine leads its own process group: stopping it signals the whole group, which
  reaches worker processes the engine started (vLLM, SGLang and Ollama all start some),
  and anything left in the group after the engine exits is killed too.

Protocol: ``engine_guard.py LIFELINE_FD STATUS_FD GRACE_S -- ARGV...``. The guard writes
JSON lines to STATUS_FD: ``{"event": "started", "pid": N}`` or ``{"event": "error",
"message": ...}``, and finally ``{"event": "exited", "returncode": RC}`` (negative: the
signal that ended the engine). The engine inherits stdout/stderr; the guard's own notes go
to stderr prefixed ``kitt:``. SIGTERM, SIGINT and SIGHUP to the guard also stop the engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GROUP_POLL_S = 0.05


def _note(text: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.write(f"kitt: {text}\n")
        sys.stderr.flush()


def _report(fd: int, **event: object) -> None:
    with contextlib.suppress(OSError):  # the benchmark is gone: nobody to tell
        os.write(fd, (json.dumps(event) + "\n").encode())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_group_gone(pgid: int, deadline: float) -> bool:
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(GROUP_POLL_S)
    return True


def stop_engine(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM to the engine's group; SIGKILL to whatever is left after the grace period."""
    pgid = proc.pid  # the engine leads its own group (start_new_session)
    deadline = time.monotonic() + grace_s
    _killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _note(f"engine did not stop within {grace_s:g} s of SIGTERM; killing it")
    # Workers may still be finishing after the leader exited: same deadline for them.
    if not _wait_group_gone(pgid, deadline):
        _killpg(pgid, signal.SIGKILL)
    proc.wait()
    _wait_group_gone(pgid, time.monotonic() + 5.0)


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[3] != "--":
        sys.stderr.write("usage: engine_guard.py LIFELINE_FD STATUS_FD GRACE_S -- ARGV...\n")
        return 2
    lifeline, status, grace_s = int(argv[0]), int(argv[1]), float(argv[2])
    command = argv[4:]

    # Signals only wake the loop below (through the wakeup fd); they never interrupt it.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: None)

    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        _report(status, event="error", message=f"cannot start {command[0]}: {exc.strerror}")
        return 127
    _report(status, event="started", pid=proc.pid)

    watch = [lifeline, wake_r]
    pidfd: int | None = None
    try:
        pidfd = os.pidfd_open(proc.pid)  # Linux >= 5.3: wakes when the engine exits
        watch.append(pidfd)
    except (AttributeError, OSError):
        pass
    timeout = None if pidfd is not None else GROUP_POLL_S

    reason = ""
    while not reason:
        ready, _, _ = select.select(watch, [], [], timeout)
        if proc.poll() is not None:
            break
        if wake_r in ready and any(s in os.read(wake_r, 64) for s in STOP_SIGNALS):
            reason = "stop requested"
        elif lifeline in ready and not os.read(lifeline, 4096):
            reason = "the benchmark process is gone"

    if proc.returncode is None:
        for sig in STOP_SIGNALS:  # a second signal must not cut the stop sequence short
            signal.signal(sig, signal.SIG_IGN)
        _note(f"stopping the engine ({reason})")
        stop_engine(proc, grace_s)
    else:
        # The engine ended on its own: do not leave its workers behind.
        _killpg(proc.pid, signal.SIGKILL)
        _wait_group_gone(proc.pid, time.monotonic() + 5.0)
    _report(status, event="exited", returncode=proc.returncode)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
