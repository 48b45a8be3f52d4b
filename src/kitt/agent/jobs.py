"""Running tests on the agent: one at a time, each a supervised subprocess.

The benchmark runs as its own process group (``start_new_session``) so that it never
shares the agent's GIL, and so that a cancel or timeout reaches every process it
started (SIGTERM to the group, SIGKILL after a grace period). The agent process stays
responsive throughout: a job is a thread that only waits on pipes and the child.

What ran is recorded under ``$KITT_HOME/jobs/<command_id>/`` (``state.json``,
``log.jsonl``, params and result): that is how a ``command_id`` seen before is
recognised after a restart, and how a job cut short by ``kill -9`` of the agent is
reported as failed when the agent comes back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
from pydantic import ValidationError

from kitt.agent.config import AgentConfig, CustomBenchmark
from kitt.agent.log_streamer import JobLog, LogLine, LogRegistry
from kitt.agent.settings import PushedSettings
from kitt.agent.spool import Spool
from kitt.agent.state import AgentState
from kitt.errors import KittError
from kitt.paths import PRIVATE_DIR, ensure_dir, write_private
from kitt.protocol import (
    DEFAULT_LOG_BATCH_LINES,
    SERVING_BENCHMARK,
    Command,
    RunTestPayload,
    describe_validation_error,
)

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 10.0
STOP_AFTER_HURRY_S = CANCEL_GRACE_S + 2
RESULT_MAX_BYTES = 1024 * 1024 - 4096  # the result must fit the server's 1 MiB body limit


SERVING_TIMEOUT_S = 12 * 3600.0


def serving_job(
    payload: RunTestPayload,
    config: AgentConfig,
    config_path: Path | None,
    settings: PushedSettings | None = None,
) -> tuple[RunTestPayload, CustomBenchmark]:
    """The built-in serving benchmark: its parameters are checked now (a typo is a 400 at
    submission, not a failed test later), against this agent's rules for what the server
    may point it at, and its command is fixed here, on the agent — the server only ever
    names the benchmark, an engine, a model and parameter values. Defaults pushed by the
    server (telemetry interval, the engine's startup timeout) fill in parameters the test
    leaves unset."""
    from kitt.bench.params import ParamsError, agent_policy, load_params

    for key in ("engine", "model"):
        if key in payload.params:
            raise CommandError(
                400, f"give the {key} as the test's own '{key}' field, not as a parameter"
            )
    params: dict[str, Any] = dict(payload.params)
    if settings is not None:
        params = {**settings.serving_defaults(payload.engine), **params}
    if payload.engine is not None:
        params["engine"] = payload.engine
    if payload.model is not None:
        params["model"] = payload.model
    try:
        checked = agent_policy(load_params(params), config.datasets_dir, config.allowed_endpoints)
    except ParamsError as exc:
        raise CommandError(400, str(exc)) from None
    if checked.dataset is not None:
        params["dataset"] = checked.dataset
    command = [sys.executable, "-m", "kitt", "bench", "serve", "--params-file", "params.json",
               "--output", "result.json", "--no-progress"]  # fmt: skip
    if config_path is not None:
        # The benchmark obeys this agent's own config (engines, models_dir, the policy
        # above) even when the daemon was started with --config elsewhere.
        command += ["--agent-config", str(config_path)]
    bench = CustomBenchmark(command=command, timeout_s=SERVING_TIMEOUT_S,
                            result_file=Path("result.json"),
                            description="built-in LLM serving benchmark")  # fmt: skip
    return payload.model_copy(update={"params": params}), bench


class CommandError(KittError):
    """A command the agent cannot take; ``status`` is the HTTP answer to give."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _param_env(params: dict[str, Any]) -> dict[str, str]:
    env = {}
    for key, value in params.items():
        name = "KITT_PARAM_" + re.sub(r"[^A-Za-z0-9]", "_", key).upper()
        if value is None:
            continue
        env[name] = json.dumps(value) if isinstance(value, bool) else str(value)
    return env


def spool_result(
    spool: Spool,
    command_id: str,
    test_id: str,
    status: str,
    error: str | None,
    result: dict[str, Any] | None = None,
) -> None:
    """Queue a test's final report (``POST …/results``) for durable delivery."""
    body = {
        "command_id": command_id,
        "test_id": test_id,
        "status": status,
        "result": result,
        "error": error,
        "finished_at": _now(),
    }
    spool.put_result(body)


def _wire_size(line: LogLine) -> int:
    """Bytes a line takes in a JSON batch (escaping of non-ASCII text included). Runs once
    per output line, so printable ASCII (the usual case) is counted exactly without
    encoding it: only ``"`` and ``\\`` grow, by one byte each."""
    text = line.line
    if text.isascii() and text.isprintable():
        return len(text) + text.count('"') + text.count("\\") + 2 + 64
    return len(json.dumps(text)) + 64


class LogShipper(threading.Thread):
    """Batches a job's lines into spooled ``logs`` reports: every 50 ms or 500 lines.

    50 ms keeps a server-side subscriber within ~100 ms of the benchmark (the target for
    live logs) while a chatty benchmark still costs one report per 500 lines, not per line.
    The line cap may be pushed by the server (``log_batch_lines``): ``max_lines`` is read
    at every batch, so a change applies from the next one.
    """

    INTERVAL_S = 0.05
    MAX_LINES = DEFAULT_LOG_BATCH_LINES
    # Well under the server's 1 MiB body limit even after JSON escaping (a line may be up
    # to 8,192 characters, so 500 long lines would be ~4 MiB).
    MAX_BYTES = 256 * 1024

    def __init__(
        self, spool: Spool, test_id: str, max_lines: Callable[[], int] | None = None
    ) -> None:
        super().__init__(name=f"log-shipper-{test_id}", daemon=True)
        self._spool = spool
        self._test_id = test_id
        self._max_lines = max_lines or (lambda: self.MAX_LINES)
        self._pending: list[LogLine] = []
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._done = threading.Event()

    def add(self, lines: list[LogLine]) -> None:
        with self._lock:
            self._pending.extend(lines)
            self._pending_bytes += sum(_wire_size(line) for line in lines)
            full = len(self._pending) >= self._max_lines() or self._pending_bytes >= self.MAX_BYTES
        if full:
            self.flush()

    def flush(self) -> None:
        # One flush at a time (reader thread and timer thread both flush), so batches reach
        # the spool in line order.
        with self._flush_lock:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending, self._pending_bytes = self._pending, [], 0
        chunk: list[dict[str, object]] = []
        size = 0
        max_lines = self._max_lines()
        for line in batch:
            cost = _wire_size(line)
            if chunk and (len(chunk) >= max_lines or size + cost > self.MAX_BYTES):
                self._ship(chunk)
                chunk, size = [], 0
            chunk.append(line.as_dict())
            size += cost
        if chunk:
            self._ship(chunk)

    def _ship(self, chunk: list[dict[str, object]]) -> None:
        log.debug("test %s: log batch of %d lines spooled", self._test_id, len(chunk))
        self._spool.put_logs(self._test_id, chunk)

    def run(self) -> None:
        while not self._done.wait(self.INTERVAL_S):
            self.flush()

    def close(self) -> None:
        """Ship what is left; called before the result is spooled so it arrives first."""
        self._done.set()
        self.join(timeout=5)
        self.flush()


class Job(threading.Thread):
    def __init__(
        self,
        command: Command,
        payload: RunTestPayload,
        benchmark: CustomBenchmark,
        workdir: Path,
        spool: Spool,
        on_end: Callable[[Job], None],
        log: JobLog,
        log_batch_lines: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(name=f"job-{command.test_id}", daemon=True)
        self.command = command
        self.test_id = command.test_id
        self.payload = payload
        self.benchmark = benchmark
        self.workdir = workdir
        self._spool = spool
        self._on_end = on_end
        self.log = log
        self._shipper = LogShipper(spool, command.test_id, log_batch_lines)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stop_reason: str | None = None  # "cancelled", "shutdown" or "timeout"
        self._last_error: str | None = None

    # -- control -------------------------------------------------------------------------

    def cancel(self, reason: str = "cancelled") -> None:
        """SIGTERM the whole process group now, SIGKILL it after the grace period."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        log.info(
            "stopping test %s (%s): SIGTERM to process group %d", self.test_id, reason, proc.pid
        )
        self._signal_group(proc, signal.SIGTERM)
        timer = threading.Timer(CANCEL_GRACE_S, self._kill_if_alive, args=(proc,))
        timer.daemon = True
        timer.start()

    def _kill_if_alive(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            return  # reaped, and its group already killed: the id may belong to others now
        log.warning("test %s ignored SIGTERM; SIGKILL to its process group", self.test_id)
        self._signal_group(proc, signal.SIGKILL)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> None:
        started = _now()
        self._report_status("running", started_at=started)
        self._shipper.start()
        status, error, result = "failed", None, None
        try:
            status, error, result = self._execute(started)
        except Exception as exc:  # a bug here must still end the test, not hang it
            log.exception("job for test %s crashed", self.test_id)
            error = f"agent error while running the benchmark: {exc}"
        size = len(json.dumps(result)) if result is not None else 0
        if size > RESULT_MAX_BYTES:
            status, result = "failed", None
            error = f"the result is {size} bytes as JSON; the limit is {RESULT_MAX_BYTES}"
        self._shipper.close()
        self.log.finish(status)
        # The report first: a kill between the two leaves state "running", which the next
        # start reports as failed, rather than a final state.json with no report sent.
        spool_result(self._spool, self.command.command_id, self.test_id, status, error, result)
        self._write_state(status, started_at=started, finished_at=_now(), error=error)
        log.info("test %s %s%s", self.test_id, status, f": {error}" if error else "")
        self._on_end(self)

    def _execute(self, started: str) -> tuple[str, str | None, dict[str, Any] | None]:
        result_file = self._result_path()
        result_file.unlink(missing_ok=True)  # an absolute path may hold a previous run's result
        params_file = self.workdir / "params.json"
        write_private(params_file, json.dumps(self.payload.params))
        env = dict(os.environ)
        env.update(self.benchmark.env)
        env.update(_param_env(self.payload.params))
        env.update(
            KITT_TEST_ID=self.test_id,
            KITT_COMMAND_ID=self.command.command_id,
            KITT_BENCHMARK=self.payload.benchmark,
            KITT_PARAMS_FILE=str(params_file),
            KITT_RESULT_FILE=str(result_file),
            KITT_JOB_DIR=str(self.workdir),
        )
        if self.payload.engine:
            env["KITT_ENGINE"] = self.payload.engine
        if self.payload.model:
            env["KITT_MODEL"] = self.payload.model
        with self._lock:
            if self._stop_reason in ("cancelled", "shutdown"):
                return "cancelled", "cancelled before it started", None
            try:
                # argv from the agent's own config, never from the network, and no shell.
                self._proc = subprocess.Popen(
                    self.benchmark.command,
                    cwd=self.workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                return "failed", f"cannot start {self.benchmark.command[0]!r}: {exc.strerror}", None
        proc = self._proc
        # The process group is recorded so that an agent restarted after kill -9 can end an
        # orphaned benchmark (state "accepted", written at accept time, covers the rest).
        self._write_state("running", started_at=started, pgid=proc.pid,
                          pgid_started=_create_time(proc.pid))  # fmt: skip
        timer = threading.Timer(self.benchmark.timeout_s, self.cancel, args=("timeout",))
        timer.daemon = True
        timer.start()
        reader = threading.Thread(target=self._copy_output, args=(proc,), daemon=True)
        reader.start()
        code = proc.wait()
        timer.cancel()
        # Whatever the benchmark left running in its group ends with it.
        self._signal_group(proc, signal.SIGKILL)
        reader.join(timeout=5)
        with self._lock:
            reason = self._stop_reason
        if reason == "cancelled":
            return "cancelled", "cancelled by request", None
        if reason == "shutdown":
            return "cancelled", "cancelled: the agent was stopped", None
        if reason == "timeout":
            return "failed", f"timed out after {self.benchmark.timeout_s:g} s", None
        if code != 0:
            how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
            # The benchmark's own last "error: …" line says why (kitt bench serve prints one).
            why = f": {self._last_error}" if self._last_error else ""
            partial = self._read_result(result_file, required=False)[1]
            return "failed", f"benchmark {how}{why}", partial
        error, result = self._read_result(
            result_file, required=self.benchmark.result_file is not None
        )
        return ("failed", error, None) if error else ("completed", None, result)

    def _result_path(self) -> Path:
        declared = self.benchmark.result_file
        if declared is None:
            return self.workdir / "result.json"
        return declared if declared.is_absolute() else self.workdir / declared

    @staticmethod
    def _read_result(path: Path, required: bool) -> tuple[str | None, dict[str, Any] | None]:
        if not path.exists():
            return (f"the benchmark wrote no result file at {path}" if required else None), None
        if path.stat().st_size > RESULT_MAX_BYTES:
            return f"result file {path} is larger than {RESULT_MAX_BYTES} bytes", None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"result file {path} is not valid JSON: {exc}", None
        if not isinstance(data, dict):
            return f"result file {path} must hold a JSON object, not {type(data).__name__}", None
        return None, data

    def _copy_output(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None  # noqa: S101 - Popen was given stdout=PIPE
        for raw in proc.stdout:
            lines = self.log.append(raw)
            for line in lines:
                if line.line.startswith("error: "):
                    self._last_error = line.line.removeprefix("error: ")[:500]
            self._shipper.add(lines)

    # -- reporting -------------------------------------------------------------------------

    def _report_status(self, status: str, **fields: Any) -> None:
        body = {"status": status, **fields}
        self._spool.put_status(self.test_id, body)

    def _write_state(self, status: str, **fields: Any) -> None:
        state = {"test_id": self.test_id, "command_id": self.command.command_id,
                 "status": status, "pid": os.getpid(), **fields}  # fmt: skip
        write_private(self.workdir / "state.json", json.dumps(state))


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _kill_orphan(state: dict[str, Any]) -> None:
    """End a benchmark whose agent died under it, if that very process group still runs."""
    pgid, started = state.get("pgid"), state.get("pgid_started")
    if not isinstance(pgid, int) or started is None:
        return
    now_started = _create_time(pgid)
    if now_started is not None and abs(now_started - float(started)) < 0.01:
        log.warning("killing the orphaned benchmark process group %d", pgid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


class JobManager:
    """Accepts commands (from a push or a heartbeat) and runs at most one job at a time."""

    def __init__(
        self,
        config: AgentConfig,
        jobs_dir: Path,
        state: AgentState,
        spool: Spool,
        config_path: Path | None = None,
        settings: PushedSettings | None = None,
    ) -> None:
        self._config = config
        self._config_path = config_path
        self.settings = settings or PushedSettings()
        self._dir = ensure_dir(jobs_dir, PRIVATE_DIR)
        self._state = state
        self._spool = spool
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._closing = False
        self._cancelled: set[str] = set()
        self._hurry = threading.Event()
        self.logs = LogRegistry()

    @property
    def current(self) -> Job | None:
        with self._lock:
            return self._current

    def handle(self, command: Command) -> bool:
        """Take a command. True when it is new, False for a duplicate; raises CommandError."""
        if command.type == "cancel":
            return self._cancel(command)
        if (self._dir / command.command_id).exists():
            return False  # seen before (possibly before a restart): at-least-once delivery
        if self._closing:
            raise CommandError(409, "the agent is shutting down")
        if command.test_id in self._cancelled:
            log.info("ignoring run_test for test %s: it was cancelled", command.test_id)
            return False
        try:
            payload = RunTestPayload.model_validate(command.payload)
        except ValidationError as exc:
            raise CommandError(
                400, "invalid run_test payload: " + describe_validation_error(exc)
            ) from None
        benchmark = self._config.benchmarks.get(payload.benchmark)
        if benchmark is None and payload.benchmark == SERVING_BENCHMARK:
            payload, benchmark = serving_job(
                payload, self._config, self._config_path, self.settings
            )
        if benchmark is None:
            offered = ", ".join(sorted({*self._config.benchmarks, SERVING_BENCHMARK})) or "none"
            raise CommandError(
                400, f"unknown benchmark {payload.benchmark!r} (this agent offers: {offered})"
            )
        with self._lock:
            workdir = self._dir / command.command_id
            if workdir.exists():
                return False
            if self._current is not None:
                raise CommandError(409, f"busy: running test {self._current.test_id}")
            ensure_dir(workdir, PRIVATE_DIR)
            # Written before anything else, so a restart always finds what it had accepted.
            write_private(workdir / "state.json", json.dumps({
                "test_id": command.test_id, "command_id": command.command_id,
                "status": "accepted", "pid": os.getpid()}))  # fmt: skip
            log_ = JobLog(workdir / "log.jsonl", self._config.log_buffer_lines)
            self.logs.add(command.command_id, log_)
            job = Job(command, payload, benchmark, workdir, self._spool, self._ended, log_,
                      self.settings.log_batch_lines)  # fmt: skip
            self._current = job
            self._state.set_task("running", command.test_id)
        job.start()
        log.info("test %s started: benchmark %s (command %s)", command.test_id, payload.benchmark,
                 command.command_id)  # fmt: skip
        return True

    def _cancel(self, command: Command) -> bool:
        with self._lock:
            job = self._current
            if job is None or job.test_id != command.test_id:
                # A late run_test for it (e.g. one overtaken by this cancel) must not run.
                self._cancelled.add(command.test_id)
        if job is not None and job.test_id == command.test_id:
            job.cancel()
            return True
        for state_file in self._dir.glob("*/state.json"):
            with contextlib.suppress(OSError, ValueError):
                if json.loads(state_file.read_text()).get("test_id") == command.test_id:
                    return False  # it already ended here; its result is on its way
        raise CommandError(404, f"test {command.test_id} is not running on this agent")

    def _ended(self, job: Job) -> None:
        with self._lock:
            if self._current is job:
                self._current = None
                self._state.set_task("idle", None)

    def recover(self) -> int:
        """Report jobs that a previous agent process left running (it was killed) as failed."""
        count = 0
        for state_file in sorted(self._dir.glob("*/state.json")):
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                continue
            if state.get("status") not in ("accepted", "running"):
                continue
            error = f"agent restarted while the test was running (previous pid {state.get('pid')})"
            _kill_orphan(state)
            spool_result(self._spool, state["command_id"], state["test_id"], "failed", error)
            state.update(status="failed", error=error, finished_at=_now())
            write_private(state_file, json.dumps(state))
            log.warning(
                "test %s was interrupted by an agent restart; reporting it failed", state["test_id"]
            )
            count += 1
        return count

    def hurry(self) -> None:
        """Turn a drain into a stop: the running test is cancelled after all."""
        self._hurry.set()

    def shutdown(self, timeout: float | None, drain: bool = False) -> None:
        """Take no new work; cancel the running job (or, draining, let it finish) and wait."""
        with self._lock:
            self._closing = True
            self._state.set_closing()
            job = self._current
        if job is None:
            return
        if drain:
            log.info("draining: waiting for test %s to finish", job.test_id)
            while job.is_alive() and not self._hurry.wait(0.2):
                pass
            if not job.is_alive():
                return
        job.cancel("shutdown")
        job.join(timeout if not drain else STOP_AFTER_HURRY_S)
        if job.is_alive():
            log.error("test %s did not stop within %g s", job.test_id, timeout or 0)
