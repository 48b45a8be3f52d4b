"""The built-in ``serving`` benchmark through the fleet against an engine already running
on the agent's host (the simulator): what the server may ask of the agent, and the run."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import Kitt, free_port, wait_for


@pytest.fixture
def sim_url(kitt: Kitt) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kitt.bench.simulator", "--port", str(port), "--ttft-ms", "10",
         "--itl-ms", "2"],
        env=kitt.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=15, what="the simulator")
    yield url
    proc.terminate()
    proc.wait(10)


def test_serving_against_an_endpoint_on_the_agent_host(
    kitt: Kitt, sim_url: str, tmp_path: Path
) -> None:
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (datasets / "chat.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"question {i} " * 4, "output_len": 6}) for i in range(5))
    )
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"prompt": "private"}) + "\n")
    kitt.start_server()
    kitt.init_agent()
    cfg = kitt.home / "agent.yaml"
    data = yaml.safe_load(cfg.read_text())
    data.update(datasets_dir=str(datasets), allowed_endpoints=["http://inference.lab:8000"])
    cfg.write_text(yaml.safe_dump(data))
    kitt.run("agent", "start", check=True)
    wait_for(lambda: "serving" in kitt.agent("gpu-01")["capabilities"], timeout=30,
             what="the agent to register")  # fmt: skip

    def submit(params: dict[str, object], **extra: object) -> httpx.Response:
        body = {
            "agent": "gpu-01",
            "benchmark": "serving",
            "model": "sim",
            "params": params,
            **extra,
        }
        return kitt.api("POST", "/api/v1/tests", json=body)

    refused = {
        "a file outside datasets_dir": (
            {"endpoint": sim_url, "dataset": str(secret)},
            "outside this agent's datasets_dir",
        ),
        "a way out of it": (
            {"endpoint": sim_url, "dataset": "../secret.jsonl"},
            "outside this agent's datasets_dir",
        ),
        "another host": (
            {"endpoint": "http://10.9.8.7:8000"},
            "not in this agent's allowed_endpoints",
        ),
        "a look-alike of an allowed host": (
            {"endpoint": "http://inference.lab:8000.evil"},
            "allowed_endpoints",
        ),
        "the engine as a parameter": (
            {"endpoint": sim_url, "engine": "vllm"},
            "test's own 'engine' field",
        ),
        "a misspelt parameter": (
            {"endpoint": sim_url, "num_prompt": 5},
            "field 'num_prompt': unknown key",
        ),
        "an impossible one": ({"endpoint": sim_url, "concurrency": "4,-1"}, "must be > 0"),
    }
    for what, (params, message) in refused.items():
        r = submit(params)
        assert r.status_code == 202, (what, r.text)  # queued; the agent refuses it on dispatch
        done = kitt.wait_status(r.json()["id"], "failed", timeout=30)
        assert message in done["error"], (what, done["error"])

    r = submit({"endpoint": sim_url, "dataset": "chat.jsonl", "output_len_from_file": True,
                "concurrency": "1,2", "num_prompts": 6, "warmup": 1})  # fmt: skip
    done = kitt.wait_status(r.json()["id"], "completed", "failed", timeout=120)
    assert done["status"] == "completed", done
    result = done["result"]
    assert result["config"]["dataset"] == str(datasets / "chat.jsonl")
    assert [s["name"] for s in result["steps"]] == ["c=1", "c=2"]
    for step in result["steps"]:
        assert step["metrics"]["output_tokens"] == 6 * 6
        # The simulator waits 10 ms before the first token: never less, and a loaded
        # machine (parallel test workers) adds scheduling delay, not tens of ms more.
        assert 9.5 <= step["metrics"]["ttft_ms"]["p50"] <= 40
    listed = kitt.run("results", "list", "--json", check=True)
    assert [row["id"] for row in json.loads(listed.stdout)] == [done["id"]]
