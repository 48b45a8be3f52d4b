"""Smoke test of the fleet-size load test (benchmarks/fleet_sim.py): a tiny fleet against a
real server, so the benchmark keeps working as the agent API evolves. Its figures are
only worth anything at size; here what matters is that every simulated behaviour really
happened on the server: beats answered, log lines stored, results applied, churned agents
registered again under their own id. It runs on the suite's database (SQLite, or with
KITT_TEST_DATABASE=postgresql a cluster of its own, made by tests/pg.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TEST_DATABASE

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fleet_sim.py"


def test_fleet_sim_small_fleet_heartbeats_tests_and_churn(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--agents", "20", "--interval", "1", "--seconds", "3",
         "--database", TEST_DATABASE, "--testing", "0.2", "--churn", "0.1", "--away", "0.5",
         "--test-seconds", "1", "--log-rate", "10", "--json", str(out)],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [row] = json.loads(out.read_text())
    assert (row["database"], row["agents"], row["tls"]) == (TEST_DATABASE, 20, False)
    assert row["errors"] == {} and row["error_total"] == 0, row["errors"]
    # 20 agents beating every ~1 s for 3 s, each from a random phase: about 60 beats.
    assert 40 <= row["hb_sent"] <= 80 and row["hb_ok"] == row["hb_sent"]
    assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert row["registered"] == 20
    assert row["churners"] == 2 and row["reregistered"] == 2  # same agent id back
    assert row["testers"] == 4 and row["submitted"] >= 4
    assert row["tests_started"] >= 1 and row["results"] >= 1
    # Every line posted was stored exactly once (the server's own count in its replies).
    assert row["log_lines"] == row["log_lines_sent"] > 0
    assert row["server_cpu_mean"] > 0 and row["server_rss_mib"] > 10
    assert f"{TEST_DATABASE} | 20 |" in proc.stdout  # the table row
