"""What mutual TLS costs the server: the same heartbeat load over plain HTTP and over mTLS.

Two real `kitt server` processes run side by side (fresh KITT_HOME each, random ports,
both stopped at the end whatever happens): a plain-HTTP one (``--no-tls``, agents register
with a bootstrap token and get their own token back) and an HTTPS one (``--tls``, every
agent enrolls with its own key, CSR and token, then heartbeats with its certificate and
token). Only one is loaded at a time; the heartbeat phases alternate between them for a
few rounds and the summary takes medians, so that a burst of unrelated load on the
machine does not land on one side only. Against each:

1. **keep-alive heartbeats**: every simulated agent holds one connection and heartbeats
   over it.  *Open loop* at a fixed total offered rate (latency counts from the scheduled
   send time, so a server that falls behind shows it in p99), then *saturation* (closed
   loop, C connections each with one request in flight).
2. **new connections**: one connection per request (``GET /api/v1/health``; on the HTTPS
   server a full mutual-TLS handshake with an agent certificate, no session resumption),
   from W client threads in one process, then from W single-threaded processes, to show
   whether the client's GIL limits the figure.

The load client is a few processes, each a single-threaded ``selectors`` loop over
non-blocking sockets (``SSLSocket.send``/``recv`` run in C), so it stays far cheaper than
the server. Still, client and server share the machine's cores: the script prints the
CPU each side used, and what a request costs the server in CPU.

    python benchmarks/tls_cost.py [--agents 200] [--rate 400] [--seconds 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import select
import selectors
import signal
import socket
import ssl
import statistics
import sys
import threading
import time
import traceback
from array import array
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import httpx
import psutil
from _harness import Sandbox, heartbeat_body, heartbeat_request, percentile, server_sandbox

from kitt import pki

HOST = "127.0.0.1"
REGISTER = {"hostname": "sim", "port": 8090, "kitt_version": "sim"}


# --- the fleet: agents with their own credentials -------------------------------------------


@dataclass(frozen=True)
class Agent:
    agent_id: str
    request: bytes  # the whole heartbeat request, token included
    cert: str | None = None
    key: str | None = None


@dataclass
class Fleet:
    port: int
    tls: bool
    ca: str | None
    agents: list[Agent]
    server_pid: int


def _bootstrap(url: str, admin: str, uses: int, verify: ssl.SSLContext | bool) -> str:
    with httpx.Client(base_url=url, verify=verify, timeout=30) as client:
        r = client.post(
            "/api/v1/tokens",
            json={"ttl_s": 3600, "uses": uses},
            headers={"Authorization": f"Bearer {admin}"},
        )
        r.raise_for_status()
        return str(r.json()["token"])


def _register_body(name: str, gpus: int) -> dict[str, Any]:
    return {"name": name, **REGISTER, "gpu_count": gpus, "gpu_info": f"{gpus}x H100"}


def plain_fleet(box: Sandbox, count: int, gpus: int) -> Fleet:
    """Agents of a plain-HTTP server: the bootstrap token registers them and yields theirs."""
    boot = _bootstrap(box.url, box.admin_token(), count, False)
    body = heartbeat_body(gpus)
    agents = []
    with httpx.Client(base_url=box.url, timeout=30) as client:
        for i in range(count):
            r = client.post(
                "/api/v1/agents/register",
                json=_register_body(f"plain-{i:04d}", gpus),
                headers={"Authorization": f"Bearer {boot}"},
            )
            r.raise_for_status()
            reply = r.json()
            request = heartbeat_request(
                f"{HOST}:{box.port}", reply["agent_id"], body, reply["token"]
            )
            agents.append(Agent(reply["agent_id"], request))
    return Fleet(box.port, False, None, agents, box.server_pid())


def tls_fleet(box: Sandbox, count: int, gpus: int) -> Fleet:
    """Agents of an HTTPS server, enrolled as `kitt-agent init` does: own key, CSR, token."""
    url = f"https://{HOST}:{box.port}"
    ca = box.home / "server" / "certs" / "ca.pem"
    creds = box.home.parent / "agents"
    creds.mkdir(mode=0o700)
    ca_only = pki.client_context(ca)
    boot = _bootstrap(url, box.admin_token(), count, ca_only)
    body = heartbeat_body(gpus)
    agents = []
    with httpx.Client(base_url=url, verify=ca_only, timeout=30) as enroller:
        for i in range(count):
            name = f"tls-{i:04d}"
            key = pki.new_key()
            r = enroller.post(
                "/api/v1/agents/enroll",
                json={"name": name, "csr_pem": pki.make_csr(key, name)},
                headers={"Authorization": f"Bearer {boot}"},
            )
            r.raise_for_status()
            issued = r.json()
            cert_path, key_path = creds / f"{name}.pem", creds / f"{name}-key.pem"
            cert_path.write_text(issued["cert_pem"])
            key_path.touch(mode=0o600)
            key_path.write_bytes(pki.key_pem(key))
            # ARCHITECTURE.md §7: the client certificate travels only inside the context.
            ctx = pki.client_context(ca, cert_path, key_path)
            with httpx.Client(base_url=url, verify=ctx, timeout=30) as agent:
                r = agent.post(
                    "/api/v1/agents/register",
                    json=_register_body(name, gpus),
                    headers={"Authorization": f"Bearer {issued['token']}"},
                )
                r.raise_for_status()
            agent_id = r.json()["agent_id"]
            request = heartbeat_request(f"{HOST}:{box.port}", agent_id, body, issued["token"])
            agents.append(Agent(agent_id, request, str(cert_path), str(key_path)))
    return Fleet(box.port, True, str(ca), agents, box.server_pid())


# --- the load client: one selectors loop per process ----------------------------------------


class Conn:
    """One agent's keep-alive connection, one request in flight at a time."""

    __slots__ = ("buf", "busy", "dead", "need", "pending", "request", "sock", "t0")

    def __init__(self, sock: socket.socket, request: bytes) -> None:
        self.sock = sock
        self.request = request
        self.buf = bytearray()
        self.need = -1  # bytes of the response in flight, once its head is in
        self.busy = False
        self.dead = False  # the connection failed: its later requests count as errors
        self.t0 = 0.0  # when the request in flight was due
        self.pending: deque[float] = deque()  # due times of requests waiting for this one


def connect(port: int, ctx: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is not None:
        sock = ctx.wrap_socket(sock, server_hostname=HOST)  # handshake, blocking
    return sock


def send_all(sock: socket.socket, data: bytes) -> None:
    """Write a whole request on a non-blocking socket (loopback: nearly always one send)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            select.select([], [sock], [], 0.01)


def read_response(c: Conn) -> int | None:
    """Feed what the socket has; the status once a whole response is in."""
    sock = c.sock
    try:
        data = sock.recv(65536)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return None  # e.g. a TLS 1.3 session ticket: no application data
    if not data:
        raise ConnectionError("the server closed a keep-alive connection")
    c.buf += data
    if isinstance(sock, ssl.SSLSocket):
        while sock.pending():
            c.buf += sock.recv(sock.pending())
    if c.need < 0:
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        length = 0
        for line in bytes(c.buf[:end]).split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        c.need = end + 4 + length
    if len(c.buf) < c.need:
        return None
    status = int(c.buf[9:12])
    del c.buf[: c.need]
    c.need = -1
    return status


@dataclass
class LoadSpec:
    port: int
    ca: str | None
    agents: list[Agent]
    mode: str  # "open" or "closed"
    rate: float  # this process's share (open loop)
    seconds: float
    phase: float = 0.0  # offset of this process's schedule (open loop)


@dataclass
class LoadResult:
    latencies: array[float] = field(default_factory=lambda: array("d"))
    errors: int = 0
    unanswered: int = 0
    first_error: str = ""
    client_cpu_s: float = 0.0
    elapsed_s: float = 0.0


def _contexts(spec: LoadSpec) -> list[ssl.SSLContext | None]:
    if spec.ca is None:
        return [None] * len(spec.agents)
    return [pki.client_context(Path(spec.ca), Path(a.cert), Path(a.key)) for a in spec.agents]  # type: ignore[arg-type]


def open_agent_connection(port: int, ctx: ssl.SSLContext | None, request: bytes) -> Conn:
    """Connect and heartbeat at once, as an agent does.

    A connection that sits idle before its first request holds one of the server's worker
    threads (cheroot hands every new connection to a worker, which waits for the request
    or the TLS handshake for up to its 30 s timeout); once answered it waits in the
    keep-alive selector instead, at no cost.
    """
    c = Conn(connect(port, ctx), request)
    c.sock.sendall(request)
    while (status := read_response(c)) is None:
        pass
    if status != 200:
        raise RuntimeError(f"first heartbeat on a new connection: HTTP {status}")
    c.sock.setblocking(False)
    return c


def load_worker(spec: LoadSpec, pipe: Pipe) -> None:
    try:
        conns = [
            open_agent_connection(spec.port, ctx, a.request)
            for a, ctx in zip(spec.agents, _contexts(spec), strict=True)
        ]
        pipe.send("ready")
        start = pipe.recv()
        cpu0 = time.process_time()
        result = drive(conns, spec, start)
        result.client_cpu_s = time.process_time() - cpu0
        for c in conns:
            c.sock.close()
        pipe.send(result)
    except BaseException:
        pipe.send(traceback.format_exc())


def drive(conns: list[Conn], spec: LoadSpec, start: float) -> LoadResult:
    res = LoadResult()
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    open_loop = spec.mode == "open"
    total = int(spec.rate * spec.seconds) if open_loop else 0
    period = 1 / spec.rate if open_loop else 0.0
    first = start + spec.phase
    k = 0  # next request to schedule (open loop)
    outstanding = 0
    end = start + spec.seconds
    give_up = end + 30
    last_done = start

    def send(c: Conn, due: float) -> None:
        c.busy, c.t0 = True, due
        send_all(c.sock, c.request)

    while time.monotonic() < start:
        time.sleep(min(0.01, start - time.monotonic()))
    if not open_loop:
        for c in conns:
            send(c, time.monotonic())
            outstanding += 1
    while True:
        now = time.monotonic()
        if open_loop:
            while k < total and first + k * period <= now:
                c = conns[k % len(conns)]
                due = first + k * period
                k += 1
                if c.dead:
                    res.errors += 1
                    continue
                outstanding += 1
                if c.busy:
                    c.pending.append(due)
                else:
                    send(c, due)
            if k >= total and outstanding == 0:
                break
            timeout = max(0.0, first + k * period - now) if k < total else 0.5
        else:
            if outstanding == 0:
                break
            timeout = 0.5
        if now > give_up:
            res.unanswered = outstanding
            break
        for key, _ in sel.select(timeout):
            c = key.data
            try:
                status = read_response(c)
            except OSError as exc:
                lost = len(c.pending) + c.busy
                res.errors += lost
                res.first_error = res.first_error or repr(exc)
                outstanding -= lost
                c.pending.clear()
                c.dead = True
                sel.unregister(c.sock)
                continue
            if status is None:
                continue
            if not c.busy:  # e.g. a 408 on a connection the server gave up on
                res.errors += 1
                res.first_error = res.first_error or f"unsolicited HTTP {status}"
                continue
            done = time.monotonic()
            outstanding -= 1
            last_done = done
            res.latencies.append(done - c.t0)
            if status != 200:
                res.errors += 1
                res.first_error = res.first_error or f"HTTP {status}"
            c.busy = False
            if c.pending:
                send(c, c.pending.popleft())
            elif not open_loop and done < end:
                send(c, done)
                outstanding += 1
    res.elapsed_s = last_done - start
    return res


# --- the new-connection client ---------------------------------------------------------------


@dataclass
class HandshakeSpec:
    port: int
    ca: str | None
    cert: str | None
    key: str | None
    threads: int
    seconds: float


def handshake_worker(spec: HandshakeSpec, pipe: Pipe) -> None:
    try:
        ctx = None
        if spec.ca is not None:
            ctx = pki.client_context(Path(spec.ca), Path(spec.cert), Path(spec.key))  # type: ignore[arg-type]
        request = (
            f"GET /api/v1/health HTTP/1.1\r\nHost: {HOST}:{spec.port}\r\nConnection: close\r\n\r\n"
        ).encode()
        results = [LoadResult() for _ in range(spec.threads)]
        pipe.send("ready")
        start = pipe.recv()
        cpu0 = time.process_time()
        threads = [
            threading.Thread(target=_reconnect_loop, args=(spec, ctx, request, start, r))
            for r in results
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        merged = LoadResult(client_cpu_s=time.process_time() - cpu0, elapsed_s=spec.seconds)
        for r in results:
            merged.latencies.extend(r.latencies)
            merged.errors += r.errors
            merged.first_error = merged.first_error or r.first_error
        pipe.send(merged)
    except BaseException:
        pipe.send(traceback.format_exc())


def _reconnect_loop(
    spec: HandshakeSpec, ctx: ssl.SSLContext | None, request: bytes, start: float, res: LoadResult
) -> None:
    time.sleep(max(0.0, start - time.monotonic()))
    deadline = start + spec.seconds
    while (t0 := time.monotonic()) < deadline:
        try:
            sock = connect(spec.port, ctx)
            try:
                sock.sendall(request)
                reply = bytearray()
                while chunk := sock.recv(65536):  # the server closes: Connection: close
                    reply += chunk
            finally:
                sock.close()
            if reply[9:12] != b"200":
                raise ConnectionError(f"HTTP {bytes(reply[9:12]).decode()}")
            res.latencies.append(time.monotonic() - t0)
        except (OSError, ConnectionError) as exc:
            res.errors += 1
            res.first_error = res.first_error or repr(exc)


# --- running a phase: client processes, CPU accounting --------------------------------------


@dataclass
class Phase:
    requests: int
    rate: float
    errors: int
    unanswered: int
    first_error: str
    p50_ms: float
    p99_ms: float
    server_cpu_s: float
    client_cpu_s: float
    box_busy_pct: float  # of all cores
    wall_s: float

    @property
    def others_pct(self) -> float:
        """CPU that neither the server nor the load client used (other processes), % of a core."""
        box_s = self.box_busy_pct / 100 * (psutil.cpu_count() or 1) * self.wall_s
        return max(0.0, 100 * (box_s - self.server_cpu_s - self.client_cpu_s) / self.wall_s)

    @property
    def server_ms_per_req(self) -> float:
        return 1000 * self.server_cpu_s / max(1, self.requests)

    @property
    def client_ms_per_req(self) -> float:
        return 1000 * self.client_cpu_s / max(1, self.requests)


def _busy(t: Any) -> float:
    return float(t.user + t.nice + t.system + t.irq + t.softirq + t.steal)


def run_phase(
    target: Callable[[Any, Pipe], None], specs: list[Any], server_pid: int, seconds: float
) -> Phase:
    """Start the client processes, wait until they are connected, run them, add up."""
    ctx = mp.get_context("fork")
    procs, pipes = [], []
    try:
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(spec, child), daemon=True)
            proc.start()
            procs.append(proc)
            pipes.append(parent)
        for pipe in pipes:
            msg = pipe.recv()
            if msg != "ready":
                raise RuntimeError(f"load client failed while connecting:\n{msg}")
        server = psutil.Process(server_pid)
        start = time.monotonic() + 0.2
        for pipe in pipes:
            pipe.send(start)
        time.sleep(max(0.0, start - time.monotonic()))
        box0, srv0 = psutil.cpu_times(), server.cpu_times()
        results = []
        for pipe in pipes:
            msg = pipe.recv()
            if isinstance(msg, str):
                raise RuntimeError(f"load client failed:\n{msg}")
            results.append(msg)
        wall = time.monotonic() - start
        box1, srv1 = psutil.cpu_times(), server.cpu_times()
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    lat = sorted(x for r in results for x in r.latencies)
    elapsed = max(r.elapsed_s for r in results) or seconds
    return Phase(
        requests=len(lat),
        rate=len(lat) / elapsed,
        errors=sum(r.errors for r in results),
        unanswered=sum(r.unanswered for r in results),
        first_error=next((r.first_error for r in results if r.first_error), ""),
        p50_ms=percentile(lat, 50) * 1000,
        p99_ms=percentile(lat, 99) * 1000,
        server_cpu_s=(srv1.user + srv1.system) - (srv0.user + srv0.system),
        client_cpu_s=sum(r.client_cpu_s for r in results),
        box_busy_pct=100 * (_busy(box1) - _busy(box0)) / ((psutil.cpu_count() or 1) * wall),
        wall_s=wall,
    )


def split(items: list[Agent], parts: int) -> list[list[Agent]]:
    return [items[i::parts] for i in range(parts) if items[i::parts]]


def warm_up(fleet: Fleet) -> None:
    """Pools, caches and the heartbeat writer, on a few connections of their own."""
    specs = [
        LoadSpec(fleet.port, fleet.ca, g, "closed", 0, 2.0) for g in split(fleet.agents[:8], 2)
    ]
    run_phase(load_worker, specs, fleet.server_pid, 2.0)


def open_loop(fleet: Fleet, args: argparse.Namespace) -> Phase:
    n = len(fleet.agents)
    specs = [
        LoadSpec(fleet.port, fleet.ca, g, "open", args.rate * len(g) / n, args.seconds,
                 phase=i / args.rate)
        for i, g in enumerate(split(fleet.agents, args.client_procs))
    ]  # fmt: skip
    return run_phase(load_worker, specs, fleet.server_pid, args.seconds)


def saturation(fleet: Fleet, args: argparse.Namespace) -> Phase:
    busy = fleet.agents[: args.saturate_connections]
    specs = [
        LoadSpec(fleet.port, fleet.ca, g, "closed", 0, args.saturate_seconds)
        for g in split(busy, args.client_procs)
    ]
    return run_phase(load_worker, specs, fleet.server_pid, args.saturate_seconds)


def reconnect(fleet: Fleet, args: argparse.Namespace, mode: str) -> Phase:
    """New connection per request from W threads in one process, or W processes."""
    a = fleet.agents[0]
    cert = (a.cert, a.key) if fleet.tls else (None, None)
    threads, procs = (args.hs_workers, 1) if mode == "threads" else (1, args.hs_workers)
    spec = HandshakeSpec(fleet.port, fleet.ca, *cert, threads, args.hs_seconds)
    return run_phase(handshake_worker, [spec] * procs, fleet.server_pid, args.hs_seconds)


def check_mtls(fleet: Fleet) -> None:
    """A heartbeat on a fresh connection: proves the client certificate is presented."""
    a = fleet.agents[0]
    ctx = pki.client_context(Path(fleet.ca), Path(a.cert), Path(a.key))  # type: ignore[arg-type]
    with connect(fleet.port, ctx) as sock:
        sock.sendall(a.request)
        head = sock.recv(65536)
    if head[9:12] != b"200":
        raise RuntimeError(f"a heartbeat with the agent certificate failed: {head[:200]!r}")
    bare = pki.client_context(Path(fleet.ca))  # type: ignore[arg-type]
    with connect(fleet.port, bare) as sock:
        sock.sendall(a.request)
        head = sock.recv(65536)
    if head[9:12] != b"403":
        raise RuntimeError(f"a heartbeat without a certificate was not refused: {head[:200]!r}")


def handshake_breakdown(box: Sandbox, agent: Agent, n: int) -> dict[str, float]:
    """Where one mTLS handshake's CPU goes, in-process over a socketpair (ms, thread CPU).

    The server side uses the server's own files and contexts built as `kitt.http` builds
    them (`pki.server_context`, cheroot's builtin adapter computing the TLS environ).
    """
    from cheroot.ssl.builtin import BuiltinSSLAdapter

    certs = box.home / "server" / "certs"
    crt, key, ca = certs / "server.pem", certs / "server-key.pem", certs / "ca.pem"
    cctx = pki.client_context(ca, Path(agent.cert), Path(agent.key))  # type: ignore[arg-type]
    out: dict[str, float] = {}
    for tickets in (2, 0):
        sctx = pki.server_context(crt, key, ca, require_client=False)
        sctx.num_tickets = tickets  # OpenSSL's default is 2; Python clients never resume
        adapter = BuiltinSSLAdapter(str(crt), str(key))
        adapter.context = sctx
        tot = {"server": 0.0, "environ": 0.0, "client": 0.0}
        for i in range(n + 10):  # 10 warm-up rounds
            a, b = socket.socketpair()
            part: dict[str, float] = {}
            th = threading.Thread(target=_serve_handshake, args=(sctx, adapter, a, part))
            th.start()
            t0 = time.thread_time()
            with cctx.wrap_socket(b, server_hostname=HOST):
                part["client"] = time.thread_time() - t0
                th.join()
            if i >= 10:
                for k, v in part.items():
                    tot[k] += v
        for k, v in tot.items():
            out[f"{k}-{tickets}"] = 1000 * v / n
    return out


def _serve_handshake(
    sctx: ssl.SSLContext, adapter: Any, sock: socket.socket, part: dict[str, float]
) -> None:
    t0 = time.thread_time()
    tls = sctx.wrap_socket(sock, server_side=True)
    t1 = time.thread_time()
    adapter.get_environ(tls)
    part["server"], part["environ"] = t1 - t0, time.thread_time() - t1
    tls.close()


def background_load(seconds: float = 1.0) -> float:
    """How busy the machine is before we start (% of all cores)."""
    return float(psutil.cpu_percent(interval=seconds))


# --- report -----------------------------------------------------------------------------------


def line(label: str, p: Phase) -> str:
    text = (
        f"  {label:<38} {p.rate:6.0f}/s  p50 {p.p50_ms:6.1f} ms  p99 {p.p99_ms:6.1f} ms  "
        f"server {p.server_ms_per_req:5.2f} ms CPU/req ({100 * p.server_cpu_s / p.wall_s:3.0f}% "
        f"of a core)  client {p.client_ms_per_req:5.2f} ms CPU/req  box busy "
        f"{p.box_busy_pct:3.0f}% (others {p.others_pct:3.0f}% of a core)"
    )
    if p.errors or p.unanswered:
        text += f"  ERRORS {p.errors} unanswered {p.unanswered} (first: {p.first_error})"
    return text


def median_phase(runs: list[Phase]) -> Phase:
    """Each figure's median over the rounds (errors add up)."""
    values = {
        f.name: statistics.median(getattr(r, f.name) for r in runs)
        for f in fields(Phase)
        if f.name not in ("errors", "unanswered", "first_error")
    }
    return Phase(
        **values,
        errors=sum(r.errors for r in runs),
        unanswered=sum(r.unanswered for r in runs),
        first_error=next((r.first_error for r in runs if r.first_error), ""),
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}x" if b else "  n/a"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--agents", type=int, default=200, help="simulated agents per server")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per heartbeat payload")
    ap.add_argument("--rate", type=float, default=400.0, help="offered heartbeats/s (open loop)")
    ap.add_argument("--seconds", type=float, default=6.0, help="open-loop duration per round")
    ap.add_argument("--saturate-connections", type=int, default=16)
    ap.add_argument("--saturate-seconds", type=float, default=5.0, help="per round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds, plain and mTLS alternating")
    ap.add_argument("--client-procs", type=int, default=2, help="heartbeat client processes")
    ap.add_argument("--hs-workers", type=int, default=4, help="new-connection client workers")
    ap.add_argument("--hs-seconds", type=float, default=3.0, help="per round")
    ap.add_argument("--breakdown-rounds", type=int, default=300, help="in-process handshakes")
    args = ap.parse_args()
    # `timeout`, `kill` or a closed terminal: unwind, so that the servers get stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))

    cores = psutil.cpu_count()
    print(f"tls_cost: {args.agents} agents per server, {args.gpus}-GPU heartbeats "
          f"({len(heartbeat_body(args.gpus))} bytes), {ssl.OPENSSL_VERSION}, "
          f"Python {sys.version.split()[0]}, {cores} CPU cores")  # fmt: skip
    print(f"NOTE: the load client and the server share these {cores} cores (as does anything "
          "else running here): a rate with 'box busy' near 100% is a joint limit, not the "
          "server's alone; 'server ms CPU/req' is the figure that travels to other machines")  # fmt: skip
    idle = background_load()
    print(f"background load before starting: {idle:.0f}% of all cores"
          + ("  WARNING: other processes are busy; figures will be noisy" if idle > 10 else ""))  # fmt: skip
    t_start = time.monotonic()
    runs: dict[str, dict[str, list[Phase]]] = {"plain": {}, "mTLS": {}}

    def record(name: str, what: str, label: str, phase: Phase) -> None:
        runs[name].setdefault(what, []).append(phase)
        print(line(f"[{name:5}] {label}", phase), flush=True)

    with ExitStack() as servers:
        boxes = {
            "plain": servers.enter_context(
                server_sandbox("--heartbeat-interval", "30", "--no-tls")
            ),
            "mTLS": servers.enter_context(server_sandbox("--heartbeat-interval", "30", "--tls")),
        }
        fleets = {}
        for name, build in (("plain", plain_fleet), ("mTLS", tls_fleet)):
            t = time.monotonic()
            fleets[name] = build(boxes[name], args.agents, args.gpus)
            how = "enrolled (own key, CSR, cert, token) and registered" if name == "mTLS" else (
                "registered with a bootstrap token")  # fmt: skip
            print(f"[{name:5}] server pid {fleets[name].server_pid}, port {fleets[name].port}: "
                  f"{args.agents} agents {how} in {time.monotonic() - t:.1f} s")  # fmt: skip
        check_mtls(fleets["mTLS"])
        print("[mTLS ] checked: a heartbeat with the agent certificate gets 200, without one 403")
        for fleet in fleets.values():
            warm_up(fleet)

        print(f"\n1. keep-alive heartbeats ({args.repeats} rounds, servers alternating; one "
              f"connection per agent; open loop offered {args.rate:.0f}/s over {args.agents} "
              f"agents, then saturation with {args.saturate_connections} busy connections)")  # fmt: skip
        for r in range(1, args.repeats + 1):
            for name, fleet in fleets.items():
                record(
                    name, "open", f"open loop {args.rate:.0f}/s, round {r}", open_loop(fleet, args)
                )
            for name, fleet in fleets.items():
                record(name, "saturation", f"saturation, round {r}", saturation(fleet, args))

        print(f"\n2. a new connection per request (GET /api/v1/health, Connection: close; mTLS: "
              f"full handshake with an agent certificate, no resumption), {args.hs_workers} "
              f"client threads in one process vs {args.hs_workers} processes, {args.repeats} rounds)")  # fmt: skip
        for r in range(1, args.repeats + 1):
            for mode in ("threads", "processes"):
                for name, fleet in fleets.items():
                    record(name, f"new-{mode}", f"new conn, {args.hs_workers} {mode}, round {r}",
                           reconnect(fleet, args, mode))  # fmt: skip
        parts = handshake_breakdown(boxes["mTLS"], fleets["mTLS"].agents[0], args.breakdown_rounds)
        print(f"  one mTLS handshake in-process over a socketpair ({args.breakdown_rounds} rounds, "
              f"thread CPU ms): server OpenSSL handshake {parts['server-2']:.2f} (with "
              f"num_tickets=0: {parts['server-0']:.2f}), cheroot TLS environ "
              f"{parts['environ-2']:.2f}, client handshake {parts['client-2']:.2f}")  # fmt: skip

    med = {name: {what: median_phase(ps) for what, ps in r.items()} for name, r in runs.items()}
    print(f"\nsummary: mTLS vs plain (medians of the rounds), {time.monotonic() - t_start:.0f} s "
          "in all, servers stopped")  # fmt: skip
    rows = [
        (f"keep-alive, offered {args.rate:.0f}/s: achieved", "open", "rate", "/s"),
        (f"keep-alive, offered {args.rate:.0f}/s: p50", "open", "p50_ms", "ms"),
        (f"keep-alive, offered {args.rate:.0f}/s: p99", "open", "p99_ms", "ms"),
        (
            f"keep-alive, offered {args.rate:.0f}/s: server CPU",
            "open",
            "server_ms_per_req",
            "ms/req",
        ),
        ("keep-alive saturation: rate", "saturation", "rate", "/s"),
        ("keep-alive saturation: p50", "saturation", "p50_ms", "ms"),
        ("keep-alive saturation: p99", "saturation", "p99_ms", "ms"),
        ("keep-alive saturation: server CPU", "saturation", "server_ms_per_req", "ms/req"),
    ]
    best = {
        name: max((m["new-threads"], m["new-processes"]), key=lambda p: p.rate)
        for name, m in med.items()
    }
    print(f"  {'':<44} {'mTLS':>9}   {'plain':>9}          mTLS/plain")
    for label, what, attr, unit in rows:
        a, b = getattr(med["mTLS"][what], attr), getattr(med["plain"][what], attr)
        print(f"  {label:<44} {a:9.2f} vs {b:9.2f} {unit:<7} {ratio(a, b)}")
    for label, attr, unit in (("new connection per request: rate (best)", "rate", "/s"),
                              ("new connection per request: p50", "p50_ms", "ms"),
                              ("new connection per request: p99", "p99_ms", "ms"),
                              ("new connection per request: server CPU", "server_ms_per_req", "ms/req"),
                              ("new connection per request: client CPU", "client_ms_per_req", "ms/req")):  # fmt: skip
        a, b = getattr(best["mTLS"], attr), getattr(best["plain"], attr)
        print(f"  {label:<44} {a:9.2f} vs {b:9.2f} {unit:<7} {ratio(a, b)}")
    hs, tcp = best["mTLS"], best["plain"]
    print(f"  a full mTLS connection costs the server {hs.server_ms_per_req - tcp.server_ms_per_req:.2f} "
          f"ms CPU more than a plain one: one core, with no client beside it, would accept "
          f"~{1000 / hs.server_ms_per_req:.0f} mTLS connections/s (a projection)")  # fmt: skip
    for name in ("plain", "mTLS"):
        th, pr = med[name]["new-threads"], med[name]["new-processes"]
        winner = (
            "processes"
            if pr.rate > th.rate * 1.05
            else "threads"
            if th.rate > pr.rate * 1.05
            else "neither"
        )
        print(f"  {name} new-connection client: {args.hs_workers} threads {th.rate:.0f}/s "
              f"({th.client_ms_per_req:.2f} ms client CPU/req) vs {args.hs_workers} processes "
              f"{pr.rate:.0f}/s ({pr.client_ms_per_req:.2f} ms): {winner} faster by >5%")  # fmt: skip


if __name__ == "__main__":
    main()
