"""GPU sampler for a benchmark run, through the NVML stand-in (tests/fake_nvml/pynvml.py).

The stand-in is loaded in-process as ``pynvml`` (sys.modules, restored after each test);
readings come from a JSON file that a test rewrites between samples, and a hand-driven
clock gives every sample a known time, so windows and energies have exact expected values.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import FAKE_NVML_DIR, wait_for
from kitt.bench.gpu import GpuSampler, TelemetryError, summarize

GIB = 1024**3
H100 = "NVIDIA H100 80GB HBM3"
SetGpus = Callable[[list[dict[str, Any]] | None], None]


@pytest.fixture
def set_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SetGpus:
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML_DIR / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    state = tmp_path / "nvml.json"
    monkeypatch.setenv("KITT_FAKE_NVML", str(state))

    def write(gpus: list[dict[str, Any]] | None) -> None:
        data = {"fail_init": "library not found"} if gpus is None else {"gpus": gpus}
        state.write_text(json.dumps(data))

    write([gpu()])  # one GPU until the test says otherwise
    return write


def gpu(**values: Any) -> dict[str, Any]:
    base = {"name": H100, "util": 0, "mem_total": 80 * GIB, "mem_used": 0, "temp": 40,
            "power_mw": 100_000, "energy_mj": 0, "sm_clock_mhz": 1980}  # fmt: skip
    base.update(values)
    return base


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_values_per_gpu_and_energy_from_counter_or_power(set_gpus: SetGpus) -> None:
    clock = Clock()
    set_gpus([gpu(), gpu()])
    sampler = GpuSampler(1.0, clock=clock)
    assert sampler.available and sampler.reason is None
    assert sampler.info() == {"available": True, "interval_s": 1.0, "gpus": 2}
    # GPU 0 has the energy counter (+150 J per second); GPU 1 lacks it: its power is
    # integrated instead (100 W, 200 W, 300 W at 1 s spacing: 150 J + 250 J).
    for t, util, mem, power, temp, clk in [(10.0, 50, 10, 100, 50, 1500),
                                           (11.0, 70, 12, 200, 60, 1800),
                                           (12.0, 90, 14, 300, 70, 1900)]:  # fmt: skip
        set_gpus([
            gpu(util=util, mem_used=mem * GIB, power_mw=power * 1000, temp=temp,
                sm_clock_mhz=clk, energy_mj=1_000_000 + int((t - 10) * 150_000)),
            gpu(util=util // 2, mem_used=GIB, power_mw=power * 1000, temp=temp,
                sm_clock_mhz=None, energy_mj=None),
        ])  # fmt: skip
        clock.now = t
        sampler.sample_now()

    summary = sampler.summary(10.0, 12.0, output_tokens=100)
    assert summary["available"] is True and summary["samples"] == 3
    g0, g1 = summary["gpus"]
    assert g0["index"] == 0 and g1["index"] == 1
    assert g0["utilization_pct"] == {"mean": 70.0, "max": 90.0}
    assert g0["memory_used_gb"] == {"mean": 12.0, "max": 14.0}
    assert g0["power_w"] == {"mean": 200.0, "max": 300.0}
    assert g0["temperature_c"] == {"mean": 60.0, "max": 70.0}
    assert g0["sm_clock_mhz"] == {"mean": 1733.33, "max": 1900.0}
    assert (g0["energy_j"], g0["energy_method"]) == (300.0, "counter")
    assert g1["utilization_pct"] == {"mean": 35.0, "max": 45.0}
    assert g1["sm_clock_mhz"] is None  # unsupported on that board: None, not a crash
    assert (g1["energy_j"], g1["energy_method"]) == (400.0, "power")
    assert summary["energy_j"] == 700.0
    assert summary["energy_per_output_token_j"] == 7.0


def test_window_excludes_outside_samples_and_interpolates_energy_at_its_edges(
    set_gpus: SetGpus,
) -> None:
    clock = Clock()
    sampler = GpuSampler(1.0, clock=clock)
    for t in range(11):  # one sample a second; utilisation 10 per second, counter at 100 W
        set_gpus([gpu(util=10 * t, energy_mj=t * 100_000, power_mw=100_000)])
        clock.now = float(t)
        sampler.sample_now()

    summary = sampler.summary(2.5, 5.5, output_tokens=0)
    assert summary["samples"] == 3  # t = 3, 4, 5; 2 and 6 lie outside
    (g,) = summary["gpus"]
    assert g["utilization_pct"] == {"mean": 40.0, "max": 50.0}
    # 3 s of window at 100 W: the counter is read at 2.5 and 5.5 by interpolation, not
    # only between the inner samples (which would give 200 J).
    assert (g["energy_j"], g["energy_method"]) == (300.0, "counter")
    assert summary["energy_per_output_token_j"] is None  # no output tokens: no ratio

    # A window shorter than the interval has no sample inside, and still its energy.
    short = sampler.summary(7.2, 7.7, output_tokens=50)
    assert short["samples"] == 0
    assert short["gpus"][0]["utilization_pct"] is None
    assert short["energy_j"] == 50.0 and short["energy_per_output_token_j"] == 1.0


def test_summary_samples_again_when_the_window_ends_after_the_last_sample(
    set_gpus: SetGpus,
) -> None:
    clock = Clock()
    sampler = GpuSampler(1.0, clock=clock)
    set_gpus([gpu(energy_mj=0)])
    sampler.sample_now()
    set_gpus([gpu(energy_mj=4_000_000)])
    clock.now = 4.0  # "now" is after the window's end: the summary reads the counter again
    summary = sampler.summary(0.0, 2.0, output_tokens=1)
    assert len(sampler.samples) == 2
    assert summary["energy_j"] == 2000.0  # half of the 4 kJ seen over 4 s


def test_counter_reset_falls_back_to_power(set_gpus: SetGpus) -> None:
    clock = Clock()
    sampler = GpuSampler(1.0, clock=clock)
    for t, mj in [(0.0, 9_000_000), (1.0, 9_200_000), (2.0, 5_000)]:  # driver reloaded
        set_gpus([gpu(energy_mj=mj, power_mw=250_000)])
        clock.now = t
        sampler.sample_now()
    g = sampler.summary(0.0, 2.0, output_tokens=10)["gpus"][0]
    assert (g["energy_j"], g["energy_method"]) == (500.0, "power")


def test_unsupported_power_and_energy_read_as_none(set_gpus: SetGpus) -> None:
    clock = Clock()
    set_gpus([gpu(util=30, power_mw=None, energy_mj=None)])
    sampler = GpuSampler(0.5, clock=clock)
    sampler.sample_now()
    clock.now = 1.0
    sampler.sample_now()
    summary = sampler.summary(0.0, 1.0, output_tokens=10)
    (g,) = summary["gpus"]
    assert g["power_w"] is None
    assert g["energy_j"] is None and g["energy_method"] is None
    assert g["utilization_pct"] == {"mean": 30.0, "max": 30.0}
    assert summary["energy_j"] is None and summary["energy_per_output_token_j"] is None


def test_no_gpu_means_no_thread_and_a_reason(set_gpus: SetGpus) -> None:
    set_gpus(None)  # nvmlInit fails as on a host without the driver
    sampler = GpuSampler()
    assert not sampler.available
    assert "NVML" in (sampler.reason or "") and "Shared Library Not Found" in sampler.reason
    with sampler:
        assert not any(t.name == "gpu-sampler" for t in threading.enumerate())
        assert sampler.sample_now() is None
    assert sampler.summary(0.0, 1.0, output_tokens=5) == {
        "available": False,
        "reason": sampler.reason,
    }
    assert sampler.info() == {"available": False, "interval_s": 1.0, "reason": sampler.reason}


@pytest.mark.parametrize("interval", [0.05, 0.0, -1.0, float("nan"), 61.0])
def test_interval_out_of_range_is_refused(set_gpus: SetGpus, interval: float) -> None:
    set_gpus([gpu()])
    with pytest.raises(TelemetryError, match=r"between 0.1 and 60 s"):
        GpuSampler(interval)


def test_background_thread_samples_at_the_interval(set_gpus: SetGpus) -> None:
    set_gpus([gpu(util=77, temp=55)])
    sampler = GpuSampler(0.1)
    with sampler:
        wait_for(lambda: len(sampler.samples) >= 6, timeout=10, what="six samples")
        threads = [t for t in threading.enumerate() if t.name == "gpu-sampler"]
        assert len(threads) == 1
    assert not threads[0].is_alive()
    samples = sampler.samples
    times = [s.t for s in samples]
    assert times == sorted(times)
    # Ticks on a fixed cadence: a late tick is followed by an early one, so single gaps
    # vary under load, but their mean stays at the interval (a busy loop would be far less).
    # The first sample is taken by start() and the last by stop(): outside the cadence.
    ticks = times[1:-1]
    assert (ticks[-1] - ticks[0]) / (len(ticks) - 1) >= 0.09
    assert {s.gpus[0].utilization_pct for s in samples} == {77.0}
    assert {s.gpus[0].temperature_c for s in samples} == {55.0}


def test_series_file(set_gpus: SetGpus, tmp_path: Path) -> None:
    clock = Clock()
    set_gpus([gpu(), gpu()])
    sampler = GpuSampler(1.0, clock=clock)
    for t in (100.0, 101.0):
        set_gpus([gpu(util=int(t) - 90, energy_mj=int(t) * 1000), gpu(energy_mj=None)])
        clock.now = t
        sampler.sample_now()
    path = tmp_path / "result.telemetry.jsonl"
    assert sampler.write_series(path, t0=99.5) == 4
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["t_s"], r["gpu"]) for r in rows] == [(0.5, 0), (0.5, 1), (1.5, 0), (1.5, 1)]
    assert [r["energy_j"] for r in rows] == [0.0, None, 1.0, None]
    assert rows[2]["utilization_pct"] == 11.0 and rows[2]["sm_clock_mhz"] == 1980.0
    assert set(rows[0]) == {"t_s", "gpu", "utilization_pct", "memory_used_gb", "power_w",
                            "energy_j", "temperature_c", "sm_clock_mhz"}  # fmt: skip


def test_summarize_without_samples_is_empty_not_an_error() -> None:
    assert summarize([], 0.0, 1.0, 10) == {
        "available": True,
        "samples": 0,
        "gpus": [],
        "energy_j": None,
        "energy_per_output_token_j": None,
    }
