"""``kitt bench serve`` as a user runs it, against the fixture engine (the simulator) as a
separate process: the numbers it measures, its files, its load profiles, its errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import FAKE_NVML_DIR, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent


class Sim:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/stats").json()  # type: ignore[no-any-return]


@pytest.fixture
def sim_factory(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> Sim:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "kitt.bench.simulator", "--port", str(port), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(proc)
        sim = Sim(proc, port)

        def healthy() -> bool:
            try:
                return httpx.get(sim.url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=15, what="the simulator to listen")
        return sim

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def bench(
    tmp_path: Path, *args: str, check: bool = True, fake_nvml: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KITT_")}
    # The NVML stand-in: a GPU-less host unless ``fake_nvml`` describes GPUs, so the test
    # means the same on a GPU machine.
    env.update(KITT_HOME=str(tmp_path / "home"), COLUMNS="200",
               PYTHONPATH=os.pathsep.join([str(FAKE_NVML_DIR), str(REPO / "src")]))  # fmt: skip
    if fake_nvml is not None:
        env["KITT_FAKE_NVML"] = str(fake_nvml)
    proc = subprocess.run(
        [sys.executable, "-m", "kitt", "bench", "serve", "--no-progress", *args],
        check=False, capture_output=True, text=True, env=env, timeout=300, cwd=REPO,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_closed_loop_measures_the_injected_timings(tmp_path: Path, sim_factory: Any) -> None:
    sim = sim_factory("--ttft-ms", "40", "--itl-ms", "8", "--empty-first-chunk")
    out = tmp_path / "r" / "result.json"
    bench(tmp_path, "--endpoint", sim.url, "--model", "sim", "--concurrency", "1,8",
          "--num-prompts", "24", "--input-len", "32", "--output-len", "16", "-o", str(out))  # fmt: skip
    doc = load(out)
    assert doc["schema_version"] == 1 and doc["kind"] == "kitt.serving"
    assert [s["name"] for s in doc["steps"]] == ["c=1", "c=8"]
    truth = sim.stats()
    for step in doc["steps"]:
        m = step["metrics"]
        assert m["requests"] == 24 and m["errors"] == 0
        assert m["output_tokens"] == 24 * 16  # usage says exactly max_tokens
        # The client's medians agree with what was injected (the empty first chunk is not
        # the first token): never below it, and above it only by scheduling delay (the
        # suite runs on parallel workers; benchmarks/client_fidelity.py measures the
        # error on a quiet machine: under 1 ms).
        assert 39.5 <= m["ttft_ms"]["p50"] <= 50
        assert 7.5 <= m["itl_ms"]["p50"] <= 12
        assert 7.5 <= m["tpot_ms"]["p50"] <= 12
        assert m["token_check"]["warnings"] == []
        # Closed loop: the next request leaves as soon as a slot frees up (within a
        # millisecond on a quiet machine; these tests share the CPU with other workers).
        assert m["client"]["schedule_lag_ms"]["p50"] < 5.0
        assert 0 < m["client"]["cpu_fraction"] < 1.5
    assert doc["steps"][0]["metrics"]["ttft_ms"]["p50"] == pytest.approx(
        truth["ttft_ms"]["p50"], abs=5.0
    )
    # c=8 runs ~8 requests at a time: several times the throughput of c=1.
    c1, c8 = (s["metrics"]["request_throughput"] for s in doc["steps"])
    assert c8 > 4 * c1
    # Calibration found the simulator's 1 token per word.
    assert doc["calibration"]["tokens_per_word"] == pytest.approx(1.0)
    assert doc["steps"][0]["metrics"]["input_tokens"] == 24 * 32
    # Per-request records beside the result: warmup ones flagged, times consistent.
    lines = [
        json.loads(x) for x in (tmp_path / "r" / "result.requests.jsonl").read_text().splitlines()
    ]
    measured = [r for r in lines if not r["warmup"]]
    assert len(measured) == 48 and len(lines) == 48 + 1 + 8
    r = measured[0]
    assert len(r["itl_ms"]) == 15 and r["output_tokens"] == 16 and r["usage"] is True
    assert r["e2e_ms"] >= r["ttft_ms"] > 0
    assert doc["files"]["requests"] == "result.requests.jsonl"
    assert doc["telemetry"]["available"] is False and doc["telemetry"]["reason"]


def test_chat_api_open_loop_and_goodput(tmp_path: Path, sim_factory: Any) -> None:
    sim = sim_factory("--ttft-ms", "20", "--itl-ms", "5")
    out = tmp_path / "result.json"
    proc = bench(tmp_path, "--endpoint", sim.url + "/v1", "--model", "sim", "--api", "chat",
                 "--rate", "40", "--arrival", "constant", "--num-prompts", "40",
                 "--output-len", "4", "--slo", "ttft_ms=15", "-o", str(out))  # fmt: skip
    doc = load(out)
    step = doc["steps"][0]
    assert step["name"] == "rate=40" and step["load"]["mode"] == "rate"
    m = step["metrics"]
    assert m["requests"] == 40 and m["completed"] == 40
    # Constant arrivals at 40/s for 40 requests: ~1 s of offered load (+ the last request).
    assert 40 * 0.7 <= m["request_throughput"] <= 40 * 1.15  # a loaded machine lags
    # TTFT ~20 ms misses a 15 ms objective: no request is good.
    assert m["good_fraction"] == 0.0 and m["goodput"] == 0.0
    assert "goodput" in proc.stdout


def test_errors_are_counted_not_fatal(tmp_path: Path, sim_factory: Any) -> None:
    sim = sim_factory("--ttft-ms", "1", "--itl-ms", "1", "--error-rate", "0.3",
                      "--midstream-error-rate", "0.2", "--seed", "7")  # fmt: skip
    out = tmp_path / "result.json"
    bench(tmp_path, "--endpoint", sim.url, "--model", "sim", "--concurrency", "4",
          "--num-prompts", "200", "--output-len", "8", "-o", str(out))  # fmt: skip
    m = load(out)["steps"][0]["metrics"]
    assert m["requests"] == 200
    assert 0.3 < m["error_rate"] < 0.6
    assert m["completed"] + m["errors"] == 200
    assert any(k.startswith("HTTP 500") for k in m["error_kinds"])
    assert any("stream" in k for k in m["error_kinds"])
    assert m["output_tokens"] == m["completed"] * 8


def test_duration_warmup_and_repeat(tmp_path: Path, sim_factory: Any) -> None:
    sim = sim_factory("--ttft-ms", "2", "--itl-ms", "1")
    out = tmp_path / "result.json"
    proc = bench(tmp_path, "--endpoint", sim.url, "--model", "sim", "--concurrency", "2",
                 "--duration", "1s", "--warmup-s", "0.3", "--repeat", "3",
                 "--output-len", "8", "-o", str(out))  # fmt: skip
    doc = load(out)
    assert [(s["name"], s["repeat_index"]) for s in doc["steps"]] == [
        ("c=2", 0),
        ("c=2", 1),
        ("c=2", 2),
    ]
    for step in doc["steps"]:
        assert 0.9 < step["window"]["duration_s"] < 1.5
    rep = doc["repeats"][0]
    assert rep["name"] == "c=2" and rep["runs"] == 3
    tput = rep["metrics"]["output_token_throughput"]
    values = [s["metrics"]["output_token_throughput"] for s in doc["steps"]]
    assert tput["mean"] == pytest.approx(sum(values) / 3, rel=1e-3)
    assert tput["cv"] is not None and tput["cv"] < 0.5
    assert "across repeats" in proc.stdout


def test_sweep_probes_between_sync_and_max(tmp_path: Path, sim_factory: Any) -> None:
    sim = sim_factory("--ttft-ms", "10", "--itl-ms", "2")
    out = tmp_path / "result.json"
    bench(tmp_path, "--endpoint", sim.url, "--model", "sim", "--sweep", "--sweep-steps", "2",
          "--sweep-max-concurrency", "8", "--num-prompts", "16", "--output-len", "4",
          "-o", str(out))  # fmt: skip
    doc = load(out)
    names = [s["name"] for s in doc["steps"]]
    assert names[:2] == ["sync", "throughput"] and len(names) == 4
    low = doc["steps"][0]["metrics"]["request_throughput"]
    high = doc["steps"][1]["metrics"]["request_throughput"]
    rates = [s["load"]["rate"] for s in doc["steps"][2:]]
    assert low < rates[0] < rates[1] < high


def test_dataset_file(tmp_path: Path, sim_factory: Any) -> None:
    sim = sim_factory("--ttft-ms", "1", "--itl-ms", "1")
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        json.dumps({"prompt": "one two three", "output_len": 3}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "a b c d e"}], "max_tokens": 5}) + "\n"
    )  # fmt: skip
    out = tmp_path / "result.json"
    bench(tmp_path, "--endpoint", sim.url, "--model", "sim", "--dataset", str(data),
          "--output-len-from-file", "--num-prompts", "4", "--warmup", "0", "-o", str(out))  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "result.requests.jsonl").read_text().splitlines()]
    assert sorted(r["output_tokens"] for r in lines) == [3, 3, 5, 5]
    assert sorted(r["input_tokens"] for r in lines) == [3, 3, 5, 5]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "m"], "either endpoint"),
        (["--endpoint", "http://x", "--model", "m", "--rate", "1", "--sweep"], "one load mode"),
        (["--endpoint", "http://x", "--model", "m", "--concurrency", "0"], "must be > 0"),
        (["--endpoint", "http://x", "--model", "m", "--slo", "speed=1"], "key one of"),
        (
            ["--endpoint", "http://x", "--model", "m", "--telemetry-interval", "10ms"],
            "telemetry_interval_s",
        ),
        (
            ["--endpoint", "http://x", "--model", "m", "--dataset", "/nonexistent.jsonl"],
            "does not exist",
        ),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = bench(tmp_path, *args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_unreachable_endpoint(tmp_path: Path) -> None:
    port = free_port()
    proc = bench(tmp_path, "--endpoint", f"http://127.0.0.1:{port}", "--model", "m", check=False)
    assert proc.returncode == 1
    assert f"cannot reach the engine at http://127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_request_failing_is_an_error(tmp_path: Path, sim_factory: Any) -> None:
    sim = sim_factory("--error-rate", "1")
    proc = bench(tmp_path, "--endpoint", sim.url, "--model", "sim", "--num-prompts", "3",
                 "--no-calibrate", check=False)  # fmt: skip
    assert proc.returncode == 1
    assert "every request failed; the first error: HTTP 500" in proc.stderr
    sweep = bench(tmp_path, "--endpoint", sim.url, "--model", "sim", "--sweep", "--num-prompts",
                  "3", "--no-calibrate", check=False)  # fmt: skip
    assert sweep.returncode == 1, sweep.stdout + sweep.stderr
    assert "completed no request" in sweep.stderr and "Traceback" not in sweep.stderr


def test_gpu_telemetry_is_aligned_to_each_step(tmp_path: Path, sim_factory: Any) -> None:
    sim = sim_factory("--ttft-ms", "5", "--itl-ms", "5")
    gpus = tmp_path / "gpus.json"
    gpus.write_text(json.dumps({"gpus": [
        {"name": "NVIDIA H100 80GB HBM3", "util": 80, "mem_used": 40 * 2**30,
         "mem_total": 80 * 2**30, "temp": 61, "power_mw": 300000,
         "energy_mj": "from_power", "sm_clock_mhz": 1980},
        {"name": "NVIDIA H100 80GB HBM3", "util": 20, "mem_used": 2**30,
         "mem_total": 80 * 2**30, "temp": 40, "power_mw": 100000,
         "energy_mj": "from_power", "sm_clock_mhz": 1410},
    ]}))  # fmt: skip
    out = tmp_path / "result.json"
    bench(tmp_path, "--endpoint", sim.url, "--model", "sim", "--concurrency", "1,4",
          "--duration", "1.5s", "--output-len", "16", "--telemetry-interval", "100ms",
          "-o", str(out), fake_nvml=gpus)  # fmt: skip
    doc = load(out)
    assert doc["telemetry"]["available"] is True and doc["telemetry"]["interval_s"] == 0.1
    assert doc["hardware"]["gpu_count"] == 2 and "H100" in doc["hardware"]["gpu_model"]
    for step in doc["steps"]:
        t = step["telemetry"]
        duration = step["window"]["duration_s"]
        assert t["samples"] >= 10  # ~1.5 s at 100 ms
        g0, g1 = t["gpus"]
        assert g0["utilization_pct"] == {"mean": 80.0, "max": 80.0}
        assert g1["sm_clock_mhz"]["max"] == 1410.0
        # 300 W + 100 W over the step's own window (counter delta, not the whole run).
        assert g0["energy_method"] == "counter"
        assert t["energy_j"] == pytest.approx(400 * duration, rel=0.05)
        tokens = step["metrics"]["output_tokens"]
        assert t["energy_per_output_token_j"] == pytest.approx(t["energy_j"] / tokens, rel=1e-3)
    series = (tmp_path / "result.telemetry.jsonl").read_text().splitlines()
    assert len(series) >= 2 * 30 and doc["files"]["telemetry"] == "result.telemetry.jsonl"
    assert "J/tok" in bench(tmp_path, "--endpoint", sim.url, "--model", "sim", "--num-prompts",
                            "3", "--output-len", "4", fake_nvml=gpus).stdout  # fmt: skip


def test_engine_args_only_where_the_agent_allows_them(tmp_path: Path) -> None:
    fake = REPO / "tests" / "fake_engine.py"
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    home = tmp_path / "home"
    home.mkdir()

    def configure(allow: bool) -> None:
        (home / "agent.yaml").write_text(yaml.safe_dump({
            "name": "gpu-01", "server_url": "http://127.0.0.1:1", "models_dir": str(tmp_path),
            "engines": {"fake": {
                "binary": sys.executable, "model_kind": "file", "allow_args": allow,
                "argv": ["{binary}", str(fake), "--host", "{host}", "--port", "{port}",
                         "--model", "{model}"]}},
        }))  # fmt: skip

    args = ("--engine", "fake", "--model", model.name, "--num-prompts", "1", "--no-calibrate",
            "--engine-args", "--max-num-seqs 64 '$(id)'")  # fmt: skip
    configure(allow=False)
    refused = bench(tmp_path, *args, check=False)
    assert refused.returncode == 1
    assert "does not accept engine_args on this agent" in refused.stderr
    configure(allow=True)
    ran = bench(tmp_path, *args, check=False)
    # The fake engine has no completions API, so the run fails, but after starting the engine
    # with the extra arguments as separate argv items (no shell expanded "$(id)").
    assert 'extra=["--max-num-seqs", "64", "$(id)"]' in ran.stdout, ran.stdout + ran.stderr
    assert "every request failed" in ran.stderr


def test_an_interrupted_run_keeps_the_steps_it_finished(tmp_path: Path, sim_factory: Any) -> None:
    sim = sim_factory("--ttft-ms", "2", "--itl-ms", "1")
    out = tmp_path / "r" / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KITT_")}
    env.update(KITT_HOME=str(tmp_path / "home"),
               PYTHONPATH=os.pathsep.join([str(FAKE_NVML_DIR), str(REPO / "src")]))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "kitt", "bench", "serve", "--no-progress", "--endpoint", sim.url,
         "--model", "sim", "--concurrency", "1,2,4", "--duration", "1s", "--output-len", "8",
         "-o", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    partial = tmp_path / "r" / "result.partial.json"
    try:
        wait_for(partial.exists, timeout=60, what="the first step's partial result")
    finally:
        proc.send_signal(signal.SIGTERM)  # what a cancelled test or systemd sends
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "interrupted" in output and "Traceback" not in output
    doc = load(partial)
    assert doc["partial"] is True and doc["steps"][0]["name"] == "c=1"
    assert len(doc["steps"]) < 3 and not out.exists()
    lines = (tmp_path / "r" / "result.partial.requests.jsonl").read_text().splitlines()
    assert {json.loads(x)["step"] for x in lines} == {s["name"] for s in doc["steps"]}
    # A complete run replaces the partial files with the result.
    bench(tmp_path, "--endpoint", sim.url, "--model", "sim", "--num-prompts", "3",
          "--output-len", "4", "-o", str(out))  # fmt: skip
    assert out.exists() and not partial.exists()
    assert not (tmp_path / "r" / "result.partial.requests.jsonl").exists()
