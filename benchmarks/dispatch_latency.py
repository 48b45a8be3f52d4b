"""Dispatch latency on the push path: submit → the agent starts the benchmark.

    python benchmarks/dispatch_latency.py [--tests 200]

A real server and agent (loopback, temp KITT_HOME, heartbeat interval 30 s so that no
test rides a heartbeat) run a no-op custom benchmark (`/bin/true`) one test after
another. Latencies come from the server's stored timestamps, not from client polling:
``created_at`` (submit accepted) → ``dispatched_at`` (push sent) → ``started_at`` (the
agent's job thread started the subprocess; same host, same clock).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from datetime import datetime

import yaml
from _harness import free_port, percentile, server_sandbox, wait_heartbeat


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tests", type=int, default=200)
    args = ap.parse_args()
    true_bin = shutil.which("true") or "/bin/true"
    with server_sandbox("--heartbeat-interval", "30") as box:
        port = free_port()
        box.kitt("agent", "init", "--server", box.url, "--name", "bench", "--port", str(port),
                 "--bind", "127.0.0.1")  # fmt: skip
        cfg = box.home / "agent.yaml"
        data = yaml.safe_load(cfg.read_text())
        data["benchmarks"] = {"noop": {"command": [true_bin], "timeout_s": 30}}
        cfg.write_text(yaml.safe_dump(data))
        box.kitt("agent", "start")
        wait_heartbeat(box, "bench", port)
        to_dispatch, to_start = [], []
        with box.user_client() as client:
            for _ in range(args.tests):
                r = client.post("/api/v1/tests", json={"agent": "bench", "benchmark": "noop"})
                r.raise_for_status()
                test_id = r.json()["id"]
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    r = client.get(f"/api/v1/tests/{test_id}")
                    r.raise_for_status()
                    t = r.json()
                    if t["status"] in ("completed", "failed", "cancelled", "lost"):
                        break
                    time.sleep(0.01)
                if t["status"] != "completed":
                    raise SystemExit(f"test {test_id} ended {t['status']}: {t['error']}")
                created = datetime.fromisoformat(t["created_at"])
                to_dispatch.append(
                    (datetime.fromisoformat(t["dispatched_at"]) - created).total_seconds()
                )
                to_start.append((datetime.fromisoformat(t["started_at"]) - created).total_seconds())
        box.kitt("agent", "stop")
    for name, values in (("submit → push sent", to_dispatch), ("submit → agent running", to_start)):
        values.sort()
        print(f"{name:24s} over {len(values)} tests: p50 {percentile(values, 50) * 1000:6.1f} ms, "
              f"p90 {percentile(values, 90) * 1000:6.1f} ms, p99 {percentile(values, 99) * 1000:6.1f} ms, "
              f"mean {statistics.fmean(values) * 1000:6.1f} ms, max {values[-1] * 1000:6.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
