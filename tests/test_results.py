"""Results on the server: import, list, filter, show, compare, export, delete; a serving
result reported by a real agent; and hostile input, which must never get a 5xx.

Every server and agent is a real process (the ``kitt`` fixture); documents are built
here per the contract in docs/design-bench.md, with numbers chosen so that each value
the CLI prints or computes is known in advance.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import Kitt, free_port, wait_for
from kitt.cli.results import _delta_cell
from kitt.protocol import MAX_BODY_BYTES
from kitt.results_compare import (
    CSV_COLUMNS,
    Comparison,
    compare,
    csv_cell,
    delta_pct,
    noise_threshold,
)

STEP_METRICS = (
    "output_token_throughput", "request_throughput", "goodput", "ttft_ms.p50", "ttft_ms.p99",
    "tpot_ms.p50", "tpot_ms.p99", "itl_ms.p50", "e2e_ms.p50", "error_rate",
)  # fmt: skip


def _dist(p50: float, p99: float) -> dict[str, float]:
    return {"mean": p50 * 1.1, "std": p50 / 10, "min": p50 / 2, "max": p99 * 1.2, "p50": p50,
            "p90": (p50 + p99) / 2, "p95": p99 * 0.9, "p99": p99, "p99_9": p99 * 1.1,
            "count": 100}  # fmt: skip


def _step(name: str, concurrency: int, values: dict[str, float], run: int) -> dict[str, Any]:
    requests = 200
    errors = round(values["error_rate"] * requests)
    out = values["output_token_throughput"]
    return {
        "name": name,
        "load": {"mode": "concurrency", "concurrency": concurrency, "rate": None,
                 "arrival": None},
        "repeat_index": run,
        "window": {"start_s": 10.0 * run, "end_s": 10.0 * run + 30, "duration_s": 30.0},
        "metrics": {
            "requests": requests, "completed": requests - errors, "errors": errors,
            "error_rate": values["error_rate"],
            "request_throughput": values["request_throughput"],
            "output_token_throughput": out, "total_token_throughput": out * 3,
            "input_tokens": 25600, "output_tokens": 12800,
            "ttft_ms": _dist(values["ttft_ms.p50"], values["ttft_ms.p99"]),
            "tpot_ms": _dist(values["tpot_ms.p50"], values["tpot_ms.p99"]),
            "itl_ms": _dist(values["itl_ms.p50"], values["itl_ms.p50"] * 3),
            "e2e_ms": _dist(values["e2e_ms.p50"], values["e2e_ms.p50"] * 2),
            "queue_ms": _dist(0.1, 0.5), "output_tps_per_user": _dist(70, 90),
            "goodput": values["goodput"], "good_fraction": 0.9,
            "token_check": {"usage_reported": requests, "chunk_mismatch": 0,
                            "short_outputs": 0, "warnings": []},
            "client": {"schedule_lag_ms": {"p50": 0.1, "p99": 0.9}, "degraded": False,
                       "reasons": []},
            # Not in the contract: the server must keep it anyway (nothing is dropped).
            "custom": {"nested": [1, 2, {"deep": [3.5, None, "x"]}]},
        },
        "telemetry": {"available": True, "samples": 30, "gpus": [{
            "index": 0, "utilization_pct": {"mean": 80, "max": 99},
            "memory_used_gb": {"mean": 60, "max": 61.5}, "power_w": {"mean": 500, "max": 650},
            "temperature_c": {"mean": 60, "max": 71}, "sm_clock_mhz": {"mean": 1900, "max": 1980},
            "energy_j": 15000.0}], "energy_j": 15000.0, "energy_per_output_token_j": 1.25},
    }  # fmt: skip


def make_document(
    *,
    model: str,
    engine: str,
    version: str,
    gpu: str,
    gpu_count: int,
    hostname: str,
    started_at: str,
    steps: dict[str, tuple[int, dict[str, float]]],
    runs: int = 1,
    jitter: dict[str, float] | None = None,
    telemetry: bool = True,
) -> dict[str, Any]:
    """A valid ``kitt.serving`` document. ``steps``: name -> (concurrency, metric means);
    with ``runs`` > 1 each step runs ``runs`` times at mean - d, mean, mean + d for the
    ``jitter`` d of a metric (so its sample std is exactly d), and ``repeats`` is filled."""
    jitter = jitter or {}
    entries, repeats = [], []
    for name, (concurrency, means) in steps.items():
        per_run = []
        for run in range(runs):
            offset = (run - (runs - 1) / 2) if runs > 1 else 0.0
            values = {k: v + offset * jitter.get(k, 0.0) for k, v in means.items()}
            per_run.append(values)
            entries.append(_step(name, concurrency, values, run))
        if runs > 1:
            stats = {}
            for metric in STEP_METRICS:
                samples = [v[metric] for v in per_run]
                mean, std = statistics.mean(samples), statistics.stdev(samples)
                stats[metric] = {"mean": mean, "std": std, "cv": std / mean if mean else 0.0}
            repeats.append({"name": name, "runs": runs, "metrics": stats})
    best_name = max(steps, key=lambda n: steps[n][1]["output_token_throughput"])
    best = steps[best_name][1]
    summary = {
        "best_output_token_throughput": best["output_token_throughput"], "best_step": best_name,
        "ttft_ms_p50": best["ttft_ms.p50"], "ttft_ms_p99": best["ttft_ms.p99"],
        "tpot_ms_p50": best["tpot_ms.p50"], "tpot_ms_p99": best["tpot_ms.p99"],
        "itl_ms_p50": best["itl_ms.p50"], "e2e_ms_p50": best["e2e_ms.p50"],
        "request_throughput": best["request_throughput"], "goodput": best["goodput"],
        "error_rate": best["error_rate"],
    }  # fmt: skip
    levels = [c for c, _ in steps.values()]
    return {
        "schema_version": 1,
        "kind": "kitt.serving",
        "kitt_version": "0.5.0",
        "started_at": started_at,
        "finished_at": started_at.replace("T10:", "T11:"),
        "config": {
            "endpoint": "http://127.0.0.1:8081", "api": "completions", "model": model,
            "load": {"mode": "concurrency", "levels": levels}, "num_prompts": 200,
            "duration_s": None, "warmup_requests": 10, "warmup_s": None, "repeat": runs,
            "seed": 0, "data": {"kind": "synthetic", "input_len": 128, "output_len": 64},
            "slo": {"ttft_ms": 500, "tpot_ms": 50, "e2e_ms": None}, "ignore_eos": True,
            "timeout_s": 600,
        },
        "engine": {"name": engine, "version": version, "args": ["-c", "4096"], "managed": True,
                   "model_path": f"/models/{model}.gguf"},
        "hardware": {"hostname": hostname, "cpu": "AMD EPYC 9654", "cpu_count": 192,
                     "ram_gb": 1511.6,
                     "gpus": [{"index": i, "name": gpu, "memory_total_gb": 79.6}
                              for i in range(gpu_count)],
                     "gpu_count": gpu_count, "gpu_model": gpu, "driver": "560.35.03",
                     "fingerprint": f"fp-{hostname}"},
        "steps": entries,
        "repeats": repeats,
        "summary": summary,
        "telemetry": (
            {"available": True, "interval_s": 0.5, "series_file": "result.telemetry.jsonl"}
            if telemetry else
            {"available": False, "reason": "no NVIDIA GPU (NVML library not found)",
             "interval_s": 1.0, "series_file": None}
        ),
        "warnings": [f"{engine}: the tokenizer adds a BOS token"],
    }  # fmt: skip


def metrics(out: float, req: float, ttft: tuple[float, float], tpot: tuple[float, float],
            itl: float, e2e: float, goodput: float, error_rate: float) -> dict[str, float]:  # fmt: skip
    return {
        "output_token_throughput": out, "request_throughput": req, "goodput": goodput,
        "ttft_ms.p50": ttft[0], "ttft_ms.p99": ttft[1], "tpot_ms.p50": tpot[0],
        "tpot_ms.p99": tpot[1], "itl_ms.p50": itl, "e2e_ms.p50": e2e, "error_rate": error_rate,
    }  # fmt: skip


# Three runs on H100s (A: vLLM 0.6, B: vLLM 0.7, 20 % more output throughput, the same TTFT
# within its noise) and one on A100s without repeats or telemetry (C).
DOC_A = make_document(
    model="llama-3-8b", engine="vllm", version="0.6.0", gpu="NVIDIA H100 80GB HBM3",
    gpu_count=1, hostname="gpu-a", started_at="2026-11-01T10:00:00+00:00", runs=3,
    jitter={"output_token_throughput": 10.0, "ttft_ms.p50": 4.0},
    steps={
        "c=1": (1, metrics(100, 1.5, (20, 40), (10, 12), 10, 650, 1.5, 0.0)),
        "c=4": (4, metrics(350, 5.0, (30, 60), (11, 13), 11, 700, 5.0, 0.0)),
        "c=16": (16, metrics(1000, 12.0, (80, 200), (14, 20), 14, 950, 11.0, 0.01)),
    },
)  # fmt: skip
DOC_B = make_document(
    model="llama-3-8b", engine="vllm", version="0.7.0", gpu="NVIDIA H100 80GB HBM3",
    gpu_count=1, hostname="gpu-b", started_at="2026-11-02T10:00:00+00:00", runs=3,
    jitter={"output_token_throughput": 10.0, "ttft_ms.p50": 4.0},
    steps={
        "c=1": (1, metrics(110, 1.6, (19, 38), (9, 11), 9, 600, 1.6, 0.0)),
        "c=4": (4, metrics(400, 5.5, (29, 58), (10, 12), 10, 680, 5.5, 0.0)),
        "c=16": (16, metrics(1200, 14.0, (82, 190), (12, 18), 12, 900, 13.5, 0.005)),
    },
)  # fmt: skip
DOC_C = make_document(
    model="tiny-llama", engine="llama.cpp", version="b6000", gpu="NVIDIA A100-SXM4-40GB",
    gpu_count=2, hostname="cpu-box", started_at="2026-11-03T10:00:00+00:00", telemetry=False,
    steps={
        "c=1": (1, metrics(50, 0.8, (25, 45), (20, 25), 20, 1300, 0.8, 0.0)),
        "c=8": (8, metrics(300, 4.0, (60, 150), (25, 40), 25, 1600, 3.0, 0.02)),
    },
)  # fmt: skip


def write(tmp: Path, name: str, document: Any) -> Path:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


def run_ok(kitt: Kitt, *args: str) -> str:
    proc = kitt.run(*args)
    assert proc.returncode == 0, f"kitt {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    assert not proc.stderr or "Traceback" not in proc.stderr
    return proc.stdout


def run_json(kitt: Kitt, *args: str) -> Any:
    return json.loads(run_ok(kitt, *args, "--json"))


def import_file(kitt: Kitt, path: Path) -> str:
    out = run_ok(kitt, "results", "import", str(path))
    assert "imported as res_" in out, out
    return out.split()[-1]


# --- import, list, show, compare, export, delete ------------------------------------------


def test_import_list_show_compare_export_delete(kitt: Kitt, tmp_path: Path) -> None:
    kitt.start_server()
    ids = {name: import_file(kitt, write(tmp_path, name, doc))
           for name, doc in (("a", DOC_A), ("b", DOC_B), ("c", DOC_C))}  # fmt: skip
    assert len(set(ids.values())) == 3

    # Importing the same document again finds it (its id is a hash of its content).
    again = run_ok(kitt, "results", "import", str(tmp_path / "a.json"))
    assert again.strip().endswith(f"already stored as {ids['a']}")
    assert kitt.api("POST", "/api/v1/results", json=DOC_A).json() == {
        "id": ids["a"], "created": False}  # fmt: skip

    # list: newest run first, the indexed fields from the document.
    rows = run_json(kitt, "results", "list")
    assert [r["id"] for r in rows] == [ids["c"], ids["b"], ids["a"]]
    b = rows[1]
    assert b == {
        "id": ids["b"], "test_id": None, "source": "import", "agent_name": "gpu-b",
        "model": "llama-3-8b", "engine": "vllm", "engine_version": "0.7.0",
        "gpu_model": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "hardware_fingerprint": "fp-gpu-b",
        "created_at": "2026-11-02T10:00:00Z", "best_step": "c=16",
        "best_output_token_throughput": 1200.0, "request_throughput": 14.0,
        "ttft_ms_p50": 82.0, "ttft_ms_p99": 190.0, "tpot_ms_p50": 12.0, "tpot_ms_p99": 18.0,
        "itl_ms_p50": 12.0, "e2e_ms_p50": 900.0, "goodput": 13.5, "error_rate": 0.005,
    }  # fmt: skip

    def listed(*filters: str) -> list[str]:
        return [r["id"] for r in run_json(kitt, "results", "list", *filters)]

    assert listed("--gpu", "h100") == [ids["b"], ids["a"]]
    assert listed("--engine", "llama.cpp") == [ids["c"]]
    assert listed("--model", "llama-3-8b", "--agent", "gpu-a") == [ids["a"]]
    assert listed("--since", "2026-11-02T00:00:00Z") == [ids["c"], ids["b"]]
    assert listed("--until", "2026-11-02T11:59:00+02:00") == [ids["a"]]
    assert listed("--limit", "1") == [ids["c"]]
    assert listed("--engine", "sglang") == []
    assert run_ok(kitt, "results", "list", "--engine", "sglang").strip() == "no results"
    page = kitt.api("GET", "/api/v1/results", params={"limit": 1, "offset": 1}).json()
    assert [r["id"] for r in page["results"]] == [ids["b"]]

    table = run_ok(kitt, "results", "list")
    line_b = next(line for line in table.splitlines() if line.startswith(ids["b"]))
    for cell in ("2026-11-02 10:00", "gpu-b", "NVIDIA H100 80GB HBM3", "vllm 0.7.0",
                 "llama-3-8b", "1200", "82.0", "190", "12.0", "0.50%"):  # fmt: skip
        assert cell in line_b, (cell, line_b)
    assert "2x NVIDIA A100-SXM4-40GB" in table

    # show --json: the document exactly as imported, nested extras included.
    shown = run_json(kitt, "results", "show", ids["a"])
    assert shown["document"] == DOC_A
    assert shown["document"]["steps"][0]["metrics"]["custom"]["nested"][2]["deep"] == [
        3.5, None, "x"]  # fmt: skip

    text = run_ok(kitt, "results", "show", ids["b"])
    for expected in ("endpoint: http://127.0.0.1:8081", '"input_len": 128', "version: 0.7.0",
                     "gpu_model: NVIDIA H100 80GB HBM3", "fingerprint: fp-gpu-b",
                     "GPU telemetry per step", "sampled every 0.50 s",
                     "vllm: the tokenizer adds a BOS token", "repeats (across runs)"):  # fmt: skip
        assert expected in text, expected
    # The c=16 runs: 1190, 1200 and 1210 out tok/s; TTFT p50 78, 82, 86 ms; 1 error in 200.
    step_lines = [
        line.split()
        for line in text.splitlines()
        if line.startswith("c=16 #") and "concurrency" in line
    ]
    assert [(s[1], s[5], s[6]) for s in step_lines] == [
        ("#1", "1190", "78.0"), ("#2", "1200", "82.0"), ("#3", "1210", "86.0")]  # fmt: skip
    assert all(s[-1] == "1/200" for s in step_lines)
    shown_c = run_ok(kitt, "results", "show", ids["c"])
    assert "telemetry: not available (no NVIDIA GPU (NVML library not found))" in shown_c
    assert "repeats" not in shown_c

    # compare A B: deltas against A, and the noise rule from both sides' repeats.
    cmp = run_json(kitt, "results", "compare", ids["a"], ids["b"])
    assert cmp["baseline"] == ids["a"] and cmp["results"] == [ids["a"], ids["b"]]
    assert cmp["noise_known"] is True
    by_key = {(r["scope"], r["metric"]): r for r in cmp["rows"]}
    best = by_key[("summary", "best_output_token_throughput")]
    assert best["values"] == [1000.0, 1200.0] and best["better"] == "higher"
    assert best["delta_pct"] == [None, pytest.approx(20.0)]
    # std 10 on each side: threshold 2*sqrt(10^2 + 10^2) = 28.28; |1200 - 1000| exceeds it.
    assert best["std"] == [pytest.approx(10.0), pytest.approx(10.0)]
    assert best["noise_threshold"][1] == pytest.approx(2 * math.sqrt(200))
    assert best["exceeds_noise"] == [None, True]
    ttft = by_key[("summary", "ttft_ms_p50")]
    # 80 -> 82 ms is +2.5 %, but the threshold is 2*sqrt(4^2 + 4^2) = 11.3 ms: noise.
    assert ttft["delta_pct"][1] == pytest.approx(2.5) and ttft["better"] == "lower"
    assert ttft["noise_threshold"][1] == pytest.approx(2 * math.sqrt(32))
    assert ttft["exceeds_noise"] == [None, False]
    c4 = by_key[("c=4", "output_token_throughput")]
    assert c4["values"] == [pytest.approx(350.0), pytest.approx(400.0)]
    assert c4["delta_pct"][1] == pytest.approx(100 * 50 / 350)
    assert by_key[("c=4", "e2e_ms.p50")]["delta_pct"][1] == pytest.approx(100 * -20 / 700)
    # error rate 0 -> 0 is 0 %; 0.01 -> 0.005 is -50 %.
    assert by_key[("c=1", "error_rate")]["delta_pct"][1] == 0.0
    assert by_key[("summary", "error_rate")]["delta_pct"][1] == pytest.approx(-50.0)
    assert {scope for scope, _ in by_key} == {"summary", "c=1", "c=4", "c=16"}

    table = run_ok(kitt, "results", "compare", ids["a"], ids["b"])
    best_line = next(line for line in table.splitlines() if "out tok/s" in line)
    assert "1000" in best_line and "1200 (+20.0%*)" in best_line
    ttft_line = next(line for line in table.splitlines() if "TTFT p50 ms" in line)
    assert "82.0 (+2.5%~)" in ttft_line
    assert "(baseline)" in table and "noise: unknown" not in table

    # compare C A: C has no repeats, so noise is unknown; only the common step c=1 shows.
    cmp = run_json(kitt, "results", "compare", ids["c"], ids["a"])
    assert cmp["noise_known"] is False
    assert {r["scope"] for r in cmp["rows"]} == {"summary", "c=1"}
    assert all(r["exceeds_noise"] == [None, None] for r in cmp["rows"])
    table = run_ok(kitt, "results", "compare", ids["c"], ids["a"])
    assert "noise: unknown" in table and "(+233.3%?)" in table  # best out tok/s 300 -> 1000

    # export CSV: one row per step run, the documented columns.
    out = run_ok(kitt, "results", "export", "--format", "csv")
    reader = csv.DictReader(io.StringIO(out))
    assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
    exported = list(reader)
    assert len(exported) == 9 + 9 + 2
    assert [r["result_id"] for r in exported[:2]] == [ids["c"], ids["c"]]
    c8 = exported[1]
    assert {k: c8[k] for k in ("agent", "gpu_model", "gpu_count", "engine", "engine_version",
                               "model", "step", "repeat_index", "load_mode", "concurrency",
                               "rate", "requests", "errors", "error_rate",
                               "output_token_throughput", "ttft_ms_p50", "ttft_ms_p99",
                               "tpot_ms_p50", "itl_ms_p50", "e2e_ms_p50", "goodput",
                               "energy_per_output_token_j")} == {
        "agent": "cpu-box", "gpu_model": "NVIDIA A100-SXM4-40GB", "gpu_count": "2",
        "engine": "llama.cpp", "engine_version": "b6000", "model": "tiny-llama", "step": "c=8",
        "repeat_index": "0", "load_mode": "concurrency", "concurrency": "8", "rate": "",
        "requests": "200", "errors": "4", "error_rate": "0.02",
        "output_token_throughput": "300", "ttft_ms_p50": "60", "ttft_ms_p99": "150",
        "tpot_ms_p50": "25", "itl_ms_p50": "25", "e2e_ms_p50": "1600", "goodput": "3",
        "energy_per_output_token_j": "1.25",
    }  # fmt: skip
    b16 = [r for r in exported if r["result_id"] == ids["b"] and r["step"] == "c=16"]
    assert [r["output_token_throughput"] for r in b16] == ["1190", "1200", "1210"]

    # export JSON to a file, filtered: whole results, documents included.
    target = tmp_path / "h100.json"
    proc = kitt.run("results", "export", "--gpu", "H100", "--format", "json", "-o", str(target))
    assert proc.returncode == 0 and "2 results written" in proc.stderr
    whole = json.loads(target.read_text())
    assert [r["id"] for r in whole] == [ids["b"], ids["a"]]
    assert whole[0]["document"] == DOC_B

    # delete: gone from the list, and then unknown.
    assert run_ok(kitt, "results", "delete", ids["c"]).strip() == f"result {ids['c']} deleted"
    assert listed() == [ids["b"], ids["a"]]
    for args in (("show", ids["c"]), ("delete", ids["c"]), ("compare", ids["a"], ids["c"])):
        proc = kitt.run("results", *args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert proc.stderr.strip() == f"error: no result {ids['c']}"
    assert kitt.api("GET", f"/api/v1/results/{ids['c']}").status_code == 404


# --- a serving result reported by a real agent --------------------------------------------

COPY_RESULT = "import os, shutil, sys; shutil.copy(sys.argv[1], os.environ['KITT_RESULT_FILE'])"


def add_copy_benchmark(kitt: Kitt, name: str, document: Any, tmp: Path) -> None:
    """A custom benchmark whose result is ``document`` (as a serving run would write)."""
    source = write(tmp, f"bench-{name}", document)
    cfg = kitt.home / "agent.yaml"
    data = yaml.safe_load(cfg.read_text())
    argv = [sys.executable, "-c", COPY_RESULT, str(source)]
    data.setdefault("benchmarks", {})[name] = {"command": argv, "timeout_s": 60}
    cfg.write_text(yaml.safe_dump(data))


def test_agent_serving_result_is_indexed_once(kitt: Kitt, tmp_path: Path) -> None:
    kitt.start_server()
    kitt.init_agent("gpu-01")
    broken = {k: v for k, v in DOC_B.items() if k != "summary"}
    add_copy_benchmark(kitt, "serving-like", DOC_B, tmp_path)
    add_copy_benchmark(kitt, "serving-broken", broken, tmp_path)
    kitt.add_benchmark("lines", "lines_and_result.py", timeout_s=60)
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("gpu-01").get("status") == "idle", what="agent idle")

    test = kitt.submit("serving-like")
    done = kitt.wait_status(test["id"], "completed")
    assert done["result"] == DOC_B  # the test keeps its result, as before

    rows = run_json(kitt, "results", "list", "--agent", "gpu-01")
    assert [(r["id"], r["test_id"], r["source"]) for r in rows] == [
        (test["id"], test["id"], "fleet")]  # fmt: skip
    assert rows[0]["agent_name"] == "gpu-01"  # the agent, not the document's hostname
    assert rows[0]["best_output_token_throughput"] == 1200.0
    assert rows[0]["ttft_ms_p99"] == 190.0 and rows[0]["gpu_model"] == "NVIDIA H100 80GB HBM3"
    assert run_json(kitt, "results", "show", test["id"])["document"] == DOC_B
    assert "1200" in run_ok(kitt, "results", "show", test["id"])

    # The agent delivers at least once: the same report again changes nothing.
    report = {"command_id": done["command_id"], "test_id": test["id"], "status": "completed",
              "result": DOC_B}  # fmt: skip
    agent_id = kitt.agent("gpu-01")["id"]
    again = kitt.api("POST", f"/api/v1/agents/{agent_id}/results", json=report,
                     token=kitt.agent_config()["token"])  # fmt: skip
    assert again.status_code == 202 and again.json()["changed"] is False
    assert len(run_json(kitt, "results", "list")) == 1

    # A custom benchmark's own result, and a broken serving document, stay on their tests.
    lines = kitt.submit("lines", lines=2)
    broken_test = kitt.submit("serving-broken")
    assert kitt.wait_status(lines["id"], "completed")["result"]["lines"] == 2
    assert kitt.wait_status(broken_test["id"], "completed")["result"] == broken
    assert [r["id"] for r in run_json(kitt, "results", "list")] == [test["id"]]
    assert kitt.api("GET", f"/api/v1/results/{lines['id']}").status_code == 404


# --- a document from `kitt bench serve` itself ----------------------------------------------


def test_a_real_bench_serve_document_round_trips(kitt: Kitt, tmp_path: Path) -> None:
    """What `kitt bench serve --output` writes (against the fixture engine) imports, shows
    and compares: the contract between the benchmark and the server holds."""
    port = free_port()
    # Two GPUs behind the NVML stand-in, drawing 300 W + 100 W: the benchmark's telemetry
    # must reach `results show` and the CSV export.
    kitt.fake_gpus([
        {"name": "NVIDIA H100 80GB HBM3", "util": 90, "mem_used": 60 * 2**30,
         "mem_total": 80 * 2**30, "temp": 70, "power_mw": 300000, "energy_mj": "from_power"},
        {"name": "NVIDIA H100 80GB HBM3", "util": 10, "mem_used": 2**30,
         "mem_total": 80 * 2**30, "temp": 40, "power_mw": 100000, "energy_mj": "from_power"},
    ])  # fmt: skip
    sim = subprocess.Popen(
        [sys.executable, "-m", "kitt.bench.simulator", "--port", str(port), "--ttft-ms", "20",
         "--itl-ms", "5"],
        env=kitt.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/health", timeout=1).status_code == 200,
                 what="the simulator")  # fmt: skip
        out = tmp_path / "run" / "result.json"
        run_ok(kitt, "bench", "serve", "--no-progress", "--endpoint", url, "--model", "sim",
               "--concurrency", "1,4", "--num-prompts", "12", "--input-len", "16",
               "--output-len", "8", "--repeat", "2", "--telemetry-interval", "100ms",
               "-o", str(out))  # fmt: skip
    finally:
        sim.terminate()
        sim.wait(10)
    document = json.loads(out.read_text())
    kitt.start_server()
    result_id = import_file(kitt, out)
    row = run_json(kitt, "results", "list")[0]
    assert row["id"] == result_id and row["model"] == "sim"
    summary = document["summary"]
    assert row["best_step"] == summary["best_step"] in ("c=1", "c=4")
    assert row["ttft_ms_p50"] == summary["ttft_ms_p50"]
    assert 19.5 <= summary["ttft_ms_p50"] <= 50  # injected 20 ms, plus any scheduling delay
    assert row["best_output_token_throughput"] == summary["best_output_token_throughput"] > 0
    assert run_json(kitt, "results", "show", result_id)["document"] == document
    shown = run_ok(kitt, "results", "show", result_id)
    assert "c=4 #2" in shown and "GPU telemetry per step" in shown
    gpu_table = shown.split("GPU telemetry per step", 1)[1].splitlines()
    telemetry_rows = [line.split() for line in gpu_table if line.startswith("c=4 #1 ")]
    # step, #, GPU index, util mean, util max: each GPU's own readings.
    assert [row[2:5] for row in telemetry_rows] == [["0", "90.0", "90.0"], ["1", "10.0", "10.0"]]
    # Against itself: no change, and the repeats make the noise known.
    cmp = run_json(kitt, "results", "compare", result_id, result_id)
    assert cmp["noise_known"] is True
    step_rows = [r for r in cmp["rows"] if r["scope"] == "c=4"]
    measured = [r for r in step_rows if r["values"][0] is not None]
    # Everything but goodput, which needs an SLO (none was given: null, and no delta).
    assert [r["metric"] for r in step_rows if r not in measured] == ["goodput"]
    assert len(measured) == 9 and all(r["delta_pct"] == [None, 0.0] for r in measured)
    ttft = next(r for r in step_rows if r["metric"] == "ttft_ms.p50")
    assert ttft["exceeds_noise"] == [None, False] and ttft["std"][0] is not None
    csv_rows = list(csv.DictReader(io.StringIO(run_ok(kitt, "results", "export"))))
    assert sorted((r["step"], r["repeat_index"]) for r in csv_rows) == [
        ("c=1", "0"), ("c=1", "1"), ("c=4", "0"), ("c=4", "1")]  # fmt: skip
    assert {r["requests"] for r in csv_rows} == {"12"}
    for r in csv_rows:  # 400 W over the step, per output token
        step = next(s for s in document["steps"]
                    if (s["name"], str(s["repeat_index"])) == (r["step"], r["repeat_index"]))  # fmt: skip
        joules = 400 * step["window"]["duration_s"]
        assert float(r["energy_per_output_token_j"]) == pytest.approx(
            joules / step["metrics"]["output_tokens"], rel=0.1
        )


# --- hostile input ------------------------------------------------------------------------


def test_hostile_input_is_refused_clearly(kitt: Kitt, tmp_path: Path) -> None:
    kitt.start_server()

    def post(content: Any) -> httpx.Response:
        return kitt.api("POST", "/api/v1/results", content=content,
                        headers={"Content-Type": "application/json"})  # fmt: skip

    def refused(response: httpx.Response, status: int, *words: str) -> None:
        assert response.status_code == status, response.text
        message = response.json()["error"]
        for word in words:
            assert word in message, (word, message)

    without = lambda key: json.dumps({k: v for k, v in DOC_C.items() if k != key})  # noqa: E731
    refused(post(b"{not json"), 400, "not valid JSON")
    refused(post(b""), 400, "not valid JSON")
    refused(post(b"[1, 2]"), 400, "JSON object, not list")
    refused(post(json.dumps({**DOC_C, "schema_version": 2})), 400,
            "unsupported schema_version 2", "version 1")  # fmt: skip
    refused(post(json.dumps({**DOC_C, "schema_version": True})), 400, "schema_version true")
    refused(post(without("schema_version")), 400, "unsupported schema_version null")
    refused(post(json.dumps({**DOC_C, "kind": "custom"})), 400, "not a serving result")
    refused(post(without("summary")), 400, "summary: Field required")
    refused(post(json.dumps({**DOC_C, "summary": {"ttft_ms_p50": "fast"}})), 400,
            "summary.ttft_ms_p50")  # fmt: skip
    refused(post(json.dumps({**DOC_C, "steps": [{"metrics": {}}]})), 400, "steps.0.name")
    refused(post(json.dumps({**DOC_C, "hardware": {"gpu_count": -1}})), 400,
            "hardware.gpu_count")  # fmt: skip
    refused(post(json.dumps(DOC_C).replace('"goodput": 3.0', '"goodput": NaN', 1)), 400,
            "NaN is not a JSON number")  # fmt: skip
    refused(post(json.dumps(DOC_C).replace('"goodput": 3.0', '"goodput": 1e999', 1)), 400,
            "out of range")  # fmt: skip
    refused(post(b'{"a": ' * 100_000), 400, "not valid JSON")  # nested past any recursion
    huge = json.dumps({**DOC_C, "padding": "x" * MAX_BODY_BYTES})
    refused(post(huge), 413, "too large")
    # Chunked (no Content-Length): the same limit.
    chunks = iter([huge[i : i + 65536].encode() for i in range(0, len(huge), 65536)])
    refused(post(chunks), 413, "too large")

    def listing(**params: Any) -> httpx.Response:
        return kitt.api("GET", "/api/v1/results", params=params)

    refused(listing(limit="ten"), 400, "'limit' must be an integer")
    refused(listing(limit=0), 400, "'limit' must be between 1 and 1000")
    refused(listing(limit=10**30), 400, "'limit' must be between")
    refused(listing(offset=-1), 400, "'offset' must be between 0 and")
    refused(listing(offset=10**30), 400, "'offset' must be between 0 and")
    refused(listing(since="yesterday"), 400, "'since' must be an ISO 8601 time")
    refused(listing(until="2026-11-02T00:00:00"), 400, "'until' must carry a time zone")
    refused(listing(since="0001-01-01T00:00:00+01:00"), 400, "'since' is out of range")
    assert listing(agent="", gpu="").json() == {"results": []}  # an empty filter: no filter
    refused(listing(limit=""), 400, "'limit' must be an integer")  # the schema says integer
    assert listing(since="", until="").json() == {"results": []}  # documented: no limit
    assert listing(gpu="%_\\").json() == {"results": []}  # LIKE wildcards are literal

    refused(kitt.api("GET", "/api/v1/results/nope"), 404, "no result 'nope'")
    refused(kitt.api("GET", "/api/v1/results/a.b"), 400, "invalid result id")
    refused(kitt.api("DELETE", "/api/v1/results/nope"), 404, "no result 'nope'")
    refused(kitt.api("GET", "/api/v1/results", token=None), 401)
    refused(kitt.api("POST", "/api/v1/results", token="wrong", json=DOC_C), 401)
    refused(kitt.api("PUT", "/api/v1/results/nope"), 405)

    # The CLI: one clear line and exit 1, never a traceback.
    def fails(*args: str, code: int = 1) -> str:
        proc = kitt.run(*args)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        return proc.stderr

    assert "is not valid JSON" in fails("results", "import", str(write(tmp_path, "bad", "{x")))
    assert "holds a JSON list" in fails("results", "import", str(write(tmp_path, "l", [1])))
    stale = write(tmp_path, "v2", {**DOC_C, "schema_version": 2})
    assert "server answered 400: unsupported schema_version 2" in fails(
        "results", "import", str(stale))  # fmt: skip
    big = write(tmp_path, "big", {**DOC_C, "padding": "x" * MAX_BODY_BYTES})
    assert "the server takes at most 1048576" in fails("results", "import", str(big))
    assert "cannot read" in fails("results", "import", str(tmp_path / "missing.json"))
    assert fails("results", "show", "nope").strip() == "error: no result nope"
    assert fails("results", "show", "../agents").strip().startswith("error: no result ../agents")
    assert "at least two" in fails("results", "compare", "only-one", code=2)
    assert "neither a duration" in fails("results", "list", "--since", "soon", code=2)
    # Several files: each is reported, the good ones stored, exit 1 for the bad one.
    good = write(tmp_path, "good", DOC_C)
    proc = kitt.run("results", "import", str(good), str(stale))
    assert proc.returncode == 1 and "imported as res_" in proc.stdout
    assert "v2.json: server answered 400" in proc.stderr
    assert len(kitt.api("GET", "/api/v1/results").json()["results"]) == 1

    # Strings from a document are printed as text, never as rich markup.
    hostile = make_document(
        model="[red]boom[/red]", engine="[bold]eng", version="1", gpu="[link=x]gpu",
        gpu_count=1, hostname="[blink]host", started_at="2026-11-05T10:00:00+00:00",
        steps={"[i]step": (1, metrics(10, 1, (1, 2), (1, 2), 1, 10, 1, 0))},
    )  # fmt: skip
    hostile["warnings"] = ["[/] unbalanced close tag"]
    hostile_id = import_file(kitt, write(tmp_path, "hostile", hostile))
    listed = run_ok(kitt, "results", "list", "--model", "[red]boom[/red]")
    assert "[red]boom[/red]" in listed and "[blink]host" in listed and "[link=x]gpu" in listed
    shown = run_ok(kitt, "results", "show", hostile_id)
    assert "[/] unbalanced close tag" in shown and "[i]step" in shown
    compared = run_ok(kitt, "results", "compare", hostile_id, hostile_id)
    assert "[i]step" in compared and "(+0.0%?)" in compared


# --- the comparison rules, without processes -----------------------------------------------


def test_delta_and_noise_rules() -> None:
    assert delta_pct(200.0, 150.0) == -25.0
    assert delta_pct(-10.0, -5.0) == 50.0  # relative to |base|
    assert delta_pct(0.0, 0.0) == 0.0
    assert delta_pct(0.0, 1.0) is None and delta_pct(None, 1.0) is None
    assert noise_threshold(3.0, 4.0) == 10.0  # 2 * sqrt(9 + 16)
    assert noise_threshold(None, 4.0) is None

    lower = Comparison("summary", "ttft_ms_p50", "TTFT", "lower", [100.0, 80.0, 120.0, 101.0],
                       [1.0, 1.0, None, 1.0])  # fmt: skip
    assert lower.deltas_pct == [None, -20.0, 20.0, pytest.approx(1.0)]
    assert lower.exceeds_noise == [None, True, None, False]
    assert _delta_cell(lower, 1) == "[green]80.0 (-20.0%*)[/]"  # lower latency: better
    assert _delta_cell(lower, 2) == "[red]120 (+20.0%?)[/]"
    assert _delta_cell(lower, 3) == "[dim]101 (+1.0%~)[/]"
    higher = Comparison("summary", "goodput", "goodput", "higher", [10.0, 12.0, None],
                        [None, None, None])  # fmt: skip
    assert _delta_cell(higher, 1) == "[green]12.0 (+20.0%?)[/]"
    assert _delta_cell(higher, 2) == "-"
    # A change too small to show is no change: no colour, never "-0.0".
    tiny = Comparison("summary", "goodput", "goodput", "higher", [100.0, 100.03, 99.97, 100.06],
                      [None] * 4)  # fmt: skip
    assert [_delta_cell(tiny, i) for i in (1, 2, 3)] == [
        "100 (+0.0%?)",
        "100.0 (+0.0%?)",
        "[green]100 (+0.1%?)[/]",
    ]

    # A step missing from every other result is left out; one in some of them is kept.
    rows = compare([DOC_A, DOC_C, DOC_B])
    assert {r.scope for r in rows} == {"summary", "c=1", "c=4", "c=16"}
    c16 = next(r for r in rows if r.scope == "c=16" and r.metric == "output_token_throughput")
    assert c16.values == [pytest.approx(1000.0), None, pytest.approx(1200.0)]


def test_csv_cells_cannot_become_spreadsheet_formulas() -> None:
    assert csv_cell('=HYPERLINK("http://x")') == '\'=HYPERLINK("http://x")'
    assert csv_cell("@SUM(A1)") == "'@SUM(A1)" and csv_cell("+1") == "'+1"
    assert csv_cell("llama-3-8b") == "llama-3-8b"
    assert csv_cell(-5.0) == -5 and csv_cell(2.5) == 2.5 and csv_cell(None) == ""
