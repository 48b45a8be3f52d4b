"""The live fleet stream served by one shared reader (kitt.server.fleet_feed).

Streams against a real server (processes on loopback, httpx-sse clients, agents that
exist through the API so that their heartbeats are ours to write), and the feed in
process, on a real SQLite store and real threads, where its read counter and its
history bound can be reached. Every wait has a deadline (a read timeout, ``wait_for``).
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import pytest

from conftest import Kitt, wait_for
from kitt.protocol import Heartbeat, RegisterRequest
from kitt.server.api.fleet import summaries
from kitt.server.events import FLEET_TOPIC, EventHub
from kitt.server.fleet_feed import FleetFeed
from kitt.server.store.agents import AgentStore, BeatRecord
from kitt.server.store.credentials import CredentialStore
from kitt.server.store.db import make_engine, migrate, sqlite_url

TASK = "tst_0123456789abcdef0123"
Event = tuple[str, Any]

# --- against the real server ------------------------------------------------------------


class ApiAgents:
    """Agents registered through the API, beating when the test says."""

    def __init__(self, kitt: Kitt, *names: str) -> None:
        self.kitt = kitt
        self.ids: dict[str, str] = {}
        self.tokens: dict[str, str] = {}
        bootstrap = kitt.bootstrap_token(uses=len(names) + 1)
        for name in names:
            self.register(name, bootstrap)
        self.spare = bootstrap

    def register(self, name: str, bootstrap: str | None = None) -> str:
        body = {"name": name, "hostname": f"{name}.lab", "port": 9, "kitt_version": "0",
                "gpu_info": "1x NVIDIA A100-SXM4-40GB", "gpu_count": 1}  # fmt: skip
        answer = self.kitt.api("POST", "/api/v1/agents/register",
                               token=bootstrap or self.spare, json=body)  # fmt: skip
        assert answer.status_code == 201, answer.text
        self.ids[name], self.tokens[name] = answer.json()["agent_id"], answer.json()["token"]
        return self.ids[name]

    def beat(self, name: str, pct: float, mem: float = 7.25) -> None:
        body = {"status": "running", "current_task": TASK, "uptime_s": 5,
                "gpu_utilization_pct": pct, "gpu_memory_used_gb": mem}  # fmt: skip
        sent = self.kitt.api("POST", f"/api/v1/agents/{self.ids[name]}/heartbeat",
                             token=self.tokens[name], json=body)  # fmt: skip
        assert sent.status_code == 200, sent.text

    def listed(self, name: str) -> dict[str, Any]:
        """The agent as ``GET /api/v1/agents`` lists it now."""
        return next(a for a in self.kitt.agents() if a["name"] == name)


def open_streams(kitt: Kitt, stack: ExitStack, count: int) -> list[Iterator[Event]]:
    client = stack.enter_context(httpx.Client(timeout=httpx.Timeout(10, read=20)))
    url = kitt.server_url + "/api/v1/fleet/events"
    admin = {"Authorization": f"Bearer {kitt.admin_token}"}
    streams: list[Iterator[Event]] = []
    for _ in range(count):
        source = stack.enter_context(httpx_sse.connect_sse(client, "GET", url, headers=admin))
        assert source.response.status_code == 200
        streams.append((e.event, json.loads(e.data)) for e in source.iter_sse() if e.data)
    return streams


def next_event(stream: Iterator[Event]) -> Event:
    event = next(stream, None)
    assert event is not None, "the stream ended"
    return event


def test_every_stream_gets_the_same_changes_with_exact_values(kitt: Kitt) -> None:
    kitt.start_server(interval="60")  # nobody is called offline while the test runs
    agents = ApiAgents(kitt, "api-01", "api-02")
    with ExitStack() as stack:
        streams = open_streams(kitt, stack, 5)
        listed = kitt.agents()
        for stream in streams:
            assert next_event(stream) == ("snapshot", {"agents": listed})
        assert [a["name"] for a in listed] == ["api-01", "api-02"]

        agents.beat("api-01", 42.5, 7.25)
        received = [next_event(stream) for stream in streams]
        name, data = received[0]
        assert name == "agent"
        assert (data["id"], data["state"], data["current_task"]) == (
            agents.ids["api-01"], "running", TASK)  # fmt: skip
        assert (data["gpu_utilization_pct"], data["gpu_memory_used_gb"]) == (42.5, 7.25)
        assert data == agents.listed("api-01")
        assert received == [received[0]] * 5

        assert kitt.api("DELETE", "/api/v1/agents/api-02").status_code == 200
        gone = ("removed", {"id": agents.ids["api-02"], "name": "api-02"})
        assert [next_event(stream) for stream in streams] == [gone] * 5


def test_a_stream_joining_later_starts_from_the_newest_state(kitt: Kitt) -> None:
    kitt.start_server(interval="60")
    agents = ApiAgents(kitt, "api-01")
    with ExitStack() as stack:
        (first,) = open_streams(kitt, stack, 1)
        assert next_event(first)[0] == "snapshot"
        agents.beat("api-01", 10.0)
        assert next_event(first)[1]["gpu_utilization_pct"] == 10.0  # the feed has read it

        (later,) = open_streams(kitt, stack, 1)
        name, data = next_event(later)
        assert name == "snapshot"
        assert data["agents"] == [agents.listed("api-01")]
        assert data["agents"][0]["gpu_utilization_pct"] == 10.0

        agents.beat("api-01", 20.0)
        for stream in (later, first):  # only the newer change: 10.0 is not sent again
            name, data = next_event(stream)
            assert (name, data["gpu_utilization_pct"]) == ("agent", 20.0)
            assert data == agents.listed("api-01")


def test_a_stalled_stream_holds_nobody_up_and_misses_nothing(kitt: Kitt) -> None:
    kitt.start_server(interval="60")
    agents = ApiAgents(kitt, "api-01", "api-02")
    with ExitStack() as stack:
        live, stalled = open_streams(kitt, stack, 2)
        assert next_event(live)[0] == "snapshot"
        name, snapshot = next_event(stalled)
        assert name == "snapshot"
        # The stalled stream is not read from here on: the live one still gets each
        # change within its read deadline.
        for pct in (1.0, 2.0, 3.0, 4.0, 5.0):
            agents.beat("api-01", pct)
            assert next_event(live)[1]["gpu_utilization_pct"] == pct
        agents.register("api-03")
        name, data = next_event(live)
        assert (name, data["name"]) == ("agent", "api-03")
        assert kitt.api("DELETE", "/api/v1/agents/api-02").status_code == 200
        assert next_event(live) == ("removed", {"id": agents.ids["api-02"], "name": "api-02"})

        # Resumed, it catches up in order (within the feed's history: every change).
        expected = {a["id"]: a for a in kitt.agents()}
        state = {a["id"]: a for a in snapshot["agents"]}
        seen = []
        while state != expected:
            name, data = next_event(stalled)
            if name == "removed":
                del state[data["id"]]
            else:
                assert name == "agent", name  # no snapshot: it was never that far behind
                state[data["id"]] = data
                if data["name"] == "api-01":
                    seen.append(data["gpu_utilization_pct"])
        assert seen == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert sorted(a["name"] for a in state.values()) == ["api-01", "api-03"]


# --- the feed in process: its reads and its history ----------------------------------------


class Fleet:
    """A real SQLite store with the server's wiring: every change notifies the hub."""

    def __init__(self, tmp_path: Path) -> None:
        engine = make_engine(sqlite_url(tmp_path / "kitt.db"))
        migrate(engine)
        self.store, self.credentials = AgentStore(engine), CredentialStore(engine)
        self.hub = EventHub()
        self.store.on_change = partial(self.hub.notify, FLEET_TOPIC)

    def feed(self, **options: Any) -> FleetFeed:
        read = partial(summaries, self.store, self.credentials)
        return FleetFeed(read, self.hub, coalesce_s=0.0, **options)

    def register(self, name: str) -> str:
        request = RegisterRequest(name=name, hostname="h", port=1, kitt_version="0")
        return self.store.register(request, None, datetime.now(timezone.utc))[0]

    def beat(self, agent_id: str, pct: float) -> None:
        beat = Heartbeat(status="running", uptime_s=1, gpu_utilization_pct=pct)
        self.store.record_beats([BeatRecord(agent_id, datetime.now(timezone.utc), beat)])


def parse(text: str) -> list[Event]:
    """The events of one chunk of SSE text (keepalives are no events)."""
    events = []
    for frame in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines() if line[:1] != ":")
        if fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def pull(stream: Iterator[str]) -> list[Event]:
    """The next text a stream sends (within its 30 s keepalive: a keepalive fails)."""
    events = parse(next(stream))
    assert events, "a keepalive, not the change"
    return events


class Reader(threading.Thread):
    """One stream read on its own thread, as the server serves each."""

    def __init__(self, feed: FleetFeed) -> None:
        super().__init__(daemon=True)
        self.stream = feed.frames(keepalive_s=30)
        self.events: queue.Queue[Event] = queue.Queue()
        self.start()

    def run(self) -> None:
        for text in self.stream:
            for event in parse(text):
                self.events.put(event)

    def next(self) -> Event:
        return self.events.get(timeout=20)


def test_one_read_of_the_fleet_serves_every_stream(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    one, two = fleet.register("one"), fleet.register("two")
    feed = fleet.feed()
    readers = [Reader(feed) for _ in range(5)]
    for reader in readers:
        name, data = reader.next()
        assert (name, [a["name"] for a in data["agents"]]) == ("snapshot", ["one", "two"])
    assert feed.reads == 1  # the first stream's; the others were served what it read

    for pct in (10.0, 20.0, 30.0):
        fleet.beat(one, pct)
        for reader in readers:
            name, data = reader.next()
            assert (name, data["id"], data["gpu_utilization_pct"]) == ("agent", one, pct)
    assert feed.reads == 4  # one per change, not one per change and stream

    late = Reader(feed)
    name, data = late.next()
    assert name == "snapshot" and data["agents"][0]["gpu_utilization_pct"] == 30.0
    assert feed.reads == 4  # joining costs no read: the snapshot of the current version

    fleet.store.delete(two)
    for reader in [*readers, late]:
        assert reader.next() == ("removed", {"id": two, "name": "two"})
    assert feed.reads == 5

    fleet.hub.close()  # the server stopping ends every stream, and the reader
    for reader in [*readers, late]:
        reader.join(timeout=20)
        assert not reader.is_alive()
    wait_for(lambda: not feed.running, what="the feed's reader to stop")


def test_a_stream_left_behind_gets_a_snapshot_and_the_reader_stops_with_the_last(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path)
    agent = fleet.register("one")
    feed = fleet.feed(history_versions=2)
    live, stalled = feed.frames(keepalive_s=30), feed.frames(keepalive_s=30)
    assert pull(live)[0][0] == pull(stalled)[0][0] == "snapshot"

    fleet.beat(agent, 10.0)
    assert pull(live) == pull(stalled) == [("agent", fleet_summary(fleet, "one"))]
    for pct in (20.0, 30.0):  # two versions behind: within the history, both, in order
        fleet.beat(agent, pct)
        assert pull(live)[0][1]["gpu_utilization_pct"] == pct
    assert [d["gpu_utilization_pct"] for _, d in pull(stalled)] == [20.0, 30.0]
    for pct in (40.0, 50.0, 60.0):  # three behind: past it, a snapshot of the newest
        fleet.beat(agent, pct)
        assert pull(live)[0][1]["gpu_utilization_pct"] == pct
    assert pull(stalled) == [("snapshot", {"agents": [fleet_summary(fleet, "one")]})]
    assert fleet_summary(fleet, "one")["gpu_utilization_pct"] == 60.0

    live.close()
    stalled.close()
    wait_for(lambda: not feed.running, what="the feed's reader to stop with the last stream")
    reads = feed.reads
    fleet.beat(agent, 70.0)  # nobody listens: nothing reads it
    assert feed.reads == reads
    again = feed.frames(keepalive_s=30)
    assert pull(again) == [("snapshot", {"agents": [fleet_summary(fleet, "one")]})]
    assert fleet_summary(fleet, "one")["gpu_utilization_pct"] == 70.0  # read afresh
    assert feed.reads == reads + 1
    again.close()
    wait_for(lambda: not feed.running, what="the feed's reader to stop again")
    # Back with nothing changed meanwhile: still a read (it could not know), and a snapshot.
    last = feed.frames(keepalive_s=30)
    assert pull(last) == [("snapshot", {"agents": [fleet_summary(fleet, "one")]})]
    assert feed.reads == reads + 2
    last.close()


def fleet_summary(fleet: Fleet, name: str) -> dict[str, Any]:
    return next(a for a in summaries(fleet.store, fleet.credentials) if a["name"] == name)


@pytest.fixture(autouse=True)
def _no_reader_left_running() -> Iterator[None]:
    """A feed's reader thread never outlives its streams."""
    yield
    wait_for(
        lambda: not any(t.name == "fleet-feed" for t in threading.enumerate()),
        what="every fleet-feed thread to end",
    )
