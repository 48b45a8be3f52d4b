"""The fixture engine (`python -m kitt.bench.simulator`) over real HTTP.

Every check runs the simulator as its own process on a free port and talks to it with
httpx, as an engine client would: exact OpenAI chunk shapes, usage on request, output
length, injected failures, keep-alive, refusals, and whether the timings it reports as
ground truth (``/stats``) match the injected ones.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from conftest import wait_for
from kitt.bench.simulator import Simulator, SimulatorConfig
from kitt.errors import ConfigError

# The simulator's timers wake within ~0.05 ms of the deadline on an idle box and ~0.25 ms
# (median) with both cores saturated by other work (measured); plain asyncio would be up
# to 1 ms late. The slack leaves room for a loaded CI machine without hiding a 1 ms bias.
TTFT_SLACK_MS = 2.0
ITL_SLACK_MS = 1.0


@contextmanager
def simulator(*args: str) -> Iterator[httpx.Client]:
    """The simulator as a subprocess; yields a keep-alive client bound to it and checks
    that SIGTERM ends it cleanly (exit 0)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kitt.bench.simulator", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # EOF if it dies before listening
        assert line.startswith("listening on http://127.0.0.1:"), (line, proc.stderr)
        url = line.split()[-1]
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def sim() -> Iterator[httpx.Client]:
    """A fast default simulator shared by the shape checks."""
    with simulator("--ttft-ms", "2", "--itl-ms", "1", "--model", "sim-model") as client:
        yield client


def events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order."""
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["transfer-encoding"] == "chunked"
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def stream(client: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return events(response)


def stats(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/stats")
    assert r.status_code == 200
    return r.json()  # type: ignore[no-any-return]


def test_completions_stream_shape_and_length(sim: httpx.Client) -> None:
    data = stream(
        sim, "/v1/completions", {"model": "m1", "prompt": "one two three", "max_tokens": 7}
    )
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(chunks) == 7  # one per token, no usage chunk without include_usage
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("cmpl-")
    for i, chunk in enumerate(chunks):
        assert set(chunk) == {"id", "object", "created", "model", "choices"}
        assert chunk["object"] == "text_completion"
        assert chunk["model"] == "m1"
        assert isinstance(chunk["created"], int)
        (choice,) = chunk["choices"]
        assert choice == {
            "index": 0,
            "text": choice["text"],
            "logprobs": None,
            "finish_reason": "length" if i == 6 else None,
        }
        assert choice["text"].strip()
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert len(text.split()) == 7


def test_chat_stream_shape_with_usage(sim: httpx.Client) -> None:
    body = {
        "model": "m2",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "say three words"}]},
        ],
        "max_tokens": 5,
        "stream_options": {"include_usage": True},
    }
    data = stream(sim, "/v1/chat/completions", body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    # role chunk, 5 content chunks, finish chunk, usage chunk
    assert len(chunks) == 8
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"].startswith("chatcmpl-")
        assert chunk["model"] == "m2"
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
         "finish_reason": None}
    ]  # fmt: skip
    for chunk in chunks[1:6]:
        (choice,) = chunk["choices"]
        assert set(choice["delta"]) == {"content"} and choice["delta"]["content"].strip()
        assert choice["finish_reason"] is None
    assert chunks[6]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    ]
    # include_usage: usage null on every chunk but the last, which has no choices
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def test_usage_chunk_only_when_asked(sim: httpx.Client) -> None:
    body = {"model": "m", "prompt": "a b c d", "max_tokens": 3}
    plain = [json.loads(d) for d in stream(sim, "/v1/completions", body)[:-1]]
    assert len(plain) == 3 and all("usage" not in c for c in plain)
    off = stream(sim, "/v1/completions", {**body, "stream_options": {"include_usage": False}})
    assert len(off) == 4
    on = [json.loads(d) for d in stream(
        sim, "/v1/completions", {**body, "stream_options": {"include_usage": True}}
    )[:-1]]  # fmt: skip
    assert len(on) == 4
    assert on[-1]["choices"] == []
    assert on[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_output_length_follows_max_tokens_and_default(sim: httpx.Client) -> None:
    for n in (1, 2, 33):
        data = stream(sim, "/v1/completions", {"prompt": "x", "max_tokens": n})
        assert len(data) == n + 1
    # no max_tokens: the configured default (64)
    assert len(stream(sim, "/v1/completions", {"prompt": "x"})) == 65
    # chat also accepts max_completion_tokens
    chat = stream(
        sim, "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4},
    )  # fmt: skip
    assert len(chat) == 1 + 4 + 1 + 1


def test_non_streaming_responses(sim: httpx.Client) -> None:
    r = sim.post("/v1/completions", json={"prompt": "a b", "max_tokens": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["model"] == "sim-model"  # no model in the request: the configured name
    assert len(body["choices"][0]["text"].split()) == 4
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    r = sim.post(
        "/v1/chat/completions",
        json={"model": "c", "messages": [{"role": "user", "content": "q"}], "max_tokens": 2},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert len(body["choices"][0]["message"]["content"].split()) == 2
    assert body["usage"]["completion_tokens"] == 2


def test_health_and_models(sim: httpx.Client) -> None:
    assert sim.get("/health").json() == {"status": "ok"}
    models = sim.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["sim-model"]


def test_keep_alive_serves_requests_on_one_connection(sim: httpx.Client) -> None:
    before = stats(sim)["connections"]["opened"]
    for _ in range(3):
        assert len(stream(sim, "/v1/completions", {"prompt": "x", "max_tokens": 2})) == 3
        assert sim.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert stats(sim)["connections"]["opened"] == before


def test_refusals_are_clear_4xx(sim: httpx.Client) -> None:
    r = sim.post(
        "/v1/completions", content=b'{"prompt": "x", ', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == 400
    for bad in ({"prompt": "x", "max_tokens": 0}, {"prompt": "x", "max_tokens": "5"},
                {"max_tokens": 3}, {"prompt": 5}, {"prompt": "x", "stream": "yes"},
                {"prompt": "x", "kitt_sim": {"ttft_ms": -1}}, [1, 2]):  # fmt: skip
        r = sim.post("/v1/completions", json=bad)
        assert r.status_code == 400, bad
        assert r.json()["error"]["type"] == "BadRequestError"
    r = sim.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    assert sim.get("/v1/nope").status_code == 404
    assert sim.get("/v1/completions").status_code == 405
    # the connection survived all of that
    assert sim.get("/health").status_code == 200


def raw_exchange(base_url: str, request: bytes) -> bytes:
    """Send raw bytes and read until the server closes the connection."""
    host, port = base_url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_bad_framing_is_refused_and_connection_closed(sim: httpx.Client) -> None:
    url = str(sim.base_url).rstrip("/")
    too_big = raw_exchange(
        url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n"
    )
    assert too_big.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in too_big
    chunked = raw_exchange(
        url,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
    )
    assert chunked.startswith(b"HTTP/1.1 400 ")
    assert b"Content-Length" in chunked.split(b"\r\n\r\n", 1)[1]
    garbage = raw_exchange(url, b"HELLO\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ")
    # pipelined requests on one connection are answered in order; close ends it
    body = b'{"prompt":"a","max_tokens":2,"stream":true}'
    two = raw_exchange(
        url,
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body),
    )
    assert two.count(b"HTTP/1.1 200 OK") == 2
    assert two.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


def test_injected_errors() -> None:
    with simulator("--error-rate", "1", "--ttft-ms", "0", "--itl-ms", "0") as client:
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True})
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["code"] == 500 and error["type"] == "InternalServerError"
        assert error["message"]
        assert stats(client)["requests"]["errors"] == 1


def test_error_rate_is_a_seeded_fraction() -> None:
    args = ("--error-rate", "0.3", "--seed", "7", "--ttft-ms", "0", "--itl-ms", "0")
    outcomes = []
    for _ in range(2):
        with simulator(*args) as client:
            codes = [
                client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code
                for _ in range(200)
            ]
            assert stats(client)["requests"]["errors"] == codes.count(500)
            outcomes.append(codes)
    assert outcomes[0] == outcomes[1]  # same seed, same sequence
    assert 30 <= outcomes[0].count(500) <= 90


def test_midstream_error_cuts_after_half_the_tokens() -> None:
    with simulator("--midstream-error-rate", "1", "--ttft-ms", "1", "--itl-ms", "1") as client:
        for api, body in (
            ("/v1/completions", {"prompt": "x"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ):
            data = stream(client, api, {**body, "max_tokens": 10,
                                        "stream_options": {"include_usage": True}})  # fmt: skip
            assert "[DONE]" not in data
            error = json.loads(data[-1])
            assert error["error"]["code"] == 500
            assert "mid-stream" in error["error"]["message"]
            chunks = [json.loads(d) for d in data[:-1]]
            content = [
                c for c in chunks
                if (c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content"))
            ]  # fmt: skip
            assert len(content) == 5
            assert all(c["choices"] for c in chunks)  # no usage chunk after a failure
        # the cut stream ended its HTTP body properly: the connection is reused
        assert client.get("/health").status_code == 200
        s = stats(client)
        assert s["requests"]["midstream_errors"] == 2
        assert s["connections"]["opened"] == 1
        assert s["output_tokens"] == 10


def test_empty_first_chunk_and_tokens_per_chunk() -> None:
    args = ("--empty-first-chunk", "--tokens-per-chunk", "3", "--ttft-ms", "0", "--itl-ms", "1")
    with simulator(*args) as client:
        data = stream(client, "/v1/completions", {"prompt": "x", "max_tokens": 8})
        texts = [json.loads(d)["choices"][0]["text"] for d in data[:-1]]
        assert texts[0] == ""  # the empty chunk before the first token
        # first token alone, then groups of 3 (vLLM's stream interval): 1 + 3 + 3 + 1
        assert [len(t.split()) for t in texts[1:]] == [1, 3, 3, 1]
        chat = stream(client, "/v1/chat/completions",
                      {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})  # fmt: skip
        deltas = [json.loads(d)["choices"][0]["delta"] for d in chat[:-1]]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert deltas[1] == {"content": ""}
        assert [len(d["content"].split()) for d in deltas[2:4]] == [1, 1]
        s = stats(client)
        assert s["token_chunks"] == 4 + 2  # empty chunks are not token chunks
        assert s["output_tokens"] == 10


def test_stats_ground_truth_matches_injected_timings() -> None:
    with simulator("--ttft-ms", "50", "--itl-ms", "10") as client:
        for i in range(6):
            api = "/v1/completions" if i % 2 else "/v1/chat/completions"
            body = {"prompt": "x"} if i % 2 else {"messages": [{"role": "user", "content": "x"}]}
            stream(client, api, {**body, "max_tokens": 12})
        s = stats(client)
        assert s["requests"]["completed"] == 6
        assert s["token_chunks"] == 72
        assert s["ttft_ms"]["count"] == 6
        assert s["itl_ms"]["count"] == 66
        assert abs(s["ttft_ms"]["p50"] - 50.0) <= TTFT_SLACK_MS, s["ttft_ms"]
        assert abs(s["itl_ms"]["p50"] - 10.0) <= ITL_SLACK_MS, s["itl_ms"]
        # writes are never earlier than the timer lead allows (0.5 ms at most)
        assert s["lateness_ms"]["min"] >= -0.5 - 0.01
        assert 0.0 <= s["timer_lead_ms"] <= 0.5
        assert abs(s["lateness_ms"]["p50"]) <= TTFT_SLACK_MS
        assert s["cpu_s"] > 0 and s["cpu_us_per_chunk"] > 0
        # per-request override, and reset
        assert client.post("/stats/reset").status_code == 200
        assert stats(client)["ttft_ms"]["count"] == 0
        stream(client, "/v1/completions",
               {"prompt": "x", "max_tokens": 3, "kitt_sim": {"ttft_ms": 0, "itl_ms": 30}})  # fmt: skip
        s = stats(client)
        assert s["ttft_ms"]["max"] < 20.0
        assert abs(s["itl_ms"]["p50"] - 30.0) <= ITL_SLACK_MS


def test_plain_timers_are_never_early() -> None:
    with simulator("--ttft-ms", "5", "--itl-ms", "2", "--no-timer-lead") as client:
        for _ in range(3):
            stream(client, "/v1/completions", {"prompt": "x", "max_tokens": 10})
        s = stats(client)
    assert s["timer_lead_ms"] == 0.0
    assert s["lateness_ms"]["count"] == 30
    assert s["lateness_ms"]["min"] >= -0.001  # asyncio fires within its clock resolution


def test_long_fast_stream_respects_flow_control() -> None:
    """A reader that stops reading: the server pauses (socket and transport buffers full)
    instead of queueing the whole response, then finishes it once reading resumes."""
    n = 100_000  # ~15 MB of chunks: more than loopback socket buffers hold
    with simulator("--ttft-ms", "0", "--itl-ms", "0") as client:
        with (
            httpx.Client(base_url=client.base_url, timeout=30) as reader,
            reader.stream(
                "POST", "/v1/completions", json={"prompt": "x", "max_tokens": n, "stream": True}
            ) as response,
        ):
            wait_for(lambda: stats(client)["write_pauses"] >= 1, what="the server to pause")
            paused_at = stats(client)["token_chunks"]
            assert paused_at < n
            count = sum(1 for line in response.iter_lines() if line.startswith("data: {"))
        assert count == n
        s = stats(client)
        assert s["token_chunks"] == n
        assert s["requests"]["completed"] == 1


def test_jitter_is_seeded_and_spreads_gaps() -> None:
    with simulator("--ttft-ms", "0", "--itl-ms", "6", "--jitter-ms", "4", "--seed", "3") as client:
        stream(client, "/v1/completions", {"prompt": "x", "max_tokens": 40})
        gaps = stats(client)["itl_ms"]
    # without jitter gaps sit within ~1 ms of 6; a +-4 ms draw reaches far outside that
    assert gaps["min"] < 4.0 and gaps["max"] > 8.0, gaps


def test_cli_refuses_bad_options_and_busy_port() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "kitt.bench.simulator", "--ttft-ms", "-1"],
        check=False, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "ttft_ms must be a number >= 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "kitt.bench.simulator", "--port", str(port)],
            check=False, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert busy.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    assert "Traceback" not in busy.stderr


def test_cli_ctrl_c_is_a_clean_exit() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kitt.bench.simulator", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening on ")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_in_process_simulator() -> None:
    config = SimulatorConfig(ttft_ms=0, itl_ms=0, model="inproc")
    with Simulator(config) as sim:
        assert sim.port > 0
        r = httpx.post(
            f"{sim.url}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=10
        )
        assert r.status_code == 200
        assert r.json()["model"] == "inproc"
        assert sim.stats()["requests"]["completed"] == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{sim.url}/health", timeout=2)
    with pytest.raises(ConfigError, match="error_rate"):
        SimulatorConfig(error_rate=2)
