"""Aggregating one step's request records into the metrics of the result document.

Definitions live in ``docs/metrics.md`` (with the vLLM / GuideLLM / AIPerf names). The
conventions that make numbers comparable across tools are fixed here: percentiles by
linear interpolation between closest ranks (numpy's default, which vLLM uses),
population standard deviation within a step, sample standard deviation across repeats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kitt.bench.records import RequestRecord

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p99_9", 99.9),
)
USAGE_MISMATCH = 0.10  # usage vs counted chunks: warn above 10 %
SHORT_OUTPUT = 0.05  # output shorter than requested by more than 5 %: warn


@dataclass(frozen=True)
class Slo:
    """Service-level objectives; a request is *good* when it meets every one that is set."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None

    def met_by(self, rec: RequestRecord) -> bool:
        if not rec.ok:
            return False  # an error never meets an SLO
        if rec.ttft_ms is None:
            return False
        if self.ttft_ms is not None and rec.ttft_ms > self.ttft_ms:
            return False
        if self.e2e_ms is not None and (rec.e2e_ms is None or rec.e2e_ms > self.e2e_ms):
            return False
        # A one-token output has no TPOT, so it cannot violate a TPOT objective.
        tpot = rec.tpot_ms
        return not (self.tpot_ms is not None and tpot is not None and tpot > self.tpot_ms)

    def as_json(self) -> dict[str, float | None]:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy ``method="linear"``)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def distribution(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """mean, std (population), min, max, p50…p99.9 and count of the non-null values."""
    data = sorted(v for v in values if v is not None)
    out: dict[str, float | int | None] = {"count": len(data)}
    if not data:
        for key in ("mean", "std", "min", "max", *(name for name, _ in PERCENTILES)):
            out[key] = None
        return out
    mean = math.fsum(data) / len(data)
    var = math.fsum((v - mean) ** 2 for v in data) / len(data)
    out.update(mean=_r(mean), std=_r(math.sqrt(var)), min=_r(data[0]), max=_r(data[-1]))
    for name, q in PERCENTILES:
        out[name] = _r(percentile(data, q))
    return out


def _r(value: float) -> float:
    return round(value, 4)


def window(records: Sequence[RequestRecord]) -> tuple[float, float]:
    """The measurement window of a step: first measured request's scheduled time → the end
    of the last measured request to finish (errors included: they occupied the server)."""
    start = min(r.scheduled for r in records)
    ends = [r.end if r.end is not None else (r.sent or r.scheduled) for r in records]
    return start, max(*ends, start)


def step_metrics(records: Sequence[RequestRecord], slo: Slo) -> dict[str, Any]:
    """All metrics of one step from its measured (non-warmup) records."""
    measured = [r for r in records if not r.warmup]
    if not measured:
        raise ValueError("a step needs at least one measured request")
    start, end = window(measured)
    duration = max(end - start, 1e-9)
    ok = [r for r in measured if r.ok]
    errors = len(measured) - len(ok)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.usage_prompt_tokens or 0 for r in ok)
    good = sum(1 for r in measured if slo.met_by(r)) if not slo.empty else None
    itl: list[float] = []
    for r in ok:
        itl.extend(r.itl_ms())
    return {
        "requests": len(measured),
        "completed": len(ok),
        "errors": errors,
        "error_rate": _r(errors / len(measured)),
        "duration_s": _r(duration),
        "request_throughput": _r(len(ok) / duration),
        "output_token_throughput": _r(out_tokens / duration),
        "total_token_throughput": _r((out_tokens + in_tokens) / duration),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "ttft_ms": distribution(r.ttft_ms for r in ok),
        "tpot_ms": distribution(r.tpot_ms for r in ok),
        "itl_ms": distribution(itl),
        "e2e_ms": distribution(r.e2e_ms for r in ok),
        "queue_ms": distribution(r.queue_ms for r in measured),
        "output_tps_per_user": distribution(r.output_tps_per_user for r in ok),
        "goodput": None if good is None else _r(good / duration),
        "good_fraction": None if good is None else _r(good / len(measured)),
        "token_check": token_check(ok),
        "error_kinds": error_kinds(measured),
    }


def token_check(ok: Sequence[RequestRecord]) -> dict[str, Any]:
    """Cross-check the server's ``usage`` against what streamed, and against the request.

    A chunk may carry several tokens (speculative decoding, some engines batch): a
    mismatch is a warning to look closer, not an error. Outputs shorter than requested
    mean the engine stopped early (EOS) despite the length-forcing fields.
    """
    with_usage = [r for r in ok if r.usage_completion_tokens is not None]
    mismatched = [
        r for r in with_usage
        if abs(r.chunks - (r.usage_completion_tokens or 0))
        > USAGE_MISMATCH * max(r.usage_completion_tokens or 0, 1)
    ]  # fmt: skip
    short = [
        r for r in ok
        if r.output_len_requested
        and r.output_tokens < (1 - SHORT_OUTPUT) * r.output_len_requested
    ]  # fmt: skip
    warnings: list[str] = []
    if ok and not with_usage:
        warnings.append(
            "the server reported no token usage (stream_options.include_usage ignored?): "
            "output tokens are counted chunks"
        )
    if mismatched:
        warnings.append(
            f"{len(mismatched)} of {len(with_usage)} requests: streamed chunks differ from "
            f"the server's usage.completion_tokens by more than {USAGE_MISMATCH:.0%}"
        )
    if short:
        warnings.append(
            f"{len(short)} of {len(ok)} requests returned fewer output tokens than requested "
            f"(by more than {SHORT_OUTPUT:.0%}): the engine stopped early (EOS?) — "
            "per-token latencies still hold, throughput is per the tokens actually produced"
        )
    return {
        "usage_reported": len(with_usage),
        "chunk_mismatch": len(mismatched),
        "short_outputs": len(short),
        "warnings": warnings,
    }


def error_kinds(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Errors grouped by their first line, so a summary can say *what* failed."""
    kinds: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            key = r.error.splitlines()[0][:120]
            kinds[key] = kinds.get(key, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:10])


def across_repeats(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, sample std and coefficient of variation of one metric over repeated runs."""
    n = len(values)
    if n == 0:
        return {"runs": 0, "mean": None, "std": None, "cv": None}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    cv = std / mean if mean else None
    return {"runs": n, "mean": _r(mean), "std": _r(std), "cv": None if cv is None else _r(cv)}


REPEATED_METRICS: tuple[str, ...] = (
    "request_throughput",
    "output_token_throughput",
    "total_token_throughput",
    "goodput",
    "error_rate",
    "ttft_ms.p50",
    "ttft_ms.p99",
    "tpot_ms.p50",
    "tpot_ms.p99",
    "itl_ms.p50",
    "itl_ms.p99",
    "e2e_ms.p50",
    "e2e_ms.p99",
)


def lookup(metrics: dict[str, Any], dotted: str) -> float | None:
    """``"ttft_ms.p50"`` → ``metrics["ttft_ms"]["p50"]`` (None when absent)."""
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return float(node) if isinstance(node, int | float) and not isinstance(node, bool) else None


def repeat_summary(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group steps by name over repeats → mean/std/cv of the headline metrics."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for step in steps:
        by_name.setdefault(step["name"], []).append(step["metrics"])
    out = []
    for name, runs in by_name.items():
        stats = {}
        for key in REPEATED_METRICS:
            values = [v for v in (lookup(m, key) for m in runs) if v is not None]
            if values:
                stats[key] = across_repeats(values)
        out.append({"name": name, "runs": len(runs), "metrics": stats})
    return out
