"""The streaming client against engines that misbehave in the ways real ones do: events
split across reads, CRLF separators, odd JSON shapes, a server that stops answering; and
the request gate that decides warmup / measured / stop."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kitt.bench.client import StreamingClient
from kitt.bench.datasets import RequestSpec
from kitt.bench.records import RequestRecord
from kitt.bench.runner import _Gate

Writer = Callable[[asyncio.StreamWriter], Any]


class RawEngine:
    """An HTTP/1.1 server whose streamed body is exactly the byte pieces a test gives."""

    def __init__(self, pieces: list[bytes], pause_s: float = 0.0, hang: bool = False) -> None:
        self.pieces = pieces
        self.pause_s = pause_s
        self.hang = hang

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length")), 0)  # fmt: skip
        await reader.readexactly(length)
        if self.hang:
            await asyncio.sleep(3600)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        for piece in self.pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            if self.pause_s:
                await asyncio.sleep(self.pause_s)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()


def run_one(engine: RawEngine, api: str = "completions", timeout_s: float = 5) -> RequestRecord:
    async def main() -> RequestRecord:
        server = await asyncio.start_server(engine.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rec = RequestRecord(step="t", index=0, scheduled=time.perf_counter())
        async with StreamingClient(f"http://127.0.0.1:{port}", "m", api,  # type: ignore[arg-type]
                                   timeout_s=timeout_s) as client:  # fmt: skip
            await client.send(RequestSpec(prompt="hi", output_len=3), rec)
        server.close()
        return rec

    return asyncio.run(main())


def event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def text(t: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": t, "finish_reason": None}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}


def test_events_split_across_reads_and_crlf_separators() -> None:
    stream = (event(text("a")) + event(text("b")) + event(text("c")) + event(USAGE)
              + b"data: [DONE]\n\n").replace(b"\n", b"\r\n")  # fmt: skip
    # Cut into 7-byte pieces, sent 2 ms apart: no event arrives whole.
    pieces = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    rec = run_one(RawEngine(pieces, pause_s=0.002))
    assert rec.error is None
    assert rec.chunks == 3 and rec.usage_completion_tokens == 3 and rec.usage_prompt_tokens == 2
    assert len(rec.token_times) == 3 and list(rec.token_times) == sorted(rec.token_times)
    assert rec.token_times[-1] - rec.token_times[0] > 0.002  # stamped per read, in order


def test_chat_role_chunk_and_comments_are_not_tokens() -> None:
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    token = {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "length"}]}
    pieces = [
        b": keepalive\n\n",
        b"event: message\n" + event(role),
        event(token),
        b"data: [DONE]\n\n",
    ]
    rec = run_one(RawEngine(pieces), api="chat")
    assert rec.error is None and rec.chunks == 1 and rec.first_chunk is not None
    assert rec.usage_completion_tokens is None and rec.output_tokens == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"choices": {"0": "not a list"}},
        {"choices": ["x"]},
        {"choices": [], "usage": 5},
    ],
)
def test_odd_json_shapes_are_this_requests_error(bad: dict[str, Any]) -> None:
    rec = run_one(RawEngine([event(text("a")), event(bad), b"data: [DONE]\n\n"]))
    assert rec.error is not None and rec.error.startswith("unexpected response from the engine")
    assert rec.end is not None


def test_non_integer_usage_is_unknown_not_a_crash() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": "2", "completion_tokens": -1}}
    rec = run_one(RawEngine([event(text("a")), event(usage), b"data: [DONE]\n\n"]))
    assert rec.error is None
    assert rec.usage_prompt_tokens is None and rec.usage_completion_tokens is None
    assert rec.output_tokens == 1  # counted chunks stand in


def test_malformed_event_and_cut_stream() -> None:
    rec = run_one(RawEngine([event(text("a")), b"data: {not json\n\n", b"data: [DONE]\n\n"]))
    assert rec.error is not None and "malformed stream event" in rec.error
    cut = run_one(RawEngine([event(text("a"))]))  # no finish_reason, no [DONE]
    assert cut.error == "the stream ended before the response was complete"


def test_a_server_that_never_answers_times_out() -> None:
    t0 = time.monotonic()
    rec = run_one(RawEngine([], hang=True), timeout_s=0.5)
    assert rec.error == "timed out after 0.5 s"
    assert time.monotonic() - t0 < 5


def test_connection_refused_is_not_retried_as_a_stale_connection() -> None:
    async def main() -> tuple[RequestRecord, bool]:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        rec = RequestRecord(step="t", index=0, scheduled=time.perf_counter())
        async with StreamingClient(f"http://127.0.0.1:{port}", "m") as client:
            await client.send(RequestSpec(prompt="hi", output_len=3), rec)
            return rec, client.fresh_connections

    rec, switched = asyncio.run(main())
    assert rec.error is not None and "ClientConnectorError" in rec.error
    assert switched is False


def gate_decisions(gate: _Gate, dues: Iterator[float], n: int) -> list[bool | None]:
    return [gate.admit(i, next(dues)) for i in range(n)]


def test_gate_by_count() -> None:
    gate = _Gate(warm_n=2, warm_s=None, prompts=3, duration_s=None, t0=0.0)
    assert gate_decisions(gate, iter(range(10)), 6) == [True, True, False, False, False, None]
    assert gate.window_start == 2


def test_gate_by_time() -> None:
    # Warm for 1 s, then measure for 2 s from the first measured request's due time.
    gate = _Gate(warm_n=0, warm_s=1.0, prompts=None, duration_s=2.0, t0=10.0)
    dues = iter([10.0, 10.9, 11.0, 11.5, 12.99, 13.0, 14.0])
    assert gate_decisions(gate, dues, 6) == [True, True, False, False, False, None]
    assert gate.window_start == 11.0 and gate.measured == 3
