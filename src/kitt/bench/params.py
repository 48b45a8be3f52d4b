"""The serving benchmark's parameters: one model for ``kitt bench serve`` options, for the
``params`` of a ``run_test`` (flat names and scalar values, as the wire allows), and for
the config section of the result document.

The agent validates a run_test's params against this model when it accepts the command,
so a typo'd parameter is a 400 at submission, not a failed test minutes later.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kitt.bench.metrics import Slo
from kitt.errors import KittError
from kitt.protocol import (
    DEFAULT_TELEMETRY_INTERVAL_S,
    SETTING_RANGES,
    describe_config_error,
)
from kitt.urls import is_loopback

DEFAULT_NUM_PROMPTS = 200


class ParamsError(KittError):
    """Benchmark parameters that cannot run."""

    exit_code = 2


MAX_LEVELS = 64
MAX_CONCURRENCY = 100_000
MAX_RATE = 1_000_000.0


def _levels(value: str | int | float | None, kind: type[int] | type[float]) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, int | float) and not isinstance(value, bool):
        items: list[Any] = [value]
    else:
        items = [p.strip() for p in str(value).split(",") if p.strip()]
    out = []
    for item in items:
        try:
            number = kind(item)
        except (TypeError, ValueError):
            raise ValueError(f"{item!r} is not a number") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"{item!r} is not a finite number")
        if number <= 0:
            raise ValueError(f"{item!r} must be > 0")
        limit = MAX_CONCURRENCY if kind is int else MAX_RATE
        if number > limit:
            raise ValueError(f"{item!r} is above the limit of {limit:g}")
        out.append(number)
    if not out:
        raise ValueError("give at least one value")
    if len(out) > MAX_LEVELS:
        raise ValueError(f"{len(out)} levels; at most {MAX_LEVELS}")
    return out


class ServeParams(BaseModel):
    """Everything a serving benchmark run needs; defaults match ``kitt bench serve``."""

    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)

    endpoint: str | None = Field(default=None, max_length=2048)
    engine: str | None = Field(default=None, max_length=64)
    model: str = Field(min_length=1, max_length=1024)
    served_model: str | None = Field(default=None, max_length=1024)
    api: Literal["completions", "chat"] = "completions"

    concurrency: str | None = None
    rate: str | None = None
    arrival: Literal["poisson", "constant"] = "poisson"
    max_concurrency: int | None = Field(default=None, ge=1, le=100_000)
    sweep: bool = False
    sweep_steps: int = Field(default=5, ge=1, le=50)
    sweep_max_concurrency: int = Field(default=64, ge=1, le=100_000)

    num_prompts: int | None = Field(default=None, ge=1, le=10_000_000)
    duration_s: float | None = Field(default=None, gt=0, le=7 * 86400)
    warmup: int | None = Field(default=None, ge=0, le=1_000_000)
    warmup_s: float | None = Field(default=None, ge=0, le=86400)
    repeat: int = Field(default=1, ge=1, le=100)

    input_len: int = Field(default=128, ge=1, le=1_000_000)
    input_len_std: float = Field(default=0.0, ge=0, le=1_000_000)
    input_len_min: int | None = Field(default=None, ge=1)
    input_len_max: int | None = Field(default=None, ge=1)
    output_len: int = Field(default=128, ge=1, le=1_000_000)
    output_len_std: float = Field(default=0.0, ge=0, le=1_000_000)
    output_len_min: int | None = Field(default=None, ge=1)
    output_len_max: int | None = Field(default=None, ge=1)
    output_len_from_file: bool = False
    dataset: str | None = Field(default=None, max_length=4096)
    seed: int = 0
    calibrate: bool = True

    slo: str | None = None
    ignore_eos: bool | None = None
    min_tokens: bool | None = None
    timeout_s: float = Field(default=600.0, gt=0, le=86400)
    max_connections: int = Field(default=0, ge=0, le=100_000)
    # One definition with what the server may push as an agent's default (protocol.py).
    telemetry_interval_s: float = Field(
        default=DEFAULT_TELEMETRY_INTERVAL_S,
        ge=SETTING_RANGES["telemetry_interval_s"][0],
        le=SETTING_RANGES["telemetry_interval_s"][1],
    )
    engine_timeout_s: float | None = Field(default=None, gt=0, le=7200)
    # Extra engine arguments (shell-style quoting, split here, never run by a shell); the
    # agent accepts them only for engines its agent.yaml marks `allow_args: true`.
    engine_args: str | None = Field(default=None, max_length=4096)

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"cannot split engine_args: {exc}") from None
        return value

    @property
    def engine_argv(self) -> list[str]:
        return shlex.split(self.engine_args) if self.engine_args else []

    @field_validator("concurrency", "rate", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:
        # `--param concurrency=4` arrives as the number 4; "1,4,16" as text.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("concurrency")
    @classmethod
    def _concurrency(cls, value: str | None) -> str | None:
        if value is not None:
            _levels(value, int)
        return value

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            _levels(value, float)
        return value

    @field_validator("slo")
    @classmethod
    def _slo(cls, value: str | None) -> str | None:
        if value is not None:
            parse_slo(value)
        return value

    @model_validator(mode="after")
    def _coherent(self) -> ServeParams:
        if (self.endpoint is None) == (self.engine is None):
            raise ValueError("give either endpoint (a running engine) or engine (one to start)")
        modes = (("concurrency", self.concurrency is not None),
                 ("rate", self.rate is not None), ("sweep", self.sweep))  # fmt: skip
        chosen = [name for name, on in modes if on]
        if len(chosen) > 1:
            raise ValueError(f"choose one load mode, not {' and '.join(chosen)}")
        if self.num_prompts is not None and self.duration_s is not None:
            raise ValueError("stop by num_prompts or by duration_s, not both")
        if self.warmup is not None and self.warmup_s is not None:
            raise ValueError("warm up by warmup (requests) or warmup_s (seconds), not both")
        for name in ("input_len", "output_len"):
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{name}_min {lo} is above {name}_max {hi}")
        return self

    # -- derived ---------------------------------------------------------------------------

    @property
    def concurrency_levels(self) -> list[int]:
        return _levels(self.concurrency, int)

    @property
    def rate_levels(self) -> list[float]:
        return _levels(self.rate, float)

    @property
    def mode(self) -> str:
        if self.sweep:
            return "sweep"
        if self.rate is not None:
            return "rate"
        if self.concurrency is not None:
            return "concurrency"
        return "synchronous"

    @property
    def stop_prompts(self) -> int | None:
        if self.duration_s is not None:
            return self.num_prompts
        return self.num_prompts or DEFAULT_NUM_PROMPTS

    def slo_targets(self) -> Slo:
        return parse_slo(self.slo) if self.slo else Slo()


SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


def parse_slo(text: str) -> Slo:
    """``ttft_ms=500,tpot_ms=50`` → Slo."""
    values: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in SLO_KEYS:
            raise ValueError(
                f"SLO {part.strip()!r}: expected key=value with key one of {', '.join(SLO_KEYS)}"
            )
        try:
            number = float(raw)
        except ValueError:
            raise ValueError(f"SLO {key}: {raw.strip()!r} is not a number") from None
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"SLO {key}: must be a positive number of milliseconds")
        values[key] = number
    if not values:
        raise ValueError("SLO: give at least one of ttft_ms=, tpot_ms=, e2e_ms=")
    return Slo(**values)


def load_params(data: dict[str, Any]) -> ServeParams:
    """Validate, turning pydantic's report into one line that names each bad field."""
    try:
        return ServeParams.model_validate(data)
    except ValidationError as exc:
        raise ParamsError("invalid benchmark parameters: " + describe_config_error(exc)) from None


def agent_policy(
    p: ServeParams, datasets_dir: Path | None, allowed_endpoints: Sequence[str]
) -> ServeParams:
    """What the server may ask of an agent's serving benchmark (ARCHITECTURE.md §6: the
    server names things, the agent decides what they mean on this host).

    - ``dataset``: a file under the agent's ``datasets_dir`` (relative names resolve there;
      no way out of it), else refused — a test must not read the agent's files.
    - ``endpoint``: an engine on this host (loopback), or one of ``allowed_endpoints`` —
      the agent must not become a client of any URL the server names.
    """
    updates: dict[str, Any] = {}
    if p.dataset is not None:
        if datasets_dir is None:
            raise ParamsError(
                "dataset files are refused: this agent has no datasets_dir in agent.yaml"
            )
        root = Path(os.path.abspath(datasets_dir))
        candidate = Path(os.path.normpath(root / p.dataset))
        if ".." in Path(p.dataset).parts or root not in candidate.parents:
            raise ParamsError(
                f"dataset {p.dataset!r} is outside this agent's datasets_dir {root}; refused"
            )
        updates["dataset"] = str(candidate)
    if p.endpoint is not None:
        url = p.endpoint.rstrip("/")
        host = urlsplit(url).hostname or ""
        allowed = {e.rstrip("/") for e in allowed_endpoints}
        if not is_loopback(host) and not any(url == a or url.startswith(a + "/") for a in allowed):
            raise ParamsError(
                f"endpoint {p.endpoint!r} is not on this host and not in this agent's "
                "allowed_endpoints (agent.yaml)"
            )
    return p.model_copy(update=updates) if updates else p
