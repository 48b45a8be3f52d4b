"""GPU telemetry for one benchmark run: an NVML time series and per-step summaries.

A background thread samples every GPU at a fixed cadence (default 1 s, at least 0.1 s):
utilisation, memory used, power, the total-energy counter, temperature and SM clock, with
timestamps from the same monotonic clock the runner uses for its step windows. A step's
summary covers exactly its window: means and maxima over the samples inside it, and
energy from the energy counter *interpolated at the window's edges* (so a 3 s step sampled
once a second still gets its 3 s of energy, not the 2 s between its inner samples). Boards
without the counter (pre-Volta, some vGPUs) fall back to integrating power over the same
window; every query may be unsupported on its own and then reads as None, as in
``kitt.agent.telemetry``, whose NVML start-up and per-query degradation this reuses.

No NVML (no driver, no GPU): ``available`` is False with the reason, no thread runs, and
every summary says so.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kitt.agent.telemetry import GIB, GpuTelemetry
from kitt.errors import KittError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0
MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 60.0
NVML_CLOCK_SM = 1  # pynvml.NVML_CLOCK_SM


class TelemetryError(KittError):
    """Telemetry settings that cannot work (bad input, exit 2)."""

    exit_code = 2


@dataclass(frozen=True)
class GpuReading:
    index: int
    utilization_pct: float | None
    memory_used_gb: float | None
    power_w: float | None
    energy_mj: int | None  # NVML's total-energy counter (millijoules since driver load)
    temperature_c: float | None
    sm_clock_mhz: float | None


@dataclass(frozen=True)
class Sample:
    t: float  # the sampler's clock, the same clock the caller gives windows in
    gpus: tuple[GpuReading, ...]


STAT_FIELDS = ("utilization_pct", "memory_used_gb", "power_w", "temperature_c", "sm_clock_mhz")


class _RunTelemetry(GpuTelemetry):
    """The agent's NVML wrapper plus the readings a benchmark needs and heartbeats do not."""

    @property
    def count(self) -> int:
        return len(self._handles) if self.available else 0

    def read(self) -> tuple[GpuReading, ...]:
        nv = self._nvml
        if nv is None:
            return ()
        out = []
        with self._lock:
            for i, h in enumerate(self._handles):
                util = self._query(nv.nvmlDeviceGetUtilizationRates, h)
                mem = self._query(nv.nvmlDeviceGetMemoryInfo, h)
                power_mw = self._query(nv.nvmlDeviceGetPowerUsage, h)
                energy = self._query(nv.nvmlDeviceGetTotalEnergyConsumption, h)
                temp = self._query(
                    lambda h=h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
                )
                clock = self._query(
                    lambda h=h: nv.nvmlDeviceGetClockInfo(
                        h, getattr(nv, "NVML_CLOCK_SM", NVML_CLOCK_SM)
                    )
                )
                out.append(
                    GpuReading(
                        index=i,
                        utilization_pct=float(util.gpu) if util is not None else None,
                        memory_used_gb=round(mem.used / GIB, 3) if mem is not None else None,
                        power_w=round(power_mw / 1000.0, 3) if power_mw is not None else None,
                        energy_mj=int(energy) if energy is not None else None,
                        temperature_c=float(temp) if temp is not None else None,
                        sm_clock_mhz=float(clock) if clock is not None else None,
                    )
                )
        return tuple(out)


def check_interval(interval_s: float) -> float:
    if not (MIN_INTERVAL_S <= interval_s <= MAX_INTERVAL_S):  # also refuses NaN
        raise TelemetryError(
            f"GPU telemetry interval must be between {MIN_INTERVAL_S:g} and "
            f"{MAX_INTERVAL_S:g} s (got {interval_s:g})"
        )
    return float(interval_s)


class GpuSampler:
    """Samples every GPU in a background thread for the length of a run.

    Start it before the first step (before warmup) and stop it after the last; give
    ``summary`` each step's window in the sampler's clock (``time.monotonic`` unless
    another is passed)."""

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = check_interval(interval_s)
        self._clock = clock
        self._nvml = _RunTelemetry()
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._nvml.available

    @property
    def reason(self) -> str | None:
        """Why there is no telemetry (None when there is)."""
        if self.available:
            return None
        return self._nvml.unavailable_reason or "NVML unavailable"

    @property
    def gpu_count(self) -> int:
        return self._nvml.count

    @property
    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def info(self) -> dict[str, Any]:
        """The result document's top-level ``telemetry`` (the runner adds ``series_file``)."""
        out: dict[str, Any] = {"available": self.available, "interval_s": self.interval_s}
        if not self.available:
            out["reason"] = self.reason
        else:
            out["gpus"] = self.gpu_count
        return out

    def sample_now(self) -> Sample | None:
        """Take one sample at once (also what the thread does on each tick)."""
        if not self.available:
            return None
        readings = self._nvml.read()
        sample = Sample(t=self._clock(), gpus=readings)
        with self._lock:
            self._samples.append(sample)
        return sample

    def start(self) -> GpuSampler:
        if not self.available or self._thread is not None:
            return self
        self._stop.clear()
        self.sample_now()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=max(5.0, 2 * self.interval_s))
        self.sample_now()  # the last window's end gets a sample after it

    def close(self) -> None:
        self.stop()
        self._nvml.close()

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        # A fixed cadence (not "sleep interval after each read"): reads do not make it drift.
        next_at = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            try:
                self.sample_now()
            except Exception:  # NVML gone mid-run (driver reload): keep what was sampled
                log.exception("GPU sampling failed; telemetry stops here")
                return
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:  # a slow read: skip the ticks it overran
                next_at = now + self.interval_s

    # -- summaries --------------------------------------------------------------------------

    def summary(self, start: float, end: float, output_tokens: int) -> dict[str, Any]:
        """One step's ``telemetry``: per-GPU mean/max inside [start, end], energy in the
        window, and energy per output token."""
        if not self.available:
            return {"available": False, "reason": self.reason}
        if not (math.isfinite(start) and math.isfinite(end)) or end < start:
            raise ValueError(f"bad window: start {start} end {end}")
        samples = self.samples
        if not samples or samples[-1].t < end:
            fresh = self.sample_now()  # so the window's end lies between two samples
            if fresh is not None:
                samples.append(fresh)
        return summarize(samples, start, end, output_tokens)

    def write_series(self, path: Path, t0: float | None = None) -> int:
        """The whole time series as JSON lines, one per GPU per sample; ``t_s`` is seconds
        since ``t0`` (the run's start, same clock; default: the first sample). Energy is
        joules since the first sample. Returns the number of lines written."""
        samples = self.samples
        return write_series(samples, path, t0)


def _mean_max(values: Iterable[float | None], digits: int = 2) -> dict[str, float] | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return {"mean": round(sum(known) / len(known), digits), "max": round(max(known), digits)}


def _interp(times: Sequence[float], values: Sequence[float], t: float) -> float:
    """Linear interpolation, held constant beyond the first and last points."""
    if t <= times[0]:
        return values[0]
    if t >= times[-1]:
        return values[-1]
    i = bisect.bisect_right(times, t)
    t0, t1, v0, v1 = times[i - 1], times[i], values[i - 1], values[i]
    if t1 == t0:
        return v1
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def _integrate(times: Sequence[float], values: Sequence[float], start: float, end: float) -> float:
    """Trapezoidal integral over [start, end] with interpolated edge values."""
    pts = [(start, _interp(times, values, start))]
    pts += [(t, v) for t, v in zip(times, values, strict=True) if start < t < end]
    pts.append((end, _interp(times, values, end)))
    return sum((t1 - t0) * (v0 + v1) / 2 for (t0, v0), (t1, v1) in itertools.pairwise(pts))


def _series(samples: Sequence[Sample], gpu: int, field: str) -> tuple[list[float], list[float]]:
    times, values = [], []
    for s in samples:
        if gpu < len(s.gpus):
            value = getattr(s.gpus[gpu], field)
            if value is not None:
                times.append(s.t)
                values.append(float(value))
    return times, values


def gpu_energy_j(
    samples: Sequence[Sample], gpu: int, start: float, end: float
) -> tuple[float | None, str | None]:
    """Energy one GPU used in [start, end] and how it was measured: the energy counter's
    rise between the window's edges ("counter"), else power integrated over the window
    ("power"), else (None, None)."""
    times, mj = _series(samples, gpu, "energy_mj")
    if times:
        # The counter only rises; a drop in the samples around the window means the driver
        # was reloaded (the counter restarted): then power is the better witness.
        lo = max(0, bisect.bisect_right(times, start) - 1)
        span = mj[lo : bisect.bisect_left(times, end) + 1]
        if all(b >= a for a, b in itertools.pairwise(span)):
            delta = _interp(times, mj, end) - _interp(times, mj, start)
            return round(delta / 1000.0, 3), "counter"
    times, watts = _series(samples, gpu, "power_w")
    if times:
        return round(_integrate(times, watts, start, end), 3), "power"
    return None, None


def summarize(
    samples: Sequence[Sample], start: float, end: float, output_tokens: int
) -> dict[str, Any]:
    """Pure: the step summary from a list of samples (see ``GpuSampler.summary``)."""
    inside = [s for s in samples if start <= s.t <= end]
    gpu_count = max((len(s.gpus) for s in samples), default=0)
    gpus = []
    energies: list[float | None] = []
    for i in range(gpu_count):
        entry: dict[str, Any] = {"index": i}
        for field in STAT_FIELDS:
            entry[field] = _mean_max(getattr(s.gpus[i], field) for s in inside if i < len(s.gpus))
        energy, method = gpu_energy_j(samples, i, start, end)
        entry["energy_j"] = energy
        entry["energy_method"] = method
        energies.append(energy)
        gpus.append(entry)
    total = round(sum(e for e in energies if e is not None), 3) if energies else None
    if any(e is None for e in energies):
        total = None  # a partial sum would read as the whole machine's energy
    per_token = None
    if total is not None and output_tokens > 0:
        per_token = round(total / output_tokens, 6)
    return {
        "available": True,
        "samples": len(inside),
        "gpus": gpus,
        "energy_j": total,
        "energy_per_output_token_j": per_token,
    }


def write_series(samples: Sequence[Sample], path: Path, t0: float | None = None) -> int:
    if t0 is None:
        t0 = samples[0].t if samples else 0.0
    first_mj: dict[int, int] = {}
    lines = []
    for s in samples:
        for g in s.gpus:
            energy_j = None
            if g.energy_mj is not None:
                base = first_mj.setdefault(g.index, g.energy_mj)
                energy_j = round((g.energy_mj - base) / 1000.0, 3)
            row = {
                "t_s": round(s.t - t0, 3),
                "gpu": g.index,
                "utilization_pct": g.utilization_pct,
                "memory_used_gb": g.memory_used_gb,
                "power_w": g.power_w,
                "energy_j": energy_j,
                "temperature_c": g.temperature_c,
                "sm_clock_mhz": g.sm_clock_mhz,
            }
            lines.append(json.dumps(row, separators=(",", ":")))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)
