"""End to end with the real engine: llama.cpp's llama-server and the demo's generated model.

``kitt bench serve --engine`` directly; a ``serving`` test through server → agent →
engine → result stored → ``kitt results show``; cancel mid-run leaves no engine process;
``kitt demo`` to completion. Marked ``engine``: skipped where llama-server is not built
(``kitt bench prepare-demo``), run by CI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from conftest import Kitt, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


def engine_processes(binary: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["exe", "cmdline"]):
        try:
            if proc.info["exe"] == str(binary) or (proc.info["cmdline"] or [""])[0] == str(binary):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def configure_engine(kitt: Kitt, binary: Path, model: Path) -> None:
    """What an operator writes in agent.yaml: where llama-server and the models are."""
    cfg = kitt.home / "agent.yaml"
    data = yaml.safe_load(cfg.read_text()) if cfg.exists() else {}
    data["models_dir"] = str(model.parent)
    data["engines"] = {
        "llama.cpp": {
            "binary": str(binary),
            "argv": ["{binary}", "-m", "{model}", "--host", "{host}", "--port", "{port}",
                     "--alias", "{model_name}", "-np", "4", "-c", "4096", "-t", "1"],
        }
    }  # fmt: skip
    cfg.write_text(yaml.safe_dump(data))


def start_fleet(kitt: Kitt, binary: Path, model: Path) -> None:
    """A server and an agent configured to start llama-server, advertising it."""
    kitt.start_server()
    kitt.init_agent()
    configure_engine(kitt, binary, model)
    kitt.run("agent", "start", check=True)
    wait_for(lambda: "engine:llama.cpp" in kitt.agent("gpu-01")["capabilities"], timeout=30,
             what="the agent to advertise llama.cpp")  # fmt: skip


def test_bench_serve_starts_the_engine_measures_and_stops_it(
    kitt: Kitt, llama_server_binary: Path, demo_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "result.json"
    env_path = f"{llama_server_binary.parent}{os.pathsep}{kitt.env.get('PATH', '')}"
    kitt.env["PATH"] = env_path  # no agent.yaml: the shipped definition finds llama-server on PATH
    proc = kitt.run(
        "bench", "serve", "--engine", "llama.cpp", "--model", str(demo_model),
        "--concurrency", "1,4", "--num-prompts", "12", "--input-len", "32", "--output-len", "16",
        "--no-progress", "-o", str(out), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[llama.cpp]" in proc.stdout  # the engine's own log lines, prefixed
    doc = json.loads(out.read_text())
    assert doc["engine"]["name"] == "llama.cpp" and doc["engine"]["managed"] is True
    assert doc["engine"]["version"]
    for step in doc["steps"]:
        m = step["metrics"]
        assert m["errors"] == 0 and m["requests"] == 12
        # The demo model writes exactly max_tokens printable tokens, and says so in usage.
        assert m["output_tokens"] == 12 * 16
        assert m["token_check"] == {"usage_reported": 12, "chunk_mismatch": 0,
                                    "short_outputs": 0, "warnings": []}  # fmt: skip
        assert m["ttft_ms"]["p50"] > 0 and m["tpot_ms"]["count"] == 12
        assert m["e2e_ms"]["p50"] >= m["ttft_ms"]["p50"]
    # Calibrated against the model's own tokenizer: prompts are ~32 tokens.
    assert 20 <= doc["steps"][0]["metrics"]["input_tokens"] / 12 <= 44
    assert engine_processes(llama_server_binary) == []


def test_serving_through_the_fleet_and_cancel(
    kitt: Kitt, llama_server_binary: Path, demo_model: Path
) -> None:
    start_fleet(kitt, llama_server_binary, demo_model)

    # A bad parameter is refused at submission, by the agent, with the field named.
    bad = kitt.api("POST", "/api/v1/tests", json={
        "agent": "gpu-01", "benchmark": "serving", "engine": "vllm", "model": demo_model.name})  # fmt: skip
    assert bad.status_code == 400 and "cannot start engine 'vllm'" in bad.json()["error"]

    body = {"agent": "gpu-01", "benchmark": "serving", "engine": "llama.cpp",
            "model": demo_model.name,
            "params": {"concurrency": "1,2", "num_prompts": 10, "input_len": 16,
                       "output_len": 8}}  # fmt: skip
    test = kitt.api("POST", "/api/v1/tests", json=body).json()
    done = kitt.wait_status(test["id"], "completed", "failed", timeout=240)
    assert done["status"] == "completed", done
    result = done["result"]
    assert result["kind"] == "kitt.serving"
    assert [s["name"] for s in result["steps"]] == ["c=1", "c=2"]
    assert result["steps"][1]["metrics"]["output_tokens"] == 80
    assert result["engine"]["name"] == "llama.cpp"
    assert result["hardware"]["fingerprint"]

    # Stored and indexed on the server: results show/list name it with its numbers.
    shown = kitt.run("results", "show", test["id"], "--json", check=True)
    stored = json.loads(shown.stdout)
    assert stored["document"]["summary"] == result["summary"]
    listed = kitt.run("results", "list", "--engine", "llama.cpp", "--json", check=True)
    assert [r["id"] for r in json.loads(listed.stdout)] == [test["id"]]
    log = kitt.api(
        "GET", f"/api/v1/tests/{test['id']}/logs", headers={"Accept": "text/event-stream"}
    )
    assert "[llama.cpp]" in log.text and "c=2:" in log.text

    # Cancel mid-run: the engine it started goes away with it.
    long = dict(body, params={"concurrency": "1", "duration_s": 120, "output_len": 64})
    running = kitt.api("POST", "/api/v1/tests", json=long).json()
    wait_for(
        lambda: engine_processes(llama_server_binary), timeout=60, what="llama-server to start"
    )
    kitt.wait_status(running["id"], "running", timeout=60)
    assert kitt.api("POST", f"/api/v1/tests/{running['id']}/cancel").status_code in (200, 202)
    kitt.wait_status(running["id"], "cancelled", timeout=60)
    wait_for(lambda: not engine_processes(llama_server_binary), timeout=20,
             what="llama-server to be stopped")  # fmt: skip


def test_unknown_model_is_a_clear_test_error(
    kitt: Kitt, llama_server_binary: Path, demo_model: Path
) -> None:
    start_fleet(kitt, llama_server_binary, demo_model)
    test = kitt.api("POST", "/api/v1/tests", json={
        "agent": "gpu-01", "benchmark": "serving", "engine": "llama.cpp", "model": "missing.gguf",
    }).json()  # fmt: skip
    done: dict[str, Any] = kitt.wait_status(test["id"], "failed", timeout=60)
    log = kitt.run("test", "logs", test["id"], check=True).stdout
    assert "missing.gguf" in log and "not found" in log
    assert "Traceback" not in log
    # The test's own error says why, not only that the benchmark exited non-zero.
    assert done["error"].startswith("benchmark exited with status 1: model 'missing.gguf'")
    assert "not found on this agent" in done["error"]


def test_demo_runs_to_completion(
    tmp_path: Path, llama_server_binary: Path, demo_model: Path
) -> None:
    import subprocess

    home = tmp_path / "demo-home"
    out = tmp_path / "demo-result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kitt", "demo", "--home", str(home), "--concurrency", "1,4",
         "--num-prompts", "12", "--output", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
        env=dict(os.environ, KITT_HOME=str(tmp_path / "unused")),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "c=4" in proc.stdout and "kitt results show" in proc.stdout
    doc = json.loads(out.read_text())
    assert [s["name"] for s in doc["steps"]] == ["c=1", "c=4"]
    assert all(s["metrics"]["errors"] == 0 for s in doc["steps"])
    # Cleaned up: neither daemon nor the engine is left running.
    assert not (home / "agent.pid").exists() and not (home / "server" / "kitt.pid").exists()
    assert engine_processes(llama_server_binary) == []
