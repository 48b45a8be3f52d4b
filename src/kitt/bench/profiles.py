"""Load profiles: how requests are released, step by step.

Closed loop (``synchronous``, ``--concurrency``): N workers, each sends its next request
the moment its previous one ends; the *scheduled* time of a request is that moment.
Open loop (``--rate``): arrival times are drawn up front (Poisson or constant), and each
request is released at its arrival time whether or not earlier ones have finished, so a
slow server shows up as latency and queue time instead of a lowered offered load.
Sweep: synchronous, then the maximum throughput (closed loop at a high concurrency), then
``sweep_steps`` rates spread evenly between the two throughputs (the GuideLLM shape).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["concurrency", "rate"]


@dataclass(frozen=True)
class Step:
    name: str
    mode: Mode
    concurrency: int | None = None
    rate: float | None = None
    arrival: str | None = None
    max_concurrency: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "arrival": self.arrival,
            "max_concurrency": self.max_concurrency,
        }


def closed(concurrency: int, name: str | None = None) -> Step:
    return Step(name or f"c={concurrency}", "concurrency", concurrency=concurrency)


def open_loop(rate: float, arrival: str, max_concurrency: int | None = None) -> Step:
    return Step(f"rate={rate:g}", "rate", rate=rate, arrival=arrival,
                max_concurrency=max_concurrency)  # fmt: skip


def sweep_rates(low: float, high: float, steps: int) -> list[float]:
    """``steps`` rates strictly between the synchronous and the max throughput."""
    if high <= low:
        high = low * 1.5  # a server that does not scale: still probe above its sync rate
    return [round(low + (high - low) * (i + 1) / (steps + 1), 3) for i in range(steps)]


def arrivals(count: int, rate: float, arrival: str, seed: int) -> list[float]:
    """Offsets (s) from the step start at which each request is due."""
    if arrival == "constant":
        return [i / rate for i in range(count)]
    rng = random.Random(f"arrivals:{seed}:{rate}")
    t = 0.0
    out = []
    for _ in range(count):
        out.append(t)
        t += rng.expovariate(rate)
    return out
