"""Fleet-size load test: N simulated agents against a real ``kitt server``, as a fleet behaves.

For each database (SQLite, or PostgreSQL in a throwaway cluster made by tests/pg.py) and
each fleet size N, a fresh server (own KITT_HOME, random port, ``--heartbeat-interval``
set to ``--interval``) gets N agents that each do what a real agent does on the wire:

* **join**: register with a bootstrap token and get their own token back (plain HTTP), or
  with ``--tls`` enroll first (own EC key and CSR -> certificate + token, as
  ``kitt-agent init`` does), then register over mutual TLS with their own certificate;
* **heartbeat** every ``--interval`` s with the agent's +-10 % jitter, over a keep-alive
  connection of their own, opened again when the server has closed it (cheroot closes
  connections idle for 30 s, so at a 30 s interval about half the beats reconnect, as
  real agents do). The schedule is open loop: latency counts from the *scheduled* time,
  so a server that falls behind shows it in p99 instead of slowing the client;
* **run tests** (``--testing``, a fraction of the fleet): the load client submits a test
  for each such agent through the user API; the agent's next heartbeat carries the
  ``run_test`` command (the registered port refuses pushes, so delivery is the
  heartbeat's, as behind NAT); the agent reports ``running``, ships log batches as its
  LogShipper does (whatever accumulated every 50 ms) and posts a result; then the next
  test is submitted for it;
* **churn** (``--churn``, a fraction of the other agents): leave once (close the
  connection, stay away ``--away`` s), then register again with their own token (and
  certificate) over a new connection, and heartbeat at once, as a restarted agent does.

The load client is ``--client-procs`` processes, each one asyncio loop over raw sockets
(one connection per agent, as in a real fleet). It shares the machine's cores with the
server, so its own CPU is printed too, and ``lag p99`` (how late it wrote beats compared
to their schedule) tells a saturated client from a slow server.

    .venv/bin/python benchmarks/fleet_sim.py --agents 1000,5000,20000 --interval 30 \
        --seconds 90 --database sqlite|postgresql|both [--tls] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import math
import multiprocessing as mp
import random
import signal
import socket
import ssl
import sys
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import psutil
from _harness import (
    Sandbox,
    bootstrap_token,
    heartbeat_body,
    heartbeat_request,
    percentile,
    server_sandbox,
)

from kitt import pki

HOST = "127.0.0.1"
BENCHMARK = "fleetsim"  # the capability simulated agents offer, and the tests they get
REQUEST_TIMEOUT_S = 10.0  # the agent's own HTTP timeouts (kitt.http.build_client)
CONNECT_TIMEOUT_S = 5.0
JITTER = 0.1  # the agent's heartbeat jitter (kitt.agent.heartbeat.JITTER)
SHIP_EVERY_S = 0.05  # the agent's LogShipper.INTERVAL_S
DRAIN_S = REQUEST_TIMEOUT_S + 2  # after the schedule ends: replies still on their way
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"


# --- what each load process is told, and what it tells back ----------------------------------


@dataclass(frozen=True)
class Plan:
    port: int
    ca: str | None  # the fleet CA (TLS), else plain HTTP
    creds: str  # where enrolled agents keep their key and certificate
    boot: str  # bootstrap token
    admin: str  # admin token, to submit tests through the user API
    first: int  # index of this process's first agent
    count: int
    push_port: int  # a port that refuses connections: pushes fail, heartbeats deliver
    interval: float
    seconds: float
    gpus: int
    testing: float
    churn: float
    away: float
    test_seconds: float
    log_rate: float
    concurrency: int  # registrations in flight
    keepalive: bool  # False: a new connection per beat, closed after the reply
    seed: int


@dataclass
class Tally:
    latencies: array[float] = field(default_factory=lambda: array("d"))  # answered beats
    lags: array[float] = field(default_factory=lambda: array("d"))  # written - scheduled
    errors: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    answered: int = 0
    reconnects: int = 0
    registered: int = 0
    reregistered: int = 0
    churners: int = 0
    testers: int = 0
    submitted: int = 0
    tests_started: int = 0
    log_posts: int = 0
    log_lines_sent: int = 0
    log_lines: int = 0  # stored, as the server's replies count them
    results: int = 0
    stall_s: float = 0.0  # the client's longest event-loop stall during the run

    def error(self, what: str, exc: BaseException) -> None:
        self.errors[f"{what}: {error_kind(exc)}"] += 1

    def merge(self, other: Tally) -> None:
        for name, value in vars(other).items():
            mine = getattr(self, name)
            if isinstance(value, (array, Counter)):
                mine.extend(value) if isinstance(value, array) else mine.update(value)
            elif name == "stall_s":
                self.stall_s = max(mine, value)
            else:
                setattr(self, name, mine + value)


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectTimeoutError):
        return f"connect timeout (>{CONNECT_TIMEOUT_S:.0f} s)"
    if isinstance(exc, asyncio.TimeoutError):
        return f"reply timeout (>{REQUEST_TIMEOUT_S:.0f} s)"
    if isinstance(exc, HttpStatusError):
        return f"HTTP {exc.status}"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed by the server mid-reply"
    if isinstance(exc, ssl.SSLError):
        return f"TLS {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno:
        return f"connection error {errno.errorcode.get(exc.errno, exc.errno)}"
    return f"{type(exc).__name__}: {exc}"


class ConnectTimeoutError(asyncio.TimeoutError):
    """The server did not accept the connection in time (its accept queue is full)."""


class HttpStatusError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


# --- a lean HTTP/1.1 exchange over asyncio streams ---------------------------------------------


class Conn:
    """One keep-alive connection (plain or TLS), one request in flight."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext | None, source: str) -> Conn:
        """Connect from ``source`` (and handshake) within the agent's connect timeout."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    HOST, port, ssl=ctx, server_hostname=HOST if ctx else None,
                    local_addr=(source, 0),
                ),
                CONNECT_TIMEOUT_S,
            )  # fmt: skip
        except asyncio.TimeoutError:
            raise ConnectTimeoutError from None
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        """The server closed it (idle keep-alive expiry): a real client reconnects."""
        return self.reader.at_eof() or self.writer.is_closing()

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
            elif line.lower() == b"connection: close":
                self.writer.close()
        return int(head[9:12]), await self.reader.readexactly(length) if length else b""

    def close(self) -> None:
        self.writer.close()


def http_request(method: str, path: str, body: bytes, port: int, token: str) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


# --- one simulated agent --------------------------------------------------------------------


def source_address(k: int) -> str:
    """Agent ``k``'s own loopback address (127.1.0.1 onwards; all of 127/8 is local).

    As in a real fleet, every agent connects from its own address. From one address, the
    fleet's connections plus those in TIME_WAIT would exhaust the ~28,000 ephemeral ports,
    and the kernel's search for a free one makes every connect() slow: the client would
    stall, not the server."""
    return f"127.{1 + k // 62500}.{k // 250 % 250 + 1}.{k % 250 + 1}"


class SimAgent:
    __slots__ = (
        "address", "agent_id", "beat", "conn", "ctx", "leaves_at", "name", "phase", "report_conn",
        "test_id", "tester", "token",
    )  # fmt: skip

    def __init__(self, k: int) -> None:
        self.name = f"sim-{k:05d}"
        self.address = source_address(k)
        self.agent_id = ""
        self.token = ""
        self.beat = b""  # the whole idle heartbeat request, token included
        self.ctx: ssl.SSLContext | None = None  # its own certificate (TLS)
        self.conn: Conn | None = None
        self.report_conn: Conn | None = None  # a second connection for test reports
        self.phase = 0.0  # offset of its first beat in the interval
        self.tester = False
        self.test_id: str | None = None  # the test it runs now
        self.leaves_at: float | None = None  # churn: when it leaves (loop time)


class LoadProcess:
    """One process's share of the fleet, driven by one asyncio loop."""

    def __init__(self, plan: Plan) -> None:
        self.p = plan
        self.t = Tally()
        self.rng = random.Random(plan.seed + plan.first)
        self.ca_ctx = pki.client_context(Path(plan.ca)) if plan.ca else None
        self.agents = [SimAgent(plan.first + i) for i in range(plan.count)]
        self.idle_body = heartbeat_body(plan.gpus)
        self.beat_template = json.loads(self.idle_body)
        self.admin_conn: Conn | None = None
        self.admin_lock = asyncio.Lock()
        self.start = self.end = 0.0

    # -- joining -----------------------------------------------------------------------------

    def register_body(self, a: SimAgent) -> bytes:
        return json.dumps({
            "name": a.name, "hostname": a.name, "port": self.p.push_port, "kitt_version": "sim",
            "gpu_count": self.p.gpus, "gpu_info": f"{self.p.gpus}x NVIDIA H100 80GB HBM3",
            "capabilities": [BENCHMARK],
        }).encode()  # fmt: skip

    async def call(
        self, conn: Conn, method: str, path: str, body: dict[str, Any] | bytes, token: str,
        expect: int,
    ) -> dict[str, Any]:  # fmt: skip
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            status, reply = await asyncio.wait_for(
                conn.exchange(http_request(method, path, raw, self.p.port, token)),
                REQUEST_TIMEOUT_S,
            )
        except BaseException:
            conn.close()  # its reply may still come: never read it as the next one's
            raise
        if status != expect:
            raise HttpStatusError(status, reply)
        return json.loads(reply) if reply else {}

    async def enroll(self, a: SimAgent) -> None:
        """As ``kitt-agent init`` does: own key and CSR; the certificate and token back."""
        key = pki.new_key()
        conn = await Conn.open(self.p.port, self.ca_ctx, a.address)
        try:
            body = {"name": a.name, "csr_pem": pki.make_csr(key, a.name)}
            issued = await self.call(conn, "POST", "/api/v1/agents/enroll", body, self.p.boot, 201)
        finally:
            conn.close()
        cert, key_file = (
            Path(self.p.creds, f"{a.name}.pem"),
            Path(self.p.creds, f"{a.name}-key.pem"),
        )
        cert.write_text(issued["cert_pem"])
        key_file.touch(mode=0o600)
        key_file.write_bytes(pki.key_pem(key))
        a.token = issued["token"]
        a.ctx = pki.client_context(Path(self.p.ca), cert, key_file)  # type: ignore[arg-type]

    async def register(self, a: SimAgent) -> str:
        """Register over a new connection of its own (a returning agent beats over it next)."""
        if a.conn is not None:
            a.conn.close()
        a.conn = await Conn.open(self.p.port, a.ctx, a.address)
        reply = await self.call(
            a.conn, "POST", "/api/v1/agents/register", self.register_body(a),
            a.token or self.p.boot, 201,
        )  # fmt: skip
        a.token = reply.get("token") or a.token
        return str(reply["agent_id"])

    async def join(self, a: SimAgent, slots: asyncio.Semaphore) -> None:
        async with slots:
            if self.ca_ctx is not None:
                await self.enroll(a)
            a.agent_id = await self.register(a)
            # Closed, not kept: joining all at once would otherwise hold N connections on
            # the server before the run starts; the first beat opens its own.
            self.drop(a)
        a.beat = heartbeat_request(f"{HOST}:{self.p.port}", a.agent_id, self.idle_body, a.token)
        self.t.registered += 1

    # -- the run -----------------------------------------------------------------------------

    def cast(self) -> None:
        """Who tests, who churns and when, and everyone's first-beat phase."""
        testers = round(self.p.testing * len(self.agents))
        order = self.rng.sample(self.agents, len(self.agents))
        for a in order[:testers]:
            a.tester = True
        churners = order[testers : testers + round(self.p.churn * len(self.agents))]
        for a in churners:
            a.leaves_at = self.start + self.rng.uniform(0.2, 0.6) * self.p.seconds
        for a in self.agents:
            a.phase = self.rng.uniform(0, self.p.interval)
        self.t.testers, self.t.churners = testers, len(churners)

    async def live(self, a: SimAgent) -> None:
        loop = asyncio.get_running_loop()
        due = self.start + a.phase
        while due < self.end:
            await asyncio.sleep(due - loop.time())
            if a.leaves_at is not None and due >= a.leaves_at:
                a.leaves_at = None
                due = await self.churn(a)
                if due >= self.end:
                    return
            await self.heartbeat(a, due)
            due += self.p.interval * self.rng.uniform(1 - JITTER, 1 + JITTER)

    @staticmethod
    def drop(a: SimAgent) -> None:
        if a.conn is not None:
            a.conn.close()
            a.conn = None

    async def connection(self, a: SimAgent) -> Conn:
        if a.conn is None or a.conn.closed:
            if a.conn is not None:
                a.conn.close()
                self.t.reconnects += 1
            a.conn = await Conn.open(self.p.port, a.ctx, a.address)
        return a.conn

    async def heartbeat(self, a: SimAgent, due: float) -> None:
        loop = asyncio.get_running_loop()
        self.t.sent += 1
        request = a.beat if a.test_id is None else self.running_beat(a)
        try:
            self.t.lags.append(loop.time() - due)
            conn = await self.connection(a)
            status, body = await asyncio.wait_for(conn.exchange(request), REQUEST_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
            self.t.error("heartbeat", exc)
            self.drop(a)
            return
        if status != 200:
            self.t.errors[f"heartbeat: HTTP {status}"] += 1
            return
        self.t.answered += 1
        self.t.latencies.append(loop.time() - due)
        if not self.p.keepalive:
            self.drop(a)
        if b"run_test" in body and a.test_id is None:
            for command in json.loads(body)["commands"]:
                if command["type"] == "run_test":
                    a.test_id = command["test_id"]
                    asyncio.get_running_loop().create_task(self.run_test(a, command))
                    break

    def running_beat(self, a: SimAgent) -> bytes:
        beat = dict(self.beat_template, status="running", current_task=a.test_id)
        return heartbeat_request(
            f"{HOST}:{self.p.port}", a.agent_id, json.dumps(beat).encode(), a.token
        )

    async def churn(self, a: SimAgent) -> float:
        """Leave (the connection goes), come back after ``away`` s, register again."""
        loop = asyncio.get_running_loop()
        self.drop(a)
        await asyncio.sleep(self.p.away)
        try:
            agent_id = await self.register(a)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, HttpStatusError) as exc:
            self.t.error("re-register", exc)
            return loop.time()
        if agent_id == a.agent_id:
            self.t.reregistered += 1
        else:
            self.t.errors["re-register: a new agent id"] += 1
        return loop.time()

    async def submit(self, a: SimAgent) -> None:
        """A test for ``a`` through the user API (one admin connection per process)."""
        async with self.admin_lock:
            try:
                if self.admin_conn is None or self.admin_conn.closed:
                    self.admin_conn = await Conn.open(self.p.port, self.ca_ctx, HOST)
                body = {"agent": a.name, "benchmark": BENCHMARK}
                await self.call(self.admin_conn, "POST", "/api/v1/tests", body, self.p.admin, 202)
                self.t.submitted += 1
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.TimeoutError,
                HttpStatusError,
            ) as exc:
                self.t.error("submit", exc)
                self.admin_conn = None

    async def report(
        self, a: SimAgent, path: str, body: dict[str, Any], expect: int
    ) -> dict[str, Any]:
        if a.report_conn is None or a.report_conn.closed:
            a.report_conn = await Conn.open(self.p.port, a.ctx, a.address)
        return await self.call(a.report_conn, "POST", path, body, a.token, expect)

    async def run_test(self, a: SimAgent, command: dict[str, Any]) -> None:
        """Status ``running``, log batches as the LogShipper sends them, then the result."""
        loop = asyncio.get_running_loop()
        base = f"/api/v1/agents/{a.agent_id}/tests/{a.test_id}"
        step = max(SHIP_EVERY_S, 1 / self.p.log_rate) if self.p.log_rate > 0 else math.inf
        per_post = max(1, round(self.p.log_rate * SHIP_EVERY_S))
        seq, what = 0, "status"
        try:
            await self.report(a, f"{base}/status", {"status": "running", "started_at": iso()}, 200)
            self.t.tests_started += 1
            what = "logs"
            ends = loop.time() + self.p.test_seconds
            while (now := loop.time()) < ends and now < self.end:
                await asyncio.sleep(min(step, ends - now))
                lines = [
                    {"seq": seq + i, "ts": iso(), "line": f"step {seq + i}: 87.5 tok/s, p99 41 ms"}
                    for i in range(1, per_post + 1)
                ]  # fmt: skip
                seq += per_post
                reply = await self.report(a, f"{base}/logs", {"lines": lines}, 200)
                self.t.log_posts += 1
                self.t.log_lines_sent += per_post
                self.t.log_lines += int(reply["stored"])
            if loop.time() >= self.end:
                return  # the run is over: the test stays running on the server
            what = "result"
            result = {
                "command_id": command["command_id"], "test_id": a.test_id, "status": "completed",
                "result": {"fleetsim": {"lines": seq}}, "error": None, "finished_at": iso(),
            }  # fmt: skip
            reply = await self.report(a, f"/api/v1/agents/{a.agent_id}/results", result, 202)
            if reply.get("changed"):
                self.t.results += 1
            else:
                self.t.errors["result: not applied (changed=false)"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, HttpStatusError) as exc:
            self.t.error(what, exc)
            return
        a.test_id = None
        if loop.time() < self.end:
            await self.submit(a)

    async def watch_loop(self) -> None:
        """How late a 50 ms timer fires: a stalled (CPU-starved) client shows here."""
        loop = asyncio.get_running_loop()
        while (before := loop.time()) < self.end:
            await asyncio.sleep(0.05)
            self.t.stall_s = max(self.t.stall_s, loop.time() - before - 0.05)

    async def main(self, pipe: Pipe) -> Tally:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.p.concurrency)
        joined = await asyncio.gather(
            *(self.join(a, slots) for a in self.agents), return_exceptions=True
        )
        failures = [r for r in joined if isinstance(r, BaseException)]
        if failures:
            raise RuntimeError(
                f"{len(failures)} agents could not join; first: {error_kind(failures[0])}"
            )
        pipe.send("ready")
        self.start = await loop.run_in_executor(None, pipe.recv)
        self.end = self.start + self.p.seconds
        self.cast()
        await asyncio.sleep(self.start - loop.time())
        lives = [loop.create_task(self.live(a)) for a in self.agents]
        lives.append(loop.create_task(self.watch_loop()))
        for a in self.agents:
            if a.tester:
                await self.submit(a)
        await asyncio.gather(*lives)
        # Test reports still in flight: let them finish (bounded by their own timeouts).
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=DRAIN_S)
        for a in self.agents:
            for conn in (a.conn, a.report_conn):
                if conn is not None:
                    conn.close()
        return self.t


def iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def load_process(plan: Plan, pipe: Pipe) -> None:
    """A load client process: its agents join, wait for the common start, then live."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        pipe.send(asyncio.run(LoadProcess(plan).main(pipe)))
    except BaseException:
        pipe.send(traceback.format_exc())


# --- measuring the server (and PostgreSQL) from outside ---------------------------------------


class CpuSampler:
    """CPU (% of one core) and RSS of a set of processes, sampled once a second."""

    def __init__(self, roots: list[psutil.Process], tree: bool = False) -> None:
        self.roots, self.tree = roots, tree
        self.last: dict[int, float] = {}
        self.peak_pct = self.peak_rss = 0.0
        self.peak_fds = 0  # open files of the roots (the server's limit is RLIMIT_NOFILE)
        self.total_s = 0.0
        self.at = time.monotonic()
        self.sample(first=True)

    def procs(self) -> list[psutil.Process]:
        found = list(self.roots)
        if self.tree:
            for root in self.roots:
                with contextlib.suppress(psutil.Error):
                    found += root.children(recursive=True)
        return found

    def sample(self, first: bool = False) -> None:
        used, rss = 0.0, 0
        for proc in self.procs():
            try:
                times, mem = proc.cpu_times(), proc.memory_info().rss
            except psutil.Error:
                continue
            cpu = times.user + times.system
            used += cpu - self.last.get(proc.pid, 0.0 if not first else cpu)
            self.last[proc.pid] = cpu
            rss += mem
        with contextlib.suppress(psutil.Error):
            self.peak_fds = max(self.peak_fds, sum(p.num_fds() for p in self.roots))
        now = time.monotonic()
        if not first:
            self.total_s += used
            self.peak_pct = max(self.peak_pct, 100 * used / max(now - self.at, 1e-3))
        self.peak_rss = max(self.peak_rss, rss)
        self.at = now


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    return [psutil.Process(int((data_dir / "postmaster.pid").read_text().split()[0]))]


# --- one (database, N) run ---------------------------------------------------------------------


def run_fleet(
    box: Sandbox, n: int, args: argparse.Namespace, pg_data: Path | None
) -> dict[str, Any]:
    scheme_url = box.url.replace("http://", "https://") if args.tls else box.url
    ca = box.home / "server" / "certs" / "ca.pem" if args.tls else None
    verify: Any = pki.client_context(ca) if ca else False
    creds = box.home.parent / "agents"
    creds.mkdir(mode=0o700, exist_ok=True)
    boot = bootstrap_token_for(scheme_url, box.admin_token(), n, verify)
    procs = min(args.client_procs, n)
    with socket.socket() as refuse:  # bound, never listening: a push to it is refused at once
        refuse.bind((HOST, 0))
        shares = [n // procs + (i < n % procs) for i in range(procs)]
        plans = [
            Plan(port=box.port, ca=str(ca) if ca else None, creds=str(creds), boot=boot,
                 admin=box.admin_token(), first=sum(shares[:i]), count=shares[i],
                 push_port=refuse.getsockname()[1], interval=args.interval, seconds=args.seconds,
                 gpus=args.gpus, testing=args.testing, churn=args.churn, away=args.away,
                 test_seconds=args.test_seconds, log_rate=args.log_rate,
                 concurrency=max(1, args.register_concurrency // procs), seed=args.seed,
                 keepalive=not args.no_keepalive)
            for i in range(procs)
        ]  # fmt: skip
        return drive(box, plans, pg_data, args)


def bootstrap_token_for(url: str, admin: str, uses: int, verify: Any) -> str:
    if verify is False:
        return bootstrap_token(url, admin, uses)
    import httpx

    r = httpx.post(f"{url}/api/v1/tokens", json={"ttl_s": 3600, "uses": uses},
                   headers={"Authorization": f"Bearer {admin}"}, verify=verify, timeout=30)  # fmt: skip
    r.raise_for_status()
    return str(r.json()["token"])


def drive(
    box: Sandbox, plans: list[Plan], pg_data: Path | None, args: argparse.Namespace
) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    server = psutil.Process(box.server_pid())
    join_cpu0 = sum(server.cpu_times()[:2])
    pipes, workers = [], []
    for plan in plans:
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=load_process, args=(plan, theirs), daemon=True)
        proc.start()
        pipes.append(mine)
        workers.append(proc)
    try:
        t0 = time.monotonic()
        for pipe in pipes:
            answer = pipe.recv()
            if answer != "ready":
                raise SystemExit(f"a load process failed while agents joined:\n{answer}")
        join_s = time.monotonic() - t0
        join_cpu_s = sum(server.cpu_times()[:2]) - join_cpu0
        clients = [psutil.Process(w.pid) for w in workers if w.pid is not None]
        start = time.monotonic() + 0.5
        end = start + args.seconds
        for pipe in pipes:
            pipe.send(start)
        time.sleep(max(0.0, start - time.monotonic()))  # a schedule, not a synchronisation
        samplers = {"server": CpuSampler([server]), "client": CpuSampler(clients)}
        if pg_data is not None:
            samplers["db"] = CpuSampler(postgres_processes(pg_data), tree=True)
        box0, wall = psutil.cpu_times(), 0.0
        tally, pending = Tally(), list(pipes)
        while pending:
            ready = [p for p in pending if p.poll(max(0.01, min(1.0, end - time.monotonic())))]
            if not wall:  # figures cover the scheduled window only, not the drain after it
                for sampler in samplers.values():
                    sampler.sample()
                if time.monotonic() >= end:
                    wall, box1 = time.monotonic() - start, psutil.cpu_times()
            for pipe in ready:
                part = pipe.recv()
                if isinstance(part, str):
                    raise SystemExit(f"a load process failed:\n{part}")
                tally.merge(part)
                pending.remove(pipe)
        if not wall:
            wall, box1 = time.monotonic() - start, psutil.cpu_times()
    finally:
        for proc in workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    row = summarize(tally, join_s, wall, samplers, box0, box1)
    row["join_server_ms_per_agent"] = round(1000 * join_cpu_s / max(1, tally.registered), 2)
    return row


def summarize(
    t: Tally, join_s: float, wall: float, s: dict[str, CpuSampler], box0: Any, box1: Any
) -> dict[str, Any]:
    lat, lag = sorted(t.latencies), sorted(t.lags)
    busy = sum(
        getattr(box1, k) - getattr(box0, k) for k in ("user", "system", "nice", "softirq", "irq")
    )
    row = {
        "join_s": round(join_s, 1),
        "hb_sent": t.sent, "hb_ok": t.answered,
        "p50_ms": round(percentile(lat, 50) * 1000, 1), "p99_ms": round(percentile(lat, 99) * 1000, 1),
        "max_ms": round(lat[-1] * 1000, 1) if lat else None,
        "lag_p99_ms": round(percentile(lag, 99) * 1000, 1),
        "errors": dict(t.errors), "error_total": sum(t.errors.values()),
        "reconnects": t.reconnects, "testers": t.testers, "submitted": t.submitted,
        "tests_started": t.tests_started, "log_posts": t.log_posts, "log_lines_sent": t.log_lines_sent,
        "log_lines": t.log_lines,
        "results": t.results, "registered": t.registered, "churners": t.churners,
        "reregistered": t.reregistered, "wall_s": round(wall, 1),
        "box_busy_pct": round(100 * busy / ((psutil.cpu_count() or 1) * wall)),
        "client_stall_max_ms": round(t.stall_s * 1000), "server_fds_peak": s["server"].peak_fds,
        # What else ran on the machine meanwhile (% of one core): other people's work.
        "others_cpu_mean": round(100 * (busy - sum(x.total_s for x in s.values())) / wall),
    }  # fmt: skip
    for name, sampler in s.items():
        row[f"{name}_cpu_mean"] = round(100 * sampler.total_s / wall)
        row[f"{name}_cpu_peak"] = round(sampler.peak_pct)
        row[f"{name}_rss_mib"] = round(sampler.peak_rss / 2**20)
    return row


def server_log_problems(box: Sandbox) -> dict[str, int]:
    """WARNING and ERROR lines of the server's log, by message (first 120 characters); an
    ERROR's traceback is told by its last line (the exception)."""
    found: Counter[str] = Counter()
    log = box.home / "server" / "server.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for i, line in enumerate(lines):
        parts = line.split(" ", 4)  # date, time, level, logger:, message
        if len(parts) == 5 and parts[2] in ("WARNING", "ERROR", "CRITICAL"):
            cause = ""
            for after in lines[i + 1 : i + 60]:
                if after[:2] == "20" and after[4:5] == "-":  # the next log record
                    break
                cause = after.strip()
            found[f"{parts[2]} {parts[4][:120]}" + (f" <- {cause[:120]}" if cause else "")] += 1
    return dict(found.most_common(5))


# --- databases, report, main ---------------------------------------------------------------------


@contextlib.contextmanager
def postgres() -> Iterator[Any]:
    """The throwaway cluster of the test suite (tests/pg.py, importable as it stands)."""
    sys.path.insert(0, str(TESTS_DIR))
    from pg import start_cluster

    yield from start_cluster()


def wait_quiet(max_pct: float, limit_s: float) -> float:
    """Wait (up to ``limit_s``) until the machine is quiet; returns its load (% of all cores).

    Other people's work on a shared 2-core machine would otherwise be measured as the
    server's slowness; the table shows what the load was either way."""
    deadline = time.monotonic() + limit_s
    while True:
        pct = float(psutil.cpu_percent(interval=3.0 if limit_s > 0 else 0.5))
        if pct <= max_pct or time.monotonic() >= deadline:
            return round(pct)


@contextlib.contextmanager
def fresh_server(
    args: argparse.Namespace, cluster: Any | None
) -> Iterator[tuple[Sandbox, Path | None]]:
    """A new server (own KITT_HOME) on SQLite, or on a new database of ``cluster``."""
    server_args = ["--heartbeat-interval", f"{args.interval:g}"]
    server_args.append("--tls" if args.tls else "--no-tls")
    if cluster is None:
        with server_sandbox(*server_args) as box:
            yield box, None
        return
    name = cluster.create_database()
    try:
        with server_sandbox(*server_args, "--database", cluster.url(name)) as box:
            yield box, cluster.data
    finally:
        cluster.drop_database(name)


COLUMNS = [
    ("db", "database"), ("N", "agents"), ("tls", "tls"), ("join s", "join_s"),
    ("hb sent", "hb_sent"), ("hb ok", "hb_ok"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"),
    ("max ms", "max_ms"), ("errors", "error_total"), ("reconn", "reconnects"),
    ("log lines", "log_lines"), ("results", "results"), ("regs+re/churn", "regs"),
    ("srv CPU% mean/pk", "srv_cpu"), ("srv RSS MiB", "server_rss_mib"), ("srv fds", "server_fds_peak"),
    ("pg CPU% mean/pk", "db_cpu"), ("client CPU% mean/pk", "cli_cpu"), ("lag p99 ms", "lag_p99_ms"),
    ("stall ms", "client_stall_max_ms"), ("others CPU%", "others_cpu_mean"), ("bg% before", "background_pct"),
]  # fmt: skip


def table_row(r: dict[str, Any]) -> list[str]:
    view = dict(
        r,
        regs=f"{r['registered']}+{r['reregistered']}/{r['churners']}",
        srv_cpu=f"{r['server_cpu_mean']}/{r['server_cpu_peak']}",
        db_cpu=f"{r['db_cpu_mean']}/{r['db_cpu_peak']}" if "db_cpu_mean" in r else "-",
        cli_cpu=f"{r['client_cpu_mean']}/{r['client_cpu_peak']}",
        tls=("mTLS" if r["tls"] else "no") + ("" if r["keepalive"] else " no-ka"),
    )
    return [str(view[key]) for _, key in COLUMNS]


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[h for h, _ in COLUMNS]] + [table_row(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for c in cells:
        print(" | ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))
    for r in rows:
        if r["errors"]:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(r["errors"].items()))
            print(f"errors {r['database']} N={r['agents']}: {kinds}")
        for message, count in r["server_log"].items():
            print(f"server log {r['database']} N={r['agents']}: x{count} {message}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--agents", default="1000,5000,20000", help="fleet sizes, comma-separated")
    ap.add_argument("--interval", type=float, default=30.0, help="heartbeat interval (s)")
    ap.add_argument("--seconds", type=float, default=90.0, help="measured run per fleet size")
    ap.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="sqlite")
    ap.add_argument("--tls", action="store_true", help="HTTPS server; agents enroll and use mTLS")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per heartbeat payload")
    ap.add_argument("--testing", type=float, default=0.01, help="fraction of agents running tests")
    ap.add_argument("--test-seconds", type=float, default=20.0, help="how long a test runs")
    ap.add_argument("--log-rate", type=float, default=2.0, help="log lines/s a running test prints")
    ap.add_argument(
        "--churn",
        type=float,
        default=0.02,
        help="fraction of agents that leave and re-register once",
    )
    ap.add_argument(
        "--away", type=float, default=5.0, help="how long a churning agent stays away (s)"
    )
    ap.add_argument("--no-keepalive", action="store_true",
                    help="a new connection per beat, closed after the reply (the server then holds "
                    "only connections in flight: its capacity at N when its open-file limit is below N)")  # fmt: skip
    ap.add_argument("--client-procs", type=int, default=2, help="load client processes")
    ap.add_argument("--register-concurrency", type=int, default=16, help="joins in flight")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-background", type=float, default=25.0,
                    help="before each run, wait until other processes use less than this %% of the machine")  # fmt: skip
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="wait at most this long (s) for that; 0: do not wait")  # fmt: skip
    ap.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = ap.parse_args()
    sizes = [int(x) for x in args.agents.split(",")]
    if not sizes or min(sizes) < 1 or not 0 <= args.testing + args.churn <= 1 or args.interval <= 0:
        ap.error("--agents must be positive; --testing + --churn must lie in 0..1; --interval > 0")
    # `timeout`, `kill` or a closed terminal: unwind, so that servers and clusters are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it too
    print(f"fleet_sim: interval {args.interval:g} s (+-10 %), {args.seconds:g} s per run, "
          f"testing {args.testing:.0%} (tests of {args.test_seconds:g} s, {args.log_rate:g} lines/s), "
          f"churn {args.churn:.0%} (away {args.away:g} s), {args.client_procs} client processes, "
          f"{psutil.cpu_count()} cores shared by server, database and client; open files per "
          f"process {hard}", flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    databases = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    with ExitStack() as stack:
        cluster = stack.enter_context(postgres()) if "postgresql" in databases else None
        for db in databases:
            for n in sizes:
                background = wait_quiet(args.max_background, args.wait_quiet)
                with fresh_server(args, cluster if db == "postgresql" else None) as (box, pg_data):
                    row = {
                        "database": db,
                        "agents": n,
                        "tls": args.tls,
                        "keepalive": not args.no_keepalive,
                        "background_pct": background,
                    }
                    row |= run_fleet(box, n, args, pg_data)
                    row["server_log"] = server_log_problems(box)
                rows.append(row)
                print(f"[{db} N={n}] joined in {row['join_s']} s; heartbeats {row['hb_ok']}/"
                      f"{row['hb_sent']}, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, errors "
                      f"{row['error_total']}", flush=True)  # fmt: skip
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
