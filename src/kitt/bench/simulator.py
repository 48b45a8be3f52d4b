"""A fake OpenAI-compatible streaming engine with known, injected timings.

It is the fixture the benchmark client's accuracy and capacity are measured against, so
it has to be two things at once:

* **cheap**: on a 2-core machine it shares the CPUs with the client under test, so it is
  a raw ``asyncio.Protocol`` speaking just enough HTTP/1.1 (keep-alive, ``Content-Length``
  request bodies, chunked ``text/event-stream`` responses), and every SSE chunk is one
  bytes format of a prefix and suffix built once per request;
* **precise, and honest about itself**: plain asyncio timers wake up to 1 ms late on
  Linux (``epoll`` waits in whole milliseconds), as large as the accuracy the client is
  judged on. The simulator's loop waits with microsecond ``select`` timeouts
  (:func:`new_event_loop`) and aims its timers early by its own measured median wake-up
  latency (``timer_lead``), so writes are centred on their deadlines (measured here:
  median lateness 0.00 ms, p99 ~0.1-0.3 ms). What remains is reported: the server records
  when it *actually* wrote each token chunk and serves those times at ``GET /stats``,
  and the benchmark compares the client with that ground truth as well as with the
  injected values.

Timing model, relative to ``t0`` (the moment the request is fully received): token ``k``
(0-based) is generated at ``t0 + ttft + k * itl`` (plus seeded jitter when asked). Every
deadline is computed from ``t0``, never by chaining sleeps, so late wake-ups do not
accumulate. With ``tokens_per_chunk = m > 1`` the first token still goes out alone at
TTFT and later chunks carry up to ``m`` tokens, each written when its last token is
generated (vLLM's ``--stream-interval``): TPOT stays ``itl`` and the gap between chunks
(what clients call ITL) becomes ``m * itl``.

Response headers, the chat ``role`` chunk and the optional empty first chunk are written
at ``t0``, as many engines do, so a client that takes the first byte or the first
(empty) chunk for its first token measures a TTFT of ~0 and is caught.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import select
import selectors
import signal
import sys
import threading
import time
from array import array
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from kitt.errors import ConfigError, DaemonStartError, KittError

MAX_HEAD_BYTES = 64 * 1024
MAX_OUTPUT_LEN = 1_000_000
MAX_LEAD_S = 0.0005
"""Timers never aim earlier than this: the lead corrects wake-up latency (~0.2 ms in a
VM), not an overloaded loop."""
LEAD_STEP_S = 0.000005
MAX_CHUNKS_PER_WRITE = 256
"""A stream that is far behind (itl 0, a long output) writes in slices, so a client that
reads slowly fills the socket buffer and ``pause_writing`` holds the rest back instead
of the whole response being queued in memory."""
MAX_SAMPLES = 2_000_000
"""Per series (TTFT, ITL, lateness): ~16 MB each at most; later samples are counted but
not kept, so a simulator left running for hours does not grow without bound."""

VOCAB = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", " and")
"""One entry per token: plain ASCII, nothing JSON would escape (so the text can be spliced
into pre-encoded chunk bytes), each starting with a space, so a counting client can spot
content by its first byte."""

T = TypeVar("T")

_VOCAB_BYTES = tuple(w.encode() for w in VOCAB)
_VOCAB_LEN = len(_VOCAB_BYTES)
_DONE = b"data: [DONE]\n\n"
_LAST_CHUNK = b"0\r\n\r\n"
_JSON_SEPARATORS = (",", ":")


@dataclass(frozen=True)
class SimulatorConfig:
    """What the fake engine does; every request gets the same unless it says otherwise in
    its ``kitt_sim: {ttft_ms, itl_ms}`` field."""

    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    jitter_ms: float = 0.0
    """Each gap (TTFT and every ITL) is moved by a uniform draw in ``[-jitter, +jitter]``
    (never below zero), from a generator seeded with ``seed``."""
    seed: int = 0
    default_output_len: int = 64
    """Output tokens when the request names no ``max_tokens``."""
    tokens_per_chunk: int = 1
    error_rate: float = 0.0
    """Fraction of generation requests answered 500 with an OpenAI-style error body."""
    midstream_error_rate: float = 0.0
    """Fraction of streamed requests cut after half their tokens by an error event."""
    empty_first_chunk: bool = False
    """Write a chunk with empty content at ``t0``, before the first token."""
    model: str = "sim"
    max_body_bytes: int = 8 * 1024 * 1024
    timer_lead: bool = True
    """Aim timers early by the measured median wake-up latency (at most 0.5 ms), so that
    writes are centred on their deadlines; off: plain timers, always a little late."""

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "itl_ms", "jitter_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"simulator {name} must be a number >= 0, got {value!r}")
        for name in ("error_rate", "midstream_error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"simulator {name} must be between 0 and 1, got {value!r}")
        if not 1 <= self.default_output_len <= MAX_OUTPUT_LEN:
            raise ConfigError(
                f"simulator default_output_len must be 1..{MAX_OUTPUT_LEN}, "
                f"got {self.default_output_len!r}"
            )
        if self.tokens_per_chunk < 1:
            raise ConfigError(
                f"simulator tokens_per_chunk must be >= 1, got {self.tokens_per_chunk!r}"
            )
        if not self.model:
            raise ConfigError("simulator model name must not be empty")
        if self.max_body_bytes < 1:
            raise ConfigError("simulator max_body_bytes must be >= 1")


class _BadRequest(Exception):
    """A request the simulator refuses; ``close`` when the byte stream can no longer be
    trusted (framing errors), so the connection is not reused."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "BadRequestError",
    431: "BadRequestError",
    500: "InternalServerError",
}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=_JSON_SEPARATORS).encode()


def _error_body(status: int, message: str) -> bytes:
    return _dumps(
        {
            "error": {
                "message": message,
                "type": _ERROR_TYPES.get(status, "Error"),
                "param": None,
                "code": status,
            }
        }
    )


def _response(status: int, body: bytes, keep_alive: bool) -> bytes:
    close = "" if keep_alive else "Connection: close\r\n"
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{close}\r\n"
    )
    return head.encode() + body


def _stream_head(keep_alive: bool) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n" + (b"" if keep_alive else b"Connection: close\r\n")
    ) + b"\r\n"


def _frame(payload: bytes) -> bytes:
    """One HTTP chunk holding one SSE event."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def _summary(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | int | None]:
    """Count, mean, min, p50/p90/p99 (linear interpolation), max, in milliseconds."""
    n = len(values)
    if n == 0:
        return {"count": 0, "mean": None, "min": None, "p50": None, "p90": None,
                "p99": None, "max": None}  # fmt: skip
    ordered = sorted(values)

    def pct(p: float) -> float:
        pos = (n - 1) * p / 100.0
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        return (ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)) * scale

    return {
        "count": n,
        "mean": sum(ordered) / n * scale,
        "min": ordered[0] * scale,
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": ordered[-1] * scale,
    }


class _Recorder:
    """Ground truth: what the server actually did, measured at the moment of each write."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ttft = array("d")
        self.gaps = array("d")
        self.lateness = array("d")
        self.requests = 0
        self.streamed = 0
        self.completed = 0
        self.errors = 0
        self.midstream_errors = 0
        self.rejected = 0
        self.disconnected = 0
        self.token_chunks = 0
        self.output_tokens = 0
        self.write_pauses = 0
        self.started = time.monotonic()
        self.cpu_started = time.thread_time()
        self.process_cpu_started = time.process_time()

    def snapshot(self, config: SimulatorConfig, connections: int, opened: int) -> dict[str, Any]:
        window = time.monotonic() - self.started
        cpu = time.thread_time() - self.cpu_started
        return {
            "window_s": window,
            "cpu_s": cpu,
            "process_cpu_s": time.process_time() - self.process_cpu_started,
            "cpu_us_per_chunk": cpu / self.token_chunks * 1e6 if self.token_chunks else None,
            "connections": {"open": connections, "opened": opened},
            "requests": {
                "total": self.requests,
                "streamed": self.streamed,
                "completed": self.completed,
                "errors": self.errors,
                "midstream_errors": self.midstream_errors,
                "rejected": self.rejected,
                "disconnected": self.disconnected,
            },
            "token_chunks": self.token_chunks,
            "output_tokens": self.output_tokens,
            "write_pauses": self.write_pauses,
            "ttft_ms": _summary(self.ttft),
            "itl_ms": _summary(self.gaps),
            "lateness_ms": _summary(self.lateness),
            "config": asdict(config),
        }


class _App:
    """State shared by every connection of one server."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.recorder = _Recorder()
        self.created = int(time.time())
        self.next_id = 0
        self.connections: set[_Connection] = set()
        self.opened = 0
        self.model_json = _dumps(config.model)
        self.lead = 0.0
        """Seconds timers fire ahead of their deadline (see ``SimulatorConfig.timer_lead``)."""

    def stats(self) -> dict[str, Any]:
        snapshot = self.recorder.snapshot(self.config, len(self.connections), self.opened)
        snapshot["timer_lead_ms"] = self.lead * 1000
        return snapshot


def _count_words(value: Any, what: str) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return len(value)  # token ids
        if all(isinstance(v, str) for v in value):
            return sum(len(v.split()) for v in value)
    raise _BadRequest(400, f"{what} must be a string, a list of strings or of token ids")


def _prompt_tokens(api: str, body: dict[str, Any]) -> int:
    """A deterministic stand-in for tokenisation: whitespace-separated words."""
    if api == "completions":
        if "prompt" not in body:
            raise _BadRequest(400, "'prompt' is required")
        return _count_words(body["prompt"], "'prompt'")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest(400, "'messages' must be a non-empty list")
    total = 0
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _BadRequest(400, "each message must be an object with a 'role'")
        content = message.get("content")
        if content is None:
            continue
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise _BadRequest(400, "message content parts must be objects")
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text.split())
        elif isinstance(content, str):
            total += len(content.split())
        else:
            raise _BadRequest(400, "message 'content' must be a string or a list of parts")
    return total


def _non_negative_ms(value: Any, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise _BadRequest(400, f"{what} must be a number >= 0")
    return float(value) / 1000.0


@dataclass
class _Generation:
    """One parsed generation request."""

    api: str
    stream: bool
    include_usage: bool
    output_len: int
    prompt_tokens: int
    model_json: bytes
    ttft_s: float
    itl_s: float


def _parse_generation(app: _App, api: str, raw: bytes) -> _Generation:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _BadRequest(400, "request body must be a JSON object")
    config = app.config
    output_len = body.get("max_tokens")
    if output_len is None and api == "chat":
        output_len = body.get("max_completion_tokens")
    if output_len is None:
        output_len = config.default_output_len
    if (
        isinstance(output_len, bool)
        or not isinstance(output_len, int)
        or not 1 <= output_len <= MAX_OUTPUT_LEN
    ):
        raise _BadRequest(400, f"'max_tokens' must be an integer between 1 and {MAX_OUTPUT_LEN}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _BadRequest(400, "'stream' must be a boolean")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _BadRequest(400, "'stream_options' must be an object")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _BadRequest(400, "'stream_options.include_usage' must be a boolean")
    model = body.get("model")
    model_json = _dumps(model) if isinstance(model, str) and model else app.model_json
    ttft_s = config.ttft_ms / 1000.0
    itl_s = config.itl_ms / 1000.0
    overrides = body.get("kitt_sim")
    if overrides is not None:
        if not isinstance(overrides, dict):
            raise _BadRequest(400, "'kitt_sim' must be an object")
        if "ttft_ms" in overrides:
            ttft_s = _non_negative_ms(overrides["ttft_ms"], "'kitt_sim.ttft_ms'")
        if "itl_ms" in overrides:
            itl_s = _non_negative_ms(overrides["itl_ms"], "'kitt_sim.itl_ms'")
    return _Generation(
        api=api,
        stream=stream,
        include_usage=include_usage,
        output_len=output_len,
        prompt_tokens=_prompt_tokens(api, body),
        model_json=model_json,
        ttft_s=ttft_s,
        itl_s=itl_s,
    )


def _generation_times(app: _App, gen: _Generation, t0: float) -> list[float] | None:
    """Per-token generation times when jitter is on; None means ``t0 + ttft + k * itl``."""
    jitter = app.config.jitter_ms / 1000.0
    if jitter <= 0:
        return None
    uniform = app.rng.uniform
    t = t0 + max(0.0, gen.ttft_s + uniform(-jitter, jitter))
    times = [t]
    for _ in range(gen.output_len - 1):
        t += max(0.0, gen.itl_s + uniform(-jitter, jitter))
        times.append(t)
    return times


def _chunk_bounds(n_tokens: int, per_chunk: int) -> list[int]:
    """End index (exclusive) of each chunk's tokens: the first token alone, then groups."""
    ends = [1]
    while ends[-1] < n_tokens:
        ends.append(min(ends[-1] + per_chunk, n_tokens))
    return ends


def _text(start: int, end: int) -> bytes:
    return b"".join(_VOCAB_BYTES[k % len(_VOCAB_BYTES)] for k in range(start, end))


class _Stream:
    """Writes one streamed response on a timer: every wake-up writes all chunks whose
    deadline has passed, in one ``write``, then sleeps until the next deadline."""

    __slots__ = (
        "_bounds",
        "_chunk_prefix",
        "_chunk_suffix",
        "_conn",
        "_cut_after",
        "_final_suffix",
        "_gen",
        "_handle",
        "_id_head",
        "_last_write",
        "_next",
        "_t0",
        "_timed",
        "_times",
        "tokens",
    )

    def __init__(
        self, conn: _Connection, gen: _Generation, t0: float, request_id: int, cut: bool
    ) -> None:
        app = conn.app
        self._conn = conn
        self._gen = gen
        self._t0 = t0
        self._times = _generation_times(app, gen, t0)
        self._bounds = _chunk_bounds(gen.output_len, app.config.tokens_per_chunk)
        # A cut stream stops after the chunks that hold the first half of its tokens.
        self._cut_after = (
            sum(1 for end in self._bounds if end <= gen.output_len // 2) if cut else -1
        )
        self.tokens = (
            gen.output_len
            if not cut
            else (self._bounds[self._cut_after - 1] if self._cut_after else 0)
        )
        """Tokens this stream will write (fewer than asked when it is cut)."""
        self._next = 0
        self._handle: asyncio.TimerHandle | None = None
        self._timed = False
        self._last_write = 0.0
        usage = b',"usage":null' if gen.include_usage else b""
        if gen.api == "completions":
            head = b'{"id":"cmpl-%d","object":"text_completion","created":%d,"model":%b'
            self._id_head = head % (request_id, app.created, gen.model_json)
            self._chunk_prefix = b"data: " + self._id_head + b',"choices":[{"index":0,"text":"'
            self._chunk_suffix = b'","logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"
            self._final_suffix = b'","logprobs":null,"finish_reason":"length"}]' + usage + b"}\n\n"
        else:
            self._id_head = (
                b'{"id":"chatcmpl-%d","object":"chat.completion.chunk","created":%d,"model":%b'
                % (request_id, app.created, gen.model_json)
            )
            self._chunk_prefix = (
                b"data: " + self._id_head + b',"choices":[{"index":0,"delta":{"content":"'
            )
            self._chunk_suffix = b'"},"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"
            self._final_suffix = self._chunk_suffix

    def _event(self, choices: bytes, usage: bytes = b"") -> bytes:
        return _frame(b"data: " + self._id_head + b',"choices":' + choices + usage + b"}\n\n")

    def start(self) -> None:
        """Headers and the empty opening chunks go out at once; tokens on the timer."""
        gen = self._gen
        usage_null = b',"usage":null' if gen.include_usage else b""
        out = [_stream_head(self._conn.keep_alive)]
        if gen.api == "chat":
            out.append(
                self._event(
                    b'[{"index":0,"delta":{"role":"assistant","content":""},'
                    b'"logprobs":null,"finish_reason":null}]',
                    usage_null,
                )
            )
        if self._conn.app.config.empty_first_chunk:
            out.append(_frame(self._chunk_prefix + self._chunk_suffix))
        self._conn.transport_write(b"".join(out))
        self._schedule()

    def _deadline(self, chunk: int) -> float:
        last_token = self._bounds[chunk] - 1
        if self._times is not None:
            return self._times[last_token]
        return self._t0 + self._gen.ttft_s + last_token * self._gen.itl_s

    def _schedule(self) -> None:
        loop = self._conn.loop
        at = self._deadline(self._next) - self._conn.app.lead
        # Only a wait that really sleeps says anything about wake-up latency.
        self._timed = at > loop.time()
        self._handle = loop.call_at(at, self.pump)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def resume(self) -> None:
        """The transport drained: write what came due while it was full."""
        self.cancel()
        self.pump()

    def pump(self) -> None:
        """Write every chunk that is due (all of them, in one write, if the loop woke late),
        record when the write happened, and sleep until the next deadline."""
        self._handle = None
        conn = self._conn
        if conn.closed or conn.paused:
            return  # resume() pumps again; connection_lost drops the stream
        app = conn.app
        bounds = self._bounds
        n_chunks = len(bounds)
        # Chunks due within the timer lead go now (asyncio itself fires within 1 ns).
        horizon = time.monotonic() + app.lead + 1e-6
        out: list[bytes] = []
        deadlines: list[float] = []
        prefix, suffix = self._chunk_prefix, self._chunk_suffix
        nxt = self._next
        start = bounds[nxt - 1] if nxt else 0
        cut = False
        limit = nxt + MAX_CHUNKS_PER_WRITE
        while nxt < n_chunks and nxt < limit:
            if nxt == self._cut_after:
                cut = True
                break
            deadline = self._deadline(nxt)
            if deadline > horizon:
                break
            end = bounds[nxt]
            text = _VOCAB_BYTES[start % _VOCAB_LEN] if end - start == 1 else _text(start, end)
            if end == bounds[-1]:
                suffix = self._final_suffix
            out.append(b"%x\r\n%b%b%b\r\n" % (len(prefix) + len(text) + len(suffix),
                                                prefix, text, suffix))  # fmt: skip
            deadlines.append(deadline)
            start = end
            nxt += 1
        self._next = nxt
        if nxt == self._cut_after:
            cut = True
        finished = cut or nxt == n_chunks
        if finished:
            out.extend(self._closing_events(cut))
        if not out:
            self._schedule()
            return
        written = time.monotonic()
        conn.transport_write(b"".join(out))
        if deadlines:
            self._record(app, written, deadlines)
        if finished:
            conn.finish_stream(cut)
        else:
            self._schedule()

    def _record(self, app: _App, written: float, deadlines: list[float]) -> None:
        rec = app.recorder
        late = written - deadlines[0]
        if self._timed and app.config.timer_lead:
            # Track the median wake-up latency: aim timers that much early, so that
            # writes are centred on their deadlines instead of always late.
            lead = app.lead + (LEAD_STEP_S if late > 0 else -LEAD_STEP_S)
            app.lead = min(MAX_LEAD_S, max(0.0, lead))
        n = len(deadlines)
        rec.token_chunks += n
        if self._last_write:
            if len(rec.gaps) < MAX_SAMPLES:
                rec.gaps.append(written - self._last_write)
        elif len(rec.ttft) < MAX_SAMPLES:
            rec.ttft.append(written - self._t0)
        if len(rec.lateness) < MAX_SAMPLES:
            rec.lateness.append(late)
            if n > 1:  # several chunks in one write: zero gaps between them
                rec.gaps.frombytes(bytes(8 * (n - 1)))
                rec.lateness.extend([written - d for d in deadlines[1:]])
        self._last_write = written

    def _closing_events(self, cut: bool) -> list[bytes]:
        gen = self._gen
        if cut:
            error = _error_body(500, "simulated mid-stream failure")
            return [_frame(b"data: " + error + b"\n\n"), _LAST_CHUNK]
        out = []
        usage = b',"usage":null' if gen.include_usage else b""
        if gen.api == "chat":
            out.append(
                self._event(
                    b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}]', usage
                )
            )
        if gen.include_usage:
            n = gen.output_len
            out.append(
                self._event(
                    b"[]",
                    b',"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}'
                    % (gen.prompt_tokens, n, gen.prompt_tokens + n),
                )
            )
        out.append(_frame(_DONE))
        out.append(_LAST_CHUNK)
        return out


class _Connection(asyncio.Protocol):
    """One client connection: parses requests one at a time; a request being answered
    later (a stream, a delayed JSON reply) holds the connection until it is done, and
    pipelined bytes wait in the buffer."""

    def __init__(self, app: _App) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.closed = False
        self.paused = False
        self.reading_paused = False
        self.keep_alive = True
        self.stream: _Stream | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    # asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP server's transport
        self.app.connections.add(self)
        self.app.opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.app.connections.discard(self)
        if self.busy:
            self.app.recorder.disconnected += 1
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def pause_writing(self) -> None:
        self.paused = True
        self.app.recorder.write_pauses += 1

    def resume_writing(self) -> None:
        self.paused = False
        if self.stream is not None:
            self.stream.resume()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._process()
        elif len(self.buffer) > MAX_HEAD_BYTES + self.app.config.max_body_bytes:
            # A client pipelining without bound while we stream: stop reading until the
            # current response is done rather than buffer it all.
            assert self.transport is not None  # noqa: S101 - set in connection_made
            self.transport.pause_reading()
            self.reading_paused = True

    # helpers -------------------------------------------------------------------------
    def transport_write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def _reply(self, status: int, body: bytes) -> None:
        self.transport_write(_response(status, body, self.keep_alive))
        if not self.keep_alive:
            self.close()

    def finish_stream(self, cut: bool) -> None:
        rec = self.app.recorder
        if cut:
            rec.midstream_errors += 1
        else:
            rec.completed += 1
        self.stream = None
        self._done()

    def _done(self) -> None:
        self.busy = False
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
        if not self.keep_alive:
            self.close()
        elif self.buffer:
            self._process()

    # request handling ----------------------------------------------------------------
    def _process(self) -> None:
        while not self.busy and not self.closed and self.buffer:
            try:
                request = self._parse()
                if request is None:
                    return  # incomplete
                self._handle(*request)
            except _BadRequest as exc:
                self.app.recorder.rejected += 1
                if exc.close:
                    self.keep_alive = False
                    self.buffer.clear()
                self._reply(exc.status, _error_body(exc.status, exc.message))

    def _parse(self) -> tuple[str, str, bytes, float] | None:
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise _BadRequest(431, "request head too large", close=True)
            return None
        if end > MAX_HEAD_BYTES:
            raise _BadRequest(431, "request head too large", close=True)
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, "malformed request line", close=True)
        method, target, version = parts
        length = 0
        keep_alive = version != "HTTP/1.0"
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(400, "malformed header line", close=True)
            lname = name.lower()
            value = value.strip()
            if lname == "content-length":
                if not value.isdigit():
                    raise _BadRequest(400, "invalid Content-Length", close=True)
                length = int(value)
            elif lname == "transfer-encoding":
                raise _BadRequest(
                    400, "request bodies must be sent with Content-Length", close=True
                )
            elif lname == "connection":
                option = value.lower()
                if option == "close":
                    keep_alive = False
                elif option == "keep-alive":
                    keep_alive = True
        self.keep_alive = keep_alive
        if length > self.app.config.max_body_bytes:
            raise _BadRequest(
                413, f"request body over {self.app.config.max_body_bytes} bytes", close=True
            )
        total = end + 4 + length
        if len(buf) < total:
            return None
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        return method, target.split("?", 1)[0], body, time.monotonic()

    def _handle(self, method: str, path: str, body: bytes, t0: float) -> None:
        app = self.app
        if path in ("/v1/completions", "/v1/chat/completions"):
            if method != "POST":
                raise _BadRequest(405, f"{path} takes POST")
            self._generate("completions" if path == "/v1/completions" else "chat", body, t0)
        elif path == "/health":
            if method != "GET":
                raise _BadRequest(405, "/health takes GET")
            self._reply(200, b'{"status":"ok"}')
        elif path == "/v1/models":
            if method != "GET":
                raise _BadRequest(405, "/v1/models takes GET")
            self._reply(
                200,
                _dumps(
                    {
                        "object": "list",
                        "data": [
                            {
                                "id": app.config.model,
                                "object": "model",
                                "created": app.created,
                                "owned_by": "kitt-simulator",
                            }
                        ],
                    }
                ),
            )
        elif path == "/stats":
            if method != "GET":
                raise _BadRequest(405, "/stats takes GET")
            self._reply(200, _dumps(app.stats()))
        elif path == "/stats/reset":
            if method != "POST":
                raise _BadRequest(405, "/stats/reset takes POST")
            app.recorder.reset()
            self._reply(200, b'{"status":"reset"}')
        else:
            raise _BadRequest(404, f"no such endpoint: {path}")

    def _generate(self, api: str, raw: bytes, t0: float) -> None:
        app = self.app
        gen = _parse_generation(app, api, raw)
        rec = app.recorder
        rec.requests += 1
        config = app.config
        if config.error_rate and app.rng.random() < config.error_rate:
            rec.errors += 1
            self._reply(500, _error_body(500, "simulated engine failure"))
            return
        app.next_id += 1
        request_id = app.next_id
        self.busy = True
        if gen.stream:
            rec.streamed += 1
            cut = bool(config.midstream_error_rate) and app.rng.random() < (
                config.midstream_error_rate
            )
            self.stream = _Stream(self, gen, t0, request_id, cut)
            rec.output_tokens += self.stream.tokens
            self.stream.start()
        else:
            times = _generation_times(app, gen, t0)
            done_at = times[-1] if times else t0 + gen.ttft_s + (gen.output_len - 1) * gen.itl_s
            self.timer = asyncio.get_running_loop().call_at(
                done_at, self._send_completion, gen, request_id
            )

    def _send_completion(self, gen: _Generation, request_id: int) -> None:
        self.timer = None
        app = self.app
        text = _text(0, gen.output_len).decode()
        model = json.loads(gen.model_json)
        n, p = gen.output_len, gen.prompt_tokens
        usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
        if gen.api == "completions":
            body = {
                "id": f"cmpl-{request_id}",
                "object": "text_completion",
                "created": app.created,
                "model": model,
                "choices": [
                    {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
                ],
                "usage": usage,
            }
        else:
            body = {
                "id": f"chatcmpl-{request_id}",
                "object": "chat.completion",
                "created": app.created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "length",
                    }
                ],
                "usage": usage,
            }
        app.recorder.completed += 1
        app.recorder.output_tokens += n
        self.transport_write(_response(200, _dumps(body), self.keep_alive))
        self._done()


class _PreciseSelector(selectors.EpollSelector):  # KITT runs on Linux (epoll)
    """``epoll_wait`` takes whole milliseconds and Python rounds every wait up, so plain
    asyncio timers fire 0-1 ms late (0.5 ms on average): the same size as the accuracy
    the client is judged on. ``select()`` takes microseconds, so a timed wait blocks in
    ``select`` on the epoll descriptor itself (readable when any socket is) and then
    collects the events without waiting. Untimed and zero waits are unchanged, so a busy
    loop pays nothing extra."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout > 0:
            select.select([self.fileno()], [], [], timeout)
            timeout = 0
        return super().select(timeout)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire within tens of microseconds of their deadline."""
    return asyncio.SelectorEventLoop(_PreciseSelector())


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on :func:`new_event_loop` (``loop_factory`` is Python 3.12+)."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


class SimulatorServer:
    """A listening simulator inside a running event loop."""

    def __init__(self, app: _App, server: asyncio.Server, port: int) -> None:
        self._app = app
        self._server = server
        self.port = port

    @property
    def config(self) -> SimulatorConfig:
        return self._app.config

    def stats(self) -> dict[str, Any]:
        """What ``GET /stats`` returns; call it on the loop's thread."""
        return self._app.stats()

    def close(self) -> None:
        """Stop listening and drop every open connection (streams in flight included)."""
        self._server.close()
        for conn in list(self._app.connections):
            conn.close()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()


async def start_server(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0
) -> SimulatorServer:
    """Bind and start serving in the running loop; ``port=0`` picks a free port."""
    app = _App(config)
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(
            lambda: _Connection(app), host, port, reuse_address=True, backlog=2048
        )
    except OSError as exc:
        raise DaemonStartError(f"simulator cannot listen on {host}:{port}: {exc}") from None
    bound = int(server.sockets[0].getsockname()[1])
    return SimulatorServer(app, server, bound)


async def serve(
    config: SimulatorConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until cancelled; ``ready`` is called with the bound port once listening.

    Run it with :func:`run` (or on :func:`new_event_loop`): on a default asyncio loop it
    works, but its timers are up to 1 ms late."""
    server = await start_server(config, host, port)
    try:
        if ready is not None:
            ready(server.port)
        await asyncio.Event().wait()
    finally:
        server.close()


class Simulator:
    """The simulator on its own event loop in a background thread, for in-process use.

    Sharing the caller's process means sharing its GIL: fine for functional checks, but
    timing figures should come from ``python -m kitt.bench.simulator`` in its own process.
    """

    def __init__(
        self, config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or SimulatorConfig()
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._server: SimulatorServer | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> int:
        """Start serving; returns the bound port (raises DaemonStartError if it cannot)."""
        if self._thread is not None:
            return self.port
        self._thread = threading.Thread(target=self._run, name="kitt-simulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self.port

    def _run(self) -> None:
        run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self._server = await start_server(self.config, self.host, self.port)
        except KittError as exc:
            self._error = exc
            self._ready.set()
            return
        self.port = self._server.port
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            self._server.close()
            await self._server.wait_closed()

    def stats(self) -> dict[str, Any]:
        """The ground truth, as ``GET /stats`` reports it."""
        server, loop = self._server, self._loop
        if server is None or loop is None:
            raise RuntimeError("simulator is not running")

        async def snapshot() -> dict[str, Any]:
            return server.stats()

        return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(timeout=30)

    def stop(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already gone
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parser() -> argparse.ArgumentParser:
    defaults = SimulatorConfig()
    p = argparse.ArgumentParser(
        prog="python -m kitt.bench.simulator",
        description="Fake OpenAI-compatible streaming engine with injected TTFT/ITL.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--ttft-ms", type=float, default=defaults.ttft_ms)
    p.add_argument("--itl-ms", type=float, default=defaults.itl_ms)
    p.add_argument("--jitter-ms", type=float, default=defaults.jitter_ms)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--output-len", type=int, default=defaults.default_output_len,
                   help="output tokens when a request names no max_tokens")  # fmt: skip
    p.add_argument("--tokens-per-chunk", type=int, default=defaults.tokens_per_chunk)
    p.add_argument("--error-rate", type=float, default=defaults.error_rate)
    p.add_argument("--midstream-error-rate", type=float, default=defaults.midstream_error_rate)
    p.add_argument("--empty-first-chunk", action="store_true")
    p.add_argument("--model", default=defaults.model)
    p.add_argument(
        "--no-timer-lead",
        dest="timer_lead",
        action="store_false",
        help="plain timers: do not aim early by the measured wake-up latency",
    )
    return p


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    return SimulatorConfig(
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        jitter_ms=args.jitter_ms,
        seed=args.seed,
        default_output_len=args.output_len,
        tokens_per_chunk=args.tokens_per_chunk,
        error_rate=args.error_rate,
        midstream_error_rate=args.midstream_error_rate,
        empty_first_chunk=args.empty_first_chunk,
        model=args.model,
        timer_lead=args.timer_lead,
    )


async def _serve_until_signalled(config: SimulatorConfig, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel if task is not None else sys.exit)

    def ready(bound: int) -> None:
        print(f"listening on http://{host}:{bound}", flush=True)

    with contextlib.suppress(asyncio.CancelledError):
        await serve(config, host, port, ready)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = config_from_args(args)
        run(_serve_until_signalled(config, args.host, args.port))
    except KittError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
