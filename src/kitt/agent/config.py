"""``agent.yaml``: loading with field-naming errors, and atomic 0600 updates by ``init``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kitt.bench.engines import EngineOverride, load_engines
from kitt.errors import ConfigError, NotConfiguredError
from kitt.paths import write_private
from kitt.protocol import AgentName, BenchmarkName, describe_config_error
from kitt.urls import validate_server_url

EngineName = BenchmarkName  # same rule: letters, digits, . _ - (e.g. "llama.cpp")

DEFAULT_AGENT_PORT = 8090


class TlsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None


class CustomBenchmark(BaseModel):
    """An operator's own benchmark: the agent runs ``command`` (an argv list, no shell).

    The run gets its parameters as ``KITT_PARAM_<NAME>`` variables and as JSON in the
    file named by ``KITT_PARAMS_FILE``; if it writes a JSON object to ``result_file``
    (default: the path in ``KITT_RESULT_FILE``), that object becomes the test's result.
    """

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(min_length=1)
    timeout_s: float = Field(default=3600.0, gt=0)
    result_file: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)
    description: str | None = None


class AgentConfig(BaseModel):
    """The agent's config. Unknown top-level keys are rejected: a misspelt key that is
    silently ignored is worse than a start that names it."""

    model_config = ConfigDict(extra="forbid")

    name: AgentName
    server_url: str
    token: str | None = None
    port: int = Field(default=DEFAULT_AGENT_PORT, ge=1, le=65535)
    bind: str = "0.0.0.0"
    tls: TlsConfig | None = None
    backoff_max_s: float = Field(default=60.0, gt=0, le=3600)
    log_buffer_lines: int = Field(default=10_000, ge=100, le=10_000_000)
    log_level: str = Field(default="INFO", pattern=r"^(?i:debug|info|warning|error)$")
    # Engines: key-by-key overrides of the shipped definitions, or new engines (see
    # kitt/bench/engines.yaml). Model names from tests resolve under models_dir; paths
    # outside it are refused unless allow_any_model_path is set.
    engines: dict[EngineName, EngineOverride] = Field(default_factory=dict)
    models_dir: Path | None = None
    allow_any_model_path: bool = False
    # What a `serving` test from the server may point the agent at: dataset files only
    # under datasets_dir; engines it did not start only on this host or at the listed
    # base URLs.
    datasets_dir: Path | None = None
    allowed_endpoints: list[str] = Field(default_factory=list, max_length=256)
    benchmarks: dict[BenchmarkName, CustomBenchmark] = Field(default_factory=dict)

    @field_validator("server_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return validate_server_url(value)

    @field_validator("engines")
    @classmethod
    def _engines(cls, value: dict[str, EngineOverride]) -> dict[str, EngineOverride]:
        # Merged with the shipped definitions, each engine must be complete and valid:
        # an agent that starts is an agent whose engines can start.
        try:
            load_engines(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("models_dir", "datasets_dir")
    @classmethod
    def _models_dir(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value


def read_raw(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotConfiguredError(
            f"no agent config at {path}: run `kitt-agent init --server URL` first"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def validate(data: dict[str, Any], path: Path) -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_config_error(exc)}") from None


def load_config(path: Path) -> AgentConfig:
    return validate(read_raw(path), path)


def update_config(path: Path, changes: dict[str, Any]) -> AgentConfig:
    """Merge ``changes`` into the file (other keys untouched), validate, write atomically."""
    data = read_raw(path) if path.exists() else {}
    data.update({k: v for k, v in changes.items() if v is not None})
    config = validate(data, path)
    data["server_url"] = config.server_url
    write_private(path, yaml.safe_dump(data, sort_keys=False))
    return config
