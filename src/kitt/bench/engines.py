"""Inference engines an agent can start for a benchmark: definitions, model paths, and the
engine process itself.

Definitions ship in ``engines.yaml``; an agent's ``agent.yaml`` overrides them key by key
or adds its own. The server only ever *names* an engine and a model: the command line,
the binary and the model's location on disk are the agent's business, so a server (or
someone holding its admin token) cannot make an agent run arbitrary programs or read
arbitrary files. Hence the fixed placeholder set, argv items that never pass through a
shell, test-supplied ``engine_args`` only where the agent allows them, and model names
resolved under ``models_dir``.

Process life cycle (see ``engine_guard.py`` for the full reasoning): the engine runs under
a small guard process in a session of its own, tied to the benchmark by a lifeline pipe.
``EngineProcess.stop()`` is the orderly path (SIGTERM to the engine's process group,
SIGKILL after a grace period); the lifeline makes the same happen when the benchmark dies
without running any code (SIGKILL from the job runner, a crash). Callers should still:

* use ``EngineProcess`` as a context manager (or call ``stop()`` in ``finally``), and
* call ``install_stop_on_signals(engine)`` from the main thread (before or right after
  ``start()``), so that SIGTERM/SIGINT/SIGHUP stop the engine *before* the benchmark
  exits (status 128+signal) rather than a moment after; ``atexit`` covers a normal exit.
* not ``fork()`` without ``exec`` while an engine runs (e.g. multiprocessing's "fork"
  start method): a forked copy holds the lifeline open and delays the guard's cleanup
  until that copy exits too. ``subprocess`` is fine (it closes inherited descriptors).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kitt.errors import ConfigError, KittError
from kitt.protocol import AGENT_NAME_PATTERN, describe_config_error

log = logging.getLogger(__name__)

PLACEHOLDERS = ("binary", "model", "host", "port", "model_name")
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_MODEL_LEN = 1024
MAX_ENGINE_ARGS = 64
MAX_ENGINE_ARG_LEN = 4096
LOG_TAIL_LINES = 20
MAX_LOG_LINE = 8000
HEALTH_POLL_S = 0.2
DEFAULT_HOST = "127.0.0.1"
GUARD = Path(__file__).with_name("engine_guard.py")
GUARD_START_TIMEOUT_S = 30.0
# What engines print when their port was taken between our probe and their bind.
_PORT_IN_USE_RE = re.compile(
    r"address already in use|EADDRINUSE|couldn't bind|could not bind|failed to bind"
    r"|port \S+ is (already )?in use",
    re.IGNORECASE,
)

ModelKind = Literal["file", "dir", "name"]
OutputLenField = Literal["ignore_eos", "min_tokens"]


class EngineError(KittError):
    """An engine cannot be used for this run: unknown, not installed, model missing, failed
    to start or to become healthy. The message is what the test result shows."""


# --- definitions ---------------------------------------------------------------------------


def _check_placeholders(items: Iterable[str], where: str) -> None:
    for item in items:
        for name in _PLACEHOLDER_RE.findall(item):
            if name not in PLACEHOLDERS:
                allowed = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                raise ValueError(f"{where}: unknown placeholder {{{name}}} (allowed: {allowed})")


def _check_command(value: list[str], where: str) -> list[str]:
    if not value:
        raise ValueError(f"{where} must not be empty")
    if value[0] != "{binary}" and not Path(value[0]).is_absolute():
        raise ValueError(f"{where} must start with {{binary}} or an absolute path")
    _check_placeholders(value, where)
    return value


def _check_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must be a URL path starting with /")
    return value


class EngineSpec(BaseModel):
    """One engine, fully defined (shipped defaults merged with the agent's overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=AGENT_NAME_PATTERN)
    description: str = ""
    binary: str = Field(min_length=1, max_length=4096)
    argv: list[str] = Field(min_length=1, max_length=256)
    env: dict[str, str] = Field(default_factory=dict)
    health_path: str = "/health"
    completions_path: str = "/v1/completions"
    chat_path: str = "/v1/chat/completions"
    default_port: int = Field(default=8000, ge=1, le=65535)
    model_kind: ModelKind = "file"
    startup_timeout_s: float = Field(default=120.0, gt=0, le=7200)
    stop_grace_s: float = Field(default=10.0, gt=0, le=600)
    version_command: list[str] | None = None
    version_regex: str | None = None
    version_prefix: str = ""
    version_timeout_s: float = Field(default=10.0, gt=0, le=600)
    check_command: list[str] | None = None
    force_output_len: list[OutputLenField] = Field(default_factory=list)
    allow_args: bool = False

    @field_validator("binary")
    @classmethod
    def _binary(cls, value: str) -> str:
        value = value.strip()
        expanded = os.path.expanduser(value)
        if "/" in value and not Path(expanded).is_absolute():
            raise ValueError("must be a program name found on PATH or an absolute path")
        if any(c.isspace() for c in value) and "/" not in value:
            raise ValueError("a program name cannot contain spaces")
        return expanded

    @field_validator("argv")
    @classmethod
    def _argv(cls, value: list[str]) -> list[str]:
        if value[0] != "{binary}":
            raise ValueError("must start with {binary} (set 'binary' to the program to run)")
        _check_placeholders(value, "argv")
        return value

    @field_validator("version_command", "check_command")
    @classmethod
    def _commands(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _check_command(value, "the command")

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not _ENV_NAME_RE.match(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            _check_placeholders([item], f"env {key}")
        return value

    @field_validator("health_path", "completions_path", "chat_path")
    @classmethod
    def _paths(cls, value: str) -> str:
        return _check_path(value)

    @field_validator("version_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if compiled.groups < 1:
            raise ValueError("needs a capture group: the version is its first group")
        return value

    @property
    def ignore_eos(self) -> bool:
        """The engine accepts ``ignore_eos`` (generate through end-of-sequence tokens)."""
        return "ignore_eos" in self.force_output_len

    @property
    def min_tokens(self) -> bool:
        """The engine accepts ``min_tokens`` (set to the requested output length)."""
        return "min_tokens" in self.force_output_len


class EngineOverride(BaseModel):
    """An engine entry in agent.yaml: any subset of ``EngineSpec``'s fields. For a name not
    shipped, the entry must define a complete engine (at least ``binary`` and ``argv``)."""

    model_config = ConfigDict(extra="forbid")

    description: str | None = None
    binary: str | None = None
    argv: list[str] | None = None
    env: dict[str, str] | None = None
    health_path: str | None = None
    completions_path: str | None = None
    chat_path: str | None = None
    default_port: int | None = None
    model_kind: ModelKind | None = None
    startup_timeout_s: float | None = None
    stop_grace_s: float | None = None
    version_command: list[str] | None = None
    version_regex: str | None = None
    version_prefix: str | None = None
    version_timeout_s: float | None = None
    check_command: list[str] | None = None
    force_output_len: list[OutputLenField] | None = None
    allow_args: bool | None = None


@cache
def shipped_engines() -> dict[str, dict[str, Any]]:
    """The defaults in engines.yaml (package data), as raw mappings."""
    text = resources.files("kitt.bench").joinpath("engines.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):  # a packaging error, not a user's
        raise RuntimeError("kitt/bench/engines.yaml is not a mapping")
    return data


def _describe(exc: ValidationError) -> str:
    return describe_config_error(exc, missing="required for an engine that KITT does not ship")


def load_engines(
    overrides: Mapping[str, EngineOverride | Mapping[str, Any]] | None = None,
) -> dict[str, EngineSpec]:
    """Shipped engines merged with agent.yaml's ``engines:`` (key by key per engine).

    Raises ConfigError naming the engine and the field on any bad entry."""
    raw: dict[str, dict[str, Any]] = {k: dict(v) for k, v in shipped_engines().items()}
    for name, override in (overrides or {}).items():
        if not re.match(AGENT_NAME_PATTERN, str(name)):
            raise ConfigError(
                f"engines: {name!r} is not a valid engine name (letters, digits, . _ -)"
            )
        if isinstance(override, EngineOverride):
            changes = override.model_dump(exclude_unset=True)
        elif isinstance(override, Mapping):
            try:
                changes = EngineOverride.model_validate(dict(override)).model_dump(
                    exclude_unset=True
                )
            except ValidationError as exc:
                raise ConfigError(f"engines.{name}: {_describe(exc)}") from None
        else:
            raise ConfigError(
                f"engines.{name}: expected a mapping of settings, got {type(override).__name__}"
            )
        raw.setdefault(name, {}).update(changes)
    specs = {}
    for name, data in raw.items():
        try:
            specs[name] = EngineSpec.model_validate({**data, "name": name})
        except ValidationError as exc:
            raise ConfigError(f"engines.{name}: {_describe(exc)}") from None
    return specs


@dataclass(frozen=True)
class AgentEngineSettings:
    """What agent.yaml says about engines and models on this machine."""

    overrides: Mapping[str, EngineOverride]
    models_dir: Path | None
    allow_any_model_path: bool


def agent_settings(config_path: Path | None = None) -> AgentEngineSettings:
    """The engine settings a benchmark on this machine must obey: those of the agent's
    ``$KITT_HOME/agent.yaml`` (the agent runs benchmarks with its own environment, so the
    same file). Without an agent.yaml the run is local — someone at the keyboard ran
    ``kitt bench serve`` — so shipped engines, and model paths as given (relative ones from
    the current directory)."""
    from kitt.agent.config import load_config  # here: kitt.agent.config imports this module
    from kitt.paths import AgentPaths, kitt_home

    path = config_path or AgentPaths(kitt_home()).config
    if not path.exists():
        return AgentEngineSettings({}, Path.cwd(), allow_any_model_path=True)
    config = load_config(path)
    return AgentEngineSettings(config.engines, config.models_dir, config.allow_any_model_path)


def get_engine(specs: Mapping[str, EngineSpec], name: str) -> EngineSpec:
    spec = specs.get(name)
    if spec is None:
        known = ", ".join(sorted(specs)) or "none"
        raise EngineError(f"unknown engine {name!r} on this agent (known: {known})")
    return spec


def find_binary(spec: EngineSpec) -> str | None:
    """The engine's program as an absolute path, or None where it is not installed."""
    if os.path.isabs(spec.binary):
        ok = os.path.isfile(spec.binary) and os.access(spec.binary, os.X_OK)
        return spec.binary if ok else None
    return shutil.which(spec.binary)


def _substitute(item: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), item)


def _run_quietly(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, errors="replace", timeout=timeout,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s failed: %s", argv[0], exc)
        return None


def available_engines(specs: Mapping[str, EngineSpec]) -> list[str]:
    """Engines this agent can start: the binary exists and the optional check passes."""
    names = []
    for name, spec in sorted(specs.items()):
        binary = find_binary(spec)
        if binary is None:
            continue
        if spec.check_command is not None:
            argv = [_substitute(a, {"binary": binary}) for a in spec.check_command]
            done = _run_quietly(argv, spec.version_timeout_s)
            if done is None or done.returncode != 0:
                continue
        names.append(name)
    return names


def engine_version(spec: EngineSpec) -> str | None:
    """The engine's version from its version command, or None when it cannot be told."""
    binary = find_binary(spec)
    if binary is None or spec.version_command is None:
        return None
    argv = [_substitute(a, {"binary": binary}) for a in spec.version_command]
    done = _run_quietly(argv, spec.version_timeout_s)
    if done is None:
        return None
    output = (done.stdout or "") + "\n" + (done.stderr or "")
    if spec.version_regex is None:
        first = next((line.strip() for line in output.splitlines() if line.strip()), "")
        return first[:100] or None
    match = re.search(spec.version_regex, output)
    return (spec.version_prefix + match.group(1))[:100] if match else None


# --- models --------------------------------------------------------------------------------


def check_model_ref(model: str) -> str:
    """Refuse model references an engine could misread: an option (``-…``), control
    characters, surrounding blanks. Everything else is an ordinary argv item."""
    if (
        not model.strip()
        or len(model) > MAX_MODEL_LEN
        or model != model.strip()
        or model.startswith("-")
        or not model.isprintable()
    ):
        raise EngineError(
            f"invalid model {model[:100]!r}: give a name or path that does not start with "
            "'-' and has no control characters or surrounding blanks"
        )
    return model


def resolve_model(
    spec: EngineSpec,
    model: str,
    models_dir: Path | None,
    *,
    allow_any_path: bool = False,
) -> str:
    """Where the engine finds ``model`` on this agent.

    Relative names resolve under ``models_dir``. ``..`` and absolute paths outside
    ``models_dir`` are refused unless the agent sets ``allow_any_model_path`` (symlinks
    inside models_dir are the operator's own and are followed). For tag-named engines
    (Ollama) the tag is returned as it is: the engine resolves it."""
    check_model_ref(model)
    if spec.model_kind == "name":
        return model
    path = Path(model)
    root = Path(os.path.abspath(models_dir)) if models_dir is not None else None
    if path.is_absolute():
        candidate = Path(os.path.normpath(path))
    elif root is None:
        raise EngineError(
            f"model {model!r} is a relative path but this agent has no models_dir "
            "(set models_dir in agent.yaml)"
        )
    else:
        candidate = Path(os.path.normpath(root / path))
    if not allow_any_path:
        if root is None:
            raise EngineError(
                f"model {model!r}: absolute paths are refused unless agent.yaml sets "
                "models_dir (and the model is inside it) or allow_any_model_path: true"
            )
        if ".." in path.parts or not (candidate == root or root in candidate.parents):
            raise EngineError(
                f"model {model!r} is outside this agent's models folder {root}; refused "
                "(give a path inside it, or set allow_any_model_path: true in agent.yaml)"
            )
    exists = candidate.is_file() if spec.model_kind == "file" else candidate.is_dir()
    if not exists:
        if candidate.exists():
            want = "a model file" if spec.model_kind == "file" else "a model folder"
            raise EngineError(
                f"model {model!r} at {candidate} is not {want}, which engine {spec.name} needs"
            )
        raise EngineError(f"model {model!r} not found on this agent (looked in {candidate})")
    return str(candidate)


# --- the engine process --------------------------------------------------------------------


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port that is free right now; the engine binds it a moment later (a small race that
    ``EngineProcess`` covers with one retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def build_argv(
    spec: EngineSpec,
    *,
    binary: str,
    model: str,
    model_name: str,
    host: str,
    port: int,
    engine_args: Sequence[str] = (),
) -> list[str]:
    """The engine's command line: placeholders filled in, each item one argument."""
    args = list(engine_args)
    if args and not spec.allow_args:
        raise EngineError(
            f"engine {spec.name} does not accept engine_args on this agent "
            f"(set engines.{spec.name}.allow_args: true in agent.yaml to allow them)"
        )
    if len(args) > MAX_ENGINE_ARGS:
        raise EngineError(f"too many engine_args ({len(args)}; at most {MAX_ENGINE_ARGS})")
    for arg in args:
        if not isinstance(arg, str) or len(arg) > MAX_ENGINE_ARG_LEN or "\x00" in arg:
            raise EngineError(f"invalid engine argument {str(arg)[:100]!r}")
    values = _values(binary, model, model_name, host, port)
    return [_substitute(item, values) for item in spec.argv] + args


def _values(binary: str, model: str, model_name: str, host: str, port: int) -> dict[str, str]:
    return {"binary": binary, "model": model, "model_name": model_name, "host": host,
            "port": str(port)}  # fmt: skip


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class EngineProcess:
    """A running engine for one benchmark run. Use as a context manager::

        with EngineProcess(spec, model_path, model_name="tiny", on_line=log) as engine:
            install_stop_on_signals(engine)
            run_benchmark(engine.url, engine.model_name)

    ``start()`` returns once the health URL answers 200; it raises EngineError (after
    stopping whatever it started) when the engine exits first or is not healthy in time.
    """

    def __init__(
        self,
        spec: EngineSpec,
        model_path: str,
        *,
        model_name: str | None = None,
        on_line: Callable[[str], None] | None = None,
        engine_args: Sequence[str] = (),
        startup_timeout_s: float | None = None,
        stop_grace_s: float | None = None,
        host: str = DEFAULT_HOST,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.model_path = model_path
        # The name clients send as "model" (--alias / --served-model-name in the shipped
        # argv): a tag as it is, else the file or folder name.
        default_name = model_path if spec.model_kind == "name" else Path(model_path).name
        self.model_name = check_model_ref(model_name or default_name or model_path)
        self.engine_args = list(engine_args)
        self.argv: list[str] = []  # the command line of the last start
        self.startup_timeout_s = startup_timeout_s or spec.startup_timeout_s
        self.stop_grace_s = stop_grace_s if stop_grace_s is not None else spec.stop_grace_s
        self.host = host
        self.port: int | None = None
        self.version: str | None = None
        self.engine_pid: int | None = None
        self.returncode: int | None = None
        self._on_line = on_line
        self._extra_env = dict(env or {})
        self._guard: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None
        self._status: int | None = None
        self._status_buf = b""
        self._reader: threading.Thread | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._tail_lock = threading.Lock()
        self._prefix = f"[{spec.name}] "
        # Validate before anything starts: a refused engine_args is the caller's error.
        build_argv(spec, binary=spec.binary, model=model_path, model_name=self.model_name,
                   host=host, port=1, engine_args=self.engine_args)  # fmt: skip

    # -- public ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise EngineError(f"engine {self.spec.name} is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def guard_pid(self) -> int | None:
        return self._guard.pid if self._guard is not None else None

    @property
    def last_lines(self) -> list[str]:
        with self._tail_lock:
            return list(self._tail)

    def describe(self) -> dict[str, Any]:
        """The result document's ``engine`` section."""
        # The command line that actually ran (agent.yaml's argv included: -np, -c, …), so
        # that two results say how their engines were configured.
        return {"name": self.spec.name, "version": self.version, "args": list(self.argv),
                "engine_args": list(self.engine_args), "managed": True,
                "model_path": self.model_path}  # fmt: skip

    def start(self) -> EngineProcess:
        binary = find_binary(self.spec)
        if binary is None:
            raise EngineError(
                f"engine {self.spec.name}: program {self.spec.binary!r} not found on this "
                f"agent (install it, or set engines.{self.spec.name}.binary in agent.yaml)"
            )
        self.version = engine_version(self.spec)
        try:
            self._launch(binary, free_port(self.host))
            try:
                self._wait_healthy()
            except EngineError:
                if not self._port_was_taken():
                    raise
                taken = self.port
                self.stop()
                self._emit(f"kitt: port {taken} was taken meanwhile; retrying on another port")
                self._launch(binary, free_port(self.host))
                self._wait_healthy()
        except BaseException:
            self.stop()  # also on KeyboardInterrupt: __exit__ does not run when start fails
            raise
        return self

    def stop(self) -> None:
        """Stop the engine and everything it started. Idempotent, safe to call from a signal
        handler while another stop() is under way (every wait has a timeout, no locks)."""
        guard = self._guard
        if guard is None:
            return
        if guard.poll() is None:
            if self.engine_pid is not None and self.engine_pid > 0:
                # The guard said "started": its handlers are in place, SIGTERM is a request.
                guard.send_signal(signal.SIGTERM)
            else:
                self._close_lifeline()  # before that, only EOF is safe to send
            try:
                guard.wait(timeout=self.stop_grace_s + 5.0)
            except subprocess.TimeoutExpired:
                log.warning("engine guard %d did not finish; killing the engine", guard.pid)
                self._kill_everything(guard)
        self._close_lifeline()
        self._read_status(0.0)
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=2.0)
        status, self._status = self._status, None
        if status is not None:
            self._close(status)
        if guard.stdout is not None and (reader is None or not reader.is_alive()):
            guard.stdout.close()
        atexit.unregister(self.stop)

    def __enter__(self) -> EngineProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------

    def _launch(self, binary: str, port: int) -> None:
        self.port = port
        self.engine_pid = None
        self.returncode = None
        self._status_buf = b""
        with self._tail_lock:
            self._tail.clear()
        values = _values(binary, self.model_path, self.model_name, self.host, port)
        argv = build_argv(self.spec, binary=binary, model=self.model_path,
                          model_name=self.model_name, host=self.host, port=port,
                          engine_args=self.engine_args)  # fmt: skip
        self.argv = argv
        env = dict(os.environ)
        env.update({k: _substitute(v, values) for k, v in self.spec.env.items()})
        env.update(self._extra_env)
        lifeline_r, lifeline_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            guard = subprocess.Popen(
                [sys.executable, "-I", str(GUARD), str(lifeline_r), str(status_w),
                 repr(self.stop_grace_s), "--", *argv],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, pass_fds=(lifeline_r, status_w), env=env,
            )  # fmt: skip
        except OSError as exc:
            for fd in (lifeline_r, lifeline_w, status_r, status_w):
                self._close(fd)
            raise EngineError(f"cannot start the engine guard: {exc.strerror}") from None
        self._close(lifeline_r)
        self._close(status_w)
        self._guard = guard
        self._lifeline, self._status = lifeline_w, status_r
        atexit.register(self.stop)
        self._reader = threading.Thread(
            target=self._read_output, name=f"engine-log-{self.spec.name}", daemon=True
        )
        self._reader.start()
        log.info("starting engine %s on port %d: %s", self.spec.name, port, " ".join(argv))
        deadline = time.monotonic() + GUARD_START_TIMEOUT_S
        while self.engine_pid is None:
            if not self._read_status(max(0.0, deadline - time.monotonic())) and (
                guard.poll() is not None or time.monotonic() >= deadline
            ):
                raise EngineError(f"engine {self.spec.name}: the engine guard failed to start")

    def _read_status(self, timeout: float) -> bool:
        """Read the guard's status events; True when at least one arrived."""
        fd = self._status
        if fd is None:
            return False
        got = False
        ready, _, _ = select.select([fd], [], [], timeout)
        while ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            self._status_buf += chunk
            ready, _, _ = select.select([fd], [], [], 0)
        while b"\n" in self._status_buf:
            line, self._status_buf = self._status_buf.split(b"\n", 1)
            got = True
            self._on_status(json.loads(line))
        return got

    def _on_status(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "started":
            self.engine_pid = int(event["pid"])
        elif kind == "exited":
            self.returncode = int(event["returncode"])
        elif kind == "error":
            self.returncode = 127
            self._emit(f"kitt: {event.get('message')}")
            self.engine_pid = -1  # ends the wait for "started"

    def _wait_healthy(self) -> None:
        guard = self._guard
        if guard is None:
            raise EngineError(f"engine {self.spec.name} is not running")
        if self.engine_pid == -1:
            self._raise_exited()
        url = self.url + self.spec.health_path
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(timeout=httpx.Timeout(2.0), trust_env=False) as client:
            while True:
                if guard.poll() is not None:
                    self._read_status(0.5)
                    self._raise_exited()
                try:
                    if client.get(url).status_code == 200:
                        log.info("engine %s healthy at %s", self.spec.name, self.url)
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() >= deadline:
                    raise EngineError(
                        f"engine {self.spec.name} did not become healthy at {url} within "
                        f"{self.startup_timeout_s:g} s; it was stopped. Last lines:\n"
                        + self._tail_text()
                    )
                time.sleep(HEALTH_POLL_S)

    def _raise_exited(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=2.0)  # its last words are what the user needs
        raise EngineError(
            f"engine {self.spec.name} {_describe_exit(self.returncode)} before it became "
            f"healthy. Last lines:\n" + self._tail_text()
        )

    def _tail_text(self) -> str:
        return "\n".join(self.last_lines) or "(no output)"

    def _port_was_taken(self) -> bool:
        """The engine exited because another process bound its port after our probe."""
        return self.returncode is not None and any(
            _PORT_IN_USE_RE.search(line) for line in self.last_lines
        )

    def _read_output(self) -> None:
        guard = self._guard
        if guard is None or guard.stdout is None:
            return
        try:
            for raw in guard.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                self._emit(line[:MAX_LOG_LINE])
        except (OSError, ValueError):
            pass  # the pipe was closed under us by stop()

    def _emit(self, line: str) -> None:
        with self._tail_lock:
            self._tail.append(line)
        if self._on_line is None:
            return
        try:
            self._on_line(self._prefix + line)
        except Exception:  # a broken log sink must not stop the engine's output draining
            log.exception("engine log callback failed")

    def _close_lifeline(self) -> None:
        lifeline, self._lifeline = self._lifeline, None
        if lifeline is not None:
            self._close(lifeline)

    def _kill_everything(self, guard: subprocess.Popen[bytes]) -> None:
        if self.engine_pid is not None and self.engine_pid > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.engine_pid, signal.SIGKILL)
        guard.kill()
        try:
            guard.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            log.error("engine guard %d survived SIGKILL", guard.pid)

    @staticmethod
    def _close(fd: int) -> None:
        with contextlib.suppress(OSError):
            os.close(fd)


def install_stop_on_signals(
    engine: EngineProcess,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
) -> Callable[[], None]:
    """Stop ``engine`` first thing on these signals, then behave as before: call the
    previous Python handler (SIGINT: KeyboardInterrupt), or exit with 128+signal where the
    default action was to terminate. Main thread only (Python's rule for signal handlers);
    elsewhere it does nothing and the guard's lifeline still stops the engine when the
    process dies. Returns a function that restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        log.debug("install_stop_on_signals outside the main thread: relying on the lifeline")
        return lambda: None
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        engine.stop()
        before = previous.get(signum, signal.SIG_DFL)
        if callable(before):
            before(signum, frame)
        elif before != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    for sig in signals:
        previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, before in previous.items():
            signal.signal(sig, before)

    return restore
