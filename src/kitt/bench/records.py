"""What the client observed for one request, on the client's monotonic clock.

Every derived latency is defined once, here, from these raw instants; ``metrics.py``
only aggregates. Keeping the raw instants (not only the derived numbers) is what lets the
per-request JSONL be re-analysed later with a different definition.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)  # millions of them in a long run
class RequestRecord:
    """One request. Times are ``time.perf_counter()`` seconds.

    ``scheduled`` is when the load profile wanted the request to go out (open loop: the
    arrival time; closed loop: the moment a slot freed up). ``sent`` is when the client
    actually started writing it. Latencies are measured from ``scheduled`` so that a
    client that falls behind its schedule shows up as latency and queue time instead of
    silently lowering the offered load (the "coordinated omission" trap).
    """

    step: str
    index: int
    scheduled: float
    input_len_requested: int | None = None
    output_len_requested: int | None = None
    warmup: bool = False
    repeat_index: int = 0
    sent: float | None = None
    first_chunk: float | None = None  # first SSE data event, even an empty one
    token_times: array[float] = field(default_factory=lambda: array("d"))  # content chunks
    end: float | None = None
    chunks: int = 0  # content chunks (non-empty text)
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    http_status: int | None = None
    error: str | None = None

    # -- derived, each defined once ------------------------------------------------------

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    @property
    def queue_ms(self) -> float | None:
        """Client queue time: scheduled → actually sent (waiting for a free connection or
        for a busy event loop)."""
        if self.sent is None:
            return None
        return (self.sent - self.scheduled) * 1000

    @property
    def ttft_ms(self) -> float | None:
        """Time to first token: scheduled → first chunk carrying non-empty text. Role-only
        or empty first chunks (most engines send one) do not count."""
        if not self.token_times:
            return None
        return (self.token_times[0] - self.scheduled) * 1000

    @property
    def e2e_ms(self) -> float | None:
        """End-to-end latency: scheduled → end of the stream."""
        if self.end is None:
            return None
        return (self.end - self.scheduled) * 1000

    @property
    def output_tokens(self) -> int:
        """Output tokens as the server counted them (``usage``); content chunks otherwise."""
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return self.chunks

    @property
    def tpot_ms(self) -> float | None:
        """Time per output token after the first: (E2E - TTFT) / (n_out - 1). Undefined for
        a one-token output, where there is no second token to time."""
        ttft, e2e, n = self.ttft_ms, self.e2e_ms, self.output_tokens
        if ttft is None or e2e is None or n < 2:
            return None
        return (e2e - ttft) / (n - 1)

    def itl_ms(self) -> list[float]:
        """Inter-token latencies: gaps between successive content chunks."""
        t = self.token_times
        return [(t[i] - t[i - 1]) * 1000 for i in range(1, len(t))]

    @property
    def output_tps_per_user(self) -> float | None:
        """Decode speed one user sees: 1000 / TPOT tokens/s."""
        tpot = self.tpot_ms
        return 1000.0 / tpot if tpot else None

    def as_json(self, origin: float) -> dict[str, Any]:
        """The per-request JSONL line; instants relative to the run's ``origin``."""

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - origin, 6)

        def r3(v: float | None) -> float | None:
            return None if v is None else round(v, 3)

        return {
            "step": self.step,
            "repeat_index": self.repeat_index,
            "index": self.index,
            "warmup": self.warmup,
            "scheduled_s": rel(self.scheduled),
            "sent_s": rel(self.sent),
            "first_token_s": rel(self.token_times[0] if self.token_times else None),
            "end_s": rel(self.end),
            "queue_ms": r3(self.queue_ms),
            "ttft_ms": r3(self.ttft_ms),
            "e2e_ms": r3(self.e2e_ms),
            "tpot_ms": r3(self.tpot_ms),
            "itl_ms": [round(v, 3) for v in self.itl_ms()],
            "input_tokens": self.usage_prompt_tokens,
            "input_len_requested": self.input_len_requested,
            "output_tokens": self.output_tokens,
            "output_len_requested": self.output_len_requested,
            "chunks": self.chunks,
            "usage": self.usage_completion_tokens is not None,
            "http_status": self.http_status,
            "error": self.error,
        }
