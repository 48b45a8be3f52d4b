"""The result document (``schema_version`` 1, see ``docs/design-bench.md``) and the
files written beside it: per-request records and the GPU telemetry series as JSONL.

A result is self-describing: the config that produced it, the engine (name, version,
args), and a hardware fingerprint, so that two results can be compared (or refused as
incomparable) without asking where they came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from kitt import __version__
from kitt.bench.metrics import lookup, repeat_summary
from kitt.bench.records import RequestRecord

SCHEMA_VERSION = 1
KIND = "kitt.serving"
SUMMARY_KEYS: tuple[tuple[str, str], ...] = (
    ("ttft_ms_p50", "ttft_ms.p50"),
    ("ttft_ms_p99", "ttft_ms.p99"),
    ("tpot_ms_p50", "tpot_ms.p50"),
    ("tpot_ms_p99", "tpot_ms.p99"),
    ("itl_ms_p50", "itl_ms.p50"),
    ("e2e_ms_p50", "e2e_ms.p50"),
)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def hardware() -> dict[str, Any]:
    """Host and GPU facts, plus a short fingerprint of the parts that shape performance."""
    from kitt.agent.hardware import cpu_model, gpu_summary
    from kitt.agent.telemetry import GpuTelemetry

    telemetry = GpuTelemetry()
    try:
        gpus = [g.model_dump() for g in telemetry.static()]
        driver, cuda = telemetry.driver_version, telemetry.cuda_version
    finally:
        telemetry.close()
    facts: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": psutil.cpu_count(logical=True),
        "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "os": f"{platform.system()} {platform.release()}",
        "gpus": gpus,
        "gpu_count": len(gpus),
        "gpu_model": gpu_summary([g["name"] for g in gpus]),
        "driver": driver,
        "cuda": cuda,
    }
    shape = {k: facts[k] for k in ("cpu", "cpu_count", "gpu_model", "gpu_count", "driver")}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()
    facts["fingerprint"] = digest[:16]
    return facts


def summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers: those of the step with the best output token throughput."""
    if not steps:
        return {}
    best = max(steps, key=lambda s: s["metrics"]["output_token_throughput"])
    m = best["metrics"]
    out: dict[str, Any] = {
        "best_step": best["name"],
        "best_output_token_throughput": m["output_token_throughput"],
        "request_throughput": m["request_throughput"],
        "goodput": m["goodput"],
        "error_rate": m["error_rate"],
    }
    for key, dotted in SUMMARY_KEYS:
        out[key] = lookup(m, dotted)
    # Latency at the lightest load is what a single user sees: keep it too.
    first = steps[0]["metrics"]
    out["single_user_ttft_ms_p50"] = lookup(first, "ttft_ms.p50")
    out["single_user_tpot_ms_p50"] = lookup(first, "tpot_ms.p50")
    return out


def document(
    *,
    config: dict[str, Any],
    engine: dict[str, Any],
    hardware_facts: dict[str, Any],
    steps: list[dict[str, Any]],
    telemetry: dict[str, Any],
    warnings: list[str],
    started_at: str,
    finished_at: str,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    repeats = repeat_summary(steps) if max((s["repeat_index"] for s in steps), default=0) else []
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "kitt_version": __version__,
        "started_at": started_at,
        "finished_at": finished_at,
        "config": config,
        "engine": engine,
        "hardware": hardware_facts,
        "calibration": calibration,
        "steps": steps,
        "repeats": repeats,
        "summary": summary([s for s in steps if s["repeat_index"] == 0]),
        "telemetry": telemetry,
        "warnings": warnings,
    }


def sidecar(path: Path, suffix: str) -> Path:
    """``result.json`` → ``result.<suffix>``."""
    return path.with_name(path.stem + "." + suffix)


def write(
    path: Path,
    doc: dict[str, Any],
    records: Iterable[RequestRecord],
    origin: float,
    series: Callable[[Path], int] | None = None,
) -> dict[str, Path]:
    """Write the document and its sidecars atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = {"result": path}
    requests_path = sidecar(path, "requests.jsonl")
    _atomic_lines(requests_path, (json.dumps(r.as_json(origin)) for r in records))
    written["requests"] = requests_path
    if series is not None:
        series_path = sidecar(path, "telemetry.jsonl")
        series(series_path)
        written["telemetry"] = series_path
        doc["telemetry"]["series_file"] = series_path.name
    doc["files"] = {k: v.name for k, v in written.items() if k != "result"}
    write_json(path, doc)
    return written


def write_json(path: Path, doc: dict[str, Any]) -> None:
    _atomic_lines(path, [json.dumps(doc, indent=2)])


def _atomic_lines(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line)
            fh.write("\n")
    tmp.replace(path)
