"""Wire models for protocol v1 (ARCHITECTURE.md §4).

This module is the only place a payload shape is defined; the server, the agent and
the fleet client all import from here. Inbound models ignore unknown fields so that a
newer agent can talk to an older server (and the reverse) without a lockstep upgrade.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

MAX_BODY_BYTES = 1024 * 1024
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ID_RE = re.compile(ID_PATTERN)
DEFAULT_HEARTBEAT_INTERVAL_S = 30.0
MISSED_HEARTBEATS_OFFLINE = 3

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
# Agent names become certificate CNs and unit names later: keep them to the id alphabet
# plus dots so that a hostname such as "gpu-01.lab" is accepted as is.
AGENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
AGENT_NAME_RE = re.compile(AGENT_NAME_PATTERN)
AgentName = Annotated[str, StringConstraints(pattern=AGENT_NAME_PATTERN)]
ShortText = Annotated[str, StringConstraints(max_length=256)]


def _integral_float(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Requests are parsed strictly (``true`` or ``"1"`` is not a number), but JSON has one
# number type: 8090.0 is the integer 8090, as JSON Schema (and the OpenAPI document) say.
JsonInt = Annotated[int, BeforeValidator(_integral_float)]
AgentRunState = Literal["idle", "running", "error"]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class Health(WireModel):
    status: Literal["ok"] = "ok"
    version: str


class AgentPackageInfo(WireModel):
    """``GET /api/v1/agent/package.json``: what the installer and ``kitt-agent update``
    download, and the SHA-256 they must find before installing it."""

    name: str
    version: str
    filename: str
    sha256: str
    size: JsonInt
    server_version: str
    server_url: str
    wheelhouse: bool
    install_sh_sha256: str


class TelemetryModel(WireModel):
    """What an agent reports about its machine. A non-finite reading (a driver's glitch,
    or a forged heartbeat) becomes "no reading": Infinity or NaN would otherwise be
    stored, and break the JSON every dashboard parses."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value


class GpuStatic(TelemetryModel):
    index: JsonInt = Field(ge=0)
    name: ShortText
    uuid: ShortText | None = None
    memory_total_gb: float | None = Field(default=None, ge=0)


class Hardware(TelemetryModel):
    """Facts that do not change while the agent runs; sent at registration."""

    cpu_model: ShortText | None = None
    cpu_cores: int | None = Field(default=None, ge=0)
    ram_gb: float | None = Field(default=None, ge=0)
    os: ShortText | None = None
    python: ShortText | None = None
    gpu_driver_version: ShortText | None = None
    cuda_version: ShortText | None = None
    gpus: list[GpuStatic] = Field(default_factory=list, max_length=64)

    # (not JsonInt: a validator on a union member loses "minimum" in the JSON schema)
    _integral_cores = field_validator("cpu_cores", mode="before")(_integral_float)


class RegisterRequest(TelemetryModel):
    name: AgentName
    hostname: ShortText
    port: JsonInt = Field(ge=1, le=65535)
    kitt_version: ShortText
    gpu_info: ShortText | None = None
    gpu_count: JsonInt = Field(default=0, ge=0, le=64)
    cpu_info: ShortText | None = None
    ram_gb: float | None = Field(default=None, ge=0)
    hardware: Hardware = Field(default_factory=Hardware)
    capabilities: list[ShortText] = Field(default_factory=list, max_length=256)


class RegisterResponse(WireModel):
    agent_id: Id
    heartbeat_interval_s: float
    token: str | None = None
    # The agent's settings pushed by the server (see AgentSettings), applied at once.
    settings: dict[str, Any] = Field(default_factory=dict)


class GpuSample(TelemetryModel):
    index: JsonInt = Field(ge=0)
    name: ShortText | None = None
    utilization_pct: float | None = Field(default=None, ge=0, le=100)
    memory_used_gb: float | None = Field(default=None, ge=0)
    memory_total_gb: float | None = Field(default=None, ge=0)
    temperature_c: float | None = None
    power_w: float | None = Field(default=None, ge=0)


class Heartbeat(TelemetryModel):
    status: AgentRunState
    current_task: ShortText | None = None
    gpu_utilization_pct: float | None = Field(default=None, ge=0, le=100)
    gpu_memory_used_gb: float | None = Field(default=None, ge=0)
    uptime_s: float = Field(ge=0)
    gpus: list[GpuSample] = Field(default_factory=list, max_length=64)
    cpu_percent: float | None = Field(default=None, ge=0)
    ram_used_gb: float | None = Field(default=None, ge=0)
    kitt_version: ShortText | None = None


class HeartbeatResponse(WireModel):
    ack: bool = True
    heartbeat_interval_s: float
    commands: list[dict[str, Any]] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)


class AgentStatusReport(WireModel):
    """The agent's own ``GET /api/status``: no secrets, safe to serve unauthenticated."""

    name: str
    agent_id: str | None
    status: AgentRunState
    running: bool
    current_task: str | None
    uptime_s: float
    version: str
    server_url: str
    registered: bool
    last_heartbeat_ok: datetime | None
    last_error: str | None = None
    pid: int
    # Settings in force (pushed by the server, else defaults), flat as in AgentSettings.
    settings: dict[str, Any] = Field(default_factory=dict)


FleetState = Literal["offline", "idle", "running", "error"]


class AgentSummary(WireModel):
    id: str
    name: str
    hostname: str
    address: str | None
    port: int
    state: FleetState
    online: bool
    status: AgentRunState
    current_task: str | None
    kitt_version: str
    gpu_info: str | None
    gpu_count: int
    gpu_utilization_pct: float | None
    gpu_memory_used_gb: float | None
    registered_at: datetime
    last_seen_at: datetime | None
    # When the agent's certificate expires (TLS servers), and whether its token is revoked.
    cert_expires_at: datetime | None = None
    revoked: bool = False


class AgentDetail(AgentSummary):
    cpu_info: str | None
    ram_gb: float | None
    hardware: Hardware
    capabilities: list[str]
    uptime_s: float | None
    cpu_percent: float | None
    ram_used_gb: float | None
    gpus: list[GpuSample]


class HeartbeatRecord(WireModel):
    ts: datetime
    status: AgentRunState
    current_task: str | None
    uptime_s: float
    gpu_utilization_pct: float | None
    gpu_memory_used_gb: float | None
    cpu_percent: float | None
    ram_used_gb: float | None
    gpus: list[GpuSample]


# --- security: enrollment, renewal, bootstrap tokens (ARCHITECTURE.md §6) ----------------

PemText = Annotated[str, StringConstraints(min_length=1, max_length=16_384)]
TokenNote = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9 ._:@/+()-]{0,120}$")]
MAX_TOKEN_TTL_S = 366 * 24 * 3600.0


class EnrollRequest(WireModel):
    """``POST /api/v1/agents/enroll`` with a bootstrap token: the CSR the agent made itself."""

    name: AgentName
    csr_pem: PemText


class CertificateIssued(WireModel):
    cert_pem: str
    ca_pem: str
    not_after: datetime


class EnrollResponse(CertificateIssued):
    """The signed certificate and the agent's own token (returned once, stored hashed)."""

    name: str
    token: str


class RenewRequest(WireModel):
    """``POST /api/v1/agents/renew``, authenticated by the agent's current cert and token."""

    csr_pem: PemText


class TokenCreate(WireModel):
    """``POST /api/v1/tokens``: a bootstrap token for enrolling agents."""

    ttl_s: float = Field(default=3600.0, gt=0, le=MAX_TOKEN_TTL_S)
    uses: JsonInt = Field(default=1, ge=1, le=100_000)
    note: TokenNote | None = None


TokenState = Literal["active", "expired", "used", "revoked"]


class TokenInfo(WireModel):
    id: str
    state: TokenState
    created_at: datetime
    expires_at: datetime
    max_uses: int
    uses: int
    note: str | None = None


class TokenCreated(TokenInfo):
    token: str


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming every bad field, e.g. ``gpus.0.index: Input should be a valid integer``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


def describe_config_error(exc: ValidationError, missing: str | None = None) -> str:
    """The same for a file or parameters a person wrote: ``field 'x': …``, and a misspelt
    key is called that (``missing`` replaces pydantic's "Field required" where given)."""
    parts = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        elif err["type"] == "missing" and missing is not None:
            msg = missing
        parts.append(f"field '{field}': {msg}")
    return "; ".join(parts)


# --- tests and commands (ARCHITECTURE.md §4 "Dispatch", §5 "States") ---------------------

TestStatus = Literal["queued", "dispatched", "running", "completed", "failed", "cancelled", "lost"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled", "lost"})
BenchmarkName = Annotated[str, StringConstraints(pattern=AGENT_NAME_PATTERN)]
ParamKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")]
ParamValue = str | int | float | bool | None


def param_value(raw: str) -> ParamValue:
    """A parameter value as a user typed it (``--param k=v``, the dashboard's form): a
    number, boolean or null when it reads as one in JSON, else the text itself."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(value, float) and not math.isfinite(value):
        return raw  # NaN / Infinity are not JSON: keep the text
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return raw


ANY_AGENT = "any"
SERVING_BENCHMARK = "serving"  # built in: every agent offers it (kitt bench serve)


class TestRequest(WireModel):
    """``POST /api/v1/tests``. ``agent`` is a name, an id, or ``any`` (an idle online agent,
    optionally one whose GPU description contains ``gpu``)."""

    __test__ = False  # not a pytest test class, despite the name

    agent: ShortText
    benchmark: BenchmarkName
    engine: ShortText | None = None
    model: ShortText | None = None
    params: dict[ParamKey, ParamValue] = Field(default_factory=dict, max_length=64)
    gpu: ShortText | None = None


class RunTestPayload(WireModel):
    """What a ``run_test`` command carries: names and values, never a command line."""

    benchmark: BenchmarkName
    engine: ShortText | None = None
    model: ShortText | None = None
    params: dict[ParamKey, ParamValue] = Field(default_factory=dict, max_length=64)


class Command(WireModel):
    command_id: Id
    type: Literal["run_test", "cancel"]
    test_id: Id
    payload: dict[str, Any] = Field(default_factory=dict)


class CommandAccepted(WireModel):
    accepted: bool = True
    command_id: str


class TestStatusReport(WireModel):
    """``POST /api/v1/agents/<id>/tests/<test_id>/status`` (idempotent)."""

    __test__ = False  # not a pytest test class, despite the name

    status: Literal["running", "completed", "failed", "cancelled"]
    error: Annotated[str, StringConstraints(max_length=4096)] | None = None
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None


class ResultReport(WireModel):
    """``POST /api/v1/agents/<id>/results`` (idempotent by ``command_id``)."""

    command_id: Id
    test_id: Id
    status: Literal["completed", "failed", "cancelled"]
    result: dict[str, Any] | None = None
    error: Annotated[str, StringConstraints(max_length=4096)] | None = None
    finished_at: AwareDatetime | None = None


class TestInfo(WireModel):
    __test__ = False  # not a pytest test class, despite the name
    id: str
    agent_id: str | None
    agent_name: str
    benchmark: str
    engine: str | None
    model: str | None
    params: dict[str, Any]
    status: TestStatus
    error: str | None
    command_id: str
    cancel_requested: bool
    created_at: datetime
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, Any] | None = None


MAX_SEQ = 2**62  # fits a signed 64-bit column on every database


class LogLineIn(WireModel):
    seq: JsonInt = Field(ge=1, le=MAX_SEQ)
    ts: Annotated[str, StringConstraints(max_length=40)]
    line: Annotated[str, StringConstraints(max_length=16384)]


class LogBatch(WireModel):
    """``POST /api/v1/agents/<id>/tests/<test_id>/logs``: idempotent by ``seq``."""

    lines: list[LogLineIn] = Field(min_length=1, max_length=5000)


# --- results: serving benchmark documents stored on the server (docs/design-bench.md) ----

RESULT_SCHEMA_VERSION = 1
SERVING_RESULT_KIND = "kitt.serving"
ResultSource = Literal["fleet", "import"]
# A metric: any finite JSON number, or null when the run could not measure it (e.g. TTFT
# when every request failed). NaN and Infinity are not JSON and are refused earlier.
Metric = Annotated[float, Field(allow_inf_nan=False)] | None
# Indexed columns of ``bench_results``, as named in the document's ``summary``.
SUMMARY_METRICS: tuple[str, ...] = (
    "best_output_token_throughput",
    "request_throughput",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "tpot_ms_p50",
    "tpot_ms_p99",
    "itl_ms_p50",
    "e2e_ms_p50",
    "goodput",
    "error_rate",
)


class ResultSummary(WireModel):
    """The document's ``summary``: the step with the best output throughput."""

    best_output_token_throughput: Metric = None
    best_step: ShortText | None = None
    request_throughput: Metric = None
    ttft_ms_p50: Metric = None
    ttft_ms_p99: Metric = None
    tpot_ms_p50: Metric = None
    tpot_ms_p99: Metric = None
    itl_ms_p50: Metric = None
    e2e_ms_p50: Metric = None
    goodput: Metric = None
    error_rate: Metric = None


class ResultConfigRef(WireModel):
    """The part of ``config`` the server indexes; the rest is kept, unread."""

    model: ShortText | None = None


class ResultEngineRef(WireModel):
    name: ShortText | None = None
    version: ShortText | None = None


class ResultHardwareRef(WireModel):
    hostname: ShortText | None = None
    gpu_model: ShortText | None = None
    gpu_count: int | None = Field(default=None, ge=0, le=100_000)
    fingerprint: ShortText | None = None

    # (not JsonInt: a validator on a union member loses "minimum" in the JSON schema)
    _integral_count = field_validator("gpu_count", mode="before")(_integral_float)


class ResultStep(WireModel):
    """One measured step; only its name is required to index and compare by it."""

    name: ShortText
    load: dict[str, Any] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class ResultDocument(WireModel):
    """What ``POST /api/v1/results`` accepts: a ``kitt bench serve --output`` document.

    Only what the server indexes or the CLI reads by position is checked; the document
    is stored as sent, every other field included, so nothing nested is ever lost.
    """

    schema_version: Annotated[Literal[1], BeforeValidator(_integral_float)]
    kind: Literal["kitt.serving"]
    kitt_version: ShortText | None = None
    started_at: ShortText | None = None
    finished_at: ShortText | None = None
    config: ResultConfigRef = Field(default_factory=ResultConfigRef)
    engine: ResultEngineRef | None = None
    hardware: ResultHardwareRef | None = None
    steps: list[ResultStep] = Field(default_factory=list, max_length=10_000)
    repeats: list[dict[str, Any]] | None = Field(default=None, max_length=10_000)
    summary: ResultSummary
    telemetry: dict[str, Any] | None = None
    warnings: list[Annotated[str, StringConstraints(max_length=4096)]] | None = Field(
        default=None, max_length=10_000
    )


class ResultRow(WireModel):
    """One stored result as listed: the indexed fields, not the document."""

    id: str
    test_id: str | None
    source: ResultSource
    agent_name: str | None
    model: str | None
    engine: str | None
    engine_version: str | None
    gpu_model: str | None
    gpu_count: int | None
    hardware_fingerprint: str | None
    created_at: datetime
    best_step: str | None
    best_output_token_throughput: Metric
    request_throughput: Metric
    ttft_ms_p50: Metric
    ttft_ms_p99: Metric
    tpot_ms_p50: Metric
    tpot_ms_p99: Metric
    itl_ms_p50: Metric
    e2e_ms_p50: Metric
    goodput: Metric
    error_rate: Metric


class ResultDetail(ResultRow):
    """One stored result with its whole document, exactly as it was received."""

    document: dict[str, Any]


class ResultImported(WireModel):
    """``POST /api/v1/results``: the id, and False when that very document was stored."""

    id: str
    created: bool


# --- agent settings pushed by the server (issue 6) ---------------------------------------
#
# Per-agent settings edited on the server (``kitt agents set``) travel flat, as the user
# types them: ``{"heartbeat_interval_s": 5, "engines.llama.cpp.startup_timeout_s": 600}``
# (an engine name may itself contain dots, so an engine key's field is its last part).
# Only tuning values are pushable: anything that names a file, a program or a network
# peer stays in the agent's own agent.yaml, so the server cannot point an agent at
# arbitrary files or commands.

DEFAULT_LOG_BATCH_LINES = 500  # lines per log report an agent ships (LogShipper)
DEFAULT_TELEMETRY_INTERVAL_S = 1.0  # GPU sample interval of a serving run (ServeParams)
ENGINE_SETTING_PREFIX = "engines."
SETTING_RANGES: dict[str, tuple[float, float]] = {
    "heartbeat_interval_s": (5.0, 300.0),
    "log_batch_lines": (1, 5000),
    "telemetry_interval_s": (0.1, 60.0),
    "startup_timeout_s": (1.0, 7200.0),  # per engine: engines.<engine>.startup_timeout_s
}
SETTING_KEYS = ("heartbeat_interval_s", "log_batch_lines", "telemetry_interval_s")
ENGINE_SETTING_FIELDS = ("startup_timeout_s",)
VALID_SETTING_KEYS = (*SETTING_KEYS, "engines.<engine>.startup_timeout_s")
# agent.yaml's top-level keys and an engine entry's other fields: never pushable (a test
# keeps these lists equal to AgentConfig's and EngineOverride's fields).
LOCAL_ONLY_KEYS = frozenset({
    "name", "server_url", "token", "port", "bind", "tls", "backoff_max_s", "log_buffer_lines",
    "log_level", "engines", "models_dir", "allow_any_model_path", "datasets_dir",
    "allowed_endpoints", "benchmarks",
})  # fmt: skip
LOCAL_ONLY_ENGINE_FIELDS = frozenset({
    "description", "binary", "argv", "env", "health_path", "completions_path", "chat_path",
    "default_port", "model_kind", "stop_grace_s", "version_command", "version_regex",
    "version_prefix", "version_timeout_s", "check_command", "force_output_len", "allow_args",
})  # fmt: skip


def _setting(name: str) -> Any:
    low, high = SETTING_RANGES[name]
    return Field(default=None, ge=low, le=high)


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    startup_timeout_s: float | None = _setting("startup_timeout_s")


class AgentSettings(BaseModel):
    """What the server may set on one agent; ``None`` (or absent): the default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    heartbeat_interval_s: float | None = _setting("heartbeat_interval_s")
    log_batch_lines: JsonInt | None = _setting("log_batch_lines")
    telemetry_interval_s: float | None = _setting("telemetry_interval_s")
    engines: dict[AgentName, EngineSettings] = Field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """The settings that are set, keyed as users and the wire name them."""
        out: dict[str, Any] = {}
        for key in SETTING_KEYS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for engine, fields in sorted(self.engines.items()):
            for name, value in fields.model_dump(exclude_none=True).items():
                out[f"{ENGINE_SETTING_PREFIX}{engine}.{name}"] = value
        return out

    def effective(self, heartbeat_interval_s: float) -> dict[str, Any]:
        """Every value in force, defaults filled in (``heartbeat_interval_s``: the server's)."""
        return {
            "heartbeat_interval_s": self.heartbeat_interval_s or heartbeat_interval_s,
            "log_batch_lines": self.log_batch_lines or DEFAULT_LOG_BATCH_LINES,
            "telemetry_interval_s": self.telemetry_interval_s or DEFAULT_TELEMETRY_INTERVAL_S,
            **{k: v for k, v in self.flat().items() if k.startswith(ENGINE_SETTING_PREFIX)},
        }


class SettingsError(ValueError):
    """A pushed setting that is unknown, local to the agent, or out of range."""


def split_engine_key(key: str) -> tuple[str, str] | None:
    """``engines.llama.cpp.startup_timeout_s`` → ``("llama.cpp", "startup_timeout_s")``."""
    rest = key.removeprefix(ENGINE_SETTING_PREFIX)
    if rest == key or "." not in rest:
        return None
    engine, _, field = rest.rpartition(".")
    return (engine, field) if engine else None


def setting_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be pushed (unknown, or local to the agent), or None."""
    shown = key if len(key) <= 80 else key[:80] + "…"
    if key in SETTING_KEYS:
        return None
    engine_key = split_engine_key(key)
    if engine_key is not None:
        engine, field = engine_key
        if field in ENGINE_SETTING_FIELDS:
            return None
        if field in LOCAL_ONLY_ENGINE_FIELDS:
            return (
                f"'{shown}' is local to the agent: it is set in the agent's agent.yaml "
                f"(engines: {engine}: {field}), never by the server"
            )
    if key.split(".", 1)[0] in LOCAL_ONLY_KEYS:
        return (
            f"'{shown}' is local to the agent: it is set in the agent's agent.yaml, "
            "never by the server"
        )
    return f"unknown setting '{shown}' (valid keys: {', '.join(VALID_SETTING_KEYS)})"


def _describe_setting_error(key: str, err: Any) -> str:
    field = key.rpartition(".")[2]
    if err["type"] in ("greater_than_equal", "less_than_equal") and field in SETTING_RANGES:
        low, high = SETTING_RANGES[field]
        return f"{key} must be between {low:g} and {high:g}, got {err['input']!r}"
    if err["type"] == "string_pattern_mismatch":
        return f"{key}: not a valid engine name"
    return f"{key}: {err['msg']}, got {err['input']!r}"


def parse_settings(flat: Mapping[str, Any]) -> AgentSettings:
    """Flat settings (as sent: no nulls) checked strictly (``true`` or ``"5"`` is not a
    number). Raises SettingsError naming every bad key."""
    problems = [p for p in (setting_key_problem(k) for k in flat) if p is not None]
    if problems:
        raise SettingsError("; ".join(problems))
    nested: dict[str, Any] = {}
    keys: dict[tuple[str, ...], str] = {}
    for key, value in flat.items():
        engine_key = split_engine_key(key)
        if engine_key is None:
            nested[key] = value
            keys[(key,)] = key
        else:
            engine, field = engine_key
            nested.setdefault("engines", {}).setdefault(engine, {})[field] = value
            keys["engines", engine, field] = key
            keys["engines", engine] = key
    try:
        return AgentSettings.model_validate(nested, strict=True)
    except ValidationError as exc:
        messages = []
        for err in exc.errors(include_url=False):
            loc = tuple(str(p) for p in err["loc"])
            key = keys.get(loc) or keys.get(loc[:2]) or ".".join(loc)
            messages.append(_describe_setting_error(key, err))
        raise SettingsError("; ".join(messages)) from None


def parse_settings_leniently(flat: Mapping[str, Any]) -> tuple[AgentSettings, list[str]]:
    """The valid settings of ``flat``, and why each other one was left out: for a reader
    that must carry on (an agent applying what a server sent) rather than refuse it all."""
    good: dict[str, Any] = {}
    problems = []
    for key, value in flat.items():
        if value is None:
            continue
        try:
            parse_settings({key: value})
        except SettingsError as exc:
            problems.append(str(exc))
        else:
            good[key] = value
    return parse_settings(good), problems


class SettingsPatch(BaseModel):
    """``PATCH /api/v1/agents/<id>/settings``: ``{key: value}``, ``null`` resets a key."""

    model_config = ConfigDict(extra="allow")


class AgentSettingsView(WireModel):
    """An agent's settings: those set on the server, and every value in force."""

    settings: dict[str, Any]
    effective: dict[str, Any]
