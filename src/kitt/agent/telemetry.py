"""GPU facts and samples through NVML (``pynvml`` from nvidia-ml-py).

NVML is optional at run time: on a machine without a driver ``nvmlInit`` raises and
the agent reports null GPU fields, logs that once, and never retries noisily. Every
per-device query may be unsupported on some boards (power on older cards, temperature
on some vGPUs), so each one degrades to ``None`` on its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from kitt.protocol import GpuSample, GpuStatic

log = logging.getLogger(__name__)

GIB = 1024**3
T = TypeVar("T")


def _opt_text(value: Any) -> str | None:
    """NVML returns bytes in old bindings and str in new ones."""
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class GpuTelemetry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._names: list[str] = []
        self.driver_version: str | None = None
        self.cuda_version: str | None = None
        self.unavailable_reason: str | None = None
        self._init()

    def _init(self) -> None:
        try:
            import pynvml
        except ImportError as exc:  # nvidia-ml-py is a dependency; a broken install
            self.unavailable_reason = f"pynvml cannot be imported: {exc}"
            log.info("GPU telemetry off: %s", self.unavailable_reason)
            return
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except pynvml.NVMLError as exc:
            self.unavailable_reason = f"NVML unavailable ({exc})"
            log.info("GPU telemetry off: %s; GPU fields will be null", self.unavailable_reason)
            return
        self._nvml = pynvml
        self._names = [
            _opt_text(self._query(pynvml.nvmlDeviceGetName, h)) or "GPU" for h in self._handles
        ]
        self.driver_version = _opt_text(self._query(pynvml.nvmlSystemGetDriverVersion))
        cuda = self._query(pynvml.nvmlSystemGetCudaDriverVersion)
        if isinstance(cuda, int) and cuda > 0:
            self.cuda_version = f"{cuda // 1000}.{(cuda % 1000) // 10}"
        log.info(
            "GPU telemetry on: %d GPU(s), driver %s, CUDA %s",
            len(self._handles),
            self.driver_version,
            self.cuda_version,
        )

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def _query(self, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return fn(*args)
        except Exception as exc:  # NVMLError_NotSupported and friends, per field
            log.debug("NVML query %s failed: %s", getattr(fn, "__name__", fn), exc)
            return None

    def static(self) -> list[GpuStatic]:
        if not self.available:
            return []
        nv = self._nvml
        out = []
        with self._lock:
            for i, h in enumerate(self._handles):
                mem = self._query(nv.nvmlDeviceGetMemoryInfo, h)
                out.append(
                    GpuStatic(
                        index=i,
                        name=self._names[i],
                        uuid=_opt_text(self._query(nv.nvmlDeviceGetUUID, h)),
                        memory_total_gb=round(mem.total / GIB, 3) if mem else None,
                    )
                )
        return out

    def sample(self) -> list[GpuSample]:
        if not self.available:
            return []
        nv = self._nvml
        out = []
        with self._lock:
            for i, h in enumerate(self._handles):
                util = self._query(nv.nvmlDeviceGetUtilizationRates, h)
                mem = self._query(nv.nvmlDeviceGetMemoryInfo, h)
                temp = self._query(
                    lambda h=h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
                )
                power_mw = self._query(nv.nvmlDeviceGetPowerUsage, h)
                out.append(
                    GpuSample(
                        index=i,
                        name=self._names[i],
                        utilization_pct=float(util.gpu) if util is not None else None,
                        memory_used_gb=round(mem.used / GIB, 3) if mem else None,
                        memory_total_gb=round(mem.total / GIB, 3) if mem else None,
                        temperature_c=float(temp) if temp is not None else None,
                        power_w=round(power_mw / 1000.0, 1) if power_mw is not None else None,
                    )
                )
        return out

    def close(self) -> None:
        if self._nvml is not None:
            self._query(self._nvml.nvmlShutdown)
            self._nvml = None


def aggregate(gpus: list[GpuSample]) -> tuple[float | None, float | None]:
    """Mean utilisation and total memory used across all GPUs (None when unknown)."""
    utils = [g.utilization_pct for g in gpus if g.utilization_pct is not None]
    mems = [g.memory_used_gb for g in gpus if g.memory_used_gb is not None]
    util = round(sum(utils) / len(utils), 1) if utils else None
    mem = round(sum(mems), 3) if mems else None
    return util, mem
