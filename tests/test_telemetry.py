"""GPU telemetry through the NVML stand-in: per GPU and aggregated, live, and absent."""

from __future__ import annotations

from conftest import H100, Kitt, two_h100s, wait_for


def test_two_gpus_reported_per_gpu_and_aggregated(kitt: Kitt) -> None:
    kitt.fake_gpus(two_h100s(), driver="550.54.15", cuda=12040)
    kitt.start_server()
    kitt.init_agent("dual")
    kitt.run("agent", "start", check=True)

    agent = wait_for(lambda: (a := kitt.agent("dual")) and a["gpus"] and a, what="GPU heartbeat")
    assert agent["gpu_count"] == 2
    assert agent["gpu_info"] == f"2x {H100}"
    assert agent["hardware"]["gpu_driver_version"] == "550.54.15"
    assert agent["hardware"]["cuda_version"] == "12.4"
    assert [g["memory_total_gb"] for g in agent["hardware"]["gpus"]] == [80.0, 80.0]
    g0, g1 = agent["gpus"]
    assert (g0["index"], g0["utilization_pct"], g0["memory_used_gb"], g0["temperature_c"], g0["power_w"]) == (
        0, 35.0, 10.0, 41.0, 120.5)  # fmt: skip
    assert (g1["index"], g1["utilization_pct"], g1["memory_used_gb"], g1["temperature_c"], g1["power_w"]) == (
        1, 85.0, 30.0, 67.0, None)  # fmt: skip
    assert agent["gpu_utilization_pct"] == 60.0  # mean of 35 and 85
    assert agent["gpu_memory_used_gb"] == 40.0  # sum of 10 and 30

    # Readings change while the agent runs: the next heartbeats carry the new values.
    kitt.fake_gpus(two_h100s(util0=5, util1=95))
    wait_for(lambda: kitt.agent("dual")["gpu_utilization_pct"] == 50.0, what="new utilisation")
    history = kitt.heartbeats("dual")
    assert {h["gpu_utilization_pct"] for h in history} >= {60.0, 50.0}
    assert all(len(h["gpus"]) == 2 for h in history)

    shown = kitt.run("agents", "show", "dual")
    assert shown.returncode == 0
    assert "550.54.15 / 12.4" in shown.stdout and "120 W" in shown.stdout
    listed = kitt.run("agents", "list")
    assert f"2x {H100}" in listed.stdout and "50.0%" in listed.stdout


def test_no_nvml_gives_null_gpu_fields_and_one_log_line(kitt: Kitt) -> None:
    kitt.fake_gpus(None)  # nvmlInit raises NVMLError_LibraryNotFound, as on a GPU-less host
    kitt.start_server()
    kitt.init_agent("cpu-only")
    kitt.run("agent", "start", check=True)
    wait_for(lambda: len(kitt.heartbeats("cpu-only")) >= 4, what="heartbeats without GPUs")
    agent = kitt.agent("cpu-only")
    assert agent["gpu_count"] == 0 and agent["gpus"] == []
    assert agent["gpu_utilization_pct"] is None and agent["gpu_memory_used_gb"] is None
    assert agent["cpu_percent"] is not None and agent["ram_used_gb"] > 0
    log = (kitt.home / "agent.log").read_text()
    assert log.count("GPU telemetry off") == 1 and "Shared Library Not Found" in log
    assert log.count("\n") <= 4  # start, telemetry, registration: no per-heartbeat noise
    assert "Traceback" not in log
