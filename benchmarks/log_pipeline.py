"""Log pipeline: benchmark stdout → agent → spool → server → SSE subscriber, end to end.

    python benchmarks/log_pipeline.py [--lines 200000] [--paced-rate 20000]

A real server and agent on loopback. The benchmark prints lines stamped with their emit
time; a subscriber on the server's SSE endpoint (httpx-sse) stamps their arrival. Two
runs: as fast as the benchmark can print (throughput, and whether every line arrives
exactly once and in order), then paced at a fixed rate (emit → subscriber latency at that
rate, where queueing from an unbounded burst does not hide the pipeline's own latency).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import httpx
import httpx_sse
import yaml
from _harness import Sandbox, free_port, percentile, server_sandbox, wait_heartbeat

HERE = Path(__file__).parent


def run_once(box: Sandbox, lines: int, rate: float) -> dict[str, float]:
    start = box.home.parent / f"start-{lines}-{rate}"
    admin = {"Authorization": f"Bearer {box.admin_token()}"}
    with box.user_client() as client:
        r = client.post("/api/v1/tests", json={
            "agent": "pipe", "benchmark": "emit",
            "params": {"LINES": lines, "RATE": rate, "START": str(start)}})  # fmt: skip
        r.raise_for_status()
        test = r.json()
        seqs: list[int] = []
        latencies: list[float] = []
        first_emit = last_recv = 0.0
        attached = threading.Event()

        def subscribe() -> None:
            nonlocal first_emit, last_recv
            with (
                httpx.Client(timeout=httpx.Timeout(10, read=120), headers=admin) as sub,
                httpx_sse.connect_sse(
                    sub, "GET", f"{box.url}/api/v1/tests/{test['id']}/logs"
                ) as source,
            ):
                source.response.raise_for_status()
                attached.set()
                for event in source.iter_sse():
                    if event.event == "end":
                        return
                    if event.event != "log":
                        continue
                    data = event.json()
                    recv = time.time_ns()
                    emit = int(data["line"].split(" ", 2)[1])
                    if not seqs:
                        first_emit = emit / 1e9
                    seqs.append(data["seq"])
                    latencies.append((recv - emit) / 1e6)
                    last_recv = recv / 1e9

        reader = threading.Thread(target=subscribe)
        reader.start()
        attached.wait(10)
        start.touch()
        reader.join(timeout=600)
    latencies.sort()
    return {
        "received": len(seqs),
        "in_order_once": float(seqs == list(range(1, lines + 1))),
        "rate": len(seqs) / max(last_recv - first_emit, 1e-9),
        "p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "max": latencies[-1],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--paced-rate", type=float, default=20_000)
    ap.add_argument("--paced-seconds", type=float, default=10)
    args = ap.parse_args()
    with server_sandbox() as box:
        port = free_port()
        box.kitt("agent", "init", "--server", box.url, "--name", "pipe", "--port", str(port),
                 "--bind", "127.0.0.1")  # fmt: skip
        cfg = box.home / "agent.yaml"
        data = yaml.safe_load(cfg.read_text())
        data["benchmarks"] = {"emit": {"command": [sys.executable, str(HERE / "_emit_lines.py")],
                                       "timeout_s": 600}}  # fmt: skip
        cfg.write_text(yaml.safe_dump(data))
        box.kitt("agent", "start")
        wait_heartbeat(box, "pipe", port)
        for label, lines, rate in (
            ("max rate", args.lines, 0.0),
            (
                f"paced {args.paced_rate:.0f}/s",
                int(args.paced_rate * args.paced_seconds),
                args.paced_rate,
            ),
        ):
            r = run_once(box, lines, rate)
            print(f"{label:14s}: {int(r['received'])}/{lines} lines received, "
                  f"{'all once, in order' if r['in_order_once'] else 'LOSS OR DISORDER'}; "
                  f"{r['rate']:,.0f} lines/s end to end; emit→subscriber p50 {r['p50']:.0f} ms, "
                  f"p99 {r['p99']:.0f} ms, max {r['max']:.0f} ms")  # fmt: skip
        box.kitt("agent", "stop")


if __name__ == "__main__":
    main()
