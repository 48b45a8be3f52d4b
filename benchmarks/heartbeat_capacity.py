"""Server heartbeat capacity: N registered agents heartbeating round-robin over keep-alive.

Two measurements against a real `kitt server` (SQLite, fresh KITT_HOME):

* **open loop** at fixed offered rates (default 500, 1,000, 1,500 and 2,000/s): requests
  are sent on a fixed schedule whatever the server does, and latency counts from the
  *scheduled* send time, so a server that falls behind shows it in p99 instead of
  silently slowing the client;
* **saturation** (closed loop, C connections each with one request in flight): the
  highest rate the server sustains.

    python benchmarks/heartbeat_capacity.py [--agents 1000] [--rates 500,1000,1500,2000] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics

import psutil
from _harness import (
    Connection,
    heartbeat_body,
    heartbeat_request,
    now,
    percentile,
    register_agents,
    server_sandbox,
)


async def open_loop(
    port: int, requests: list[bytes], rate: float, seconds: float, conns: int
) -> dict[str, float]:
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(await Connection.open(port))
    latencies: list[float] = []
    errors = 0
    total = int(rate * seconds)
    cycle = itertools.cycle(requests)
    start = now() + 0.05

    async def one(scheduled: float, payload: bytes) -> None:
        nonlocal errors
        conn = await pool.get()
        try:
            status = await conn.roundtrip(payload)
            if status != 200:
                errors += 1
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
            conn = await Connection.open(port)
        finally:
            pool.put_nowait(conn)
        latencies.append(now() - scheduled)

    tasks = []
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled, next(cycle))))
    await asyncio.gather(*tasks)
    elapsed = now() - start
    latencies.sort()
    return {
        "sent": total, "elapsed_s": elapsed, "achieved_per_s": total / elapsed, "errors": errors,
        "p50_ms": percentile(latencies, 50) * 1000, "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000, "max_ms": latencies[-1] * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
    }  # fmt: skip


async def closed_loop(
    port: int, requests: list[bytes], seconds: float, conns: int
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = now() + seconds
    counter = itertools.count()

    async def worker() -> None:
        nonlocal errors
        conn = await Connection.open(port)
        while now() < deadline:
            t0 = now()
            if await conn.roundtrip(requests[next(counter) % len(requests)]) != 200:
                errors += 1
            latencies.append(now() - t0)
        conn.close()

    t_start = now()
    await asyncio.gather(*(worker() for _ in range(conns)))
    elapsed = now() - t_start
    latencies.sort()
    return {
        "sent": len(latencies), "achieved_per_s": len(latencies) / elapsed, "errors": errors,
        "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per heartbeat payload")
    ap.add_argument(
        "--rates", default="500,1000,1500,2000", help="offered heartbeats/s (open loop)"
    )
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--saturate-connections", type=int, default=16)
    args = ap.parse_args()

    with server_sandbox("--heartbeat-interval", "30") as box:
        agents = register_agents(box, args.agents, args.gpus)
        body = heartbeat_body(args.gpus)
        requests = [
            heartbeat_request(f"127.0.0.1:{box.port}", agent_id, body, token)
            for agent_id, token in agents
        ]
        server = psutil.Process(box.server_pid())
        print(f"server pid {server.pid}, {args.agents} agents registered, payload {len(body)} bytes "
              f"({args.gpus} GPUs), {psutil.cpu_count()} CPUs")  # fmt: skip

        asyncio.run(closed_loop(box.port, requests, 2.0, 4))  # warm up pools and caches
        for rate in (float(r) for r in args.rates.split(",")):
            cpu0 = server.cpu_times()
            res = asyncio.run(open_loop(box.port, requests, rate, args.seconds, args.connections))
            cpu1 = server.cpu_times()
            cpu_pct = (
                100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / res["elapsed_s"]
            )
            print(f"open loop  offered {rate:5.0f}/s for {args.seconds:.0f}s: "
                  f"achieved {res['achieved_per_s']:5.0f}/s, errors {res['errors']}, "
                  f"p50 {res['p50_ms']:7.1f} ms, p90 {res['p90_ms']:7.1f} ms, p99 {res['p99_ms']:7.1f} ms, "
                  f"max {res['max_ms']:7.1f} ms; server CPU {cpu_pct:3.0f}% of one core, "
                  f"RSS {server.memory_info().rss / 2**20:.0f} MiB")  # fmt: skip

        sat = asyncio.run(
            closed_loop(box.port, requests, min(args.seconds, 10), args.saturate_connections)
        )
        print(f"saturation {args.saturate_connections} connections: {sat['achieved_per_s']:.0f}/s, "
              f"errors {sat['errors']}, p50 {sat['p50_ms']:.1f} ms, p99 {sat['p99_ms']:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
