"""Stand-in for nvidia-ml-py at the ``pynvml`` import boundary (no GPU on CI machines).

Tests put this folder first on PYTHONPATH and describe the GPUs in a JSON file named by
``KITT_FAKE_NVML``; the file is re-read on every query so a test can change readings
while the agent runs. ``{"fail_init": "..."}`` makes ``nvmlInit`` fail as on a GPU-less
host. A GPU whose ``power_mw`` is null raises NotSupported for power, as some boards do;
likewise ``energy_mj`` (the total-energy counter, Volta and later) and ``sm_clock_mhz``,
which are also unsupported when absent. ``"energy_mj": "from_power"`` makes the counter
rise at ``power_mw``, as a real board's does. A GPU's optional ``processes`` list
(``{"pid", "used_memory", "type": "compute" | "graphics"}``; memory in bytes, null where
the driver cannot tell) is what the running-processes queries report.
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    def __str__(self) -> str:
        return "NVML Shared Library Not Found"


class NVMLError_NotSupported(NVMLError):
    def __str__(self) -> str:
        return "Not Supported"


def _state() -> dict[str, Any]:
    path = os.environ.get("KITT_FAKE_NVML")
    if not path:
        return {"fail_init": "library not found"}
    with open(path) as fh:
        return json.load(fh)  # type: ignore[no-any-return]


def _gpu(handle: int) -> dict[str, Any]:
    return _state()["gpus"][handle]  # type: ignore[no-any-return]


def nvmlInit() -> None:
    if _state().get("fail_init"):
        raise NVMLError_LibraryNotFound()


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(_state()["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    return index


def nvmlDeviceGetName(handle: int) -> bytes:
    return _gpu(handle)["name"].encode()  # old bindings return bytes: exercise that path


def nvmlDeviceGetUUID(handle: int) -> str:
    return f"GPU-fake-{handle}"


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    g = _gpu(handle)
    return SimpleNamespace(
        total=g["mem_total"], used=g["mem_used"], free=g["mem_total"] - g["mem_used"]
    )


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    return SimpleNamespace(gpu=_gpu(handle)["util"], memory=0)


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    return int(_gpu(handle)["temp"])


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    mw = _gpu(handle).get("power_mw")
    if mw is None:
        raise NVMLError_NotSupported()
    return int(mw)


def nvmlDeviceGetTotalEnergyConsumption(handle: int) -> int:
    gpu = _gpu(handle)
    mj = gpu.get("energy_mj")
    if mj is None:
        raise NVMLError_NotSupported()
    if mj == "from_power":
        # A counter that rises at the board's power draw, like the real one: mW x s = mJ
        # (wall clock, so every process reading it agrees).
        return int(int(gpu["power_mw"]) * time.time())
    return int(mj)


def nvmlDeviceGetClockInfo(handle: int, clock_type: int) -> int:
    if clock_type != NVML_CLOCK_SM:
        raise NVMLError_NotSupported()  # the stand-in only knows the SM clock
    mhz = _gpu(handle).get("sm_clock_mhz")
    if mhz is None:
        raise NVMLError_NotSupported()
    return int(mhz)


def nvmlSystemGetDriverVersion() -> str:
    return str(_state().get("driver", "550.54.15"))


def nvmlSystemGetCudaDriverVersion() -> int:
    return int(_state().get("cuda", 12040))


def _processes(handle: int, kind: str) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(
            pid=int(p["pid"]),
            usedGpuMemory=p.get("used_memory"),
            gpuInstanceId=0xFFFFFFFF,
            computeInstanceId=0xFFFFFFFF,
        )
        for p in _gpu(handle).get("processes", [])
        if p.get("type", "compute") == kind
    ]


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[SimpleNamespace]:
    return _processes(handle, "compute")


def nvmlDeviceGetGraphicsRunningProcesses(handle: int) -> list[SimpleNamespace]:
    return _processes(handle, "graphics")
