"""Shared pieces for the measurement scripts: a sandboxed server and a lean HTTP load client.

The load client speaks just enough HTTP/1.1 over asyncio streams (keep-alive, one request
in flight per connection) to cost far less CPU than the server it measures: on a 2-core
machine the generator shares the CPU with the server, so a heavy client would understate
the server's capacity.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sandbox:
    home: Path
    env: dict[str, str]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kitt(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kitt", *args],
            env=self.env, capture_output=True, text=True, check=True,
        )  # fmt: skip

    def server_pid(self) -> int:
        return int((self.home / "server" / "server.pid").read_text())

    def admin_token(self) -> str:
        return (self.home / "server" / "admin-token").read_text().strip()

    def user_client(self) -> httpx.Client:
        """An HTTP client for user endpoints: the admin token on every request."""
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.admin_token()}"},
            timeout=30,
        )


@contextmanager
def server_sandbox(*server_args: str) -> Iterator[Sandbox]:
    with tempfile.TemporaryDirectory(prefix="kitt-bench-") as tmp:
        env = dict(os.environ, KITT_HOME=str(Path(tmp) / "home"))
        box = Sandbox(Path(tmp) / "home", env, free_port())
        box.kitt("server", "start", "--port", str(box.port), "--log-level", "WARNING", *server_args)
        try:
            yield box
        finally:
            subprocess.run(
                [sys.executable, "-m", "kitt", "server", "stop"], env=env, check=False,
                capture_output=True,
            )  # fmt: skip


def wait_heartbeat(box: Sandbox, agent: str, agent_port: int, timeout: float = 30.0) -> None:
    """Wait until the server has stored a heartbeat from ``agent``: proof that it registered
    with its bootstrap token and that its own token is accepted. If none comes, exit with
    the agent's own account of why (its ``/api/status``, open on plain HTTP)."""
    deadline = time.monotonic() + timeout
    with box.user_client() as client:
        while time.monotonic() < deadline:
            r = client.get(f"/api/v1/agents/{agent}/heartbeats", params={"limit": 1})
            if r.status_code == 200 and r.json()["heartbeats"]:
                return
            if r.status_code != 404:  # 404: not registered yet
                r.raise_for_status()
            time.sleep(0.1)
    try:
        detail = httpx.get(f"http://127.0.0.1:{agent_port}/api/status", timeout=5).text
    except httpx.HTTPError as exc:
        detail = f"agent status unavailable ({exc})"
    raise SystemExit(f"agent {agent!r} sent no heartbeat within {timeout:.0f} s: {detail}")


def gpus(n: int) -> list[dict[str, object]]:
    return [
        {"index": i, "name": "NVIDIA H100 80GB HBM3", "utilization_pct": 87.0,
         "memory_used_gb": 61.2, "memory_total_gb": 79.6, "temperature_c": 64.0, "power_w": 512.3}
        for i in range(n)
    ]  # fmt: skip


def bootstrap_token(url: str, admin_token: str, uses: int) -> str:
    """A bootstrap token good for ``uses`` registrations (``POST /api/v1/tokens``)."""
    r = httpx.post(
        f"{url}/api/v1/tokens",
        json={"ttl_s": 3600, "uses": uses},
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=30,
    )
    r.raise_for_status()
    return str(r.json()["token"])


def register_agents(box: Sandbox, count: int, gpu_count: int) -> list[tuple[str, str]]:
    """Register ``count`` simulated agents with one bootstrap token: (agent_id, agent token)."""
    if count < 1:
        return []
    boot = bootstrap_token(box.url, box.admin_token(), count)
    agents = []
    with httpx.Client(base_url=box.url, timeout=30) as client:
        for i in range(count):
            body = {
                "name": f"sim-{i:05d}", "hostname": f"sim-{i:05d}", "port": 8090,
                "kitt_version": "sim", "gpu_count": gpu_count,
                "gpu_info": f"{gpu_count}x NVIDIA H100 80GB HBM3",
            }  # fmt: skip
            r = client.post(
                "/api/v1/agents/register", json=body, headers={"Authorization": f"Bearer {boot}"}
            )
            r.raise_for_status()
            reply = r.json()
            agents.append((reply["agent_id"], reply["token"]))
    return agents


def heartbeat_request(
    host_port: str, agent_id: str, body: bytes, token: str | None = None
) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST /api/v1/agents/{agent_id}/heartbeat HTTP/1.1\r\n"
        f"Host: {host_port}\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def heartbeat_body(gpu_count: int) -> bytes:
    beat = {
        "status": "idle", "current_task": None, "gpu_utilization_pct": 87.0,
        "gpu_memory_used_gb": 61.2 * gpu_count, "uptime_s": 12345.6, "gpus": gpus(gpu_count),
        "cpu_percent": 12.5, "ram_used_gb": 88.1, "kitt_version": "sim",
    }  # fmt: skip
    return json.dumps(beat).encode()


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def roundtrip(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def now() -> float:
    return time.perf_counter()
