"""The dashboard's costs: the live fleet stream under heartbeat load, and page renders.

Against a real ``kitt server`` (SQLite, fresh KITT_HOME, plain HTTP on 127.0.0.1) with N
simulated agents (registered as in heartbeat_capacity.py, 8 GPUs each):

1. **heartbeat -> dashboard latency**: agents heartbeat open loop (round-robin, fixed
   schedule, raw keep-alive connections) at each rate, while K subscribers read
   ``GET /api/v1/fleet/events`` (admin bearer token). Every beat carries a unique marker
   (``gpu_memory_used_gb`` = a sequence number), so each ``agent`` event tells which beat
   it shows. Latency runs from writing the beat to the socket to a subscriber reading the
   chunk with that event. A beat whose marker a subscriber never sees because a later
   beat of the same agent was read first is *coalesced* (the stream reads the fleet at
   most twice a second: by design, not an error); *lost* beats (never seen, nothing later
   seen either) would be a bug. Server CPU (% of one core) and RSS come from psutil.
2. **dashboards' cost on the heartbeat path**: heartbeat p50/p99 (from the scheduled send
   time, as in heartbeat_capacity.py) for every run, plus one with 0 subscribers at
   ``--cost-rate``. Beats still unanswered 5 s after the schedule ends are given up and
   count as ">=" the time they had waited, so an overloaded run still ends.
3. **page renders**, signed in through the login form (session cookie): /fleet, one
   agent's page, /results (after importing R results; 50 a page), /results/compare with
   2 and 10 ids, and ``GET /api/v1/agents`` for the same data without a template.

The load client (one asyncio loop: senders and subscribers) shares the machine's cores
with the server; its own CPU is printed too, so a saturated client can be told apart
from a slow server.

    .venv/bin/python benchmarks/dashboard_live.py [--agents 1000] [--rates 33,500]
        [--subscribers 1,20] [--cost-rate 500] [--seconds 20] [--results 1000] [--requests 30]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import psutil
from _harness import (
    Connection,
    Sandbox,
    heartbeat_body,
    now,
    percentile,
    register_agents,
    server_sandbox,
)

DRAIN_S = 5.0  # after the last beat: how long subscribers may take to show it
SETTLE_S = 1.5  # beats after closing subscribers, so the server notices they are gone
GRACE_S = 5.0  # after the last scheduled beat: how long its replies may take
MARK = "@MARK@"


# --- heartbeats with a marker -----------------------------------------------------------------


class MarkedBeats:
    """Heartbeat requests whose ``gpu_memory_used_gb`` is a fresh sequence number each,
    with a ledger of when each was written and for which agent."""

    def __init__(self, port: int, agents: list[tuple[str, str]], gpu_count: int) -> None:
        beat = json.loads(heartbeat_body(gpu_count))
        beat["gpu_memory_used_gb"] = MARK
        before, after = json.dumps(beat).split(json.dumps(MARK))
        self.before, self.after = before.encode(), after.encode()
        self.port = port
        self.agents = agents
        self.seq = itertools.count(1)
        self.sent: dict[int, tuple[str, float]] = {}  # seq -> (agent id, written at)

    def request(self, agent_id: str, token: str, seq: int) -> bytes:
        body = self.before + str(seq).encode() + self.after
        head = (
            f"POST /api/v1/agents/{agent_id}/heartbeat HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def open_loop(
        self, rate: float, seconds: float, conns: int, grace: float = GRACE_S
    ) -> dict[str, Any]:
        """Beats on a fixed schedule; latency from the scheduled time to the reply. Beats
        still unanswered ``grace`` seconds after the schedule ends are given up (a server
        that fell far behind would otherwise keep the run going for minutes); they count
        with the time they had waited, as a lower bound."""
        pool: asyncio.Queue[Connection] = asyncio.Queue()
        for _ in range(conns):
            pool.put_nowait(await Connection.open(self.port))
        waited: list[tuple[float, bool]] = []  # (seconds, only a lower bound)
        errors = 0
        cycle = itertools.cycle(self.agents)
        total = max(1, int(rate * seconds))
        start = now() + 0.05

        async def one(scheduled: float, agent_id: str, token: str) -> None:
            nonlocal errors
            seq = next(self.seq)
            payload = self.request(agent_id, token, seq)
            conn = await pool.get()
            self.sent[seq] = (agent_id, now())
            try:
                ok = await conn.roundtrip(payload) == 200
            except asyncio.CancelledError:
                self.sent.pop(seq, None)  # given up: not in the ledger
                conn.close()
                raise
            except (OSError, asyncio.IncompleteReadError):
                ok = False
                conn.close()
                conn = await Connection.open(self.port)
            pool.put_nowait(conn)
            errors += not ok
            waited.append((now() - scheduled, False))

        tasks: dict[asyncio.Task[None], float] = {}
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - now()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks[asyncio.create_task(one(scheduled, *next(cycle)))] = scheduled
        _, pending = await asyncio.wait(tasks, timeout=grace)
        end = now()
        for task in pending:
            task.cancel()
            waited.append((end - tasks[task], True))
        await asyncio.gather(*pending, return_exceptions=True)
        while not pool.empty():
            pool.get_nowait().close()
        waited.sort()
        answered = total - len(pending)
        return {
            "sent": total, "answered": answered, "achieved_per_s": answered / (end - start),
            "errors": errors, "p50": pick(waited, 50), "p99": pick(waited, 99),
            "max": pick(waited, 100),
        }  # fmt: skip


def pick(waited: list[tuple[float, bool]], q: float) -> str:
    """A percentile in ms, marked ">=" where it falls among beats given up on."""
    k = min(len(waited) - 1, max(0, round(q / 100 * (len(waited) - 1))))
    seconds, bound = waited[k]
    return f"{'>=' if bound else ''}{seconds * 1000:.1f}"


# --- a lean SSE subscriber --------------------------------------------------------------------


@dataclass
class Subscriber:
    """One ``/api/v1/fleet/events`` stream over a raw socket: when each marker was first
    seen (HTTP/1.1 chunked, parsed by hand so the client stays cheap)."""

    port: int
    token: str
    seen: dict[int, float] = field(default_factory=dict)  # marker -> first read at
    events: int = 0
    reads: int = 0  # chunks that carried agent events: one per server-side fleet read
    received: int = 0  # bytes
    snapshot_agents: int = 0
    snapshot_bytes: int = 0
    snapshot_s: float = 0.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        t0 = now()
        reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(
            f"GET /api/v1/fleet/events HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: Bearer {self.token}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if int(head[9:12]) != 200:
            raise SystemExit(f"fleet stream refused: {head[:200]!r}")
        if b"transfer-encoding: chunked" not in head.lower():
            raise SystemExit(f"expected a chunked stream: {head[:300]!r}")
        pending = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return
            data = (await reader.readexactly(size + 2))[:-2]
            at = now()
            self.received += size
            *frames, pending = (pending + data).split(b"\n\n")
            agent_events = 0
            for frame in frames:
                agent_events += self.handle(frame, at, t0)
            if agent_events:
                self.reads += 1
                self.events += agent_events

    def handle(self, frame: bytes, at: float, t0: float) -> int:
        """Record one SSE frame; returns 1 for an ``agent`` event."""
        name, data = b"", b""
        for line in frame.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:]
            elif line.startswith(b"data: "):
                data = line[6:]
        if name == b"agent":
            mark = json.loads(data)["gpu_memory_used_gb"]
            if mark is not None:
                self.seen.setdefault(round(mark), at)
            return 1
        if name == b"snapshot":
            self.snapshot_agents = len(json.loads(data)["agents"])
            self.snapshot_bytes = len(frame)
            self.snapshot_s = at - t0
            self.ready.set()
        return 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- one scenario -----------------------------------------------------------------------------


@dataclass
class Outcome:
    rate: float
    subscribers: int
    beats: dict[str, Any]
    written: int  # beats written to the server (the ledger)
    latencies_ms: list[float]
    coalesced: int
    lost: int
    events_per_sub: float
    reads_per_s: float
    mib_per_s: float
    snapshot_ms: float
    snapshot_kib: float
    server_cpu: float
    client_cpu: float
    rss_mib: float


def tally(
    subs: list[Subscriber], sent: dict[int, tuple[str, float]]
) -> tuple[list[float], int, int]:
    """Per (beat, subscriber): seen (its latency), coalesced, or lost."""
    latencies: list[float] = []
    coalesced = lost = 0
    for sub in subs:
        newest: dict[str, int] = {}
        for seq in sub.seen:
            if seq in sent:
                agent = sent[seq][0]
                newest[agent] = max(newest.get(agent, 0), seq)
        for seq, (agent, written) in sent.items():
            at = sub.seen.get(seq)
            if at is not None:
                latencies.append((at - written) * 1000)
            elif newest.get(agent, 0) > seq:
                coalesced += 1
            else:
                lost += 1
    latencies.sort()
    return latencies, coalesced, lost


def last_beats(sent: dict[int, tuple[str, float]]) -> set[int]:
    newest: dict[str, int] = {}
    for seq, (agent, _) in sent.items():
        newest[agent] = max(newest.get(agent, 0), seq)
    return set(newest.values())


async def scenario(
    box: Sandbox,
    beats: MarkedBeats,
    server: psutil.Process,
    rate: float,
    count: int,
    seconds: float,
    conns: int,
) -> Outcome:
    subs = [Subscriber(box.port, box.admin_token()) for _ in range(count)]
    tasks = [asyncio.create_task(s.run()) for s in subs]
    await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in subs)), 60)
    beats.sent = {}
    me = psutil.Process()
    cpu0, mine0, t0 = server.cpu_times(), me.cpu_times(), now()
    result = await beats.open_loop(rate, seconds, conns)
    deadline = now() + DRAIN_S
    wanted = last_beats(beats.sent)
    while now() < deadline and not all(wanted <= s.seen.keys() for s in subs):
        await asyncio.sleep(0.05)
    cpu1, mine1, elapsed = server.cpu_times(), me.cpu_times(), now() - t0
    rss = server.memory_info().rss / 2**20
    for s in subs:
        s.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    latencies, coalesced, lost = tally(subs, beats.sent)
    written = len(beats.sent)
    await beats.open_loop(20, SETTLE_S, 4)  # dead streams fail their next write and go

    def busy(a: Any, b: Any) -> float:
        return 100 * ((b.user + b.system) - (a.user + a.system)) / elapsed

    per_sub = max(1, count)
    return Outcome(
        rate=rate, subscribers=count, beats=result, written=written,
        latencies_ms=latencies,
        coalesced=coalesced, lost=lost,
        events_per_sub=sum(s.events for s in subs) / per_sub,
        reads_per_s=sum(s.reads for s in subs) / per_sub / elapsed,
        mib_per_s=sum(s.received for s in subs) / per_sub / elapsed / 2**20,
        snapshot_ms=statistics.median(s.snapshot_s for s in subs) * 1000 if subs else 0.0,
        snapshot_kib=max((s.snapshot_bytes for s in subs), default=0) / 1024,
        server_cpu=busy(cpu0, cpu1), client_cpu=busy(mine0, mine1), rss_mib=rss,
    )  # fmt: skip


# --- pages ------------------------------------------------------------------------------------


def result_documents(count: int) -> Iterator[dict[str, Any]]:
    """Distinct ``kitt.serving`` documents, built by the tests' own generator (so they
    are valid by the contract): 3 steps x 3 runs each, a minute apart."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_results import make_document, metrics  # the contract's example documents

    first = datetime(2026, 1, 1, 10, tzinfo=timezone.utc)
    for i in range(count):
        day = first + timedelta(days=i // 60)
        started = day.replace(minute=i % 60).isoformat()
        k = 1 + (i % 7) / 10
        yield make_document(
            model=("llama-3-8b", "qwen-2-7b", "mistral-7b")[i % 3],
            engine=("vllm", "llama.cpp")[i % 2], version=f"0.{i % 5}.0",
            gpu="NVIDIA H100 80GB HBM3", gpu_count=1 + i % 8, hostname=f"sim-{i % 50:05d}",
            started_at=started, runs=3, jitter={"output_token_throughput": 10.0},
            steps={
                "c=1": (1, metrics(100 * k, 1.5, (20, 40), (10, 12), 10, 650, 1.5, 0.0)),
                "c=4": (4, metrics(350 * k, 5.0, (30, 60), (11, 13), 11, 700, 5.0, 0.0)),
                "c=16": (16, metrics(1000 * k, 12.0, (80, 200), (14, 20), 14, 950, 11, 0.01)),
            },
        )  # fmt: skip


def import_results(box: Sandbox, count: int) -> list[str]:
    ids = []
    with box.user_client() as client:
        for doc in result_documents(count):
            r = client.post("/api/v1/results", json=doc)
            if r.status_code != 201:
                raise SystemExit(f"import failed: {r.status_code} {r.text[:300]}")
            ids.append(str(r.json()["id"]))
    return ids


def signed_in(box: Sandbox) -> httpx.Client:
    """A client with the dashboard's session cookie, got through the login form."""
    client = httpx.Client(base_url=box.url, timeout=60)
    form = client.get("/login")
    marker = 'name="csrf_token" value="'
    start = form.text.index(marker) + len(marker)
    csrf = form.text[start : form.text.index('"', start)]
    done = client.post("/login", data={"csrf_token": csrf, "token": box.admin_token()})
    if done.status_code != 303 or "kitt_session" not in client.cookies:
        raise SystemExit(f"login failed: {done.status_code} {done.text[:300]}")
    return client


def time_page(client: httpx.Client, path: str, requests: int) -> dict[str, float]:
    client.get(path).raise_for_status()  # warm: templates compiled, caches filled
    times, size = [], 0
    for _ in range(requests):
        t0 = now()
        r = client.get(path)
        times.append((now() - t0) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"GET {path}: {r.status_code} {r.text[:300]}")
        size = len(r.content)
    times.sort()
    return {"p50": percentile(times, 50), "p99": percentile(times, 99), "max": times[-1],
            "kib": size / 1024}  # fmt: skip


# --- report -----------------------------------------------------------------------------------


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per heartbeat payload")
    ap.add_argument("--rates", default="33,500", help="heartbeats/s offered (open loop)")
    ap.add_argument("--subscribers", default="1,20", help="fleet streams read at once")
    ap.add_argument("--cost-rate", type=float, default=500, help="rate for 0 vs K streams")
    ap.add_argument("--seconds", type=float, default=20.0, help="per rate x subscribers run")
    ap.add_argument("--connections", type=int, default=64, help="heartbeat connections")
    ap.add_argument("--results", type=int, default=1000, help="results imported for pages")
    ap.add_argument("--requests", type=int, default=30, help="timed requests per page")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    counts = [int(k) for k in args.subscribers.split(",")]
    runs = sorted(
        {(r, k) for r in rates for k in counts}
        | {(args.cost_rate, k) for k in (0, *counts)}
    )  # fmt: skip

    with server_sandbox("--heartbeat-interval", "30") as box:
        t_setup = now()
        agents = register_agents(box, args.agents, args.gpus)
        server = psutil.Process(box.server_pid())
        beats = MarkedBeats(box.port, agents, args.gpus)
        print(f"server pid {server.pid}, {psutil.cpu_count()} CPUs shared by server and "
              f"client; {args.agents} agents x {args.gpus} GPUs registered in "
              f"{now() - t_setup:.1f} s")  # fmt: skip
        # Warm-up: every agent beats once (live GPU data on every row), pools fill.
        asyncio.run(beats.open_loop(min(500, args.agents), 2.0, 16))

        outcomes: dict[tuple[float, int], Outcome] = {}
        for rate, count in runs:
            outcomes[rate, count] = asyncio.run(
                scenario(box, beats, server, rate, count, args.seconds, args.connections)
            )
        snapshot = max(outcomes.values(), key=lambda o: o.subscribers)

        t_import = now()
        ids = import_results(box, args.results)
        print(f"{args.results} results imported in {now() - t_import:.1f} s")
        client = signed_in(box)
        try:
            one = agents[0][0]
            pages = {
                f"/fleet ({args.agents} agents)": "/fleet",
                "/fleet/<agent>": f"/fleet/{one}",
                f"/results (of {args.results}, 50/page)": "/results",
                "/results?offset=950": "/results?offset=950",
                "/results/compare (2 ids)": "/results/compare?ids=" + ",".join(ids[:2]),
                "/results/compare (10 ids)": "/results/compare?ids=" + ",".join(ids[:10]),
                f"/api/v1/agents ({args.agents}, JSON)": "/api/v1/agents",
            }
            timed = {name: time_page(client, path, args.requests) for name, path in pages.items()}
        finally:
            client.close()

    def ms(x: float) -> str:
        return f"{x:.1f}"

    rows = []
    for (rate, count), o in outcomes.items():
        if count == 0:
            continue
        lat = o.latencies_ms
        rows.append([
            f"{rate:.0f}", str(count), str(o.written), ms(percentile(lat, 50)),
            ms(percentile(lat, 99)), ms(lat[-1]) if lat else "-", f"{o.events_per_sub:.0f}",
            f"{o.reads_per_s:.2f}", f"{o.mib_per_s:.2f}",
            f"{o.coalesced} ({100 * o.coalesced / max(1, o.written * count):.1f}%)",
            str(o.lost), f"{o.server_cpu:.0f}", f"{o.client_cpu:.0f}", f"{o.rss_mib:.0f}",
        ])  # fmt: skip
    table(
        f"1. heartbeat -> fleet stream latency ({args.seconds:.0f} s a run; latency from "
        "writing the beat to reading the event; CPU in % of one core)",
        ["beats/s", "subs", "beats", "p50 ms", "p99 ms", "max ms", "events/sub",
         "reads/s/sub", "MiB/s/sub", "coalesced (beat x sub)", "lost", "server CPU",
         "client CPU", "server RSS MiB"],
        rows,
    )  # fmt: skip
    if snapshot.subscribers:
        print(f"   snapshot on connect ({snapshot.snapshot_kib:.0f} KiB): "
              f"{snapshot.snapshot_ms:.0f} ms median with {snapshot.subscribers} connecting "
              "at once")  # fmt: skip

    table(
        "2. heartbeat path by fleet streams open (latency from the scheduled send time; "
        f">= : beats still unanswered {GRACE_S:.0f} s after the schedule ended, given up)",
        ["beats/s", "subs", "answered", "achieved/s", "errors", "p50 ms", "p99 ms", "max ms",
         "server CPU"],
        [[f"{r:.0f}", str(k), f"{o.beats['answered']}/{o.beats['sent']}",
          f"{o.beats['achieved_per_s']:.0f}", str(o.beats["errors"]), o.beats["p50"],
          o.beats["p99"], o.beats["max"], f"{o.server_cpu:.0f}"]
         for (r, k), o in outcomes.items()],
    )  # fmt: skip

    table(
        f"3. pages, signed in, sequential, {args.requests} requests each (server idle)",
        ["page", "p50 ms", "p99 ms", "max ms", "size KiB"],
        [[name, ms(t["p50"]), ms(t["p99"]), ms(t["max"]), f"{t['kib']:.0f}"]
         for name, t in timed.items()],
    )  # fmt: skip


if __name__ == "__main__":
    main()
