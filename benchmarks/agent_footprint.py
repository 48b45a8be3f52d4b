"""Agent idle footprint: RSS and CPU of a daemonized `kitt agent` heartbeating to a server.

    python benchmarks/agent_footprint.py [--seconds 300] [--interval 30]

Starts a real server and agent in a temp KITT_HOME, lets the agent settle, then samples
the agent process every 5 s. CPU is reported as a percentage of one core over the whole
window (user + system time of the agent process divided by wall time).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timezone

import psutil
from _harness import free_port, server_sandbox, wait_heartbeat


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--interval", default="30", help="server heartbeat interval (seconds)")
    args = ap.parse_args()
    with server_sandbox("--heartbeat-interval", args.interval) as box:
        port = free_port()
        box.kitt("agent", "init", "--server", box.url, "--name", "footprint", "--port", str(port),
                 "--bind", "127.0.0.1")  # fmt: skip
        box.kitt("agent", "start")
        agent = psutil.Process(int((box.home / "agent.pid").read_text()))
        wait_heartbeat(box, "footprint", port)  # registered, and its token accepted
        time.sleep(5)  # settle
        since = datetime.now(timezone.utc)
        cpu0 = agent.cpu_times()
        t0 = time.monotonic()
        rss = []
        while time.monotonic() - t0 < args.seconds:
            rss.append(agent.memory_info().rss)
            time.sleep(5)
        cpu1 = agent.cpu_times()
        wall = time.monotonic() - t0
        cpu_pct = 100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / wall
        uss = agent.memory_full_info().uss
        threads = agent.num_threads()
        with box.user_client() as client:
            r = client.get(
                "/api/v1/agents/footprint/heartbeats", params={"since": since.isoformat()}
            )
            r.raise_for_status()
            beats = len(r.json()["heartbeats"])
        subprocess.run([sys.executable, "-m", "kitt", "agent", "stop"], env=box.env, check=False,
                       capture_output=True)  # fmt: skip
        print(f"agent idle over {wall:.0f} s (heartbeat every {args.interval} s): "
              f"RSS max {max(rss) / 2**20:.1f} MiB, last {rss[-1] / 2**20:.1f} MiB, USS {uss / 2**20:.1f} MiB, "
              f"CPU {cpu_pct:.3f}% of one core, {threads} threads; "
              f"{beats} heartbeats accepted by the server in the window")  # fmt: skip


if __name__ == "__main__":
    main()
