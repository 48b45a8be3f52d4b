"""The streaming client: one OpenAI-compatible request → one ``RequestRecord``.

aiohttp rather than httpx here (httpx stays the choice for every control-plane call): the
load generator must sustain >= 1,000 streamed requests/s and >= 50,000 chunks/s on two
cores, and aiohttp's C-accelerated HTTP parser gets there where httpx's pure-Python
stack spends several times the CPU per chunk (``benchmarks/client_fidelity.py``).

Timestamps are taken when bytes come off the socket, once per read: several SSE events
that arrive in one TCP read share one arrival time, which is the truth of what the
client saw. Parsing is bytes-level (``data:`` lines) with one ``json.loads`` per event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any, Literal

import aiohttp

from kitt.bench.datasets import RequestSpec
from kitt.bench.records import RequestRecord

Api = Literal["completions", "chat"]
PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
ERROR_BODY_BYTES = 2048
_DECODER = json.JSONDecoder()


def base_url(endpoint: str) -> str:
    """Accept ``http://host:port``, ``…/v1`` or a full ``…/v1/completions`` URL."""
    url = endpoint.strip().rstrip("/")
    for suffix in (*PATHS.values(), "/v1"):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


class StreamingClient:
    """A connection pool and the request body builder for one endpoint and model."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        api: Api = "completions",
        *,
        extra_body: Mapping[str, Any] | None = None,
        ignore_eos: bool = False,
        min_tokens: bool = False,
        timeout_s: float = 600.0,
        max_connections: int = 0,
        api_key: str | None = None,
    ) -> None:
        self.url = base_url(endpoint) + PATHS[api]
        self.model = model
        self.api = api
        self.extra_body = dict(extra_body or {})
        self.ignore_eos = ignore_eos
        self.min_tokens = min_tokens
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None
        # Set when the engine turned out to drop idle connections (see ``send``).
        self.fresh_connections = False

    async def __aenter__(self) -> StreamingClient:
        connector = aiohttp.TCPConnector(
            limit=self.max_connections, limit_per_host=0, force_close=False,
            enable_cleanup_closed=False, keepalive_timeout=60,
        )  # fmt: skip
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=30),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "kitt-bench"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def body(self, spec: RequestSpec) -> bytes:
        """The request: streaming, usage requested, output length forced."""
        data: dict[str, Any] = {"model": self.model, "stream": True,
                                "stream_options": {"include_usage": True}}  # fmt: skip
        if self.api == "chat":
            data["messages"] = spec.chat_messages()
        else:
            data["prompt"] = spec.prompt
        data["max_tokens"] = spec.output_len
        # Forcing the output length: only the knobs the engine is known to accept (an
        # unknown field is a 400 on strict servers).
        if self.ignore_eos:
            data["ignore_eos"] = True
        if self.min_tokens:
            data["min_tokens"] = spec.output_len
        data.update(self.extra_body)
        return json.dumps(data, separators=(",", ":")).encode()

    async def send(self, spec: RequestSpec, rec: RequestRecord, body: bytes | None = None) -> None:
        """Send one request and fill ``rec``. Never raises for request-level failures:
        they are recorded in ``rec.error`` (a benchmark counts errors, it does not stop).
        ``body``: prebuilt by the caller before the request's scheduled time, so building it
        (long prompts take milliseconds) is not counted as the engine's latency."""
        if body is None:
            body = self.body(spec)
        rec.sent = time.perf_counter()
        for attempt in (0, 1):
            try:
                await self._post(body, rec)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # Not a failed connect (refused, timed out: ClientConnectorError) — a
                # connection from the pool that turned out to be closed.
                stale = not isinstance(exc, aiohttp.ClientConnectorError)
                if stale and attempt == 0 and rec.http_status is None:
                    # A pooled connection the server had already closed: some engines
                    # (llama-server) close after every streamed response while announcing
                    # keep-alive. Nothing reached the engine; from now on every request
                    # gets its own connection, and this one is sent again.
                    self._use_fresh_connections()
                    continue
                rec.error = _describe(exc)
            except asyncio.TimeoutError:
                rec.error = f"timed out after {self.timeout_s:g} s"
            except aiohttp.ClientError as exc:
                rec.error = _describe(exc)
            except OSError as exc:
                rec.error = f"connection error: {exc}"
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
                # A stream that is valid JSON of an unexpected shape: this request's error,
                # never the end of the run.
                rec.error = f"unexpected response from the engine: {_describe(exc)}"
            break
        if rec.end is None:
            rec.end = time.perf_counter()

    def _use_fresh_connections(self) -> None:
        self.fresh_connections = True
        self.headers["Connection"] = "close"

    async def _post(self, body: bytes, rec: RequestRecord) -> None:
        assert self._session is not None, "use the client as an async context manager"  # noqa: S101
        async with self._session.post(self.url, data=body, headers=self.headers) as resp:
            rec.http_status = resp.status
            if resp.status != 200:
                text = await resp.content.read(ERROR_BODY_BYTES)
                rec.error = f"HTTP {resp.status}: {_error_message(text)}"
                rec.end = time.perf_counter()
                return
            await self._read_stream(resp, rec)

    async def _read_stream(self, resp: aiohttp.ClientResponse, rec: RequestRecord) -> None:
        chat = self.api == "chat"
        # JSONDecoder.decode on text skips json.loads' per-call encoding detection: ~15 %
        # of the client's CPU per chunk at 50k chunks/s.
        decode = _DECODER.decode
        perf = time.perf_counter
        token_times = rec.token_times
        tail = b""
        done = finished = False
        async for data in resp.content.iter_any():
            now = perf()
            lines = (tail + data).split(b"\n")
            tail = lines.pop()
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, "event:" lines
                payload = line[5:].strip()
                if rec.first_chunk is None:
                    rec.first_chunk = now
                if payload == b"[DONE]":
                    done = True
                    rec.end = now
                    continue
                try:
                    obj = decode(payload.decode())
                except ValueError:
                    rec.error = f"malformed stream event: {payload[:120]!r}"
                    continue
                if not isinstance(obj, dict):
                    continue
                if "error" in obj:
                    rec.error = "error in stream: " + _error_message(obj)
                    continue
                choices = obj.get("choices")
                if choices:
                    choice = choices[0]
                    if chat:
                        delta = choice.get("delta") or {}
                        text = delta.get("content") or delta.get("reasoning_content")
                    else:
                        text = choice.get("text")
                    if text:
                        token_times.append(now)
                        rec.chunks += 1
                    if choice.get("finish_reason"):
                        finished = True
                usage = obj.get("usage")
                if usage:
                    rec.usage_prompt_tokens = _count(usage.get("prompt_tokens"))
                    rec.usage_completion_tokens = _count(usage.get("completion_tokens"))
        if rec.end is None:
            rec.end = perf()
        if rec.error is None and not (done or finished):
            rec.error = "the stream ended before the response was complete"


def _count(value: Any) -> int | None:
    """A token count from ``usage``: a non-negative integer, or unknown."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _error_message(raw: bytes | dict[str, Any]) -> str:
    """The engine's own message from an OpenAI-style error body, else the raw text."""
    obj: Any = raw
    if isinstance(raw, bytes):
        try:
            obj = json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace").strip()[:300] or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:300]
        return str(err)[:300]
    return str(obj)[:300]
