"""Host facts for registration and host load for heartbeats."""

from __future__ import annotations

import platform
import socket
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import psutil

from kitt import __version__
from kitt.agent.telemetry import GIB, GpuTelemetry
from kitt.protocol import SERVING_BENCHMARK, Hardware, RegisterRequest


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def gpu_summary(names: list[str]) -> str | None:
    """``"2x NVIDIA H100 80GB HBM3"``, or ``"1x A, 1x B"`` for a mixed box."""
    if not names:
        return None
    return ", ".join(f"{n}x {name}" for name, n in Counter(names).items())


BUILTIN_BENCHMARKS = (SERVING_BENCHMARK,)
ENGINE_CAPABILITY = "engine:"


def capabilities(benchmarks: Iterable[str], engines: Iterable[str] = ()) -> list[str]:
    """What the agent offers: benchmark names (its own and the built-in ones) and
    ``engine:<name>`` for each engine it can start (its binary is installed)."""
    names = {*benchmarks, *BUILTIN_BENCHMARKS}
    return sorted(names) + sorted(ENGINE_CAPABILITY + e for e in set(engines))


def registration(
    name: str,
    port: int,
    telemetry: GpuTelemetry,
    benchmarks: list[str],
    engines: Iterable[str] = (),
) -> RegisterRequest:
    gpus = telemetry.static()
    cpu = cpu_model()
    cores = psutil.cpu_count(logical=True)
    ram_gb = round(psutil.virtual_memory().total / GIB, 1)
    hardware = Hardware(
        cpu_model=cpu,
        cpu_cores=cores,
        ram_gb=ram_gb,
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        gpu_driver_version=telemetry.driver_version,
        cuda_version=telemetry.cuda_version,
        gpus=gpus,
    )
    return RegisterRequest(
        name=name,
        hostname=socket.gethostname(),
        port=port,
        kitt_version=__version__,
        gpu_info=gpu_summary([g.name for g in gpus]),
        gpu_count=len(gpus),
        cpu_info=f"{cpu} ({cores} threads)" if cpu else None,
        ram_gb=ram_gb,
        hardware=hardware,
        capabilities=capabilities(benchmarks, engines),
    )


class HostLoad:
    """CPU and RAM in use, sampled without blocking (psutil measures between calls)."""

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)

    def sample(self) -> tuple[float, float]:
        cpu = psutil.cpu_percent(interval=None)
        ram = psutil.virtual_memory()
        return round(cpu, 1), round((ram.total - ram.available) / GIB, 2)
