"""Preflight: can this machine run the agent? Checked before install and before start.

Each check is a small function returning :class:`Check`. A *required* check that fails
means the agent cannot work here (exit 1 at the CLI, ``start --preflight`` refuses);
an *advisory* one only warns, because machines differ legitimately (a CPU-only agent, a
host without systemd that runs the daemon by hand).

Every check runs on its own thread with a deadline, so one stuck probe (a hung NVML
driver, a filesystem that never answers ``statvfs``) cannot stall the whole preflight,
and an unexpected exception becomes that check's own failure instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import httpx
import psutil

from kitt import __version__, pki
from kitt.agent.config import DEFAULT_AGENT_PORT, AgentConfig, load_config
from kitt.agent.service import Systemctl
from kitt.bench.engines import (
    EngineSpec,
    available_engines,
    find_binary,
    load_engines,
    shipped_engines,
)
from kitt.errors import ConfigError, ServiceError
from kitt.http import TlsFiles, build_client, error_message
from kitt.paths import AgentPaths, agent_paths
from kitt.process import pid_state
from kitt.protocol import Health
from kitt.urls import validate_server_url

Status = Literal["ok", "warn", "fail", "skip"]

GIB = 1024**3
MIN_HOME_FREE_GIB = 1  # spool and job files are small, but a full disk loses results
MIN_MODELS_FREE_GIB = 20  # about one mid-sized model
MIN_PYTHON = (3, 10)
NETWORK_TIMEOUT_S = 5.0
ENGINE_TIMEOUT_S = 10.0
CERT_WARN_DAYS = 14
_NVML_VALUE_NOT_AVAILABLE = 2**64 - 1  # NVML's "unknown" for per-process memory


@dataclass(frozen=True)
class Check:
    name: str
    required: bool
    status: Status
    detail: str

    @property
    def failed(self) -> bool:
        """A failure that stops the agent (advisory checks never fail, they warn)."""
        return self.required and self.status == "fail"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.failed]


def _maker(name: str, required: bool) -> Callable[[Status, str], Check]:
    """Results of one check: ``result("ok", detail)``."""
    return lambda status, detail: Check(name, required, status, detail)


@dataclass
class Context:
    """What the checks know about this agent: its files, its config and the overrides."""

    paths: AgentPaths
    config_path: Path
    config_required: bool  # the file exists, or was named explicitly
    config: AgentConfig | None
    config_error: str | None
    server_url: str | None
    port: int
    bind: str
    service: bool
    ca: Path | None = None  # a CA given on the command line (the installer's, before init)
    server_version: str | None = None  # set by the server check, read by the version check


def load_context(
    *,
    config_path: Path | None = None,
    server_url: str | None = None,
    port: int | None = None,
    service: bool = False,
    paths: AgentPaths | None = None,
    bind: str | None = None,
    ca: Path | None = None,
) -> Context:
    """``config_path`` None: ``$KITT_HOME/agent.yaml`` where it exists (preflight also runs
    before ``kitt-agent init``); the others override agent.yaml's; ``service``: systemd is
    required (the installer is about to install the unit)."""
    paths = paths or agent_paths()
    path = config_path or paths.config
    required = config_path is not None or path.exists()
    config: AgentConfig | None = None
    error: str | None = None
    if required:
        try:
            config = load_config(path)
        except ConfigError as exc:
            error = str(exc)
    return Context(
        paths=paths,
        config_path=path,
        config_required=required,
        config=config,
        config_error=error,
        server_url=server_url or (config.server_url if config else None),
        port=port or (config.port if config else DEFAULT_AGENT_PORT),
        bind=bind or (config.bind if config else "0.0.0.0"),
        service=service,
        ca=ca,
    )


# --- the checks ----------------------------------------------------------------------------


def check_python(_ctx: Context) -> Check:
    result = _maker("python", True)
    here = f"Python {'.'.join(str(v) for v in sys.version_info[:3])} ({sys.executable})"
    if sys.version_info[:2] < MIN_PYTHON:
        return result("fail", f"{here}; KITT needs >= {'.'.join(map(str, MIN_PYTHON))}")
    return result("ok", here)


def check_config(ctx: Context) -> Check:
    result = _maker("config", ctx.config_required)
    if not ctx.config_required:
        return result("skip", f"no {ctx.config_path} yet (run kitt-agent init)")
    cfg = ctx.config
    if cfg is None:
        return result("fail", ctx.config_error or f"cannot load {ctx.config_path}")
    return result("ok", f"{ctx.config_path}: agent '{cfg.name}', server {cfg.server_url}")


def check_certificate(ctx: Context) -> Check:
    cfg = ctx.config
    if cfg is None or cfg.tls is None or cfg.tls.cert is None:
        why = "no agent.yaml" if cfg is None else "no agent certificate (plain-HTTP server)"
        return Check("certificate", False, "skip", why)
    result = _maker("certificate", True)
    try:
        cert = pki.load_cert(cfg.tls.cert)
    except pki.PkiError as exc:
        return result("fail", str(exc))
    until = cert.not_valid_after_utc
    left = until - pki.utcnow()
    when = f"{until:%Y-%m-%d %H:%M} UTC"
    if left.total_seconds() <= 0:
        return result(
            "fail",
            f"{cfg.tls.cert} expired on {when}: enroll again with a new bootstrap token "
            "(kitt-agent init --server URL --token TOKEN)",
        )
    if left.days < CERT_WARN_DAYS:
        return result(
            "warn",
            f"{cfg.tls.cert} expires on {when} (in {left.days} days): a running agent renews "
            "it by itself; or run kitt-agent renew",
        )
    return result("ok", f"{cfg.tls.cert} valid until {when} ({left.days} days)")


def _text(value: Any) -> str:
    """NVML returns bytes in old bindings and str in new ones."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _nvml_handles(nv: ModuleType) -> list[Any]:
    """Init NVML and return the GPU handles (the caller shuts NVML down)."""
    nv.nvmlInit()
    return [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]


def _shutdown(nv: ModuleType) -> None:
    with contextlib.suppress(Exception):  # nothing to do about a failed shutdown
        nv.nvmlShutdown()


def check_nvml(_ctx: Context) -> Check:
    result = _maker("nvml", False)
    try:
        nv = importlib.import_module("pynvml")
    except ImportError as exc:
        return result("warn", f"pynvml cannot be imported ({exc}): no GPU telemetry")
    try:
        handles = _nvml_handles(nv)
    except nv.NVMLError as exc:
        return result("warn", f"NVML unavailable ({exc}): no GPUs; fine for a CPU-only agent")
    try:
        names = [_text(nv.nvmlDeviceGetName(h)) for h in handles]
        driver = _text(nv.nvmlSystemGetDriverVersion())
        cuda = int(nv.nvmlSystemGetCudaDriverVersion())
    finally:
        _shutdown(nv)
    cuda_text = f"{cuda // 1000}.{(cuda % 1000) // 10}" if cuda > 0 else "unknown"
    versions = f"driver {driver}, CUDA {cuda_text}"
    if not names:
        return result("warn", f"NVML works ({versions}) but no GPU is visible")
    gpus = ", ".join(f"{i}: {name}" for i, name in enumerate(names))
    return result("ok", f"{len(names)} GPU(s) ({gpus}); {versions}")


def _agent_pids(paths: AgentPaths) -> set[int]:
    """This process and the running agent daemon with all its children (its benchmarks
    and engines use the GPUs legitimately)."""
    pids = {os.getpid()}
    st = pid_state(paths.pid)
    if st.state == "running" and st.pid is not None:
        pids.add(st.pid)
        with contextlib.suppress(psutil.Error):
            pids.update(p.pid for p in psutil.Process(st.pid).children(recursive=True))
    return pids


def _memory(used: Any) -> str:
    if not isinstance(used, int) or used < 0 or used == _NVML_VALUE_NOT_AVAILABLE:
        return "memory n/a"
    return f"{used / GIB:.1f} GiB" if used >= GIB else f"{used / 1024**2:.0f} MiB"


def _process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"  # another container's process, or gone since it was listed


def check_gpu_processes(ctx: Context) -> Check:
    result = _maker("gpu processes", False)
    try:
        nv = importlib.import_module("pynvml")
        handles = _nvml_handles(nv)
    except Exception as exc:  # ImportError or any NVMLError: the nvml check says why
        return result("skip", f"NVML unavailable ({exc})")
    ours = _agent_pids(ctx.paths)
    found: dict[tuple[int, int], Any] = {}
    queries = (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses)
    try:
        for index, handle in enumerate(handles):
            for query in queries:
                try:
                    procs = query(handle)
                except nv.NVMLError:
                    continue  # not supported on this board or in this mode
                for proc in procs:
                    if proc.pid not in ours:
                        found.setdefault((index, int(proc.pid)), proc.usedGpuMemory)
    finally:
        _shutdown(nv)
    if not found:
        return result("ok", f"no other processes on the {len(handles)} GPU(s)")
    listed = "; ".join(
        f"GPU {index}: pid {pid} {_process_name(pid)} ({_memory(used)})"
        for (index, pid), used in sorted(found.items())
    )
    return result("warn", f"{listed}: they compete with benchmarks and skew their results")


def _free_gib(path: Path) -> tuple[Path, float]:
    """Free GiB where ``path`` is (or will be: its nearest folder that exists)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free / GIB


def check_disk(ctx: Context) -> Check:
    result = _maker("disk", True)
    home = ctx.paths.home
    where, free = _free_gib(home)
    note = "" if where == home else f" (not created yet; checked {where})"
    detail = f"{free:.1f} GiB free under {home}{note}"
    if free < MIN_HOME_FREE_GIB:
        return result("fail", f"{detail}: spool and job files need {MIN_HOME_FREE_GIB} GiB")
    return result("ok", detail)


def _folder_check(name: str, folder: Path | None, min_gib: float) -> Check:
    result = _maker(name, False)
    if folder is None:
        return result("skip", f"{name} not set in agent.yaml")
    if not folder.is_dir():
        return result("warn", f"{folder} does not exist (or is not a folder)")
    free = shutil.disk_usage(folder).free / GIB
    detail = f"{free:.1f} GiB free under {folder}"
    if free < min_gib:
        return result("warn", f"{detail}: less than {min_gib:g} GiB")
    return result("ok", detail)


def check_models_dir(ctx: Context) -> Check:
    folder = ctx.config.models_dir if ctx.config else None
    return _folder_check("models_dir", folder, MIN_MODELS_FREE_GIB)


def check_datasets_dir(ctx: Context) -> Check:
    folder = ctx.config.datasets_dir if ctx.config else None
    return _folder_check("datasets_dir", folder, 0)


def _server_ca(ctx: Context) -> Path | None:
    """The CA the agent trusts its server with: the one given, agent.yaml's, else the one
    init saved."""
    if ctx.ca is not None:
        return ctx.ca
    cfg = ctx.config
    if cfg is not None and cfg.tls is not None and cfg.tls.ca is not None:
        return cfg.tls.ca
    return ctx.paths.ca if ctx.paths.ca.exists() else None


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _transport_problem(url: str, exc: httpx.TransportError, trust: str) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"unreachable: {url} did not answer within {NETWORK_TIMEOUT_S:g} s"
    verify = _cause(exc, ssl.SSLCertVerificationError)
    if verify is not None:
        reason = getattr(verify, "verify_message", None) or str(verify)
        return (
            f"certificate not trusted: {url} ({reason}; {trust}): get the fleet CA "
            "(`kitt server ca`) and pass --ca FILE or --ca-fingerprint SHA256 to kitt-agent init"
        )
    tls_error = _cause(exc, ssl.SSLError)
    if tls_error is not None:
        return f"TLS handshake with {url} failed ({tls_error}): is it an http:// server?"
    return f"unreachable: {url} ({exc or type(exc).__name__})"


def check_server(ctx: Context) -> Check:
    if ctx.server_url is None:
        return Check("server", False, "skip", "no server URL yet: pass --server URL to check one")
    result = _maker("server", True)
    try:
        url = validate_server_url(ctx.server_url)
    except ValueError as exc:
        return result("fail", f"{ctx.server_url}: {exc}")
    https = url.startswith("https://")
    ca = _server_ca(ctx) if https else None
    trust = f"trusting {ca}" if ca is not None else "system trust store"
    try:
        with build_client(url, tls=TlsFiles(ca=ca), timeout=NETWORK_TIMEOUT_S) as client:
            response = client.get("/api/v1/health")
    except pki.PkiError as exc:
        return result("fail", str(exc))
    except httpx.TransportError as exc:
        return result("fail", _transport_problem(url, exc, trust))
    if response.status_code != 200:
        answer = f"HTTP {response.status_code}: {error_message(response)}"
        return result("fail", f"{url}/api/v1/health answered {answer}")
    try:
        health = Health.model_validate_json(response.content)
    except ValueError:
        return result("fail", f"{url} answered, but not as a KITT server")
    ctx.server_version = health.version
    return result("ok", f"{url} reachable, KITT {health.version}" + (f", {trust}" if https else ""))


def check_version(ctx: Context) -> Check:
    result = _maker("version", False)
    server = ctx.server_version
    if server is None:
        return result("skip", "server not reached")
    if server != __version__:
        return result("warn", f"agent {__version__}, server {server}: run kitt-agent update")
    return result("ok", f"agent and server both run KITT {server}")


def _listens_on(pid: int, port: int) -> bool | None:
    """Whether ``pid`` listens on ``port``; None when the system will not tell us."""
    try:
        proc: Any = psutil.Process(pid)
        # psutil >= 6 calls it net_connections; older releases, connections.
        conns = (getattr(proc, "net_connections", None) or proc.connections)(kind="inet")
    except psutil.AccessDenied:
        return None
    except psutil.Error:
        return False
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in conns)


def _port_holder(port: int) -> str | None:
    """Who holds ``port``, where the system tells (other users' sockets show no pid)."""
    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.Error, OSError):
        return None
    for conn in sorted(conns, key=lambda c: c.status != psutil.CONN_LISTEN):
        if conn.laddr and conn.laddr.port == port and conn.pid and not conn.raddr:
            return f"pid {conn.pid} ({_process_name(conn.pid)})"
    return None


def _bind_error(ctx: Context) -> OSError | None:
    """Try to bind the agent's address and port as its listener would; the error if any."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        ctx.bind or None, ctx.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as sock:
        # As the daemon's listener (cheroot) does: connections of a previous run left in
        # TIME_WAIT do not keep the agent from listening; only a live socket does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            return exc
    return None


def check_port(ctx: Context) -> Check:
    result = _maker("port", True)
    where = f"port {ctx.port} on {ctx.bind}"
    try:
        error = _bind_error(ctx)
    except socket.gaierror as exc:
        return result("fail", f"bind address {ctx.bind!r} does not resolve: {exc}")
    if error is None:
        return result("ok", f"{where} is free")
    if error.errno == errno.EADDRNOTAVAIL:
        return result("fail", f"{ctx.bind} is not an address of this machine")
    if error.errno == errno.EACCES:
        return result("fail", f"not allowed to listen on {where} (ports below 1024 need root)")
    if error.errno != errno.EADDRINUSE:
        return result("fail", f"cannot listen on {where}: {error.strerror or error}")
    st = pid_state(ctx.paths.pid)
    if st.state == "running" and st.pid is not None and _listens_on(st.pid, ctx.port) is not False:
        return result("ok", f"{where} in use by this agent, pid {st.pid}")
    holder = _port_holder(ctx.port) or "another program"
    fix = "stop it, or give the agent another port (kitt-agent init --port P)"
    return result("fail", f"{where} is in use by {holder}: {fix}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def _version_text(spec: EngineSpec, output: str) -> str:
    if spec.version_regex is None:
        return _last_line(output) if output.strip() else "unknown"
    match = re.search(spec.version_regex, output)
    return spec.version_prefix + match.group(1) if match else "unknown"


def check_engine(spec: EngineSpec) -> Check:
    """An engine agent.yaml configures: its binary is there and answers its version command
    (and its check command, where the definition has one)."""
    result = _maker(f"engine {spec.name}", True)
    binary = find_binary(spec)
    if binary is None:
        where = "is not an executable file" if os.path.isabs(spec.binary) else "is not on PATH"
        return result("fail", f"binary {spec.binary} {where}")
    output = ""
    for command in (spec.check_command, spec.version_command):
        if command is None:
            continue
        # Filled in as engine_version() does: {binary} only, each item one argument.
        argv = [item.replace("{binary}", binary) for item in command]
        shown = " ".join(argv)[:200]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, errors="replace", check=False,
                timeout=ENGINE_TIMEOUT_S, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            # The binary is there but slow to answer (vLLM imports torch first): warn
            # rather than keep a working agent from starting.
            return result("warn", f"`{shown}` did not answer within {ENGINE_TIMEOUT_S:g} s")
        except OSError as exc:
            return result("fail", f"cannot run {binary}: {exc.strerror or exc}")
        if done.returncode != 0:
            said = _last_line(done.stderr + "\n" + done.stdout)
            return result("fail", f"`{shown}` exited {done.returncode}: {said}")
        output = done.stdout + "\n" + done.stderr
    if spec.version_command is None:
        return result("ok", f"{binary} (no version command defined)")
    return result("ok", f"{binary}, version {_version_text(spec, output)}")


def _shipped_engines(specs: Mapping[str, EngineSpec]) -> Check:
    result = _maker("shipped engines", False)
    installed = available_engines(specs)
    missing = sorted(set(specs) - set(installed))
    parts = [f"{what}: {', '.join(names)}" for what, names in
             (("installed", installed), ("not installed", missing)) if names]  # fmt: skip
    if not installed:
        return result("warn", f"{'; '.join(parts)} (engines.NAME.binary in agent.yaml)")
    return result("ok", "; ".join(parts))


def check_engines(ctx: Context) -> list[Check]:
    """Engines agent.yaml configures are required to work; the shipped ones it does not
    mention are listed as installed or not (advisory: an agent may run none of them)."""
    overrides = ctx.config.engines if ctx.config else {}
    specs = load_engines(overrides)
    checks = [check_engine(specs[name]) for name in sorted(overrides)]
    shipped = {n: s for n, s in specs.items() if n in shipped_engines() and n not in overrides}
    if shipped:
        checks.append(_shipped_engines(shipped))
    return checks


def check_systemd(ctx: Context) -> Check:
    """The same test ``kitt-agent service install`` applies (``systemctl
    is-system-running``), so that preflight and the install never disagree."""
    result = _maker("systemd", ctx.service)
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        problem = "no systemctl on PATH"
    else:
        try:
            state = Systemctl(systemctl).require_running()
        except ServiceError as exc:
            problem = str(exc)
        else:
            return result("ok", f"systemd is {state} ({systemctl})")
    if ctx.service:
        return result("fail", f"{problem}: cannot install the service; use kitt-agent start")
    return result("warn", f"{problem}: kitt-agent service install will not work here")


# --- running them --------------------------------------------------------------------------

CheckFn = Callable[[Context], "Check | list[Check]"]


def _guarded(name: str, required: bool, fn: CheckFn, ctx: Context, limit: float) -> list[Check]:
    """Run one check on its own thread: bounded in time, and never raising."""
    box: list[Check | list[Check] | BaseException] = []

    def target() -> None:
        try:
            box.append(fn(ctx))
        except Exception as exc:
            box.append(exc)

    thread = threading.Thread(target=target, name=f"preflight-{name}", daemon=True)
    thread.start()
    thread.join(limit)
    bad: Status = "fail" if required else "warn"
    if not box:
        return [Check(name, required, bad, f"did not finish within {limit:g} s")]
    outcome = box[0]
    if isinstance(outcome, BaseException):
        return [Check(name, required, bad, f"check failed: {type(outcome).__name__}: {outcome}")]
    return outcome if isinstance(outcome, list) else [outcome]


def run_preflight(ctx: Context | None = None) -> list[Check]:
    """All checks, in table order, for ``ctx`` (:func:`load_context`; default: this
    agent's own config)."""
    ctx = ctx or load_context()
    engines = len(ctx.config.engines) if ctx.config else 0
    plan: list[tuple[str, bool, CheckFn, float]] = [
        ("python", True, check_python, 5),
        ("config", ctx.config_required, check_config, 10),
        ("certificate", False, check_certificate, 5),
        ("nvml", False, check_nvml, 20),
        ("gpu processes", False, check_gpu_processes, 20),
        ("disk", True, check_disk, 10),
        ("models_dir", False, check_models_dir, 10),
        ("datasets_dir", False, check_datasets_dir, 10),
        ("server", ctx.server_url is not None, check_server, 3 * NETWORK_TIMEOUT_S),
        ("version", False, check_version, 1),
        ("port", True, check_port, 10),
        ("engines", engines > 0, check_engines, 2.5 * ENGINE_TIMEOUT_S * (engines + 2)),
        ("systemd", ctx.service, check_systemd, 5),
    ]
    checks: list[Check] = []
    for name, required, fn, limit in plan:
        checks.extend(_guarded(name, required, fn, ctx, limit))
    return checks
